//! kcl-consumer: consumes a Kinesis stream with a fleet-aware worker and prints one JSON line
//! per record.
//!
//! ```text
//! kcl-consumer --app NAME --stream NAME [--initial-position trim-horizon|latest|at-timestamp=RFC3339]
//!              [--worker-id ID] [--output PATH] [--metrics-addr HOST:PORT] [--per-shard-metrics]
//!              [--summary-interval 30s] [--fan-out [--consumer-name NAME | --consumer-arn ARN]]
//!              [lease and polling settings]
//! ```
//!
//! With `--metrics-addr`, an HTTP server on that address serves the worker's metrics in
//! Prometheus text format on `/metrics`, `/healthz` (200 while the process runs) and `/readyz`
//! (200 once the worker has reached the lease table and run a taking round; 503 before, during
//! a shutdown, and once the lease table has not answered for a lease duration). Every
//! `--summary-interval` (0: never) one line at info level says records/s, lag and leases.
//!
//! Endpoints, region and credentials come from the standard AWS environment and config files.
//! Each batch is written and flushed to the output, then checkpointed, so a record is
//! checkpointed only once it is on disk. SIGTERM or SIGINT shuts down gracefully
//! (`shutdown_requested` checkpoints, leases are released) and the process exits 0. An output
//! that is gone for good (a closed pipe, say `kcl-consumer ... | head`) shuts the worker down
//! the same way, and the process exits non-zero naming the output: retrying a batch into a
//! closed pipe could never succeed.
//!
//! Signals count from the very start. One during start-up (loading the AWS configuration,
//! opening the output, which blocks until a FIFO has a reader, initializing the lease table)
//! ends the process at once with exit 0, without taking a lease. A second SIGTERM or SIGINT
//! exits at once, with 143 or 130 as a shell reports a killed process; the leases not released
//! yet expire. Once a shutdown has begun, the process is gone within the worker's shutdown
//! deadline (`WorkerConfig::shutdown_deadline`: 54.2 s with the defaults, less with a shorter
//! `--shutdown-timeout` or lease settings) plus 2 s for the final flush of the output; a
//! process still running then (an output that no longer drains, say) logs an error and exits
//! 1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kcl_core::{
    CancellationToken, Checkpointer, ErrorChain, FanOutConfig, InitialPosition, LeaseConfig,
    MetricsConfig, PollingConfig, Record, RecordProcessor, Retrieval, WorkerConfig, async_trait,
};
use kcl_dynamo_lease::AwsWorkerBuilder;
use kcl_examples::health::{HealthServer, install_prometheus};
use kcl_examples::summary::log_summaries;
use kcl_examples::{parse_duration, parse_initial_position, record_json_line};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tracing::{error, info};

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
    /// Serve /metrics (Prometheus text), /healthz and /readyz on this address, e.g.
    /// 0.0.0.0:9090.
    #[arg(long, value_parser = parse_socket_addr)]
    metrics_addr: Option<SocketAddr>,
    /// Label per-shard metrics with the shard id, and report each shard's lag.
    #[arg(long)]
    per_shard_metrics: bool,
    /// Read with enhanced fan-out (SubscribeToShard) instead of polling GetRecords: the
    /// consumer (default: named after --app) is registered at start if missing.
    #[arg(long)]
    fan_out: bool,
    /// With --fan-out: the consumer's name.
    #[arg(long, requires = "fan_out", conflicts_with = "consumer_arn")]
    consumer_name: Option<String>,
    /// With --fan-out: a consumer registered beforehand, by ARN (never registered here).
    #[arg(long, requires = "fan_out")]
    consumer_arn: Option<String>,
    /// Interval of the progress line logged at info level (0: none).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    summary_interval: Duration,
}

/// `HOST:PORT`, the host a name or an address.
fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()
        .map_err(|e| format!("`{text}` is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("`{text}` resolves to no address"))
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
                error!(output = %self.name, error = %ErrorChain(&error), "the output is closed; shutting down");
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
        Some(path) => Box::new({
            // Worth saying: opening a FIFO waits until it has a reader.
            info!(output = %path.display(), "opening the output");
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
                })?
        }),
        None => Box::new(tokio::io::stdout()),
    })
}

/// A signal that stops the consumer.
#[derive(Clone, Copy, Debug)]
enum StopSignal {
    Term,
    Int,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    }

    /// The exit status of a process killed by this signal, as shells report it (128 + the
    /// signal's number): what a second signal ends the process with.
    fn exit_code(self) -> i32 {
        const SIGNALLED: i32 = 128;
        const SIGINT: i32 = 2;
        const SIGTERM: i32 = 15;
        SIGNALLED
            + match self {
                StopSignal::Term => SIGTERM,
                StopSignal::Int => SIGINT,
            }
    }
}

/// Exit code of a run that failed, or of a shutdown that overran its deadline.
const EXIT_FAILURE: i32 = 1;

/// Time allowed beyond the worker's shutdown deadline for the final flush of the output. The
/// processors flush after each batch, so a healthy final flush has nothing to write; this
/// only bounds one stuck on an output that no longer drains.
const FINAL_FLUSH_MARGIN: Duration = Duration::from_secs(2);

/// From now on, the first SIGTERM or SIGINT cancels `shutdown`, and a second one ends the
/// process at once.
fn handle_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn next(term: &mut Signal, int: &mut Signal) -> StopSignal {
        tokio::select! {
            _ = term.recv() => StopSignal::Term,
            _ = int.recv() => StopSignal::Int,
        }
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let first = next(&mut term, &mut int).await;
        info!(
            "{}: shutting down (a second SIGTERM or SIGINT exits at once)",
            first.name()
        );
        shutdown.cancel();
        let second = next(&mut term, &mut int).await;
        let code = second.exit_code();
        error!(
            code,
            "second signal ({}): exiting at once, without finishing the shutdown; leases not \
             released will expire",
            second.name()
        );
        exit(code);
    });
    Ok(())
}

