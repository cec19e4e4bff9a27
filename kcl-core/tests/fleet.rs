//! Fleets of workers on the in-memory stream and lease store, on paused Tokio time: even
//! splits, joining workers, graceful handoff, forced takes, limits.
//! (Against kinesis-mock and DynamoDB Local: `tests/tests/fleet.rs`.)

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kcl_core::LeaseConfig;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Sequence numbers put so far, by shard.
type PutSoFar = Arc<std::sync::Mutex<BTreeMap<String, Vec<String>>>>;

/// Puts a record every `every` until aborted; returns what it put.
fn produce(stream: &Arc<InMemoryStream>, every: Duration) -> (JoinHandle<()>, PutSoFar) {
    let put_so_far = PutSoFar::default();
    let (stream, sink) = (stream.clone(), put_so_far.clone());
    let task = tokio::spawn(async move {
        for i in 0.. {
            let (shard, seq) = stream.put_record(&format!("key-{i}"), format!("record-{i}"));
            sink.lock()
                .unwrap()
                .entry(shard)
                .or_default()
                .push(seq.to_string());
            tokio::time::sleep(every).await;
        }
    });
    (task, put_so_far)
}

fn balanced(store: &InMemoryLeaseStore, workers: &[&str], leases: usize) -> bool {
    let owners = owners(store);
    let (floor, ceil) = (leases / workers.len(), leases.div_ceil(workers.len()));
    owners.values().sum::<usize>() == leases
        && workers
            .iter()
            .all(|w| (floor..=ceil).contains(owners.get(*w).unwrap_or(&0)))
        && store.leases().iter().all(|l| l.handoff_to.is_none())
}

/// For each shard that changed workers: time from the last delivery by the old worker to the
/// first by the new one.
fn handoff_gaps(log: &Log) -> Vec<Duration> {
    let mut last: BTreeMap<String, (String, Instant)> = BTreeMap::new();
    let mut gaps = Vec::new();
    for d in log.delivered() {
        if let Some((worker, at)) = last.get(&d.shard)
            && *worker != d.worker
        {
            gaps.push(d.at - *at);
        }
        last.insert(d.shard.clone(), (d.worker.clone(), d.at));
    }
    gaps
}

