//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`, on by
//! default): install any recorder (`metrics-exporter-prometheus`, an OpenTelemetry or
//! CloudWatch EMF bridge) and the workers of the process report into it. Without a recorder
//! every update is a no-op on a handle; without the feature nothing is compiled in.
//!
//! Names follow the Java KCL's OpenTelemetry names (its `OtelMetricNameTransformer`:
//! `MillisBehindLatest` → `aws.kinesis.client.consumer.lag.duration`, ...) where the Java KCL
//! has the metric, so dashboards carry over; the others use the same prefix and style.
//! Durations are in milliseconds, as in the Java KCL. Every metric carries
//! [`STREAM_NAME_LABEL`]; per-shard metrics also carry [`SHARD_ID_LABEL`] when
//! [`MetricsConfig::per_shard`] is set (off by default, so a stream of 1,000 shards does not
//! make 1,000 series of each). The application-wide maximum lag is always reported, whatever
//! the setting.
//!
//! [`WorkerStatus`] stays the dependency-free snapshot of the same
//! counts; the worker-wide metrics are published from it after every taking round, the
//! per-shard ones as each batch is processed.

use std::time::Duration;

use crate::worker::{StreamsStatus, WorkerStatus};

/// Label on every metric: the stream's name as configured.
pub const STREAM_NAME_LABEL: &str = "aws.kinesis.stream_name";
/// Label on per-shard metrics when [`MetricsConfig::per_shard`] is set.
pub const SHARD_ID_LABEL: &str = "aws.kinesis.shard.id";
/// Label on lease-table metrics: the DynamoDB operation (`Scan`, `UpdateItem`, ...).
pub const OPERATION_LABEL: &str = "aws.kinesis.operation";
/// Label on [`LEASE_TABLE_CALLS`]: `ok`, `condition_failed`, `throttled`, `timeout`, `error`.
pub const OUTCOME_LABEL: &str = "outcome";
/// Label on [`TAKEN_LEASES`]: why the lease was taken (`unowned`, `expired`, `reserved`, ...).
pub const REASON_LABEL: &str = "reason";
/// Label on [`LEASE_HANDOFFS`]: `handed_over` (to another worker on its request), `received`,
/// or `forced` (asked for, not handed over in time, taken).
pub const DIRECTION_LABEL: &str = "direction";

/// Counter, per shard: records delivered to `process_records` that it processed without error
/// (Java KCL `RecordsProcessed`).
pub const RECORDS_PROCESSED: &str = "aws.kinesis.client.records_processed";
/// Counter, per shard: bytes of those records' data (Java KCL `DataBytesProcessed`).
pub const BYTES_PROCESSED: &str = "aws.kinesis.client.records.size";
/// Gauge, per shard (only with [`MetricsConfig::per_shard`]), milliseconds: how far the last
/// batch read was behind the tip of its shard (Java KCL `MillisBehindLatest`).
pub const LAG: &str = "aws.kinesis.client.consumer.lag.duration";
/// Gauge, milliseconds: the largest lag among the shards this worker processes; always
/// reported. The application's lag is the maximum of this over its workers.
pub const MAX_LAG: &str = "aws.kinesis.client.consumer.lag.max.duration";
/// Histogram, per shard, milliseconds: how long `process_records` took on a batch of
/// records (Java KCL `RecordProcessor.processRecords.Time`).
pub const PROCESS_RECORDS_DURATION: &str =
    "aws.kinesis.client.record_processor.process_records.duration";
/// Counter, per shard: checkpoint writes that failed (the store kept failing, or the lease was
/// lost so the write was refused by its fence).
pub const CHECKPOINT_FAILURES: &str = "aws.kinesis.client.checkpoint.failures";
/// Counter, per shard: `GetRecords` calls refused by throttling.
pub const THROTTLED_READS: &str = "aws.kinesis.client.get_records.throttled";
/// Counter, per shard: shard iterators that expired and were renewed (Java KCL
/// `ExpiredIterator`).
pub const EXPIRED_ITERATORS: &str = "aws.kinesis.client.expired_iterator";
/// Counter, per shard: enhanced fan-out subscriptions opened (one every five minutes per
/// shard when all is well).
pub const SUBSCRIPTIONS: &str = "aws.kinesis.client.subscribe_to_shard.subscriptions";
/// Counter, per shard: subscribes refused (another subscription still open, one a second per
/// shard) or failed.
pub const SUBSCRIBE_REFUSALS: &str = "aws.kinesis.client.subscribe_to_shard.refusals";
/// Counter, per shard: open subscriptions that failed or sent nothing for `event_timeout`.
pub const SUBSCRIPTION_FAILURES: &str = "aws.kinesis.client.subscribe_to_shard.failures";

