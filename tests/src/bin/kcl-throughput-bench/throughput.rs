//! The throughput phases: a raw `GetRecords` loop, `Worker`s in this process, and
//! `kcl-consumer` as a process, each reading the same stream from `TRIM_HORIZON`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use kcl_core::{
    CancellationToken, Checkpointer, InitialPosition, KinesisStreamClient, LeaseStore,
    PollingConfig, Record, RecordProcessor, RecordProcessorFactory, Retrieval, StreamClient,
    Worker, WorkerConfig, async_trait,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{dynamodb, kpl, unique};
use tokio::time::Instant;

use kcl_integration_tests::bench_server::Process;

/// Shards of the bench streams: several, so per-shard parallelism shows, few enough that each
/// shard holds many batches.
pub(crate) const SHARDS: i32 = 4;
/// Records per PutRecords call: the API's maximum...
const PUT_BATCH: usize = 500;
/// ...within this many payload bytes: ferrokinesis refuses request bodies over 2 MB (its HTTP
/// layer's default), less than the 5 MiB of the real service, and base64 adds a third.
const PUT_BATCH_BYTES: usize = 1024 * 1024;
/// PutRecords calls in flight while filling the stream.
const PUTS_IN_FLIGHT: usize = 8;
/// The longest a phase may take before the bench gives up on it.
const PHASE_LIMIT: Duration = Duration::from_secs(600);
/// The part of a phase that is measured: from the record that makes this share of the whole
/// to the one that makes [`WINDOW_END`]. Leaving out the start (leases taken, iterators got,
/// the first calls in flight) and the tail (shards finishing one after another) measures the
/// steady rate; with about 50 calls per shard, one call more or less moves it by 2–3%.
const WINDOW_START: f64 = 0.1;
const WINDOW_END: f64 = 0.9;
/// How often phase (d) looks at the output file.
const OUTPUT_POLL: Duration = Duration::from_millis(20);

/// What the stream holds and how it is read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) name: &'static str,
    /// Payload bytes of a user record.
    pub(crate) payload: usize,
    /// User records per Kinesis record: 1 for plain records, more for KPL aggregates.
    pub(crate) per_aggregate: usize,
    /// Kinesis records in the stream.
    pub(crate) kinesis_records: usize,
    /// `GetRecords` limit of every reader: about 500 KB a call, so every shape takes the same
    /// number of calls (the real service answers at most 10 MiB a call; ferrokinesis has no
    /// cap, so 10,000 records of 10 KB would come as one 100 MB answer).
    pub(crate) per_call: u32,
}

impl Shape {
    pub(crate) fn user_records(&self) -> usize {
        self.kinesis_records * self.per_aggregate
    }
}

/// What one phase measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Figure {
    pub(crate) records_per_second: f64,
    pub(crate) cpu_seconds_per_million: f64,
}

/// A point of a phase: records received by then, when, and the process's CPU time.
type Mark = (usize, Instant, Duration);

/// Counts the records of a phase and marks the two ends of its measured window.
#[derive(Debug)]
pub(crate) struct Progress {
    received: AtomicUsize,
    marks: std::sync::Mutex<[Option<Mark>; 2]>,
    done: tokio::sync::Notify,
    expected: usize,
    process: Process,
}

impl Progress {
    pub(crate) fn new(expected: usize, process: Process) -> Arc<Self> {
        Arc::new(Progress {
            received: AtomicUsize::new(0),
            marks: std::sync::Mutex::new([None, None]),
            done: tokio::sync::Notify::new(),
            expected,
            process,
        })
    }

    pub(crate) fn add(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.received.fetch_add(n, Ordering::SeqCst);
        let after = before + n;
        for (i, share) in [WINDOW_START, WINDOW_END].into_iter().enumerate() {
            let threshold = (self.expected as f64 * share) as usize;
            if before < threshold && after >= threshold {
                self.marks.lock().unwrap()[i] =
                    Some((after, Instant::now(), self.process.cpu_time()));
            }
        }
        if after >= self.expected {
            self.done.notify_one();
        }
    }

    pub(crate) fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    pub(crate) fn finished(&self) -> bool {
        self.received() >= self.expected
    }

