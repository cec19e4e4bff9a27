//! Worker configuration: named fields, documented defaults, `with_*` setters and
//! [`WorkerConfig::validate`].
//!
//! Defaults follow the Java KCL (v2/v3, `LeaseManagementConfig`, `PollingConfig`,
//! `SimpleRecordsFetcherFactory`) unless a field says why it differs.

use std::time::{Duration, SystemTime};

mod multi_stream;
mod retrieval;
mod watchers;

pub use multi_stream::MultiStreamConfig;
pub use retrieval::{ConsumerRef, FanOutConfig, MIN_SUBSCRIBE_BACKOFF, Retrieval};
pub use watchers::Watchers;

use crate::error::{Error, Result};
use crate::metrics::MetricsConfig;

/// Where a worker starts reading a shard that has no checkpoint yet.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum InitialPosition {
    /// The oldest record the stream retains.
    TrimHorizon,
    /// Only records put after the worker starts reading the shard. Default, as in the Java KCL
    /// (`RetrievalConfig.initialPositionInStreamExtended`).
    #[default]
    Latest,
    /// The first record that arrived at or after this time.
    AtTimestamp(SystemTime),
}

/// A retry schedule: exponential backoff with full jitter, as data.
///
/// The delay before retry *n* is drawn from `min_delay · factorⁿ` capped at `max_delay`, plus
/// a random jitter of up to the same amount.
#[derive(Clone, Copy, PartialEq, Debug)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Delay before the first retry.
    pub min_delay: Duration,
    /// Largest delay between two attempts.
    pub max_delay: Duration,
    /// Growth of the delay per attempt (at least 1).
    pub factor: f32,
    /// Attempts including the first one; `None` retries until the caller's deadline.
    pub max_attempts: Option<usize>,
}

impl RetryConfig {
    /// A schedule from `min_delay` to `max_delay`, doubling, without an attempt limit.
    pub fn new(min_delay: Duration, max_delay: Duration) -> Self {
        RetryConfig {
            min_delay,
            max_delay,
            factor: 2.0,
            max_attempts: None,
        }
    }

