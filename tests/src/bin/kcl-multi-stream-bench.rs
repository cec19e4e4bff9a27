//! kcl-multi-stream-bench: the control-plane calls of multi-stream workers (issue 15), counted
//! (run it with `scripts/bench multi-stream`, which starts the servers).
//!
//! Creates `KCL_BENCH_MS_STREAMS` streams (default 50) of `KCL_BENCH_MS_SHARDS` shards
//! (default 4) on kinesis-mock, then, for each fleet size of `KCL_BENCH_MS_WORKERS` (default
//! `2`; e.g. `2,4`), runs that many multi-stream workers in this process with the library's
//! default settings (a fixed tracker listing every stream, idle processors) and a fresh lease
//! table on DynamoDB Local. Each worker has its own SDK clients, so every call is counted per
//! worker, three ways:
//! - its `StreamClient` calls, through a counting wrapper of `KinesisStreamClient`
//!   (`list_shards` may be several `ListShards` pages, the SDK may retry);
//! - its HTTP requests to Kinesis and to DynamoDB, by `X-Amz-Target`, with an SDK interceptor
//!   (every attempt: pages and retries included), each with its time, for the peak rates;
//! - its lease store's own usage (`DynamoLeaseStore`, DynamoDB's consumed capacity with
//!   `ReturnConsumedCapacity=TOTAL`), by operation.
//!
//! Start-up (from the workers' start until every lease is held and the fleet balanced) is
//! reported apart; then, after 10 s, a window of `KCL_BENCH_MS_SECONDS` (default 300) is
//! measured and scaled to an hour. Nothing is asserted on timing.
//!
//! Prints a Markdown report to stdout; progress to stderr.

// A benchmark report is printed output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_kinesis::config::{ConfigBag, Intercept, RuntimeComponents};
use kcl_core::{
    CancellationToken, FixedStreams, InitialPosition, KinesisStreamClient, LeaseConfig, LeaseStore,
    MultiStreamConfig, OperationUsage, RecordsPage, Shard, ShardSubscription, StartingPosition,
    StreamClient, StreamConfig, StreamConsumer, StreamIdentity, Worker, WorkerConfig, WorkerStatus,
    async_trait,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{Idle, sdk_config, unique, wait_for};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const SECONDS_PER_HOUR: f64 = 3600.0;
/// Longest wait for a fleet to hold every lease, balanced.
const PATIENCE: Duration = Duration::from_secs(900);
/// After the fleet is balanced and before the window: the last takes' writes settle.
const SETTLE: Duration = Duration::from_secs(10);
/// How long no lease may move for the fleet to count as settled per stream: the exchanges
/// that spread each stream (one lease per worker and taking round) are over.
const QUIET: Duration = Duration::from_secs(10);
/// Kinesis's documented limits (the SDK's operation docs).
const DESCRIBE_STREAM_SUMMARY_LIMIT: &str = "20/s per account";
const LIST_SHARDS_LIMIT: &str = "1,000/s per stream";

/// Where a call was counted.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Layer {
    /// A `StreamClient` method of the worker's stream clients.
    Client,
    /// An HTTP request to Kinesis.
    Kinesis,
    /// An HTTP request to DynamoDB.
    DynamoDb,
    /// A DynamoDB read request that asked for `ConsistentRead` (also counted as `DynamoDb`).
    Consistent,
}

/// One call.
#[derive(Clone, Copy, Debug)]
struct Call {
    /// Since the log began.
    at: Duration,
    worker: usize,
    layer: Layer,
    op: &'static str,
}

/// Every call of a fleet, in the order made.
struct Log {
    began: Instant,
    calls: Mutex<Vec<Call>>,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Log")
    }
}

impl Log {
    fn new() -> Arc<Self> {
        Arc::new(Log {
            began: Instant::now(),
            calls: Mutex::new(Vec::with_capacity(1 << 18)),
        })
    }

