//! A bad day on the in-memory stream and lease store, on paused Tokio time: processors that
//! panic, stalled and throttled calls, a worker cut off from DynamoDB, the watchdog, and KPL
//! aggregation. (Against the real servers through a fault-injecting proxy:
//! `tests/tests/faults.rs`.)

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use kcl_core::testing::{Fault, Faulty, InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    Checkpoint, Checkpointer, Error, LeaseConfig, LeaseStore, ProcessingConfig, Record,
    RecordProcessor, StreamClient, Worker, async_trait,
};
use tokio::time::Instant;

fn all_delivered(log: &Log) -> BTreeSet<String> {
    log.delivered()
        .into_iter()
        .map(|d| d.sequence_number)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_panicking_processor_is_replaced_and_the_batch_delivered_again() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let expected = put(&stream, 0, 100);
    let log = Log::default();
    let faults = Faults {
        panics_left: Arc::new(AtomicUsize::new(3)),
        ..Faults::default()
    };
    let worker = start(config("w1"), &stream, &store, &log, &faults);
    wait_until("all records", Duration::from_secs(60), || {
        log.count() >= 100
    })
    .await;
    // The status is published after each taking round.
    wait_until("the status", Duration::from_secs(10), || {
        worker.status.borrow().processor_panics == 3
    })
    .await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();
    // A panic happens before anything of the batch is processed: the new processor gets the
    // whole batch, and every record is delivered exactly once.
    assert_exactly_once_in_order(&log, &expected);
    assert_eq!((status.processor_panics, status.shard_failures), (3, 0));
    // Each replacement processor was initialized at the checkpoint of its shard.
    let inits: usize = expected
        .keys()
        .map(|s| {
            log.events(s)
                .iter()
                .filter(|e| matches!(e, Event::Initialized(_)))
                .count()
        })
        .sum();
    assert_eq!(inits, 2 + 3);
}

#[tokio::test(start_paused = true)]
async fn a_processor_that_always_panics_fails_its_shard_only_and_cools_down() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 3));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let expected = put(&stream, 0, 150);
    let poisoned = "shardId-000000000001";
    let log = Log::default();
    let faults = Faults {
        always_panic: Some(poisoned.into()),
        ..Faults::default()
    };
    let worker = start(config("w1"), &stream, &store, &log, &faults);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let status = worker.status.borrow().clone();
    assert!(!worker.task.is_finished(), "the worker runs on");
    // The other shards were consumed completely.
    let got = all_delivered(&log);
    for (shard, seqs) in &expected {
        if shard != poisoned {
            assert!(seqs.iter().all(|s| got.contains(s)), "{shard} not consumed");
        }
    }
    assert!(status.shard_failures >= 3, "{status:?}");
    // Every failure is 5 attempts, and the waits before retaking the shard grow (1, 2, 4, …
    // 60 s): far fewer restarts than taking rounds.
    assert_eq!(status.processor_panics, 5 * status.shard_failures);
    assert!(
        status.shard_failures <= 10,
        "{} restarts in 2 minutes",
        status.shard_failures
    );
    // Nothing of the poisoned shard was checkpointed.
    let lease = store.get_lease(poisoned).await.unwrap().unwrap();
    assert_eq!(lease.checkpoint, Checkpoint::TrimHorizon);
    worker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicking_processor_factory_fails_the_shard_not_the_worker() {
    struct Never;
    #[async_trait]
    impl RecordProcessor for Never {
        type Error = Error;
        async fn process_records(
            &mut self,
            _: &[Record],
            _: &mut Checkpointer,
            _: Option<u64>,
        ) -> Result<(), Error> {
            Ok(())
        }
    }
    let stream: Arc<dyn StreamClient> = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let factory = |_: &str| -> Never { panic!("cannot build a processor") };
    let worker = Worker::new(
        config("w1"),
        stream,
        store.clone() as Arc<dyn LeaseStore>,
        factory,
    )
    .unwrap();
    let status = worker.status();
    let shutdown = kcl_core::CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(status.borrow().shard_failures >= 1);
    assert!(status.borrow().processor_panics >= 5);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stalled_call_times_out_and_is_retried() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let faulty = Arc::new(Faulty::new(stream.clone()));
    let log = Log::default();
    let worker = start_on(
        config("w1"),
        faulty.clone(),
        store.clone(),
        &log,
        &Faults::default(),
    );
    wait_until("the lease", Duration::from_secs(10), || {
        owners(&store).get("w1") == Some(&1)
    })
    .await;
    // Every Kinesis call hangs for 45 s (each times out after 30 s and is retried).
    faulty.set(Fault::Stall);
    let expected = put(&stream, 0, 20);
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(log.count(), 0);
    faulty.set(Fault::None);
    wait_until("the records", Duration::from_secs(60), || log.count() >= 20).await;
    assert_eq!(
        worker.status.borrow().watchdog_restarts,
        0,
        "a stall shorter than the watchdog timeout"
    );
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
}

