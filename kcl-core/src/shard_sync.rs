//! Shard sync: keeps the lease table in step with the stream's shards.
//!
//! One task per worker, owned by the worker's background set: it syncs every
//! `shard_sync_interval`, and at once when the worker asks (a shard ended without reporting
//! its children, a hole in the lease coverage). It runs beside the worker's loop, so a slow or
//! stalled `ListShards` never holds up lease taking, handoffs or the watchdog. It stops when
//! its token is cancelled, at once, even in the middle of a sync (see [`ShardSyncer::run`]);
//! it ends with an error only when the stream is gone.
//!
//! A DynamoDB Scan is not a snapshot: an item created or deleted while a scan runs may or may
//! not be in it (items that exist throughout always are). A sync stays correct with such
//! scans. A lease missing because it was just created is created again, which the condition
//! makes a no-op; its ancestors are in the lineage through the leases that existed before it.
//! A finished parent is deleted only when every child is seen started, and a child missing
//! from the scan counts as started only when it is past retention or has a leased
//! descendant, which a child created during the scan cannot have. (The worker never takes a
//! parent missing from a scan for finished: it reads the key.)
//!
//! A sync's plan can also go stale while its writes are sent (a worker paused mid-sync): a
//! lease planned for creation could meanwhile have been created, processed to its end and
//! deleted. So a lease is created only while the parents that had leases still have them and
//! none of its children has one (one transaction), and a finished lease is deleted only once
//! a read of its parents' keys finds none: while a parent's lease exists, none of its
//! children's was deleted.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::{SeedSource, retry};
use crate::config::{InitialPosition, WorkerConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::invalid_items::InvalidItems;
use crate::lease::{Lease, LeaseCreation, LeaseStore, LineageGuard, lineage};
use crate::sequence::Checkpoint;
use crate::stream::{Shard, StreamClient};
use crate::worker::SyncRequests;

/// Attempts of each call of one sync.
const SYNC_ATTEMPTS: usize = 5;

/// Creates `lease` if absent, guarded by `guard` unless it has nothing to check (a plain
/// conditional put costs half a transaction).
async fn create(
    store: &dyn LeaseStore,
    lease: &Lease,
    guard: &LineageGuard,
) -> Result<LeaseCreation> {
    if guard.is_empty() {
        Ok(match store.create_lease_if_absent(lease).await? {
            true => LeaseCreation::Created,
            false => LeaseCreation::Exists,
        })
    } else {
        store.create_lease_in_lineage(lease, guard).await
    }
}

/// Keeps one stream's leases in step with its shards. In multi-stream mode `store` is the
/// stream's view of the table ([`StreamLeases`](crate::lease::stream_view::StreamLeases)),
/// keyed by shard id, which also stamps the leases with the stream.
#[derive(Debug)]
pub(crate) struct ShardSyncer {
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) store: Arc<dyn LeaseStore>,
    /// In single-stream mode, the stream's name or ARN: a table whose leases name another
    /// stream is refused, and new leases are stamped with it. `None` in multi-stream mode.
    pub(crate) stream_name: Option<String>,
    /// Where the stream's shards without a checkpoint start.
    pub(crate) initial_position: InitialPosition,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) seeds: Arc<SeedSource>,
    /// Lease items that do not decode, reported once per worker: shared with the
    /// coordinator.
    pub(crate) invalid_items: Arc<InvalidItems>,
    /// With watchers: whether this worker watches (only watchers sync on the interval).
    pub(crate) watching: Option<Arc<AtomicBool>>,
}

