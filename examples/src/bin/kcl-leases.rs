//! kcl-leases: prints an application's lease table, one lease per line, and repairs a lease
//! item that does not decode.
//!
//! ```text
//! kcl-leases --app NAME [--lease-table NAME] [list]
//! kcl-leases --app NAME [--lease-table NAME] repair LEASE_KEY [--checkpoint POSITION]
//! ```
//!
//! `list` (the default) prints each lease, then one `INVALID <key>: <problem>` line per item
//! that does not decode: workers skip such an item, so its shard is processed by nobody.
//!
//! `repair LEASE_KEY` rewrites such an item as a well-formed lease without an owner, which the
//! next taking round of any worker takes. It keeps every attribute that decodes (checkpoint,
//! parents, hash key range, ...), gives `leaseCounter` a fresh value above any the lease had,
//! and prints each attribute it changed. It refuses, writing nothing, when the checkpoint does
//! not decode (then `--checkpoint TRIM_HORIZON|LATEST|SEQUENCE_NUMBER` says where the shard
//! resumes), when the parents do not decode, and when the item changed while it was repaired.
//! An item that decodes is left alone. Workers log the command for each item they skip.

// A command-line tool: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kcl_core::{Checkpoint, Error, ErrorChain, LeaseStore, SequenceNumber};
use kcl_dynamo_lease::{DynamoLeaseStore, RepairError};

#[derive(Debug, Parser)]
#[command(about = "Print or repair the lease table of a Kinesis Client Library application")]
struct Args {
    /// Application name (the lease table's default name).
    #[arg(long)]
    app: String,
    /// Lease table name, if not the application name.
    #[arg(long)]
    lease_table: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every lease, and every item that does not decode (the default).
    List,
    /// Rewrite a lease item that does not decode as a lease without an owner, keeping what
    /// decodes.
    Repair {
        /// The item's `leaseKey` (the shard id).
        lease_key: String,
        /// Where the shard resumes, when the stored checkpoint does not decode:
        /// TRIM_HORIZON (every record still in the shard, again), LATEST (new records only) or
        /// a sequence number (the records after it).
        #[arg(long, value_parser = parse_checkpoint)]
        checkpoint: Option<Checkpoint>,
    },
}

fn parse_checkpoint(text: &str) -> Result<Checkpoint, String> {
    match text {
        Checkpoint::TRIM_HORIZON => Ok(Checkpoint::TrimHorizon),
        Checkpoint::LATEST => Ok(Checkpoint::Latest),
        other => SequenceNumber::new(other)
            .map(|seq| Checkpoint::at(seq, 0))
            .map_err(|e| format!("expected TRIM_HORIZON, LATEST or a sequence number: {e}")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let sdk = aws_config::load_from_env().await;
    let table = args.lease_table.clone().unwrap_or_else(|| args.app.clone());
    let store = DynamoLeaseStore::new(aws_sdk_dynamodb::Client::new(&sdk), &table);
    match args.command {
        None | Some(Command::List) => list(&store, &args.app).await,
        Some(Command::Repair {
            lease_key,
            checkpoint,
        }) => repair(&store, &lease_key, checkpoint).await,
    }
}

async fn list(store: &DynamoLeaseStore, app: &str) -> ExitCode {
    let scan = match store.list_leases().await {
        Ok(scan) => scan,
        Err(e) => {
            fail(&e);
            return ExitCode::FAILURE;
        }
    };
    let mut leases = scan.leases;
    leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
    println!(
        "{:<24} {:<44} {:>8}  checkpoint",
        "lease", "owner", "counter"
    );
    for lease in leases {
        let parents: Vec<&str> = lease.parent_shard_ids.iter().map(String::as_str).collect();
        println!(
            "{:<24} {:<44} {:>8}  {}{}",
            lease.lease_key,
            lease.owner.as_deref().unwrap_or("-"),
            lease.counter,
            lease.checkpoint,
            if parents.is_empty() {
                String::new()
            } else {
                format!("  (parents: {})", parents.join(", "))
            }
        );
    }
    let table = store.table_name();
    let mut invalid = scan.invalid;
    invalid.sort_by_key(ToString::to_string);
    for item in &invalid {
        match item {
            Error::InvalidLeaseItem {
                lease_key,
                attribute,
                problem,
                ..
            } => {
                println!("INVALID {lease_key}: attribute `{attribute}` {problem}");
                let table_arg = if table == app {
                    String::new()
                } else {
                    format!(" --lease-table {table}")
                };
                eprintln!(
                    "kcl-leases: no worker processes shard {lease_key} until its item is \
                     repaired: kcl-leases --app {app}{table_arg} repair {lease_key}"
                );
            }
            other => println!("INVALID ?: {}", ErrorChain(other)),
        }
    }
    ExitCode::SUCCESS
}

async fn repair(
    store: &DynamoLeaseStore,
    lease_key: &str,
    checkpoint: Option<Checkpoint>,
) -> ExitCode {
    match store.repair_lease(lease_key, checkpoint).await {
        Ok(repair) => {
            println!(
                "repaired lease {lease_key} in table {}:",
                store.table_name()
            );
            for change in &repair.changes {
                println!("  {change}");
            }
            let lease = &repair.lease;
            println!(
                "now: no owner, counter {}, checkpoint {}",
                lease.counter, lease.checkpoint
            );
            ExitCode::SUCCESS
        }
        // The goal is reached: the item decodes.
        Err(e @ RepairError::NothingToRepair { .. }) => {
            println!("{e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            fail(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints `error` with its causes.
fn fail(error: &(dyn std::error::Error + 'static)) {
    eprintln!("kcl-leases: {}", ErrorChain(error));
}