    fn record(&self, worker: usize, layer: Layer, op: &'static str) {
        let at = self.began.elapsed();
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Call {
                at,
                worker,
                layer,
                op,
            });
    }

    fn now(&self) -> Duration {
        self.began.elapsed()
    }

    /// The calls made in `from..to`.
    fn between(&self, from: Duration, to: Duration) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|c| c.at >= from && c.at < to)
            .copied()
            .collect()
    }
}

/// The operation named by an `X-Amz-Target` header (`Kinesis_20131202.ListShards`), as a
/// static name (the set is small and fixed).
fn operation_name(target: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "ListShards",
        "DescribeStreamSummary",
        "DescribeStream",
        "ListStreams",
        "GetShardIterator",
        "GetRecords",
        "DescribeStreamConsumer",
        "RegisterStreamConsumer",
        "SubscribeToShard",
        "Scan",
        "Query",
        "GetItem",
        "BatchGetItem",
        "PutItem",
        "UpdateItem",
        "DeleteItem",
        "TransactWriteItems",
        "DescribeTable",
        "CreateTable",
    ];
    let op = target.rsplit('.').next().unwrap_or(target);
    KNOWN
        .iter()
        .find(|k| **k == op)
        .copied()
        .unwrap_or_else(|| Box::leak(op.to_owned().into_boxed_str()))
}

/// Counts every HTTP request (each attempt) of one worker's SDK client.
#[derive(Debug)]
struct CountRequests {
    worker: usize,
    layer: Layer,
    log: Arc<Log>,
}

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountRequests"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let op = context
            .request()
            .headers()
            .get("x-amz-target")
            .map_or("(no target)", operation_name);
        self.log.record(self.worker, self.layer, op);
        let consistent = context
            .request()
            .body()
            .bytes()
            .is_some_and(|b| String::from_utf8_lossy(b).contains("\"ConsistentRead\":true"));
        if self.layer == Layer::DynamoDb && consistent {
            self.log.record(self.worker, Layer::Consistent, op);
        }
        Ok(())
    }
}

/// A stream client that counts its calls by method.
#[derive(Debug)]
struct Counting {
    inner: KinesisStreamClient,
    worker: usize,
    log: Arc<Log>,
}

impl Counting {
    fn count(&self, op: &'static str) {
        self.log.record(self.worker, Layer::Client, op);
    }
}

#[async_trait]
impl StreamClient for Counting {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }

    async fn list_shards(&self) -> kcl_core::Result<Vec<Shard>> {
        self.count("ListShards");
        self.inner.list_shards().await
    }

    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> kcl_core::Result<String> {
        self.count("GetShardIterator");
        self.inner.get_shard_iterator(shard_id, position).await
    }

    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> kcl_core::Result<RecordsPage> {
        self.count("GetRecords");
        self.inner
            .get_records(shard_id, shard_iterator, limit)
            .await
    }

    async fn stream_identity(&self) -> kcl_core::Result<StreamIdentity> {
        self.count("DescribeStreamSummary");
        self.inner.stream_identity().await
    }

    async fn describe_stream_consumer(
        &self,
        consumer: &str,
    ) -> kcl_core::Result<Option<StreamConsumer>> {
        self.count("DescribeStreamConsumer");
        self.inner.describe_stream_consumer(consumer).await
    }

    async fn register_stream_consumer(&self, name: &str) -> kcl_core::Result<StreamConsumer> {
        self.count("RegisterStreamConsumer");
        self.inner.register_stream_consumer(name).await
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> kcl_core::Result<Box<dyn ShardSubscription>> {
        self.count("SubscribeToShard");
        self.inner
            .subscribe_to_shard(consumer_arn, shard_id, position)
            .await
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<kcl_core::Result<()>>,
    status: watch::Receiver<WorkerStatus>,
    store: Arc<DynamoLeaseStore>,
}

impl Running {
    fn usage(&self) -> BTreeMap<&'static str, OperationUsage> {
        self.store.usage().map(|u| u.snapshot()).unwrap_or_default()
    }
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

fn statuses(fleet: &[Running]) -> Vec<WorkerStatus> {
    fleet.iter().map(|w| w.status.borrow().clone()).collect()
}

fn held(statuses: &[WorkerStatus]) -> usize {
    statuses.iter().map(|s| s.held_leases.len()).sum()
}

fn balanced(statuses: &[WorkerStatus], leases: usize) -> bool {
    let held: Vec<usize> = statuses.iter().map(|s| s.held_leases.len()).collect();
    let (min, max) = (held.iter().min(), held.iter().max());
    held.iter().sum::<usize>() == leases && matches!((min, max), (Some(a), Some(b)) if b - a <= 1)
}

/// Creates `count` streams of `shards` shards one at a time (kinesis-mock, like Kinesis,
/// refuses too many creations at once: `LimitExceededException` is waited out), each waited
/// for until active.
async fn create_streams(prefix: &str, count: usize, shards: i32) -> Vec<String> {
    let client = aws_sdk_kinesis::Client::new(&sdk_config().await);
    let mut names = Vec::new();
    for i in 0..count {
        let name = format!("{prefix}-{i:03}");
        let mut delay = Duration::from_millis(100);
        loop {
            match client
                .create_stream()
                .stream_name(&name)
                .shard_count(shards)
                .send()
                .await
            {
                Ok(_) => break,
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_limit_exceeded_exception()) =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => panic!("CreateStream {name}: {e:?}"),
            }
        }
        wait_for("stream active", Duration::from_secs(60), || async {
            client
                .describe_stream_summary()
                .stream_name(&name)
                .send()
                .await
                .ok()
                .and_then(|o| {
                    o.stream_description_summary()
                        .map(|d| d.stream_status().clone())
                })
                == Some(aws_sdk_kinesis::types::StreamStatus::Active)
        })
        .await;
        names.push(name);
    }
    names
}

