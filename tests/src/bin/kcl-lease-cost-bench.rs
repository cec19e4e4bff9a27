//! kcl-lease-cost-bench: what a fleet's lease table costs in steady state, in DynamoDB's own
//! consumed-capacity figures (run it with `scripts/bench lease-cost`, which starts the
//! servers).
//!
//! Each size (`LEASES x WORKERS`) is a fresh lease table on DynamoDB Local and a fresh
//! in-memory stream of LEASES open shards (`kcl_core::testing::InMemoryStream`): the lease
//! table's calls are what is measured, and an emulator serving a thousand idle shards' reads
//! would take the CPU DynamoDB Local needs on a small machine. Workers run in this process
//! with default settings and idle processors. Once every lease is held and the fleet is
//! balanced, the workers' own counts (`WorkerStatus::lease_table_usage`, DynamoDB's
//! `ReturnConsumedCapacity=TOTAL`) are read, again after the window, and the difference is
//! scaled to an hour.
//!
//! Prints a Markdown report to stdout; progress to stderr.

// A benchmark report is printed output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kcl_core::testing::InMemoryStream;
use kcl_core::{
    CancellationToken, InitialPosition, LeaseConfig, LeaseStore, OperationUsage, StreamClient,
    Watchers, Worker, WorkerConfig, WorkerStatus, is_watcher_slot,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{Idle, dynamodb, unique, wait_for};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// On-demand prices in us-east-1 (since November 2024), dollars per million request units.
const READ_PRICE_PER_MILLION: f64 = 0.125;
const WRITE_PRICE_PER_MILLION: f64 = 0.625;
const SECONDS_PER_HOUR: f64 = 3600.0;
/// How often the lease table is read to time the pauses of a shutdown.
const PAUSE_READ_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait for a fleet to hold every lease, balanced.
const PATIENCE: Duration = Duration::from_secs(600);

struct Running {
    id: String,
    shutdown: CancellationToken,
    task: JoinHandle<kcl_core::Result<()>>,
    status: watch::Receiver<WorkerStatus>,
}

/// One size's result.
struct Measured {
    label: String,
    leases: usize,
    workers: usize,
    /// Seconds from the first worker's start to every lease held and the fleet balanced.
    to_balanced: f64,
    /// Seconds measured.
    window: f64,
    /// Every worker's usage over the window, summed, by operation.
    usage: BTreeMap<&'static str, OperationUsage>,
    leases_lost: u64,
    /// Resident memory the workers added, per lease held (one-worker sizes only).
    bytes_per_lease: Option<f64>,
    /// Lease moves, for fleets of several workers.
    moves: Option<Moves>,
}

fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux pages are 4 KiB on the machines this runs on.
    Some(pages * 4096.0)
}

fn usage_of(workers: &[Running]) -> BTreeMap<&'static str, OperationUsage> {
    let mut sum: BTreeMap<&'static str, OperationUsage> = BTreeMap::new();
    for worker in workers {
        for (op, usage) in &worker.status.borrow().lease_table_usage {
            *sum.entry(op).or_default() += *usage;
        }
    }
    sum
}

fn minus(
    after: &BTreeMap<&'static str, OperationUsage>,
    before: &BTreeMap<&'static str, OperationUsage>,
) -> BTreeMap<&'static str, OperationUsage> {
    after
        .iter()
        .map(|(op, a)| (*op, a.since(&before.get(op).copied().unwrap_or_default())))
        .collect()
}

fn balanced(statuses: &[WorkerStatus], leases: usize) -> bool {
    let held: Vec<usize> = statuses.iter().map(|s| s.held_leases.len()).collect();
    let (min, max) = (held.iter().min(), held.iter().max());
    held.iter().sum::<usize>() == leases && matches!((min, max), (Some(a), Some(b)) if b - a <= 1)
}

