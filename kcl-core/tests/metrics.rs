//! What a worker reports through the `metrics` facade, captured by a recorder installed for
//! the test's thread: names, labels (the shard label only when asked for), and values that
//! agree with what was processed and with `WorkerStatus`.

#![cfg(feature = "metrics")]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kcl_core::metrics::{self as names, MetricsConfig};
use kcl_core::testing::{Fault, Faulty, InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    CancellationToken, FixedStreams, InitialPosition, LeaseStore, StreamClient, StreamConfig,
    Worker,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// One series recorded: name, labels, and value (a histogram's: its number of samples).
type Series = (String, Vec<(String, String)>, f64);

/// Every series recorded.
fn snapshot(snapshotter: &Snapshotter) -> Vec<Series> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(samples) => samples.len() as f64,
            };
            (key.name().to_owned(), labels, value)
        })
        .collect()
}

fn series<'a>(all: &'a [Series], name: &str) -> Vec<&'a Series> {
    all.iter().filter(|(n, _, _)| n == name).collect()
}

fn has_label(labels: &[(String, String)], key: &str) -> bool {
    labels.iter().any(|(k, _)| k == key)
}

/// Runs one worker over 120 records in 3 shards and returns what it recorded, its last
/// status, and the records put by shard.
async fn run_worker(
    metrics: MetricsConfig,
) -> (
    Vec<Series>,
    kcl_core::WorkerStatus,
    BTreeMap<String, Vec<String>>,
) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The test runtime runs every task on this thread.
    let _guard = metrics::set_default_local_recorder(&recorder);
    let stream = Arc::new(InMemoryStream::new("test-stream", 3));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let expected = put(&stream, 0, 120);
    let log = Log::default();
    let worker = start(
        config("w1").with_metrics(metrics),
        &stream,
        &store,
        &log,
        &Faults::default(),
    );
    wait_until("all records", Duration::from_secs(30), || {
        log.count() == 120
    })
    .await;
    // A taking round publishes the worker-wide metrics.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = worker.status.borrow().clone();
    let recorded = snapshot(&snapshotter);
    worker.stop().await.unwrap();
    (recorded, status, expected)
}