/// Gauge: leases this worker holds (Java KCL `CurrentLeases`).
pub const CURRENT_LEASES: &str = "aws.kinesis.client.current_leases";
/// Gauge: leases of unfinished shards in the table (Java KCL `TotalLeases`).
pub const TOTAL_LEASES: &str = "aws.kinesis.client.total_leases";
/// Gauge: workers seen in the lease table, this one included (Java KCL `NumWorkers`).
pub const WORKERS: &str = "aws.kinesis.client.workers";
/// Gauge: leases no known worker has room for under `max_leases_per_worker` (Java KCL
/// `LeaseSpillover`).
pub const LEASE_SPILLOVER: &str = "aws.kinesis.client.lease_spillover";
/// Counter: leases this worker took, by [`REASON_LABEL`] (Java KCL `TakenLeases`).
pub const TAKEN_LEASES: &str = "aws.kinesis.client.taken_leases";
/// Counter: leases this worker took because their owner stopped renewing them (Java KCL
/// `ExpiredLeases` counts them per round as seen; this counts each failover once).
pub const EXPIRED_LEASES: &str = "aws.kinesis.client.expired_leases";
/// Counter: leases this worker lost (taken by another worker, or run out while renewals
/// failed) (Java KCL `LostLeases`).
pub const LOST_LEASES: &str = "aws.kinesis.client.lost_leases";
/// Counter: graceful handoffs, by [`DIRECTION_LABEL`].
pub const LEASE_HANDOFFS: &str = "aws.kinesis.client.lease_handoffs";
/// Counter: shard consumers the watchdog restarted after they made no progress.
pub const WATCHDOG_RESTARTS: &str = "aws.kinesis.client.watchdog_restarts";
/// Counter: failed attempts of record processor callbacks (errors and panics).
pub const PROCESSOR_FAILURES: &str = "aws.kinesis.client.record_processor.failures";
/// Counter: of those, panics.
pub const PROCESSOR_PANICS: &str = "aws.kinesis.client.record_processor.panics";
/// Counter: shard consumers that failed for good (their lease was released).
pub const SHARD_FAILURES: &str = "aws.kinesis.client.shard_failures";
/// Counter: shard ends the processor's checkpoint did not cover (see
/// [`Error::ShardEndNotCheckpointed`](crate::Error::ShardEndNotCheckpointed)).
pub const SHARD_END_NOT_CHECKPOINTED: &str = "aws.kinesis.client.shard_end_not_checkpointed";
/// Counter: records that looked KPL-aggregated but were delivered as they came.
pub const AGGREGATION_ERRORS: &str = "aws.kinesis.client.aggregation_errors";
/// Counter: KPL user records dropped for hashing outside their shard.
pub const RECORDS_OUT_OF_RANGE: &str = "aws.kinesis.client.records_out_of_range";
/// Gauge: lease items that did not decode at the last scan (nobody processes their shards).
pub const INVALID_LEASE_ITEMS: &str = "aws.kinesis.client.invalid_lease_items";
/// Gauge, multi-stream mode only: streams this worker consumes (Java KCL
/// `ActiveStreams.Count`).
pub const STREAMS_ACTIVE: &str = "aws.kinesis.client.streams.active";
/// Gauge, multi-stream mode only: listed streams this worker cannot reach (throttled, denied,
/// timing out), each retried on its own schedule.
pub const STREAMS_UNREACHABLE: &str = "aws.kinesis.client.streams.unreachable";
/// Gauge, multi-stream mode only: former streams whose leases wait for the grace period or
/// their last holder (Java KCL `StreamsPendingDeletion.Count`); reported by the workers that
/// check for them (all, or the watchers).
pub const STREAMS_PENDING_DELETION: &str = "aws.kinesis.client.streams.pending_deletion";
/// Counter, multi-stream mode only: former streams whose leases this worker deleted (Java KCL
/// `DeletedStreams.Count`).
pub const STREAMS_DELETED: &str = "aws.kinesis.client.streams.deleted";
/// Counter, multi-stream mode only: times the stream tracker failed.
pub const STREAM_DISCOVERY_FAILURES: &str = "aws.kinesis.client.streams.discovery_failures";
/// Counter: calls to the lease table, by [`OPERATION_LABEL`] and [`OUTCOME_LABEL`].
pub const LEASE_TABLE_CALLS: &str = "aws.kinesis.client.lease_table.calls";
/// Counter (a gauge that only grows, since capacity comes in halves): read capacity units
/// the lease table's calls consumed, by [`OPERATION_LABEL`], as DynamoDB reports them
/// (`ReturnConsumedCapacity=TOTAL`).
pub const LEASE_TABLE_READ_UNITS: &str = "aws.kinesis.client.lease_table.consumed_read_units";
/// Counter (a gauge that only grows): write capacity units, as [`LEASE_TABLE_READ_UNITS`].
pub const LEASE_TABLE_WRITE_UNITS: &str = "aws.kinesis.client.lease_table.consumed_write_units";

