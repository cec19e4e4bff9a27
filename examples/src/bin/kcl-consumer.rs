//! kcl-consumer: consumes a Kinesis stream with a fleet-aware worker and prints one JSON line
//! per record.
//!
//! ```text
//! kcl-consumer --app NAME (--stream NAME ... | --stream-prefix PREFIX)
//!              [--initial-position trim-horizon|latest|at-timestamp=RFC3339]
//!              [--worker-id ID] [--output PATH] [--metrics-addr HOST:PORT] [--per-shard-metrics]
//!              [--summary-interval 30s] [--fan-out [--consumer-name NAME | --consumer-arn ARN]]
//!              [lease and polling settings]
//! ```
//!
//! `--stream` given several times, or `--stream-prefix` (every stream whose name starts with
//! it, listed again every `--stream-discovery-interval`), runs the worker in multi-stream mode:
//! one lease table for all the streams, and each JSON line names its `stream`.
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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kcl_core::{
    CancellationToken, Checkpointer, ErrorChain, InitialPosition, PerStream, Record,
    RecordProcessor, ShardContext, async_trait,
};
use kcl_examples::signals::{
    EXIT_FAILURE, enforce_deadline, exit, handle_signals, unless_shutdown,
};
use kcl_examples::stream_record_json_line;
use kcl_examples::worker_args::WorkerArgs;
use kcl_examples::worker_run::run_worker;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(about = "Consume a Kinesis stream and print one JSON line per record")]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Output file, appended to (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
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
    /// In multi-stream mode, the stream's name (each line names it).
    stream: Option<String>,
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
            text.push_str(&stream_record_json_line(
                self.stream.as_deref(),
                &self.shard_id,
                record,
            ));
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

/// Time allowed beyond the worker's shutdown deadline for the final flush of the output. The
/// processors flush after each batch, so a healthy final flush has nothing to write; this
/// only bounds one stuck on an output that no longer drains.
const FINAL_FLUSH_MARGIN: Duration = Duration::from_secs(2);

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
    handle_signals(shutdown.clone(), "leases not released will expire")?;
    let config = args.worker.config(InitialPosition::Latest);
    config.validate()?;
    // The final flush of the output is bounded too.
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
        PerStream(move |shard: &ShardContext| JsonLines {
            stream: shard.stream.as_ref().map(|s| s.stream_name().to_owned()),
            shard_id: shard.shard_id.clone(),
            output: output.clone(),
            gone: gone.clone(),
        })
    };
    let helper_failure = run_worker(&sdk, config, &args.worker, factory, shutdown).await?;
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
