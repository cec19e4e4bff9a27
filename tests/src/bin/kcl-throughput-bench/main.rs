//! kcl-throughput-bench: throughput, CPU per record, put-to-process latency and prefetch
//! memory of the library against a raw GetRecords loop, side by side in one run (issue 11).
//!
//! The Kinesis server is ferrokinesis 0.7.0, embedded in a child process of this binary
//! (`kcl-throughput-bench serve`), so the CPU this process spends is the consumer's own: the
//! server's is not counted. The lease table is DynamoDB Local (started by `scripts/bench`).
//!
//! Throughput phases, each reading the whole stream from `TRIM_HORIZON`, for each payload
//! shape (100-byte records, 10 KB records, KPL aggregates of 100 records of 100 bytes), all
//! with a `GetRecords` limit of about 500 KB a call, so that a reader calling 5 times a
//! second per shard (100,000 records of 100 bytes a second on 4 shards) stays under what
//! ferrokinesis can serve on this machine, as it stays under what Kinesis serves: the paced
//! loop is bound by its pace, not by the server, and the library is measured on keeping it:
//! - (a0) raw, unpaced: one task per shard paging `GetRecords` as fast as the server answers,
//!   no leases, no checkpoints: the server's own ceiling. Real Kinesis throttles such a loop
//!   (5 reads per second per shard);
//! - (a) raw, paced: the same loop with at most one call per shard every 200 ms, as a correct
//!   loop against real Kinesis must (and as the library does, `polling.min_time_between_reads`):
//!   the ceiling the library is measured against;
//! - (b) one `Worker` whose processor checkpoints after every batch;
//! - (c) three workers in this process, sharing the shards;
//! - (d) `kcl-consumer` as a process writing JSON lines to a file (its own CPU).
//!
//! Throughput and CPU are measured over the middle of each phase, from the record that makes
//! 10% of the stream to the one that makes 90%: the steady rate, without lease set-up and the
//! tail of shards finishing one after another. CPU is user + system time from `/proc`.
//!
//! Latency: a producer puts 8 records a second on a caught-up 4-shard stream for 30 s; each
//! reader notes put-to-`process_records` delays: a raw loop calling every 200 ms, a worker
//! with default polling, and one with `idle_time_between_empty_reads` at 200 ms.
//!
//! Memory: a worker on 16 shards whose processor never finishes its first batch, in a child
//! process of its own, for `max_prefetched_batches` 1, 3 and 8: peak RSS against the bound.
//!
//! Usage: `kcl-throughput-bench [RUNS]` (default 3); environment `KCL_BENCH_RECORDS` (records
//! of 100 bytes per run, default 1,000,000; the other shapes hold the same bytes) and
//! `KCL_BENCH_PARTS` (comma-separated: throughput, latency, memory; default all); for
//! profiling one phase, `KCL_BENCH_SHAPES` ("100 B", "10 KB", "KPL 100 × 100 B") and
//! `KCL_BENCH_PHASES` (a0, a, b, c, d, e).

// A benchmark report is printed output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod latency;
mod memory;
mod throughput;

use std::collections::BTreeMap;

use kcl_core::{FanOutConfig, PollingConfig, Retrieval};
use kcl_integration_tests::unique;
use tokio::time::Instant;

use kcl_integration_tests::bench_server::{self as server, Server};
use latency::{Latency, Reader};
use throughput::{Figure, Shape};

/// The pace of the paced raw loop: Kinesis allows 5 `GetRecords` per second per shard, and
/// the library never reads faster (`polling.min_time_between_reads`, 200 ms at least).
const READ_PACE: std::time::Duration = std::time::Duration::from_millis(200);
/// The lowered idle time of the low-latency setting: `min_time_between_reads`, its floor.
const LOW_LATENCY_IDLE: std::time::Duration = std::time::Duration::from_millis(200);

/// The phases' names in `KCL_BENCH_PHASES`.
const PHASE_KEYS: [&str; 6] = ["a0", "a", "b", "c", "d", "e"];
const PHASES: [&str; 6] = [
    "(a0) raw loop, unpaced",
    "(a) raw loop, paced 200 ms",
    "(b) one Worker",
    "(c) three Workers",
    "(d) kcl-consumer process",
    "(e) one Worker, enhanced fan-out",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve"] => server::serve(false),
        ["memory", url, stream, prefetch] => memory::child(
            url,
            stream,
            prefetch.parse().expect("MAX_PREFETCHED_BATCHES"),
        ),
        rest => {
            let runs = rest
                .first()
                .map_or(3, |r| r.parse().expect("RUNS is a number"));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(bench(runs));
        }
    }
}

