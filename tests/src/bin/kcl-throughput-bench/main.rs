//! kcl-throughput-bench: records per second and CPU per record of the library against a raw
//! GetRecords loop, side by side in one run, on one stream of the same records (issue 11).
//!
//! The Kinesis server is ferrokinesis 0.7.0, embedded in a child process of this binary
//! (`kcl-throughput-bench serve`), so the CPU this process spends is the consumer's own: the
//! server's is not counted. The lease table is DynamoDB Local (started by `scripts/bench`).
//!
//! Phases, each reading the whole stream from `TRIM_HORIZON`:
//! - (a0) raw, unpaced: one task per shard paging `GetRecords` (10,000 records a call) as fast
//!   as the server answers, no leases, no checkpoints: the server's own ceiling. Real Kinesis
//!   throttles such a loop (5 reads per second per shard);
//! - (a) raw, paced: the same loop with at most one call per shard every 200 ms, as a correct
//!   loop against real Kinesis must (and as the library does, `polling.min_time_between_reads`):
//!   the ceiling the library is measured against;
//! - (b) one `Worker` whose processor checkpoints after every batch;
//! - (c) three workers in this process, sharing the shards.
//!
//! Throughput is measured from the first record received to the last (lease set-up before the
//! first record is not counted; it is in the fleet bench). CPU is this process's user +
//! system time over the same phase, from `/proc/self/stat`. Prints a Markdown report: the
//! median of the runs with min and max, and the ratios to (a).
//!
//! Usage: `kcl-throughput-bench [RUNS]` (default 3); environment `KCL_BENCH_RECORDS` (records
//! of 100 bytes per run, default 400,000; records of 10 KB are a tenth of that).

// A benchmark report is printed output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use kcl_core::{
    CancellationToken, Checkpointer, InitialPosition, KinesisStreamClient, LeaseStore, Record,
    RecordProcessor, StreamClient, Worker, WorkerConfig, async_trait,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{dynamodb, unique};
use tokio::time::Instant;

/// Shards of the bench stream: several, so per-shard parallelism shows, few enough that each
/// shard holds many batches.
const SHARDS: i32 = 4;
/// Records per PutRecords call: the API's maximum...
const PUT_BATCH: usize = 500;
/// ...within this many payload bytes: ferrokinesis refuses request bodies over 2 MB (its HTTP
/// layer's default), less than the 5 MiB of the real service, and base64 adds a third.
const PUT_BATCH_BYTES: usize = 1024 * 1024;
/// PutRecords calls in flight while filling the stream.
const PUTS_IN_FLIGHT: usize = 8;
/// Records per GetRecords call in the raw loop: the library's default `max_records`.
const RAW_LIMIT: i32 = 10_000;
/// The longest a phase may take before the bench gives up on it.
const PHASE_LIMIT: Duration = Duration::from_secs(600);
/// Workers of phase (c).
const FLEET: usize = 3;
/// The pace of the paced raw loop: Kinesis allows 5 `GetRecords` per second per shard, and
/// the library never reads faster (`polling.min_time_between_reads`, 200 ms at least).
const READ_PACE: Duration = Duration::from_millis(200);

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("serve") => serve(),
        runs => {
            let runs = runs.map_or(3, |r| r.parse().expect("RUNS is a number"));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(bench(runs));
        }
    }
}

/// Runs ferrokinesis until stdin closes, printing its address first.
fn serve() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let options = ferrokinesis::store::StoreOptions {
            create_stream_ms: 0,
            delete_stream_ms: 0,
            update_stream_ms: 0,
            shard_limit: 1000,
            ..Default::default()
        };
        let (app, _store) = ferrokinesis::create_app(options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        // The parent closes our stdin when it is done (or dies).
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {}
        })
        .await
        .ok();
    });
}