/// One fleet's measurement.
struct Measured {
    workers: usize,
    streams: usize,
    leases: usize,
    /// Seconds from the start to every lease held, to the fleet balanced in total, and to no
    /// lease moving any more (each stream spread).
    to_held: f64,
    to_balanced: f64,
    to_settled: f64,
    /// The calls from the start to balanced, and in the window.
    startup: Vec<Call>,
    startup_usage: Vec<BTreeMap<&'static str, OperationUsage>>,
    calls: Vec<Call>,
    /// Each worker's store usage over the window.
    usage: Vec<BTreeMap<&'static str, OperationUsage>>,
    /// Seconds measured.
    window: f64,
    leases_lost: u64,
    /// Lease moves in the window, per worker: (taken, handed over, received).
    moves: Vec<(u64, u64, u64)>,
    held_at_end: Vec<usize>,
    taking_rounds: Vec<u64>,
}

async fn measure(streams: &[String], shards: usize, workers: usize, window: Duration) -> Measured {
    let leases = streams.len() * shards;
    let app = unique("ms-bench");
    let sdk = sdk_config().await;
    let configs: Vec<StreamConfig> = streams
        .iter()
        .map(|s| StreamConfig::new(s).with_initial_position(InitialPosition::TrimHorizon))
        .collect();
    let tracker = Arc::new(FixedStreams(configs));
    let log = Log::new();
    let fleet: Vec<Running> = (0..workers)
        .map(|i| {
            let kinesis = aws_sdk_kinesis::Client::from_conf(
                aws_sdk_kinesis::config::Builder::from(&sdk)
                    .interceptor(CountRequests {
                        worker: i,
                        layer: Layer::Kinesis,
                        log: log.clone(),
                    })
                    .build(),
            );
            let dynamodb = aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::config::Builder::from(&sdk)
                    .interceptor(CountRequests {
                        worker: i,
                        layer: Layer::DynamoDb,
                        log: log.clone(),
                    })
                    .build(),
            );
            let clients_log = log.clone();
            let clients = move |name: &str| -> Arc<dyn StreamClient> {
                Arc::new(Counting {
                    inner: KinesisStreamClient::new(kinesis.clone(), name),
                    worker: i,
                    log: clients_log.clone(),
                })
            };
            let store = Arc::new(DynamoLeaseStore::new(dynamodb, &app));
            let config = WorkerConfig::new(&app, "multi-stream")
                .with_worker_id(format!("w{i}"))
                .with_lease(LeaseConfig::default())
                .with_multi_stream(MultiStreamConfig::default());
            let factory = |_: &str| Idle;
            let worker = Worker::multi_stream(
                config,
                tracker.clone(),
                Arc::new(clients),
                store.clone() as Arc<dyn LeaseStore>,
                factory,
            )
            .expect("valid config");
            let status = worker.status();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(worker.run(shutdown.clone()));
            Running {
                shutdown,
                task,
                status,
                store,
            }
        })
        .collect();
    wait_for("every lease held", PATIENCE, || {
        let now = statuses(&fleet);
        async move { held(&now) == leases }
    })
    .await;
    let to_held = log.now().as_secs_f64();
    eprintln!("{workers} workers: every lease held after {to_held:.1} s");
    wait_for("the fleet balanced", PATIENCE, || {
        let now = statuses(&fleet);
        async move { balanced(&now, leases) }
    })
    .await;
    let to_balanced = log.now().as_secs_f64();
    eprintln!("{workers} workers: balanced after {to_balanced:.1} s");
    // Then the exchanges that spread each stream over the fleet, until no lease moves.
    let moved = |s: &WorkerStatus| (s.leases_taken, s.handed_over, s.received);
    let mut last: Vec<(u64, u64, u64)> = statuses(&fleet).iter().map(moved).collect();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now: Vec<(u64, u64, u64)> = statuses(&fleet).iter().map(moved).collect();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
        assert!(
            log.now() < PATIENCE,
            "leases still moving after {PATIENCE:?}"
        );
    }
    let balanced_at = log.now() - QUIET;
    let to_settled = balanced_at.as_secs_f64();
    eprintln!("{workers} workers: settled per stream after {to_settled:.1} s");
    let startup = log.between(Duration::ZERO, balanced_at);
    let startup_usage: Vec<_> = fleet.iter().map(Running::usage).collect();

    tokio::time::sleep(SETTLE).await;
    let before: Vec<_> = fleet.iter().map(Running::usage).collect();
    let lost_before: u64 = statuses(&fleet).iter().map(|s| s.leases_lost).sum();
    let moves_of = |s: &WorkerStatus| (s.leases_taken, s.handed_over, s.received);
    let moves_before: Vec<(u64, u64, u64)> = statuses(&fleet).iter().map(moves_of).collect();
    let from = log.now();
    eprintln!(
        "{workers} workers: measuring for {} s",
        window.as_secs_f64()
    );
    tokio::time::sleep(window).await;
    let to = log.now();
    let after: Vec<_> = fleet.iter().map(Running::usage).collect();
    let calls = log.between(from, to);
    let still = statuses(&fleet);
    let leases_lost = still.iter().map(|s| s.leases_lost).sum::<u64>() - lost_before;
    let held_at_end = still.iter().map(|s| s.held_leases.len()).collect();
    let moves = still
        .iter()
        .map(moves_of)
        .zip(&moves_before)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1, a.2 - b.2))
        .collect();
    let taking_rounds = still.iter().map(|s| s.taking_rounds).collect();
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
        workers,
        streams: streams.len(),
        leases,
        to_held,
        to_balanced,
        to_settled,
        startup,
        startup_usage,
        calls,
        usage: after
            .iter()
            .zip(&before)
            .map(|(a, b)| minus(a, b))
            .collect(),
        window: (to - from).as_secs_f64(),
        leases_lost,
        moves,
        held_at_end,
        taking_rounds,
    }
}