#[tokio::test(start_paused = true)]
async fn per_shard_metrics_carry_no_shard_label_by_default() {
    let (all, status, _) = run_worker(MetricsConfig::default()).await;

    let records = series(&all, names::RECORDS_PROCESSED);
    assert_eq!(
        records.len(),
        1,
        "one series for the whole stream: {records:?}"
    );
    let (_, labels, value) = records[0];
    assert_eq!(*value, 120.0);
    assert_eq!(
        labels,
        &vec![(
            names::STREAM_NAME_LABEL.to_owned(),
            "test-stream".to_owned()
        )]
    );
    assert_eq!(status.records_processed, 120);
    let bytes = series(&all, names::BYTES_PROCESSED);
    assert_eq!(bytes[0].2, status.bytes_processed as f64);
    assert!(status.bytes_processed > 0);
    // No per-shard lag without the label, but the worker's maximum always.
    assert!(series(&all, names::LAG).is_empty());
    let max_lag = series(&all, names::MAX_LAG);
    assert_eq!(max_lag.len(), 1);
    assert_eq!(
        max_lag[0].2,
        status.max_millis_behind_latest().unwrap() as f64
    );
    assert!(
        all.iter()
            .all(|(_, labels, _)| !has_label(labels, names::SHARD_ID_LABEL)),
        "{all:?}"
    );

    // Worker-wide metrics agree with the status.
    assert_eq!(series(&all, names::CURRENT_LEASES)[0].2, 3.0);
    assert_eq!(series(&all, names::TOTAL_LEASES)[0].2, 3.0);
    assert_eq!(series(&all, names::WORKERS)[0].2, 1.0);
    let taken = series(&all, names::TAKEN_LEASES);
    assert_eq!(taken.iter().map(|s| s.2).sum::<f64>(), 3.0);
    assert_eq!(status.leases_taken, 3);
    // The histogram of process_records: one sample per batch delivered.
    let durations = series(&all, names::PROCESS_RECORDS_DURATION);
    assert_eq!(durations.len(), 1);
    assert!(durations[0].2 >= 3.0, "{durations:?}");
    // Lease-table calls, by operation and outcome.
    let calls = series(&all, names::LEASE_TABLE_CALLS);
    let ok_updates: f64 = calls
        .iter()
        .filter(|(_, l, _)| {
            l.contains(&(names::OPERATION_LABEL.to_owned(), "UpdateItem".to_owned()))
                && l.contains(&(names::OUTCOME_LABEL.to_owned(), "ok".to_owned()))
        })
        .map(|s| s.2)
        .sum();
    assert!(ok_updates >= 3.0, "{calls:?}");
    // A single-stream worker has no streams to report.
    assert!(status.streams.is_none());
    assert!(
        all.iter()
            .all(|(name, _, _)| !name.starts_with("aws.kinesis.client.streams.")),
        "{all:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn per_shard_metrics_are_labelled_with_the_shard_when_asked() {
    let (all, status, expected) = run_worker(MetricsConfig::default().with_per_shard(true)).await;

    let records = series(&all, names::RECORDS_PROCESSED);
    assert_eq!(records.len(), 3, "{records:?}");
    for (_, labels, value) in &records {
        let shard = labels
            .iter()
            .find(|(k, _)| k == names::SHARD_ID_LABEL)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no shard label: {labels:?}"));
        assert_eq!(*value, expected[shard].len() as f64, "{shard}");
    }
    let lags = series(&all, names::LAG);
    assert_eq!(lags.len(), 3, "{lags:?}");
    assert_eq!(status.millis_behind_latest.len(), 3);
    // The worker-wide ones stay unlabelled by shard.
    assert!(!has_label(
        &series(&all, names::MAX_LAG)[0].1,
        names::SHARD_ID_LABEL
    ));
}

#[tokio::test(start_paused = true)]
async fn a_multi_stream_worker_reports_its_streams() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let orders = Arc::new(InMemoryStream::new("orders", 2));
    let clicks = Arc::new(InMemoryStream::new("clicks", 1));
    // Throttled whatever it is asked: listed, never reached.
    let audit = Arc::new(Faulty::new(Arc::new(InMemoryStream::new("audit", 1))));
    audit.set(Fault::Throttle);
    let records =
        |by_shard: BTreeMap<String, Vec<String>>| by_shard.values().map(Vec::len).sum::<usize>();
    let expected: usize = records(put(&orders, 0, 40)) + records(put(&clicks, 0, 20));
    let tracker = FixedStreams(
        ["orders", "clicks", "audit"]
            .map(|n| StreamConfig::new(n).with_initial_position(InitialPosition::TrimHorizon))
            .to_vec(),
    );
    let clients = move |name: &str| -> Arc<dyn StreamClient> {
        match name {
            "orders" => orders.clone(),
            "clicks" => clicks.clone(),
            _ => audit.clone(),
        }
    };
    let log = Log::default();
    let worker = Worker::multi_stream(
        config("w1"),
        Arc::new(tracker),
        Arc::new(clients),
        Arc::new(InMemoryLeaseStore::new("test-app")) as Arc<dyn LeaseStore>,
        {
            let log = log.clone();
            move |shard: &str| TestProcessor {
                worker: "w1".to_owned(),
                shard: shard.to_owned(),
                log: log.clone(),
                faults: Faults::default(),
            }
        },
    )
    .unwrap();
    let status = worker.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    wait_until(
        "the reachable streams' records",
        Duration::from_secs(60),
        || log.count() == expected && status.borrow().held_leases.len() == 3,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let streams = status.borrow().streams.clone().expect("multi-stream");
    let all = snapshot(&snapshotter);
    shutdown.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(
        (streams.followed, streams.unreachable),
        (2, 1),
        "{streams:?}"
    );
    let label = vec![(
        names::STREAM_NAME_LABEL.to_owned(),
        "test-stream".to_owned(),
    )];
    for (name, value) in [
        (names::STREAMS_ACTIVE, 2.0),
        (names::STREAMS_UNREACHABLE, 1.0),
        (names::STREAMS_PENDING_DELETION, 0.0),
    ] {
        assert_eq!(
            series(&all, name),
            [&(name.to_owned(), label.clone(), value)]
        );
    }
    for name in [names::STREAMS_DELETED, names::STREAM_DISCOVERY_FAILURES] {
        assert!(series(&all, name).iter().all(|s| s.2 == 0.0), "{name}");
    }
}