#[tokio::test(start_paused = true)]
async fn workers_started_together_split_the_leases_evenly() {
    for workers in [2usize, 3, 5] {
        let stream = Arc::new(InMemoryStream::new("test-stream", 12));
        let store = Arc::new(InMemoryLeaseStore::new("test-app"));
        let mut expected = put(&stream, 0, 600);
        let log = Log::default();
        let names: Vec<String> = (0..workers).map(|i| format!("w{i}")).collect();
        let running: Vec<Running> = names
            .iter()
            .map(|n| start(config(n), &stream, &store, &log, &Faults::default()))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        wait_until("an even split", Duration::from_secs(60), || {
            balanced(&store, &refs, 12)
        })
        .await;
        merge(&mut expected, put(&stream, 600, 900));
        wait_until("all records", Duration::from_secs(60), || {
            log.count() >= 900
        })
        .await;
        // Balanced stays balanced: no lease moves any more.
        let moved: u64 = running.iter().map(|r| r.status.borrow().handed_over).sum();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            balanced(&store, &refs, 12),
            "{workers} workers: {:?}",
            owners(&store)
        );
        assert_eq!(
            running
                .iter()
                .map(|r| r.status.borrow().handed_over)
                .sum::<u64>(),
            moved,
            "oscillation"
        );
        for r in running {
            r.stop().await.unwrap();
        }
        assert_exactly_once_in_order(&log, &expected);
        assert_eq!(
            log.overlaps(),
            vec![],
            "a shard processed by two workers at once"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_joining_worker_gets_its_share_by_handoff_without_redelivery() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 8));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let (producer, put_so_far) = produce(&stream, Duration::from_millis(20));
    let w1 = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("w1 holds all", Duration::from_secs(30), || w1.held() == 8).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let joined = Instant::now();
    let w2 = start(config("w2"), &stream, &store, &log, &Faults::default());
    wait_until("an even split", Duration::from_secs(60), || {
        balanced(&store, &["w1", "w2"], 8)
    })
    .await;
    let took = joined.elapsed();
    let rounds = w2.status.borrow().taking_rounds;
    assert!(
        rounds <= 3,
        "balanced after {rounds} taking rounds ({took:?})"
    );
    assert_eq!(w2.status.borrow().received, 4);
    assert_eq!(w2.status.borrow().forced_takes, 0);
    assert_eq!(w1.status.borrow().handed_over, 4);

    tokio::time::sleep(Duration::from_secs(5)).await;
    producer.abort();
    let expected = put_so_far.lock().unwrap().clone();
    let total: usize = expected.values().map(Vec::len).sum();
    wait_until("all records", Duration::from_secs(60), || {
        log.count() >= total
    })
    .await;
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
    assert_eq!(log.overlaps(), vec![]);
    let gaps = handoff_gaps(&log);
    assert_eq!(gaps.len(), 4);
    assert!(
        gaps.iter()
            .all(|g| *g < LeaseConfig::default().lease_duration),
        "{gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_shutting_down_hands_its_shards_over_without_redelivery() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 6));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let (producer, put_so_far) = produce(&stream, Duration::from_millis(20));
    let w1 = start(config("w1"), &stream, &store, &log, &Faults::default());
    let w2 = start(config("w2"), &stream, &store, &log, &Faults::default());
    wait_until("an even split", Duration::from_secs(60), || {
        balanced(&store, &["w1", "w2"], 6)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let received_before = w2.status.borrow().received;
    let w1_shards: Vec<String> = store
        .leases()
        .into_iter()
        .filter(|l| l.owner.as_deref() == Some("w1"))
        .map(|l| l.lease_key)
        .collect();

    let stopping = Instant::now();
    w1.stop().await.unwrap();
    wait_until("w2 holds all", Duration::from_secs(30), || w2.held() == 6).await;
    let lease = LeaseConfig::default();
    for shard in &w1_shards {
        let stopped = log
            .event_time("w1", shard, stopping, |e| *e == Event::ShutdownRequested)
            .unwrap();
        let started = log
            .event_time("w2", shard, stopping, |e| {
                matches!(e, Event::Initialized(_))
            })
            .unwrap();
        // w1 kept processing while w2 learnt of the offers...
        assert!(
            stopped - stopping >= lease.taker_interval,
            "{shard} stopped before the receivers watched"
        );
        // ...so the shard paused for at most one poll of w2.
        assert!(
            started - stopped <= lease.handoff_poll_interval,
            "{shard} paused {:?}",
            started - stopped
        );
    }
    assert_eq!(
        w2.status.borrow().received - received_before,
        3,
        "handed over, not expired"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    producer.abort();
    let expected = put_so_far.lock().unwrap().clone();
    let total: usize = expected.values().map(Vec::len).sum();
    wait_until("all records", Duration::from_secs(60), || {
        log.count() >= total
    })
    .await;
    w2.stop().await.unwrap();
    assert_exactly_once_in_order(&log, &expected);
    assert_eq!(log.overlaps(), vec![]);
    // The last handoffs (w1 → w2 at shutdown) paused their shards for well under a lease.
    let gaps = handoff_gaps(&log);
    let last_three = &gaps[gaps.len() - 3..];
    assert!(
        last_three.iter().all(|g| *g < Duration::from_secs(2)),
        "{gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_handoff_the_owner_cannot_complete_falls_back_to_taking_the_lease() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 4));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 40);
    let stuck = Log::default();
    // w1's processor spends an hour on every batch: it never stops to hand over.
    let hang = Faults {
        delay: Duration::from_secs(3600),
        ..Faults::default()
    };
    let w1 = start(config("w1"), &stream, &store, &stuck, &hang);
    wait_until("w1 holds all", Duration::from_secs(30), || w1.held() == 4).await;
    let log = Log::default();
    let asked = Instant::now();
    let w2 = start(config("w2"), &stream, &store, &log, &Faults::default());
    wait_until("w2 takes its share", Duration::from_secs(60), || {
        w2.held() == 2
    })
    .await;
    let waited = asked.elapsed();
    let timeout = LeaseConfig::default().handoff_timeout;
    assert!(
        waited >= timeout,
        "taken by force only after the handoff timeout: {waited:?}"
    );
    assert_eq!(w2.status.borrow().forced_takes, 2);
    // w1 learns at its next renewal: its processors get lease_lost once their batch ends.
    wait_until("w1 notices", Duration::from_secs(10), || w1.held() == 2).await;
    w2.stop().await.unwrap();
    w1.task.abort();
}

#[tokio::test(start_paused = true)]
async fn the_lease_limit_leaves_spillover_visible() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 5));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let config = config("w1").with_lease(LeaseConfig::default().with_max_leases_per_worker(3));
    let w1 = start(config, &stream, &store, &Log::default(), &Faults::default());
    wait_until("3 leases", Duration::from_secs(30), || w1.held() == 3).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(w1.held(), 3);
    assert_eq!(w1.status.borrow().spillover, 2);
    assert_eq!(
        owners(&store).values().sum::<usize>(),
        3,
        "two leases stay unowned"
    );
    w1.stop().await.unwrap();
}
