//! The worker's command-line flags, shared by the programs that run a worker (`kcl-consumer`,
//! `kcl-archive run`): the application, the stream, lease and polling settings, fan-out and
//! the metrics server. A flag not given keeps the library's default.

use std::net::SocketAddr;
use std::time::Duration;

use kcl_core::{
    FanOutConfig, InitialPosition, LeaseConfig, MetricsConfig, MultiStreamConfig, PollingConfig,
    Retrieval, WorkerConfig,
};

use crate::{parse_duration, parse_initial_position};

/// Flags that configure a worker.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Application name: workers with the same name share the shards; names the lease table.
    #[arg(long)]
    pub app: String,
    /// Stream name or ARN. Given several times (or with --stream-prefix), the worker runs in
    /// multi-stream mode: one lease table for all the streams.
    #[arg(long, required_unless_present = "stream_prefix")]
    pub stream: Vec<String>,
    /// Multi-stream mode: consume every stream whose name starts with this prefix
    /// (ListStreams, asked again every --stream-discovery-interval).
    #[arg(long, conflicts_with = "stream")]
    pub stream_prefix: Option<String>,
    /// Multi-stream mode: how often the streams are listed again, e.g. 60s.
    #[arg(long, value_parser = parse_duration)]
    pub stream_discovery_interval: Option<Duration>,
    /// Multi-stream mode: how long a stream must be gone before its leases are deleted, e.g.
    /// 1h.
    #[arg(long, value_parser = parse_duration)]
    pub former_streams_grace: Option<Duration>,
    /// Where shards without a checkpoint start: trim-horizon, latest, at-timestamp=RFC3339
    /// (default: latest for kcl-consumer, trim-horizon for kcl-archive).
    #[arg(long, value_parser = parse_initial_position)]
    pub initial_position: Option<InitialPosition>,
    /// Worker id (default: host name and a random UUID).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Lease table name (default: the application name).
    #[arg(long)]
    pub lease_table: Option<String>,
    /// Lease duration, e.g. 10s.
    #[arg(long, value_parser = parse_duration)]
    pub lease_duration: Option<Duration>,
    /// Lease renewal interval, e.g. 3s.
    #[arg(long, value_parser = parse_duration)]
    pub renewal_interval: Option<Duration>,
    /// Timeout of one lease-table call, e.g. 2s; shorter than the lease duration minus the
    /// renewal interval.
    #[arg(long, value_parser = parse_duration)]
    pub lease_request_timeout: Option<Duration>,
    /// Interval of lease taking rounds, e.g. 2s.
    #[arg(long, value_parser = parse_duration)]
    pub taker_interval: Option<Duration>,
    /// Interval of shard syncs, e.g. 60s.
    #[arg(long, value_parser = parse_duration)]
    pub shard_sync_interval: Option<Duration>,
    /// Most leases this worker holds.
    #[arg(long)]
    pub max_leases_per_worker: Option<usize>,
    /// Most leases asked of other workers per taking round (0: no balancing by handoff).
    #[arg(long)]
    pub max_leases_to_steal: Option<usize>,
    /// How long a requested handoff may take before the lease is taken anyway, e.g. 10s.
    #[arg(long, value_parser = parse_duration)]
    pub handoff_timeout: Option<Duration>,
    /// Most records per GetRecords call (1 to 10000).
    #[arg(long)]
    pub max_records: Option<u32>,
    /// Pause after an empty read, e.g. 1500ms.
    #[arg(long, value_parser = parse_duration)]
    pub idle_time_between_empty_reads: Option<Duration>,
    /// Batches fetched ahead of processing.
    #[arg(long)]
    pub max_prefetched_batches: Option<usize>,
    /// How long a graceful shutdown waits for processors, e.g. 20s.
    #[arg(long, value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Serve /metrics (Prometheus text), /healthz and /readyz on this address, e.g.
    /// 0.0.0.0:9090.
    #[arg(long, value_parser = parse_socket_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Label per-shard metrics with the shard id, and report each shard's lag.
    #[arg(long)]
    pub per_shard_metrics: bool,
    /// Read with enhanced fan-out (SubscribeToShard) instead of polling GetRecords: the
    /// consumer (default: named after --app) is registered at start if missing.
    #[arg(long)]
    pub fan_out: bool,
    /// With --fan-out: the consumer's name.
    #[arg(long, requires = "fan_out", conflicts_with = "consumer_arn")]
    pub consumer_name: Option<String>,
    /// With --fan-out: a consumer registered beforehand, by ARN (never registered here).
    #[arg(long, requires = "fan_out")]
    pub consumer_arn: Option<String>,
    /// Interval of the progress line logged at info level (0: none).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub summary_interval: Duration,
}

