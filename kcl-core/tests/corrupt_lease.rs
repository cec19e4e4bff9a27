//! A corrupt lease of a live shard (issue 10, defect 9), on the in-memory fakes and paused
//! Tokio time: an item that does not decode (a `leaseCounter` rewritten as text by hand) is
//! reported once per worker as an error naming the repair command, counted in
//! `WorkerStatus::invalid_lease_items`, never overwritten, and does not make the shard sync
//! spin; once repaired, its shard is taken and processed again.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    Lease, LeaseStore, RecordsPage, Shard, StartingPosition, StreamClient, async_trait,
};
use tracing_subscriber::fmt::MakeWriter;

/// The shard whose lease is corrupted.
const CORRUPT: &str = "shardId-000000000001";
/// The other shard, whose lease stays valid.
const VALID: &str = "shardId-000000000000";
/// How long the worker runs with the corrupt item in the spinning test.
const OBSERVED: Duration = Duration::from_secs(120);
/// What the in-memory item reports as wrong.
const PROBLEM: &str = "is a string, not a number";

/// A stream client that counts `ListShards` calls: one per shard sync.
#[derive(Debug)]
struct CountingStream {
    inner: Arc<InMemoryStream>,
    list_shards: AtomicUsize,
}

#[async_trait]
impl StreamClient for CountingStream {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }
    async fn list_shards(&self) -> kcl_core::Result<Vec<Shard>> {
        self.list_shards.fetch_add(1, Ordering::SeqCst);
        self.inner.list_shards().await
    }
    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> kcl_core::Result<String> {
        self.inner.get_shard_iterator(shard_id, position).await
    }
    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> kcl_core::Result<RecordsPage> {
        self.inner
            .get_records(shard_id, shard_iterator, limit)
            .await
    }
}

/// The log output of a test, captured (the test runs on one thread, so a thread-local
/// subscriber sees every task's events).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    /// Warnings and errors that mention `text`.
    fn mentioning(&self, text: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_owned)
            .collect()
    }
}

/// A table whose two leases a first worker created, processed and released, after which the
/// lease of [`CORRUPT`] was overwritten by an item whose `leaseCounter` is text. Returns the
/// lease as it was before.
async fn corrupted_table(stream: &Arc<InMemoryStream>, store: &Arc<InMemoryLeaseStore>) -> Lease {
    let log = Log::default();
    let first = start(config("w1"), stream, store, &log, &Faults::default());
    let puts = put(stream, 0, 20);
    assert_eq!(puts.len(), 2, "records on both shards");
    wait_until(
        "the first records processed",
        Duration::from_secs(30),
        || log.count() == 20,
    )
    .await;
    first.stop().await.unwrap();
    let before = store
        .get_lease(CORRUPT)
        .await
        .unwrap()
        .expect("the lease exists");
    assert_eq!(before.owner, None, "released at shutdown");
    store.put_invalid(CORRUPT, "leaseCounter", PROBLEM);
    before
}

fn delivered_from(log: &Log, shard: &str) -> usize {
    log.delivered().iter().filter(|d| d.shard == shard).count()
}

