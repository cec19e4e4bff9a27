//! Helpers for the integration tests, which run against real servers: kinesis-mock for Kinesis
//! and DynamoDB Local for the lease table, started by `scripts/test` and reached through the
//! SDK's standard variables `AWS_ENDPOINT_URL_KINESIS` and `AWS_ENDPOINT_URL_DYNAMODB`.
//!
//! Without those servers every test fails with a message saying how to start them: an
//! integration test never passes by skipping.

pub mod bench_server;
pub mod buffering;
pub mod kpl;
pub mod process;
pub mod proxy;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use kcl_core::{
    CancellationToken, Checkpoint, Checkpointer, KinesisStreamClient, LeaseStore, Record,
    RecordProcessor, StreamClient, Worker, WorkerConfig, async_trait,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Upper bound for a test's waits: kinesis-mock is slow on two busy cores.
pub const PATIENCE: Duration = Duration::from_secs(120);

fn require(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: the integration tests need kinesis-mock and DynamoDB Local. \
             Run them with `scripts/test`, which installs and starts both servers."
        ),
    }
}

/// The local S3 server's endpoint (`AWS_ENDPOINT_URL_S3`); panics when it is not set.
pub fn require_s3() -> String {
    match std::env::var("AWS_ENDPOINT_URL_S3") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "AWS_ENDPOINT_URL_S3 is not set: the archive and pipeline tests need the local S3 \
             server. Run them with `scripts/test`, which installs and starts it."
        ),
    }
}

/// The SDK configuration for the local servers (endpoints, region and keys from the
/// environment). Panics when the servers' variables are missing.
pub async fn sdk_config() -> aws_config::SdkConfig {
    require("AWS_ENDPOINT_URL_KINESIS");
    require("AWS_ENDPOINT_URL_DYNAMODB");
    aws_config::load_from_env().await
}

/// A Kinesis client for kinesis-mock.
pub async fn kinesis() -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(&sdk_config().await)
}

/// A DynamoDB client for DynamoDB Local.
pub async fn dynamodb() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config().await)
}

/// A name no other test uses: `prefix-` and 8 hex digits.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Creates a stream and waits until it is active.
pub async fn create_stream(client: &aws_sdk_kinesis::Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateStream {name}: {e:?}"));
    wait_for("stream active", Duration::from_secs(30), || async {
        client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .ok()
            .and_then(|o| {
                o.stream_description_summary()
                    .map(|d| d.stream_status().clone())
            })
            == Some(StreamStatus::Active)
    })
    .await;
}

/// A record that was put: its id (the payload), shard and sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// The payload, unique per record.
    pub data: String,
    /// The partition key.
    pub partition_key: String,
    /// The shard Kinesis chose.
    pub shard_id: String,
    /// The sequence number Kinesis assigned.
    pub sequence_number: String,
}

/// Puts records (`(partition key, payload)`), 500 per call, retrying rejected entries.
pub async fn put_records(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    records: &[(String, String)],
) -> Vec<Put> {
    let mut puts = Vec::with_capacity(records.len());
    for chunk in records.chunks(500) {
        let mut pending: Vec<&(String, String)> = chunk.iter().collect();
        while !pending.is_empty() {
            let entries = pending
                .iter()
                .map(|(key, data)| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(key)
                        .data(Blob::new(data.as_bytes()))
                        .build()
                        .expect("entry")
                })
                .collect();
            let output = client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
                .unwrap_or_else(|e| panic!("PutRecords {stream}: {e:?}"));
            let mut failed = Vec::new();
            for (record, result) in pending.iter().zip(output.records()) {
                match (result.shard_id(), result.sequence_number()) {
                    (Some(shard), Some(seq)) if result.error_code().is_none() => puts.push(Put {
                        data: record.1.clone(),
                        partition_key: record.0.clone(),
                        shard_id: shard.to_owned(),
                        sequence_number: seq.to_owned(),
                    }),
                    _ => failed.push(*record),
                }
            }
            if !failed.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            pending = failed;
        }
    }
    puts
}

/// `count` records `prefix-000000`… with partition keys spread over `keys` keys.
pub fn records(prefix: &str, from: usize, count: usize, keys: usize) -> Vec<(String, String)> {
    (from..from + count)
        .map(|i| (format!("key-{}", i % keys), format!("{prefix}-{i:06}")))
        .collect()
}