    /// Sets the growth factor.
    #[must_use]
    pub fn with_factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    /// Sets the attempt limit.
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: Option<usize>) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    pub(crate) fn validate(&self, field: &'static str) -> Result<()> {
        within_bound(field, self.min_delay)?;
        within_bound(field, self.max_delay)?;
        if self.min_delay.is_zero() {
            return Err(Error::invalid_config(field, "min_delay must be above zero"));
        }
        if self.max_delay < self.min_delay {
            return Err(Error::invalid_config(
                field,
                format!(
                    "max_delay ({:?}) must be at least min_delay ({:?})",
                    self.max_delay, self.min_delay
                ),
            ));
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(Error::invalid_config(
                field,
                format!(
                    "factor must be a finite number of at least 1, not {}",
                    self.factor
                ),
            ));
        }
        if self.max_attempts == Some(0) {
            return Err(Error::invalid_config(
                field,
                "max_attempts must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Lease timing and limits.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct LeaseConfig {
    /// How long a lease's counter may stay unchanged, as seen by another worker, before that
    /// worker considers the lease expired and takes it.
    /// Default 10 s: the Java KCL's `failoverTimeMillis`.
    pub lease_duration: Duration,
    /// How often held leases are renewed.
    /// Default 3.5 s: near the Java KCL's `failoverTimeMillis / 3 − epsilon` (3,308 ms),
    /// leaving almost three renewal chances in each lease duration. Renewals are nearly all of
    /// what the lease table costs; at 3.5 s (with [`Watchers`]) a fleet of 1,000 leases and
    /// 100 workers costs no more than the Java KCL 3.x's. 3 s buys half a second more
    /// [`LeaseConfig::outage_tolerance`] for 17% more write units (see
    /// `docs/lease-table-cost.md`).
    pub renewal_interval: Duration,
    /// How often the worker scans the lease table to take unowned and expired leases.
    /// Default 2 s. The Java KCL waits 20 s (`2 × (failoverTimeMillis + epsilon)`), which makes
    /// its failover take up to 30 s; a crashed worker's shards are taken here within
    /// `lease_duration + taker_interval` (12 s with the defaults) for one `Scan` of the table
    /// per interval and worker.
    pub taker_interval: Duration,
    /// How often the worker lists the stream's shards and creates missing leases.
    /// Default 60 s: the Java KCL's `shardSyncIntervalMillis`.
    pub shard_sync_interval: Duration,
    /// Most leases one worker holds. Default unlimited, as the Java KCL's `maxLeasesForWorker`
    /// (`Integer.MAX_VALUE`). Leases left over when every worker is at its limit are logged
    /// and counted in [`WorkerStatus::spillover`](crate::WorkerStatus).
    pub max_leases_per_worker: usize,
    /// Most leases a worker asks other workers for in one taking round. Default unlimited: a
    /// new worker asks for its whole share at once and is balanced within two rounds (the
    /// first asks for the floor of its share, the second for one more where a worker holds
    /// more than the ceiling), whatever the fleet's size. (The Java KCL's
    /// `maxLeasesToStealAtOneTime` is 1, so it takes one taker interval, 20 s, per lease.) A
    /// bound keeps one round's handoffs, and the processor restarts they cost, a smaller
    /// burst. 0 disables balancing by handoff (free and expired leases are still taken).
    pub max_leases_to_steal: usize,
    /// How long a worker waits for a lease it asked for to be handed over before it takes it
    /// anyway, and how long a lease reserved for a worker waits for that worker. Default 10 s
    /// (one lease duration): enough for a processor to finish a batch and checkpoint. (The
    /// Java KCL 3's `gracefulLeaseHandoffTimeoutMillis` is 30 s.)
    pub handoff_timeout: Duration,
    /// How often a worker reads the leases it is waiting for, so it starts a handed-over shard
    /// within this long of its release. Default 200 ms; one `BatchGetItem` per interval, and
    /// only while a handoff is pending.
    pub handoff_poll_interval: Duration,
    /// Timeout of one lease-table call: each attempt of a renewal, checkpoint, take or
    /// release, and each table read. A call this slow is stuck (say on a dead pooled
    /// connection): it is cancelled and retried like any transient failure. Default 2 s:
    /// DynamoDB answers in milliseconds, and a renewal that times out can be retried within
    /// the renewal interval (3.5 s), several times before the lease runs out. (The Java KCL
    /// bounds each call by `dynamoDbRequestTimeout`, 1 min, longer than its lease duration, so
    /// one stuck renewal there loses the lease.) Must be shorter than `lease_duration -
    /// renewal_interval`. Reads of many leases are bounded by `scan_timeout` instead.
    pub request_timeout: Duration,
    /// Timeout of a read of many leases: a whole-table `Scan` (all its pages) or a
    /// `BatchGetItem` of many keys. Default 10 s: a scan of a table of thousands of leases is
    /// many requests, and nothing is lost while a taking round waits (the next round retries).
    pub scan_timeout: Duration,
    /// How often a worker reads the parent leases its child shards wait for after a reshard,
    /// so a child starts within this long of its last parent finishing. Default 500 ms (the
    /// Java KCL's `parentShardPollIntervalMillis` is 10 s); one `BatchGetItem` per interval
    /// for all waiting children, only while some wait. A parent finishing on the same worker
    /// starts its children at once.
    pub parent_poll_interval: Duration,
    /// Backoff for retrying lease-table calls (renewals retry only while the lease has not
    /// run out). Default 100 ms to 1 s: several retries fit in one renewal interval.
    pub retry: RetryConfig,
    /// Whether the taking round's table scan reads with eventual consistency, at half the
    /// read units of a strongly consistent one. Default `true`. A lease's counter only grows,
    /// so an item read a little behind its latest write can only make an expiry look later,
    /// never earlier, and any take or request based on it fails its condition on the fence;
    /// the cost is at most a round's delay. Reads whose answer a write depends on without a
    /// fence (the shard sync's, the lineage checks, the handoff and parent polls) stay
    /// strongly consistent. (The Java KCL 3.x leader scans with eventual consistency.)
    pub eventually_consistent_scans: bool,
    /// Which workers read the whole table every `taker_interval`. Default
    /// `Some(Watchers::default())`: in a fleet of fewer than ten workers, every worker; in a
    /// bigger one two watchers, while the other workers read it as the fleet settles and
    /// every two minutes, so that the table's scans cost two workers' whatever the fleet's
    /// size (a crashed worker's leases are then taken by the watchers and rebalanced later,
    /// by graceful handoffs). `None`: every worker, whatever the fleet's size, at a cost that
    /// grows with leases × workers. See `docs/lease-table-cost.md`.
    pub watchers: Option<Watchers>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease_duration: Duration::from_secs(10),
            renewal_interval: Duration::from_millis(3_500),
            taker_interval: Duration::from_secs(2),
            shard_sync_interval: Duration::from_secs(60),
            max_leases_per_worker: usize::MAX,
            max_leases_to_steal: usize::MAX,
            handoff_timeout: Duration::from_secs(10),
            handoff_poll_interval: Duration::from_millis(200),
            parent_poll_interval: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            scan_timeout: Duration::from_secs(10),
            retry: RetryConfig::new(Duration::from_millis(100), Duration::from_secs(1)),
            eventually_consistent_scans: true,
            watchers: Some(Watchers::default()),
        }
    }
}

impl LeaseConfig {
    /// The longest lease-table outage every held lease survives, whatever its kind and
    /// whenever it starts: `lease_duration − renewal_interval − request_timeout −
    /// retry.max_delay` (3.5 s with the defaults).
    ///
    /// A lease is valid for `lease_duration` from the sending of its last successful write.
    /// The outage may begin just before the next renewal (`renewal_interval` later) and end
    /// just after an attempt started hanging (`request_timeout`) and its retry was scheduled
    /// (`retry.max_delay`). An outage whose calls fail at once (connection refused, 500s)
    /// costs no attempt time, so it is ridden out up to `request_timeout` longer (5.5 s with
    /// the defaults). Longer outages may cost leases: their consumers stop when the leases
    /// run out, before any other worker can take them, and the records after the last
    /// checkpoint are delivered again. A longer `lease_duration` buys a longer tolerance at
    /// the price of a slower failover.
    pub fn outage_tolerance(&self) -> Duration {
        self.lease_duration
            .saturating_sub(self.renewal_interval)
            .saturating_sub(self.request_timeout)
            .saturating_sub(self.retry.max_delay)
    }

    /// Sets [`LeaseConfig::lease_duration`].
    #[must_use]
    pub fn with_lease_duration(mut self, d: Duration) -> Self {
        self.lease_duration = d;
        self
    }
    /// Sets [`LeaseConfig::renewal_interval`].
    #[must_use]
    pub fn with_renewal_interval(mut self, d: Duration) -> Self {
        self.renewal_interval = d;
        self
    }
    /// Sets [`LeaseConfig::taker_interval`].
    #[must_use]
    pub fn with_taker_interval(mut self, d: Duration) -> Self {
        self.taker_interval = d;
        self
    }
    /// Sets [`LeaseConfig::shard_sync_interval`].
    #[must_use]
    pub fn with_shard_sync_interval(mut self, d: Duration) -> Self {
        self.shard_sync_interval = d;
        self
    }
    /// Sets [`LeaseConfig::max_leases_per_worker`].
    #[must_use]
    pub fn with_max_leases_per_worker(mut self, n: usize) -> Self {
        self.max_leases_per_worker = n;
        self
    }
    /// Sets [`LeaseConfig::max_leases_to_steal`].
    #[must_use]
    pub fn with_max_leases_to_steal(mut self, n: usize) -> Self {
        self.max_leases_to_steal = n;
        self
    }
    /// Sets [`LeaseConfig::handoff_timeout`].
    #[must_use]
    pub fn with_handoff_timeout(mut self, d: Duration) -> Self {
        self.handoff_timeout = d;
        self
    }
    /// Sets [`LeaseConfig::handoff_poll_interval`].
    #[must_use]
    pub fn with_handoff_poll_interval(mut self, d: Duration) -> Self {
        self.handoff_poll_interval = d;
        self
    }
    /// Sets [`LeaseConfig::scan_timeout`].
    #[must_use]
    pub fn with_scan_timeout(mut self, d: Duration) -> Self {
        self.scan_timeout = d;
        self
    }
    /// Sets [`LeaseConfig::request_timeout`].
    #[must_use]
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// Sets [`LeaseConfig::parent_poll_interval`].
    #[must_use]
    pub fn with_parent_poll_interval(mut self, d: Duration) -> Self {
        self.parent_poll_interval = d;
        self
    }
    /// Sets [`LeaseConfig::retry`].
    #[must_use]
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }
    /// Sets [`LeaseConfig::eventually_consistent_scans`].
    #[must_use]
    pub fn with_eventually_consistent_scans(mut self, eventually: bool) -> Self {
        self.eventually_consistent_scans = eventually;
        self
    }
    /// Sets [`LeaseConfig::watchers`].
    #[must_use]
    pub fn with_watchers(mut self, watchers: Option<Watchers>) -> Self {
        self.watchers = watchers;
        self
    }

    fn validate(&self) -> Result<()> {
        for (field, d) in [
            ("lease.lease_duration", self.lease_duration),
            ("lease.renewal_interval", self.renewal_interval),
            ("lease.taker_interval", self.taker_interval),
            ("lease.shard_sync_interval", self.shard_sync_interval),
            ("lease.handoff_timeout", self.handoff_timeout),
            ("lease.handoff_poll_interval", self.handoff_poll_interval),
            ("lease.request_timeout", self.request_timeout),
            ("lease.scan_timeout", self.scan_timeout),
            ("lease.parent_poll_interval", self.parent_poll_interval),
        ] {
            within_bound(field, d)?;
        }
        nonzero("lease.lease_duration", self.lease_duration)?;
        if let Some(watchers) = &self.watchers {
            watchers.validate()?;
        }
        nonzero("lease.parent_poll_interval", self.parent_poll_interval)?;
        nonzero("lease.request_timeout", self.request_timeout)?;
        nonzero("lease.scan_timeout", self.scan_timeout)?;
        nonzero("lease.handoff_poll_interval", self.handoff_poll_interval)?;
        // The owner learns of a request at its next renewal or scan: give it that long, and
        // the requester's polls some chances within the timeout.
        let notice = self.renewal_interval.min(self.taker_interval);
        if self.handoff_timeout <= notice {
            return Err(Error::invalid_config(
                "lease.handoff_timeout",
                format!(
                    "({:?}) must be longer than the shorter of lease.renewal_interval and \
                     lease.taker_interval ({notice:?}): the owner learns of a request then",
                    self.handoff_timeout
                ),
            ));
        }
        if self.handoff_poll_interval >= self.handoff_timeout {
            return Err(Error::invalid_config(
                "lease.handoff_poll_interval",
                "must be shorter than lease.handoff_timeout",
            ));
        }
        nonzero("lease.renewal_interval", self.renewal_interval)?;
        nonzero("lease.taker_interval", self.taker_interval)?;
        nonzero("lease.shard_sync_interval", self.shard_sync_interval)?;
        // A renewal must be able to fail once and still succeed before the lease runs out.
        if self.renewal_interval * 2 > self.lease_duration {
            return Err(Error::invalid_config(
                "lease.renewal_interval",
                format!(
                    "({:?}) must be at most half of lease.lease_duration ({:?}), so that a \
                     failed renewal can be retried before the lease expires",
                    self.renewal_interval, self.lease_duration
                ),
            ));
        }
        // Each renewal attempt is bounded by it, and a renewal starts at the latest one renewal
        // interval after the last: an attempt stuck for the whole timeout must still leave
        // time for a retry before the lease runs out.
        let renewal_window = self.lease_duration.saturating_sub(self.renewal_interval);
        if self.request_timeout >= renewal_window {
            return Err(Error::invalid_config(
                "lease.request_timeout",
                format!(
                    "({:?}) must be shorter than lease.lease_duration - lease.renewal_interval \
                     ({renewal_window:?}), so that a renewal stuck on one call is retried before \
                     the lease runs out",
                    self.request_timeout
                ),
            ));
        }
        if self.max_leases_per_worker == 0 {
            return Err(Error::invalid_config(
                "lease.max_leases_per_worker",
                "must be at least 1",
            ));
        }
        self.retry.validate("lease.retry")
    }
}