/// Once a shutdown has begun (a signal, the output gone, the worker stopped), ends the process
/// if it still runs `deadline` later.
fn enforce_deadline(shutdown: CancellationToken, deadline: Duration) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tokio::time::sleep(deadline).await;
        error!(
            ?deadline,
            "the shutdown did not finish within its deadline (the worker's shutdown deadline and \
             the final flush); exiting"
        );
        exit(EXIT_FAILURE);
    });
}

/// Runs a start-up step, unless a shutdown is asked for first: then `None`, and the step is
/// dropped (an open blocked on its thread stays blocked until the process exits).
async fn unless_shutdown<T>(
    shutdown: &CancellationToken,
    step: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        done = step => Some(done),
    }
}

/// Ends the process with `code`, never by returning from `main`: dropping the runtime waits
/// for its blocking threads, and one may be blocked for good (an open of a FIFO that no
/// process reads, a write to a pipe that no longer drains). `std::process::exit` flushes
/// stdout unless another thread is writing to it (such a stuck write), so this never hangs;
/// the logs go to stderr, which is not buffered.
fn exit(code: i32) -> ! {
    let _ = std::io::Write::flush(&mut std::io::stderr());
    std::process::exit(code)
}

#[tokio::main]
async fn main() {
    kcl_examples::init_logging();
    let args = Args::parse();
    let code = match run(args).await {
        Ok(()) => 0,
        Err(e) => {
            kcl_examples::log_failure("kcl-consumer", e.as_ref());
            EXIT_FAILURE
        }
    };
    exit(code)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // First of all: a signal at any time from here is a shutdown.
    let shutdown = CancellationToken::new();
    handle_signals(shutdown.clone())?;
    let config = args.config();
    config.validate()?;
    let deadline = config.shutdown_deadline() + FINAL_FLUSH_MARGIN;
    enforce_deadline(shutdown.clone(), deadline);

    // Each start-up step gives way to a shutdown; the worker's own start-up does too.
    let stopped = || {
        info!("shutdown requested during start-up; stopping");
        Ok(())
    };
    // Region, credentials and endpoints from the environment, for both services.
    let Some(sdk) = unless_shutdown(&shutdown, aws_config::load_from_env()).await else {
        return stopped();
    };
    let Some(output) = unless_shutdown(&shutdown, open_output(args.output.as_ref())).await else {
        return stopped();
    };
    let output: Output = Arc::new(Mutex::new(output?));
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
    // Bound before the worker starts, so a taken port fails the start-up. The recorder is
    // installed before the worker exists: instruments are registered as it creates them.
    let health = match args.metrics_addr {
        Some(addr) => {
            let prometheus = install_prometheus(&[("application", &args.app)])
                .map_err(|e| format!("installing the Prometheus recorder: {e}"))?;
            Some((HealthServer::bind(addr).await?, prometheus))
        }
        None => None,
    };
    let lease_duration = config.lease.lease_duration;
    let worker = AwsWorkerBuilder::new(&sdk, config).build(factory)?;
    info!(worker_id = worker.worker_id(), shutdown_deadline = ?deadline, "starting");
    // The helpers run until the worker has stopped, and are awaited: a failure is reported.
    let helpers_stop = CancellationToken::new();
    let mut helpers = tokio::task::JoinSet::new();
    if let Some((server, prometheus)) = health {
        info!(address = %server.local_addr()?, "serving /metrics, /healthz and /readyz");
        let serve = server.serve(
            prometheus,
            worker.status(),
            lease_duration,
            shutdown.clone(),
            helpers_stop.clone(),
        );
        helpers.spawn(async move { serve.await.map_err(|e| format!("metrics server: {e}")) });
    }
    if !args.summary_interval.is_zero() {
        let summaries = log_summaries(worker.status(), args.summary_interval, helpers_stop.clone());
        helpers.spawn(async move {
            summaries.await;
            Ok(())
        });
    }
    // A helper that fails (the metrics server) shuts the worker down gracefully; the worker's
    // future is never dropped midway, which would abandon its leases.
    let run = worker.run(shutdown.clone());
    tokio::pin!(run);
    let mut helper_failure: Option<String> = None;
    let outcome = loop {
        tokio::select! {
            outcome = &mut run => break outcome,
            Some(joined) = helpers.join_next(), if helper_failure.is_none() => {
                let failure = match joined {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e,
                    Err(e) => format!("a helper task failed: {}", ErrorChain(&e)),
                };
                error!(error = %failure, "shutting down");
                helper_failure = Some(failure);
                shutdown.cancel();
            }
        }
    };
    // What is left (the final flush) is bounded by the deadline too, also after a fatal error.
    shutdown.cancel();
    helpers_stop.cancel();
    while let Some(joined) = helpers.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "a helper task failed"),
            Err(e) => error!(error = %ErrorChain(&e), "a helper task failed"),
        }
    }
    outcome?;
    if let Some(error) = gone.take() {
        return Err(format!("the output {} is closed: {error}", gone.name).into());
    }
    output
        .lock()
        .await
        .flush()
        .await
        .map_err(|e| format!("flushing {}: {e}", gone.name))?;
    match helper_failure {
        Some(failure) => Err(failure.into()),
        None => Ok(()),
    }
}