#[tokio::test(start_paused = true)]
async fn the_watchdog_restarts_a_consumer_that_makes_no_progress() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let faulty = Arc::new(Faulty::new(stream.clone()));
    let log = Log::default();
    let worker = start_on(
        config("w1"),
        faulty.clone(),
        store.clone(),
        &log,
        &Faults::default(),
    );
    wait_until("the lease", Duration::from_secs(10), || {
        owners(&store).get("w1") == Some(&1)
    })
    .await;
    faulty.set(Fault::Stall);
    let timeout = ProcessingConfig::default().watchdog_timeout;
    tokio::time::sleep(timeout + Duration::from_secs(10)).await;
    assert!(
        worker.status.borrow().watchdog_restarts >= 1,
        "{:?}",
        worker.status.borrow()
    );
    faulty.set(Fault::None);
    let expected = put(&stream, 0, 20);
    wait_until("the records", Duration::from_secs(60), || log.count() >= 20).await;
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
}

#[tokio::test(start_paused = true)]
async fn a_slow_processor_is_not_restarted_by_the_watchdog() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let expected = put(&stream, 0, 10);
    let log = Log::default();
    let slow = Faults {
        delay: ProcessingConfig::default().watchdog_timeout + Duration::from_secs(60),
        ..Faults::default()
    };
    let worker = start(config("w1"), &stream, &store, &log, &slow);
    wait_until("the batch", Duration::from_secs(600), || log.count() >= 10).await;
    assert_eq!(worker.status.borrow().watchdog_restarts, 0);
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
}

#[tokio::test(start_paused = true)]
async fn a_child_waiting_long_for_its_parent_is_not_restarted_by_the_watchdog() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let parent = "shardId-000000000000";
    let mut expected = put(&stream, 0, 20);
    let children = stream.split_shard(parent);
    for (shard, sequence_numbers) in put(&stream, 20, 40) {
        expected.entry(shard).or_default().extend(sequence_numbers);
    }
    // Another worker holds the parent and stays alive, far longer than the watchdog timeout.
    let heartbeat = keep_alive(&store, parent, "other");
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("the children", Duration::from_secs(60), || {
        owners(&store).get("w1") == Some(&2)
    })
    .await;
    tokio::time::sleep(ProcessingConfig::default().watchdog_timeout * 3).await;
    assert_eq!(
        worker.status.borrow().watchdog_restarts,
        0,
        "{:?}",
        worker.status.borrow()
    );
    assert_eq!(log.count(), 0, "no child record before the parent ends");
    // The other worker dies; its lease expires, the parent is processed, then the children.
    heartbeat.abort();
    wait_until("every record", Duration::from_secs(120), || {
        log.count() >= 40
    })
    .await;
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
    assert_eq!(children.len(), 2);
}

