//! Worker behaviour on the in-memory stream and lease store, on paused Tokio time.
//! (The same behaviours are tested against kinesis-mock and DynamoDB Local in `tests/`.)

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    CancellationToken, Checkpoint, Checkpointer, Error, InitialPosition, LeaseConfig, LeaseStore,
    LeaseUpdate, PollingConfig, Record, RecordProcessor, StreamClient, Worker, WorkerConfig,
    async_trait,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Initialized(Checkpoint),
    Batch(usize),
    LeaseLost,
    ShutdownRequested,
}

#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<LogInner>>);

#[derive(Debug, Default)]
struct LogInner {
    /// (worker, shard, sequence number, data) in delivery order.
    delivered: Vec<(String, String, String, Vec<u8>)>,
    events: Vec<(String, Event)>,
}

impl Log {
    fn delivered(&self) -> Vec<(String, String, String, Vec<u8>)> {
        self.0.lock().unwrap().delivered.clone()
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().delivered.len()
    }
    fn events(&self, shard: &str) -> Vec<Event> {
        let inner = self.0.lock().unwrap();
        inner
            .events
            .iter()
            .filter(|(s, _)| s == shard)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// How a test processor misbehaves.
#[derive(Debug, Clone, Default)]
struct Faults {
    /// process_records calls that fail, counted over all shards; before failing, the processor
    /// checkpoints at the first record of the batch.
    failures_left: Arc<AtomicUsize>,
    /// Shards whose every batch fails.
    always_fail: Option<String>,
    /// Time spent per batch.
    delay: Duration,
}

struct TestProcessor {
    worker: String,
    shard: String,
    log: Log,
    faults: Faults,
}

#[async_trait]
impl RecordProcessor for TestProcessor {
    type Error = Error;

    async fn initialize(&mut self, shard_id: &str, checkpoint: &Checkpoint) -> Result<(), Error> {
        self.log
            .0
            .lock()
            .unwrap()
            .events
            .push((shard_id.to_owned(), Event::Initialized(checkpoint.clone())));
        Ok(())
    }

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Error> {
        tokio::time::sleep(self.faults.delay).await;
        let fail = self.faults.always_fail.as_deref() == Some(self.shard.as_str())
            || self
                .faults
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if fail {
            checkpointer.checkpoint_record(&records[0]).await?;
            let mut log = self.log.0.lock().unwrap();
            log.delivered.push((
                self.worker.clone(),
                self.shard.clone(),
                records[0].sequence_number.to_string(),
                records[0].data.clone(),
            ));
            return Err(Error::InvalidConfig {
                field: "test",
                problem: "injected processor failure".into(),
            });
        }
        {
            let mut log = self.log.0.lock().unwrap();
            for r in records {
                log.delivered.push((
                    self.worker.clone(),
                    self.shard.clone(),
                    r.sequence_number.to_string(),
                    r.data.clone(),
                ));
            }
            log.events
                .push((self.shard.clone(), Event::Batch(records.len())));
        }
        checkpointer.checkpoint().await
    }

    async fn lease_lost(&mut self) {
        self.log
            .0
            .lock()
            .unwrap()
            .events
            .push((self.shard.clone(), Event::LeaseLost));
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Error> {
        self.log
            .0
            .lock()
            .unwrap()
            .events
            .push((self.shard.clone(), Event::ShutdownRequested));
        checkpointer.checkpoint().await
    }
}

fn config(worker: &str) -> WorkerConfig {
    WorkerConfig::new("test-app", "test-stream")
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_rng_seed(7)
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<kcl_core::Result<()>>,
}

impl Running {
    async fn stop(self) -> kcl_core::Result<()> {
        self.shutdown.cancel();
        self.task.await.expect("worker task")
    }
}

fn start(
    config: WorkerConfig,
    stream: &Arc<InMemoryStream>,
    store: &Arc<InMemoryLeaseStore>,
    log: &Log,
    faults: &Faults,
) -> Running {
    let (worker_id, log, faults) = (config.worker_id.clone(), log.clone(), faults.clone());
    let factory = move |shard: &str| TestProcessor {
        worker: worker_id.clone(),
        shard: shard.to_owned(),
        log: log.clone(),
        faults: faults.clone(),
    };
    let worker = Worker::new(
        config,
        stream.clone() as Arc<dyn StreamClient>,
        store.clone() as Arc<dyn LeaseStore>,
        factory,
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Running { shutdown, task }
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn put(stream: &InMemoryStream, from: usize, to: usize) -> BTreeMap<String, Vec<String>> {
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in from..to {
        let (shard, seq) = stream.put_record(&format!("key-{i}"), format!("record-{i}"));
        by_shard.entry(shard).or_default().push(seq.to_string());
    }
    by_shard
}

/// Every put record delivered exactly once, in shard order.
fn assert_exactly_once_in_order(log: &Log, expected: &BTreeMap<String, Vec<String>>) {
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, shard, seq, _) in log.delivered() {
        got.entry(shard).or_default().push(seq);
    }
    assert_eq!(&got, expected);
}

#[tokio::test(start_paused = true)]
async fn consumes_every_record_in_order_and_releases_leases_on_shutdown() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 3));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let expected = put(&stream, 0, 300);
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("all records", Duration::from_secs(30), || {
        log.count() == 300
    })
    .await;
    worker.stop().await.unwrap();

    assert_exactly_once_in_order(&log, &expected);
    let leases = store.leases();
    assert_eq!(leases.len(), 3);
    for lease in leases {
        assert_eq!(lease.owner, None, "released on shutdown");
        let last = expected[&lease.lease_key].last().unwrap();
        assert_eq!(lease.checkpoint.as_text(), last);
        let events = log.events(&lease.lease_key);
        assert_eq!(
            events.first(),
            Some(&Event::Initialized(Checkpoint::TrimHorizon))
        );
        assert_eq!(events.last(), Some(&Event::ShutdownRequested));
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_resumes_after_the_last_checkpoint() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 100);
    let first = Log::default();
    let worker = start(config("w1"), &stream, &store, &first, &Faults::default());
    wait_until("first 100", Duration::from_secs(30), || {
        first.count() == 100
    })
    .await;
    worker.stop().await.unwrap();

    let expected = put(&stream, 100, 150);
    let second = Log::default();
    let worker = start(config("w2"), &stream, &store, &second, &Faults::default());
    wait_until("next 50", Duration::from_secs(30), || second.count() == 50).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&second, &expected);
}