/// What a worker reports through the `metrics` facade.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// Label per-shard metrics with [`SHARD_ID_LABEL`], and report each shard's lag
    /// ([`LAG`]). Off by default: with it a stream of N shards makes N series of each
    /// per-shard metric (CloudWatch bills each series as a metric).
    pub per_shard: bool,
}

impl MetricsConfig {
    /// Sets [`MetricsConfig::per_shard`].
    pub fn with_per_shard(mut self, per_shard: bool) -> Self {
        self.per_shard = per_shard;
        self
    }
}

/// Describes every metric (unit and help text) to the installed recorder, for exporters that
/// show them (Prometheus `# HELP`). Workers call it when they start; calling it again is
/// harmless.
pub fn describe() {
    instrument::describe();
}

/// Records the capacity a lease-table call consumed, as the store's DynamoDB answer reported
/// it. For [`LeaseStore`](crate::LeaseStore) implementations; a no-op without the `metrics`
/// feature.
pub fn record_consumed_capacity(operation: &'static str, read_units: f64, write_units: f64) {
    instrument::consumed_capacity(operation, read_units, write_units);
}

/// Counts a call to the lease table.
pub(crate) fn lease_table_call(operation: &'static str, outcome: &'static str) {
    instrument::lease_table_call(operation, outcome);
}

/// Counts a lease taken, with why.
pub(crate) fn lease_taken(stream: &str, reason: &'static str) {
    instrument::lease_taken(stream, reason);
}

/// Reads one count of a status.
type StatusValue = fn(&WorkerStatus) -> u64;

/// Reads one count of a multi-stream worker's streams.
type StreamsValue = fn(&StreamsStatus) -> u64;

/// The instruments of a multi-stream worker's streams.
#[derive(Debug)]
struct StreamsInstruments {
    gauges: [(instrument::Gauge, StreamsValue); 3],
    counters: [(instrument::Counter, StreamsValue); 2],
}

/// The worker-wide metrics, published from each [`WorkerStatus`]: gauges set to its values,
/// counters advanced by what its counts grew since the last one.
#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    last: WorkerStatus,
    gauges: [(instrument::Gauge, StatusValue); 6],
    counters: [(instrument::Counter, StatusValue); 12],
    /// In multi-stream mode only.
    streams: Option<StreamsInstruments>,
}

