//! The stream seam: shards, records and the [`StreamClient`] trait the core reads through.
//!
//! The AWS implementation is [`KinesisStreamClient`](crate::KinesisStreamClient) (feature
//! `kinesis`); the in-memory one for tests is in [`testing`](crate::testing) (feature
//! `test-util`).

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::sequence::{ExtendedSequenceNumber, SequenceNumber};
use crate::stream_identity::StreamIdentity;
use crate::subscription::{ShardSubscription, StreamConsumer};

/// A data record as delivered to a [`RecordProcessor`](crate::RecordProcessor).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The record's sequence number in its shard.
    pub sequence_number: SequenceNumber,
    /// The user record's index inside a KPL-aggregated record; 0 for a plain record.
    pub sub_sequence_number: u64,
    /// The partition key the producer chose.
    pub partition_key: String,
    /// The payload. Cheap to clone: a processor can keep records across batches without
    /// copying them (user records of a KPL aggregate share the aggregate's buffer).
    pub data: Bytes,
    /// When Kinesis accepted the record, if reported.
    pub approximate_arrival_timestamp: Option<SystemTime>,
    /// The explicit hash key a KPL user record was routed with, if any.
    pub explicit_hash_key: Option<String>,
    /// True for a user record taken out of a KPL-aggregated record.
    pub aggregated: bool,
}

impl Record {
    /// A plain (not aggregated) record.
    pub fn new(
        sequence_number: SequenceNumber,
        partition_key: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Self {
        Record {
            sequence_number,
            sub_sequence_number: 0,
            partition_key: partition_key.into(),
            data: data.into(),
            approximate_arrival_timestamp: None,
            explicit_hash_key: None,
            aggregated: false,
        }
    }

    /// Sets the arrival timestamp.
    #[must_use]
    pub fn with_approximate_arrival_timestamp(mut self, at: SystemTime) -> Self {
        self.approximate_arrival_timestamp = Some(at);
        self
    }

    /// The record's position: sequence number and sub-sequence number.
    pub fn position(&self) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::new(self.sequence_number.clone(), self.sub_sequence_number)
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("sequence_number", &self.sequence_number.as_str())
            .field("sub_sequence_number", &self.sub_sequence_number)
            .field("partition_key", &self.partition_key)
            .field("data_len", &self.data.len())
            .field("aggregated", &self.aggregated)
            .finish()
    }
}

/// The range of 128-bit partition-key hashes a shard serves (inclusive at both ends).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HashKeyRange {
    /// First hash key of the shard.
    pub starting_hash_key: u128,
    /// Last hash key of the shard.
    pub ending_hash_key: u128,
}

impl HashKeyRange {
    /// The whole key space, 0 ..= 2^128 − 1.
    pub const FULL: HashKeyRange = HashKeyRange {
        starting_hash_key: 0,
        ending_hash_key: u128::MAX,
    };
}

/// A shard as listed by `ListShards`.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Shard {
    /// The shard id, e.g. `shardId-000000000003`.
    pub shard_id: String,
    /// The shard this one was split from, or the first of the two it was merged from.
    pub parent_shard_id: Option<String>,
    /// The second parent of a merge.
    pub adjacent_parent_shard_id: Option<String>,
    /// The hash keys this shard serves.
    pub hash_key_range: HashKeyRange,
    /// Sequence number of the shard's first record.
    pub starting_sequence_number: Option<String>,
    /// Sequence number of the shard's last record: set once the shard is closed.
    pub ending_sequence_number: Option<String>,
}

impl Shard {
    /// An open shard without parents.
    pub fn new(shard_id: impl Into<String>, hash_key_range: HashKeyRange) -> Self {
        Shard {
            shard_id: shard_id.into(),
            parent_shard_id: None,
            adjacent_parent_shard_id: None,
            hash_key_range,
            starting_sequence_number: None,
            ending_sequence_number: None,
        }
    }

    /// True while the shard accepts new records.
    pub fn is_open(&self) -> bool {
        self.ending_sequence_number.is_none()
    }

    /// The parent shard ids (none, one for a split, two for a merge).
    pub fn parent_shard_ids(&self) -> Vec<String> {
        self.parent_shard_id
            .iter()
            .chain(self.adjacent_parent_shard_id.iter())
            .cloned()
            .collect()
    }
}

/// A child of a shard that reached its end, as reported by `GetRecords`.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ChildShard {
    /// The child's shard id.
    pub shard_id: String,
    /// All parents of the child (two for a merge).
    pub parent_shard_ids: Vec<String>,
    /// The hash keys the child serves.
    pub hash_key_range: HashKeyRange,
}

