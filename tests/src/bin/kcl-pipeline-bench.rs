//! kcl-pipeline-bench: lines per second through `kcl-agent` (with and without KPL
//! aggregation) and through `kcl-archive`, side by side in one run (issue 16).
//!
//! One web access log of `KCL_BENCH_LINES` JSON lines (default 100,000, about 330 bytes each,
//! 200 clients) is written once by `scripts/lib/access_log.py`. The Kinesis servers are two
//! ferrokinesis 0.7.0 children of this binary: one unlimited, one enforcing Kinesis's write
//! limits per shard (1,000 records and 1 MiB a second, answered with
//! `ProvisionedThroughputExceededException` entries that the agent retries). Each run:
//! - **agent**: `kcl-agent --once --from start --partition-key field:remote_addr` ships the
//!   whole log into a fresh 4-shard stream, without and with `--aggregate`, on each server,
//!   with `--max-batch-bytes 1MB` (ferrokinesis refuses request bodies over 2 MB); lines/s is
//!   lines over the agent's wall time (its process start to exit, start-up included);
//! - **archive**: `kcl-archive run` (one worker, leases in DynamoDB Local) drains a stream the
//!   agent filled into a local directory and into s3rver (`AWS_ENDPOINT_URL_S3`), and drains
//!   the aggregated stream into the directory; lines/s and CPU per line are measured from the
//!   worker's first lease to the moment its logs account for every line stored, and the
//!   directory archive is read back to check it holds each line once.
//!
//! Usage: `kcl-pipeline-bench [RUNS]` (default 3), from the workspace root, with the release
//! binaries of `kcl-examples` built and DynamoDB Local and s3rver running (`scripts/bench
//! pipeline` does all that). The report goes to stdout, progress to stderr.

// A benchmark report is printed output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kcl_examples::archive::DirStore;
use kcl_examples::archive::read::read_archive;
use kcl_integration_tests::bench_server::{Process, Server, serve};
use kcl_integration_tests::unique;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

/// Shards of every stream.
const SHARDS: i32 = 4;
/// Distinct clients (partition keys) in the log.
const CLIENTS: usize = 200;
/// The agent's `--max-batch-bytes`: what ferrokinesis accepts in one call.
const MAX_BATCH_BYTES: &str = "1MB";
/// How long one archive phase may take before the bench gives up on it.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve"] => serve(false),
        ["serve", "--enforce-limits"] => serve(true),
        rest => {
            let runs = rest
                .first()
                .map_or(3, |r| r.parse().expect("RUNS is a number"));
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(bench(runs));
        }
    }
}