impl WorkerMetrics {
    pub(crate) fn new(stream: &str, multi_stream: bool) -> Self {
        use instrument::{Counter, Gauge};
        let l = [(STREAM_NAME_LABEL, stream.to_owned())];
        let direction = |d: &str| {
            [
                (STREAM_NAME_LABEL, stream.to_owned()),
                (DIRECTION_LABEL, d.to_owned()),
            ]
        };
        let streams = multi_stream.then(|| StreamsInstruments {
            gauges: [
                (Gauge::new(STREAMS_ACTIVE, &l), |s| s.followed as u64),
                (Gauge::new(STREAMS_UNREACHABLE, &l), |s| {
                    s.unreachable as u64
                }),
                (Gauge::new(STREAMS_PENDING_DELETION, &l), |s| {
                    s.pending_deletion as u64
                }),
            ],
            counters: [
                (Counter::new(STREAMS_DELETED, &l), |s| s.deleted),
                (Counter::new(STREAM_DISCOVERY_FAILURES, &l), |s| {
                    s.discovery_failures
                }),
            ],
        });
        WorkerMetrics {
            streams,
            last: WorkerStatus::default(),
            gauges: [
                (Gauge::new(CURRENT_LEASES, &l), |s| {
                    s.held_leases.len() as u64
                }),
                (Gauge::new(TOTAL_LEASES, &l), |s| s.active_leases as u64),
                (Gauge::new(WORKERS, &l), |s| s.workers as u64),
                (Gauge::new(LEASE_SPILLOVER, &l), |s| s.spillover as u64),
                (Gauge::new(INVALID_LEASE_ITEMS, &l), |s| {
                    s.invalid_lease_items as u64
                }),
                (Gauge::new(MAX_LAG, &l), |s| {
                    s.max_millis_behind_latest().unwrap_or(0)
                }),
            ],
            counters: [
                (Counter::new(EXPIRED_LEASES, &l), |s| s.leases_taken_expired),
                (Counter::new(LOST_LEASES, &l), |s| s.leases_lost),
                (
                    Counter::new(LEASE_HANDOFFS, &direction("handed_over")),
                    |s| s.handed_over,
                ),
                (Counter::new(LEASE_HANDOFFS, &direction("received")), |s| {
                    s.received
                }),
                (Counter::new(LEASE_HANDOFFS, &direction("forced")), |s| {
                    s.forced_takes
                }),
                (Counter::new(WATCHDOG_RESTARTS, &l), |s| s.watchdog_restarts),
                (Counter::new(PROCESSOR_FAILURES, &l), |s| {
                    s.processor_failures
                }),
                (Counter::new(PROCESSOR_PANICS, &l), |s| s.processor_panics),
                (Counter::new(SHARD_FAILURES, &l), |s| s.shard_failures),
                (Counter::new(SHARD_END_NOT_CHECKPOINTED, &l), |s| {
                    s.shard_end_not_checkpointed
                }),
                (Counter::new(AGGREGATION_ERRORS, &l), |s| {
                    s.aggregation_errors
                }),
                (Counter::new(RECORDS_OUT_OF_RANGE, &l), |s| {
                    s.records_out_of_range
                }),
            ],
        }
    }

    pub(crate) fn publish(&mut self, status: &WorkerStatus) {
        for (gauge, value) in &self.gauges {
            gauge.set(value(status) as f64);
        }
        for (counter, value) in &self.counters {
            counter.add(value(status).saturating_sub(value(&self.last)));
        }
        if let (Some(instruments), Some(now)) = (&self.streams, &status.streams) {
            let before = self.last.streams.clone().unwrap_or_default();
            for (gauge, value) in &instruments.gauges {
                gauge.set(value(now) as f64);
            }
            for (counter, value) in &instruments.counters {
                counter.add(value(now).saturating_sub(value(&before)));
            }
        }
        self.last = status.clone();
    }
}

/// The per-shard instruments of one shard consumer.
#[derive(Debug)]
pub(crate) struct ShardMetrics {
    records: instrument::Counter,
    bytes: instrument::Counter,
    lag: Option<instrument::Gauge>,
    process_duration: instrument::Histogram,
    checkpoint_failures: instrument::Counter,
    throttled_reads: instrument::Counter,
    expired_iterators: instrument::Counter,
    subscriptions: instrument::Counter,
    subscribe_refusals: instrument::Counter,
    subscription_failures: instrument::Counter,
}

impl ShardMetrics {
    pub(crate) fn new(config: &MetricsConfig, stream: &str, shard_id: &str) -> Self {
        let mut labels = vec![(STREAM_NAME_LABEL, stream.to_owned())];
        if config.per_shard {
            labels.push((SHARD_ID_LABEL, shard_id.to_owned()));
        }
        ShardMetrics {
            records: instrument::Counter::new(RECORDS_PROCESSED, &labels),
            bytes: instrument::Counter::new(BYTES_PROCESSED, &labels),
            lag: config
                .per_shard
                .then(|| instrument::Gauge::new(LAG, &labels)),
            process_duration: instrument::Histogram::new(PROCESS_RECORDS_DURATION, &labels),
            checkpoint_failures: instrument::Counter::new(CHECKPOINT_FAILURES, &labels),
            throttled_reads: instrument::Counter::new(THROTTLED_READS, &labels),
            expired_iterators: instrument::Counter::new(EXPIRED_ITERATORS, &labels),
            subscriptions: instrument::Counter::new(SUBSCRIPTIONS, &labels),
            subscribe_refusals: instrument::Counter::new(SUBSCRIBE_REFUSALS, &labels),
            subscription_failures: instrument::Counter::new(SUBSCRIPTION_FAILURES, &labels),
        }
    }

