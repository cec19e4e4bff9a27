//! The shared lease store, watching every write as it lands (invariants 1, 3, 5, 8 and 10).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use kcl_core::testing::{Faulty, InMemoryLeaseStore, LeaseCall};
use kcl_core::{
    Checkpoint, ErrorKind, ExtendedSequenceNumber, Lease, LeaseCreation, LeaseFence, LeaseScan,
    LeaseStore, LeaseUpdate, LineageGuard,
};
use tokio::time::Instant;

use crate::observe::{Rng, Shared, covered, trace, violation};

fn checkpoint_rank(checkpoint: &Checkpoint) -> (u8, Option<ExtendedSequenceNumber>) {
    match checkpoint {
        Checkpoint::TrimHorizon | Checkpoint::Latest | Checkpoint::AtTimestamp => (0, None),
        Checkpoint::SequenceNumber(p) => (1, Some(p.clone())),
        Checkpoint::ShardEnd => (2, None),
    }
}

#[derive(Debug)]
pub(crate) struct Monitored {
    pub(crate) inner: Arc<InMemoryLeaseStore>,
    pub(crate) observed: Shared,
    /// Lease key → owner of the current term (set by a take, cleared by a release).
    pub(crate) terms: Mutex<HashMap<String, Option<String>>>,
    /// Draws each write's latency.
    pub(crate) rng: Mutex<Rng>,
    /// Lease creations take time too, so that they land between the pages of scans (only in
    /// seeds with paged scans, so the other seeds replay as before).
    pub(crate) create_latency: bool,
    /// Every worker process's own lease store (around this one), by worker id, to tell when
    /// its calls hung (weak: they hold this store).
    pub(crate) processes: Mutex<Vec<(String, Weak<Faulty<Monitored>>)>>,
    /// Every lease key deleted so far (invariant 10).
    pub(crate) deleted: Mutex<HashSet<String>>,
}

/// Two renewals of a worker that hung within this long before a lease is taken from it as
/// expired excuse the take: each costs a request timeout (2 s) and a retry, and two in a row
/// outlast what the lease duration (10 s) leaves after a renewal interval (3 s). (Hangs are
/// asked for one at a time, but several may strike consecutive renewals: a worker that holds
/// no lease meets its pending hangs one after the other once it takes one.)
const HUNG_RENEWALS_WINDOW: Duration = Duration::from_secs(20);

impl Monitored {
    /// Invariant 8: a lease is taken as expired from a running worker only if its lease-table
    /// calls were failing or paused lately. A healthy worker renews every lease well within
    /// the lease duration; losing one anyway means one stalled call or one slow lease held up
    /// its renewals.
    fn check_take(&self, key: &str, before: &Lease, new_owner: &str) {
        let Some(previous) = before.owner.as_deref().filter(|o| *o != new_owner) else {
            return;
        };
        if before.handoff_to.as_deref() == Some(new_owner) {
            return;
        }
        if self.renewals_hung_lately(previous) >= 2 {
            return;
        }
        let observed = self.observed.lock().unwrap();
        let now = Instant::now();
        let healthy = observed.live.contains(previous)
            && observed
                .disturbed_until
                .get(previous)
                .is_none_or(|until| now >= *until);
        drop(observed);
        if healthy {
            violation(
                &self.observed,
                format!(
                    "{key}: taken by {new_owner} as expired from {previous}, which was running with \
                     a working lease table"
                ),
            );
        }
    }
}

impl Monitored {
    /// Invariant 10: a lease, once deleted, is never created again. Its shard was processed
    /// to its end and its children started; a new lease would process it again from its
    /// start.
    fn check_creation(&self, key: &str) {
        if self.deleted.lock().unwrap().contains(key) {
            violation(
                &self.observed,
                format!("{key}: created again after it was deleted"),
            );
        }
    }

    /// How many renewals of the processes of `worker` hung within [`HUNG_RENEWALS_WINDOW`].
    fn renewals_hung_lately(&self, worker: &str) -> usize {
        let since = Instant::now().checked_sub(HUNG_RENEWALS_WINDOW);
        let processes = self.processes.lock().unwrap();
        processes
            .iter()
            .filter(|(id, _)| id == worker)
            .filter_map(|(_, store)| store.upgrade())
            .flat_map(|store| store.hangs_met())
            .filter(|(call, at)| {
                *call == LeaseCall::Update("renew") && since.is_none_or(|since| *at >= since)
            })
            .count()
    }
}