#[tokio::test(start_paused = true)]
async fn a_stolen_lease_stops_delivery_and_rejects_the_old_owners_checkpoints() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 10);
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("first batch", Duration::from_secs(30), || log.count() == 10).await;

    // Another worker takes the lease (as after it saw it expire).
    let shard = "shardId-000000000000";
    let lease = store.get_lease(shard).await.unwrap().unwrap();
    store
        .update_lease(
            shard,
            &lease.fence(),
            &LeaseUpdate::Take {
                new_owner: "thief".into(),
            },
        )
        .await
        .unwrap();
    // The next renewal (within one renewal interval) finds out.
    wait_until(
        "lease lost",
        LeaseConfig::default().renewal_interval + Duration::from_millis(100),
        || log.events(shard).contains(&Event::LeaseLost),
    )
    .await;
    put(&stream, 10, 20);
    // Within the lease duration the thief's lease is live: nothing more reaches w1.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(log.count(), 10, "no delivery after the lease was lost");
    let stored = store.get_lease(shard).await.unwrap().unwrap();
    assert_eq!(stored.owner.as_deref(), Some("thief"));
    assert_eq!(
        stored.checkpoint, lease.checkpoint,
        "the old owner wrote nothing"
    );
    worker.stop().await.unwrap();
    assert_eq!(
        store
            .get_lease(shard)
            .await
            .unwrap()
            .unwrap()
            .owner
            .as_deref(),
        Some("thief"),
        "not released by w1"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_delivered_again_from_the_processors_checkpoint() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let expected = put(&stream, 0, 50);
    let log = Log::default();
    let faults = Faults {
        failures_left: Arc::new(AtomicUsize::new(2)),
        ..Faults::default()
    };
    let worker = start(config("w1"), &stream, &store, &log, &faults);
    wait_until("all records", Duration::from_secs(30), || {
        log.delivered()
            .iter()
            .map(|d| &d.2)
            .collect::<HashSet<_>>()
            .len()
            == 50
    })
    .await;
    worker.stop().await.unwrap();
    // Each failed attempt processed (and checkpointed) exactly its first record, so the
    // redelivery starts right after it: nothing is delivered twice and nothing skipped.
    assert_exactly_once_in_order(&log, &expected);
    let lease = store
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        lease.checkpoint.as_text(),
        expected["shardId-000000000000"].last().unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_that_keeps_failing_restarts_the_shard_from_its_checkpoint() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 20);
    let log = Log::default();
    let shard = "shardId-000000000000";
    let faults = Faults {
        always_fail: Some(shard.into()),
        ..Faults::default()
    };
    let worker = start(config("w1"), &stream, &store, &log, &faults);
    wait_until("a restart", Duration::from_secs(120), || {
        log.events(shard)
            .iter()
            .filter(|e| matches!(e, Event::Initialized(_)))
            .count()
            >= 2
    })
    .await;
    worker.stop().await.unwrap();
    let delivered: Vec<String> = log.delivered().into_iter().map(|d| d.2).collect();
    // Each attempt processes one record and checkpoints it, then fails: the checkpoint moves
    // one record per attempt and never past a record that was not processed.
    let lease = store.get_lease(shard).await.unwrap().unwrap();
    assert_eq!(
        Some(lease.checkpoint.as_text()),
        delivered.last().map(String::as_str)
    );
    let unique: HashSet<&String> = delivered.iter().collect();
    assert_eq!(
        unique.len(),
        delivered.len(),
        "a checkpointed record is not delivered again"
    );
    let events = log.events(shard);
    assert_eq!(events[0], Event::Initialized(Checkpoint::TrimHorizon));
    assert!(
        events
            .iter()
            .skip(1)
            .any(|e| matches!(e, Event::Initialized(Checkpoint::SequenceNumber(_))))
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_iterator_restarts_after_the_last_record_fetched() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let mut expected = put(&stream, 0, 40);
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("first records", Duration::from_secs(30), || {
        log.count() == 40
    })
    .await;
    stream.expire_iterators();
    for (shard, seqs) in put(&stream, 40, 80) {
        expected.entry(shard).or_default().extend(seqs);
    }
    wait_until("the rest", Duration::from_secs(30), || log.count() >= 80).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
}