/// Polling (`GetRecords`) settings.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct PollingConfig {
    /// Most records per `GetRecords` call. Default and maximum 10,000: the Java KCL's
    /// `PollingConfig.maxRecords` and the Kinesis API's limit.
    pub max_records: u32,
    /// Pause after a read that returned no records.
    /// Default 1,500 ms: the Java KCL's `idleTimeBetweenReadsInMillis`.
    pub idle_time_between_empty_reads: Duration,
    /// Least time between the starts of two `GetRecords` calls on one shard. Default and
    /// minimum 200 ms: Kinesis allows 5 calls per second per shard, shared by all consumers
    /// of the stream.
    pub min_time_between_reads: Duration,
    /// Batches fetched ahead of the processor, so fetching overlaps processing.
    /// Default 3: the Java KCL's `maxPendingProcessRecordsInput`.
    pub max_prefetched_batches: usize,
    /// Payload bytes (data and partition keys) fetched ahead of the processor per shard,
    /// counting the batch being processed. The poller fetches the next page only while the
    /// shard is under this budget, so a worker's record memory is at most about
    /// `leases × (max_prefetched_bytes + 10 MiB)`: one `GetRecords` answer (at most 10 MiB)
    /// can arrive on top of a budget just short of full. A batch larger than the whole budget
    /// still passes, alone. Default 8 MiB: the Java KCL's `maxByteSize` of its prefetch cache
    /// (`SimpleRecordsFetcherFactory`).
    pub max_prefetched_bytes: usize,
    /// Timeout of one Kinesis call. Default 30 s: the Java KCL's `kinesisRequestTimeout`.
    pub request_timeout: Duration,
    /// Backoff for retrying failed or throttled Kinesis calls.
    /// Default 200 ms to 10 s. (The Java KCL sleeps one idle interval after any failure.)
    pub retry: RetryConfig,
}

