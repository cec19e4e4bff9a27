//! kcl-reshard: splits, merges or scales a Kinesis stream, for demos and checks.
//!
//! ```text
//! kcl-reshard --stream NAME split [--shard ID]
//! kcl-reshard --stream NAME merge [--shard ID --adjacent ID]
//! kcl-reshard --stream NAME scale --count N
//! ```
//!
//! Without `--shard`, `split` takes the open shard with the widest hash key range and `merge`
//! the first two adjacent open shards. Waits until the stream is active again, then prints
//! the shards.

// A command-line tool: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::types::{ScalingType, StreamStatus};
use clap::{Parser, Subcommand};
use kcl_core::{AwsSdkError, KinesisStreamClient, Shard, StreamClient};
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Split, merge or scale a Kinesis stream")]
struct Args {
    /// Stream name.
    #[arg(long)]
    stream: String,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Split a shard in two at the middle of its hash key range.
    Split {
        /// The shard (default: the open shard with the widest range).
        #[arg(long)]
        shard: Option<String>,
    },
    /// Merge two adjacent shards.
    Merge {
        /// The first shard (default: the first two adjacent open shards).
        #[arg(long, requires = "adjacent")]
        shard: Option<String>,
        /// The shard adjacent to it.
        #[arg(long, requires = "shard")]
        adjacent: Option<String>,
    },
    /// Set the number of open shards (uniform scaling: at most double or half).
    Scale {
        /// Target number of open shards.
        #[arg(long)]
        count: i32,
    },
}

type Failure = Box<dyn std::error::Error>;

async fn open_shards(client: &Client, stream: &str) -> Result<Vec<Shard>, Failure> {
    let mut open: Vec<Shard> = KinesisStreamClient::new(client.clone(), stream)
        .list_shards()
        .await?
        .into_iter()
        .filter(Shard::is_open)
        .collect();
    open.sort_by_key(|s| s.hash_key_range.starting_hash_key);
    Ok(open)
}

async fn wait_active(client: &Client, stream: &str) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(AwsSdkError::new)?;
        if summary
            .stream_description_summary()
            .map(|d| d.stream_status())
            == Some(&StreamStatus::Active)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("stream `{stream}` did not become active again").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let sdk = aws_config::load_from_env().await;
    let client = Client::new(&sdk);
    let stream = args.stream.as_str();
    let open = open_shards(&client, stream).await?;
    match args.action {
        Action::Split { shard } => {
            let widest =
                |s: &&Shard| s.hash_key_range.ending_hash_key - s.hash_key_range.starting_hash_key;
            let target = match shard {
                Some(id) => open
                    .iter()
                    .find(|s| s.shard_id == id)
                    .ok_or(format!("no open shard `{id}`"))?,
                None => open.iter().max_by_key(widest).ok_or("no open shard")?,
            };
            let range = target.hash_key_range;
            let middle =
                range.starting_hash_key + (range.ending_hash_key - range.starting_hash_key) / 2 + 1;
            client
                .split_shard()
                .stream_name(stream)
                .shard_to_split(&target.shard_id)
                .new_starting_hash_key(middle.to_string())
                .send()
                .await
                .map_err(AwsSdkError::new)?;
            println!("split {}", target.shard_id);
        }
        Action::Merge { shard, adjacent } => {
            let (a, b) = match (shard, adjacent) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    let pair = open
                        .windows(2)
                        .find(|w| {
                            w[0].hash_key_range.ending_hash_key + 1
                                == w[1].hash_key_range.starting_hash_key
                        })
                        .ok_or("no two adjacent open shards")?;
                    (pair[0].shard_id.clone(), pair[1].shard_id.clone())
                }
            };
            client
                .merge_shards()
                .stream_name(stream)
                .shard_to_merge(&a)
                .adjacent_shard_to_merge(&b)
                .send()
                .await
                .map_err(AwsSdkError::new)?;
            println!("merged {a} and {b}");
        }
        Action::Scale { count } => {
            client
                .update_shard_count()
                .stream_name(stream)
                .target_shard_count(count)
                .scaling_type(ScalingType::UniformScaling)
                .send()
                .await
                .map_err(AwsSdkError::new)?;
            println!("scaled from {} to {count} open shards", open.len());
        }
    }
    wait_active(&client, stream).await?;
    for shard in KinesisStreamClient::new(client, stream)
        .list_shards()
        .await?
    {
        let parents = shard.parent_shard_ids();
        println!(
            "  {} {}{}",
            shard.shard_id,
            if shard.is_open() { "open" } else { "closed" },
            if parents.is_empty() {
                String::new()
            } else {
                format!(" (from {})", parents.join(" + "))
            }
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    kcl_examples::init_logging();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            kcl_examples::log_failure("kcl-reshard", e.as_ref());
            ExitCode::FAILURE
        }
    }
}