#[tokio::test(start_paused = true)]
async fn renewal_rides_out_store_errors_within_the_lease_duration() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 4));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("4 leases", Duration::from_secs(30), || {
        store
            .leases()
            .iter()
            .filter(|l| l.owner.as_deref() == Some("w1"))
            .count()
            == 4
    })
    .await;
    // Ten failed writes in a row: each renewal needs a few retries.
    store.fail_next_updates(10);
    tokio::time::sleep(Duration::from_secs(25)).await;
    for shard in [
        "shardId-000000000000",
        "shardId-000000000001",
        "shardId-000000000002",
        "shardId-000000000003",
    ] {
        assert!(
            !log.events(shard).contains(&Event::LeaseLost),
            "{shard} lost"
        );
    }
    let counters: Vec<u64> = store.leases().iter().map(|l| l.counter).collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later: Vec<u64> = store.leases().iter().map(|l| l.counter).collect();
    assert!(
        counters.iter().zip(&later).all(|(a, b)| b > a),
        "still renewing"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_crashed_workers_leases_are_taken_once_they_expire() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 30);
    let first = Log::default();
    let crashed = start(config("w1"), &stream, &store, &first, &Faults::default());
    wait_until("first records", Duration::from_secs(30), || {
        first.count() == 30
    })
    .await;
    crashed.task.abort(); // no shutdown, no release: a crash
    let _ = crashed.task.await;
    assert!(
        store
            .leases()
            .iter()
            .all(|l| l.owner.as_deref() == Some("w1"))
    );

    let expected = put(&stream, 30, 60);
    let second = Log::default();
    let started = Instant::now();
    let survivor = start(config("w2"), &stream, &store, &second, &Faults::default());
    wait_until("takeover", Duration::from_secs(60), || {
        store
            .leases()
            .iter()
            .all(|l| l.owner.as_deref() == Some("w2"))
    })
    .await;
    let took = started.elapsed();
    let lease = LeaseConfig::default();
    assert!(
        took >= lease.lease_duration,
        "taken before expiry: {took:?}"
    );
    assert!(
        took <= lease.lease_duration + lease.taker_interval * 2,
        "taken late: {took:?}"
    );
    wait_until("the rest", Duration::from_secs(30), || second.count() == 30).await;
    survivor.stop().await.unwrap();
    assert_exactly_once_in_order(&second, &expected);
}

