//! Deterministic simulation: the real worker (lease coordination, shard consumers, checkpoint
//! rules) on the in-memory stream and lease store, with virtual time in a fresh
//! single-threaded runtime per seed. Each seed draws a schedule: workers joining, stopping,
//! crashing, pausing past their lease and coming back (zombies), lease-store errors and
//! throttling, Kinesis stalls and throttling, splits and merges, processors that fail or panic.
//! Each seed also draws its shapes (see [`Shapes`]): processors that buffer records and
//! checkpoint only after a flush, lease scans that are not snapshots, and single lease-table
//! calls that hang. Then the faults end, the fleet settles, and the invariants are checked:
//!
//! 1. every record put is flushed (written to the sink) at least once, and no checkpoint ever
//!    covers a record that was not flushed (checked as each checkpoint lands);
//! 2. each processor gets its shard's records in order;
//! 3. a checkpoint never moves backwards;
//! 4. a child shard is never processed before its parents ended;
//! 5. a checkpoint is only ever written by the worker that took the lease for that term;
//! 6. per partition key, records are first flushed in the order they were put;
//! 7. the fleet ends balanced, every lease owned;
//! 8. a lease is never taken as expired from a running worker whose lease-table calls were
//!    not failing, paused or throttled lately (one hung call must not cost a lease; two hung
//!    renewals within 20 s may);
//! 9. in fan-out fleets, a worker holds a subscription to a shard only while it owns the
//!    shard's lease (checked once the fleet settled), and none once it stopped.
//! 10. a lease, once deleted, is never created again (its shard would be processed twice).
//!
//! Each seed also draws how its fleet reads (see [`Reading`]): in about half the seeds every
//! worker polls, in the others every worker reads through enhanced fan-out, with fan-out
//! faults of their own (see the `fan_out` module).
//!
//! `SIM_SEEDS=N` runs N seeds (default [`DEFAULT_SEEDS`], what CI runs) from `SIM_FIRST_SEED`
//! (default 0): a soak is `SIM_SEEDS=100000`. `SIM_SEED=S` replays one seed with its trace
//! printed. `SIM_SHAPES` fixes the shapes instead of drawing them per seed: `classic` (none:
//! with `SIM_RETRIEVAL=polling`, the simulation as it was before the shapes, seed for seed),
//! or a comma-separated list of `buffering`, `scans`, `hangs` (exactly those).
//! `SIM_RETRIEVAL=polling` or `fan-out` fixes how every seed's fleet reads (a fan-out seed
//! replays alike whether its reading was drawn or fixed; a polling seed replays as it did
//! before fan-out existed). A run is a pure function of its seed, shapes and reading.
//! `SIM_LOG=1` prints the workers' debug logs (with `SIM_SEED`, for a replay).

// The replayed trace and the coverage summary are the output a developer asks for.
#![allow(clippy::print_stderr)]

