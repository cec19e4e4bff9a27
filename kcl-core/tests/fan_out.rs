//! Enhanced fan-out on the in-memory stream, on paused Tokio time: subscriptions that end,
//! fail, go silent or are refused lose and repeat nothing; a split read through fan-out
//! finishes the parent before its children; a lost lease ends its subscription at once;
//! registration waits for the consumer and fails with a typed error when it never comes; a
//! shard past retention is let go as polling lets it go.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream, SubscriptionFault};
use kcl_core::{
    Error, FanOutConfig, LeaseStore, LeaseUpdate, Retrieval, StreamClient, WorkerConfig,
};

fn fan_out(worker: &str) -> WorkerConfig {
    config(worker).with_retrieval(Retrieval::FanOut(
        FanOutConfig::default().with_event_timeout(Duration::from_secs(10)),
    ))
}

fn shard_records(log: &Log) -> BTreeMap<String, Vec<String>> {
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in log.delivered() {
        by_shard.entry(d.shard).or_default().push(d.sequence_number);
    }
    by_shard
}

#[tokio::test(start_paused = true)]
async fn every_record_once_across_sessions_failures_refusals_and_silence() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    stream.set_subscription_session_length(Duration::from_secs(3));
    stream.set_subscription_max_records(7);
    let mut expected = put(&stream, 0, 100);
    let log = Log::default();
    let worker = start(fan_out("w1"), &stream, &store, &log, &Faults::default());
    wait_until("the first records", Duration::from_secs(30), || {
        log.count() >= 20
    })
    .await;

    // Every kind of trouble while records keep coming.
    stream.refuse_next_subscribes(2, SubscriptionFault::ResourceInUse);
    stream.fail_subscriptions("shardId-000000000000", SubscriptionFault::Transient);
    merge(&mut expected, put(&stream, 100, 150));
    tokio::time::sleep(Duration::from_secs(4)).await;
    wait_until("shard 1 subscribed", Duration::from_secs(30), || {
        stream
            .open_subscriptions()
            .iter()
            .any(|s| s.shard_id == "shardId-000000000001" && !s.lingering)
    })
    .await;
    assert_eq!(stream.silence_subscriptions("shardId-000000000001"), 1);
    merge(&mut expected, put(&stream, 150, 200));
    wait_until("every record", Duration::from_secs(120), || {
        log.count() >= 200
    })
    .await;
    // The status is published after each taking round.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();

    assert_exactly_once_in_order(&log, &expected);
    assert!(
        status.subscriptions >= 4,
        "sessions of 3 s renewed: {status:?}"
    );
    assert!(status.subscribe_refusals >= 2, "{status:?}");
    // The failure, and the silent subscription given up after the event timeout.
    assert!(status.subscription_failures >= 2, "{status:?}");
    assert_eq!(status.shard_failures, 0, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn a_resume_from_a_checkpoint_through_fan_out_repeats_nothing() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 40);
    let first = Log::default();
    let worker = start(fan_out("w1"), &stream, &store, &first, &Faults::default());
    wait_until("the first 40", Duration::from_secs(30), || {
        first.count() == 40
    })
    .await;
    worker.stop().await.unwrap();

    let expected = put(&stream, 40, 70);
    let second = Log::default();
    let worker = start(fan_out("w2"), &stream, &store, &second, &Faults::default());
    wait_until("the next 30", Duration::from_secs(30), || {
        second.count() >= 30
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&second, &expected);
}