#[async_trait]
impl LeaseStore for Monitored {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }
    async fn initialize(&self) -> kcl_core::Result<()> {
        self.inner.initialize().await
    }
    async fn list_leases(&self) -> kcl_core::Result<LeaseScan> {
        self.inner.list_leases().await
    }
    async fn list_leases_eventually_consistent(&self) -> kcl_core::Result<LeaseScan> {
        self.inner.list_leases_eventually_consistent().await
    }
    async fn get_lease(&self, key: &str) -> kcl_core::Result<Option<Lease>> {
        self.inner.get_lease(key).await
    }
    async fn get_leases(&self, keys: &[String]) -> kcl_core::Result<LeaseScan> {
        self.inner.get_leases(keys).await
    }
    async fn create_lease_if_absent(&self, lease: &Lease) -> kcl_core::Result<bool> {
        if self.create_latency {
            let latency = self.rng.lock().unwrap().millis(2, 30);
            tokio::time::sleep(latency).await;
        }
        let created = self.inner.create_lease_if_absent(lease).await;
        trace(
            &self.observed,
            format!(
                "{}: create at {}: {created:?}",
                lease.lease_key, lease.checkpoint
            ),
        );
        if matches!(created, Ok(true)) {
            self.check_creation(&lease.lease_key);
        }
        created
    }
    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> kcl_core::Result<LeaseCreation> {
        if self.create_latency {
            let latency = self.rng.lock().unwrap().millis(2, 30);
            tokio::time::sleep(latency).await;
        }
        let created = self.inner.create_lease_in_lineage(lease, guard).await;
        trace(
            &self.observed,
            format!(
                "{}: create at {} with {guard:?}: {created:?}",
                lease.lease_key, lease.checkpoint
            ),
        );
        if matches!(created, Ok(LeaseCreation::Created)) {
            self.check_creation(&lease.lease_key);
        }
        created
    }
    fn usage(&self) -> Option<&kcl_core::LeaseTableUsage> {
        self.inner.usage()
    }

    async fn delete_lease(&self, key: &str, fence: &LeaseFence) -> kcl_core::Result<()> {
        let deleted = self.inner.delete_lease(key, fence).await;
        trace(
            &self.observed,
            format!(
                "{key}: delete by {:?}@{}: {:?}",
                fence.owner,
                fence.counter,
                deleted.as_ref().map_err(|e| e.kind())
            ),
        );
        deleted?;
        self.terms.lock().unwrap().remove(key);
        self.deleted.lock().unwrap().insert(key.to_owned());
        Ok(())
    }
    async fn update_lease(
        &self,
        key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> kcl_core::Result<Lease> {
        // A write takes a few milliseconds, like DynamoDB's, so writes are in flight when
        // workers pause; the state is read after the latency, when the write lands.
        let latency = self.rng.lock().unwrap().millis(2, 30);
        tokio::time::sleep(latency).await;
        let before = self.inner.get_lease(key).await?;
        let result = self.inner.update_lease(key, fence, update).await;
        let outcome = result.as_ref().map(|l| l.counter).map_err(|e| e.kind());
        trace(
            &self.observed,
            format!(
                "{key}: {} by {:?}@{}: {outcome:?}",
                update.operation(),
                fence.owner,
                fence.counter
            ),
        );
        let after = match result {
            Ok(after) => after,
            Err(e) => {
                if matches!(update, LeaseUpdate::Checkpoint { .. })
                    && e.kind() == ErrorKind::ConditionFailed
                {
                    covered(&self.observed, |c| c.fenced_checkpoints += 1);
                }
                if matches!(update, LeaseUpdate::Take { .. })
                    && e.kind() == ErrorKind::ConditionFailed
                {
                    covered(&self.observed, |c| c.fenced_takes += 1);
                }
                return Err(e);
            }
        };
        match update {
            LeaseUpdate::Take { new_owner } => {
                if let Some(before) = &before {
                    let from_another = before.owner.as_ref().is_some_and(|o| o != new_owner);
                    if from_another && before.handoff_to.as_ref() == Some(new_owner) {
                        covered(&self.observed, |c| c.handed_over += 1);
                    } else if from_another {
                        covered(&self.observed, |c| c.taken_from_another += 1);
                    }
                    if from_another && kcl_core::is_watcher_slot(key) {
                        covered(&self.observed, |c| c.slots_taken_over += 1);
                    }
                    self.check_take(key, before, new_owner);
                }
                self.terms
                    .lock()
                    .unwrap()
                    .insert(key.to_owned(), Some(new_owner.clone()));
            }
            LeaseUpdate::Release => {
                self.terms.lock().unwrap().insert(key.to_owned(), None);
            }
            LeaseUpdate::RedirectHandoff { .. } => {
                covered(&self.observed, |c| c.offers_redirected += 1);
            }
            LeaseUpdate::Checkpoint { checkpoint } => {
                let owner = self.terms.lock().unwrap().get(key).cloned().flatten();
                if owner.is_none() || owner != fence.owner {
                    violation(
                        &self.observed,
                        format!(
                            "{key}: checkpoint {checkpoint} by {:?} in the term of {owner:?}",
                            fence.owner
                        ),
                    );
                }
                if let Some(before) = before
                    && checkpoint_rank(checkpoint) < checkpoint_rank(&before.checkpoint)
                {
                    violation(
                        &self.observed,
                        format!(
                            "{key}: checkpoint moved back from {} to {checkpoint}",
                            before.checkpoint
                        ),
                    );
                }
                let by = fence.owner.as_deref().unwrap_or("nobody");
                self.observed
                    .lock()
                    .unwrap()
                    .check_flushed(key, checkpoint, by);
            }
            _ => {}
        }
        Ok(after)
    }
}