/// A sibling binary of this one (the release build of `kcl-examples`).
fn binary(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .expect("own path")
        .with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release -p kcl-examples --bins` (scripts/bench \
         pipeline does)",
        path.display()
    );
    path
}

/// A Kinesis server and a client for it.
struct Kinesis {
    name: &'static str,
    server: Server,
    client: aws_sdk_kinesis::Client,
}

impl Kinesis {
    async fn start(name: &'static str, enforce_limits: bool, sdk: &aws_config::SdkConfig) -> Self {
        let server = Server::start(enforce_limits);
        let config = aws_sdk_kinesis::config::Builder::from(sdk)
            .endpoint_url(&server.url)
            .build();
        Kinesis {
            name,
            server,
            client: aws_sdk_kinesis::Client::from_conf(config),
        }
    }

    async fn new_stream(&self, prefix: &str) -> String {
        let stream = unique(prefix);
        kcl_integration_tests::create_stream(&self.client, &stream, SHARDS).await;
        stream
    }
}

/// What one agent run reported.
#[derive(Debug, Clone, Copy)]
struct AgentFigure {
    lines_per_second: f64,
    put_calls: f64,
    records: f64,
    entries_retried: f64,
}

/// What one archive run measured.
#[derive(Debug, Clone, Copy)]
struct ArchiveFigure {
    lines_per_second: f64,
    cpu_microseconds_per_line: f64,
    objects: f64,
}

async fn bench(runs: usize) {
    let sdk = kcl_integration_tests::sdk_config().await;
    assert!(
        std::env::var_os("AWS_ENDPOINT_URL_S3").is_some(),
        "AWS_ENDPOINT_URL_S3 is not set: run the bench with scripts/bench pipeline"
    );
    let lines: usize = std::env::var("KCL_BENCH_LINES")
        .ok()
        .map_or(100_000, |s| s.parse().expect("KCL_BENCH_LINES is a number"));
    let work = std::env::temp_dir().join(unique("kcl-pipeline-bench"));
    std::fs::create_dir_all(&work).unwrap();
    let log = work.join("access.log");
    write_log(&log, lines).await;
    let bytes = std::fs::metadata(&log).unwrap().len();
    eprintln!(
        "log: {lines} lines, {:.1} MB, {:.0} bytes a line",
        bytes as f64 / 1e6,
        bytes as f64 / lines as f64
    );
    let unlimited = Kinesis::start("ferrokinesis, no limits", false, &sdk).await;
    let limited = Kinesis::start("ferrokinesis, Kinesis write limits", true, &sdk).await;
    let bucket = unique("pipeline-bench");
    kcl_examples::archive::S3Store::new(&sdk, &bucket, true)
        .create_bucket()
        .await
        .expect("create the bucket");

    let mut agent: BTreeMap<(&str, bool), Vec<AgentFigure>> = BTreeMap::new();
    let mut archive: BTreeMap<&str, Vec<ArchiveFigure>> = BTreeMap::new();
    for run in 1..=runs {
        let mut filled = BTreeMap::new();
        for kinesis in [&unlimited, &limited] {
            for aggregate in [false, true] {
                let stream = kinesis.new_stream("agent").await;
                let figure = run_agent(&kinesis.server.url, &stream, &log, &work, aggregate).await;
                eprintln!(
                    "run {run}: agent, {}, aggregate {aggregate}: {figure:?}",
                    kinesis.name
                );
                agent
                    .entry((kinesis.name, aggregate))
                    .or_default()
                    .push(figure);
                if kinesis.name == unlimited.name {
                    filled.insert(aggregate, stream);
                }
            }
        }
        let phases = [
            (
                "plain records → directory",
                false,
                Some(work.join(unique("dir"))),
            ),
            ("plain records → s3rver", false, None),
            (
                "KPL aggregates → directory",
                true,
                Some(work.join(unique("dir"))),
            ),
        ];
        for (name, aggregated, dir) in phases {
            let stream = &filled[&aggregated];
            let figure = run_archive(
                &unlimited.server.url,
                stream,
                lines,
                dir.as_deref(),
                &bucket,
            )
            .await;
            eprintln!("run {run}: archive, {name}: {figure:?}");
            if let Some(dir) = &dir {
                check_archive(dir, lines).await;
                std::fs::remove_dir_all(dir).ok();
            }
            archive.entry(name).or_default().push(figure);
        }
    }
    report(runs, lines, bytes, &agent, &archive);
    std::fs::remove_dir_all(&work).ok();
}

async fn write_log(path: &Path, lines: usize) {
    let status = Command::new("python3")
        .arg("scripts/lib/access_log.py")
        .arg(path)
        .args([
            "--lines",
            &lines.to_string(),
            "--clients",
            &CLIENTS.to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run scripts/lib/access_log.py (from the workspace root)");
    assert!(status.success(), "access_log.py: {status}");
}

async fn run_agent(
    url: &str,
    stream: &str,
    log: &Path,
    work: &Path,
    aggregate: bool,
) -> AgentFigure {
    let started = Instant::now();
    let output = Command::new(binary("kcl-agent"))
        .args(["--stream", stream, "--from", "start", "--once"])
        .args(["--partition-key", "field:remote_addr"])
        // ferrokinesis refuses request bodies over 2 MB, and base64 makes 1 MiB of data
        // about 1.4 MB of JSON (Kinesis takes 5 MiB of data a call).
        .args(["--max-batch-bytes", MAX_BATCH_BYTES])
        .args(aggregate.then_some("--aggregate"))
        .arg("--file")
        .arg(log)
        .arg("--state-file")
        .arg(work.join(unique("state")))
        .env("AWS_ENDPOINT_URL_KINESIS", url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run kcl-agent");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "kcl-agent: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("kcl-agent's summary: {e}: {:?}", output.stdout));
    let number = |field: &str| {
        summary[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} in {summary}"))
    };
    AgentFigure {
        lines_per_second: number("lines") / seconds,
        put_calls: number("put_calls"),
        records: number("records"),
        entries_retried: number("entries_retried"),
    }
}

/// Runs one archive worker until its logs account for `lines` stored lines.
async fn run_archive(
    url: &str,
    stream: &str,
    lines: usize,
    dir: Option<&Path>,
    bucket: &str,
) -> ArchiveFigure {
    let mut command = Command::new(binary("kcl-archive"));
    command
        .args([
            "run",
            "--app",
            &unique("pipeline-bench"),
            "--stream",
            stream,
        ])
        .args([
            "--flush-age",
            "1s",
            "--idle-time-between-empty-reads",
            "200ms",
        ])
        .env("AWS_ENDPOINT_URL_KINESIS", url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match dir {
        Some(dir) => command.arg("--dir").arg(dir),
        None => command.args(["--bucket", bucket, "--prefix", &unique("run")]),
    };
    let mut child = command.spawn().expect("start kcl-archive");
    let process = Process::Child(child.id().expect("running"));
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut start, mut stored, mut objects) = (None, 0usize, 0usize);
    let deadline = Instant::now() + PHASE_LIMIT;
    while stored < lines {
        let line = tokio::time::timeout_at(deadline, log.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!("kcl-archive: {stored} of {lines} lines after {PHASE_LIMIT:?}")
            })
            .expect("kcl-archive's log")
            .unwrap_or_else(|| panic!("kcl-archive exited with {stored} of {lines} lines stored"));
        if start.is_none() && line.contains("took lease") {
            start = Some((Instant::now(), process.cpu_time()));
        }
        if line.contains("stored an object") {
            objects += 1;
            stored += field(&line, "records");
        }
    }
    let (end, cpu_end) = (Instant::now(), process.cpu_time());
    let (start, cpu_start) = start.expect("a lease was taken before objects were stored");
    let seconds = (end - start).as_secs_f64();
    // Drain the log, and stop the worker as an operator would.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().expect("running").to_string()])
        .status();
    let status = child.wait().await.expect("kcl-archive exits");
    assert!(status.success(), "kcl-archive after SIGTERM: {status}");
    ArchiveFigure {
        lines_per_second: lines as f64 / seconds,
        cpu_microseconds_per_line: (cpu_end - cpu_start).as_secs_f64() * 1e6 / lines as f64,
        objects: objects as f64,
    }
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> usize {
    let pattern = format!("{name}=");
    line.find(&pattern)
        .and_then(|at| {
            line[at + pattern.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

/// The directory archive holds every line of the log once.
async fn check_archive(dir: &Path, lines: usize) {
    let objects = read_archive(&DirStore::new(dir), "")
        .await
        .expect("read the archive");
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for object in &objects {
        for line in &object.lines {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            seen.insert(value["n"].as_u64().expect("n"));
            total += 1;
        }
    }
    assert_eq!(
        (seen.len(), total),
        (lines, lines),
        "every line archived once"
    );
}

/// (median, min, max).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn report(
    runs: usize,
    lines: usize,
    bytes: u64,
    agent: &BTreeMap<(&str, bool), Vec<AgentFigure>>,
    archive: &BTreeMap<&str, Vec<ArchiveFigure>>,
) {
    println!("## Lines per second through the pipeline ({runs} runs, median [min – max])\n");
    println!(
        "{lines} access-log lines ({:.0} bytes a line, {CLIENTS} clients as partition keys), \
         {SHARDS} shards, release build.\n",
        bytes as f64 / lines as f64
    );
    println!("### kcl-agent --once (whole process, start-up included)\n");
    println!(
        "| Kinesis | aggregation | lines/s | ratio to no aggregation (per run) | PutRecords calls | Kinesis records | entries retried |"
    );
    println!("|---|---|---|---|---|---|---|");
    for ((server, aggregate), figures) in agent {
        let (rate, min, max) = spread(figures.iter().map(|f| f.lines_per_second).collect());
        // Side by side: each run's ratio to the same run's figure without aggregation.
        let plain = &agent[&(*server, false)];
        let (ratio, ratio_min, ratio_max) = spread(
            figures
                .iter()
                .zip(plain)
                .map(|(f, p)| f.lines_per_second / p.lines_per_second)
                .collect(),
        );
        let calls = spread(figures.iter().map(|f| f.put_calls).collect()).0;
        let records = spread(figures.iter().map(|f| f.records).collect()).0;
        let retried = spread(figures.iter().map(|f| f.entries_retried).collect()).0;
        println!(
            "| {server} | {} | {rate:.0} [{min:.0} – {max:.0}] | {ratio:.2} [{ratio_min:.2} – {ratio_max:.2}] | {calls:.0} | {records:.0} | {retried:.0} |",
            if *aggregate { "KPL" } else { "none" },
        );
    }
    println!("\n### kcl-archive run (one worker, from its first lease to the last line stored)\n");
    println!("| stream → store | lines/s | CPU µs per line | objects |");
    println!("|---|---|---|---|");
    for (name, figures) in archive {
        let (rate, min, max) = spread(figures.iter().map(|f| f.lines_per_second).collect());
        let (cpu, cpu_min, cpu_max) = spread(
            figures
                .iter()
                .map(|f| f.cpu_microseconds_per_line)
                .collect(),
        );
        let objects = spread(figures.iter().map(|f| f.objects).collect()).0;
        println!(
            "| {name} | {rate:.0} [{min:.0} – {max:.0}] | {cpu:.1} [{cpu_min:.1} – {cpu_max:.1}] | {objects:.0} |"
        );
    }
}
