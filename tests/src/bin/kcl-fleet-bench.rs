//! kcl-fleet-bench: measures failover, handoff and balancing of worker fleets against the
//! local servers (run it with `scripts/bench`, which starts them).
//!
//! Workers run in this process with the library's real code; a crash is `abort()` of the
//! worker's task (its tasks die at once, nothing is released, renewals stop: to the lease
//! table that is a SIGKILL). A continuous producer keeps every shard busy, and every delivery
//! is timestamped, so "processing again" is the first record a new owner delivers.
//!
//! Prints a Markdown report: medians of several runs, per configuration, side by side.

// A benchmark report is printed output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kcl_core::{InitialPosition, LeaseConfig, LeaseStore, PollingConfig, WorkerConfig};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::proxy::FaultProxy;
use kcl_integration_tests::{
    Event, Put, Recorder, RunningWorker, clients, create_stream, evenly_owned, kinesis,
    lease_store_via, put_records, records, sdk_config, start_worker, start_worker_on, unique,
    wait_for,
};
use tokio::time::Instant;

const SHARDS: i32 = 8;
const PATIENCE: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug)]
enum Setup {
    Defaults,
    Short,
    JavaLike,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Defaults => "kcl-rs defaults (lease 10 s, taker 2 s)",
            Setup::Short => "kcl-rs short lease (lease 3 s, renewal 1 s, taker 1 s)",
            Setup::JavaLike => {
                "Java-KCL-like timing (lease 10 s, taker 20 s, 1 lease stolen per round)"
            }
        }
    }

    fn lease(self) -> LeaseConfig {
        match self {
            Setup::Defaults => LeaseConfig::default(),
            Setup::Short => LeaseConfig::default()
                .with_lease_duration(Duration::from_secs(3))
                .with_renewal_interval(Duration::from_secs(1))
                .with_request_timeout(Duration::from_secs(1))
                .with_taker_interval(Duration::from_secs(1))
                .with_handoff_timeout(Duration::from_secs(3)),
            Setup::JavaLike => LeaseConfig::default()
                .with_taker_interval(Duration::from_secs(20))
                .with_handoff_timeout(Duration::from_secs(30))
                .with_max_leases_to_steal(1),
        }
    }
}

fn config(app: &str, stream: &str, worker: &str, setup: Setup) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_lease(setup.lease())
        .with_polling(PollingConfig::default())
}

/// Puts 2 records per shard (on average) every 100 ms until stopped.
struct Producer {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<Put>>,
}

impl Producer {
    fn start(client: aws_sdk_kinesis::Client, stream: &str) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let (stream, token) = (stream.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut n = 0;
            let per_tick = 2 * SHARDS as usize;
            while !token.is_cancelled() {
                all.extend(put_records(&client, &stream, &records("p", n, per_tick, 101)).await);
                n += per_tick;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            all
        });
        Producer { stop, task }
    }

    async fn stop(self) -> Vec<Put> {
        self.stop.cancel();
        self.task.await.expect("producer")
    }
}

struct Fleet {
    app: String,
    stream: String,
    recorder: Recorder,
    producer: Producer,
}

async fn fleet() -> Fleet {
    let kinesis = kinesis().await;
    let stream = unique("bench");
    create_stream(&kinesis, &stream, SHARDS).await;
    let producer = Producer::start(kinesis, &stream);
    Fleet {
        app: unique("bench-app"),
        stream,
        recorder: Recorder::default(),
        producer,
    }
}

async fn owned_by(app: &str, worker: &str) -> BTreeSet<String> {
    let store = DynamoLeaseStore::new(kcl_integration_tests::dynamodb().await, app);
    store
        .list_leases()
        .await
        .map(|s| s.leases)
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.owner.as_deref() == Some(worker))
        .map(|l| l.lease_key)
        .collect()
}

/// First delivery of each shard in `shards` by `worker` after `since`.
fn first_after(
    recorder: &Recorder,
    worker: &str,
    shards: &BTreeSet<String>,
    since: Instant,
) -> BTreeMap<String, Instant> {
    let mut first = BTreeMap::new();
    for d in recorder.delivered() {
        if d.worker == worker && d.at >= since && shards.contains(&d.shard_id) {
            first.entry(d.shard_id).or_insert(d.at);
        }
    }
    first
}

