//! The coordinator against lease stores that behave like DynamoDB where the in-memory store
//! does not: scans that are not snapshots, and writes that take a while. On paused Tokio time.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    Checkpoint, Lease, LeaseConfig, LeaseCreation, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate,
    LineageGuard, RecordsPage, Result, Shard, StartingPosition, StreamClient, async_trait,
};
use tokio::time::Instant;

/// A lease store whose scans leave out some keys while direct reads see them, as a DynamoDB
/// Scan can: it is not a snapshot, so a scan that passed a parent's key before a child's
/// lease was created returns the child without the parent.
#[derive(Debug)]
struct TornScans {
    inner: Arc<InMemoryLeaseStore>,
    hidden_from_scans: Mutex<BTreeSet<String>>,
}

#[async_trait]
impl LeaseStore for TornScans {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }
    async fn initialize(&self) -> Result<()> {
        self.inner.initialize().await
    }
    async fn list_leases(&self) -> Result<LeaseScan> {
        let mut scan = self.inner.list_leases().await?;
        let hidden = self.hidden_from_scans.lock().unwrap().clone();
        scan.leases.retain(|l| !hidden.contains(&l.lease_key));
        Ok(scan)
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        self.inner.get_lease(lease_key).await
    }
    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        self.inner.create_lease_if_absent(lease).await
    }
    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        self.inner.create_lease_in_lineage(lease, guard).await
    }
    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        self.inner.update_lease(lease_key, fence, update).await
    }
    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        self.inner.delete_lease(lease_key, fence).await
    }
}

/// The one shard of a new in-memory stream.
const PARENT: &str = "shardId-000000000000";

#[tokio::test(start_paused = true)]
async fn a_child_waits_for_a_parent_that_a_scan_left_out() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let parent = PARENT.to_owned();
    let children = stream.split_shard(PARENT);
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    // The parent is being processed by another live worker; its children's leases exist.
    let other = keep_alive(&store, PARENT, "other");
    for shard in stream
        .shards()
        .iter()
        .filter(|s| children.contains(&s.shard_id))
    {
        store.put(
            Lease::new(&shard.shard_id, Checkpoint::TrimHorizon)
                .with_parents([parent.clone()])
                .with_hash_key_range(shard.hash_key_range),
        );
    }
    let torn = Arc::new(TornScans {
        inner: store.clone(),
        hidden_from_scans: Mutex::new(BTreeSet::from([parent.clone()])),
    });
    let log = Log::default();
    let worker = start_on(config("w1"), stream.clone(), torn, &log, &Faults::default());
    wait_until("the children taken", Duration::from_secs(10), || {
        worker.held() == 2
    })
    .await;
    // Several taking rounds and parent polls, each scan without the parent.
    tokio::time::sleep(LeaseConfig::default().lease_duration).await;
    for child in &children {
        assert_eq!(
            log.events(child),
            vec![],
            "{child} started while its parent {parent} was still being processed"
        );
    }

    other.abort();
    let lease = store.get_lease(&parent).await.unwrap().unwrap();
    store
        .update_lease(
            &parent,
            &lease.fence(),
            &LeaseUpdate::Checkpoint {
                checkpoint: Checkpoint::ShardEnd,
            },
        )
        .await
        .unwrap();
    let finished = Instant::now();
    wait_until("the children started", Duration::from_secs(5), || {
        children.iter().all(|c| {
            log.event_time("w1", c, finished, |e| matches!(e, Event::Initialized(_)))
                .is_some()
        })
    })
    .await;
    worker.stop().await.unwrap();
}

