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
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
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