mod endings;
mod fan_out;
mod monitored;
mod observe;
mod processor;
mod seeds;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl_core::testing::{
    Fault, Faulty, Hang, InMemoryLeaseStore, InMemoryStream, LeaseCall, ScanPaging, StaleReads,
};
use kcl_core::{
    CancellationToken, ExtendedSequenceNumber, InitialPosition, Lease, LeaseConfig, LeaseStore,
    Retrieval, StreamClient, Watchers, Worker, WorkerConfig, WorkerStatus, is_watcher_slot,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use endings::Ending;
use fan_out::{FanOutFleet, Watched};
use monitored::Monitored;
use observe::{Coverage, RecordId, Rng, Shared, covered, trace, violation};
use processor::{Buffering, SimProcessor};
use seeds::{
    FAN_OUT_SALT, Job, Reading, SHAPES_SALT, STALE_SALT, Shapes, WATCHERS_SALT, reading_from_env,
    seeds,
};

// ---- The run ------------------------------------------------------------------------------

/// Chance per schedule step, in seeds with hangs, that one lease-table call of a worker is made
/// to hang: a few per seed.
const HANG_PERCENT: u64 = 30;
/// Chance per schedule step, in seeds with paged scans, of a split followed at once by a split
/// of one of the children.
const DOUBLE_SPLIT_PERCENT: u64 = 15;
/// How long after a lease-store fault or a pause ends a worker may still lose a lease without
/// that being a bug: the lease duration (10 s) plus two taker intervals (2 s each) for others
/// to see it expire, plus the longest cooldown of a failed shard (60 s), during which a lease
/// whose release failed still names the worker and is not taken back by it.
const DISTURBANCE_AFTERMATH: Duration = Duration::from_secs(80);

struct SimWorker {
    id: String,
    shutdown: CancellationToken,
    task: JoinHandle<kcl_core::Result<()>>,
    status: watch::Receiver<WorkerStatus>,
    stream: Arc<Faulty<InMemoryStream>>,
    store: Arc<Faulty<Monitored>>,
}

struct Sim {
    rng: Rng,
    /// Draws what the shapes do (hangs), apart from the classic schedule.
    shape_rng: Rng,
    shapes: Shapes,
    /// How this seed's processors buffer (`None`: they checkpoint every batch).
    buffering: Option<Buffering>,
    stream: Arc<InMemoryStream>,
    leases: Arc<InMemoryLeaseStore>,
    monitored: Arc<Monitored>,
    observed: Shared,
    failing: Arc<AtomicBool>,
    /// Processors created so far.
    instances: Arc<AtomicU64>,
    workers: Vec<SimWorker>,
    /// Every worker's lease store, to count the calls that hung.
    stores: Vec<Arc<Faulty<Monitored>>>,
    next_worker: usize,
    /// Records put per key.
    counters: BTreeMap<String, u64>,
    put: usize,
    /// When each fault ends, and what to do then.
    pending_ends: Vec<(Instant, FaultEnd)>,
    /// The worker id two processes run with (the shared-id ending).
    shared_id: Option<String>,
    /// `Some` in fan-out fleets: every worker reads through enhanced fan-out.
    fan_out: Option<FanOutFleet>,
    /// The fleet's watchers, in seeds with that shape.
    watchers: Option<Watchers>,
    /// The most workers the schedule runs at once.
    max_workers: usize,
    /// Whether stops, crashes and pauses pick a watcher half the time (in large fleets a
    /// random pick would rarely hit one of the two).
    prefer_watchers: bool,
}

/// How big a seed's fleet and stream are.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scale {
    /// One to three shards and up to four workers: where the schedules find races.
    Small,
    /// 50 to 100 workers on as many shards and more, with the default watchers (watching
    /// from ten workers): the fleets the lease table must stay cheap for.
    Large,
}

#[derive(Clone, Debug)]
enum FaultEnd {
    Worker(String),
    Processors,
}

const KEYS: u64 = 12;

fn sim_config(
    id: &str,
    seed: u64,
    fan_out: Option<&FanOutFleet>,
    watchers: Option<Watchers>,
) -> WorkerConfig {
    let config = WorkerConfig::new("sim-app", "sim-stream")
        .with_worker_id(id)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_rng_seed(seed)
        .with_lease(
            LeaseConfig::default()
                .with_shard_sync_interval(Duration::from_secs(10))
                .with_watchers(watchers),
        )
        .with_shutdown_timeout(Duration::from_secs(10));
    match fan_out {
        Some(fleet) => config.with_retrieval(Retrieval::FanOut(fleet.config.clone())),
        None => config,
    }
}

impl Sim {
    fn trace(&self, line: String) {
        trace(&self.observed, line);
    }

    fn start_worker(&mut self, seed: u64) {
        let id = format!("w{}", self.next_worker);
        self.start_worker_as(&id, seed);
    }

    /// Starts a worker process with this id (another process may already run with it).
    fn start_worker_as(&mut self, id: &str, seed: u64) {
        let id = id.to_owned();
        self.next_worker += 1;
        let stream = Arc::new(Faulty::new(self.stream.clone()));
        let store = Arc::new(Faulty::new(self.monitored.clone()));
        self.monitored
            .processes
            .lock()
            .unwrap()
            .push((id.clone(), Arc::downgrade(&store)));
        let (observed, leases, failing, shards_of, buffering) = (
            self.observed.clone(),
            self.leases.clone(),
            self.failing.clone(),
            self.stream.clone(),
            self.buffering,
        );
        // Numbered per run, never per process: a seed must replay alike among other seeds.
        let instances = self.instances.clone();
        let proc_seed = seed ^ (self.next_worker as u64) << 32;
        let factory = move |shard: &str| {
            let parents = shards_of
                .shards()
                .into_iter()
                .find(|s| s.shard_id == shard)
                .map(|s| s.parent_shard_ids().into_iter().collect())
                .unwrap_or_default();
            let instance = instances.fetch_add(1, Ordering::Relaxed);
            SimProcessor {
                shard: shard.to_owned(),
                instance,
                observed: observed.clone(),
                leases: leases.clone(),
                parents,
                failing: failing.clone(),
                rng: Rng(proc_seed ^ instance),
                last_ok: None,
                started: false,
                buffering,
                buffer: Vec::new(),
                batches_buffered: 0,
                buffered_since: None,
                last_buffered: None,
                last_flushed: None,
            }
        };
        let client: Arc<dyn StreamClient> = match self.fan_out {
            Some(_) => Arc::new(Watched {
                inner: stream.clone(),
                worker: id.clone(),
                observed: self.observed.clone(),
                server: self.stream.clone(),
            }),
            None => stream.clone(),
        };
        let worker = Worker::new(
            sim_config(
                &id,
                seed ^ self.next_worker as u64,
                self.fan_out.as_ref(),
                self.watchers,
            ),
            client,
            store.clone() as Arc<dyn LeaseStore>,
            factory,
        )
        .expect("valid config");
        let status = worker.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        self.trace(format!("start {id}"));
        self.observed.lock().unwrap().live.insert(id.clone());
        self.stores.push(store.clone());
        self.workers.push(SimWorker {
            id,
            shutdown,
            task,
            status,
            stream,
            store,
        });
    }

