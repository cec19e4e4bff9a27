//! kcl-admin: the operator's tool for a Kinesis Client Library application's lease table.
//!
//! ```text
//! kcl-admin --app NAME [--lease-table NAME] [--stream NAME] [--json] COMMAND
//!
//!   leases [--observe D]          every lease: shard, owner, counter, checkpoint, parents,
//!                                 state (finished, unowned, active, expired), lag (--stream);
//!                                 INVALID lines for items that do not decode
//!   workers [--observe D]         each owner: leases, how many it renewed while watched
//!   streams [--observe D]         each stream of a multi-stream table: leases by state,
//!                                 owners, whether it is being processed
//!   set-checkpoint --shard ID --to trim-horizon|latest|at-timestamp=TIME|SEQ
//!                  [--force] [--dry-run] [--observe D]
//!                                 moves a shard's checkpoint (SEQ and TIME need --stream)
//!   release --worker ID [--force] [--dry-run] [--observe D]
//!                                 frees a stopped worker's leases without waiting for expiry
//!   delete-table [--yes] [--force] [--observe D]
//!                                 deletes the lease table, once nothing renews it
//!   repair KEY [--checkpoint TRIM_HORIZON|LATEST|SEQ]
//!                                 rewrites an item that does not decode
//! ```
//!
//!   consumers                     the enhanced fan-out consumers of --stream
//!   deregister-consumer --name NAME | --arn ARN [--yes] [--dry-run]
//!                                 removes one (workers never do); needs no --app
//!
//! The lease table is named after the application unless `--lease-table` names it. AWS
//! settings come from the environment and `~/.aws`, as for every AWS SDK
//! (`AWS_ENDPOINT_URL_DYNAMODB` / `AWS_ENDPOINT_URL_KINESIS` point it at local servers).
//!
//! Whether a lease's owner is alive is seen by watching: the table is read, read again
//! `--observe` later (default about 4.7 s, a renewal interval of the library's defaults and a third),
//! and a lease whose counter moved is *active*. Commands that write refuse leases of live
//! workers unless `--force`; every write is conditional on the lease as read.
//!
//! Output: text for a person; with `--json`, one JSON document on stdout (shapes in
//! docs/admin.md). Errors go to stderr, as text, with their causes.
//!
//! Exit codes:
//! - 0: done;
//! - 1: failure: an AWS error, an item that does not decode, anything unexpected;
//! - 2: usage: bad arguments, a string that is not a sequence number, `--stream` missing or
//!   naming another stream than the table's, `streams` on a single-stream table;
//! - 3: refused: a lease renewed by a live worker, or not watched (`--observe 0`); a finished
//!   lease; leases still renewed at `delete-table`; no confirmation; a repair that would
//!   guess;
//! - 4: not found: the table, the lease, the stream, the shard, the worker's leases, or a
//!   record with that sequence number in the shard;
//! - 5: changed: a lease changed between the read and the write; nothing was written by it.

// A command-line tool: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin;
mod consumers;
mod delete_table;
mod error;
mod lag;
mod leases;
mod observe;
mod position;
mod release;
mod render;
mod repair;
mod set_checkpoint;
mod stream;
mod streams;
mod workers;
mod writes;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use kcl_core::ErrorChain;

use crate::admin::Admin;
use crate::error::Result;

#[derive(Debug, Parser)]
#[command(
    name = "kcl-admin",
    about = "Inspect and operate the lease table of a Kinesis Client Library application"
)]
struct Args {
    /// Application name; the lease table's name unless --lease-table is given.
    #[arg(long, global = true)]
    app: Option<String>,
    /// Lease table name, if not the application name.
    #[arg(long, global = true)]
    lease_table: Option<String>,
    /// The stream (name or ARN): for lag, and to resolve and check checkpoint positions.
    #[arg(long, global = true)]
    stream: Option<String>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every lease with its state (and lag, with --stream), and every item that does
    /// not decode.
    Leases(leases::Args),
    /// Print each worker that owns leases, and whether it renewed them while watched.
    Workers(workers::Args),
    /// Print each stream of a multi-stream application's table: its leases by state, the
    /// workers owning them, and whether any renewed them while watched.
    Streams(streams::Args),
    /// Set a shard's checkpoint, so it resumes elsewhere.
    SetCheckpoint(set_checkpoint::Args),
    /// Release every lease of a worker, so others take them without waiting for expiry.
    Release(release::Args),
    /// Delete the lease table and every checkpoint in it.
    DeleteTable(delete_table::Args),
    /// Rewrite a lease item that does not decode as a lease without an owner, keeping what
    /// decodes.
    Repair(repair::Args),
    /// List the enhanced fan-out consumers registered on --stream.
    Consumers,
    /// Deregister an enhanced fan-out consumer (workers never do).
    DeregisterConsumer(consumers::DeregisterArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // The fan-out consumer commands are about the stream, not the lease table.
    if let Command::Consumers | Command::DeregisterConsumer(_) = &args.command {
        let sdk = aws_config::load_from_env().await;
        let outcome = match (&args.command, args.stream.as_deref()) {
            (Command::Consumers, Some(stream)) => consumers::list(&sdk, stream, args.json).await,
            (Command::Consumers, None) => {
                Err(error::AdminError::StreamRequired { what: "consumers" })
            }
            (Command::DeregisterConsumer(d), stream) => {
                consumers::deregister(&sdk, stream, d, args.json).await
            }
            _ => unreachable!("matched above"),
        };
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kcl-admin: {}", ErrorChain(&e));
                ExitCode::from(e.exit_code())
            }
        };
    }
    let Some(table) = args.lease_table.clone().or_else(|| args.app.clone()) else {
        Args::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--app NAME (or --lease-table NAME) is required",
            )
            .exit()
    };
    let sdk = aws_config::load_from_env().await;
    let admin = Admin::new(&sdk, args.app, table, args.stream, args.json);
    match run(&admin, &args.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kcl-admin: {}", ErrorChain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(admin: &Admin, command: &Command) -> Result<()> {
    match command {
        Command::Leases(args) => leases::run(admin, args).await,
        Command::Workers(args) => workers::run(admin, args).await,
        Command::Streams(args) => streams::run(admin, args).await,
        Command::SetCheckpoint(args) => set_checkpoint::run(admin, args).await,
        Command::Release(args) => release::run(admin, args).await,
        Command::DeleteTable(args) => delete_table::run(admin, args).await,
        Command::Repair(args) => repair::run(admin, args).await,
        Command::Consumers | Command::DeregisterConsumer(_) => {
            unreachable!("run without a lease table in main")
        }
    }
}