    pub(crate) fn processed(&self, records: u64, bytes: u64) {
        self.records.add(records);
        self.bytes.add(bytes);
    }

    pub(crate) fn lag(&self, millis: u64) {
        if let Some(gauge) = &self.lag {
            gauge.set(millis as f64);
        }
    }

    pub(crate) fn process_records_took(&self, took: Duration) {
        self.process_duration.record(took.as_secs_f64() * 1000.0);
    }

    pub(crate) fn checkpoint_failed(&self) {
        self.checkpoint_failures.add(1);
    }

    pub(crate) fn throttled(&self) {
        self.throttled_reads.add(1);
    }

    pub(crate) fn iterator_expired(&self) {
        self.expired_iterators.add(1);
    }

    pub(crate) fn subscribed(&self) {
        self.subscriptions.add(1);
    }

    pub(crate) fn subscribe_refused(&self) {
        self.subscribe_refusals.add(1);
    }

    pub(crate) fn subscription_failed(&self) {
        self.subscription_failures.add(1);
    }
}

#[cfg(feature = "metrics")]
mod instrument {
    use super::*;

    type Labels<'a> = &'a [(&'static str, String)];

    fn labels(labels: Labels<'_>) -> Vec<::metrics::Label> {
        labels
            .iter()
            .map(|(k, v)| ::metrics::Label::new(*k, v.clone()))
            .collect()
    }

    #[derive(Debug)]
    pub(crate) struct Counter(::metrics::Counter);

    impl Counter {
        pub(crate) fn new(name: &'static str, l: Labels<'_>) -> Self {
            Counter(::metrics::counter!(name, labels(l)))
        }

        pub(crate) fn add(&self, n: u64) {
            if n > 0 {
                self.0.increment(n);
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct Gauge(::metrics::Gauge);

    impl Gauge {
        pub(crate) fn new(name: &'static str, l: Labels<'_>) -> Self {
            Gauge(::metrics::gauge!(name, labels(l)))
        }

        pub(crate) fn set(&self, value: f64) {
            self.0.set(value);
        }

        pub(crate) fn add(&self, value: f64) {
            if value > 0.0 {
                self.0.increment(value);
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct Histogram(::metrics::Histogram);

    impl Histogram {
        pub(crate) fn new(name: &'static str, l: Labels<'_>) -> Self {
            Histogram(::metrics::histogram!(name, labels(l)))
        }

        pub(crate) fn record(&self, value: f64) {
            self.0.record(value);
        }
    }

    pub(super) fn lease_taken(stream: &str, reason: &'static str) {
        let l = [
            (STREAM_NAME_LABEL, stream.to_owned()),
            (REASON_LABEL, reason.to_owned()),
        ];
        Counter::new(TAKEN_LEASES, &l).add(1);
    }

    pub(super) fn lease_table_call(operation: &'static str, outcome: &'static str) {
        ::metrics::counter!(LEASE_TABLE_CALLS, OPERATION_LABEL => operation, OUTCOME_LABEL => outcome)
            .increment(1);
    }

    pub(super) fn consumed_capacity(operation: &'static str, read: f64, write: f64) {
        let l = [(OPERATION_LABEL, operation.to_owned())];
        Gauge::new(LEASE_TABLE_READ_UNITS, &l).add(read);
        Gauge::new(LEASE_TABLE_WRITE_UNITS, &l).add(write);
    }

    pub(super) fn describe() {
        use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            RECORDS_PROCESSED,
            Unit::Count,
            "Records processed without error"
        );
        describe_counter!(
            BYTES_PROCESSED,
            Unit::Bytes,
            "Data bytes of the records processed"
        );
        describe_gauge!(
            LAG,
            Unit::Milliseconds,
            "How far the last batch read was behind the shard's tip"
        );
        describe_gauge!(
            MAX_LAG,
            Unit::Milliseconds,
            "The largest lag among this worker's shards"
        );
        describe_histogram!(
            PROCESS_RECORDS_DURATION,
            Unit::Milliseconds,
            "Time process_records took on a batch"
        );
        describe_counter!(
            CHECKPOINT_FAILURES,
            Unit::Count,
            "Checkpoint writes that failed"
        );
        describe_counter!(
            THROTTLED_READS,
            Unit::Count,
            "GetRecords calls refused by throttling"
        );
        describe_counter!(
            EXPIRED_ITERATORS,
            Unit::Count,
            "Shard iterators that expired"
        );
        describe_gauge!(CURRENT_LEASES, Unit::Count, "Leases this worker holds");
        describe_gauge!(
            TOTAL_LEASES,
            Unit::Count,
            "Leases of unfinished shards in the table"
        );
        describe_gauge!(WORKERS, Unit::Count, "Workers seen in the lease table");
        describe_gauge!(
            LEASE_SPILLOVER,
            Unit::Count,
            "Leases no worker has room for"
        );
        describe_counter!(TAKEN_LEASES, Unit::Count, "Leases this worker took");
        describe_counter!(
            EXPIRED_LEASES,
            Unit::Count,
            "Leases taken because their owner stopped renewing them"
        );
        describe_counter!(LOST_LEASES, Unit::Count, "Leases this worker lost");
        describe_counter!(LEASE_HANDOFFS, Unit::Count, "Graceful lease handoffs");
        describe_counter!(
            WATCHDOG_RESTARTS,
            Unit::Count,
            "Shard consumers restarted by the watchdog"
        );
        describe_counter!(
            PROCESSOR_FAILURES,
            Unit::Count,
            "Failed record processor callbacks"
        );
        describe_counter!(
            PROCESSOR_PANICS,
            Unit::Count,
            "Record processor callbacks that panicked"
        );
        describe_counter!(
            SHARD_FAILURES,
            Unit::Count,
            "Shard consumers that failed for good"
        );
        describe_counter!(
            SHARD_END_NOT_CHECKPOINTED,
            Unit::Count,
            "Shard ends the processor's checkpoint did not cover"
        );
        describe_counter!(
            AGGREGATION_ERRORS,
            Unit::Count,
            "Records that looked KPL-aggregated but were not"
        );
        describe_counter!(
            RECORDS_OUT_OF_RANGE,
            Unit::Count,
            "KPL user records hashing outside their shard"
        );
        describe_gauge!(
            INVALID_LEASE_ITEMS,
            Unit::Count,
            "Lease items that do not decode"
        );
        describe_gauge!(STREAMS_ACTIVE, Unit::Count, "Streams this worker consumes");
        describe_gauge!(
            STREAMS_UNREACHABLE,
            Unit::Count,
            "Listed streams this worker cannot reach"
        );
        describe_gauge!(
            STREAMS_PENDING_DELETION,
            Unit::Count,
            "Former streams whose leases wait for deletion"
        );
        describe_counter!(
            STREAMS_DELETED,
            Unit::Count,
            "Former streams whose leases this worker deleted"
        );
        describe_counter!(
            STREAM_DISCOVERY_FAILURES,
            Unit::Count,
            "Times the stream tracker failed"
        );
        describe_counter!(LEASE_TABLE_CALLS, Unit::Count, "Calls to the lease table");
        describe_gauge!(
            LEASE_TABLE_READ_UNITS,
            Unit::Count,
            "Read capacity units the lease table's calls consumed"
        );
        describe_gauge!(
            LEASE_TABLE_WRITE_UNITS,
            Unit::Count,
            "Write capacity units the lease table's calls consumed"
        );
    }
}

#[cfg(not(feature = "metrics"))]
mod instrument {
    //! Without the feature: the same shapes, doing nothing.

    type Labels<'a> = &'a [(&'static str, String)];

    #[derive(Debug)]
    pub(crate) struct Counter;

    impl Counter {
        pub(crate) fn new(_: &'static str, _: Labels<'_>) -> Self {
            Counter
        }

        pub(crate) fn add(&self, _: u64) {}
    }

    #[derive(Debug)]
    pub(crate) struct Gauge;

    impl Gauge {
        pub(crate) fn new(_: &'static str, _: Labels<'_>) -> Self {
            Gauge
        }

        pub(crate) fn set(&self, _: f64) {}
    }

    #[derive(Debug)]
    pub(crate) struct Histogram;

    impl Histogram {
        pub(crate) fn new(_: &'static str, _: Labels<'_>) -> Self {
            Histogram
        }

        pub(crate) fn record(&self, _: f64) {}
    }

    pub(super) fn lease_taken(_: &str, _: &'static str) {}

    pub(super) fn lease_table_call(_: &'static str, _: &'static str) {}

    pub(super) fn consumed_capacity(_: &'static str, _: f64, _: f64) {}

    pub(super) fn describe() {}
}
