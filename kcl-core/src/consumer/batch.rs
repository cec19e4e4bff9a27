//! What both readers (the poller and the fan-out reader) do with the records they fetched:
//! take KPL aggregates apart, drop what the checkpoint covers, and hand the batch to the
//! consumer over the bounded channel with its share of the shard's prefetch byte budget.

use std::sync::Arc;

use tokio::sync::mpsc::{Permit, Sender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use super::ShardStats;
use crate::aggregation::{KPL_MAGIC, deaggregate};
use crate::counters::Counters;
use crate::error::Result;
use crate::sequence::ExtendedSequenceNumber;
use crate::stream::{ChildShard, HashKeyRange, Record};

/// What a reader hands to the consumer.
#[derive(Debug)]
pub(crate) struct FetchedBatch {
    /// Records in shard order; empty only in the last batch of a shard.
    pub(crate) records: Vec<Record>,
    pub(crate) millis_behind_latest: Option<u64>,
    /// Set on the last batch of a closed shard: its children as the service reported them.
    pub(crate) shard_end: Option<Vec<ChildShard>>,
    /// The batch's share of the shard's prefetch byte budget, given back when it is dropped.
    pub(crate) _budget: Option<OwnedSemaphorePermit>,
}

/// What a record counts against the prefetch budget: its payload and partition key.
fn record_bytes(record: &Record) -> usize {
    record.data.len() + record.partition_key.len()
}

/// The batch-making state of one reading session.
#[derive(Debug)]
pub(crate) struct Batches {
    pub(crate) shard_id: String,
    /// The shard's hash keys: KPL user records outside them are dropped.
    pub(crate) shard_range: Option<HashKeyRange>,
    /// Records at or before this position were processed already: a resume from a checkpoint
    /// reads from the checkpointed record itself (`AT_SEQUENCE_NUMBER`), so that the rest of
    /// a KPL aggregate it points into is delivered. Cleared once reading passed it.
    pub(crate) skip_through: Option<ExtendedSequenceNumber>,
    /// Hand over an empty batch after a read that found no new records
    /// (`processing.call_process_records_even_for_empty_list`).
    pub(crate) deliver_empty: bool,
    /// The shard's prefetch byte budget: `budget_bytes` permits, one per byte.
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) budget_bytes: usize,
    pub(crate) stats: Arc<ShardStats>,
}

impl Batches {
    /// Waits for room to read into: a free place in the channel (so a stuck processor holds
    /// its batch and `max_prefetched_batches` more, not one more fetched and waiting to be
    /// handed over), and room in the byte budget. `None` once the consumer is gone.
    pub(crate) async fn room<'a>(
        &self,
        tx: &'a Sender<Result<FetchedBatch>>,
    ) -> Option<Permit<'a, Result<FetchedBatch>>> {
        let slot = tx.reserve().await.ok()?;
        drop(self.budget.acquire().await);
        Some(slot)
    }

    /// The records of a read to deliver: user records out of aggregates, without those the
    /// checkpoint covers.
    pub(crate) fn records(&mut self, fetched: Vec<Record>) -> Vec<Record> {
        let last_fetched = fetched.last().map(|r| r.sequence_number.clone());
        let mut records = self.deaggregate(fetched);
        if let Some(done) = &self.skip_through {
            records.retain(|r| r.position() > *done);
            if last_fetched.is_some_and(|s| s > done.sequence_number) {
                self.skip_through = None;
            }
        }
        records
    }

    /// Whether a read gives the consumer anything: records, the shard's end, or (when asked
    /// for) an empty batch to flush on.
    pub(crate) fn worth_sending(&self, records: &[Record], shard_end: bool) -> bool {
        !records.is_empty() || shard_end || self.deliver_empty
    }

    /// Hands a batch over through `slot`, once the byte budget has room for it (a batch larger
    /// than the whole budget takes all of it and passes alone). `None` once the consumer is
    /// gone.
    pub(crate) async fn send(
        &self,
        slot: Permit<'_, Result<FetchedBatch>>,
        records: Vec<Record>,
        millis_behind_latest: Option<u64>,
        shard_end: Option<Vec<ChildShard>>,
    ) -> Option<()> {
        let bytes: usize = records.iter().map(record_bytes).sum();
        let permits = u32::try_from(bytes.min(self.budget_bytes)).unwrap_or(u32::MAX);
        let budget = match permits {
            0 => None,
            n => Some(self.budget.clone().acquire_many_owned(n).await.ok()?),
        };
        slot.send(Ok(FetchedBatch {
            records,
            millis_behind_latest,
            shard_end,
            _budget: budget,
        }));
        Some(())
    }

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
}