    /// Removes a worker from the schedule (stopped or crashed): it no longer counts as live.
    fn remove_worker(&mut self, i: usize) -> SimWorker {
        let w = self.workers.remove(i);
        self.observed.lock().unwrap().live.remove(&w.id);
        w
    }

    /// Marks a worker's lease-table calls as failing or paused until `until`.
    pub(crate) fn disturb(&self, id: &str, until: Instant) {
        let mut observed = self.observed.lock().unwrap();
        let after = until + DISTURBANCE_AFTERMATH;
        let entry = observed
            .disturbed_until
            .entry(id.to_owned())
            .or_insert(after);
        *entry = (*entry).max(after);
    }

    fn put(&mut self, n: usize) {
        for _ in 0..n {
            let key = format!("k{}", self.rng.below(KEYS));
            let counter = self.counters.entry(key.clone()).or_default();
            let id: RecordId = (key.clone(), *counter);
            let (shard, sequence_number) = self.stream.put_record(&key, format!("{key}:{counter}"));
            *counter += 1;
            self.put += 1;
            self.observed
                .lock()
                .unwrap()
                .records
                .entry(shard)
                .or_default()
                .push((ExtendedSequenceNumber::new(sequence_number, 0), id));
        }
    }

    fn pick_worker(&mut self) -> Option<usize> {
        if self.workers.is_empty() {
            return None;
        }
        if self.prefer_watchers && self.rng.chance(50) {
            let watching: Vec<usize> = (0..self.workers.len())
                .filter(|&i| self.workers[i].status.borrow().watcher)
                .collect();
            if !watching.is_empty() {
                return Some(watching[self.rng.below(watching.len() as u64) as usize]);
            }
        }
        Some(self.rng.below(self.workers.len() as u64) as usize)
    }

    fn open_shards(&self) -> Vec<(u128, String)> {
        let mut open: Vec<(u128, String)> = self
            .stream
            .shards()
            .into_iter()
            .filter(|s| s.is_open())
            .map(|s| (s.hash_key_range.starting_hash_key, s.shard_id))
            .collect();
        open.sort();
        open
    }

    fn end_faults_due(&mut self, now: Instant) {
        let (due, rest): (Vec<_>, Vec<_>) =
            self.pending_ends.drain(..).partition(|(at, _)| *at <= now);
        self.pending_ends = rest;
        for (_, end) in due {
            match end {
                FaultEnd::Processors => self.failing.store(false, Ordering::Relaxed),
                FaultEnd::Worker(id) => {
                    if let Some(w) = self.workers.iter().find(|w| w.id == id) {
                        w.stream.set(Fault::None);
                        w.store.set(Fault::None);
                    }
                }
            }
            self.trace(format!("fault ends: {:?}", self.pending_ends.len()));
        }
    }

    /// In seeds with hangs, now and then: the next renewal or checkpoint of one worker hangs.
    fn maybe_hang(&mut self) {
        if !self.shapes.hangs || self.workers.is_empty() || !self.shape_rng.chance(HANG_PERCENT) {
            return;
        }
        let i = self.shape_rng.below(self.workers.len() as u64) as usize;
        let operation = if self.shape_rng.chance(50) {
            "renew"
        } else {
            "checkpoint"
        };
        let hang = if self.shape_rng.chance(60) {
            Hang::Lost
        } else {
            Hang::AnswerLost
        };
        let w = &self.workers[i];
        w.store.hang_next(LeaseCall::Update(operation), hang);
        let id = w.id.clone();
        self.trace(format!("the next {operation} of {id} hangs ({hang:?})"));
    }