fn per_hour(count: f64, window: f64) -> f64 {
    count * SECONDS_PER_HOUR / window
}

/// The most calls in any one-second window (sliding), of calls sorted by time.
fn peak_per_second(times: &[Duration]) -> usize {
    let mut best = 0;
    let mut first = 0;
    for (last, t) in times.iter().enumerate() {
        while *t - times[first] >= Duration::from_secs(1) {
            first += 1;
        }
        best = best.max(last + 1 - first);
    }
    best
}

fn times(calls: &[Call], layer: Layer, op: &str, worker: Option<usize>) -> Vec<Duration> {
    let mut times: Vec<Duration> = calls
        .iter()
        .filter(|c| c.layer == layer && c.op == op && worker.is_none_or(|w| c.worker == w))
        .map(|c| c.at)
        .collect();
    times.sort();
    times
}

fn count(calls: &[Call], layer: Layer, op: &str, worker: Option<usize>) -> usize {
    calls
        .iter()
        .filter(|c| c.layer == layer && c.op == op && worker.is_none_or(|w| c.worker == w))
        .count()
}

fn ops(calls: &[Call], layer: Layer) -> BTreeSet<&'static str> {
    calls
        .iter()
        .filter(|c| c.layer == layer)
        .map(|c| c.op)
        .collect()
}