impl Default for PollingConfig {
    fn default() -> Self {
        PollingConfig {
            max_records: MAX_RECORDS_PER_GET,
            idle_time_between_empty_reads: Duration::from_millis(1500),
            min_time_between_reads: MIN_TIME_BETWEEN_READS,
            max_prefetched_batches: 3,
            max_prefetched_bytes: DEFAULT_MAX_PREFETCHED_BYTES,
            request_timeout: Duration::from_secs(30),
            retry: RetryConfig::new(Duration::from_millis(200), Duration::from_secs(10)),
        }
    }
}

/// The Kinesis limit of records per `GetRecords` call.
const MAX_RECORDS_PER_GET: u32 = 10_000;
/// The Java KCL's prefetch byte budget per shard (`SimpleRecordsFetcherFactory.maxByteSize`).
const DEFAULT_MAX_PREFETCHED_BYTES: usize = 8 * 1024 * 1024;
/// The budget is counted in semaphore permits, which are acquired at most `u32::MAX` at once.
const MAX_PREFETCHED_BYTES: usize = u32::MAX as usize;
/// Kinesis serves 5 `GetRecords` calls per second and shard.
const MIN_TIME_BETWEEN_READS: Duration = Duration::from_millis(200);

impl PollingConfig {
    /// Sets [`PollingConfig::max_records`].
    #[must_use]
    pub fn with_max_records(mut self, n: u32) -> Self {
        self.max_records = n;
        self
    }
    /// Sets [`PollingConfig::idle_time_between_empty_reads`].
    #[must_use]
    pub fn with_idle_time_between_empty_reads(mut self, d: Duration) -> Self {
        self.idle_time_between_empty_reads = d;
        self
    }
    /// Sets [`PollingConfig::min_time_between_reads`].
    #[must_use]
    pub fn with_min_time_between_reads(mut self, d: Duration) -> Self {
        self.min_time_between_reads = d;
        self
    }
    /// Sets [`PollingConfig::max_prefetched_batches`].
    #[must_use]
    pub fn with_max_prefetched_batches(mut self, n: usize) -> Self {
        self.max_prefetched_batches = n;
        self
    }
    /// Sets [`PollingConfig::max_prefetched_bytes`].
    #[must_use]
    pub fn with_max_prefetched_bytes(mut self, n: usize) -> Self {
        self.max_prefetched_bytes = n;
        self
    }
    /// Sets [`PollingConfig::request_timeout`].
    #[must_use]
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// Sets [`PollingConfig::retry`].
    #[must_use]
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    fn validate(&self) -> Result<()> {
        for (field, d) in [
            (
                "polling.idle_time_between_empty_reads",
                self.idle_time_between_empty_reads,
            ),
            (
                "polling.min_time_between_reads",
                self.min_time_between_reads,
            ),
            ("polling.request_timeout", self.request_timeout),
        ] {
            within_bound(field, d)?;
        }
        if !(1..=MAX_RECORDS_PER_GET).contains(&self.max_records) {
            return Err(Error::invalid_config(
                "polling.max_records",
                format!("must be between 1 and 10000, not {}", self.max_records),
            ));
        }
        if self.min_time_between_reads < MIN_TIME_BETWEEN_READS {
            return Err(Error::invalid_config(
                "polling.min_time_between_reads",
                format!(
                    "must be at least 200ms (Kinesis serves 5 GetRecords calls per second per \
                     shard), not {:?}",
                    self.min_time_between_reads
                ),
            ));
        }
        if self.idle_time_between_empty_reads < self.min_time_between_reads {
            return Err(Error::invalid_config(
                "polling.idle_time_between_empty_reads",
                "must be at least polling.min_time_between_reads",
            ));
        }
        if self.max_prefetched_batches == 0 {
            return Err(Error::invalid_config(
                "polling.max_prefetched_batches",
                "must be at least 1",
            ));
        }
        if self.max_prefetched_bytes == 0 || self.max_prefetched_bytes > MAX_PREFETCHED_BYTES {
            return Err(Error::invalid_config(
                "polling.max_prefetched_bytes",
                format!(
                    "must be between 1 and {MAX_PREFETCHED_BYTES}, not {}",
                    self.max_prefetched_bytes
                ),
            ));
        }
        nonzero("polling.request_timeout", self.request_timeout)?;
        self.retry.validate("polling.retry")
    }
}