    /// In seeds with paged scans, now and then: a shard splits, and one of its children at
    /// once, so a shard sync may create the leases of a parent and its child together while
    /// another worker's scan is under way (the way a scan returns a child without its parent).
    fn maybe_split_twice(&mut self) {
        if !self.shapes.paged_scans || !self.shape_rng.chance(DOUBLE_SPLIT_PERCENT) {
            return;
        }
        let open = self.open_shards();
        if open.len() >= 7 {
            return;
        }
        let (_, shard) = &open[self.shape_rng.below(open.len() as u64) as usize];
        let children = self.stream.split_shard(shard);
        let grandchildren = self.stream.split_shard(&children[0]);
        self.trace(format!(
            "split {shard} into {children:?}, and {} into {grandchildren:?}",
            children[0]
        ));
        covered(&self.observed, |c| c.splits += 2);
    }

    /// One random step of the schedule.
    async fn step(&mut self, seed: u64) {
        let gap = self.rng.millis(200, 8_000);
        self.sleep_with_fan_out_faults(gap).await;
        self.end_faults_due(Instant::now());
        self.maybe_hang();
        self.maybe_split_twice();
        let roll = self.rng.below(100);
        match roll {
            0..=29 => {
                let n = 5 + self.rng.below(30) as usize;
                self.put(n);
            }
            30..=39 if self.workers.len() < self.max_workers => self.start_worker(seed),
            40..=45 => {
                if let Some(i) = self.pick_worker() {
                    let w = self.remove_worker(i);
                    self.trace(format!("stop {}", w.id));
                    w.shutdown.cancel();
                    // Left running to finish its shutdown while the schedule goes on.
                    tokio::spawn(async move {
                        let _ = w.task.await;
                    });
                }
            }
            46..=51 => {
                if let Some(i) = self.pick_worker() {
                    let w = self.remove_worker(i);
                    self.trace(format!("crash {}", w.id));
                    w.task.abort();
                }
            }
            52..=59 => {
                // Paused (a long GC, a frozen VM): every call hangs, often past the lease.
                if let Some(i) = self.pick_worker() {
                    let pause = self.rng.millis(3_000, 25_000);
                    let until = Instant::now() + pause;
                    let w = &self.workers[i];
                    w.stream.set(Fault::Stall);
                    // Lease writes in flight land when the pause ends, late.
                    w.store.set(Fault::Hold);
                    let id = w.id.clone();
                    self.trace(format!("pause {id} for {pause:?}"));
                    covered(&self.observed, |c| c.pauses += 1);
                    self.disturb(&id, until);
                    self.pending_ends.push((until, FaultEnd::Worker(id)));
                }
            }
            60..=67 => {
                if let Some(i) = self.pick_worker() {
                    let fault = if self.rng.chance(50) {
                        Fault::Fail
                    } else {
                        Fault::Throttle
                    };
                    let until = Instant::now() + self.rng.millis(1_000, 12_000);
                    let w = &self.workers[i];
                    w.store.set(fault);
                    let id = w.id.clone();
                    self.trace(format!("lease store {fault:?} for {id}"));
                    self.disturb(&id, until);
                    self.pending_ends.push((until, FaultEnd::Worker(id)));
                }
            }
            68..=73 => {
                if let Some(i) = self.pick_worker() {
                    let fault =
                        [Fault::Fail, Fault::Throttle, Fault::Stall][self.rng.below(3) as usize];
                    let until = Instant::now() + self.rng.millis(1_000, 15_000);
                    let w = &self.workers[i];
                    w.stream.set(fault);
                    let id = w.id.clone();
                    self.trace(format!("kinesis {fault:?} for {id}"));
                    self.pending_ends.push((until, FaultEnd::Worker(id)));
                }
            }
            74..=81 => {
                let open = self.open_shards();
                if open.len() < 8 {
                    let (_, shard) = &open[self.rng.below(open.len() as u64) as usize];
                    let children = self.stream.split_shard(shard);
                    self.trace(format!("split {shard} into {children:?}"));
                    covered(&self.observed, |c| c.splits += 1);
                }
            }
            82..=87 => {
                let open = self.open_shards();
                if open.len() >= 2 {
                    let i = self.rng.below(open.len() as u64 - 1) as usize;
                    let child = self.stream.merge_shards(&open[i].1, &open[i + 1].1);
                    self.trace(format!(
                        "merge {} and {} into {child}",
                        open[i].1,
                        open[i + 1].1
                    ));
                    covered(&self.observed, |c| c.merges += 1);
                }
            }
            88..=93 => {
                let until = Instant::now() + self.rng.millis(1_000, 20_000);
                self.failing.store(true, Ordering::Relaxed);
                self.trace("processors fail at times".into());
                self.pending_ends.push((until, FaultEnd::Processors));
            }
            _ => self.put(3),
        }
    }

