//! What a running worker reports about itself.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use super::Coordinator;
use crate::counters::Counters;
use crate::lease::usage::OperationUsage;
use crate::processor::RecordProcessorFactory;
use tracing::debug;

/// What a running worker reports about itself after each taking round; see
/// [`Worker::status`](crate::Worker::status).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// Leases this worker holds.
    pub held_leases: BTreeSet<String>,
    /// Leases this worker asked other workers for and waits to be handed.
    pub pending_handoffs: BTreeSet<String>,
    /// Workers seen in the lease table (this one included).
    pub workers: usize,
    /// Leases of unfinished shards.
    pub active_leases: usize,
    /// Leases no known worker has room for under `max_leases_per_worker`.
    pub spillover: usize,
    /// Taking rounds run so far.
    pub taking_rounds: u64,
    /// Leases this worker handed to another worker on request.
    pub handed_over: u64,
    /// Leases this worker received through a handoff.
    pub received: u64,
    /// Handoffs this worker asked for that timed out and were taken by force.
    pub forced_takes: u64,
    /// Failed attempts of record processor callbacks (errors and panics).
    pub processor_failures: u64,
    /// Of those, panics.
    pub processor_panics: u64,
    /// Shard consumers that failed for good (their lease was released).
    pub shard_failures: u64,
    /// Shard consumers the watchdog restarted after they made no progress.
    pub watchdog_restarts: u64,
    /// Throttled `GetRecords` calls.
    pub throttled_reads: u64,
    /// Records that looked KPL-aggregated but were delivered as plain records.
    pub aggregation_errors: u64,
    /// KPL user records dropped for hashing outside their shard.
    pub records_out_of_range: u64,
    /// Shard ends where the processor's checkpoint did not cover every record delivered:
    /// `SHARD_END` was not written and the shard restarts from its checkpoint.
    pub shard_end_not_checkpointed: u64,
    /// Lease items that did not decode at the last scan of the table. Their shards are
    /// processed by no worker until they are repaired (`kcl-admin repair`); each is logged
    /// once as an error.
    pub invalid_lease_items: usize,
    /// Leases this worker took (any reason, handoffs received included).
    pub leases_taken: u64,
    /// Of those, leases taken because their owner stopped renewing them (failovers).
    pub leases_taken_expired: u64,
    /// Leases this worker lost: taken by another worker, or run out while renewals failed.
    pub leases_lost: u64,
    /// Records `process_records` processed without error.
    pub records_processed: u64,
    /// Data bytes of those records.
    pub bytes_processed: u64,
    /// Checkpoint writes that failed (the store kept failing, or the lease was lost).
    pub checkpoint_failures: u64,
    /// Shard iterators that expired and were renewed.
    pub expired_iterators: u64,
    /// Enhanced fan-out subscriptions opened.
    pub subscriptions: u64,
    /// `SubscribeToShard` calls refused (another subscription still open, the rate limit) or
    /// failed.
    pub subscribe_refusals: u64,
    /// Open subscriptions that failed or sent nothing for `event_timeout`.
    pub subscription_failures: u64,
    /// Each running shard consumer's lag (`millis_behind_latest`) at its last read.
    pub millis_behind_latest: BTreeMap<String, u64>,
    /// When a lease-table call last got an answer (a refused condition or a throttle counts:
    /// the table is reachable). `None` until the first.
    pub lease_table_reached_at: Option<Instant>,
    /// The lease table's requests and consumed capacity units by operation since the store
    /// was made, when the store counts them ([`LeaseStore::usage`](crate::LeaseStore::usage)).
    pub lease_table_usage: BTreeMap<&'static str, OperationUsage>,
    /// Whether this worker reads the whole table every taker interval: always without
    /// [`Watchers`](crate::Watchers) or in a fleet smaller than their `min_workers`, and
    /// otherwise only while it holds a watcher slot.
    pub watcher: bool,
    /// A multi-stream worker's streams; `None` in single-stream mode.
    pub streams: Option<StreamsStatus>,
}

