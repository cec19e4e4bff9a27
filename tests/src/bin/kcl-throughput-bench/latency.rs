//! Put-to-process latency on a caught-up stream: a producer puts records at a steady, low
//! rate, each carrying the moment it was put, and the reader notes how long each took to
//! reach it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use kcl_core::{
    CancellationToken, Checkpointer, FanOutConfig, InitialPosition, KinesisStreamClient,
    PollingConfig, Record, RecordProcessor, Retrieval, StreamClient, WorkerConfig, async_trait,
};
use kcl_integration_tests::unique;
use tokio::time::Instant;

use crate::throughput::{SHARDS, local_worker, trim_horizon};

/// Records put per second, over all shards: low enough that most reads of a caught-up
/// shard find nothing, so the idle time after an empty read shows.
const RATE_PER_SECOND: u32 = 8;
/// Records put before this long after the reader started are not counted: its leases are
/// taken and its first iterators got by then.
const WARM_UP: Duration = Duration::from_secs(5);
/// How long records are put and counted.
const MEASURED: Duration = Duration::from_secs(30);
/// Time after the last put for its record to arrive.
const DRAIN: Duration = Duration::from_secs(4);
/// The pace of the raw loop: as often as Kinesis allows.
const RAW_PACE: Duration = Duration::from_millis(200);

/// Who reads the stream.
#[derive(Clone, Debug)]
pub(crate) enum Reader {
    /// A raw `GetRecords` loop calling every 200 ms: the floor for polling.
    RawLoop,
    /// One `Worker` with these polling settings, checkpointing every batch.
    Worker(PollingConfig),
    /// One `Worker` reading with enhanced fan-out, checkpointing every batch.
    FanOut,
}

/// What one latency run measured.
#[derive(Clone, Debug)]
pub(crate) struct Latency {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) samples: usize,
    /// Median duration of a `GetRecords` call that found nothing (raw loop only).
    pub(crate) empty_read: Option<Duration>,
}

/// The delays seen, measured from `base`, which the producer's timestamps count from.
#[derive(Debug)]
struct Samples {
    base: Instant,
    counted_from: Duration,
    delays: Mutex<Vec<Duration>>,
    empty_reads: Mutex<Vec<Duration>>,
}

impl Samples {
    fn note(&self, data: &[u8]) {
        let now = self.base.elapsed();
        let put = std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_nanos)
            .expect("a record of the latency producer");
        if put >= self.counted_from {
            self.delays.lock().unwrap().push(now - put);
        }
    }
}

struct Noting(Arc<Samples>);

#[async_trait]
impl RecordProcessor for Noting {
    type Error = kcl_core::Error;

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error> {
        for record in records {
            self.0.note(&record.data);
        }
        checkpointer.checkpoint().await
    }
}

/// One latency run on a new, empty stream.
pub(crate) async fn measure(client: &aws_sdk_kinesis::Client, reader: Reader) -> Latency {
    let stream = unique("latency");
    client
        .create_stream()
        .stream_name(&stream)
        .shard_count(SHARDS)
        .send()
        .await
        .expect("CreateStream");
    let samples = Arc::new(Samples {
        base: Instant::now(),
        counted_from: WARM_UP,
        delays: Mutex::new(Vec::new()),
        empty_reads: Mutex::new(Vec::new()),
    });
    let stop = CancellationToken::new();
    let reading = match reader {
        Reader::RawLoop => raw_loop(client, &stream, samples.clone(), stop.clone()).await,
        Reader::Worker(polling) => {
            let config = WorkerConfig::new(unique("latency-app"), &stream).with_polling(polling);
            worker(client, config, samples.clone(), stop.clone()).await
        }
        Reader::FanOut => {
            let config = WorkerConfig::new(unique("latency-app"), &stream)
                .with_retrieval(Retrieval::FanOut(FanOutConfig::default()));
            worker(client, config, samples.clone(), stop.clone()).await
        }
    };
    produce(client, &stream, &samples).await;
    tokio::time::sleep(DRAIN).await;
    stop.cancel();
    reading.await.expect("reader task");

    let mut delays = samples.delays.lock().unwrap().clone();
    delays.sort();
    let expected = (MEASURED.as_secs_f64() * f64::from(RATE_PER_SECOND)) as usize;
    assert!(
        delays.len() + 1 >= expected,
        "{} of about {expected} records arrived",
        delays.len()
    );
    let mut empty = samples.empty_reads.lock().unwrap().clone();
    empty.sort();
    Latency {
        p50: delays[delays.len() / 2],
        p99: delays[delays.len() * 99 / 100],
        samples: delays.len(),
        empty_read: empty.get(empty.len() / 2).copied(),
    }
}

/// Puts one record every `1 / RATE_PER_SECOND` for the warm-up and the measured time, each
/// carrying the nanoseconds since `samples.base` at which it was sent.
async fn produce(client: &aws_sdk_kinesis::Client, stream: &str, samples: &Samples) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE_PER_SECOND);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut puts = tokio::task::JoinSet::new();
    while samples.base.elapsed() < WARM_UP + MEASURED {
        tick.tick().await;
        let (client, stream) = (client.clone(), stream.to_owned());
        let sent = samples.base.elapsed().as_nanos().to_string();
        // Each put on its own task, so a slow answer does not delay the next put's stamp.
        puts.spawn(async move {
            client
                .put_record()
                .stream_name(&stream)
                .partition_key(uuid::Uuid::new_v4().to_string())
                .data(Blob::new(sent))
                .send()
                .await
                .expect("PutRecord");
        });
    }
    while let Some(done) = puts.join_next().await {
        done.expect("put task");
    }
}

async fn worker(
    client: &aws_sdk_kinesis::Client,
    config: WorkerConfig,
    samples: Arc<Samples>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let config = config.with_initial_position(InitialPosition::TrimHorizon);
    let worker = local_worker(client, config, move |_shard: &str| Noting(samples.clone())).await;
    tokio::spawn(async move { worker.run(stop).await.expect("worker ran") })
}

async fn raw_loop(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    samples: Arc<Samples>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let shards = KinesisStreamClient::new(client.clone(), stream)
        .list_shards()
        .await
        .expect("ListShards");
    let mut tasks = tokio::task::JoinSet::new();
    for shard in shards {
        let (client, stream, samples) = (client.clone(), stream.to_owned(), samples.clone());
        tasks.spawn(async move {
            let mut iterator = trim_horizon(&client, &stream, &shard.shard_id).await;
            let mut next_call = Instant::now();
            loop {
                tokio::time::sleep_until(next_call).await;
                let called = Instant::now();
                next_call = called + RAW_PACE;
                let out = client
                    .get_records()
                    .shard_iterator(&iterator)
                    .send()
                    .await
                    .expect("GetRecords");
                if out.records().is_empty() {
                    samples.empty_reads.lock().unwrap().push(called.elapsed());
                }
                for record in out.records() {
                    samples.note(record.data().as_ref());
                }
                iterator = out.next_shard_iterator.expect("an open shard");
            }
        });
    }
    tokio::spawn(async move {
        stop.cancelled().await;
        tasks.shutdown().await;
    })
}
