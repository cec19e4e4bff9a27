//! Counters a worker and its shard consumers add to, reported in
//! [`WorkerStatus`](crate::WorkerStatus).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Records that looked KPL-aggregated but were delivered as plain records.
    pub(crate) aggregation_errors: AtomicU64,
    /// KPL user records dropped for hashing outside their shard.
    pub(crate) records_out_of_range: AtomicU64,
    /// Failed attempts of processor callbacks (errors and panics).
    pub(crate) processor_failures: AtomicU64,
    /// Of those, panics.
    pub(crate) processor_panics: AtomicU64,
    /// Shard consumers the watchdog restarted.
    pub(crate) watchdog_restarts: AtomicU64,
    /// Throttled `GetRecords` calls.
    pub(crate) throttled_reads: AtomicU64,
    /// Shard ends where the processor's checkpoint did not cover every record delivered, so
    /// `SHARD_END` was not written and the shard restarts from its checkpoint.
    pub(crate) shard_end_not_checkpointed: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
