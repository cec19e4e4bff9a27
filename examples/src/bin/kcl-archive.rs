//! kcl-archive: archives a Kinesis stream into gzip-compressed, newline-delimited objects
//! under `PREFIX/YYYY/MM/DD/HH/`, in S3 or a local directory, as Firehose does, but with each
//! record stored exactly once and in shard order (see docs/archive.md).
//!
//! ```text
//! kcl-archive run --app NAME --stream NAME (--bucket BUCKET [--create-bucket] | --dir DIR)
//!                 [--prefix PREFIX] [--flush-size 5MB] [--flush-age 300s] [--path-style]
//!                 [worker flags, as kcl-consumer's]
//! kcl-archive read (--bucket BUCKET | --dir DIR) [--prefix PREFIX] [--path-style]
//! ```
//!
//! `run` is a worker of the application: run it on several machines and they share the
//! shards. Each shard's records are buffered and stored as one object when the buffer
//! reaches `--flush-size` (before compression) or its oldest record `--flush-age`, when the
//! next record arrived in another UTC hour, at shard end, and at shutdown or handoff; the
//! shard is checkpointed only after the object is stored. SIGTERM or SIGINT stores what is
//! buffered, checkpoints, releases the leases and exits 0; a second signal exits at once.
//!
//! `read` prints one JSON line per object, sorted by key: `key`, `size`, `stream`,
//! `shard_id`, `sequence_number` and `sub_sequence_number` of its first record, and `lines`.
//!
//! Endpoints, region and credentials come from the standard AWS environment (for S3:
//! `AWS_ENDPOINT_URL_S3`; the bucket is addressed in the path, as local S3 servers need, when
//! that is set or with `--path-style`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kcl_core::{CancellationToken, InitialPosition, ProcessingConfig};
use kcl_examples::archive::object_name::{normalize_prefix, stream_name};
use kcl_examples::archive::read::read_archive;
use kcl_examples::archive::{
    ArchiveSettings, DirStore, FlushPolicy, ObjectStore, S3Store, UploadRetry,
};
use kcl_examples::signals::{
    EXIT_FAILURE, enforce_deadline, exit, handle_signals, unless_shutdown,
};
use kcl_examples::worker_args::WorkerArgs;
use kcl_examples::worker_run::run_worker;
use kcl_examples::{parse_duration, parse_size};
use tracing::info;

#[derive(Debug, Parser)]
#[command(about = "Archive a Kinesis stream into gzip objects under PREFIX/YYYY/MM/DD/HH/")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume the stream (as one worker of the application) and store its records.
    Run(Box<RunArgs>),
    /// Print the stored objects with their lines, one JSON line per object.
    Read(ReadArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Create the bucket at start if it does not exist.
    #[arg(long, requires = "bucket")]
    create_bucket: bool,
    /// Store a shard's buffer once it holds this much (before compression): 512, 64KB, 5MB.
    #[arg(long, value_parser = parse_size, default_value = "5MB")]
    flush_size: u64,
    /// Store a shard's buffer once its oldest record waited this long: 500ms, 60s, 5m.
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    flush_age: Duration,
}

#[derive(Debug, clap::Args)]
struct ReadArgs {
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// S3 bucket to store the objects in.
    #[arg(long, required_unless_present = "dir", conflicts_with = "dir")]
    bucket: Option<String>,
    /// Local directory to store the objects in, instead of S3.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Key prefix of the objects, e.g. logs/ (default: none).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Address the bucket in the path (http://host/bucket/key), not the host name. Default:
    /// on when AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL is set (a local S3 server).
    #[arg(long)]
    path_style: bool,
}

impl StoreArgs {
    fn store(&self, sdk: &aws_config::SdkConfig) -> (Arc<dyn ObjectStore>, Option<S3Store>) {
        match (&self.bucket, &self.dir) {
            (Some(bucket), _) => {
                let endpoint_set = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                    .iter()
                    .any(|name| std::env::var_os(name).is_some());
                let s3 = S3Store::new(sdk, bucket, self.path_style || endpoint_set);
                (Arc::new(s3.clone()), Some(s3))
            }
            (None, Some(dir)) => (Arc::new(DirStore::new(dir)), None),
            (None, None) => unreachable!("clap requires --bucket or --dir"),
        }
    }
}

/// Time allowed beyond the worker's shutdown deadline; the processors store their buffers
/// within the worker's deadline, so this only bounds the process's own exit.
const EXIT_MARGIN: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() {
    kcl_examples::init_logging();
    let args = Args::parse();
    let outcome = match args.command {
        Command::Run(run_args) => run(*run_args).await,
        Command::Read(read_args) => read(read_args).await,
    };
    let code = match outcome {
        Ok(()) => 0,
        Err(e) => {
            kcl_examples::log_failure("kcl-archive", e.as_ref());
            EXIT_FAILURE
        }
    };
    exit(code)
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Objects are named after the one stream they archive.
    let stream = args.worker.single_stream()?.to_owned();
    let shutdown = CancellationToken::new();
    handle_signals(
        shutdown.clone(),
        "buffered records are not stored (the next owner reads them again from the checkpoint)",
    )?;
    // An archive wants the whole stream; flushing on age needs calls on idle shards too.
    let config = args
        .worker
        .config(InitialPosition::TrimHorizon)
        .with_processing(
            ProcessingConfig::default().with_call_process_records_even_for_empty_list(true),
        );
    config.validate()?;
    if args.flush_age.is_zero() {
        return Err("--flush-age must be more than 0".into());
    }
    enforce_deadline(shutdown.clone(), config.shutdown_deadline() + EXIT_MARGIN);

    let Some(sdk) = unless_shutdown(&shutdown, aws_config::load_from_env()).await else {
        info!("shutdown requested during start-up; stopping");
        return Ok(());
    };
    let (store, s3) = args.store.store(&sdk);
    if args.create_bucket {
        let s3 = s3.expect("--create-bucket requires --bucket");
        let Some(created) = unless_shutdown(&shutdown, s3.create_bucket()).await else {
            info!("shutdown requested during start-up; stopping");
            return Ok(());
        };
        created?;
    }
    let settings = ArchiveSettings {
        stream: stream_name(&stream).to_owned(),
        prefix: normalize_prefix(&args.store.prefix),
        policy: FlushPolicy {
            max_bytes: args.flush_size,
            max_age: args.flush_age,
        },
        retry: UploadRetry::default(),
        store,
    };
    info!(
        store = settings.store.location(),
        prefix = settings.prefix,
        flush_size = args.flush_size,
        flush_age = ?args.flush_age,
        "archiving"
    );
    let factory = move |shard_id: &str| settings.archiver(shard_id);
    match run_worker(&sdk, config, &args.worker, factory, shutdown).await? {
        Some(failure) => Err(failure.into()),
        None => Ok(()),
    }
}

async fn read(args: ReadArgs) -> Result<(), Box<dyn std::error::Error>> {
    let sdk = aws_config::load_from_env().await;
    let (store, _) = args.store.store(&sdk);
    let objects = read_archive(store.as_ref(), &normalize_prefix(&args.store.prefix)).await?;
    let mut out = std::io::stdout().lock();
    for object in &objects {
        serde_json::to_writer(&mut out, object)?;
        std::io::Write::write_all(&mut out, b"\n")?;
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}
