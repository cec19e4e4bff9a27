//! kcl-consumer: consumes a Kinesis stream with a fleet-aware worker and prints one JSON line
//! per record.
//!
//! ```text
//! kcl-consumer --app NAME --stream NAME [--initial-position trim-horizon|latest|at-timestamp=RFC3339]
//!              [--worker-id ID] [--output PATH] [lease and polling settings]
//! ```
//!
//! Endpoints, region and credentials come from the standard AWS environment and config files.
//! Each batch is written and flushed to the output, then checkpointed, so a record is
//! checkpointed only once it is on disk. SIGTERM or SIGINT shuts down gracefully
//! (`shutdown_requested` checkpoints, leases are released) and the process exits 0. An output
//! that is gone for good (a closed pipe, say `kcl-consumer ... | head`) shuts the worker down
//! the same way, and the process exits non-zero naming the output: retrying a batch into a
//! closed pipe could never succeed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kcl_core::{
    CancellationToken, Checkpointer, ErrorChain, InitialPosition, LeaseConfig, PollingConfig,
    Record, RecordProcessor, WorkerConfig, async_trait,
};
use kcl_dynamo_lease::AwsWorkerBuilder;
use kcl_examples::{parse_duration, parse_initial_position, record_json_line};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tracing::info;

#[derive(Debug, Parser)]
#[command(about = "Consume a Kinesis stream and print one JSON line per record")]
struct Args {
    /// Application name: workers with the same name share the shards; names the lease table.
    #[arg(long)]
    app: String,
    /// Stream name or ARN.
    #[arg(long)]
    stream: String,
    /// Where shards without a checkpoint start: trim-horizon, latest, at-timestamp=RFC3339.
    #[arg(long, default_value = "latest", value_parser = parse_initial_position)]
    initial_position: InitialPosition,
    /// Worker id (default: host name and a random UUID).
    #[arg(long)]
    worker_id: Option<String>,
    /// Output file, appended to (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Lease table name (default: the application name).
    #[arg(long)]
    lease_table: Option<String>,
    /// Lease duration, e.g. 10s.
    #[arg(long, value_parser = parse_duration)]
    lease_duration: Option<Duration>,
    /// Lease renewal interval, e.g. 3s.
    #[arg(long, value_parser = parse_duration)]
    renewal_interval: Option<Duration>,
    /// Timeout of one lease-table call, e.g. 2s; shorter than the lease duration minus the
    /// renewal interval.
    #[arg(long, value_parser = parse_duration)]
    lease_request_timeout: Option<Duration>,
    /// Interval of lease taking rounds, e.g. 2s.
    #[arg(long, value_parser = parse_duration)]
    taker_interval: Option<Duration>,
    /// Interval of shard syncs, e.g. 60s.
    #[arg(long, value_parser = parse_duration)]
    shard_sync_interval: Option<Duration>,
    /// Most leases this worker holds.
    #[arg(long)]
    max_leases_per_worker: Option<usize>,
    /// Most leases asked of other workers per taking round (0: no balancing by handoff).
    #[arg(long)]
    max_leases_to_steal: Option<usize>,
    /// How long a requested handoff may take before the lease is taken anyway, e.g. 10s.
    #[arg(long, value_parser = parse_duration)]
    handoff_timeout: Option<Duration>,
    /// Most records per GetRecords call (1 to 10000).
    #[arg(long)]
    max_records: Option<u32>,
    /// Pause after an empty read, e.g. 1500ms.
    #[arg(long, value_parser = parse_duration)]
    idle_time_between_empty_reads: Option<Duration>,
    /// Batches fetched ahead of processing.
    #[arg(long)]
    max_prefetched_batches: Option<usize>,
    /// How long a graceful shutdown waits for processors, e.g. 20s.
    #[arg(long, value_parser = parse_duration)]
    shutdown_timeout: Option<Duration>,
}

impl Args {
    fn config(&self) -> WorkerConfig {
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
        let mut config = WorkerConfig::new(&self.app, &self.stream)
            .with_initial_position(self.initial_position)
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
        config
    }
}

type Output = Arc<Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

/// The first write error after which the output can never be written again, and the worker's
/// shutdown token, cancelled when it happens.
#[derive(Clone)]
struct OutputGone {
    name: Arc<str>,
    error: Arc<std::sync::Mutex<Option<std::io::Error>>>,
    shutdown: CancellationToken,
}

impl OutputGone {
    /// Notes `error` if the output is gone for good, and then shuts the worker down.
    fn check(&self, error: std::io::Error) -> std::io::Error {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            let mut first = self.error.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                tracing::error!(output = %self.name, error = %ErrorChain(&error), "the output is closed; shutting down");
                *first = Some(std::io::Error::new(error.kind(), error.to_string()));
                self.shutdown.cancel();
            }
        }
        std::io::Error::new(error.kind(), format!("writing to {}: {error}", self.name))
    }

    fn take(&self) -> Option<std::io::Error> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Writes each record as a JSON line, flushes, then checkpoints.
struct JsonLines {
    shard_id: String,
    output: Output,
    gone: OutputGone,
}

#[async_trait]
impl RecordProcessor for JsonLines {
    type Error = Box<dyn std::error::Error + Send + Sync>;

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error> {
        let mut text = String::new();
        for record in records {
            text.push_str(&record_json_line(&self.shard_id, record));
            text.push('\n');
        }
        {
            let mut out = self.output.lock().await;
            let written = match out.write_all(text.as_bytes()).await {
                Ok(()) => out.flush().await,
                Err(e) => Err(e),
            };
            // Nothing is checkpointed after a failed write: the batch is delivered again, or
            // (the output is gone) the worker shuts down and the next one starts here.
            written.map_err(|e| self.gone.check(e))?;
        }
        checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(
        &mut self,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Self::Error> {
        // Everything delivered was written and flushed in process_records.
        checkpointer.checkpoint().await?;
        Ok(())
    }
}

async fn open_output(
    path: Option<&PathBuf>,
) -> std::io::Result<Box<dyn AsyncWrite + Send + Unpin>> {
    Ok(match path {
        Some(path) => Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("opening the output {}: {e}", path.display()),
                    )
                })?,
        ),
        None => Box::new(tokio::io::stdout()),
    })
}

/// Cancels `token` on the first SIGTERM or SIGINT.
fn cancel_on_signal(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    kcl_examples::init_logging();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            kcl_examples::log_failure("kcl-consumer", e.as_ref());
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = args.config();
    config.validate()?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;

    // Region, credentials and endpoints from the environment, for both services.
    let sdk = aws_config::load_from_env().await;
    let output: Output = Arc::new(Mutex::new(open_output(args.output.as_ref()).await?));
    let gone = OutputGone {
        name: args
            .output
            .as_ref()
            .map_or_else(|| "stdout".to_owned(), |p| p.display().to_string())
            .into(),
        error: Arc::default(),
        shutdown: shutdown.clone(),
    };
    let factory = {
        let (output, gone) = (output.clone(), gone.clone());
        move |shard_id: &str| JsonLines {
            shard_id: shard_id.to_owned(),
            output: output.clone(),
            gone: gone.clone(),
        }
    };
    let worker = AwsWorkerBuilder::new(&sdk, config).build(factory)?;
    info!(worker_id = worker.worker_id(), "starting");
    worker.run(shutdown).await?;
    if let Some(error) = gone.take() {
        return Err(format!("the output {} is closed: {error}", gone.name).into());
    }
    output
        .lock()
        .await
        .flush()
        .await
        .map_err(|e| format!("flushing {}: {e}", gone.name))?;
    Ok(())
}