    /// Per shard, how many records are neither flushed nor held in the buffer of a live
    /// processor (which flushes them at shutdown at the latest).
    fn unsettled_records(&self) -> BTreeMap<String, usize> {
        let observed = self.observed.lock().unwrap();
        let buffered: BTreeSet<&RecordId> = observed.buffered.values().flatten().collect();
        observed
            .records
            .iter()
            .map(|(shard, records)| {
                let unsettled = records
                    .iter()
                    .filter(|(_, id)| !observed.processed.contains(id) && !buffered.contains(id))
                    .count();
                (shard.clone(), unsettled)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Waits until every record is flushed or buffered by a live processor and the fleet is
    /// balanced; false (a violation) if that takes past `deadline`.
    async fn settle(&mut self, deadline: Instant) -> bool {
        loop {
            self.reap_shared().await;
            // A worker that ended on its own never settles: said at once, with its error.
            if let Some(i) = (0..self.workers.len()).find(|&i| {
                self.workers[i].task.is_finished()
                    && self.shared_id.as_ref() != Some(&self.workers[i].id)
            }) {
                let w = self.remove_worker(i);
                let ended = w.task.await;
                violation(
                    &self.observed,
                    format!("{} ended on its own with {ended:?}", w.id),
                );
                return false;
            }
            let unsettled = self.unsettled_records();
            let balanced = self.balanced();
            if unsettled.is_empty() && balanced {
                return true;
            }
            if Instant::now() > deadline {
                let leases: Vec<String> = self
                    .leases
                    .leases()
                    .iter()
                    .map(|l| format!("{} {:?} {}", l.lease_key, l.owner, l.checkpoint))
                    .collect();
                violation(
                    &self.observed,
                    format!(
                        "not settled after 15 virtual minutes: records neither flushed nor \
                         buffered per shard {unsettled:?}, balanced {balanced}; leases {leases:?}"
                    ),
                );
                return false;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn balanced(&self) -> bool {
        let live: BTreeSet<&str> = self.workers.iter().map(|w| w.id.as_str()).collect();
        let leases = self.leases.leases();
        let active: Vec<&Lease> = leases
            .iter()
            .filter(|l| !l.is_finished() && !is_watcher_slot(&l.lease_key))
            .collect();
        let mut owners: BTreeMap<&str, usize> = live.iter().map(|w| (*w, 0)).collect();
        for lease in &active {
            match lease.owner.as_deref() {
                Some(owner) if live.contains(owner) && lease.handoff_to.is_none() => {
                    *owners.get_mut(owner).unwrap() += 1
                }
                _ => return false,
            }
        }
        let (n, k) = (active.len(), live.len());
        owners.values().all(|c| (n / k..=n.div_ceil(k)).contains(c))
    }
}

/// What one seed's run left behind.
#[derive(Debug)]
struct SeedRun {
    /// Empty: every invariant held.
    violations: Vec<String>,
    /// A summary of what happened, for the determinism check.
    digest: String,
    trace: Vec<String>,
    coverage: Coverage,
}

fn run_seed(
    seed: u64,
    shapes: Option<Shapes>,
    reading: Option<Reading>,
    ending: Ending,
    scale: Scale,
) -> SeedRun {
    if std::env::var_os("SIM_LOG").is_some() {
        // The workers' own logs, for a replay (`SIM_SEED=S SIM_LOG=1`).
        let _ = tracing_subscriber::fmt()
            .with_env_filter("kcl_core=debug")
            .with_writer(std::io::stderr)
            .try_init();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut rng = Rng(seed);
        let mut shape_rng = Rng(seed ^ SHAPES_SALT);
        let mut stale_rng = Rng(seed ^ STALE_SALT);
        let mut watchers_rng = Rng(seed ^ WATCHERS_SALT);
        let shapes = shapes
            .unwrap_or_else(|| Shapes::draw(&mut shape_rng, &mut stale_rng, &mut watchers_rng));
        let buffering = shapes.buffering.then(|| Buffering::draw(&mut shape_rng));
        let (shards, fleet) = match scale {
            Scale::Small => (1 + rng.below(3) as u32, None),
            Scale::Large => {
                let workers = 50 + rng.below(51) as usize;
                (
                    workers as u32 + rng.below(workers as u64) as u32,
                    Some(workers),
                )
            }
        };
        let stream = Arc::new(InMemoryStream::new("sim-stream", shards));
        let mut fan_rng = Rng(seed ^ FAN_OUT_SALT);
        // Drawn even when fixed, so a fan-out seed replays alike either way.
        let drawn = Reading::draw(&mut fan_rng);
        let reading = reading.unwrap_or(drawn);
        let (fan_out, fan_out_line) = match reading {
            Reading::FanOut => {
                let (fleet, line) = FanOutFleet::draw(fan_rng, &stream);
                (Some(fleet), Some(line))
            }
            Reading::Polling => (None, None),
        };
        let observed: Shared = Arc::default();
        observed.lock().unwrap().started = Some(Instant::now());
        let leases = Arc::new(InMemoryLeaseStore::new("sim-app"));
        if shapes.paged_scans {
            let paging = ScanPaging::new(
                1 + shape_rng.below(3) as usize,
                shape_rng.millis(5, 60),
                shape_rng.next(),
            );
            leases.set_scan_paging(Some(paging));
        }
        // Few workers watch; members read the table rarely and take a free or expired slot.
        // Fleets here have up to four workers: a `min_workers` of 3 or 4 turns watching on and
        // off as workers start and stop.
        let watchers = shapes.watchers.then(|| {
            Watchers::default()
                .with_count(1 + watchers_rng.below(2) as u32)
                .with_member_scan_interval(watchers_rng.millis(5_000, 60_000))
                .with_slot_check_interval(watchers_rng.millis(1_000, 10_000))
                .with_min_workers(watchers_rng.below(5) as usize)
        });
        // Large fleets run the defaults (watching from ten workers) unless the shape drew
        // its own watchers.
        let watchers = match scale {
            Scale::Small => watchers,
            Scale::Large => watchers.or(Some(Watchers::default())),
        };
        if shapes.stale_scans {
            // Usually well under a second, as DynamoDB's replicas lag; sometimes past a
            // renewal interval, so that the fence, not luck, keeps stale takes out.
            let max_age = if stale_rng.chance(25) {
                stale_rng.millis(3_000, 12_000)
            } else {
                stale_rng.millis(50, 1_000)
            };
            leases.set_stale_reads(Some(StaleReads::new(max_age, stale_rng.next())));
        }
        let monitored = Arc::new(Monitored {
            inner: leases.clone(),
            observed: observed.clone(),
            terms: Mutex::default(),
            rng: Mutex::new(Rng(!seed)),
            create_latency: shapes.paged_scans,
            processes: Mutex::default(),
            deleted: Mutex::default(),
        });
        {
            let mut observed = observed.lock().unwrap();
            observed
                .trace
                .push(format!("shapes {shapes:?}, buffering {buffering:?}"));
            observed.trace.extend(fan_out_line);
            let c = &mut observed.coverage;
            c.fan_out_seeds = u64::from(fan_out.is_some());
            c.buffering_seeds = u64::from(shapes.buffering);
            c.paged_scan_seeds = u64::from(shapes.paged_scans);
            c.hang_seeds = u64::from(shapes.hangs);
            c.stale_scan_seeds = u64::from(shapes.stale_scans);
            c.watcher_seeds = u64::from(shapes.watchers);
        }
        let mut sim = Sim {
            rng,
            shape_rng,
            shapes,
            buffering,
            stream,
            leases,
            monitored,
            observed: observed.clone(),
            failing: Arc::new(AtomicBool::new(false)),
            instances: Arc::default(),
            workers: Vec::new(),
            stores: Vec::new(),
            next_worker: 0,
            counters: BTreeMap::new(),
            put: 0,
            pending_ends: Vec::new(),
            shared_id: None,
            fan_out,
            watchers,
            max_workers: fleet.map_or(4, |workers| workers + 4),
            prefer_watchers: fleet.is_some(),
        };
        let initial = fleet.unwrap_or_else(|| 1 + sim.rng.below(2) as usize);
        for _ in 0..initial {
            sim.start_worker(seed);
        }
        let steps = 15 + sim.rng.below(20);
        for _ in 0..steps {
            sim.step(seed).await;
        }

        // The bad day ends: faults off, two workers at least, some more records. (Hangs asked
        // for and not yet met stay: one hung call is a normal day.)
        sim.pending_ends.clear();
        sim.end_fan_out_faults();
        sim.failing.store(false, Ordering::Relaxed);
        for w in &sim.workers {
            w.stream.set(Fault::None);
            w.store.set(Fault::None);
        }
        while sim.workers.len() < 2 {
            sim.start_worker(seed);
        }
        sim.put(20);
        let mut statuses = Vec::new();
        if ending == Ending::TableVanishes {
            sim.vanish_table().await;
        } else {
            if ending == Ending::SharedWorkerId {
                sim.share_worker_id(seed).await;
            }
            sim.trace("faults end; settling".into());
            let deadline = Instant::now() + Duration::from_secs(900);
            if sim.settle(deadline).await && sim.fan_out.is_some() {
                // Invariant 9 once the fleet settled, stayed a while, and is settled still.
                sim.stay_a_while().await;
                if sim.settle(deadline).await {
                    sim.check_subscriptions_settled();
                }
            }
            statuses = sim
                .workers
                .iter()
                .map(|w| w.status.borrow().clone())
                .collect::<Vec<WorkerStatus>>();
            // Stopping flushes what the processors still buffer (`shutdown_requested`).
            sim.reap_shared().await;
            while !sim.workers.is_empty() {
                let w = sim.remove_worker(0);
                w.shutdown.cancel();
                match w.task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(kcl_core::Error::DuplicateWorkerId { .. }))
                        if sim.shared_id.as_ref() == Some(&w.id) => {}
                    other => violation(&observed, format!("{} ended with {other:?}", w.id)),
                }
            }
        }
        sim.check_subscriptions_closed().await;
        // Invariant 6: per key, first flushed in the order put.
        let mut last: HashMap<String, u64> = HashMap::new();
        let first_processed = sim.observed.lock().unwrap().first_processed.clone();
        for (key, n) in first_processed {
            if last.get(&key).is_some_and(|prev| n < *prev) {
                violation(
                    &observed,
                    format!("{key}:{n} first processed after {key}:{}", last[&key]),
                );
            }
            last.insert(key, n);
        }
        let hangs: usize = sim.stores.iter().map(|s| s.hung_calls()).sum();
        let raced = sim.leases.raced_scans();
        let mut observed = observed.lock().unwrap();
        observed.coverage.hangs = hangs as u64;
        observed.coverage.raced_scans = raced as u64;
        observed.coverage.lagged_scans = sim.leases.lagged_scans() as u64;
        let unflushed = sim.put - observed.processed.len();
        let digest = format!(
            "{} records, {unflushed} left unflushed; first order {:?}; leases {:?}; statuses {:?}",
            sim.put,
            observed.first_processed,
            sim.leases
                .leases()
                .iter()
                .map(|l| (
                    l.lease_key.clone(),
                    l.owner.clone(),
                    l.counter,
                    l.checkpoint.to_string()
                ))
                .collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| (
                    s.held_leases.clone(),
                    s.shard_failures,
                    s.processor_panics,
                    s.subscriptions,
                    s.subscribe_refusals,
                    s.subscription_failures
                ))
                .collect::<Vec<_>>(),
        );
        SeedRun {
            violations: observed.violations.clone(),
            digest,
            trace: observed.trace.clone(),
            coverage: observed.coverage,
        }
    })
}

/// Threads running seeds side by side (each seed has a runtime of its own).
const MAX_THREADS: usize = 4;
/// Below this many seeds a run is a replay or a smoke test, and coverage is not demanded.
const COVERAGE_SEEDS: usize = 200;
/// A seed takes milliseconds; one still running after this long is spinning without letting
/// virtual time advance (a busy loop in the worker), which is itself a failure.
const REAL_TIME_LIMIT: Duration = Duration::from_secs(120);

/// Runs a seed on its own thread, so one that spins forever is reported instead of hanging
/// the test.
fn run_seed_bounded(
    (seed, shapes, reading): Job,
    ending: Ending,
    scale: Scale,
) -> Result<SeedRun, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run_seed(seed, shapes, reading, ending, scale));
    });
    // A large fleet is a hundred workers' work, and a debug build is slow.
    let limit = match scale {
        Scale::Small => REAL_TIME_LIMIT,
        Scale::Large => REAL_TIME_LIMIT * 10,
    };
    match rx.recv_timeout(limit) {
        Ok(run) => Ok(run),
        // The spinning thread is left behind; the test process ends with the test.
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "still running after {limit:?} of real time: a busy loop"
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err("the simulation itself panicked".into())
        }
    }
}

