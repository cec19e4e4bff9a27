//! Peak memory of a worker holding many shards whose processor is stuck: what prefetch holds.
//!
//! The bench fills a stream, then runs [`child`] in a process of its own (a fresh heap, its
//! own peak-RSS counter): one worker whose processor blocks forever on its first batch, so
//! every shard fills its prefetch and stops. The child waits until no record has been
//! fetched for a while and reports its resident memory and what it fetched.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kcl_core::{
    CancellationToken, Checkpointer, InitialPosition, KinesisStreamClient, LeaseStore,
    PollingConfig, Record, RecordProcessor, RecordsPage, Result, Shard, StartingPosition,
    StreamClient, Worker, WorkerConfig, async_trait,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{dynamodb, unique};
use serde::{Deserialize, Serialize};

use crate::throughput::{Shape, fill};
use kcl_integration_tests::bench_server::Process;

/// Shards of the memory stream: "many", as one worker of a large fleet holds.
const SHARDS: i32 = 16;
/// Payload of a record, and records per `GetRecords` call: 1 MB batches.
const PAYLOAD: usize = 10 * 1024;
const PER_CALL: u32 = 100;
/// Batches a shard can hold at most: the prefetched ones and the one its processor has (the
/// poller fetches only into a free place of its queue).
const fn batches_held(max_prefetched_batches: usize) -> usize {
    max_prefetched_batches + 1
}
/// The largest `max_prefetched_batches` measured; the stream holds enough for it.
pub(crate) const PREFETCH_SETTINGS: [usize; 3] = [1, 3, 8];
/// The child reports once nothing has been fetched for this long.
const SETTLED: Duration = Duration::from_secs(3);

/// What the child reports.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct Footprint {
    pub(crate) max_prefetched_batches: usize,
    pub(crate) shards: usize,
    /// Resident bytes before the worker started, and at the peak.
    pub(crate) baseline: u64,
    pub(crate) peak: u64,
    /// Records and payload bytes fetched (all still held: nothing is processed).
    pub(crate) records: usize,
    pub(crate) payload_bytes: usize,
}

impl Footprint {
    /// `shards × batches held × batch bytes`: what prefetch may hold by the configuration.
    pub(crate) fn bound(&self) -> u64 {
        (self.shards * batches_held(self.max_prefetched_batches) * PER_CALL as usize * PAYLOAD)
            as u64
    }

    pub(crate) fn growth(&self) -> u64 {
        self.peak.saturating_sub(self.baseline)
    }
}

/// Fills a stream for [`child`] and returns its name.
pub(crate) async fn prepare(client: &aws_sdk_kinesis::Client) -> String {
    let stream = unique("memory");
    let most = PREFETCH_SETTINGS.iter().max().copied().unwrap_or(1);
    // Every shard holds a batch more than the largest setting can take.
    let per_shard = (batches_held(most) + 1) * PER_CALL as usize;
    let shape = Shape {
        name: "memory",
        payload: PAYLOAD,
        per_aggregate: 1,
        // Keys spread evenly over the shards' hash ranges; twice the need leaves margin.
        kinesis_records: per_shard * SHARDS as usize * 2,
        per_call: PER_CALL,
    };
    fill(client, &stream, shape, SHARDS).await;
    stream
}

/// Runs the child for one setting and reads its report.
pub(crate) async fn measure(kinesis_url: &str, stream: &str, prefetch: usize) -> Footprint {
    let out = tokio::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["memory", kinesis_url, stream, &prefetch.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run the memory child");
    assert!(
        out.status.success(),
        "memory child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the child's report")
}

/// Counts what `GetRecords` returned.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn StreamClient>,
    records: AtomicUsize,
    bytes: AtomicUsize,
}

#[async_trait]
impl StreamClient for Counting {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }

    async fn list_shards(&self) -> Result<Vec<Shard>> {
        self.inner.list_shards().await
    }

    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String> {
        self.inner.get_shard_iterator(shard_id, position).await
    }

    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        let page = self
            .inner
            .get_records(shard_id, shard_iterator, limit)
            .await?;
        self.records.fetch_add(page.records.len(), Ordering::SeqCst);
        let bytes: usize = page.records.iter().map(|r| r.data.len()).sum();
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        Ok(page)
    }
}

/// A processor that never finishes its first batch.
struct Stuck;

#[async_trait]
impl RecordProcessor for Stuck {
    type Error = kcl_core::Error;

    async fn process_records(
        &mut self,
        _records: &[Record],
        _checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error> {
        std::future::pending().await
    }
}

/// The child process: `kcl-throughput-bench memory URL STREAM MAX_PREFETCHED_BATCHES`.
pub(crate) fn child(kinesis_url: &str, stream: &str, prefetch: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let footprint = runtime.block_on(async {
        let sdk = kcl_integration_tests::sdk_config().await;
        let kinesis = aws_sdk_kinesis::Client::from_conf(
            aws_sdk_kinesis::config::Builder::from(&sdk)
                .endpoint_url(kinesis_url)
                .build(),
        );
        let counting = Arc::new(Counting {
            inner: Arc::new(KinesisStreamClient::new(kinesis, stream)),
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        });
        let config = WorkerConfig::new(unique("memory-app"), stream)
            .with_initial_position(InitialPosition::TrimHorizon)
            .with_polling(
                PollingConfig::default()
                    .with_max_records(PER_CALL)
                    .with_max_prefetched_batches(prefetch),
            );
        let store: Arc<dyn LeaseStore> = Arc::new(DynamoLeaseStore::new(
            dynamodb().await,
            config.lease_table(),
        ));
        let worker = Worker::new(config, counting.clone(), store, |_shard: &str| Stuck)
            .expect("valid config");
        let (baseline, _) = Process::This.resident();
        let shutdown = CancellationToken::new();
        // The process exits once it has reported: the worker is not waited for.
        let _running = tokio::spawn(worker.run(shutdown.clone()));
        let mut seen = 0;
        loop {
            tokio::time::sleep(SETTLED).await;
            let now = counting.records.load(Ordering::SeqCst);
            if now > 0 && now == seen {
                break;
            }
            seen = now;
        }
        let (_, peak) = Process::This.resident();
        Footprint {
            max_prefetched_batches: prefetch,
            shards: SHARDS as usize,
            baseline,
            peak,
            records: counting.records.load(Ordering::SeqCst),
            payload_bytes: counting.bytes.load(Ordering::SeqCst),
        }
    });
    println!("{}", serde_json::to_string(&footprint).expect("json"));
    std::process::exit(0);
}
