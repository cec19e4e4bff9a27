//! The poller: pages `GetRecords` through shard iterators ahead of the processor.
//!
//! It runs as a task owned by its shard consumer and hands batches over a bounded channel of
//! `max_prefetched_batches`, so the next batch is fetched while the current one is processed.
//! A slow processor holds back at most that many batches, and at most `max_prefetched_bytes`
//! of payload plus one `GetRecords` answer: each batch carries permits of a per-shard byte
//! budget until it was delivered, and the poller calls `GetRecords` only while the budget
//! has room.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ShardStats;
use crate::aggregation::{KPL_MAGIC, deaggregate};
use crate::backoff::{Backoff, SeedSource};
use crate::config::PollingConfig;
use crate::counters::Counters;
use crate::error::{Error, ErrorChain, Result};
use crate::sequence::{ExtendedSequenceNumber, SequenceNumber};
use crate::stream::{ChildShard, HashKeyRange, Record, StartingPosition, StreamClient};

/// What the poller hands to the consumer.
#[derive(Debug)]
pub(crate) struct FetchedBatch {
    /// Records in shard order; empty only in the last batch of a shard.
    pub(crate) records: Vec<Record>,
    pub(crate) millis_behind_latest: Option<u64>,
    /// Set on the last batch of a closed shard: its children as `GetRecords` reported them.
    pub(crate) shard_end: Option<Vec<ChildShard>>,
    /// The batch's share of the shard's prefetch byte budget, given back when it is dropped.
    pub(crate) _budget: Option<OwnedSemaphorePermit>,
}

/// What a record counts against the prefetch budget: its payload and partition key.
fn record_bytes(record: &Record) -> usize {
    record.data.len() + record.partition_key.len()
}

#[derive(Debug)]
pub(crate) struct Poller {
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) shard_id: String,
    pub(crate) config: PollingConfig,
    pub(crate) seeds: Arc<SeedSource>,
    /// Where the shard starts; used again if the iterator expires before any record came.
    pub(crate) start: StartingPosition,
    /// Records at or before this position were processed already: a resume from a checkpoint
    /// reads from the checkpointed record itself (`AT_SEQUENCE_NUMBER`), so that the rest of
    /// a KPL aggregate it points into is delivered.
    pub(crate) skip_through: Option<ExtendedSequenceNumber>,
    /// The shard's hash keys: KPL user records outside them are dropped.
    pub(crate) shard_range: Option<HashKeyRange>,
    /// Hand over an empty batch after a read that found no new records
    /// (`processing.call_process_records_even_for_empty_list`).
    pub(crate) deliver_empty: bool,
    /// The shard's prefetch byte budget: `budget_bytes` permits, one per byte.
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) budget_bytes: usize,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) progress: Arc<super::Progress>,
}

impl Poller {
    /// Takes user records out of KPL aggregates, counting what could not be.
    fn deaggregate(&self, records: Vec<Record>) -> Vec<Record> {
        // Most streams hold no aggregates: their pages pass as they came, without a move.
        if !records.iter().any(|r| r.data.starts_with(&KPL_MAGIC)) {
            return records;
        }
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            if !record.data.starts_with(&KPL_MAGIC) {
                out.push(record);
                continue;
            }
            let position = record.sequence_number.clone();
            let result = deaggregate(record, self.shard_range, &mut out);
            if let Some(problem) = &result.problem {
                warn!(shard_id = %self.shard_id, sequence_number = %position, ?problem, "record looks KPL-aggregated but is not; delivered as it came");
                Counters::add(&self.stats.counters().aggregation_errors, 1);
            }
            Counters::add(
                &self.stats.counters().records_out_of_range,
                result.dropped_out_of_range as u64,
            );
        }
        out
    }

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
        self,
        iterator: String,
        tx: mpsc::Sender<Result<FetchedBatch>>,
        stop: CancellationToken,
    ) {
        let mut iterator = Some(iterator);
        let mut skip_through = self.skip_through.clone();
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
                    // Fetch only into a free place of the channel, so a stuck processor holds
                    // its batch and `max_prefetched_batches` more, not one more fetched and
                    // waiting to be handed over (the throughput bench's memory figure).
                    let slot = tx.reserve().await.ok()?;
                    // Fetch only while batches not yet delivered leave room in the budget.
                    drop(self.budget.acquire().await);
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
                    self.stats.iterator_expired();
                    warn!(shard_id = %self.shard_id, "shard iterator expired; getting a new one");
                    continue;
                }
                Err(error) if error.is_retryable() => {
                    if error.kind() == crate::error::ErrorKind::Throttled {
                        self.stats.throttled();
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
            let mut records = self.deaggregate(page.records);
            if let Some(done) = &skip_through {
                records.retain(|r| r.position() > *done);
                if last_fetched
                    .as_ref()
                    .is_some_and(|s| *s > done.sequence_number)
                {
                    skip_through = None;
                }
            }
            debug!(
                shard_id = %self.shard_id,
                records = records.len(),
                millis_behind_latest = page.millis_behind_latest,
                "fetched"
            );
            iterator = page.next_shard_iterator;
            let shard_end = iterator.is_none().then_some(page.child_shards);
            if records.is_empty() && shard_end.is_none() && !self.deliver_empty {
                continue;
            }
            let ended = shard_end.is_some();
            // A batch larger than the whole budget takes all of it and passes alone.
            let bytes: usize = records.iter().map(record_bytes).sum();
            let permits = u32::try_from(bytes.min(self.budget_bytes)).unwrap_or(u32::MAX);
            let sent = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                sent = async {
                    let budget = match permits {
                        0 => None,
                        n => Some(self.budget.clone().acquire_many_owned(n).await.ok()?),
                    };
                    let batch = FetchedBatch {
                        records,
                        millis_behind_latest: page.millis_behind_latest,
                        shard_end,
                        _budget: budget,
                    };
                    slot.send(Ok(batch));
                    Some(())
                } => sent,
            };
            if sent.is_none() || ended {
                return;
            }
        }
    }
}