fn shapes() -> [Shape; 3] {
    let hundred_bytes: usize = std::env::var("KCL_BENCH_RECORDS")
        .ok()
        .map_or(1_000_000, |s| {
            s.parse().expect("KCL_BENCH_RECORDS is a number")
        });
    [
        Shape {
            name: "100 B",
            payload: 100,
            per_aggregate: 1,
            kinesis_records: hundred_bytes,
            per_call: 5_000,
        },
        Shape {
            name: "10 KB",
            payload: 10 * 1024,
            per_aggregate: 1,
            kinesis_records: hundred_bytes / 100,
            per_call: 50,
        },
        Shape {
            name: "KPL 100 × 100 B",
            payload: 100,
            per_aggregate: 100,
            kinesis_records: hundred_bytes / 100,
            per_call: 50,
        },
    ]
}

/// Whether the comma-separated list in `variable` names `name`; all are chosen without it.
fn chosen(variable: &str, name: &str) -> bool {
    std::env::var(variable).map_or(true, |list| list.split(',').any(|p| p == name))
}

fn part(name: &str) -> bool {
    chosen("KCL_BENCH_PARTS", name)
}

async fn bench(runs: usize) {
    let server = Server::start(false);
    eprintln!("ferrokinesis 0.7.0 at {} (child process)", server.url);
    let sdk = kcl_integration_tests::sdk_config().await;
    let config = aws_sdk_kinesis::config::Builder::from(&sdk)
        .endpoint_url(&server.url)
        .build();
    let client = aws_sdk_kinesis::Client::from_conf(config);

    if part("throughput") {
        let results = throughput_runs(&client, &server.url, runs).await;
        report_throughput(&results, runs);
    }
    if part("latency") {
        let results = latency_runs(&client, runs).await;
        report_latency(&results, runs);
    }
    if part("memory") {
        let stream = memory::prepare(&client).await;
        let mut footprints = Vec::new();
        for prefetch in memory::PREFETCH_SETTINGS {
            let footprint = memory::measure(&server.url, &stream, prefetch).await;
            eprintln!("memory: {footprint:?}");
            footprints.push(footprint);
        }
        report_memory(&footprints);
    }
}

