//! kcl-producer: puts records with unique ids into a Kinesis stream, for demos and checks.
//!
//! ```text
//! kcl-producer --stream NAME [--create --shards N] --count N [--rate R] [--keys K] [--run-id ID]
//! ```
//!
//! Record `i` has partition key `key-{i % K}` and the JSON payload
//! `{"id":"{run_id}-{i:06}","key":"key-…","key_seq":i / K}`: `id` is unique, `key_seq` counts
//! the records of each key, so a consumer can check per-key order. Ids go to stdout, one per
//! line, in the order they were put.

// A command-line tool: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use clap::Parser;
use kcl_core::AwsSdkError;
use tokio::time::Instant;
use tracing::{info, warn};

/// PutRecords takes at most 500 records per call.
const MAX_RECORDS_PER_PUT: usize = 500;

#[derive(Debug, Parser)]
#[command(about = "Put records with unique ids into a Kinesis stream")]
struct Args {
    /// Stream name.
    #[arg(long)]
    stream: String,
    /// Create the stream if it does not exist.
    #[arg(long)]
    create: bool,
    /// Shards of a created stream.
    #[arg(long, default_value_t = 4)]
    shards: i32,
    /// Records to put.
    #[arg(long)]
    count: usize,
    /// Records per second (default: as fast as the stream takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Distinct partition keys.
    #[arg(long, default_value_t = 64)]
    keys: usize,
    /// Prefix of the record ids (default: random).
    #[arg(long)]
    run_id: Option<String>,
    /// Index of the first record, to continue an earlier run's numbering.
    #[arg(long, default_value_t = 0)]
    start: usize,
}

fn record(run_id: &str, i: usize, keys: usize) -> (String, String, String) {
    let key = format!("key-{}", i % keys);
    let id = format!("{run_id}-{i:06}");
    let data = serde_json::json!({ "id": id, "key": key, "key_seq": i / keys }).to_string();
    (id, key, data)
}

async fn ensure_stream(
    client: &Client,
    stream: &str,
    create: bool,
    shards: i32,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut created = false;
    loop {
        match client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
        {
            Ok(out) => {
                let status = out
                    .stream_description_summary()
                    .map(|d| d.stream_status().clone());
                if status == Some(StreamStatus::Active) {
                    return Ok(());
                }
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                if !create {
                    return Err(format!(
                        "stream `{stream}` does not exist (pass --create to create it)"
                    )
                    .into());
                }
                if !created {
                    client
                        .create_stream()
                        .stream_name(stream)
                        .shard_count(shards)
                        .send()
                        .await
                        .map_err(AwsSdkError::new)?;
                    info!(stream, shards, "created stream");
                    created = true;
                }
            }
            Err(e) => return Err(AwsSdkError::new(e).into()),
        }
        if Instant::now() > deadline {
            return Err(format!("stream `{stream}` did not become active").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Puts one batch, retrying the entries Kinesis rejected (throttling) until all are in.
async fn put_batch(
    client: &Client,
    stream: &str,
    mut entries: Vec<(String, PutRecordsRequestEntry)>,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut put_ids = Vec::with_capacity(entries.len());
    let mut delay = Duration::from_millis(100);
    while !entries.is_empty() {
        let request = entries.iter().map(|(_, e)| e.clone()).collect();
        let output = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(request))
            .send()
            .await
            .map_err(AwsSdkError::new)?;
        let mut failed = Vec::new();
        for ((id, entry), result) in entries.into_iter().zip(output.records()) {
            if result.error_code().is_some() {
                failed.push((id, entry));
            } else {
                put_ids.push(id);
            }
        }
        if !failed.is_empty() {
            warn!(
                failed = failed.len(),
                ?delay,
                "records rejected; retrying them"
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        entries = failed;
    }
    Ok(put_ids)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    let sdk = aws_config::load_from_env().await;
    let client = Client::new(&sdk);
    ensure_stream(&client, &args.stream, args.create, args.shards).await?;
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_owned());
    let batch_size = match args.rate {
        Some(rate) if rate <= 0.0 => return Err("--rate must be above 0".into()),
        Some(rate) => (rate.ceil() as usize).clamp(1, MAX_RECORDS_PER_PUT),
        None => MAX_RECORDS_PER_PUT,
    };
    let started = Instant::now();
    let mut sent = 0usize;
    let end = args.start + args.count;
    let mut next = args.start;
    while next < end {
        let upto = (next + batch_size).min(end);
        let entries = (next..upto)
            .map(|i| {
                let (id, key, data) = record(&run_id, i, args.keys);
                let entry = PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(data))
                    .build()
                    .expect("partition key and data are set");
                (id, entry)
            })
            .collect();
        for id in put_batch(&client, &args.stream, entries).await? {
            println!("{id}");
        }
        sent += upto - next;
        next = upto;
        if let Some(rate) = args.rate {
            // Pace to `rate` records per second since the start.
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
    }
    info!(records = sent, run_id, elapsed = ?started.elapsed(), "done");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    kcl_examples::init_logging();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            kcl_examples::log_failure("kcl-producer", e.as_ref());
            ExitCode::FAILURE
        }
    }
}