impl ChildShard {
    /// A child shard description.
    pub fn new(
        shard_id: impl Into<String>,
        parent_shard_ids: Vec<String>,
        hash_key_range: HashKeyRange,
    ) -> Self {
        ChildShard {
            shard_id: shard_id.into(),
            parent_shard_ids,
            hash_key_range,
        }
    }
}

/// Where a shard iterator starts.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum StartingPosition {
    /// The oldest record still retained.
    TrimHorizon,
    /// Just after the newest record: only records put from now on.
    Latest,
    /// The first record that arrived at or after the time.
    AtTimestamp(SystemTime),
    /// The record with this sequence number.
    AtSequenceNumber(SequenceNumber),
    /// The record after this sequence number.
    AfterSequenceNumber(SequenceNumber),
}

/// One `GetRecords` answer.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct RecordsPage {
    /// The records, in shard order.
    pub records: Vec<Record>,
    /// The iterator for the next call; `None` once a closed shard was read to its end.
    pub next_shard_iterator: Option<String>,
    /// How far the last record is behind the tip of the stream.
    pub millis_behind_latest: Option<u64>,
    /// When the shard ended (`next_shard_iterator` is `None`): its children, if the service
    /// reported them.
    pub child_shards: Vec<ChildShard>,
}

impl RecordsPage {
    /// A page of records with the next iterator.
    pub fn new(records: Vec<Record>, next_shard_iterator: Option<String>) -> Self {
        RecordsPage {
            records,
            next_shard_iterator,
            millis_behind_latest: None,
            child_shards: Vec::new(),
        }
    }

    /// Sets how far behind the stream's tip this page is.
    #[must_use]
    pub fn with_millis_behind_latest(mut self, millis: u64) -> Self {
        self.millis_behind_latest = Some(millis);
        self
    }

    /// Sets the children reported at the shard's end.
    #[must_use]
    pub fn with_child_shards(mut self, children: Vec<ChildShard>) -> Self {
        self.child_shards = children;
        self
    }
}

/// Read access to one Kinesis data stream: the seam between the core and Kinesis.
///
/// Implementations map their failures onto [`Error`](crate::Error) variants so that
/// [`Error::kind`](crate::Error::kind) classifies them: `ExpiredIterator` for an expired shard
/// iterator, `Throttled`, `Transient`, `StreamNotFound`, `Service` for the rest.
#[async_trait]
pub trait StreamClient: Send + Sync + fmt::Debug + 'static {
    /// The stream's name or ARN, for messages.
    fn stream_name(&self) -> &str;

    /// Every shard of the stream (open and closed but retained), following all pages.
    async fn list_shards(&self) -> Result<Vec<Shard>>;

    /// A shard iterator starting at `position`.
    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String>;

    /// Up to `limit` records from `shard_iterator`.
    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage>;

    /// The stream's identity for multi-stream lease keys: its account, name and creation time
    /// (`DescribeStreamSummary`). A stream deleted and created again has another identity.
    /// Clients that cannot tell keep the default, which answers [`Error::Unsupported`].
    async fn stream_identity(&self) -> Result<StreamIdentity> {
        Err(Error::Unsupported {
            operation: "DescribeStreamSummary",
        })
    }

    /// The enhanced fan-out consumer named `consumer` (a name on this stream, or a consumer
    /// ARN), or `None` when there is none. Clients that only poll keep the default, which
    /// answers [`Error::Unsupported`].
    async fn describe_stream_consumer(&self, consumer: &str) -> Result<Option<StreamConsumer>> {
        let _ = consumer;
        Err(Error::Unsupported {
            operation: "DescribeStreamConsumer",
        })
    }

    /// Registers an enhanced fan-out consumer named `name` on this stream.
    ///
    /// # Errors
    /// [`Error::ResourceInUse`] when a consumer of that name exists or is being registered
    /// (by another worker, say): describe it instead.
    async fn register_stream_consumer(&self, name: &str) -> Result<StreamConsumer> {
        let _ = name;
        Err(Error::Unsupported {
            operation: "RegisterStreamConsumer",
        })
    }

    /// Subscribes the consumer `consumer_arn` to `shard_id` from `position`.
    ///
    /// # Errors
    /// [`Error::ResourceInUse`] while another subscription of this consumer to this shard is
    /// open; [`Error::Throttled`] beyond one subscribe a second per shard and consumer;
    /// [`Error::ShardNotFound`] or [`Error::StreamNotFound`] when the shard, the stream or the
    /// consumer does not exist (Kinesis does not say which: the reader asks
    /// [`Self::get_shard_iterator`]).
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<Box<dyn ShardSubscription>> {
        let _ = (consumer_arn, shard_id, position);
        Err(Error::Unsupported {
            operation: "SubscribeToShard",
        })
    }
}
