//! Worker behaviour on the in-memory stream and lease store, on paused Tokio time.
//! (The same behaviours are tested against kinesis-mock and DynamoDB Local in `tests/`.)

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::*;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    Checkpoint, Error, LeaseConfig, LeaseStore, LeaseUpdate, PollingConfig, StreamClient, Worker,
};
use tokio::time::Instant;

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
            .map(|d| &d.sequence_number)
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
    let delivered: Vec<String> = log
        .delivered()
        .into_iter()
        .map(|d| d.sequence_number)
        .collect();
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
        took <= lease.lease_duration + lease.taker_interval,
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
    // Meanwhile the poller fetched ahead: the batch in hand and 3 queued, and no more (it
    // fetches only into a free place of the queue, so no fifth batch waits to be queued).
    let calls = stream.get_records_calls(shard).len();
    assert_eq!(calls, 4, "calls made during the first batch");
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

// Issue 11: the pace counts from the start of a call. Counting from its end, a shard whose
// GetRecords took 150 ms (a page of 10,000 records) was read 3 times a second instead of 5,
// and the worker moved 0.65 of a paced raw loop's records in the throughput bench.
#[tokio::test(start_paused = true)]
async fn slow_get_records_calls_still_start_five_times_a_second() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 100);
    let latency = Duration::from_millis(150);
    stream.set_get_records_latency(latency);
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
    worker.stop().await.unwrap();
    let calls = stream.get_records_calls("shardId-000000000000");
    // The 20 calls that returned records, after the first.
    let busy = &calls[1..20];
    for pair in busy.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= polling.min_time_between_reads && gap < polling.min_time_between_reads + latency,
            "calls {gap:?} apart with {latency:?} calls"
        );
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
        matches!(&err, Error::StreamNotFound { stream, .. } if stream == "nope"),
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

#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_taken_when_it_expires_not_a_round_later() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    store.take_as("shardId-000000000000", "dead");
    // The scan that first sees the dead worker's lease is slow; later ones are fast. The
    // regular round 10 s later then finds the lease 60 ms short of expiry.
    store.set_scan_latency(Duration::from_millis(60));
    let started = Instant::now();
    let worker = start(
        config("w1"),
        &stream,
        &store,
        &Log::default(),
        &Faults::default(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.set_scan_latency(Duration::ZERO);
    wait_until("takeover", Duration::from_secs(60), || {
        owners(&store).contains_key("w1")
    })
    .await;
    let took = started.elapsed();
    let lease = LeaseConfig::default();
    assert!(
        took >= lease.lease_duration,
        "taken before expiry: {took:?}"
    );
    assert!(
        took < lease.lease_duration + Duration::from_millis(500),
        "taken a round late: {took:?}"
    );
    worker.stop().await.unwrap();
}
