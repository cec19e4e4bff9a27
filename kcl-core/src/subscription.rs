//! Enhanced fan-out: registered stream consumers and shard subscriptions, the part of the
//! [`StreamClient`](crate::StreamClient) seam that `SubscribeToShard` reading goes through.
//!
//! A subscription pushes events (records, the continuation sequence number, the lag) for up to
//! five minutes, then ends; the reader subscribes again after the last continuation it
//! received. A closed shard's last event has no continuation and names the shard's children.

use std::fmt;

use async_trait::async_trait;

use crate::error::Result;
use crate::sequence::SequenceNumber;
use crate::stream::{ChildShard, Record};

/// A consumer registered on a stream for enhanced fan-out.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct StreamConsumer {
    /// The consumer's name, unique per stream.
    pub name: String,
    /// The consumer's ARN, which subscriptions name.
    pub arn: String,
    /// Whether subscriptions may use it yet.
    pub status: ConsumerStatus,
}

impl StreamConsumer {
    /// A consumer description.
    pub fn new(name: impl Into<String>, arn: impl Into<String>, status: ConsumerStatus) -> Self {
        StreamConsumer {
            name: name.into(),
            arn: arn.into(),
            status,
        }
    }
}

/// The life of a registered consumer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum ConsumerStatus {
    /// Registered, not usable yet (seconds on AWS).
    Creating,
    /// Usable.
    Active,
    /// Being deregistered.
    Deleting,
}

/// One event of a shard subscription.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct SubscriptionEvent {
    /// The records, in shard order (KPL aggregates not yet taken apart).
    pub records: Vec<Record>,
    /// Where reading continues: a later subscription starts after it. `None` on the last
    /// event of a closed shard (the SDK reports that as an empty string).
    pub continuation_sequence_number: Option<SequenceNumber>,
    /// How far this event is behind the tip of the shard.
    pub millis_behind_latest: Option<u64>,
    /// At the shard's end: its children.
    pub child_shards: Vec<ChildShard>,
}

impl SubscriptionEvent {
    /// An event with records and the continuation to resume after.
    pub fn new(records: Vec<Record>, continuation: Option<SequenceNumber>) -> Self {
        SubscriptionEvent {
            records,
            continuation_sequence_number: continuation,
            millis_behind_latest: None,
            child_shards: Vec::new(),
        }
    }

    /// Sets how far behind the tip the event is.
    #[must_use]
    pub fn with_millis_behind_latest(mut self, millis: u64) -> Self {
        self.millis_behind_latest = Some(millis);
        self
    }

    /// Sets the children of an ended shard.
    #[must_use]
    pub fn with_child_shards(mut self, children: Vec<ChildShard>) -> Self {
        self.child_shards = children;
        self
    }

    /// True when this is the last event of a closed shard.
    pub fn is_shard_end(&self) -> bool {
        self.continuation_sequence_number.is_none()
    }
}

/// An open subscription to one shard.
///
/// Implementations put no time limit on [`ShardSubscription::next_event`] (the AWS SDK has
/// none): the reader bounds each wait itself.
#[async_trait]
pub trait ShardSubscription: Send + fmt::Debug {
    /// The next event; `Ok(None)` once the subscription ended normally (after its five
    /// minutes, or after the last event of a closed shard). An error ends the subscription.
    async fn next_event(&mut self) -> Result<Option<SubscriptionEvent>>;
}