/// What happens when a record processor fails.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct ProcessingConfig {
    /// Retry schedule of a batch whose `process_records` returned an error. The batch (minus
    /// what the processor checkpointed) is delivered again; after `max_attempts` the shard's
    /// consumer stops and its lease is released, so the shard restarts from its checkpoint.
    /// Default: 5 attempts, 100 ms to 5 s apart. (The Java KCL logs the error and moves on to
    /// the next batch, which lets a later checkpoint skip the failed records.)
    pub retry: RetryConfig,
    /// A shard consumer that makes no progress for this long (no `GetRecords` answer, no
    /// processor callback returned) is restarted from its checkpoint, and counted in
    /// [`WorkerStatus::watchdog_restarts`](crate::WorkerStatus). A processor callback running
    /// this long is logged, not interrupted. Default 5 min: far above any healthy pause (the
    /// idle time between reads is 1.5 s, a call times out after 30 s).
    pub watchdog_timeout: Duration,
    /// Call `process_records` with an empty batch after a read that found no new records,
    /// so a processor that flushes on time can flush and checkpoint on an idle shard (at most
    /// once per `polling.idle_time_between_empty_reads`). Default `false`: the Java KCL's
    /// `callProcessRecordsEvenForEmptyRecordList`.
    pub call_process_records_even_for_empty_list: bool,
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        ProcessingConfig {
            retry: RetryConfig::new(Duration::from_millis(100), Duration::from_secs(5))
                .with_max_attempts(Some(5)),
            watchdog_timeout: Duration::from_secs(300),
            call_process_records_even_for_empty_list: false,
        }
    }
}

impl ProcessingConfig {
    /// Sets [`ProcessingConfig::retry`].
    #[must_use]
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }
    /// Sets [`ProcessingConfig::watchdog_timeout`].
    #[must_use]
    pub fn with_watchdog_timeout(mut self, d: Duration) -> Self {
        self.watchdog_timeout = d;
        self
    }
    /// Sets [`ProcessingConfig::call_process_records_even_for_empty_list`].
    #[must_use]
    pub fn with_call_process_records_even_for_empty_list(mut self, call: bool) -> Self {
        self.call_process_records_even_for_empty_list = call;
        self
    }

    fn validate(&self) -> Result<()> {
        within_bound("processing.watchdog_timeout", self.watchdog_timeout)?;
        nonzero("processing.watchdog_timeout", self.watchdog_timeout)?;
        self.retry.validate("processing.retry")?;
        if self.retry.max_attempts.is_none() {
            return Err(Error::invalid_config(
                "processing.retry.max_attempts",
                "must be set: a batch that always fails must not block its shard forever",
            ));
        }
        Ok(())
    }
}

/// Everything a [`Worker`](crate::Worker) needs to know.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The application name: workers with the same name share the stream's shards. Names the
    /// lease table unless [`WorkerConfig::lease_table_name`] is set.
    pub application_name: String,
    /// The stream's name or ARN (`arn:...`). In multi-stream mode, where a tracker names the
    /// streams, only a label for logs and metrics.
    pub stream: String,
    /// This worker's id, unique per process. Default: host name, `-`, and a random UUID.
    pub worker_id: String,
    /// Lease table name. Default `None`: the application name, as in the Java KCL.
    pub lease_table_name: Option<String>,
    /// Start of shards without a checkpoint. Default [`InitialPosition::Latest`].
    pub initial_position: InitialPosition,
    /// Lease timing and limits.
    pub lease: LeaseConfig,
    /// How shard consumers read: polling (the default) or enhanced fan-out.
    pub retrieval: Retrieval,
    /// Polling settings. `max_prefetched_batches` and `max_prefetched_bytes` bound what a
    /// shard reads ahead in fan-out mode too.
    pub polling: PollingConfig,
    /// Processor failure policy.
    pub processing: ProcessingConfig,
    /// What the worker reports through the metrics facade (see [`crate::metrics`]).
    pub metrics: MetricsConfig,
    /// How long a graceful shutdown waits for processors to finish their batch and
    /// `shutdown_requested` before it abandons them. Default 20 s: inside the 30 s that
    /// Kubernetes and ECS grant between SIGTERM and SIGKILL.
    pub shutdown_timeout: Duration,
    /// Seed of the worker's random choices (backoff jitter, lease order). Default `None`: seeded
    /// from the OS. Set it to replay a run exactly in a simulation.
    pub rng_seed: Option<u64>,
    /// How a multi-stream worker follows its streams; ignored in single-stream mode.
    pub multi_stream: MultiStreamConfig,
}

impl WorkerConfig {
    /// A configuration with defaults for everything but the application and the stream.
    pub fn new(application_name: impl Into<String>, stream: impl Into<String>) -> Self {
        WorkerConfig {
            application_name: application_name.into(),
            stream: stream.into(),
            worker_id: default_worker_id(),
            lease_table_name: None,
            initial_position: InitialPosition::default(),
            lease: LeaseConfig::default(),
            retrieval: Retrieval::default(),
            polling: PollingConfig::default(),
            processing: ProcessingConfig::default(),
            metrics: MetricsConfig::default(),
            shutdown_timeout: Duration::from_secs(20),
            rng_seed: None,
            multi_stream: MultiStreamConfig::default(),
        }
    }