async fn measure(size: Size, window: Duration) -> Measured {
    let (leases, workers) = (size.leases, size.workers);
    let app = unique("cost");
    let stream: Arc<dyn StreamClient> = Arc::new(InMemoryStream::new(
        &app,
        u32::try_from(leases).expect("shard count fits"),
    ));
    let dynamodb = dynamodb().await;
    let rss_before = resident_bytes();
    let started = Instant::now();
    let spawn = |i: usize| {
        let id = format!("w{i}");
        let config = WorkerConfig::new(&app, &app)
            .with_worker_id(&id)
            .with_initial_position(InitialPosition::TrimHorizon)
            .with_lease(size.lease_config());
        let store: Arc<dyn LeaseStore> = Arc::new(DynamoLeaseStore::new(dynamodb.clone(), &app));
        let factory = |_: &str| Idle;
        let worker = Worker::new(config, stream.clone(), store, factory).expect("valid config");
        let status = worker.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        Running {
            id,
            shutdown,
            task,
            status,
        }
    };
    let mut fleet: Vec<Running> = (0..workers).map(spawn).collect();
    wait_for("every lease held, balanced", PATIENCE, || {
        let now = statuses(&fleet);
        async move { balanced(&now, leases) }
    })
    .await;
    let to_balanced = started.elapsed().as_secs_f64();
    eprintln!("{leases} x {workers}: balanced after {to_balanced:.1} s");
    // Creating the leases and taking them is start-up, not steady state.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let bytes_per_lease = match (workers, rss_before, resident_bytes()) {
        (1, Some(before), Some(after)) => Some((after - before) / leases as f64),
        _ => None,
    };
    let before = usage_of(&fleet);
    let lost_before: u64 = statuses(&fleet).iter().map(|s| s.leases_lost).sum();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let after = usage_of(&fleet);
    let window = t0.elapsed().as_secs_f64();
    let still = statuses(&fleet);
    let leases_lost = still.iter().map(|s| s.leases_lost).sum::<u64>() - lost_before;
    assert!(
        balanced(&still, leases),
        "{leases} x {workers}: the fleet lost its balance while measured"
    );
    let moves = if workers > 1 {
        let store = DynamoLeaseStore::new(dynamodb.clone(), &app);
        Some(moves(&mut fleet, leases, &store, || spawn(workers)).await)
    } else {
        None
    };
    for worker in &fleet {
        worker.shutdown.cancel();
    }
    for worker in fleet {
        worker
            .task
            .await
            .expect("worker did not panic")
            .expect("worker stopped cleanly");
    }
    Measured {
        label: size.label(),
        leases,
        workers,
        to_balanced,
        window,
        usage: minus(&after, &before),
        leases_lost,
        bytes_per_lease,
        moves,
    }
}

fn statuses(fleet: &[Running]) -> Vec<WorkerStatus> {
    fleet.iter().map(|w| w.status.borrow().clone()).collect()
}

/// Seconds until the workers hold every lease between them.
async fn until_all_held(fleet: &[Running], leases: usize, what: &str) -> f64 {
    let started = Instant::now();
    wait_for(what, PATIENCE, || {
        let now = statuses(fleet);
        async move { now.iter().map(|s| s.held_leases.len()).sum::<usize>() == leases }
    })
    .await;
    started.elapsed().as_secs_f64()
}

/// How leases move in a balanced fleet: a worker joins, one crashes, one shuts down.
struct Moves {
    /// Seconds from a new worker's start to the fleet balanced, and its taking rounds then.
    join: (f64, u64),
    /// Seconds from a worker's crash (its task aborted: nothing released, renewals stop) to
    /// the others holding every lease.
    crash: f64,
    /// Seconds from a worker's graceful shutdown to the others holding every lease.
    shutdown: f64,
    /// How long its leases went unowned in that shutdown.
    pause: Pause,
    /// Both watchers stopping at once, in a fleet that watches: seconds until the others hold
    /// every lease, and their leases' pauses.
    both_watchers: Option<(f64, Pause)>,
}

