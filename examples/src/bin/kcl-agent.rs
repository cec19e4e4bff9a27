//! kcl-agent: tails log files into a Kinesis stream, as the AWS Kinesis Agent does.
//!
//! ```text
//! kcl-agent --stream NAME --file PATH|GLOB [--file ...] [--from end|start] [--state-file PATH]
//!           [--partition-key random|file|field:NAME] [--aggregate] [--linger 200ms]
//!           [--max-batch-records 500] [--max-batch-bytes 5MB] [--poll-interval 250ms]
//!           [--once] [--shutdown-timeout 20s]
//! ```
//!
//! One record per line, at least once, in order per partition key, through rotation by rename
//! and by copy-truncate; the shipped offsets are kept in a state file, written only after
//! `PutRecords` acknowledged the lines. Ends on `--once` when the files are shipped, or on
//! SIGTERM/SIGINT after sending what was read (a second signal exits at once). Prints one JSON
//! line on stdout when it exits: `{"lines","bytes","records","put_calls","entries_retried",
//! "seconds"}`. Logs go to stderr. See docs/agent.md.

// A command-line tool: the summary on stdout is its output.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory as _, Parser, ValueEnum};
use kcl_core::ErrorChain;
use kcl_examples::agent::{Agent, AgentConfig, KinesisPutRecords, Limits, PartitionKey, StartAt};
use kcl_examples::{init_logging, log_failure, parse_duration, parse_size};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// How long one `PutRecords` attempt may take before it is abandoned and retried (a call of
/// 5 MiB on a slow link needs seconds; a connection that hangs must not stop the agent).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Begin {
    /// At the end of the file (as tail -f).
    End,
    /// At its start: the whole file.
    Start,
}

#[derive(Debug, Parser)]
#[command(about = "Tail log files into a Kinesis stream, one record per line")]
struct Args {
    /// Stream name or ARN.
    #[arg(long)]
    stream: String,
    /// A file or glob to follow; repeat for more. Globs are matched again every poll interval.
    #[arg(long = "file", value_name = "PATH|GLOB", required = true)]
    files: Vec<String>,
    /// Where files found at start-up begin when the state file does not know them; files
    /// appearing later begin at their start.
    #[arg(long, value_enum, default_value = "end")]
    from: Begin,
    /// Where the shipped offset of each file is kept.
    #[arg(long, default_value = "kcl-agent.state.json")]
    state_file: PathBuf,
    /// random, file (the path), or field:NAME (a top-level field of JSON lines).
    #[arg(long, default_value = "random", value_parser = str::parse::<PartitionKey>)]
    partition_key: PartitionKey,
    /// Pack lines into KPL aggregated records (one partition key per record).
    #[arg(long)]
    aggregate: bool,
    /// How long the oldest line of a batch waits for more.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    linger: Duration,
    /// Records per PutRecords call (1 to 500).
    #[arg(long, default_value_t = 500)]
    max_batch_records: usize,
    /// Bytes (data and partition keys) per PutRecords call (4KB to 5MB).
    #[arg(long, default_value = "5MB", value_parser = parse_size)]
    max_batch_bytes: u64,
    /// How often globs are matched again and files checked for rotation.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Ship what the files hold now (a last unfinished line too), then exit.
    #[arg(long)]
    once: bool,
    /// How long a shutdown may spend sending what was read.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
}

impl Args {
    fn config(&self) -> AgentConfig {
        AgentConfig::new(&self.stream, self.files.clone())
            .with_start_at(match self.from {
                Begin::End => StartAt::End,
                Begin::Start => StartAt::Start,
            })
            .with_state_file(&self.state_file)
            .with_partition_key(self.partition_key.clone())
            .with_limits(Limits {
                max_records: self.max_batch_records,
                max_bytes: usize::try_from(self.max_batch_bytes).unwrap_or(usize::MAX),
                linger: self.linger,
                aggregate: self.aggregate,
            })
            .with_poll_interval(self.poll_interval)
            .with_once(self.once)
            .with_shutdown_timeout(self.shutdown_timeout)
    }
}

/// The first SIGTERM or SIGINT cancels `shutdown`; a second one exits at once with 128 + the
/// signal's number, as a shell reports a process killed by it.
fn handle_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn next(term: &mut Signal, int: &mut Signal) -> (&'static str, i32) {
        tokio::select! {
            _ = term.recv() => ("SIGTERM", 128 + 15),
            _ = int.recv() => ("SIGINT", 128 + 2),
        }
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Owned by the process: it ends only by exiting it.
    tokio::spawn(async move {
        let (first, _) = next(&mut term, &mut int).await;
        info!("{first}: shutting down (a second SIGTERM or SIGINT exits at once)");
        shutdown.cancel();
        let (second, code) = next(&mut term, &mut int).await;
        error!(
            code,
            "second signal ({second}): exiting at once; lines not acknowledged are shipped again after a restart"
        );
        std::process::exit(code);
    });
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    let config = args.config();
    if let Err(e) = config.validate() {
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, ErrorChain(&e))
            .exit();
    }
    let shutdown = CancellationToken::new();
    if let Err(e) = handle_signals(shutdown.clone()) {
        log_failure("kcl-agent", &e);
        return ExitCode::FAILURE;
    }
    let sdk = aws_config::load_from_env().await;
    // Retries are the agent's (failed entries must go before newer lines, and the summary
    // counts the calls made); the SDK's are off.
    let kinesis = aws_sdk_kinesis::config::Builder::from(&sdk)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        )
        .build();
    let client = KinesisPutRecords::new(aws_sdk_kinesis::Client::from_conf(kinesis), &args.stream);
    let mut agent = match Agent::new(config, client) {
        Ok(agent) => agent,
        Err(e) => {
            log_failure("kcl-agent", &e);
            return ExitCode::FAILURE;
        }
    };
    let result = agent.run(shutdown).await;
    let summary = serde_json::to_string(&agent.summary()).expect("the summary serializes");
    println!("{summary}");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log_failure("kcl-agent", &e);
            ExitCode::FAILURE
        }
    }
}