/// The streams of a multi-stream worker ([`WorkerStatus::streams`]), as its stream sync last
/// saw them.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct StreamsStatus {
    /// Streams this worker consumes: listed by its tracker, found, and (with fan-out) with
    /// their consumer registered.
    pub followed: usize,
    /// Listed streams that could not be reached: a followed stream whose last identity check
    /// or shard sync failed, or a new one that could not be looked up (throttled, denied,
    /// timing out). Each is retried on its own schedule; the others are not held up. A
    /// stream answering `ResourceNotFound` is gone, not unreachable.
    pub unreachable: usize,
    /// Former streams (no longer listed, or deleted) whose leases wait in the table for
    /// [`former_streams_grace`](crate::MultiStreamConfig::former_streams_grace) or for their
    /// last holder to stop. Only counted by the workers that check the table for them (all
    /// of them, or the watchers).
    pub pending_deletion: usize,
    /// Former streams whose leases this worker deleted.
    pub deleted: u64,
    /// Times the tracker failed (the streams stayed as they were until the next discovery).
    pub discovery_failures: u64,
}

impl WorkerStatus {
    /// The largest lag among this worker's shards; `None` before any read.
    pub fn max_millis_behind_latest(&self) -> Option<u64> {
        self.millis_behind_latest.values().copied().max()
    }
}

impl<F: RecordProcessorFactory> Coordinator<F> {
    /// Drops the leases the renewer found lost from the registry. Their consumers may still be
    /// finishing a batch; `running` keeps those shards out of reach until they exit.
    pub(super) fn forget_lost_leases(&mut self) {
        for lease in self.held.remove_lost() {
            debug!(lease_key = %lease.lease_key(), "forgetting lost lease");
            self.counters.leases_lost += 1;
        }
    }

    /// Publishes the status; `round` carries the taking round's view of the fleet.
    pub(super) fn publish_status(&mut self, round: Option<(usize, usize, usize)>) {
        self.forget_lost_leases();
        let held = self
            .held
            .all()
            .iter()
            .map(|l| l.lease_key().to_owned())
            .collect();
        let pending = self.incoming.keys().cloned().collect();
        let (counters, metrics) = (&self.counters, &self.metrics);
        let invalid_lease_items = self.invalid_items.count();
        let lags = metrics.lags();
        let reached = self.contact.last_reached();
        let usage = self.store.usage().map(|usage| usage.snapshot());
        let watcher = self.watching();
        let streams = self.is_multi_stream().then(|| {
            let s = &metrics.streams;
            StreamsStatus {
                followed: Counters::get(&s.followed) as usize,
                unreachable: Counters::get(&s.unreachable) as usize,
                pending_deletion: Counters::get(&s.pending_deletion) as usize,
                deleted: Counters::get(&s.deleted),
                discovery_failures: Counters::get(&s.discovery_failures),
            }
        });
        self.status.send_modify(|status| {
            if let Some((workers, active, spillover)) = round {
                status.workers = workers;
                status.active_leases = active;
                status.spillover = spillover;
            }
            status.held_leases = held;
            status.pending_handoffs = pending;
            status.taking_rounds = counters.taking_rounds;
            status.handed_over = counters.handed_over;
            status.received = counters.received;
            status.forced_takes = counters.forced_takes;
            status.shard_failures = counters.shard_failures;
            status.processor_failures = Counters::get(&metrics.processor_failures);
            status.processor_panics = Counters::get(&metrics.processor_panics);
            status.watchdog_restarts = Counters::get(&metrics.watchdog_restarts);
            status.throttled_reads = Counters::get(&metrics.throttled_reads);
            status.aggregation_errors = Counters::get(&metrics.aggregation_errors);
            status.records_out_of_range = Counters::get(&metrics.records_out_of_range);
            status.shard_end_not_checkpointed = Counters::get(&metrics.shard_end_not_checkpointed);
            status.invalid_lease_items = invalid_lease_items;
            status.leases_taken = counters.leases_taken;
            status.leases_taken_expired = counters.leases_taken_expired;
            status.leases_lost = counters.leases_lost;
            status.records_processed = Counters::get(&metrics.records_processed);
            status.bytes_processed = Counters::get(&metrics.bytes_processed);
            status.checkpoint_failures = Counters::get(&metrics.checkpoint_failures);
            status.expired_iterators = Counters::get(&metrics.expired_iterators);
            status.subscriptions = Counters::get(&metrics.subscriptions);
            status.subscribe_refusals = Counters::get(&metrics.subscribe_refusals);
            status.subscription_failures = Counters::get(&metrics.subscription_failures);
            status.millis_behind_latest = lags;
            status.lease_table_reached_at = reached;
            status.watcher = watcher;
            status.streams = streams;
            if let Some(usage) = usage {
                status.lease_table_usage = usage;
            }
        });
        self.published.publish(&self.status.borrow());
    }
}