#[tokio::test(start_paused = true)]
async fn a_split_read_through_fan_out_finishes_the_parent_before_the_children() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let mut expected = put(&stream, 0, 60);
    let log = Log::default();
    let worker = start(fan_out("w1"), &stream, &store, &log, &Faults::default());
    wait_until("the parent's records", Duration::from_secs(30), || {
        log.count() >= 60
    })
    .await;
    let children = stream.split_shard("shardId-000000000000");
    merge(&mut expected, put(&stream, 60, 160));
    wait_until("every record", Duration::from_secs(120), || {
        log.count() >= 160
    })
    .await;
    worker.stop().await.unwrap();

    assert_exactly_once_in_order(&log, &expected);
    let by_shard = shard_records(&log);
    for child in &children {
        assert!(
            by_shard.contains_key(child),
            "{child} was read: {by_shard:?}"
        );
        // Every child record came after the parent's last.
        let parent_done = log
            .delivered()
            .iter()
            .filter(|d| d.shard == "shardId-000000000000")
            .map(|d| d.at)
            .max()
            .unwrap();
        let child_start = log
            .delivered()
            .iter()
            .filter(|d| d.shard == *child)
            .map(|d| d.at)
            .min()
            .unwrap();
        assert!(
            child_start >= parent_done,
            "{child} started before its parent ended"
        );
    }
    let parent = store.get_lease("shardId-000000000000").await.unwrap();
    assert!(
        parent.is_none_or(|l| l.is_finished()),
        "the parent is finished (or already cleaned up)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_ends_its_subscription_at_once() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 10);
    let log = Log::default();
    let worker = start(fan_out("w1"), &stream, &store, &log, &Faults::default());
    wait_until("the records", Duration::from_secs(30), || log.count() == 10).await;
    assert_eq!(stream.open_subscriptions().len(), 1);

    // Another worker takes the lease.
    let shard = "shardId-000000000000";
    let lease = store.get_lease(shard).await.unwrap().unwrap();
    store
        .update_lease(
            shard,
            &lease.fence(),
            &LeaseUpdate::Take {
                new_owner: "w2".into(),
            },
        )
        .await
        .unwrap();
    // The next renewal finds it lost; the subscription closes with the consumer.
    wait_until("the subscription closed", Duration::from_secs(10), || {
        stream.open_subscriptions().is_empty()
    })
    .await;
    worker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn workers_wait_for_the_consumer_to_become_active_and_register_it_once() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    stream.set_consumer_activation_delay(Duration::from_secs(5));
    let expected = put(&stream, 0, 40);
    let log = Log::default();
    let started = tokio::time::Instant::now();
    let w1 = start(fan_out("w1"), &stream, &store, &log, &Faults::default());
    let w2 = start(fan_out("w2"), &stream, &store, &log, &Faults::default());
    wait_until("every record", Duration::from_secs(60), || {
        log.count() >= 40
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "read before ACTIVE"
    );
    let consumer = stream
        .describe_stream_consumer("test-app")
        .await
        .unwrap()
        .expect("registered");
    assert!(
        consumer.arn.ends_with(":1"),
        "registered once: {consumer:?}"
    );
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
    let mut seen = BTreeSet::new();
    for d in log.delivered() {
        assert!(seen.insert(d.sequence_number.clone()), "delivered twice");
    }
    assert_eq!(seen.len(), expected.values().map(Vec::len).sum::<usize>());
}

#[tokio::test(start_paused = true)]
async fn a_consumer_arn_that_names_nothing_ends_the_worker_with_a_typed_error() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let arn = "arn:aws:kinesis:us-east-1:000000000000:stream/test-stream/consumer/gone:1";
    let config = config("w1").with_retrieval(Retrieval::FanOut(
        FanOutConfig::default().with_consumer_arn(arn),
    ));
    let worker = start(config, &stream, &store, &Log::default(), &Faults::default());
    let outcome = tokio::time::timeout(Duration::from_secs(120), worker.task)
        .await
        .expect("the worker ends")
        .expect("no panic");
    match outcome {
        Err(Error::ConsumerNotActive {
            consumer, status, ..
        }) => {
            assert_eq!(consumer, arn);
            assert_eq!(status, "not found");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        store.leases().iter().all(|l| l.owner.is_none()),
        "no lease taken"
    );
}

/// `SubscribeToShard` answers `ResourceNotFound` for a shard past retention without saying
/// what is missing; the reader asks `GetShardIterator`, and the shard ends as a polled one
/// does: its lease is deleted and its children, which waited for it, run.
#[tokio::test(start_paused = true)]
async fn a_shard_past_retention_read_through_fan_out_is_let_go_like_a_polled_one() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    stream.put_record("k", "old");
    let children = stream.split_shard("shardId-000000000000");
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    // The application held the parent, never finished it, and it passed the retention period.
    store.put(kcl_core::Lease::new(
        "shardId-000000000000",
        kcl_core::Checkpoint::TrimHorizon,
    ));
    for child in &children {
        store.put(
            kcl_core::Lease::new(child, kcl_core::Checkpoint::TrimHorizon)
                .with_parents(["shardId-000000000000".to_owned()]),
        );
    }
    stream.trim_shard("shardId-000000000000");
    let expected = put(&stream, 0, 20);
    let log = Log::default();
    let config = fan_out("w1").with_lease(
        kcl_core::LeaseConfig::default().with_shard_sync_interval(Duration::from_secs(5)),
    );
    let worker = start(config, &stream, &store, &log, &Faults::default());
    wait_until("the children's records", Duration::from_secs(60), || {
        log.count() >= 20
    })
    .await;
    let failures = worker.status.borrow().shard_failures;
    assert_eq!(failures, 0, "the parent's end is no failure");
    assert!(
        store
            .get_lease("shardId-000000000000")
            .await
            .unwrap()
            .is_none(),
        "the parent's lease is deleted"
    );
    worker.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
}