/// How long the leases of stopping workers went unowned, from the first read of the table
/// that found one released to the first that found another worker holding it.
#[derive(Clone, Copy)]
struct Pause {
    /// Seconds, the longest of the leases handed over.
    longest: f64,
    /// Seconds, their median (leases whose handoff fell between two reads count as 0).
    median: f64,
    /// Seconds between two reads of the table on average: the figures' resolution.
    read: f64,
}

impl std::fmt::Display for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} s, median {:.2} s ({:.0} ms)",
            self.longest,
            self.median,
            self.read * 1000.0
        )
    }
}

/// While the `stopping` workers shut down, until `done`: how long their leases went unowned
/// (the watcher slots left out: a slot given back waits for a member's slot check).
async fn pauses(store: &dyn LeaseStore, stopping: &[String], done: impl Fn() -> bool) -> Pause {
    let mut unowned_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut handed: BTreeMap<String, Duration> = BTreeMap::new();
    let (mut reads, begun) = (0u32, Instant::now());
    let mut last = false;
    let mut started = Instant::now();
    while !last {
        last = done();
        // Spaced out: back to back, 1,000-item Scans would load DynamoDB Local and slow the
        // very handoffs measured.
        tokio::time::sleep_until(started + PAUSE_READ_INTERVAL).await;
        started = Instant::now();
        let scan = store.list_leases().await.expect("the lease table reads");
        let now = Instant::now();
        reads += 1;
        for lease in scan
            .leases
            .into_iter()
            .filter(|l| !is_watcher_slot(&l.lease_key))
        {
            match lease.owner.as_deref() {
                None => {
                    unowned_since.entry(lease.lease_key).or_insert(now);
                }
                Some(owner) if !stopping.iter().any(|s| s == owner) => {
                    if let Some(since) = unowned_since.remove(&lease.lease_key) {
                        handed.insert(lease.lease_key, now - since);
                    }
                }
                // Still the stopping worker's: a pause of 0 unless a later read finds it
                // released.
                Some(_) => {
                    handed.entry(lease.lease_key).or_default();
                }
            }
        }
    }
    assert!(
        unowned_since.is_empty(),
        "every lease held again: {unowned_since:?}"
    );
    let mut all: Vec<f64> = handed.values().map(Duration::as_secs_f64).collect();
    all.sort_by(f64::total_cmp);
    Pause {
        longest: all.last().copied().unwrap_or(0.0),
        median: all.get(all.len() / 2).copied().unwrap_or(0.0),
        read: (begun.elapsed() / reads.max(1)).as_secs_f64(),
    }
}

async fn moves(
    fleet: &mut Vec<Running>,
    leases: usize,
    store: &dyn LeaseStore,
    spawn: impl FnOnce() -> Running,
) -> Moves {
    let started = Instant::now();
    fleet.push(spawn());
    wait_for("a new worker balanced in", PATIENCE, || {
        let now = statuses(fleet);
        async move { balanced(&now, leases) }
    })
    .await;
    let rounds = fleet.last().map_or(0, |w| w.status.borrow().taking_rounds);
    let join = (started.elapsed().as_secs_f64(), rounds);
    eprintln!("{leases} leases: a joining worker balanced in {join:?} (s, rounds)");

    let crashed = fleet.remove(0);
    crashed.task.abort();
    let crash = until_all_held(fleet, leases, "a crashed worker's leases taken").await;
    eprintln!("{leases} leases: a crashed worker's leases taken in {crash:.1} s");

    let stopped = fleet.remove(0);
    let (shutdown, pause) = stop_together(fleet, leases, store, vec![stopped]).await;
    eprintln!(
        "{leases} leases: a stopped worker's leases held elsewhere in {shutdown:.1} s; unowned at most {pause}"
    );

    // A deploy batch holding both watchers: they stop at once. Only in a fleet that watches
    // (some worker reads the table rarely) and has members left to take over.
    let watches = statuses(fleet).iter().any(|s| !s.watcher);
    if watches {
        // Members take the slots of the watchers that left at their next slot checks.
        wait_for("two watchers again", PATIENCE, || {
            let now = statuses(fleet);
            async move { now.iter().filter(|s| s.watcher).count() == 2 }
        })
        .await;
    }
    let watching: Vec<usize> = (0..fleet.len())
        .filter(|i| fleet[*i].status.borrow().watcher)
        .collect();
    let both_watchers = if watches && watching.len() == 2 && fleet.len() >= 4 {
        let second = fleet.remove(watching[1]);
        let first = fleet.remove(watching[0]);
        let (took, pause) = stop_together(fleet, leases, store, vec![first, second]).await;
        eprintln!(
            "{leases} leases: both watchers stopped together; their leases held elsewhere in {took:.1} s; unowned at most {pause}"
        );
        Some((took, pause))
    } else {
        None
    };
    Moves {
        join,
        crash,
        shutdown,
        pause,
        both_watchers,
    }
}