const CONTROL_PLANE: &[&str] = &[
    "DescribeStreamSummary",
    "ListShards",
    "ListStreams",
    "DescribeStream",
];
const DATA_PLANE: &[&str] = &["GetShardIterator", "GetRecords"];

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// The design's figure per worker-hour with the default intervals, where it has one.
fn model_per_worker_hour(op: &str, streams: usize) -> Option<f64> {
    let defaults = LeaseConfig::default();
    let per_hour = |d: Duration| SECONDS_PER_HOUR / d.as_secs_f64();
    let syncs = streams as f64 * per_hour(defaults.shard_sync_interval);
    let discoveries = per_hour(MultiStreamConfig::default().stream_discovery_interval);
    match op {
        // One identity check before each scheduled per-stream sync.
        "DescribeStreamSummary" => Some(syncs),
        // One ListShards per per-stream sync.
        "ListShards" => Some(syncs),
        // A taking round every taker interval, one full scan per per-stream sync, one after
        // each discovery.
        "Scan" => Some(per_hour(defaults.taker_interval) + syncs + discoveries),
        _ => None,
    }
}

fn report(m: &Measured) {
    let w = m.workers;
    println!(
        "### {} streams × {} shards ({} leases), {w} workers, {:.0} s window\n",
        m.streams,
        m.leases / m.streams.max(1),
        m.leases,
        m.window
    );
    println!(
        "Start-up: every lease held after {:.1} s, the fleet balanced in total after {:.1} s and each stream spread (no lease moving for {} s) after {:.1} s. In the window: {} leases lost, leases taken / handed over / received per worker {:?}, leases held per worker at the end {:?}, taking rounds per worker since the start {:?}.\n",
        m.to_held,
        m.to_balanced,
        QUIET.as_secs(),
        m.to_settled,
        m.leases_lost,
        m.moves,
        m.held_at_end,
        m.taking_rounds
    );
    println!(
        "| call | where counted | fleet per hour | per worker-hour (mean; min – max) | design per worker-hour | fleet peak in any 1 s | Kinesis limit |\n|---|---|---|---|---|---|---|"
    );
    let kinesis_row = |layer: Layer, op: &str, plane: &str| {
        let fleet = count(&m.calls, layer, op, None) as f64;
        let each: Vec<f64> = (0..w)
            .map(|i| per_hour(count(&m.calls, layer, op, Some(i)) as f64, m.window))
            .collect();
        let (lo, hi) = (
            each.iter().copied().fold(f64::INFINITY, f64::min),
            each.iter().copied().fold(0.0, f64::max),
        );
        let model = model_per_worker_hour(op, m.streams)
            .filter(|_| plane == "control")
            .map_or("–".to_owned(), thousands);
        let limit = match op {
            "DescribeStreamSummary" => DESCRIBE_STREAM_SUMMARY_LIMIT,
            "ListShards" => LIST_SHARDS_LIMIT,
            _ => "",
        };
        let where_ = match layer {
            Layer::Client => "`StreamClient` call",
            Layer::Kinesis => "HTTP request",
            Layer::DynamoDb | Layer::Consistent => "DynamoDB HTTP request",
        };
        println!(
            "| {op} ({plane} plane) | {where_} | {} | {} ({} – {}) | {model} | {} | {limit} |",
            thousands(per_hour(fleet, m.window)),
            thousands(per_hour(fleet, m.window) / w as f64),
            thousands(lo),
            thousands(hi),
            peak_per_second(&times(&m.calls, layer, op, None)),
        );
    };
    let seen: BTreeSet<&str> = ops(&m.calls, Layer::Client)
        .union(&ops(&m.calls, Layer::Kinesis))
        .copied()
        .collect();
    for op in CONTROL_PLANE.iter().filter(|op| seen.contains(*op)) {
        kinesis_row(Layer::Client, op, "control");
        kinesis_row(Layer::Kinesis, op, "control");
    }
    for op in DATA_PLANE.iter().filter(|op| seen.contains(*op)) {
        kinesis_row(Layer::Client, op, "data");
        kinesis_row(Layer::Kinesis, op, "data");
    }
    for op in seen
        .iter()
        .filter(|op| !CONTROL_PLANE.contains(op) && !DATA_PLANE.contains(op))
    {
        kinesis_row(Layer::Kinesis, op, "other");
    }
    // How the per-stream syncs fall in time: spread over the interval as designed, each
    // worker's DescribeStreamSummary calls would fall into about as many distinct seconds as
    // there are calls (up to the window's seconds).
    let spread: Vec<String> = (0..w)
        .map(|i| {
            let t = times(&m.calls, Layer::Kinesis, "DescribeStreamSummary", Some(i));
            let seconds: BTreeSet<u64> = t.iter().map(Duration::as_secs).collect();
            format!(
                "w{i}: {} calls in {} distinct seconds, peak {} in any 1 s",
                t.len(),
                seconds.len(),
                peak_per_second(&t)
            )
        })
        .collect();
    println!(
        "\nDescribeStreamSummary over the {:.0} s window, per worker: {}.",
        m.window,
        spread.join("; ")
    );
    let control: Vec<Duration> = {
        let mut t: Vec<Duration> = m
            .calls
            .iter()
            .filter(|c| c.layer == Layer::Kinesis && CONTROL_PLANE.contains(&c.op))
            .map(|c| c.at)
            .collect();
        t.sort();
        t
    };
    println!(
        "\nKinesis control plane together (HTTP): {} an hour for the fleet, peak {} in any 1 s.\n",
        thousands(per_hour(control.len() as f64, m.window)),
        peak_per_second(&control)
    );

    println!(
        "| DynamoDB operation | requests/h (fleet) | per worker-hour (min – max) | HTTP requests/h (fleet) | items per request | read units/h (fleet) | write units/h (fleet) | units per request | design requests per worker-hour | fleet peak requests in any 1 s |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut dynamo_ops: BTreeSet<&'static str> = ops(&m.calls, Layer::DynamoDb);
    for u in &m.usage {
        dynamo_ops.extend(u.iter().filter(|(_, u)| u.requests > 0).map(|(op, _)| *op));
    }
    let mut total = OperationUsage::default();
    for op in &dynamo_ops {
        let each: Vec<OperationUsage> = m
            .usage
            .iter()
            .map(|u| u.get(op).copied().unwrap_or_default())
            .collect();
        let sum = OperationUsage::total(each.iter());
        total += sum;
        let per_worker: Vec<f64> = each
            .iter()
            .map(|u| per_hour(u.requests as f64, m.window))
            .collect();
        let (lo, hi) = (
            per_worker.iter().copied().fold(f64::INFINITY, f64::min),
            per_worker.iter().copied().fold(0.0, f64::max),
        );
        let requests = sum.requests.max(1) as f64;
        println!(
            "| {op} | {} | {} ({} – {}) | {} | {:.1} | {} | {} | {:.2} | {} | {} |",
            thousands(per_hour(sum.requests as f64, m.window)),
            thousands(per_hour(sum.requests as f64, m.window) / w as f64),
            thousands(lo),
            thousands(hi),
            thousands(per_hour(
                count(&m.calls, Layer::DynamoDb, op, None) as f64,
                m.window
            )),
            sum.items as f64 / requests,
            thousands(per_hour(sum.read_units.units(), m.window)),
            thousands(per_hour(sum.write_units.units(), m.window)),
            (sum.read_units.units() + sum.write_units.units()) / requests,
            model_per_worker_hour(op, m.streams).map_or("–".to_owned(), thousands),
            peak_per_second(&times(&m.calls, Layer::DynamoDb, op, None)),
        );
    }
    let consistent: Vec<String> = ops(&m.calls, Layer::Consistent)
        .into_iter()
        .map(|op| {
            format!(
                "{op} {} of {} an hour",
                thousands(per_hour(
                    count(&m.calls, Layer::Consistent, op, None) as f64,
                    m.window
                )),
                thousands(per_hour(
                    count(&m.calls, Layer::DynamoDb, op, None) as f64,
                    m.window
                ))
            )
        })
        .collect();
    println!(
        "\nStrongly consistent reads (`ConsistentRead`), fleet HTTP requests: {}.",
        if consistent.is_empty() {
            "none".to_owned()
        } else {
            consistent.join("; ")
        }
    );
    println!(
        "\nDynamoDB together: {} read units and {} write units an hour for the fleet ({} / {} per worker-hour).\n",
        thousands(per_hour(total.read_units.units(), m.window)),
        thousands(per_hour(total.write_units.units(), m.window)),
        thousands(per_hour(total.read_units.units(), m.window) / w as f64),
        thousands(per_hour(total.write_units.units(), m.window) / w as f64),
    );

    println!(
        "Start-up (from the workers' start to each stream spread over the fleet, {:.1} s), calls of the whole fleet:\n",
        m.to_settled
    );
    println!(
        "| call | `StreamClient` calls | HTTP requests | peak in any 1 s (HTTP) |\n|---|---|---|---|"
    );
    let startup_kinesis: BTreeSet<&'static str> = ops(&m.startup, Layer::Kinesis)
        .union(&ops(&m.startup, Layer::Client))
        .copied()
        .collect();
    for op in &startup_kinesis {
        println!(
            "| Kinesis {op} | {} | {} | {} |",
            count(&m.startup, Layer::Client, op, None),
            count(&m.startup, Layer::Kinesis, op, None),
            peak_per_second(&times(&m.startup, Layer::Kinesis, op, None)),
        );
    }
    let mut startup_usage: BTreeMap<&'static str, OperationUsage> = BTreeMap::new();
    for u in &m.startup_usage {
        for (op, x) in u {
            *startup_usage.entry(op).or_default() += *x;
        }
    }
    for op in ops(&m.startup, Layer::DynamoDb) {
        let u = startup_usage.get(op).copied().unwrap_or_default();
        println!(
            "| DynamoDB {op} ({} items, {} read units, {} write units) | – | {} | {} |",
            u.items,
            u.read_units.units(),
            u.write_units.units(),
            count(&m.startup, Layer::DynamoDb, op, None),
            peak_per_second(&times(&m.startup, Layer::DynamoDb, op, None)),
        );
    }
    println!();
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The workers' logs, when asked for (`RUST_LOG=kcl_core=info`), on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let window = Duration::from_secs(env_number("KCL_BENCH_MS_SECONDS", 300) as u64);
    let streams = env_number("KCL_BENCH_MS_STREAMS", 50);
    let shards = env_number("KCL_BENCH_MS_SHARDS", 4);
    let fleets: Vec<usize> = std::env::var("KCL_BENCH_MS_WORKERS")
        .unwrap_or_else(|_| "2".into())
        .split(',')
        .map(|w| w.trim().parse().expect("KCL_BENCH_MS_WORKERS: numbers"))
        .collect();
    let started = Instant::now();
    let names = create_streams(
        &unique("msb"),
        streams,
        i32::try_from(shards).expect("shards fit"),
    )
    .await;
    eprintln!(
        "created {streams} streams of {shards} shards in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    for workers in fleets {
        results.push(measure(&names, shards, workers, window).await);
    }
    println!(
        "## Multi-stream control-plane calls (library defaults, idle processors, kinesis-mock and DynamoDB Local)\n"
    );
    for m in &results {
        report(m);
    }
}