/// `HOST:PORT`, the host a name or an address.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()
        .map_err(|e| format!("`{text}` is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("`{text}` resolves to no address"))
}

/// The label of a multi-stream worker's configuration (logs and metrics).
pub const MULTI_STREAM_LABEL: &str = "multi-stream";

impl WorkerArgs {
    /// True when the flags ask for several streams (or a prefix).
    pub fn is_multi_stream(&self) -> bool {
        self.stream.len() > 1 || self.stream_prefix.is_some()
    }

    /// The one stream of a single-stream worker.
    ///
    /// # Errors
    /// When the flags name several streams or a prefix.
    pub fn single_stream(&self) -> Result<&str, String> {
        match (self.stream.as_slice(), &self.stream_prefix) {
            ([stream], None) => Ok(stream),
            _ => Err(
                "this program reads one stream: give --stream once, without --stream-prefix".into(),
            ),
        }
    }

    /// The worker's configuration; `initial_position` applies when the flag is not given.
    pub fn config(&self, initial_position: InitialPosition) -> WorkerConfig {
        let defaults = LeaseConfig::default();
        let lease = LeaseConfig::default()
            .with_lease_duration(self.lease_duration.unwrap_or(defaults.lease_duration))
            .with_renewal_interval(self.renewal_interval.unwrap_or(defaults.renewal_interval))
            .with_request_timeout(
                self.lease_request_timeout
                    .unwrap_or(defaults.request_timeout),
            )
            .with_taker_interval(self.taker_interval.unwrap_or(defaults.taker_interval))
            .with_shard_sync_interval(
                self.shard_sync_interval
                    .unwrap_or(defaults.shard_sync_interval),
            )
            .with_max_leases_per_worker(
                self.max_leases_per_worker
                    .unwrap_or(defaults.max_leases_per_worker),
            )
            .with_max_leases_to_steal(
                self.max_leases_to_steal
                    .unwrap_or(defaults.max_leases_to_steal),
            )
            .with_handoff_timeout(self.handoff_timeout.unwrap_or(defaults.handoff_timeout));
        let polling_defaults = PollingConfig::default();
        let polling = PollingConfig::default()
            .with_max_records(self.max_records.unwrap_or(polling_defaults.max_records))
            .with_idle_time_between_empty_reads(
                self.idle_time_between_empty_reads
                    .unwrap_or(polling_defaults.idle_time_between_empty_reads),
            )
            .with_max_prefetched_batches(
                self.max_prefetched_batches
                    .unwrap_or(polling_defaults.max_prefetched_batches),
            );
        let label = match (self.is_multi_stream(), self.stream.first()) {
            (false, Some(stream)) => stream.as_str(),
            _ => MULTI_STREAM_LABEL,
        };
        let multi_defaults = MultiStreamConfig::default();
        let multi_stream = MultiStreamConfig::default()
            .with_stream_discovery_interval(
                self.stream_discovery_interval
                    .unwrap_or(multi_defaults.stream_discovery_interval),
            )
            .with_former_streams_grace(
                self.former_streams_grace
                    .unwrap_or(multi_defaults.former_streams_grace),
            );
        let mut config = WorkerConfig::new(&self.app, label)
            .with_multi_stream(multi_stream)
            .with_initial_position(self.initial_position.unwrap_or(initial_position))
            .with_lease(lease)
            .with_polling(polling);
        if let Some(id) = &self.worker_id {
            config = config.with_worker_id(id);
        }
        if let Some(table) = &self.lease_table {
            config = config.with_lease_table_name(table);
        }
        if let Some(timeout) = self.shutdown_timeout {
            config = config.with_shutdown_timeout(timeout);
        }
        if self.fan_out {
            let mut fan_out = FanOutConfig::default();
            if let Some(name) = &self.consumer_name {
                fan_out = fan_out.with_consumer_name(name);
            }
            if let Some(arn) = &self.consumer_arn {
                fan_out = fan_out.with_consumer_arn(arn);
            }
            config = config.with_retrieval(Retrieval::FanOut(fan_out));
        }
        config.with_metrics(MetricsConfig::default().with_per_shard(self.per_shard_metrics))
    }
}