impl ShardSyncer {
    /// Syncs every `shard_sync_interval` and whenever a sync is requested, until `stop`.
    ///
    /// # Errors
    /// [`Error::StreamNotFound`] when the stream was deleted, and
    /// [`Error::LeaseTableOfAnotherStream`] when the table is another stream's; other failures
    /// are logged and retried at the next sync.
    pub(crate) async fn run(
        mut self,
        requests: Arc<SyncRequests>,
        stop: CancellationToken,
    ) -> Result<()> {
        let every = self.config.lease.shard_sync_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = requests.requested() => {
                    requests.take();
                }
                _ = tick.tick() => {
                    // With watchers, only they sync on the interval: a member's sync would
                    // cost a strongly consistent scan for nothing the watchers miss.
                    if self.watching.as_ref().is_some_and(|w| !w.load(Ordering::SeqCst)) {
                        continue;
                    }
                }
            }
            // A sync is dropped when the worker stops, even halfway through its writes, so a
            // long first sync of a big stream does not hold up a shutdown. Safe: every write is
            // conditional and idempotent (a create only if absent, parents before children; a
            // delete only at the fence seen), so a dropped write happened or did not, and the
            // next sync, on any worker, recomputes everything from fresh reads.
            let synced = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                synced = self.sync_once() => synced,
            };
            match synced {
                Err(
                    e @ (Error::StreamNotFound { .. } | Error::LeaseTableOfAnotherStream { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    warn!(error = %crate::ErrorChain(&e), "shard sync failed; the next sync retries")
                }
                Ok(()) => {}
            }
        }
    }

    /// Deletes the finished leases the lineage lets go, once a consistent read of their
    /// parents' keys finds none of them. Returns how many it deleted.
    async fn delete_finished(&self, shards: &[Shard], leases: &[Lease]) -> usize {
        let deletions = lineage::leases_to_delete(shards, leases);
        let parents: Vec<String> = deletions
            .iter()
            .flat_map(|d| d.parents.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let present: BTreeSet<String> = if parents.is_empty() {
            BTreeSet::new()
        } else {
            match self.store.get_leases(&parents).await {
                Ok(read) => read
                    .leases
                    .into_iter()
                    .map(|l| l.lease_key)
                    .chain(read.invalid.iter().filter_map(|e| match e {
                        Error::InvalidLeaseItem { lease_key, .. } => Some(lease_key.clone()),
                        _ => None,
                    }))
                    .collect(),
                Err(e) => {
                    warn!(error = %crate::ErrorChain(&e), "reading the parents of finished leases failed; the next sync deletes them");
                    return 0;
                }
            }
        };
        let mut deleted = 0usize;
        for deletion in deletions {
            if deletion.parents.iter().any(|p| present.contains(p)) {
                continue;
            }
            match self
                .store
                .delete_lease(&deletion.lease_key, &deletion.fence)
                .await
            {
                Ok(()) => {
                    debug!(lease_key = %deletion.lease_key, reason = ?deletion.reason, "deleted finished lease");
                    deleted += 1;
                }
                // Changed or already deleted by another worker.
                Err(e) if e.kind() == ErrorKind::ConditionFailed => {}
                Err(e) => {
                    warn!(lease_key = %deletion.lease_key, error = %crate::ErrorChain(&e), "deleting a finished lease failed")
                }
            }
        }
        deleted
    }

    /// Creates the leases the lineage needs (parents first) and deletes finished leases
    /// whose children all started, or whose shard is past retention.
    pub(crate) async fn sync_once(&mut self) -> Result<()> {
        let setup = self
            .config
            .lease
            .retry
            .with_max_attempts(Some(SYNC_ATTEMPTS));
        let (stream, store) = (self.stream.clone(), self.store.clone());
        // The lease table is read before the shards, so the shard list is the newer of the
        // two: every shard a lease names is listed unless it is past retention. The other way
        // round (found by the simulation), a worker paused between the two reads combined an
        // old shard list with new leases: it could not link the new leases to their cleaned-up
        // ancestors, created leases for those ancestors again (their records processed twice,
        // out of order) and deleted new finished leases as "past retention". The two reads
        // must also be close in time, or a whole shard lifetime could fall between them.
        let mut attempt = 1;
        let (ticket, scan, shards) = loop {
            let began = Instant::now();
            let invalid_items = &self.invalid_items;
            let (ticket, scan) = retry("lease scan", setup.backoff(self.seeds.next_seed()), || {
                let (ticket, scan) = (invalid_items.ticket(), store.list_leases());
                async move { scan.await.map(|scan| (ticket, scan)) }
            })
            .await?;
            let shards = retry("ListShards", setup.backoff(self.seeds.next_seed()), || {
                stream.list_shards()
            })
            .await?;
            let took = began.elapsed();
            if took <= self.config.lease.lease_duration {
                break (ticket, scan, shards);
            }
            if attempt == SYNC_ATTEMPTS {
                warn!(
                    ?took,
                    "the lease table and shard list could not be read close together; the next sync retries"
                );
                return Ok(());
            }
            debug!(
                ?took,
                "lease table and shard list read too far apart; reading again"
            );
            attempt += 1;
        };
        // A table whose leases name another stream is not this worker's: creating leases of
        // this stream's shards there would mix two streams' checkpoints under one key.
        let mut scan = scan;
        // Watcher slots are no shards' leases: never plan or delete them.
        scan.take_watcher_slots();
        if let Some(stream) = &self.stream_name {
            crate::lease::check_stream(store.table_name(), &scan.leases, stream)?;
        }
        self.invalid_items.scanned(ticket, &scan.invalid);
        // An item that does not decode still occupies its key: never create over it.
        let mut leases = scan.leases;
        for invalid in &scan.invalid {
            if let Error::InvalidLeaseItem { lease_key, .. } = invalid {
                leases.push(Lease::new(lease_key, Checkpoint::TrimHorizon));
            }
        }
        let mut created = 0usize;
        let stream_name = self
            .stream_name
            .as_deref()
            .map(|s| crate::lease::stream_name_of(s).to_owned());
        for new in lineage::leases_to_create(&shards, &leases, &self.initial_position) {
            let lease = match &stream_name {
                Some(name) => new.lease.with_stream_name(name),
                None => new.lease,
            };
            let guard = new.guard;
            let made = retry(
                "create lease",
                setup.backoff(self.seeds.next_seed()),
                || {
                    let (store, lease, guard) = (store.clone(), lease.clone(), guard.clone());
                    async move { create(store.as_ref(), &lease, &guard).await }
                },
            )
            .await?;
            match made {
                LeaseCreation::Created => {
                    debug!(lease_key = %lease.lease_key, checkpoint = %lease.checkpoint, parents = ?lease.parent_shard_ids, "created lease");
                    created += 1;
                }
                LeaseCreation::Exists => {}
                // The parent finished and was cleaned up since the scan: so were (or will
                // be) its children, and the next sync plans from fresh reads.
                LeaseCreation::ParentMissing { parent } => {
                    debug!(lease_key = %lease.lease_key, %parent, "not creating a lease whose parent's lease is gone");
                }
                // The shard was processed and cleaned up since the scan.
                LeaseCreation::ChildExists { child } => {
                    debug!(lease_key = %lease.lease_key, %child, "not creating a lease whose child has one");
                }
            }
        }
        let deleted = self.delete_finished(&shards, &leases).await;
        info!(
            shards = shards.len(),
            leases_created = created,
            leases_deleted = deleted,
            "shard sync"
        );
        Ok(())
    }
}