/// Waits until `done` returns true; panics after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What processors report, shared by all processors of a test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `initialize` with the starting checkpoint.
    Initialized(Checkpoint),
    /// `lease_lost`.
    LeaseLost,
    /// `shard_ended`.
    ShardEnded,
    /// `shutdown_requested`.
    ShutdownRequested,
}

/// A delivered record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Worker that processed it.
    pub worker: String,
    /// Shard it came from.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: String,
    /// Its payload as text.
    pub data: String,
    /// When it was delivered.
    pub at: Instant,
}

/// Deliveries; events as (worker, shard, event); the worker inside `process_records` of each
/// shard; and every time two workers were inside one shard's `process_records` at once.
type Log = (
    Vec<Delivered>,
    Vec<(String, String, Event, Instant)>,
    HashMap<String, String>,
    Vec<(String, String, String)>,
);

/// The log of deliveries and events of one test, and how long each batch takes.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Log>>, Duration);

impl Recorder {
    /// A recorder whose processors spend `delay` on every batch.
    pub fn slow(delay: Duration) -> Self {
        Recorder(Arc::default(), delay)
    }

    /// Everything delivered, in delivery order.
    pub fn delivered(&self) -> Vec<Delivered> {
        self.0.lock().unwrap().0.clone()
    }
    /// Number of deliveries.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().0.len()
    }
    /// Events of `shard_id`, in order, with the worker that reported them.
    pub fn events(&self, shard_id: &str) -> Vec<(String, Event)> {
        let log = self.0.lock().unwrap();
        log.1
            .iter()
            .filter(|(_, s, _, _)| s == shard_id)
            .map(|(w, _, e, _)| (w.clone(), e.clone()))
            .collect()
    }
    /// All events as (worker, shard, event).
    pub fn all_events(&self) -> Vec<(String, String, Event)> {
        self.0
            .lock()
            .unwrap()
            .1
            .iter()
            .map(|(w, s, e, _)| (w.clone(), s.clone(), e.clone()))
            .collect()
    }
    /// When `worker` reported an event matching `what` for `shard_id`, the first time after
    /// `since`.
    pub fn event_time(
        &self,
        worker: &str,
        shard_id: &str,
        since: Instant,
        what: impl Fn(&Event) -> bool,
    ) -> Option<Instant> {
        let log = self.0.lock().unwrap();
        log.1
            .iter()
            .find(|(w, s, e, at)| w == worker && s == shard_id && *at >= since && what(e))
            .map(|(_, _, _, at)| *at)
    }
    /// Each time two workers were processing records of one shard at the same time:
    /// (shard, worker already in it, worker that entered).
    pub fn overlaps(&self) -> Vec<(String, String, String)> {
        self.0.lock().unwrap().3.clone()
    }
    fn event(&self, worker: &str, shard_id: &str, event: Event) {
        self.0.lock().unwrap().1.push((
            worker.to_owned(),
            shard_id.to_owned(),
            event,
            Instant::now(),
        ));
    }
    /// A factory of recording processors for `worker`.
    pub fn factory(
        &self,
        worker: &str,
    ) -> impl Fn(&str) -> RecordingProcessor + Send + Sync + 'static {
        let (recorder, worker) = (self.clone(), worker.to_owned());
        move |shard_id: &str| RecordingProcessor {
            worker: worker.clone(),
            shard_id: shard_id.to_owned(),
            recorder: recorder.clone(),
        }
    }
}

/// Records each batch, then checkpoints it; checkpoints again when asked to shut down.
/// A processor that does nothing (benches measuring the library's own calls).
#[derive(Debug)]
pub struct Idle;

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

#[derive(Debug)]
pub struct RecordingProcessor {
    worker: String,
    shard_id: String,
    recorder: Recorder,
}

#[async_trait]
impl RecordProcessor for RecordingProcessor {
    type Error = kcl_core::Error;