#[tokio::test(start_paused = true)]
async fn fetching_overlaps_processing_up_to_the_prefetch_limit() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 100);
    let log = Log::default();
    let faults = Faults {
        delay: Duration::from_secs(10),
        ..Faults::default()
    };
    let polling = PollingConfig::default()
        .with_max_records(10)
        .with_max_prefetched_batches(3);
    let worker = start(
        config("w1").with_polling(polling),
        &stream,
        &store,
        &log,
        &faults,
    );
    let shard = "shardId-000000000000";
    wait_until("first read", Duration::from_secs(60), || {
        !stream.get_records_calls(shard).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(log.count(), 0, "the first batch is still being processed");
    // Meanwhile the poller fetched ahead: the batch in hand, 3 queued and one waiting to be
    // queued, and no more.
    let calls = stream.get_records_calls(shard).len();
    assert_eq!(calls, 5, "calls made during the first batch");
    wait_until("all", Duration::from_secs(300), || log.count() == 100).await;
    worker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn get_records_calls_are_paced() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 100);
    let log = Log::default();
    let polling = PollingConfig::default().with_max_records(5);
    let worker = start(
        config("w1").with_polling(polling.clone()),
        &stream,
        &store,
        &log,
        &Faults::default(),
    );
    wait_until("all", Duration::from_secs(60), || log.count() == 100).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    worker.stop().await.unwrap();
    let calls = stream.get_records_calls("shardId-000000000000");
    assert!(calls.len() > 20);
    for pair in calls.windows(2) {
        assert!(
            pair[1] - pair[0] >= polling.min_time_between_reads,
            "5 calls per second at most"
        );
    }
    // Once caught up, reads come one idle interval apart.
    let tail = &calls[calls.len() - 3..];
    for pair in tail.windows(2) {
        assert!(pair[1] - pair[0] >= polling.idle_time_between_empty_reads);
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_stream_is_a_typed_error() {
    let stream = Arc::new(InMemoryStream::missing("nope"));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let worker = start(
        config("w1"),
        &stream,
        &store,
        &Log::default(),
        &Faults::default(),
    );
    let err = worker.task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::StreamNotFound { stream } if stream == "nope"),
        "{err:?}"
    );
}

#[test]
fn an_invalid_config_is_rejected_before_anything_runs() {
    let stream = Arc::new(InMemoryStream::new("s", 1)) as Arc<dyn StreamClient>;
    let store = Arc::new(InMemoryLeaseStore::new("t")) as Arc<dyn LeaseStore>;
    let bad =
        config("w1").with_lease(LeaseConfig::default().with_lease_duration(Duration::from_secs(1)));
    let err = Worker::new(bad, stream, store, |_: &str| TestProcessor {
        worker: String::new(),
        shard: String::new(),
        log: Log::default(),
        faults: Faults::default(),
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "lease.renewal_interval",
                ..
            }
        ),
        "{err:?}"
    );
}
