//! The poller: pages `GetRecords` through shard iterators ahead of the processor.
//!
//! It runs as a task owned by its shard consumer and hands batches over a bounded channel of
//! `max_prefetched_batches`, so the next batch is fetched while the current one is processed.
//! A slow processor holds back at most that many batches, and at most `max_prefetched_bytes`
//! of payload plus one `GetRecords` answer: each batch carries permits of a per-shard byte
//! budget until it was delivered, and the poller calls `GetRecords` only while the budget
//! has room.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::batch::{Batches, FetchedBatch};
use crate::backoff::{Backoff, SeedSource};
use crate::config::PollingConfig;
use crate::error::{Error, ErrorChain, Result};
use crate::sequence::SequenceNumber;
use crate::stream::{StartingPosition, StreamClient};

#[derive(Debug)]
pub(crate) struct Poller {
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) shard_id: String,
    pub(crate) config: PollingConfig,
    pub(crate) seeds: Arc<SeedSource>,
    /// Where the shard starts; used again if the iterator expires before any record came.
    pub(crate) start: StartingPosition,
    pub(crate) batches: Batches,
    pub(crate) progress: Arc<super::Progress>,
}

impl Poller {
    fn backoff(&self) -> Backoff {
        self.config.retry.backoff(self.seeds.next_seed())
    }

    /// A shard iterator at `position`, retrying retryable errors (the worker's stream client
    /// bounds each call by `polling.request_timeout`).
    pub(crate) async fn iterator_at(&self, position: &StartingPosition) -> Result<String> {
        crate::backoff::retry("GetShardIterator", self.backoff(), || {
            self.stream.get_shard_iterator(&self.shard_id, position)
        })
        .await
    }

    /// Fetches from `iterator` until the shard ends, `stop` is cancelled, the consumer drops
    /// the receiver, or a call fails with an error that is not retryable (sent to the
    /// consumer before returning).
    ///
    /// Calls on the shard are at least `min_time_between_reads` apart, and
    /// `idle_time_between_empty_reads` after a read that returned nothing.
    pub(crate) async fn run(
        mut self,
        iterator: String,
        tx: mpsc::Sender<Result<FetchedBatch>>,
        stop: CancellationToken,
    ) {
        let mut iterator = Some(iterator);
        let mut last_fetched: Option<SequenceNumber> = None;
        let mut next_call_at = Instant::now();
        let mut failures: Option<Backoff> = None;
        loop {
            let current = match iterator.take() {
                Some(it) => it,
                None => {
                    // The iterator expired: restart after the last record fetched, which the
                    // consumer has, or will have, received.
                    let position = last_fetched
                        .clone()
                        .map_or_else(|| self.start.clone(), StartingPosition::AfterSequenceNumber);
                    let fetched = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        it = self.iterator_at(&position) => it,
                    };
                    match fetched {
                        Ok(it) => it,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            };
            // Reading is side-effect free, so it may be abandoned at any await.
            let (slot, called_at, answer) = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                answer = async {
                    tokio::time::sleep_until(next_call_at).await;
                    // Fetch only with room for what comes (the throughput bench's memory
                    // figure).
                    let slot = self.batches.room(&tx).await?;
                    let called_at = Instant::now();
                    Some((slot, called_at, self.stream.get_records(&self.shard_id, &current, self.config.max_records).await))
                } => match answer {
                    Some(answer) => answer,
                    // The consumer is gone.
                    None => return,
                },
            };
            let page = match answer {
                Ok(page) => page,
                Err(Error::ExpiredIterator { .. }) => {
                    self.batches.stats.iterator_expired();
                    warn!(shard_id = %self.shard_id, "shard iterator expired; getting a new one");
                    continue;
                }
                Err(error) if error.is_retryable() => {
                    if error.kind() == crate::error::ErrorKind::Throttled {
                        self.batches.stats.throttled();
                    }
                    let delay = failures
                        .get_or_insert_with(|| self.backoff())
                        .next()
                        .unwrap_or(self.config.retry.max_delay);
                    warn!(shard_id = %self.shard_id, error = %ErrorChain(&error), ?delay, "GetRecords failed; retrying");
                    next_call_at = Instant::now() + delay;
                    iterator = Some(current);
                    continue;
                }
                Err(error) => {
                    slot.send(Err(error));
                    return;
                }
            };
            failures = None;
            self.progress.tick();
            // Kinesis allows 5 calls per second per shard: calls start at least
            // `min_time_between_reads` apart, however long each took (counting from the end
            // of a call, a call answering 10,000 records in 150 ms cut a shard's reads to
            // 3 a second: the throughput bench, issue 11). After an empty read the worker is
            // caught up and idles from the answer.
            next_call_at = if page.records.is_empty() {
                Instant::now() + self.config.idle_time_between_empty_reads
            } else {
                called_at + self.config.min_time_between_reads
            };
            if let Some(last) = page.records.last() {
                last_fetched = Some(last.sequence_number.clone());
            }
            let records = self.batches.records(page.records);
            debug!(
                shard_id = %self.shard_id,
                records = records.len(),
                millis_behind_latest = page.millis_behind_latest,
                "fetched"
            );
            iterator = page.next_shard_iterator;
            let shard_end = iterator.is_none().then_some(page.child_shards);
            if !self.batches.worth_sending(&records, shard_end.is_some()) {
                continue;
            }
            let ended = shard_end.is_some();
            let sent = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                sent = self.batches.send(slot, records, page.millis_behind_latest, shard_end) => sent,
            };
            if sent.is_none() || ended {
                return;
            }
        }
    }
}