    async fn initialize(
        &mut self,
        shard_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), Self::Error> {
        self.recorder.event(
            &self.worker,
            shard_id,
            Event::Initialized(checkpoint.clone()),
        );
        Ok(())
    }

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error> {
        tokio::time::sleep(self.recorder.1).await;
        let now = Instant::now();
        {
            let mut log = self.recorder.0.lock().unwrap();
            if let Some(other) = log.2.insert(self.shard_id.clone(), self.worker.clone()) {
                log.3
                    .push((self.shard_id.clone(), other, self.worker.clone()));
            }
            for r in records {
                log.0.push(Delivered {
                    worker: self.worker.clone(),
                    shard_id: self.shard_id.clone(),
                    sequence_number: r.sequence_number.to_string(),
                    data: String::from_utf8_lossy(&r.data).into_owned(),
                    at: now,
                });
            }
        }
        let result = checkpointer.checkpoint().await;
        self.recorder.0.lock().unwrap().2.remove(&self.shard_id);
        result
    }

    async fn lease_lost(&mut self) {
        self.recorder
            .event(&self.worker, &self.shard_id, Event::LeaseLost);
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Self::Error> {
        self.recorder
            .event(&self.worker, &self.shard_id, Event::ShardEnded);
        checkpointer.checkpoint().await
    }

    async fn shutdown_requested(
        &mut self,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Self::Error> {
        self.recorder
            .event(&self.worker, &self.shard_id, Event::ShutdownRequested);
        checkpointer.checkpoint().await
    }
}

/// A worker running in a task of the test.
#[derive(Debug)]
pub struct RunningWorker {
    /// Cancel to shut the worker down.
    pub shutdown: CancellationToken,
    /// The worker's task.
    pub task: JoinHandle<kcl_core::Result<()>>,
    /// The worker's status.
    pub status: tokio::sync::watch::Receiver<kcl_core::WorkerStatus>,
}

impl RunningWorker {
    /// Shuts the worker down gracefully and returns its result.
    pub async fn stop(self) -> kcl_core::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("worker shut down in time")
            .expect("worker task did not panic")
    }
}

/// The stream client and lease store of `config`, on the local servers.
pub async fn clients(config: &WorkerConfig) -> (Arc<dyn StreamClient>, Arc<dyn LeaseStore>) {
    let sdk = sdk_config().await;
    let stream = Arc::new(KinesisStreamClient::new(
        aws_sdk_kinesis::Client::new(&sdk),
        &config.stream,
    ));
    let store = Arc::new(DynamoLeaseStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        config.lease_table(),
    ));
    (stream, store)
}

/// Starts a worker with recording processors.
pub async fn start_worker(config: WorkerConfig, recorder: &Recorder) -> RunningWorker {
    let (stream, store) = clients(&config).await;
    start_worker_on(config, recorder, stream, store)
}

/// Starts a worker with recording processors on the given clients.
pub fn start_worker_on(
    config: WorkerConfig,
    recorder: &Recorder,
    stream: Arc<dyn StreamClient>,
    store: Arc<dyn LeaseStore>,
) -> RunningWorker {
    let factory = recorder.factory(&config.worker_id);
    let worker = Worker::new(config, stream, store, factory).expect("valid config");
    let status = worker.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    RunningWorker {
        shutdown,
        task,
        status,
    }
}

/// A DynamoDB lease store whose requests go through `endpoint` (a [`proxy::FaultProxy`]),
/// with the SDK making at most `attempts` attempts per call.
pub async fn lease_store_via(endpoint: &str, table: &str, attempts: u32) -> DynamoLeaseStore {
    let sdk = sdk_config().await;
    let config = aws_sdk_dynamodb::config::Builder::from(&sdk)
        .endpoint_url(endpoint)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(attempts))
        .build();
    DynamoLeaseStore::new(aws_sdk_dynamodb::Client::from_conf(config), table)
}

/// The owner of each lease of `table`, by worker: worker → leases (empty while the table
/// does not exist yet).
pub async fn lease_owners(table: &str) -> BTreeMap<String, usize> {
    let store = DynamoLeaseStore::new(dynamodb().await, table);
    let mut owners = BTreeMap::new();
    let leases = match store.list_leases().await {
        Ok(scan) => scan.leases,
        Err(kcl_core::Error::LeaseTableNotFound { .. }) => Vec::new(),
        Err(e) => panic!("scan the lease table {table}: {e}"),
    };
    for lease in leases {
        if kcl_core::is_watcher_slot(&lease.lease_key) {
            continue;
        }
        if let Some(owner) = lease.owner {
            *owners.entry(owner).or_default() += 1;
        }
    }
    owners
}