    pub(crate) async fn wait(&self) -> Figure {
        tokio::time::timeout(PHASE_LIMIT, async {
            while !self.finished() {
                self.done.notified().await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the phase did not finish within {PHASE_LIMIT:?}: {} of {} records",
                self.received(),
                self.expected
            )
        });
        let [start, end] = *self.marks.lock().unwrap();
        let ((n0, t0, cpu0), (n1, t1, cpu1)) = (start.expect("start"), end.expect("end"));
        let records = (n1 - n0) as f64;
        Figure {
            records_per_second: records / t1.duration_since(t0).as_secs_f64(),
            cpu_seconds_per_million: (cpu1 - cpu0).as_secs_f64() / records * 1e6,
        }
    }
}

/// Creates `stream` with `shards` shards and fills it with `shape`'s records.
pub(crate) async fn fill(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shape: Shape,
    shards: i32,
) {
    client
        .create_stream()
        .stream_name(stream)
        .shard_count(shards)
        .send()
        .await
        .expect("CreateStream");
    let record_bytes = shape.payload * shape.per_aggregate;
    let per_put = PUT_BATCH.min(PUT_BATCH_BYTES / record_bytes.max(1)).max(1);
    let permits = Arc::new(tokio::sync::Semaphore::new(PUTS_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for first in (0..shape.kinesis_records).step_by(per_put) {
        let permit = permits.clone().acquire_owned().await.expect("open");
        let (client, stream) = (client.clone(), stream.to_owned());
        let last = (first + per_put).min(shape.kinesis_records);
        tasks.spawn(async move {
            let entries = (first..last).map(|i| kinesis_record(shape, i)).collect();
            let out = client
                .put_records()
                .stream_name(&stream)
                .set_records(Some(entries))
                .send()
                .await
                .expect("PutRecords");
            assert_eq!(out.failed_record_count(), Some(0), "puts failed");
            drop(permit);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("put task");
    }
}

/// The `i`th Kinesis record of `shape`. Partition keys are of one width, so that the lines
/// `kcl-consumer` writes are too; the user records of an aggregate share its key (the KPL
/// aggregates only records of one shard).
fn kinesis_record(shape: Shape, i: usize) -> PutRecordsRequestEntry {
    let key = format!("key-{i:08}");
    let payload = vec![b'x'; shape.payload];
    let data = if shape.per_aggregate == 1 {
        payload
    } else {
        let users: Vec<(String, Vec<u8>)> = (0..shape.per_aggregate)
            .map(|_| (key.clone(), payload.clone()))
            .collect();
        kpl::aggregate(&users)
    };
    PutRecordsRequestEntry::builder()
        .partition_key(key)
        .data(Blob::new(data))
        .build()
        .expect("entry")
}

/// (a0) and (a): one task per shard paging `GetRecords` until the stream is read, at most one
/// call per `pace` when given. KPL aggregates are decoded (`kpl::user_records`: protobuf and
/// digest, as a hand-written consumer must), so both sides pay for de-aggregation.
pub(crate) async fn raw_loop(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shape: Shape,
    pace: Option<Duration>,
) -> Figure {
    let progress = Progress::new(shape.user_records(), Process::This);
    let shards = KinesisStreamClient::new(client.clone(), stream)
        .list_shards()
        .await
        .expect("ListShards");
    let mut tasks = tokio::task::JoinSet::new();
    for shard in shards {
        let (client, stream, progress) = (client.clone(), stream.to_owned(), progress.clone());
        tasks.spawn(async move {
            let mut iterator = trim_horizon(&client, &stream, &shard.shard_id).await;
            let mut last_call: Option<Instant> = None;
            loop {
                if let (Some(pace), Some(last)) = (pace, last_call) {
                    tokio::time::sleep_until(last + pace).await;
                }
                last_call = Some(Instant::now());
                let out = client
                    .get_records()
                    .shard_iterator(&iterator)
                    .limit(shape.per_call as i32)
                    .send()
                    .await
                    .expect("GetRecords");
                let got = out.records.len();
                // Touch every payload, as a processor would; a consumer of KPL records must
                // take them out of their aggregates.
                let mut users = 0;
                let mut bytes = 0;
                for record in out.records {
                    let data = bytes::Bytes::from(record.data.into_inner());
                    if shape.per_aggregate == 1 {
                        users += 1;
                        bytes += data.len();
                    } else {
                        let inside = kpl::user_records(data).expect("a KPL aggregate");
                        users += inside.len();
                        bytes += inside.iter().map(bytes::Bytes::len).sum::<usize>();
                    }
                }
                std::hint::black_box(bytes);
                progress.add(users);
                if got == 0 {
                    if progress.finished() {
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

/// A `TRIM_HORIZON` iterator of `shard_id`, where the raw loops start.
pub(crate) async fn trim_horizon(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
) -> String {
    client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("GetShardIterator")
        .shard_iterator
        .expect("an iterator")
}

/// A worker of `config` reading through `client`, its leases on DynamoDB Local.
pub(crate) async fn local_worker<F: RecordProcessorFactory>(
    client: &aws_sdk_kinesis::Client,
    config: WorkerConfig,
    factory: F,
) -> Worker<F> {
    let stream: Arc<dyn StreamClient> =
        Arc::new(KinesisStreamClient::new(client.clone(), &config.stream));
    let store: Arc<dyn LeaseStore> = Arc::new(DynamoLeaseStore::new(
        dynamodb().await,
        config.lease_table(),
    ));
    Worker::new(config, stream, store, factory).expect("valid config")
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

/// (b), (c) and (e): `workers` workers of one application in this process, reading as
/// `retrieval` says.
pub(crate) async fn workers(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shape: Shape,
    workers: usize,
    retrieval: Retrieval,
) -> Figure {
    let progress = Progress::new(shape.user_records(), Process::This);
    let app = unique("throughput-app");
    let mut running = Vec::new();
    for w in 0..workers {
        let config = WorkerConfig::new(&app, stream)
            .with_worker_id(format!("w{w}"))
            .with_initial_position(InitialPosition::TrimHorizon)
            .with_polling(PollingConfig::default().with_max_records(shape.per_call))
            .with_retrieval(retrieval.clone());
        let progress = progress.clone();
        let worker = local_worker(client, config, move |_shard: &str| {
            Counting(progress.clone())
        })
        .await;
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

/// `kcl-consumer` of this build (`scripts/bench` builds it next to the bench).
fn consumer_binary() -> PathBuf {
    let path = std::env::current_exe()
        .expect("own path")
        .with_file_name("kcl-consumer");
    assert!(
        path.exists(),
        "{} does not exist: run the bench with scripts/bench, which builds it",
        path.display()
    );
    path
}

/// (d): `kcl-consumer` as a process writing JSON lines to a file, as an operator runs it.
/// Records are counted as lines in the file; CPU is the process's own.
pub(crate) async fn consumer_process(kinesis_url: &str, stream: &str, shape: Shape) -> Figure {
    let output = std::env::temp_dir().join(format!("{}.jsonl", unique("kcl-bench-output")));
    let mut child = tokio::process::Command::new(consumer_binary())
        .args(["--app", &unique("throughput-cli"), "--stream", stream])
        .args(["--initial-position", "trim-horizon"])
        .args(["--max-records", &shape.per_call.to_string()])
        .arg("--output")
        .arg(&output)
        .env("AWS_ENDPOINT_URL_KINESIS", kinesis_url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start kcl-consumer");
    let pid = child.id().expect("pid");
    let progress = Progress::new(shape.user_records(), Process::Child(pid));
    let watch = {
        let (progress, output) = (progress.clone(), output.clone());
        tokio::spawn(async move {
            let mut read = 0u64;
            while !progress.finished() {
                tokio::time::sleep(OUTPUT_POLL).await;
                let (lines, upto) = count_new_lines(&output, read);
                read = upto;
                progress.add(lines);
            }
        })
    };
    let figure = progress.wait().await;
    watch.await.expect("watcher");
    let terminated = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(terminated.success(), "SIGTERM to kcl-consumer");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("kcl-consumer exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "kcl-consumer exited with {status}");
    let _ = std::fs::remove_file(&output);
    figure
}

/// Newlines in `path` after byte `from`, and how far it was read.
fn count_new_lines(path: &std::path::Path, from: u64) -> (usize, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return (0, from);
    };
    file.seek(SeekFrom::Start(from)).expect("seek");
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).expect("read the output");
    // Only whole lines count; a line still being written is read again next time.
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let lines = bytes[..whole].iter().filter(|&&b| b == b'\n').count();
    (lines, from + whole as u64)
}
