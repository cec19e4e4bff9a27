//! kcl-leases: prints an application's lease table, one lease per line.
//!
//! ```text
//! kcl-leases --app NAME [--lease-table NAME]
//! ```

// A command-line tool: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::Parser;
use kcl_core::{ErrorChain, LeaseStore};
use kcl_dynamo_lease::DynamoLeaseStore;

#[derive(Debug, Parser)]
#[command(about = "Print the lease table of a Kinesis Client Library application")]
struct Args {
    /// Application name (the lease table's default name).
    #[arg(long)]
    app: String,
    /// Lease table name, if not the application name.
    #[arg(long)]
    lease_table: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let sdk = aws_config::load_from_env().await;
    let table = args.lease_table.unwrap_or(args.app);
    let store = DynamoLeaseStore::new(aws_sdk_dynamodb::Client::new(&sdk), &table);
    let scan = match store.list_leases().await {
        Ok(scan) => scan,
        Err(e) => {
            eprintln!("kcl-leases: {}", ErrorChain(&e));
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
    for invalid in scan.invalid {
        eprintln!("skipped: {}", ErrorChain(&invalid));
    }
    ExitCode::SUCCESS
}