/// True when `table` has `leases` leases, all owned, none with a handoff pending, spread over
/// exactly `workers` workers at ⌊leases/workers⌋ or ⌈leases/workers⌉ each.
pub async fn evenly_owned(table: &str, workers: usize, leases: usize) -> bool {
    let store = DynamoLeaseStore::new(dynamodb().await, table);
    let Ok(mut scan) = store.list_leases().await else {
        return false;
    };
    scan.take_watcher_slots();
    let settled = scan.leases.len() == leases
        && scan
            .leases
            .iter()
            .all(|l| l.owner.is_some() && l.handoff_to.is_none());
    let mut owners: BTreeMap<&str, usize> = BTreeMap::new();
    for lease in &scan.leases {
        if let Some(owner) = &lease.owner {
            *owners.entry(owner).or_default() += 1;
        }
    }
    let (floor, ceil) = (leases / workers, leases.div_ceil(workers));
    settled && owners.len() == workers && owners.values().all(|c| (floor..=ceil).contains(c))
}

/// Deliveries grouped by shard, as sequence numbers in delivery order.
pub fn by_shard(delivered: &[Delivered]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in delivered {
        map.entry(d.shard_id.clone())
            .or_default()
            .push(d.sequence_number.clone());
    }
    map
}

/// Puts grouped by shard, as sequence numbers in put order (which is shard order).
pub fn puts_by_shard(puts: &[Put]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in puts {
        map.entry(p.shard_id.clone())
            .or_default()
            .push(p.sequence_number.clone());
    }
    for seqs in map.values_mut() {
        seqs.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    }
    map
}

/// Path of a binary of the `kcl-examples` package. `scripts/test` builds them before the
/// tests run (a `cargo build` from inside `cargo test` inherits variables that make cargo
/// rebuild the dependency tree); a missing binary, or one older than a source file it was
/// built from (as listed in cargo's dep-info file next to it), fails the test with
/// instructions instead of running stale code.
pub fn example_binary(name: &str) -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    let path = target.join("debug").join(name);
    let hint = "run the tests with scripts/test, or `cargo build -p kcl-examples --bins` first";
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let built =
        modified(&path).unwrap_or_else(|| panic!("{} does not exist: {hint}", path.display()));
    let dep_info = std::fs::read_to_string(path.with_extension("d")).unwrap_or_default();
    let sources = dep_info.split_once(": ").map_or("", |(_, deps)| deps);
    for source in sources.split_whitespace().map(std::path::Path::new) {
        if modified(source).is_some_and(|t| t > built) {
            panic!(
                "{} is older than {}: {hint}",
                path.display(),
                source.display()
            );
        }
    }
    path
}

/// Waits until the stream is `ACTIVE` again after a reshard.
pub async fn wait_active(client: &aws_sdk_kinesis::Client, stream: &str) {
    wait_for("stream active", Duration::from_secs(60), || async {
        client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .ok()
            .and_then(|o| {
                o.stream_description_summary()
                    .map(|d| d.stream_status().clone())
            })
            == Some(StreamStatus::Active)
    })
    .await;
}

/// The stream's shards as `ListShards` lists them.
pub async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<kcl_core::Shard> {
    KinesisStreamClient::new(client.clone(), stream)
        .list_shards()
        .await
        .expect("ListShards")
}

/// Splits an open shard at the middle of its hash key range.
pub async fn split_shard(client: &aws_sdk_kinesis::Client, stream: &str, shard_id: &str) {
    let shards = list_shards(client, stream).await;
    let range = shards
        .iter()
        .find(|s| s.shard_id == shard_id)
        .expect("the shard")
        .hash_key_range;
    let middle =
        range.starting_hash_key + (range.ending_hash_key - range.starting_hash_key) / 2 + 1;
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard_id)
        .new_starting_hash_key(middle.to_string())
        .send()
        .await
        .expect("SplitShard");
    wait_active(client, stream).await;
}