#[test]
fn the_invariants_hold_for_every_seed() {
    run_seeds(seeds(), Ending::Settle, Scale::Small);
}

/// Seeds per run of large fleets (`SIM_LARGE_SEEDS`; with `SIM_SEED`, that seed alone at
/// this scale, its trace printed): each runs 50 to 100 workers, so CI runs a few.
const LARGE_SEEDS: u64 = 2;

#[test]
fn large_fleets_with_watchers_keep_the_invariants() {
    let reading = reading_from_env();
    let jobs: Vec<Job> = match std::env::var("SIM_SEED") {
        Ok(seed) => vec![(seed.parse().expect("SIM_SEED is a number"), None, reading)],
        Err(_) => {
            let first = std::env::var("SIM_FIRST_SEED")
                .ok()
                .map_or(0, |s| s.parse().expect("SIM_FIRST_SEED is a number"));
            let n = std::env::var("SIM_LARGE_SEEDS")
                .ok()
                .map_or(LARGE_SEEDS, |s| {
                    s.parse().expect("SIM_LARGE_SEEDS is a number")
                });
            (first..first + n)
                .map(|seed| (seed, None, reading))
                .collect()
        }
    };
    run_seeds(jobs, Ending::Settle, Scale::Large);
}

/// Seeds per run of each unrecoverable ending (`SIM_ENDING_SEEDS`; with `SIM_SEED`, that
/// seed alone, its trace printed).
const ENDING_SEEDS: u64 = 200;

