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
    CancellationToken, Checkpointer, InitialPosition, LeaseConfig, LeaseStore, OperationUsage,
    Record, RecordProcessor, StreamClient, Watchers, Worker, WorkerConfig, WorkerStatus,
    async_trait,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{dynamodb, unique, wait_for};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// On-demand prices in us-east-1 (since November 2024), dollars per million request units.
const READ_PRICE_PER_MILLION: f64 = 0.125;
const WRITE_PRICE_PER_MILLION: f64 = 0.625;
const SECONDS_PER_HOUR: f64 = 3600.0;
/// Longest wait for a fleet to hold every lease, balanced.
const PATIENCE: Duration = Duration::from_secs(600);

struct Idle;

#[async_trait]
impl RecordProcessor for Idle {
    type Error = std::convert::Infallible;

    async fn process_records(
        &mut self,
        _: &[Record],
        _: &mut Checkpointer,
        _: Option<u64>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

struct Running {
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
        let config = WorkerConfig::new(&app, &app)
            .with_worker_id(format!("w{i}"))
            .with_initial_position(InitialPosition::TrimHorizon)
            .with_lease(size.lease_config());
        let store: Arc<dyn LeaseStore> = Arc::new(DynamoLeaseStore::new(dynamodb.clone(), &app));
        let factory = |_: &str| Idle;
        let worker = Worker::new(config, stream.clone(), store, factory).expect("valid config");
        let status = worker.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        Running {
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
        Some(moves(&mut fleet, leases, || spawn(workers)).await)
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
}

async fn moves(fleet: &mut Vec<Running>, leases: usize, spawn: impl FnOnce() -> Running) -> Moves {
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
    stopped.shutdown.cancel();
    let shutdown = until_all_held(fleet, leases, "a stopped worker's leases handed over").await;
    stopped
        .task
        .await
        .expect("worker did not panic")
        .expect("worker stopped cleanly");
    eprintln!("{leases} leases: a stopped worker's leases held elsewhere in {shutdown:.1} s");
    Moves {
        join,
        crash,
        shutdown,
    }
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
        "\nLease moves (lease-level: a lease held by a worker, not records):\n\n| leases × workers | a worker joins → balanced (its taking rounds) | a worker crashes → all its leases taken | a worker shuts down → all its leases held elsewhere |\n|---|---|---|---|"
    );
    for m in &results {
        if let Some(moves) = &m.moves {
            println!(
                "| {} | {:.1} s ({}) | {:.1} s | {:.1} s |",
                m.label, moves.join.0, moves.join.1, moves.crash, moves.shutdown
            );
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