/// Merges two adjacent open shards.
pub async fn merge_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
    adjacent: &str,
) {
    client
        .merge_shards()
        .stream_name(stream)
        .shard_to_merge(shard_id)
        .adjacent_shard_to_merge(adjacent)
        .send()
        .await
        .expect("MergeShards");
    wait_active(client, stream).await;
}

/// Scales the stream to `count` open shards (uniform scaling).
pub async fn update_shard_count(client: &aws_sdk_kinesis::Client, stream: &str, count: i32) {
    client
        .update_shard_count()
        .stream_name(stream)
        .target_shard_count(count)
        .scaling_type(aws_sdk_kinesis::types::ScalingType::UniformScaling)
        .send()
        .await
        .expect("UpdateShardCount");
    wait_active(client, stream).await;
}

/// Puts one record per key (`key-j`, data `key-j:n`) every `every` until stopped; `n` counts
/// the records of each key. Puts that fail while the stream reshards are retried.
#[derive(Debug)]
pub struct KeyedProducer {
    stop: CancellationToken,
    task: JoinHandle<usize>,
}

impl KeyedProducer {
    /// Starts producing for `keys` keys.
    pub fn start(
        client: aws_sdk_kinesis::Client,
        stream: &str,
        keys: usize,
        every: Duration,
    ) -> Self {
        let stop = CancellationToken::new();
        let (stream, token) = (stream.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0usize;
            while !token.is_cancelled() {
                let batch: Vec<(String, String)> = (0..keys)
                    .map(|k| (format!("key-{k}"), format!("key-{k}:{n}")))
                    .collect();
                loop {
                    let entries = batch
                        .iter()
                        .map(|(key, data)| {
                            PutRecordsRequestEntry::builder()
                                .partition_key(key)
                                .data(Blob::new(data.as_bytes()))
                                .build()
                                .expect("entry")
                        })
                        .collect();
                    match client
                        .put_records()
                        .stream_name(&stream)
                        .set_records(Some(entries))
                        .send()
                        .await
                    {
                        Ok(out) if out.failed_record_count().unwrap_or(0) == 0 => break,
                        // Retry the whole batch: the ids make duplicates visible, the check
                        // below tolerates them (at least once).
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                n += 1;
                tokio::time::sleep(every).await;
            }
            n * keys
        });
        KeyedProducer { stop, task }
    }

    /// Stops; returns how many distinct records were put.
    pub async fn stop(self) -> usize {
        self.stop.cancel();
        self.task.await.expect("producer")
    }
}

/// Every keyed record was delivered, and for each key the first deliveries came in counter
/// order: a record of a key was never processed before an earlier record of that key, across
/// parent and child shards.
pub fn assert_complete_and_in_key_order(recorder: &Recorder, distinct: usize) {
    let mut first: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for d in recorder.delivered() {
        if seen.insert(d.data.clone()) {
            let (key, n) = d.data.split_once(':').expect("key:n");
            first
                .entry(key.to_owned())
                .or_default()
                .push(n.parse().expect("counter"));
        }
    }
    assert_eq!(seen.len(), distinct, "every record delivered");
    for (key, counters) in first {
        let mut sorted = counters.clone();
        sorted.sort_unstable();
        assert_eq!(counters, sorted, "{key}: records processed out of order");
    }
}

/// Distinct records delivered so far.
pub fn distinct_delivered(recorder: &Recorder) -> usize {
    recorder
        .delivered()
        .into_iter()
        .map(|d| d.data)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// A Kinesis stream client whose requests go through `endpoint` (a [`proxy::FaultProxy`]),
/// with the SDK making at most `attempts` attempts per call.
pub async fn stream_client_via(endpoint: &str, stream: &str, attempts: u32) -> KinesisStreamClient {
    let sdk = sdk_config().await;
    let config = aws_sdk_kinesis::config::Builder::from(&sdk)
        .endpoint_url(endpoint)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(attempts))
        .build();
    KinesisStreamClient::new(aws_sdk_kinesis::Client::from_conf(config), stream)
}

/// Puts records with the given raw data (KPL aggregates, say), one per call, in order.
pub async fn put_raw(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    partition_key: &str,
    data: &[u8],
) -> String {
    client
        .put_record()
        .stream_name(stream)
        .partition_key(partition_key)
        .data(Blob::new(data))
        .send()
        .await
        .expect("PutRecord")
        .sequence_number
}
