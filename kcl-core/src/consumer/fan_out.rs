//! The fan-out reader: `SubscribeToShard` events ahead of the processor, in place of the
//! poller and over the same bounded channel.
//!
//! It subscribes at the consumer's start position, hands each event's records over in order,
//! remembers the event's continuation, and when a subscription ends (every five minutes by
//! the service's rule) or fails, subscribes again at the last continuation it received,
//! skipping the records already handed over: every event received is in the channel or
//! delivered, so nothing is skipped or repeated. (AT the continuation rather than the Java
//! KCL's AFTER it: servers differ on whether the continuation is the last record or the place
//! after it, and the skip makes both right.)
//! Backpressure: it waits for a free place in the channel and room in the byte budget before
//! it asks for the next event (HTTP/2 flow control then holds the service back), so a slow
//! processor holds at most `max_prefetched_batches` events. A subscription that sends nothing
//! for `event_timeout` is dropped and replaced (the service sends an event at least every
//! 5 s; the SDK would wait forever). Refusals and failures back off at least a second,
//! jittered. The consumer stops the reader, and so its subscription, the moment the lease is
//! lost, handed over or the worker shuts down.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Progress;
use super::batch::{Batches, FetchedBatch};
use crate::backoff::{Backoff, SeedSource};
use crate::config::FanOutConfig;
use crate::error::{Error, ErrorChain, Result};
use crate::stream::{ChildShard, StartingPosition, StreamClient};
use crate::subscription::ShardSubscription;

#[derive(Debug)]
pub(crate) struct FanOutReader {
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) shard_id: String,
    pub(crate) consumer_arn: Arc<str>,
    pub(crate) config: FanOutConfig,
    pub(crate) seeds: Arc<SeedSource>,
    /// Where the first subscription starts (the checkpoint's position).
    pub(crate) start: StartingPosition,
    pub(crate) batches: Batches,
    pub(crate) progress: Arc<Progress>,
}

/// How a subscription ended, and what comes next.
enum Ended {
    /// After its time (or the service closed it cleanly): subscribe again at once.
    Normally,
    /// Refused, failed or silent: subscribe again after a backoff.
    Failed,
    /// The shard's last event was handed over, the consumer is gone, or the reader must stop.
    Done,
}

impl FanOutReader {
    fn backoff(&self) -> Backoff {
        self.config.retry.backoff(self.seeds.next_seed())
    }