/// Stops `stopping` at once; returns the seconds until `fleet` holds every lease, and the
/// pauses of the stopping workers' leases (see [`pauses`]).
async fn stop_together(
    fleet: &[Running],
    leases: usize,
    store: &dyn LeaseStore,
    stopping: Vec<Running>,
) -> (f64, Pause) {
    let ids: Vec<String> = stopping.iter().map(|w| w.id.clone()).collect();
    for worker in &stopping {
        worker.shutdown.cancel();
    }
    let held_elsewhere = std::sync::atomic::AtomicBool::new(false);
    let (took, pause) = tokio::join!(
        async {
            let took = until_all_held(fleet, leases, "a stopped worker's leases handed over").await;
            held_elsewhere.store(true, std::sync::atomic::Ordering::SeqCst);
            took
        },
        pauses(store, &ids, || held_elsewhere
            .load(std::sync::atomic::Ordering::SeqCst)),
    );
    for worker in stopping {
        worker
            .task
            .await
            .expect("worker did not panic")
            .expect("worker stopped cleanly");
    }
    (took, pause)
}

fn per_hour(units: f64, window: f64) -> f64 {
    units * SECONDS_PER_HOUR / window
}

fn dollars(read_units: f64, write_units: f64) -> f64 {
    (read_units * READ_PRICE_PER_MILLION + write_units * WRITE_PRICE_PER_MILLION) / 1e6
}

/// One fleet to measure: `LEASESxWORKERS[s|w]`.
#[derive(Clone, Copy)]
struct Size {
    leases: usize,
    workers: usize,
    setup: Setup,
}

/// The lease settings a fleet runs with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// The library's defaults (watchers from ten workers, renewals every 3.5 s).
    Defaults,
    /// `s`: every worker scans every taker interval, renewals every 3 s (the defaults before
    /// the fleet-scale work), to compare with.
    EveryWorkerScans,
    /// `w`: the default watchers whatever the fleet's size (`min_workers` 1).
    Watchers,
}

/// The renewal interval before the fleet-scale work, for the `s` setup.
const EVERY_WORKER_SCANS_RENEWAL: Duration = Duration::from_secs(3);

impl Size {
    fn lease_config(self) -> LeaseConfig {
        match self.setup {
            Setup::Defaults => LeaseConfig::default(),
            Setup::EveryWorkerScans => LeaseConfig::default()
                .with_watchers(None)
                .with_renewal_interval(EVERY_WORKER_SCANS_RENEWAL),
            Setup::Watchers => {
                LeaseConfig::default().with_watchers(Some(Watchers::default().with_min_workers(1)))
            }
        }
    }

    fn label(self) -> String {
        let setup = match self.setup {
            Setup::Defaults => "",
            Setup::EveryWorkerScans => ", every worker scans, renewals 3 s",
            Setup::Watchers => ", watchers at any size",
        };
        format!("{} × {}{setup}", self.leases, self.workers)
    }
}