async fn throughput_runs(
    client: &aws_sdk_kinesis::Client,
    url: &str,
    runs: usize,
) -> BTreeMap<(usize, usize), Vec<Figure>> {
    let mut results = BTreeMap::new();
    for run in 0..runs {
        for (s, shape) in shapes().into_iter().enumerate() {
            if !chosen("KCL_BENCH_SHAPES", shape.name) {
                continue;
            }
            let stream = unique("throughput");
            let filling = Instant::now();
            throughput::fill(client, &stream, shape, throughput::SHARDS).await;
            eprintln!(
                "run {}: {}: filled {} records in {:.1?}",
                run + 1,
                shape.name,
                shape.kinesis_records,
                filling.elapsed()
            );
            for (p, name) in PHASES.iter().enumerate() {
                if !chosen("KCL_BENCH_PHASES", PHASE_KEYS[p]) {
                    continue;
                }
                let figure = match p {
                    0 => throughput::raw_loop(client, &stream, shape, None).await,
                    1 => throughput::raw_loop(client, &stream, shape, Some(READ_PACE)).await,
                    2 => throughput::workers(client, &stream, shape, 1, Retrieval::Polling).await,
                    3 => throughput::workers(client, &stream, shape, 3, Retrieval::Polling).await,
                    4 => throughput::consumer_process(url, &stream, shape).await,
                    _ => throughput::workers(client, &stream, shape, 1, fan_out()).await,
                };
                eprintln!(
                    "run {}: {}: {name}: {:.0} records/s, {:.2} CPU s per million",
                    run + 1,
                    shape.name,
                    figure.records_per_second,
                    figure.cpu_seconds_per_million
                );
                results.entry((s, p)).or_insert_with(Vec::new).push(figure);
            }
        }
    }
    results
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

fn report_throughput(results: &BTreeMap<(usize, usize), Vec<Figure>>, runs: usize) {
    println!("## Throughput and CPU per record ({runs} runs, median [min – max])\n");
    println!(
        "Kinesis: ferrokinesis 0.7.0 in a child process; leases: DynamoDB Local; {} shards; \
         release build; measured from 10% to 90% of each phase's records.\n",
        throughput::SHARDS
    );
    println!(
        "| records | GetRecords limit | phase | records/s | ratio to (a) | CPU s per million records | CPU ratio to (a) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (s, shape) in shapes().into_iter().enumerate() {
        // A shape or the reference left out by KCL_BENCH_SHAPES or KCL_BENCH_PHASES.
        let Some(raw) = results.get(&(s, 1)) else {
            continue;
        };
        let (raw_rate, _, _) = spread(raw.iter().map(|f| f.records_per_second).collect());
        let (raw_cpu, _, _) = spread(raw.iter().map(|f| f.cpu_seconds_per_million).collect());
        for (p, name) in PHASES.iter().enumerate() {
            let Some(figures) = results.get(&(s, p)) else {
                continue;
            };
            let (rate, rate_min, rate_max) =
                spread(figures.iter().map(|f| f.records_per_second).collect());
            let (cpu, cpu_min, cpu_max) =
                spread(figures.iter().map(|f| f.cpu_seconds_per_million).collect());
            println!(
                "| {} × {} | {} | {name} | {rate:.0} [{rate_min:.0} – {rate_max:.0}] | {:.2} | {cpu:.2} [{cpu_min:.2} – {cpu_max:.2}] | {:.2} |",
                shape.user_records(),
                shape.name,
                shape.per_call,
                rate / raw_rate,
                cpu / raw_cpu
            );
        }
    }
    println!();
}

/// Enhanced fan-out with the defaults (a consumer named after the application).
fn fan_out() -> Retrieval {
    Retrieval::FanOut(FanOutConfig::default())
}

fn latency_readers() -> [(&'static str, Reader); 4] {
    [
        ("raw loop, a call every 200 ms", Reader::RawLoop),
        (
            "Worker, default polling (idle 1.5 s after an empty read)",
            Reader::Worker(PollingConfig::default()),
        ),
        (
            "Worker, idle_time_between_empty_reads 200 ms",
            Reader::Worker(
                PollingConfig::default().with_idle_time_between_empty_reads(LOW_LATENCY_IDLE),
            ),
        ),
        ("Worker, enhanced fan-out", Reader::FanOut),
    ]
}

async fn latency_runs(client: &aws_sdk_kinesis::Client, runs: usize) -> Vec<Vec<Latency>> {
    let mut results = vec![Vec::new(); latency_readers().len()];
    for run in 0..runs {
        for (r, (name, reader)) in latency_readers().into_iter().enumerate() {
            let latency = latency::measure(client, reader).await;
            eprintln!("run {}: latency: {name}: {latency:?}", run + 1);
            results[r].push(latency);
        }
    }
    results
}

fn report_latency(results: &[Vec<Latency>], runs: usize) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!("## Put-to-process latency ({runs} runs, median [min – max])\n");
    let empty: Vec<f64> = results[0]
        .iter()
        .filter_map(|l| l.empty_read.map(ms))
        .collect();
    let (rtt, rtt_min, rtt_max) = spread(empty);
    println!(
        "A GetRecords call that finds nothing takes {rtt:.1} ms [{rtt_min:.1} – {rtt_max:.1}] \
         (median per run of the raw loop's empty calls).\n"
    );
    println!("| reader | p50 ms | p99 ms | records per run |");
    println!("|---|---|---|---|");
    for ((name, _), runs) in latency_readers().iter().zip(results) {
        let (p50, p50_min, p50_max) = spread(runs.iter().map(|l| ms(l.p50)).collect());
        let (p99, p99_min, p99_max) = spread(runs.iter().map(|l| ms(l.p99)).collect());
        let samples = runs.iter().map(|l| l.samples).min().unwrap_or(0);
        println!(
            "| {name} | {p50:.0} [{p50_min:.0} – {p50_max:.0}] | {p99:.0} [{p99_min:.0} – {p99_max:.0}] | ≥ {samples} |"
        );
    }
    println!();
}

fn report_memory(footprints: &[memory::Footprint]) {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!("## Prefetch memory (one run per setting)\n");
    println!(
        "| max_prefetched_batches | shards | records held | payload held MiB | bound MiB | peak RSS MiB (before the worker) | growth MiB | growth − payload MiB | bytes per added record held |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut previous: Option<&memory::Footprint> = None;
    for f in footprints {
        // What one more record held costs, from the step to the previous setting.
        let marginal = previous.map_or("–".to_owned(), |p| {
            let bytes = f.growth() as f64 - p.growth() as f64;
            format!("{:.0}", bytes / (f.records - p.records).max(1) as f64)
        });
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} ({:.1}) | {:.1} | {:.1} | {marginal} |",
            f.max_prefetched_batches,
            f.shards,
            f.records,
            mib(f.payload_bytes as f64),
            mib(f.bound() as f64),
            mib(f.peak as f64),
            mib(f.baseline as f64),
            mib(f.growth() as f64),
            mib(f.growth() as f64 - f.payload_bytes as f64),
        );
        previous = Some(f);
    }
    println!();
}