    /// Reads until the shard ends, `stop` is cancelled, the consumer drops the receiver, or a
    /// failure retrying cannot help (sent to the consumer before returning).
    pub(crate) async fn run(
        mut self,
        tx: mpsc::Sender<Result<FetchedBatch>>,
        stop: CancellationToken,
    ) {
        let mut position = self.start.clone();
        let mut failures: Option<Backoff> = None;
        loop {
            let subscribed = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                s = self.stream.subscribe_to_shard(&self.consumer_arn, &self.shard_id, &position) => s,
            };
            let ended = match subscribed {
                Ok(subscription) => {
                    self.batches.stats.subscribed();
                    debug!(shard_id = %self.shard_id, ?position, "subscribed");
                    self.read(subscription, &mut position, &tx, &stop).await
                }
                Err(e) if e.is_retryable() => {
                    if is_refusal(&e) {
                        self.batches.stats.subscribe_refused();
                    } else {
                        self.batches.stats.subscription_failed();
                    }
                    warn!(shard_id = %self.shard_id, error = %ErrorChain(&e), "SubscribeToShard refused; trying again");
                    Ended::Failed
                }
                Err(e @ (Error::ShardNotFound { .. } | Error::StreamNotFound { .. })) => {
                    let Some(found) = self.why_not_found(e, &position, &stop).await else {
                        return;
                    };
                    let _ = tx.send(Err(found)).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            match ended {
                Ended::Done => return,
                Ended::Normally => failures = None,
                Ended::Failed => {
                    let delay = failures
                        .get_or_insert_with(|| self.backoff())
                        .next()
                        .unwrap_or(self.config.retry.max_delay);
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// What a `ResourceNotFound` answer to `SubscribeToShard` meant. It names no resource: the
    /// shard (past retention), the stream, or the consumer (deregistered) may be gone. A
    /// `GetShardIterator` at the same position tells the shard apart, as it does for the
    /// poller, so a shard gone past retention ends like one polled ([`Error::ShardNotFound`]:
    /// its lease is deleted), and anything else fails the shard's consumer with `not_found`.
    /// `None` when `stop` was cancelled.
    async fn why_not_found(
        &self,
        not_found: Error,
        position: &StartingPosition,
        stop: &CancellationToken,
    ) -> Option<Error> {
        let probe = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            probe = self.stream.get_shard_iterator(&self.shard_id, position) => probe,
        };
        Some(match probe {
            Err(gone @ Error::ShardNotFound { .. }) => gone,
            Err(e @ Error::StreamNotFound { .. }) => e,
            _ => not_found,
        })
    }

    /// Hands over the events of one subscription, moving `position` after each event's
    /// continuation.
    async fn read(
        &mut self,
        mut subscription: Box<dyn ShardSubscription>,
        position: &mut StartingPosition,
        tx: &mpsc::Sender<Result<FetchedBatch>>,
        stop: &CancellationToken,
    ) -> Ended {
        let timeout = self.config.event_timeout;
        // Child shards named by an event that did not end the shard (see below).
        let mut children_seen: Option<Vec<ChildShard>> = None;
        loop {
            // Room first: a slow processor holds the subscription back, not memory.
            let slot = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ended::Done,
                slot = self.batches.room(tx) => match slot {
                    Some(slot) => slot,
                    None => return Ended::Done,
                },
            };
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ended::Done,
                next = tokio::time::timeout(timeout, subscription.next_event()) => next,
            };
            let event = match next {
                Err(_) => {
                    self.batches.stats.subscription_failed();
                    warn!(shard_id = %self.shard_id, ?timeout, "no event from the subscription in time; subscribing again");
                    return Ended::Failed;
                }
                Ok(Ok(None)) => {
                    // A server that never sends the null continuation (ferrokinesis) names
                    // the children on every event of a closed shard and ends the
                    // subscription once it is drained: that end is the shard's.
                    if let Some(children) = children_seen.take() {
                        info!(shard_id = %self.shard_id, "shard end reached through fan-out (subscription drained after child shards)");
                        let _ = self
                            .batches
                            .send(slot, Vec::new(), None, Some(children))
                            .await;
                        return Ended::Done;
                    }
                    debug!(shard_id = %self.shard_id, "subscription ended; subscribing again");
                    return Ended::Normally;
                }
                Ok(Err(e)) if e.is_retryable() => {
                    // Servers that answer a subscribe with HTTP 200 send the refusal as the
                    // stream's first frame (kinesis-mock): counted as what it is.
                    if is_refusal(&e) {
                        self.batches.stats.subscribe_refused();
                    } else {
                        self.batches.stats.subscription_failed();
                    }
                    warn!(shard_id = %self.shard_id, error = %ErrorChain(&e), "subscription failed; subscribing again");
                    return Ended::Failed;
                }
                Ok(Err(e)) => {
                    slot.send(Err(e));
                    return Ended::Done;
                }
                Ok(Ok(Some(event))) => event,
            };
            self.progress.tick();
            if let Some(continuation) = &event.continuation_sequence_number {
                *position = StartingPosition::AtSequenceNumber(continuation.clone());
            }
            let shard_end = if event.is_shard_end() {
                Some(event.child_shards)
            } else {
                if !event.child_shards.is_empty() {
                    children_seen = Some(event.child_shards);
                }
                None
            };
            let records = self.batches.records(event.records);
            // The next subscription starts at the continuation, which may be the last record
            // handed over (AWS) or the place after it (ferrokinesis): what was handed over is
            // skipped either way.
            if let Some(last) = records.last() {
                self.batches.skip_through = Some(last.position());
            }
            if !self.batches.worth_sending(&records, shard_end.is_some()) {
                continue;
            }
            let ended = shard_end.is_some();
            if ended {
                info!(shard_id = %self.shard_id, "shard end reached through fan-out");
            }
            let sent = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ended::Done,
                sent = self.batches.send(slot, records, event.millis_behind_latest, shard_end) => sent,
            };
            if sent.is_none() || ended {
                return Ended::Done;
            }
        }
    }
}

/// Another subscription of this consumer to this shard is still open, or subscribes come
/// faster than one a second: the service's refusals, as opposed to failures.
fn is_refusal(e: &Error) -> bool {
    matches!(e, Error::ResourceInUse { .. } | Error::Throttled { .. })
}