fn sizes() -> Vec<Size> {
    let spec = std::env::var("KCL_BENCH_SIZES")
        .unwrap_or_else(|_| "8x2,1000x1,1000x10,1000x10s,8x2w".into());
    spec.split(',')
        .map(|size| {
            let size = size.trim();
            let (size, setup) = if let Some(plain) = size.strip_suffix('w') {
                (plain, Setup::Watchers)
            } else if let Some(plain) = size.strip_suffix('s') {
                (plain, Setup::EveryWorkerScans)
            } else {
                (size, Setup::Defaults)
            };
            let (l, w) = size
                .split_once('x')
                .unwrap_or_else(|| panic!("KCL_BENCH_SIZES: {size:?} is not LEASESxWORKERS[s|w]"));
            Size {
                leases: l.trim().parse().expect("leases is a number"),
                workers: w.trim().parse().expect("workers is a number"),
                setup,
            }
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let window = Duration::from_secs(
        std::env::var("KCL_BENCH_COST_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    let mut results = Vec::new();
    for size in sizes() {
        results.push(measure(size, window).await);
    }

    println!(
        "## Lease-table cost, steady state (default settings, idle processors, DynamoDB Local, {} s per size)\n",
        window.as_secs()
    );
    println!(
        "| leases × workers | read units/h | write units/h | per lease-hour (read / write) | per worker-hour (read / write) | on-demand $/h | start → balanced | leases lost | memory per idle lease |\n|---|---|---|---|---|---|---|---|---|"
    );
    for m in &results {
        let total = OperationUsage::total(m.usage.values());
        let (r, w) = (
            per_hour(total.read_units.units(), m.window),
            per_hour(total.write_units.units(), m.window),
        );
        let memory = m
            .bytes_per_lease
            .map_or("–".to_owned(), |b| format!("{:.1} KiB", b / 1024.0));
        println!(
            "| {} | {r:.0} | {w:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.4} | {:.1} s | {} | {memory} |",
            m.label,
            r / m.leases as f64,
            w / m.leases as f64,
            r / m.workers as f64,
            w / m.workers as f64,
            dollars(r, w),
            m.to_balanced,
            m.leases_lost,
        );
    }
    println!(
        "\nLease moves (lease-level: a lease held by a worker, not records):\n\n| leases × workers | a worker joins → balanced (its taking rounds) | a worker crashes → all its leases taken | a worker shuts down → all its leases held elsewhere | how long its leases went unowned: longest, median (one table read) |\n|---|---|---|---|---|"
    );
    for m in &results {
        if let Some(moves) = &m.moves {
            println!(
                "| {} | {:.1} s ({}) | {:.1} s | {:.1} s | {} |",
                m.label, moves.join.0, moves.join.1, moves.crash, moves.shutdown, moves.pause
            );
        }
    }
    let together: Vec<(&str, f64, Pause)> = results
        .iter()
        .filter_map(|m| {
            let (took, pause) = m.moves.as_ref()?.both_watchers?;
            Some((m.label.as_str(), took, pause))
        })
        .collect();
    if !together.is_empty() {
        println!(
            "\nBoth watchers stopping at once (a deploy batch holding both):\n\n| leases × workers | all their leases held elsewhere | how long their leases went unowned: longest, median (one table read) |\n|---|---|---|"
        );
        for (label, took, pause) in together {
            println!("| {label} | {took:.1} s | {pause} |");
        }
    }
    println!("\nBy operation (per hour: requests, items, read units, write units):\n");
    for m in &results {
        let ops: Vec<String> = m
            .usage
            .iter()
            .filter(|(_, u)| u.requests > 0)
            .map(|(op, u)| {
                format!(
                    "{op} {:.0} req, {:.0} items, {:.0} RCU, {:.0} WCU",
                    per_hour(u.requests as f64, m.window),
                    per_hour(u.items as f64, m.window),
                    per_hour(u.read_units.units(), m.window),
                    per_hour(u.write_units.units(), m.window),
                )
            })
            .collect();
        println!("- {}: {}", m.label, ops.join("; "));
    }
}