    /// Sets [`WorkerConfig::multi_stream`].
    #[must_use]
    pub fn with_multi_stream(mut self, multi_stream: MultiStreamConfig) -> Self {
        self.multi_stream = multi_stream;
        self
    }

    /// Sets [`WorkerConfig::worker_id`].
    #[must_use]
    pub fn with_worker_id(mut self, worker_id: impl Into<String>) -> Self {
        self.worker_id = worker_id.into();
        self
    }
    /// Sets [`WorkerConfig::lease_table_name`].
    #[must_use]
    pub fn with_lease_table_name(mut self, table: impl Into<String>) -> Self {
        self.lease_table_name = Some(table.into());
        self
    }
    /// Sets [`WorkerConfig::initial_position`].
    #[must_use]
    pub fn with_initial_position(mut self, position: InitialPosition) -> Self {
        self.initial_position = position;
        self
    }
    /// Sets [`WorkerConfig::lease`].
    #[must_use]
    pub fn with_lease(mut self, lease: LeaseConfig) -> Self {
        self.lease = lease;
        self
    }
    /// Sets [`WorkerConfig::retrieval`].
    #[must_use]
    pub fn with_retrieval(mut self, retrieval: Retrieval) -> Self {
        self.retrieval = retrieval;
        self
    }
    /// Sets [`WorkerConfig::polling`].
    #[must_use]
    pub fn with_polling(mut self, polling: PollingConfig) -> Self {
        self.polling = polling;
        self
    }
    /// Sets [`WorkerConfig::processing`].
    #[must_use]
    pub fn with_processing(mut self, processing: ProcessingConfig) -> Self {
        self.processing = processing;
        self
    }
    /// Sets [`WorkerConfig::metrics`].
    #[must_use]
    pub fn with_metrics(mut self, metrics: MetricsConfig) -> Self {
        self.metrics = metrics;
        self
    }
    /// Sets [`WorkerConfig::shutdown_timeout`].
    #[must_use]
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }
    /// Sets [`WorkerConfig::rng_seed`].
    #[must_use]
    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// The longest [`Worker::run`](crate::Worker::run) takes to return once its shutdown token
    /// is cancelled. `run` returns by then in any case: whatever is still running at that
    /// point is abandoned (processors dropped, leases not released left to expire, as after a
    /// crash), and `run` returns an error saying so.
    ///
    /// It is the sum of the bounds of the shutdown's steps:
    /// - the step the worker is in when asked: its lease writes already sent, one
    ///   `lease.request_timeout` (reads are dropped, and no further write is sent);
    /// - with [`LeaseConfig::watchers`], finding the watchers to offer the leases to:
    ///   [`WorkerConfig::succession_wait`], `slot_check_interval + lease.request_timeout`
    ///   (a watcher first gives up its slot; when no other watcher is live, the worker
    ///   processes on until a member takes a slot, or releases its leases unoffered);
    /// - offering the held leases to the other workers, the offers sent together: one
    ///   `lease.request_timeout` (an offer without an answer by then is given up: the lease is
    ///   released to any worker instead);
    /// - processing on while the receivers notice the offers: `lease.taker_interval +
    ///   lease.handoff_poll_interval`, at most half the `shutdown_timeout`;
    /// - with watchers, checking that the receivers still watch and moving the offers of
    ///   those that stopped meanwhile to a watcher that did not: two `lease.request_timeout`
    ///   (waiting for a member to take a slot ends with the succession wait above);
    /// - the processors finishing their batch and `shutdown_requested`: `shutdown_timeout`,
    ///   after which they are aborted;
    /// - the releases still retrying after that: one `lease.lease_duration`, after which they
    ///   are given up (past it, a lease left to expire would have been free sooner);
    /// - the lease renewer's last renewals: one `lease.request_timeout`.
    ///
    /// With the defaults, 54.2 s (38.2 s without watchers). A process that must be gone by
    /// some time after SIGTERM (Kubernetes' `terminationGracePeriodSeconds`) can check this
    /// against it.
    pub fn shutdown_deadline(&self) -> Duration {
        let call = self.lease.request_timeout;
        let recheck = match self.lease.watchers {
            Some(_) => call.saturating_add(call),
            None => Duration::ZERO,
        };
        [
            call,
            self.succession_wait(),
            call,
            self.offer_wait(),
            recheck,
            self.shutdown_timeout,
            self.lease.lease_duration,
            call,
        ]
        .into_iter()
        .fold(Duration::ZERO, Duration::saturating_add)
    }

    /// With [`LeaseConfig::watchers`], the longest a worker shutting down looks for watchers
    /// to offer its leases to: a member's next slot check and its take of the slot, so a
    /// slot this worker (or another watcher stopping) gave up is taken meanwhile. Zero
    /// without watchers.
    pub fn succession_wait(&self) -> Duration {
        match &self.lease.watchers {
            Some(watchers) => watchers
                .slot_check_interval
                .saturating_add(self.lease.request_timeout),
            None => Duration::ZERO,
        }
    }

    /// How long a worker shutting down keeps processing after offering its leases, so that
    /// the receivers see the offers (at their next taking round) and then watch for the
    /// releases (at their handoff polls). At most half the shutdown timeout, which is the
    /// processors' time.
    pub(crate) fn offer_wait(&self) -> Duration {
        self.lease
            .taker_interval
            .saturating_add(self.lease.handoff_poll_interval)
            .min(self.shutdown_timeout / 2)
    }

    /// The lease table's name: [`WorkerConfig::lease_table_name`] or the application name.
    pub fn lease_table(&self) -> &str {
        self.lease_table_name
            .as_deref()
            .unwrap_or(&self.application_name)
    }

    /// Checks every field and the relations between them.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first field that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.application_name.trim().is_empty() {
            return Err(Error::invalid_config(
                "application_name",
                "must not be empty",
            ));
        }
        if self.stream.trim().is_empty() {
            return Err(Error::invalid_config("stream", "must not be empty"));
        }
        if self.worker_id.trim().is_empty() {
            return Err(Error::invalid_config("worker_id", "must not be empty"));
        }
        validate_table_name(self.lease_table())?;
        within_bound("shutdown_timeout", self.shutdown_timeout)?;
        self.lease.validate()?;
        self.polling.validate()?;
        self.processing.validate()?;
        self.multi_stream.validate()?;
        if let Retrieval::FanOut(fan_out) = &self.retrieval {
            fan_out.validate(&self.application_name)?;
        }
        nonzero("shutdown_timeout", self.shutdown_timeout)?;
        // A healthy consumer hears from Kinesis at least every idle interval, or after a
        // timed-out call: the watchdog must not fire before either.
        let mut quiet = self
            .polling
            .idle_time_between_empty_reads
            .max(self.polling.request_timeout);
        // In fan-out mode a healthy consumer hears an event at least every `event_timeout`.
        if let Retrieval::FanOut(fan_out) = &self.retrieval {
            quiet = quiet.max(fan_out.event_timeout);
        }
        if self.processing.watchdog_timeout <= quiet * 2 {
            return Err(Error::invalid_config(
                "processing.watchdog_timeout",
                format!(
                    "({:?}) must be more than twice the longest of polling.idle_time_between_empty_reads, \
                     polling.request_timeout and, with fan-out, retrieval.event_timeout ({quiet:?})",
                    self.processing.watchdog_timeout
                ),
            ));
        }
        Ok(())
    }
}

