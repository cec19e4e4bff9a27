//! A worker on a bad day, on the in-memory fakes and paused Tokio time: the lease table
//! deleted under it, another process running with its worker id, a corrupt lease item, a
//! table of another stream. (The same cases against the real servers are in
//! `tests/tests/bad_day.rs`.)

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{Error, LeaseConfig, LeaseStore};
use tokio::time::Instant;

/// How long a worker may take to end after the table vanished: its consumers stop at once
/// (their leases are void), so about one taking round or renewal, with room to spare.
const ENDS_WITHIN: Duration = Duration::from_secs(30);

/// Records delivered more than once, by (shard, sequence number).
fn duplicates(log: &Log) -> BTreeMap<(String, String), usize> {
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for d in log.delivered() {
        *seen.entry((d.shard, d.sequence_number)).or_default() += 1;
    }
    seen.retain(|_, n| *n > 1);
    seen
}

// Defect 1 of issue 10: the table deleted under a running worker. Before the fix the worker
// logged "lease table does not exist" forever and never ended, and the batch in flight was
// delivered again on each retry of its failed checkpoint.
#[tokio::test(start_paused = true)]
async fn a_vanished_lease_table_ends_the_worker_with_a_typed_error() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    // Slow batches, so a batch is in flight (its checkpoint still to come) when the table goes.
    let faults = Faults {
        delay: Duration::from_millis(700),
        ..Faults::default()
    };
    let worker = start(config("w1"), &stream, &store, &log, &faults);
    put(&stream, 0, 40);
    wait_until("both leases held", Duration::from_secs(10), || {
        worker.held() == 2
    })
    .await;
    wait_until("records delivered", Duration::from_secs(10), || {
        log.count() > 0
    })
    .await;
    put(&stream, 40, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.drop_table();
    let dropped = Instant::now();
    let delivered_then = log.count();

    let outcome = tokio::time::timeout(ENDS_WITHIN, worker.task)
        .await
        .expect("the worker ends on its own")
        .expect("worker task");
    assert!(
        matches!(&outcome, Err(Error::LeaseTableNotFound { table, .. }) if table == "test-app"),
        "{outcome:?}"
    );
    assert!(dropped.elapsed() < ENDS_WITHIN);
    assert_eq!(
        duplicates(&log),
        BTreeMap::new(),
        "no batch delivered twice"
    );
    // At most the batches already fetched were started; nothing is retried.
    let after = log.count() - delivered_then;
    let most = LeaseConfig::default().max_leases_per_worker.min(2)
        * kcl_core::PollingConfig::default().max_records as usize;
    assert!(
        after <= most,
        "{after} records delivered after the table vanished"
    );
}

// Defect 8 of issue 10: a second process with the same worker id. It takes the leases it
// finds under its own name (a restart of the same worker looks the same), and the first
// process, whose lease counters then move without its writes, stops with a typed error and
// writes nothing more; the second goes on alone, and no record is delivered by both at once.
#[tokio::test(start_paused = true)]
async fn a_second_process_with_the_same_worker_id_stops_one_of_them() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let faults = Faults::default();
    let first = start(config("w1"), &stream, &store, &log, &faults);
    let mut expected = put(&stream, 0, 50);
    wait_until(
        "the first process holds both leases",
        Duration::from_secs(10),
        || first.held() == 2,
    )
    .await;
    wait_until("records delivered", Duration::from_secs(10), || {
        log.count() == 50
    })
    .await;

    let second = start(config("w1"), &stream, &store, &log, &faults);
    let outcome = tokio::time::timeout(ENDS_WITHIN, first.task)
        .await
        .expect("the first process ends on its own")
        .expect("worker task");
    assert!(
        matches!(&outcome, Err(Error::DuplicateWorkerId { worker_id, .. }) if worker_id == "w1"),
        "{outcome:?}"
    );
    // The second process keeps the shards and goes on.
    merge(&mut expected, put(&stream, 50, 100));
    wait_until("the rest delivered", Duration::from_secs(30), || {
        log.count() >= 100
    })
    .await;
    assert_eq!(
        log.overlaps(),
        vec![],
        "two processes inside one shard's batch"
    );
    assert_exactly_once_in_order(&log, &expected);
    assert_eq!(owners(&store), BTreeMap::from([("w1".to_owned(), 2)]));
    second.stop().await.unwrap();
}

// Defect 2 of issue 10: two deployments with one application name on two streams share a
// lease table. Before the fix the second worker took the first stream's leases and read its
// own stream from their checkpoints, losing records of both without a word.
#[tokio::test(start_paused = true)]
async fn a_worker_refuses_the_lease_table_of_another_stream() {
    let orders = Arc::new(InMemoryStream::new("orders", 2));
    let payments = Arc::new(InMemoryStream::new("payments", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let config = |stream: &str, worker: &str| {
        kcl_core::WorkerConfig::new("test-app", stream)
            .with_worker_id(worker)
            .with_initial_position(kcl_core::InitialPosition::TrimHorizon)
    };
    let on_orders = start(
        config("orders", "a"),
        &orders,
        &store,
        &log,
        &Faults::default(),
    );
    wait_until("the orders leases taken", Duration::from_secs(10), || {
        on_orders.held() == 2
    })
    .await;
    assert!(
        store
            .leases()
            .iter()
            .all(|l| l.stream_name.as_deref() == Some("orders")),
        "each lease records its stream"
    );

    let on_payments = start(
        config("payments", "b"),
        &payments,
        &store,
        &log,
        &Faults::default(),
    );
    let outcome = tokio::time::timeout(ENDS_WITHIN, on_payments.task)
        .await
        .expect("the worker refuses at once")
        .expect("worker task");
    assert!(
        matches!(&outcome, Err(Error::LeaseTableOfAnotherStream { table, table_stream, stream })
            if table == "test-app" && table_stream == "orders" && stream == "payments"),
        "{outcome:?}"
    );
    assert_eq!(owners(&store), BTreeMap::from([("a".to_owned(), 2)]));
    assert!(log.worker_events("b").is_empty(), "nothing processed by b");
    on_orders.stop().await.unwrap();
}

// The same when the other stream's leases appear while the worker runs (both deployments
// started on an empty table at once): the taking round that sees them ends the worker before
// it takes one.
#[tokio::test(start_paused = true)]
async fn a_lease_of_another_stream_seen_while_running_ends_the_worker_untaken() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let worker = start(config("w1"), &stream, &store, &log, &Faults::default());
    wait_until("the lease taken", Duration::from_secs(10), || {
        worker.held() == 1
    })
    .await;
    let foreign = "shardId-000000000099";
    store.put(
        kcl_core::Lease::new(foreign, kcl_core::Checkpoint::TrimHorizon).with_stream_name("other"),
    );
    let outcome = tokio::time::timeout(ENDS_WITHIN, worker.task)
        .await
        .expect("the worker ends")
        .expect("worker task");
    assert!(
        matches!(&outcome, Err(Error::LeaseTableOfAnotherStream { table_stream, .. }) if table_stream == "other"),
        "{outcome:?}"
    );
    let lease = store.get_lease(foreign).await.unwrap().unwrap();
    assert_eq!(
        lease.owner, None,
        "the other stream's lease was never taken"
    );
}