/// The ferrokinesis child process and its address.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the ferrokinesis child");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("its address");
        Server {
            child,
            url: line.trim().to_owned(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// What one phase measured.
#[derive(Clone, Copy, Debug)]
struct Figure {
    records_per_second: f64,
    cpu_seconds_per_million: f64,
}

/// Counts the records of a phase and when the first and last arrived.
#[derive(Debug)]
struct Progress {
    received: AtomicUsize,
    first: std::sync::Mutex<Option<(Instant, Duration)>>,
    done: tokio::sync::Notify,
    expected: usize,
}

impl Progress {
    fn new(expected: usize) -> Arc<Self> {
        Arc::new(Progress {
            received: AtomicUsize::new(0),
            first: std::sync::Mutex::new(None),
            done: tokio::sync::Notify::new(),
            expected,
        })
    }

    fn add(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.first
            .lock()
            .unwrap()
            .get_or_insert_with(|| (Instant::now(), cpu_time()));
        if self.received.fetch_add(n, Ordering::SeqCst) + n >= self.expected {
            self.done.notify_one();
        }
    }

    async fn wait(&self) -> Figure {
        tokio::time::timeout(PHASE_LIMIT, async {
            while self.received.load(Ordering::SeqCst) < self.expected {
                self.done.notified().await;
            }
        })
        .await
        .expect("the phase finished in time");
        let (end, cpu_end) = (Instant::now(), cpu_time());
        let (start, cpu_start) = self.first.lock().unwrap().expect("records arrived");
        let seconds = end.duration_since(start).as_secs_f64();
        let records = self.received.load(Ordering::SeqCst) as f64;
        Figure {
            records_per_second: records / seconds,
            cpu_seconds_per_million: (cpu_end - cpu_start).as_secs_f64() / records * 1e6,
        }
    }
}

async fn fill(client: &aws_sdk_kinesis::Client, stream: &str, records: usize, size: usize) {
    client
        .create_stream()
        .stream_name(stream)
        .shard_count(SHARDS)
        .send()
        .await
        .expect("CreateStream");
    let payload = Blob::new(vec![b'x'; size]);
    let batches: Vec<Vec<PutRecordsRequestEntry>> = (0..records)
        .map(|i| {
            PutRecordsRequestEntry::builder()
                .partition_key(format!("key-{i}"))
                .data(payload.clone())
                .build()
                .expect("entry")
        })
        .collect::<Vec<_>>()
        .chunks(PUT_BATCH.min(PUT_BATCH_BYTES / size.max(1)).max(1))
        .map(<[_]>::to_vec)
        .collect();
    let sent = futures_like_buffered(batches, |batch| {
        let client = client.clone();
        let stream = stream.to_owned();
        async move {
            let out = client
                .put_records()
                .stream_name(&stream)
                .set_records(Some(batch))
                .send()
                .await
                .expect("PutRecords");
            assert_eq!(out.failed_record_count(), Some(0), "puts failed");
        }
    });
    sent.await;
}

/// Runs `f` on every item with at most [`PUTS_IN_FLIGHT`] at once.
async fn futures_like_buffered<T, F, Fut>(items: Vec<T>, f: F)
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(PUTS_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        let permit = permits.clone().acquire_owned().await.expect("open");
        let call = f(item);
        tasks.spawn(async move {
            call.await;
            drop(permit);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("put task");
    }
}

/// (a) One task per shard paging GetRecords until it has read its share.
async fn raw_loop(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    records: usize,
    pace: Option<Duration>,
) -> Figure {
    let progress = Progress::new(records);
    let shards = KinesisStreamClient::new(client.clone(), stream)
        .list_shards()
        .await
        .expect("ListShards");
    let mut tasks = tokio::task::JoinSet::new();
    for shard in shards {
        let (client, stream, progress) = (client.clone(), stream.to_owned(), progress.clone());
        tasks.spawn(async move {
            let mut iterator = client
                .get_shard_iterator()
                .stream_name(&stream)
                .shard_id(&shard.shard_id)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("GetShardIterator")
                .shard_iterator
                .expect("an iterator");
            let mut last_call: Option<Instant> = None;
            loop {
                if let (Some(pace), Some(last)) = (pace, last_call) {
                    tokio::time::sleep_until(last + pace).await;
                }
                last_call = Some(Instant::now());
                let out = client
                    .get_records()
                    .shard_iterator(&iterator)
                    .limit(RAW_LIMIT)
                    .send()
                    .await
                    .expect("GetRecords");
                let got = out.records().len();
                // Touch every payload, as a processor would.
                let bytes: usize = out.records().iter().map(|r| r.data().as_ref().len()).sum();
                std::hint::black_box(bytes);
                progress.add(got);
                if got == 0 {
                    if progress.received.load(Ordering::SeqCst) >= progress.expected {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                match out.next_shard_iterator {
                    Some(next) => iterator = next,
                    None => return,
                }
            }
        });
    }
    let figure = progress.wait().await;
    tasks.abort_all();
    figure
}

/// Counts records and checkpoints after every batch.
struct Counting(Arc<Progress>);

#[async_trait]
impl RecordProcessor for Counting {
    type Error = kcl_core::Error;

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error> {
        let bytes: usize = records.iter().map(|r| r.data.len()).sum();
        std::hint::black_box(bytes);
        self.0.add(records.len());
        checkpointer.checkpoint().await
    }
}

/// (b) and (c): `workers` workers of one application in this process.
async fn workers(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    records: usize,
    workers: usize,
) -> Figure {
    let progress = Progress::new(records);
    let app = unique("throughput-app");
    let mut running = Vec::new();
    for w in 0..workers {
        let config = WorkerConfig::new(&app, stream)
            .with_worker_id(format!("w{w}"))
            .with_initial_position(InitialPosition::TrimHorizon);
        let stream_client: Arc<dyn StreamClient> =
            Arc::new(KinesisStreamClient::new(client.clone(), stream));
        let store: Arc<dyn LeaseStore> = Arc::new(DynamoLeaseStore::new(
            dynamodb().await,
            config.lease_table(),
        ));
        let progress = progress.clone();
        let worker = Worker::new(config, stream_client, store, move |_shard: &str| {
            Counting(progress.clone())
        })
        .expect("valid config");
        let shutdown = CancellationToken::new();
        running.push((shutdown.clone(), tokio::spawn(worker.run(shutdown))));
    }
    let figure = progress.wait().await;
    for (shutdown, _) in &running {
        shutdown.cancel();
    }
    for (_, task) in running {
        task.await.expect("worker task").expect("worker ran");
    }
    figure
}

fn median(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

async fn bench(runs: usize) {
    let hundred_bytes: usize = std::env::var("KCL_BENCH_RECORDS")
        .ok()
        .map_or(400_000, |s| {
            s.parse().expect("KCL_BENCH_RECORDS is a number")
        });
    let server = Server::start();
    eprintln!("ferrokinesis 0.7.0 at {} (child process)", server.url);
    let sdk = kcl_integration_tests::sdk_config().await;
    let config = aws_sdk_kinesis::config::Builder::from(&sdk)
        .endpoint_url(&server.url)
        .build();
    let client = aws_sdk_kinesis::Client::from_conf(config);

    let shapes = [(100usize, hundred_bytes), (10 * 1024, hundred_bytes / 10)];
    let phases = [
        "(a0) raw loop, unpaced",
        "(a) raw loop, paced 200 ms",
        "(b) one Worker",
        "(c) three Workers",
    ];
    let mut results: BTreeMap<(usize, usize), Vec<Figure>> = BTreeMap::new();
    for run in 0..runs {
        for (size, records) in shapes {
            let stream = unique("throughput");
            fill(&client, &stream, records, size).await;
            for (p, name) in phases.iter().enumerate() {
                let figure = match p {
                    0 => raw_loop(&client, &stream, records, None).await,
                    1 => raw_loop(&client, &stream, records, Some(READ_PACE)).await,
                    2 => workers(&client, &stream, records, 1).await,
                    _ => workers(&client, &stream, records, FLEET).await,
                };
                eprintln!(
                    "run {}: {size} B × {records}: {name}: {:.0} records/s, {:.2} CPU s per million",
                    run + 1,
                    figure.records_per_second,
                    figure.cpu_seconds_per_million
                );
                results.entry((size, p)).or_default().push(figure);
            }
        }
    }
    drop(server);

    println!("## Throughput and CPU per record ({runs} runs, median [min – max])\n");
    println!(
        "Kinesis: ferrokinesis 0.7.0 in a child process; leases: DynamoDB Local; {SHARDS} \
         shards; release build.\n"
    );
    println!(
        "| records | phase | records/s | ratio to (a) | CPU s per million records | CPU ratio to (a) |"
    );
    println!("|---|---|---|---|---|---|");
    for (size, records) in shapes {
        let raw = &results[&(size, 1)];
        let mut raw_rate: Vec<f64> = raw.iter().map(|f| f.records_per_second).collect();
        let mut raw_cpu: Vec<f64> = raw.iter().map(|f| f.cpu_seconds_per_million).collect();
        let (raw_rate, _, _) = median(&mut raw_rate);
        let (raw_cpu, _, _) = median(&mut raw_cpu);
        for (p, name) in phases.iter().enumerate() {
            let figures = &results[&(size, p)];
            let mut rate: Vec<f64> = figures.iter().map(|f| f.records_per_second).collect();
            let mut cpu: Vec<f64> = figures.iter().map(|f| f.cpu_seconds_per_million).collect();
            let (rate, rate_min, rate_max) = median(&mut rate);
            let (cpu, cpu_min, cpu_max) = median(&mut cpu);
            println!(
                "| {records} × {size} B | {name} | {rate:.0} [{rate_min:.0} – {rate_max:.0}] | {:.2} | {cpu:.2} [{cpu_min:.2} – {cpu_max:.2}] | {:.2} |",
                rate / raw_rate,
                cpu / raw_cpu
            );
        }
    }
}