/// A lease store whose takes and releases take `delay` each, counting how many are in
/// flight at once.
#[derive(Debug)]
struct SlowWrites {
    inner: Arc<InMemoryLeaseStore>,
    delay: Duration,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl SlowWrites {
    fn new(inner: Arc<InMemoryLeaseStore>, delay: Duration) -> Self {
        SlowWrites {
            inner,
            delay,
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl LeaseStore for SlowWrites {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }
    async fn initialize(&self) -> Result<()> {
        self.inner.initialize().await
    }
    async fn list_leases(&self) -> Result<LeaseScan> {
        self.inner.list_leases().await
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        self.inner.get_lease(lease_key).await
    }
    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        self.inner.create_lease_if_absent(lease).await
    }
    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        self.inner.create_lease_in_lineage(lease, guard).await
    }
    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        if !matches!(update, LeaseUpdate::Take { .. } | LeaseUpdate::Release) {
            return self.inner.update_lease(lease_key, fence, update).await;
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let result = self.inner.update_lease(lease_key, fence, update).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        self.inner.delete_lease(lease_key, fence).await
    }
}

/// Shards of the slow-write tests: enough that one call after the other clearly overruns.
const SHARDS: u32 = 8;
/// How long a take or a release takes: well inside every request timeout.
const SLOW_WRITE: Duration = Duration::from_millis(500);

#[tokio::test(start_paused = true)]
async fn the_takes_of_a_round_are_sent_together() {
    let stream = Arc::new(InMemoryStream::new("test-stream", SHARDS));
    let slow = Arc::new(SlowWrites::new(
        Arc::new(InMemoryLeaseStore::new("test-app")),
        SLOW_WRITE,
    ));
    let log = Log::default();
    let started = Instant::now();
    let worker = start_on(
        config("w1"),
        stream.clone(),
        slow.clone(),
        &log,
        &Faults::default(),
    );
    wait_until("every lease taken", Duration::from_secs(30), || {
        worker.held() == SHARDS as usize
    })
    .await;
    let took = started.elapsed();
    assert_eq!(
        slow.most_in_flight.load(Ordering::SeqCst),
        SHARDS as usize,
        "the takes were sent together"
    );
    assert!(
        took < 2 * SLOW_WRITE,
        "{SHARDS} takes took {took:?}, not about one take ({SLOW_WRITE:?})"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_during_a_slow_taking_round_is_acted_on_at_once() {
    let stream = Arc::new(InMemoryStream::new("test-stream", SHARDS));
    let slow = Arc::new(SlowWrites::new(
        Arc::new(InMemoryLeaseStore::new("test-app")),
        SLOW_WRITE,
    ));
    let log = Log::default();
    let worker = start_on(
        config("w1"),
        stream.clone(),
        slow.clone(),
        &log,
        &Faults::default(),
    );
    wait_until("the first take sent", Duration::from_secs(10), || {
        slow.in_flight.load(Ordering::SeqCst) > 0
    })
    .await;
    let cancelled = Instant::now();
    worker.stop().await.unwrap();
    let took = cancelled.elapsed();
    // The takes in flight finish, the leases taken are released together.
    assert!(
        took <= 3 * SLOW_WRITE,
        "shutdown took {took:?} with lease writes of {SLOW_WRITE:?}"
    );
    assert!(
        slow.inner.leases().iter().all(|l| l.owner.is_none()),
        "every lease taken was released: {:?}",
        slow.inner.leases()
    );
}

/// A stream whose `ListShards` hangs once `stalled` is set (the other calls go through),
/// counting the calls that hang.
#[derive(Debug)]
struct StalledListShards {
    inner: Arc<InMemoryStream>,
    stalled: AtomicBool,
    hanging: AtomicUsize,
}

#[async_trait]
impl StreamClient for StalledListShards {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }
    async fn list_shards(&self) -> Result<Vec<Shard>> {
        if self.stalled.load(Ordering::SeqCst) {
            self.hanging.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.inner.list_shards().await
    }
    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String> {
        self.inner.get_shard_iterator(shard_id, position).await
    }
    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        self.inner
            .get_records(shard_id, shard_iterator, limit)
            .await
    }
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_does_not_wait_for_a_stalled_shard_sync() {
    let stream = Arc::new(StalledListShards {
        inner: Arc::new(InMemoryStream::new("test-stream", 2)),
        stalled: AtomicBool::new(false),
        hanging: AtomicUsize::new(0),
    });
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let sync_every = Duration::from_secs(5);
    let worker = start_on(
        config("w1").with_lease(LeaseConfig::default().with_shard_sync_interval(sync_every)),
        stream.clone(),
        store.clone(),
        &log,
        &Faults::default(),
    );
    wait_until("the leases taken", Duration::from_secs(10), || {
        worker.held() == 2
    })
    .await;
    stream.stalled.store(true, Ordering::SeqCst);
    wait_until("a shard sync hanging", 2 * sync_every, || {
        stream.hanging.load(Ordering::SeqCst) > 0
    })
    .await;
    let cancelled = Instant::now();
    worker.stop().await.unwrap();
    // Without interrupting the sync, the stop waits for ListShards to time out, five times.
    let took = cancelled.elapsed();
    assert!(
        took < sync_every,
        "shutdown took {took:?} behind a stalled shard sync"
    );
    assert!(
        store.leases().iter().all(|l| l.owner.is_none()),
        "the leases were released: {:?}",
        store.leases()
    );
}