/// Per shard, how long no worker was ready to process it during a handoff from `from` to
/// `to` after `since`: from `from`'s `shutdown_requested` (its last batch done, its final
/// checkpoint next) to `to`'s `initialize` (iterator in hand, first read next).
fn handoff_pauses(
    recorder: &Recorder,
    from: &str,
    to: &str,
    shards: &BTreeSet<String>,
    since: Instant,
) -> Vec<f64> {
    shards
        .iter()
        .map(|s| {
            let stopped = recorder
                .event_time(from, s, since, |e| *e == Event::ShutdownRequested)
                .expect("the old owner was asked to stop");
            let started = recorder
                .event_time(to, s, since, |e| matches!(e, Event::Initialized(_)))
                .expect("the new owner started");
            (started - stopped).as_secs_f64()
        })
        .collect()
}

fn redelivered(recorder: &Recorder) -> usize {
    let mut seen = BTreeSet::new();
    recorder
        .delivered()
        .into_iter()
        .filter(|d| !seen.insert((d.shard_id.clone(), d.sequence_number.clone())))
        .count()
}

/// Two balanced workers a and b.
async fn two_balanced(f: &Fleet, setup: Setup) -> (RunningWorker, RunningWorker) {
    let a = start_worker(config(&f.app, &f.stream, "a", setup), &f.recorder).await;
    let b = start_worker(config(&f.app, &f.stream, "b", setup), &f.recorder).await;
    wait_for("two balanced workers", PATIENCE, || {
        evenly_owned(&f.app, 2, SHARDS as usize)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    (a, b)
}

/// Crash of `a`: seconds until `b` holds all of `a`'s leases, has started consumers for all
/// of them, and has delivered a record of each.
async fn crash_run(setup: Setup) -> (f64, f64, f64) {
    let f = fleet().await;
    let (a, b) = two_balanced(&f, setup).await;
    let shards = owned_by(&f.app, "a").await;
    let crashed = Instant::now();
    a.task.abort();
    let _ = a.task.await;
    let mut status = b.status.clone();
    while !shards.is_subset(&status.borrow().held_leases) {
        status.changed().await.expect("b runs");
    }
    let taken = crashed.elapsed().as_secs_f64();
    wait_for("b processes a's shards", PATIENCE, || async {
        first_after(&f.recorder, "b", &shards, crashed).len() == shards.len()
    })
    .await;
    let delivered = first_after(&f.recorder, "b", &shards, crashed)
        .values()
        .map(|t| *t - crashed)
        .max()
        .unwrap();
    let started = shards
        .iter()
        .map(|s| {
            f.recorder
                .event_time("b", s, crashed, |e| matches!(e, Event::Initialized(_)))
                .unwrap()
                - crashed
        })
        .max()
        .unwrap();
    b.stop().await.expect("b stops");
    f.producer.stop().await;
    (taken, started.as_secs_f64(), delivered.as_secs_f64())
}

struct HandoffResult {
    /// Per moved shard: no worker ready to process it (see [`handoff_pauses`]).
    pauses: Vec<f64>,
    /// Per moved shard: last delivery by the old owner → first by the new one. Includes the
    /// wait for new records: the first read after the handoff often finds none yet, and the
    /// poller then idles `idle_time_between_empty_reads` (1.5 s) as any caught-up worker does.
    gaps: Vec<f64>,
    /// Shutdown requested → every moved shard processed by the new owner.
    takeover: f64,
    redelivered: usize,
}

/// Graceful shutdown of `a`.
async fn shutdown_run(setup: Setup) -> HandoffResult {
    let f = fleet().await;
    let (a, b) = two_balanced(&f, setup).await;
    let shards = owned_by(&f.app, "a").await;
    let stopping = Instant::now();
    let last = |s: &String| {
        let delivered = f.recorder.delivered();
        delivered
            .iter()
            .filter(|d| d.worker == "a" && d.shard_id == *s)
            .map(|d| d.at)
            .max()
    };
    let stop = tokio::spawn(a.stop());
    wait_for("b processes a's shards", PATIENCE, || async {
        first_after(&f.recorder, "b", &shards, stopping).len() == shards.len()
    })
    .await;
    stop.await.expect("a's task").expect("a stops cleanly");
    let firsts = first_after(&f.recorder, "b", &shards, stopping);
    let pauses = handoff_pauses(&f.recorder, "a", "b", &shards, stopping);
    let gaps = shards
        .iter()
        .map(|s| (firsts[s] - last(s).expect("a processed the shard")).as_secs_f64())
        .collect();
    let takeover = firsts
        .values()
        .map(|t| *t - stopping)
        .max()
        .unwrap()
        .as_secs_f64();
    b.stop().await.expect("b stops");
    f.producer.stop().await;
    HandoffResult {
        pauses,
        gaps,
        takeover,
        redelivered: redelivered(&f.recorder),
    }
}

struct JoinResult {
    seconds: f64,
    rounds: u64,
    pauses: Vec<f64>,
    redelivered: usize,
}

/// `a` holds every shard; `b` joins.
async fn join_run(setup: Setup) -> JoinResult {
    let f = fleet().await;
    let a = start_worker(config(&f.app, &f.stream, "a", setup), &f.recorder).await;
    wait_for("a holds every shard", PATIENCE, || async {
        owned_by(&f.app, "a").await.len() == SHARDS as usize
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let joined = Instant::now();
    let b = start_worker(config(&f.app, &f.stream, "b", setup), &f.recorder).await;
    wait_for("balanced", PATIENCE, || {
        evenly_owned(&f.app, 2, SHARDS as usize)
    })
    .await;
    let seconds = joined.elapsed().as_secs_f64();
    let rounds = b.status.borrow().taking_rounds;
    let moved = owned_by(&f.app, "b").await;
    wait_for("b processes its shards", PATIENCE, || async {
        first_after(&f.recorder, "b", &moved, joined).len() == moved.len()
    })
    .await;
    let pauses = handoff_pauses(&f.recorder, "a", "b", &moved, joined);
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
    f.producer.stop().await;
    JoinResult {
        seconds,
        rounds,
        pauses,
        redelivered: redelivered(&f.recorder),
    }
}

/// DynamoDB requests per lease per hour, in steady state, with and without traffic.
async fn request_rates(measure: Duration) -> Vec<(String, BTreeMap<String, f64>)> {
    let mut out = Vec::new();
    for traffic in [false, true] {
        sdk_config().await;
        let proxy =
            FaultProxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").expect("servers")).await;
        let kinesis = kinesis().await;
        let stream = unique("rates");
        create_stream(&kinesis, &stream, SHARDS).await;
        let producer = traffic.then(|| Producer::start(kinesis.clone(), &stream));
        let app = unique("rates-app");
        let recorder = Recorder::default();
        let mut workers = Vec::new();
        for name in ["a", "b"] {
            let cfg = config(&app, &stream, name, Setup::Defaults);
            let (stream_client, _) = clients(&cfg).await;
            let store: Arc<dyn LeaseStore> = Arc::new(lease_store_via(&proxy.url(), &app, 3).await);
            workers.push(start_worker_on(cfg, &recorder, stream_client, store));
        }
        wait_for("balanced", PATIENCE, || {
            evenly_owned(&app, 2, SHARDS as usize)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        proxy.reset_counts();
        tokio::time::sleep(measure).await;
        let per_lease_hour = 3600.0 / measure.as_secs_f64() / f64::from(SHARDS);
        let rates = proxy
            .requests()
            .into_iter()
            .map(|(op, n)| (op, n as f64 * per_lease_hour))
            .collect();
        for w in workers {
            w.stop().await.expect("stops");
        }
        if let Some(p) = producer {
            p.stop().await;
        }
        out.push((
            if traffic {
                "checkpoint after every batch, records flowing"
            } else {
                "idle stream"
            }
            .to_owned(),
            rates,
        ));
    }
    out
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn fmt(xs: &[f64]) -> String {
    let max = xs.iter().copied().fold(f64::MIN, f64::max);
    let min = xs.iter().copied().fold(f64::MAX, f64::min);
    format!(
        "{:.2} s (min {:.2}, max {:.2}, n={})",
        median(xs.to_vec()),
        min,
        max,
        xs.len()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let measure = Duration::from_secs(
        std::env::var("KCL_BENCH_RATE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    println!("## Fleet benchmark ({runs} runs per figure, {SHARDS} shards, 2 workers)\n");

    println!("### Crash (worker task aborted) → its shards processed again\n");
    println!(
        "| configuration | crash → all its leases taken | → consumers started | → a record of each delivered |\n|---|---|---|---|"
    );
    let mut crash_medians = BTreeMap::new();
    for setup in [Setup::Defaults, Setup::Short, Setup::JavaLike] {
        let (mut taken, mut started, mut delivered) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let (t, s, d) = crash_run(setup).await;
            eprintln!(
                "crash {setup:?} run {i}: taken {t:.2} s, started {s:.2} s, delivered {d:.2} s"
            );
            taken.push(t);
            started.push(s);
            delivered.push(d);
        }
        crash_medians.insert(setup.name(), median(delivered.clone()));
        println!(
            "| {} | {} | {} | {} |",
            setup.name(),
            fmt(&taken),
            fmt(&started),
            fmt(&delivered)
        );
    }
    println!(
        "\nRatio, Java-KCL-like timing / kcl-rs defaults: {:.1}×\n",
        crash_medians[Setup::JavaLike.name()] / crash_medians[Setup::Defaults.name()]
    );

    println!("### Graceful shutdown (SIGTERM) → handoff\n");
    println!(
        "| configuration | pause per shard (old owner's `shutdown_requested` → new owner's `initialize`) | old owner's last record → new owner's first | shutdown → all shards processed elsewhere | records delivered twice |\n|---|---|---|---|---|"
    );
    for setup in [Setup::Defaults, Setup::Short] {
        let (mut pauses, mut gaps, mut takeovers, mut twice) =
            (Vec::new(), Vec::new(), Vec::new(), 0);
        for i in 0..runs {
            let r = shutdown_run(setup).await;
            eprintln!(
                "shutdown {setup:?} run {i}: pauses {:?} gaps {:?} takeover {:.2} twice {}",
                r.pauses, r.gaps, r.takeover, r.redelivered
            );
            pauses.extend(r.pauses);
            gaps.extend(r.gaps);
            takeovers.push(r.takeover);
            twice += r.redelivered;
        }
        println!(
            "| {} | {} | {} | {} | {twice} |",
            setup.name(),
            fmt(&pauses),
            fmt(&gaps),
            fmt(&takeovers)
        );
    }

    println!("\n### A new worker joins a worker holding all {SHARDS} shards\n");
    println!(
        "| configuration | time to balanced | new worker's taking rounds | pause per moved shard | records delivered twice |\n|---|---|---|---|---|"
    );
    for (setup, n) in [(Setup::Defaults, runs), (Setup::JavaLike, runs.min(2))] {
        let (mut secs, mut rounds, mut pauses, mut twice) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for i in 0..n {
            let r = join_run(setup).await;
            eprintln!(
                "join {setup:?} run {i}: {:.2} s, {} rounds, pauses {:?}, twice {}",
                r.seconds, r.rounds, r.pauses, r.redelivered
            );
            secs.push(r.seconds);
            rounds.push(r.rounds as f64);
            pauses.extend(r.pauses);
            twice += r.redelivered;
        }
        println!(
            "| {} | {} | median {} | {} | {twice} |",
            setup.name(),
            fmt(&secs),
            median(rounds),
            fmt(&pauses)
        );
    }

    println!(
        "\n### DynamoDB requests per lease per hour, steady state (defaults, 2 workers, {SHARDS} leases, {} s measured)\n",
        measure.as_secs()
    );
    for (label, rates) in request_rates(measure).await {
        let total: f64 = rates.values().sum();
        let detail: Vec<String> = rates.iter().map(|(op, r)| format!("{op} {r:.0}")).collect();
        println!("- {label}: **{total:.0}** ({})", detail.join(", "));
    }
}