// Before the fix, the coordinator and the shard syncer each warned once ("skipping a lease
// item that does not decode"), without saying how to repair it, and nothing counted it.
#[tokio::test(start_paused = true)]
async fn a_corrupt_lease_is_reported_once_as_an_error_and_the_shard_sync_does_not_spin() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    corrupted_table(&stream, &store).await;

    let (logs, _guard) = Logs::capture();
    let counting = Arc::new(CountingStream {
        inner: stream.clone(),
        list_shards: AtomicUsize::new(0),
    });
    let log = Log::default();
    let worker = start_on(
        config("w2"),
        counting.clone() as Arc<dyn StreamClient>,
        store.clone() as Arc<dyn LeaseStore>,
        &log,
        &Faults::default(),
    );
    let puts = put(&stream, 100, 140);
    tokio::time::sleep(OBSERVED).await;

    // The regression guard: a hole check that took the undecodable item for a hole would
    // trigger a full shard sync after every taking round (every 2 s), forever.
    let interval = kcl_core::LeaseConfig::default().shard_sync_interval;
    let syncs = counting.list_shards.load(Ordering::SeqCst);
    let expected = 1 + (OBSERVED.as_secs() / interval.as_secs()) as usize;
    assert!(
        syncs <= expected,
        "{syncs} shard syncs in {OBSERVED:?}: the sync spins (expected at most {expected})"
    );

    let status = worker.status.borrow().clone();
    assert_eq!(status.invalid_lease_items, 1);
    assert_eq!(
        status.held_leases.into_iter().collect::<Vec<_>>(),
        [VALID.to_owned()],
        "the valid lease is processed, the corrupt one left alone"
    );
    assert!(status.taking_rounds > 30, "the worker ran its rounds");
    assert_eq!(delivered_from(&log, VALID), puts[VALID].len());
    assert_eq!(
        delivered_from(&log, CORRUPT),
        0,
        "nobody guesses a checkpoint"
    );
    assert!(
        matches!(
            store.get_lease(CORRUPT).await,
            Err(kcl_core::Error::InvalidLeaseItem { .. })
        ),
        "the item is never overwritten by the worker"
    );

    let reports = logs.mentioning(CORRUPT);
    assert_eq!(
        reports.len(),
        1,
        "one report per item and worker, from the taking rounds and the shard syncs together: {reports:#?}"
    );
    let report = &reports[0];
    assert!(report.contains("ERROR"), "{report}");
    for part in [
        "table=test-app",
        "attribute=\"leaseCounter\"",
        PROBLEM,
        "kcl-admin --app test-app repair shardId-000000000001",
    ] {
        assert!(report.contains(part), "`{part}` missing from: {report}");
    }
    worker.stop().await.unwrap();
}

// The repair is picked up by the next taking round, and the item forgotten: broken again, it
// is reported again.
#[tokio::test(start_paused = true)]
async fn a_repaired_lease_is_taken_and_processed_and_a_new_break_reported_again() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 2));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let before = corrupted_table(&stream, &store).await;

    let (logs, _guard) = Logs::capture();
    let log = Log::default();
    let worker = start(config("w2"), &stream, &store, &log, &Faults::default());
    let puts = put(&stream, 100, 140);
    wait_until("the valid shard processed", Duration::from_secs(30), || {
        delivered_from(&log, VALID) == puts[VALID].len()
            && worker.status.borrow().invalid_lease_items == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(delivered_from(&log, CORRUPT), 0);

    // What `kcl-admin repair` writes: the lease as it was, without an owner, at a counter
    // above any it had.
    let mut repaired = before.clone();
    repaired.counter = before.counter + 1_000;
    store.repair(repaired);
    wait_until(
        "the repaired shard taken and processed",
        Duration::from_secs(30),
        || delivered_from(&log, CORRUPT) == puts[CORRUPT].len(),
    )
    .await;
    let status = worker.status.borrow().clone();
    assert_eq!(status.held_leases.len(), 2);
    assert_eq!(status.invalid_lease_items, 0);
    let first_delivery = log
        .delivered()
        .into_iter()
        .find(|d| d.shard == CORRUPT)
        .unwrap();
    assert_eq!(
        Some(&first_delivery.sequence_number),
        puts[CORRUPT].first(),
        "resumed after the checkpoint kept by the repair: nothing before it again"
    );
    assert_eq!(logs.mentioning(CORRUPT).len(), 1, "reported once so far");

    // Broken again while held: the worker loses it and reports it again, once.
    store.put_invalid(CORRUPT, "checkpoint", "is a number, not a string");
    wait_until("the new break counted", Duration::from_secs(30), || {
        let status = worker.status.borrow();
        status.invalid_lease_items == 1 && status.held_leases.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let errors: Vec<String> = logs
        .mentioning(CORRUPT)
        .into_iter()
        .filter(|l| l.contains("ERROR") && l.contains("does not decode"))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[1].contains("attribute=\"checkpoint\""),
        "{}",
        errors[1]
    );
    worker.stop().await.unwrap();
}
