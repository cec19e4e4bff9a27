//! Counters a worker and its shard consumers add to, reported in
//! [`WorkerStatus`](crate::WorkerStatus).

use std::collections::BTreeMap;
use std::sync::Mutex;
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
    /// Records `process_records` processed without error.
    pub(crate) records_processed: AtomicU64,
    /// Their data bytes.
    pub(crate) bytes_processed: AtomicU64,
    /// Checkpoint writes that failed.
    pub(crate) checkpoint_failures: AtomicU64,
    /// Shard iterators that expired.
    pub(crate) expired_iterators: AtomicU64,
    /// Fan-out subscriptions opened.
    pub(crate) subscriptions: AtomicU64,
    /// Subscribes refused or failed.
    pub(crate) subscribe_refusals: AtomicU64,
    /// Open subscriptions that failed or went silent.
    pub(crate) subscription_failures: AtomicU64,
    /// A multi-stream worker's streams, as its stream sync last saw them.
    pub(crate) streams: StreamCounts,
    /// Each running consumer's lag at its last read, by shard.
    lags: Mutex<BTreeMap<String, u64>>,
}

/// What the stream sync of a multi-stream worker reports (see
/// [`StreamsStatus`](crate::StreamsStatus)): the first three are set, the last two only grow.
#[derive(Debug, Default)]
pub(crate) struct StreamCounts {
    pub(crate) followed: AtomicU64,
    pub(crate) unreachable: AtomicU64,
    pub(crate) pending_deletion: AtomicU64,
    pub(crate) deleted: AtomicU64,
    pub(crate) discovery_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }

    /// Records `shard_id`'s lag at its last read.
    pub(crate) fn set_lag(&self, shard_id: &str, millis: u64) {
        let mut lags = self.lags.lock().unwrap_or_else(|e| e.into_inner());
        match lags.get_mut(shard_id) {
            Some(lag) => *lag = millis,
            None => {
                lags.insert(shard_id.to_owned(), millis);
            }
        }
    }

    /// Forgets `shard_id`'s lag: its consumer stopped.
    pub(crate) fn clear_lag(&self, shard_id: &str) {
        self.lags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(shard_id);
    }

    /// Each running consumer's lag at its last read.
    pub(crate) fn lags(&self) -> BTreeMap<String, u64> {
        self.lags.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