/// Found by the simulation: a failed lease scan used to leave the early expiry check in the
/// past, and the worker scanned the table in a hot loop for as long as DynamoDB failed fast.
#[tokio::test(start_paused = true)]
async fn failing_lease_scans_are_retried_at_the_taker_pace_not_in_a_loop() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    // A lease of a dead worker: w1 plans an extra round for the moment it expires.
    store.take_as("shardId-000000000000", "dead");
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    let lease = LeaseConfig::default();
    // Scans start failing (fast, and finitely, so a regression ends instead of hanging) just
    // before the dead lease expires.
    tokio::time::sleep(lease.lease_duration - lease.taker_interval / 2).await;
    const FAILURES: usize = 10_000;
    store.fail_next_scans(FAILURES);
    let before = store.scan_calls();
    let window = Duration::from_secs(30);
    tokio::time::sleep(window).await;
    let scans = store.scan_calls() - before;
    // One per taker round, plus shard syncs and the expiry check.
    let bound = (window.as_secs() / lease.taker_interval.as_secs()) as usize * 2;
    assert!(scans <= bound, "{scans} scans in {window:?}");
    store.fail_next_scans(0);
    wait_until("the dead worker's lease", Duration::from_secs(30), || {
        owners(&store).get("w1") == Some(&2)
    })
    .await;
    worker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn throttling_slows_one_shard_without_starving_the_others() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 3));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let throttled = "shardId-000000000000";
    stream.set_shard_fault(throttled, Fault::Throttle);
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    let expected = put(&stream, 0, 150);
    // The other shards are consumed while the first one is throttled.
    wait_until("the unthrottled shards", Duration::from_secs(60), || {
        let got = all_delivered(&log);
        expected
            .iter()
            .filter(|(s, _)| *s != throttled)
            .all(|(_, seqs)| seqs.iter().all(|s| got.contains(s)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let calls = stream.get_records_calls(throttled);
    for pair in calls.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(200),
            "more than 5 calls a second"
        );
    }
    // Backing off: far fewer calls than an unthrottled shard would make in that time.
    assert!(calls.len() < 30, "{} calls while throttled", calls.len());
    assert!(worker.status.borrow().throttled_reads >= 5);
    stream.set_shard_fault(throttled, Fault::None);
    wait_until("everything", Duration::from_secs(60), || log.count() >= 150).await;
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
}

async fn a_worker_cut_off_stops_before_another_takes_over(cut_off: Fault) {
    let stream = Arc::new(InMemoryStream::new("test-stream", 4));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let faulty = Arc::new(Faulty::new(store.clone()));
    let log = Log::default();
    let w1 = start_on(
        config("w1"),
        stream.clone(),
        faulty.clone(),
        &log,
        &Faults::default(),
    );
    let w2 = start(config("w2"), &stream, &store, &log, &Faults::default());
    wait_until("a split", Duration::from_secs(60), || {
        let o = owners(&store);
        o.get("w1") == Some(&2) && o.get("w2") == Some(&2)
    })
    .await;
    let (producer, _) = {
        let stream = stream.clone();
        (
            tokio::spawn(async move {
                for i in 0.. {
                    stream.put_record(&format!("key-{i}"), format!("r{i}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }),
            (),
        )
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let w1_shards: Vec<String> = store
        .leases()
        .into_iter()
        .filter(|l| l.owner.as_deref() == Some("w1"))
        .map(|l| l.lease_key)
        .collect();
    let cut = Instant::now();
    faulty.set(cut_off);
    wait_until("w2 holds all", Duration::from_secs(60), || {
        owners(&store).get("w2") == Some(&4)
    })
    .await;
    for shard in &w1_shards {
        let stopped = log
            .event_time("w1", shard, cut, |e| *e == Event::LeaseLost)
            .expect("w1 told lease lost");
        let started = log
            .event_time("w2", shard, cut, |e| matches!(e, Event::Initialized(_)))
            .unwrap();
        assert!(
            stopped < started,
            "{shard}: w1 stopped at {:?}, w2 started at {:?}",
            stopped - cut,
            started - cut
        );
        assert!(
            stopped - cut <= LeaseConfig::default().lease_duration,
            "lost within the lease duration"
        );
        // Nothing delivered by w1 after it stopped.
        assert!(
            log.delivered()
                .iter()
                .all(|d| d.worker != "w1" || d.shard != *shard || d.at <= stopped)
        );
    }
    assert_eq!(
        log.overlaps(),
        vec![],
        "a shard processed by two workers at once"
    );
    producer.abort();
    w2.stop().await.unwrap();
    w1.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_worker_whose_lease_writes_fail_stops_before_another_takes_over() {
    a_worker_cut_off_stops_before_another_takes_over(Fault::Fail).await;
}

#[tokio::test(start_paused = true)]
async fn a_paused_worker_stops_before_another_takes_over() {
    a_worker_cut_off_stops_before_another_takes_over(Fault::Stall).await;
}

// ---- KPL aggregation ---------------------------------------------------------------------

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/kpl/{name}.bin",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// User records processed: sequence number, sub-sequence number, data.
type Seen = Arc<std::sync::Mutex<Vec<(String, u64, Vec<u8>)>>>;

/// Processes user records one by one, checkpointing each, until its budget is spent; then
/// accepts batches without processing or checkpointing them (as a worker about to stop).
struct Budgeted {
    budget: Arc<AtomicUsize>,
    seen: Seen,
}

#[async_trait]
impl RecordProcessor for Budgeted {
    type Error = Error;
    async fn process_records(
        &mut self,
        records: &[Record],
        cp: &mut Checkpointer,
        _: Option<u64>,
    ) -> Result<(), Error> {
        for r in records {
            if self
                .budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return Ok(());
            }
            self.seen.lock().unwrap().push((
                r.sequence_number.to_string(),
                r.sub_sequence_number,
                r.data.to_vec(),
            ));
            cp.checkpoint_record(r).await?;
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn kpl_records_are_delivered_as_user_records_and_a_restart_resumes_inside_an_aggregate() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store: Arc<dyn LeaseStore> = Arc::new(InMemoryLeaseStore::new("test-app"));
    stream.put_record("plain", "before");
    let (_, aggregate) = stream.put_record("agg", fixture("shared_keys")); // 20 user records
    stream.put_record("plain", "after");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let run = |budget: usize| {
        let (seen, budget) = (seen.clone(), Arc::new(AtomicUsize::new(budget)));
        let factory = move |_: &str| Budgeted {
            budget: budget.clone(),
            seen: seen.clone(),
        };
        let worker = Worker::new(
            config("w1"),
            stream.clone() as Arc<dyn StreamClient>,
            store.clone(),
            factory,
        )
        .unwrap();
        let shutdown = kcl_core::CancellationToken::new();
        (shutdown.clone(), tokio::spawn(worker.run(shutdown)))
    };
    // First run: the plain record and the first 3 user records of the aggregate.
    let (shutdown, task) = run(4);
    wait_until("4 records", Duration::from_secs(30), || {
        seen.lock().unwrap().len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let lease = store
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.checkpoint, Checkpoint::at(aggregate.clone(), 2));
    // Second run: resumes at the 4th user record of the aggregate, then the plain record.
    let (shutdown, task) = run(usize::MAX);
    wait_until("the rest", Duration::from_secs(30), || {
        seen.lock().unwrap().len() == 1 + 20 + 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    let subs: Vec<u64> = seen
        .iter()
        .filter(|s| s.0 == aggregate.as_str())
        .map(|s| s.1)
        .collect();
    assert_eq!(
        subs,
        (0..20).collect::<Vec<_>>(),
        "each user record once, in order"
    );
    assert_eq!(seen.last().unwrap().2, b"after");
    assert_eq!(seen[4].2, b"{\"n\": 3}", "resumed inside the aggregate");
}

#[tokio::test(start_paused = true)]
async fn corrupt_aggregates_are_delivered_plain_and_out_of_range_user_records_dropped() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    // Explicit hash keys 1, 2^128-2 and 2^127, in an aggregate put to the lower shard: only
    // the first belongs there (the KPL aggregated for a parent before a reshard).
    stream.put_record_at(5, "agg", fixture("explicit_hash_keys"));
    let mut corrupt = fixture("five_keys");
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xFF;
    stream.put_record_at(6, "bad", corrupt.clone());
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("records", Duration::from_secs(30), || log.count() >= 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();
    let data: Vec<Vec<u8>> = log.delivered().into_iter().map(|d| d.data).collect();
    assert_eq!(
        data,
        vec![b"low".to_vec(), corrupt],
        "the in-range user record, then the corrupt record as it came"
    );
    assert_eq!(
        (status.records_out_of_range, status.aggregation_errors),
        (2, 1)
    );
}