fn ending_seeds() -> Vec<Job> {
    let reading = reading_from_env();
    if let Ok(seed) = std::env::var("SIM_SEED") {
        return vec![(seed.parse().expect("SIM_SEED is a number"), None, reading)];
    }
    let n = std::env::var("SIM_ENDING_SEEDS")
        .ok()
        .map_or(ENDING_SEEDS, |s| {
            s.parse().expect("SIM_ENDING_SEEDS is a number")
        });
    (0..n).map(|seed| (seed, None, reading)).collect()
}

#[test]
fn a_vanished_lease_table_ends_every_worker() {
    run_seeds(ending_seeds(), Ending::TableVanishes, Scale::Small);
}

#[test]
fn a_shared_worker_id_stops_one_process_and_the_fleet_settles() {
    let jobs = ending_seeds();
    let seeds = jobs.len();
    let coverage = run_seeds(jobs, Ending::SharedWorkerId, Scale::Small);
    if seeds >= COVERAGE_SEEDS {
        assert!(
            coverage.duplicates_stopped > 0,
            "no seed stopped a process for its shared worker id: {coverage:?}"
        );
    }
}

/// Runs the seeds with this ending; fails on any violation. Returns what they covered.
fn run_seeds(jobs: Vec<Job>, ending: Ending, scale: Scale) -> Coverage {
    // Injected panics are expected; keep their messages out of the output.
    std::panic::set_hook(Box::new(|_| {}));
    let replay = jobs.len() == 1;
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new((Vec::new(), Coverage::default())));
    let parallel = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS);
    let threads: Vec<_> = (0..parallel)
        .map(|_| {
            let (jobs, next, results) = (jobs.clone(), next.clone(), results.clone());
            std::thread::spawn(move || {
                while let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)).copied() {
                    let (violations, coverage) = match run_seed_bounded(job, ending, scale) {
                        Ok(run) => {
                            if replay {
                                for line in &run.trace {
                                    eprintln!("{line}");
                                }
                            }
                            (run.violations, run.coverage)
                        }
                        Err(problem) => (vec![problem], Coverage::default()),
                    };
                    let mut results = results.lock().unwrap();
                    if !violations.is_empty() {
                        results.0.push((job, violations));
                    }
                    results.1 += coverage;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let _ = std::panic::take_hook();
    let (mut failures, coverage) = results.lock().unwrap().clone();
    failures.sort_by_key(|(job, _)| *job);
    eprintln!("{} seeds; coverage {coverage:?}", jobs.len());
    for ((seed, shapes, reading), violations) in &failures {
        eprintln!(
            "FAILED seed {seed} {shapes:?} {reading:?}: {}",
            violations[0]
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds broke an invariant; replay one with SIM_SEED=<seed> (and SIM_SHAPES, \
         SIM_RETRIEVAL if the shapes or the reading were fixed):\n{:#?}",
        failures.len(),
        jobs.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    if jobs.len() >= COVERAGE_SEEDS && ending == Ending::Settle && scale == Scale::Small {
        assert_eq!(
            coverage.missing(),
            Vec::<&str>::new(),
            "situations no schedule produced: {coverage:?}"
        );
    }
    coverage
}

#[test]
fn a_seed_replays_exactly() {
    const SEEDS: [u64; 5] = [3, 7, 19, 64, 101];
    std::panic::set_hook(Box::new(|_| {}));
    let runs: Vec<(SeedRun, SeedRun)> = SEEDS
        .iter()
        .map(|&seed| {
            (
                run_seed(seed, None, None, Ending::Settle, Scale::Small),
                run_seed(seed, None, None, Ending::Settle, Scale::Small),
            )
        })
        .collect();
    let _ = std::panic::take_hook();
    for (seed, (a, b)) in SEEDS.iter().zip(runs) {
        assert_eq!(a.violations, b.violations, "seed {seed}");
        assert_eq!(a.coverage, b.coverage, "seed {seed}");
        assert_eq!(a.trace, b.trace, "seed {seed}");
        assert_eq!(
            a.digest, b.digest,
            "seed {seed}: the same seed must replay the same run"
        );
    }
}