/// The longest duration any setting may have. Far beyond any sensible interval or timeout,
/// and small enough that adding it to an instant, or multiplying it by the small factors the
/// checks use, can never overflow (an unchecked overflow would panic at run time).
pub const MAX_SETTING_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

fn within_bound(field: &'static str, d: Duration) -> Result<()> {
    if d > MAX_SETTING_DURATION {
        Err(Error::invalid_config(
            field,
            format!("{d:?} is longer than the longest allowed duration, 365 days"),
        ))
    } else {
        Ok(())
    }
}

fn nonzero(field: &'static str, d: Duration) -> Result<()> {
    if d.is_zero() {
        Err(Error::invalid_config(field, "must be above zero"))
    } else {
        Ok(())
    }
}

/// DynamoDB table names: 3 to 255 characters from `a-z A-Z 0-9 _ - .`.
fn validate_table_name(name: &str) -> Result<()> {
    let field = "lease_table_name (default: application_name)";
    if !(3..=255).contains(&name.len()) {
        return Err(Error::invalid_config(
            field,
            format!("`{name}` must be 3 to 255 characters long to name a DynamoDB table"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(Error::invalid_config(
            field,
            format!("`{name}` has `{c}`; DynamoDB table names allow a-z, A-Z, 0-9, `_`, `-`, `.`"),
        ));
    }
    Ok(())
}

/// `hostname-uuid`: readable in the lease table, unique per process.
fn default_worker_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host = if host.is_empty() {
        "worker".to_owned()
    } else {
        host
    };
    format!("{host}-{}", uuid::Uuid::new_v4())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig::new("orders-app", "orders")
    }

    fn field_of(result: Result<()>) -> &'static str {
        match result {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn the_outage_tolerance_is_what_the_docs_say() {
        let lease = LeaseConfig::default();
        assert_eq!(lease.outage_tolerance(), Duration::from_millis(3_500));
        let longer = lease.with_lease_duration(Duration::from_secs(20));
        assert_eq!(longer.outage_tolerance(), Duration::from_millis(13_500));
    }

    #[test]
    fn the_shutdown_deadline_adds_up_the_shutdown_steps() {
        // 2 s in flight + 12 s finding watchers + 2 s offers + 2.2 s offer wait + 4 s
        // rechecking the receivers + 20 s processors + 10 s releases + 2 s renewer.
        assert_eq!(config().shutdown_deadline(), Duration::from_millis(54_200));
        let without_watchers = config().with_lease(LeaseConfig::default().with_watchers(None));
        assert_eq!(
            without_watchers.shutdown_deadline(),
            Duration::from_millis(38_200)
        );
        let short = without_watchers.with_shutdown_timeout(Duration::from_secs(2));
        // The offer wait is at most half the shutdown timeout.
        assert_eq!(
            short.shutdown_deadline(),
            Duration::from_secs(2 + 2 + 1 + 2 + 10 + 2)
        );
        // Never an overflow, even on a configuration that does not validate.
        let absurd = config().with_shutdown_timeout(Duration::MAX);
        assert_eq!(absurd.shutdown_deadline(), Duration::MAX);
    }

    #[test]
    fn defaults_are_valid() {
        config().validate().unwrap();
        assert_eq!(config().lease_table(), "orders-app");
        assert!(config().worker_id.len() > 36, "host name and uuid");
        assert_ne!(config().worker_id, config().worker_id);
    }

    #[test]
    fn absurd_durations_are_named_errors_not_panics() {
        let huge = Duration::MAX;
        let cases: Vec<(&str, WorkerConfig)> = vec![
            (
                "lease.lease_duration",
                config().with_lease(LeaseConfig::default().with_lease_duration(huge)),
            ),
            (
                "lease.renewal_interval",
                config().with_lease(LeaseConfig::default().with_renewal_interval(huge)),
            ),
            (
                "lease.taker_interval",
                config().with_lease(LeaseConfig::default().with_taker_interval(huge)),
            ),
            (
                "lease.shard_sync_interval",
                config().with_lease(LeaseConfig::default().with_shard_sync_interval(huge)),
            ),
            (
                "lease.handoff_timeout",
                config().with_lease(LeaseConfig::default().with_handoff_timeout(huge)),
            ),
            (
                "lease.handoff_poll_interval",
                config().with_lease(LeaseConfig::default().with_handoff_poll_interval(huge)),
            ),
            (
                "lease.request_timeout",
                config().with_lease(LeaseConfig::default().with_request_timeout(huge)),
            ),
            (
                "lease.scan_timeout",
                config().with_lease(LeaseConfig::default().with_scan_timeout(huge)),
            ),
            (
                "lease.parent_poll_interval",
                config().with_lease(LeaseConfig::default().with_parent_poll_interval(huge)),
            ),
            (
                "lease.retry",
                config().with_lease(
                    LeaseConfig::default()
                        .with_retry(RetryConfig::new(Duration::from_secs(1), huge)),
                ),
            ),
            (
                "polling.idle_time_between_empty_reads",
                config().with_polling(
                    PollingConfig::default().with_idle_time_between_empty_reads(huge),
                ),
            ),
            (
                "polling.min_time_between_reads",
                config().with_polling(PollingConfig::default().with_min_time_between_reads(huge)),
            ),
            (
                "polling.request_timeout",
                config().with_polling(PollingConfig::default().with_request_timeout(huge)),
            ),
            (
                "processing.watchdog_timeout",
                config().with_processing(ProcessingConfig::default().with_watchdog_timeout(huge)),
            ),
            ("shutdown_timeout", config().with_shutdown_timeout(huge)),
        ];
        for (field, config) in cases {
            assert_eq!(field_of(config.validate()), field);
        }
        let longest = config().with_shutdown_timeout(MAX_SETTING_DURATION);
        longest.validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(
            field_of(WorkerConfig::new("", "s").validate()),
            "application_name"
        );
        assert_eq!(field_of(WorkerConfig::new("app", " ").validate()), "stream");
        assert_eq!(
            field_of(config().with_worker_id("").validate()),
            "worker_id"
        );
        assert!(
            field_of(config().with_lease_table_name("a b c").validate())
                .starts_with("lease_table_name")
        );
        assert!(field_of(WorkerConfig::new("ab", "s").validate()).starts_with("lease_table_name"));
        let lease = LeaseConfig::default()
            .with_lease_duration(Duration::from_secs(4))
            .with_renewal_interval(Duration::from_secs(3));
        assert_eq!(
            field_of(config().with_lease(lease).validate()),
            "lease.renewal_interval"
        );
        assert_eq!(
            field_of(
                config()
                    .with_lease(LeaseConfig::default().with_request_timeout(Duration::from_secs(7)))
                    .validate()
            ),
            "lease.request_timeout"
        );
        assert_eq!(
            field_of(
                config()
                    .with_lease(LeaseConfig::default().with_max_leases_per_worker(0))
                    .validate()
            ),
            "lease.max_leases_per_worker"
        );
        assert_eq!(
            field_of(
                config()
                    .with_lease(LeaseConfig::default().with_handoff_timeout(Duration::from_secs(1)))
                    .validate()
            ),
            "lease.handoff_timeout"
        );
        assert_eq!(
            field_of(
                config()
                    .with_lease(
                        LeaseConfig::default().with_handoff_poll_interval(Duration::from_secs(11))
                    )
                    .validate()
            ),
            "lease.handoff_poll_interval"
        );
        assert_eq!(
            field_of(
                config()
                    .with_polling(PollingConfig::default().with_max_records(10_001))
                    .validate()
            ),
            "polling.max_records"
        );
        assert_eq!(
            field_of(
                config()
                    .with_polling(
                        PollingConfig::default()
                            .with_min_time_between_reads(Duration::from_millis(100))
                    )
                    .validate()
            ),
            "polling.min_time_between_reads"
        );
        assert_eq!(
            field_of(
                config()
                    .with_polling(PollingConfig::default().with_max_prefetched_batches(0))
                    .validate()
            ),
            "polling.max_prefetched_batches"
        );
        assert_eq!(
            field_of(
                config()
                    .with_polling(PollingConfig::default().with_max_prefetched_bytes(0))
                    .validate()
            ),
            "polling.max_prefetched_bytes"
        );
        let backwards = RetryConfig::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(
            field_of(
                config()
                    .with_polling(PollingConfig::default().with_retry(backwards))
                    .validate()
            ),
            "polling.retry"
        );
        let endless = ProcessingConfig::default().with_retry(
            RetryConfig::new(Duration::from_millis(1), Duration::from_millis(2))
                .with_max_attempts(None),
        );
        assert_eq!(
            field_of(config().with_processing(endless).validate()),
            "processing.retry.max_attempts"
        );
        assert_eq!(
            field_of(config().with_shutdown_timeout(Duration::ZERO).validate()),
            "shutdown_timeout"
        );
    }
}
