//! What one shard consumer reports: into the worker's counters (the
//! [`WorkerStatus`](crate::WorkerStatus) snapshot) and through the metrics facade.

use std::sync::Arc;
use std::time::Duration;

use crate::counters::Counters;
use crate::metrics::{MetricsConfig, ShardMetrics};

#[derive(Debug)]
pub(crate) struct ShardStats {
    shard_id: String,
    counters: Arc<Counters>,
    metrics: ShardMetrics,
}

impl ShardStats {
    pub(crate) fn new(
        counters: Arc<Counters>,
        config: &MetricsConfig,
        stream: &str,
        shard_id: &str,
    ) -> Self {
        ShardStats {
            shard_id: shard_id.to_owned(),
            metrics: ShardMetrics::new(config, stream, shard_id),
            counters,
        }
    }

    /// The worker's counters, for what only they count.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// `process_records` returned `Ok` on `records` records of `bytes` data bytes.
    pub(crate) fn processed(&self, records: u64, bytes: u64) {
        Counters::add(&self.counters.records_processed, records);
        Counters::add(&self.counters.bytes_processed, bytes);
        self.metrics.processed(records, bytes);
    }

    /// A read found the shard `millis` behind its tip.
    pub(crate) fn lag(&self, millis: u64) {
        self.counters.set_lag(&self.shard_id, millis);
        self.metrics.lag(millis);
    }

    pub(crate) fn process_records_took(&self, took: Duration) {
        self.metrics.process_records_took(took);
    }

    pub(crate) fn checkpoint_failed(&self) {
        Counters::add(&self.counters.checkpoint_failures, 1);
        self.metrics.checkpoint_failed();
    }

    pub(crate) fn throttled(&self) {
        Counters::add(&self.counters.throttled_reads, 1);
        self.metrics.throttled();
    }

    /// A fan-out subscription was opened.
    pub(crate) fn subscribed(&self) {
        Counters::add(&self.counters.subscriptions, 1);
        self.metrics.subscribed();
    }

    /// A subscribe was refused: another subscription still open, or the rate limit.
    pub(crate) fn subscribe_refused(&self) {
        Counters::add(&self.counters.subscribe_refusals, 1);
        self.metrics.subscribe_refused();
    }

    /// An open subscription failed or went silent.
    pub(crate) fn subscription_failed(&self) {
        Counters::add(&self.counters.subscription_failures, 1);
        self.metrics.subscription_failed();
    }

    pub(crate) fn iterator_expired(&self) {
        Counters::add(&self.counters.expired_iterators, 1);
        self.metrics.iterator_expired();
    }
}

impl Drop for ShardStats {
    /// A stopped consumer has no lag: it must not hold up the worker's maximum.
    fn drop(&mut self) {
        self.counters.clear_lag(&self.shard_id);
    }
}
