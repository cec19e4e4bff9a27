//! The coordinator against lease stores that behave like DynamoDB where the in-memory store
//! does not: scans that are not snapshots, and writes that take a while. On paused Tokio time.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    Checkpoint, Lease, LeaseConfig, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate, Result,
    async_trait,
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
