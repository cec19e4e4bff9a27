//! The leases this worker holds, shared by the renewer, the taker and the shard consumers.
//!
//! All writes to a held lease (renewals, checkpoints, the release) go through
//! [`HeldLease::write`], one at a time: each write is conditional on the fence that the
//! previous write produced, so they must not overlap.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::error::{Error, ErrorKind, Result};
use crate::fatal::Fatal;
use crate::lease::{Lease, LeaseFence, LeaseStore, LeaseUpdate};

/// How many times one write may adopt a counter moved by this worker's own unanswered
/// writes. A resend can itself land without an answer and meet its own move on the SDK's
/// retry; a counter that keeps moving beyond that is another process.
const MAX_ADOPTIONS_PER_WRITE: usize = 3;

/// A lease this worker took, and the state of its last successful write.
#[derive(Debug)]
pub(crate) struct HeldLease {
    lease_key: String,
    worker_id: String,
    lease_duration: Duration,
    /// The counter this worker's take left: versions of the lease with a lower counter are
    /// from before this worker's term (what an eventually consistent read may return).
    taken_counter: u64,
    /// The lease as this worker last wrote it. Locked for the whole of each write.
    state: Mutex<Lease>,
    /// When the last successful write was sent, plus the lease duration. Until then no other
    /// worker can have seen the lease expire: they start counting at the counter change they
    /// observe, which comes after the write was sent.
    valid_until: SyncMutex<Instant>,
    /// Cancelled once the lease is lost or released: consumers stop, writes are refused.
    lost: CancellationToken,
    /// Cancelled once another worker asked for the lease: its consumer stops gracefully and
    /// the worker releases the lease to the requester.
    handoff: CancellationToken,
    /// The worker this one offered the lease to while shutting down: `handoffTo` naming it is
    /// our own offer, not a request to stop now.
    offered_to: SyncMutex<Option<String>>,
    /// The writes sent since the counter last moved by a write of ours whose outcome is
    /// unknown (a timeout, a transient error, a dropped future): each may have landed. The
    /// counter can move under this worker's name by at most this many, and only to a lease
    /// these updates could have made; anything else is another process writing as this
    /// worker id. Changed only under the `state` lock.
    unanswered: SyncMutex<Vec<LeaseUpdate>>,
    /// Where a duplicate worker id is reported: it ends the worker.
    fatal: Arc<Fatal>,
}

impl HeldLease {
    /// Wraps a lease this worker just took with a write sent at `written_at`.
    pub(crate) fn new(
        lease: Lease,
        worker_id: &str,
        lease_duration: Duration,
        written_at: Instant,
        fatal: Arc<Fatal>,
    ) -> Arc<Self> {
        Arc::new(HeldLease {
            lease_key: lease.lease_key.clone(),
            worker_id: worker_id.to_owned(),
            lease_duration,
            taken_counter: lease.counter,
            state: Mutex::new(lease),
            valid_until: SyncMutex::new(written_at + lease_duration),
            lost: CancellationToken::new(),
            handoff: CancellationToken::new(),
            offered_to: SyncMutex::new(None),
            unanswered: SyncMutex::new(Vec::new()),
            fatal,
        })
    }

    pub(crate) fn lease_key(&self) -> &str {
        &self.lease_key
    }

    /// Cancelled when the lease is lost or released.
    pub(crate) fn lost_token(&self) -> &CancellationToken {
        &self.lost
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Whether `lease`, a version of this lease read from the table, was written during this
    /// worker's term. A take clears any handoff request, so only such a version's request is
    /// addressed to this term; an older one (a stale read) may carry a request that was
    /// served or withdrawn long ago.
    pub(crate) fn in_this_term(&self, lease: &Lease) -> bool {
        lease.owner.as_deref() == Some(self.worker_id.as_str())
            && lease.counter >= self.taken_counter
    }

    /// Cancelled when another worker asked for the lease.
    pub(crate) fn handoff_token(&self) -> &CancellationToken {
        &self.handoff
    }

    /// Signals that another worker asked for the lease (seen in a write's answer or a scan).
    pub(crate) fn handoff_requested(&self, to: &str) {
        let own_offer = self
            .offered_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(to);
        if !self.handoff.is_cancelled() && to != self.worker_id && !own_offer {
            info!(lease_key = %self.lease_key, to, "lease asked for: handing it over");
            self.handoff.cancel();
        }
    }

    /// The instant after which another worker may consider the lease expired.
    pub(crate) fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease as last written; waits for a write in progress.
    pub(crate) async fn snapshot(&self) -> Lease {
        self.state.lock().await.clone()
    }

    /// Marks the lease lost: its consumer stops and no further write is sent.
    pub(crate) fn mark_lost(&self, reason: &str) {
        if !self.lost.is_cancelled() {
            info!(lease_key = %self.lease_key, reason, "lease lost");
            self.lost.cancel();
        }
    }

    /// Writes `update` conditionally on the fence of the last write.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the lease was lost before or by this write (the lease is then
    /// marked lost); [`Error::DuplicateWorkerId`] when the counter moved more than this
    /// worker's unanswered writes explain (lost, and raised to the worker);
    /// [`Error::LeaseTableNotFound`] (lost); [`Error::LeaseUpdateRejected`] when the stored lease, still ours, does not
    /// allow the update ([`LeaseUpdate::allowed`]; nothing is written, the lease stays held,
    /// and a pending request of another worker is passed on as
    /// [`handoff_requested`](Self::handoff_requested)); the store's error otherwise, with the
    /// lease still held.
    ///
    /// # Cancel safety
    /// Dropping the future may leave a write applied whose answer was never read; it stays
    /// counted as unanswered. The next write then fails its condition on a lease that still
    /// names this worker, and is resent on the stored fence (see the invariant in
    /// [`crate::lease`]).
    pub(crate) async fn write(
        &self,
        store: &dyn LeaseStore,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        let mut state = self.state.lock().await;
        if self.is_lost() {
            return Err(self.lost_error());
        }
        let sent_at = Instant::now();
        let mut fence = state.fence();
        let mut adoptions = 0;
        let result = loop {
            let result = self.send(store, &fence, update).await;
            // Still ours and the update is allowed, yet the fence did not match: the counter
            // moved under this worker's name. (Not allowed: a rejection, handled below.)
            let current = match &result {
                Err(Error::LeaseConditionFailed {
                    current: Some(current),
                    ..
                }) if self.still_ours(current)
                    && update.allowed(current)
                    && current.fence() != fence =>
                {
                    current.clone()
                }
                _ => break result,
            };
            let unanswered = self.unanswered().len();
            if adoptions == MAX_ADOPTIONS_PER_WRITE
                || !self.explained_by_unanswered(&state, &current)
            {
                // Our own writes cannot explain it: another process writes as this worker.
                return Err(self.duplicate_worker(fence.counter, current.counter));
            }
            // Writes of ours whose answers were lost (a timeout, a dropped future) landed.
            // Adopt the stored fence and send again. The other unanswered writes were sent on
            // an older fence and can no longer land.
            warn!(
                lease_key = %self.lease_key,
                expected_counter = fence.counter,
                stored_counter = current.counter,
                unanswered,
                "lease counter moved under an unanswered write of this worker; resending"
            );
            // Adopted even if the resend fails: the reset count is only right for this fence.
            self.unanswered().clear();
            *state = (*current).clone();
            fence = state.fence();
            adoptions += 1;
        };
        match result {
            Ok(lease) => {
                if let LeaseUpdate::RequestHandoff { to }
                | LeaseUpdate::RedirectHandoff { to, .. } = update
                {
                    *self.offered_to.lock().unwrap_or_else(|e| e.into_inner()) = Some(to.clone());
                }
                // A request shows up in the answer of any write (our own offer excepted).
                if let Some(to) = &lease.handoff_to {
                    self.handoff_requested(to);
                }
                // Only a write that moved the counter shows other workers we are alive. It
                // also settles every write left unanswered: those were sent on older fences
                // and can no longer land.
                if lease.counter != state.counter {
                    self.unanswered().clear();
                    *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) =
                        sent_at + self.lease_duration;
                }
                *state = lease.clone();
                Ok(lease)
            }
            Err(Error::LeaseConditionFailed {
                current: Some(current),
                ..
            }) if self.still_ours(&current) && !update.allowed(&current) => {
                // The update's own precondition failed, not the fence: the lease is ours.
                // Adopt the stored lease (a counter that moved under our name is a write of
                // ours; `valid_until` stays, as we do not know when that write was sent).
                info!(
                    lease_key = %self.lease_key,
                    operation = update.operation(),
                    handoff_to = ?current.handoff_to,
                    "lease update rejected by its precondition; the lease is still held"
                );
                *state = (*current).clone();
                if let Some(to) = &current.handoff_to {
                    self.handoff_requested(to);
                }
                Err(Error::LeaseUpdateRejected {
                    lease_key: self.lease_key.clone(),
                    operation: update.operation(),
                    current,
                })
            }
            Err(e @ Error::LeaseTableNotFound { .. }) => {
                // Every lease is gone with the table: stop the consumer at once, so no batch
                // is retried against it. (The worker ends on this error; see `crate::fatal`.)
                self.mark_lost("the lease table does not exist");
                Err(e)
            }
            Err(Error::LeaseConditionFailed { current, .. }) => {
                let owner = current.and_then(|l| l.owner);
                self.mark_lost(&format!(
                    "conditional {} failed; lease now owned by {}",
                    update.operation(),
                    owner.as_deref().unwrap_or("nobody")
                ));
                Err(self.lost_error())
            }
            Err(other) => Err(other),
        }
    }

    /// Sends one conditional write, counting it as unanswered until an answer says whether it
    /// landed. A dropped future leaves it counted: it may still land.
    async fn send(
        &self,
        store: &dyn LeaseStore,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        self.unanswered().push(update.clone());
        let result = store.update_lease(&self.lease_key, fence, update).await;
        // A transient failure or a timeout may have been applied. So may a failed condition:
        // the SDK retries a call whose answer was lost, and the retry of a write that landed
        // finds the counter it moved. Any other answer says whether it was applied. (Writes
        // are one at a time, so this one is the last pushed.)
        let unknown = matches!(&result, Err(e) if e.kind() == ErrorKind::Transient)
            || matches!(&result, Err(Error::LeaseConditionFailed { .. }));
        if !unknown {
            self.unanswered().pop();
        }
        result
    }

    fn unanswered(&self) -> std::sync::MutexGuard<'_, Vec<LeaseUpdate>> {
        self.unanswered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `current`, found where `state` was expected, can be the work of this worker's
    /// unanswered writes alone: the counter moved by at most their number, and every field
    /// they do not set is as this worker left it. A take by another process under our name
    /// counts an owner switch that none of our writes makes; its checkpoints are positions
    /// none of ours carried.
    fn explained_by_unanswered(&self, state: &Lease, current: &Lease) -> bool {
        let unanswered = self.unanswered();
        let moved = current.counter.saturating_sub(state.counter);
        if moved == 0 || moved > unanswered.len() as u64 {
            return false;
        }
        let checkpoints: Vec<&crate::sequence::Checkpoint> = unanswered
            .iter()
            .filter_map(|u| match u {
                LeaseUpdate::Checkpoint { checkpoint } => Some(checkpoint),
                _ => None,
            })
            .collect();
        let checkpoint_ours =
            current.checkpoint == state.checkpoint || checkpoints.contains(&&current.checkpoint);
        let switches_ours = current.owner_switches_since_checkpoint
            == state.owner_switches_since_checkpoint
            || (current.owner_switches_since_checkpoint == 0 && !checkpoints.is_empty());
        let children_ours = current.child_shard_ids == state.child_shard_ids
            || unanswered.iter().any(|u| {
                matches!(u, LeaseUpdate::RecordChildren { child_shard_ids }
                    if *child_shard_ids == current.child_shard_ids)
            });
        checkpoint_ours && switches_ours && children_ours
    }

    /// Reports another process using this worker id: the lease is lost to this process (it
    /// must not write in that process's name again), and the worker ends with the error.
    fn duplicate_worker(&self, expected_counter: u64, stored_counter: u64) -> Error {
        let error = || Error::DuplicateWorkerId {
            worker_id: self.worker_id.clone(),
            lease_key: self.lease_key.clone(),
            expected_counter,
            stored_counter,
        };
        error!(
            lease_key = %self.lease_key,
            worker_id = %self.worker_id,
            expected_counter,
            stored_counter,
            "another process writes this worker's lease under the same worker id; stopping"
        );
        self.mark_lost("another process uses this worker id");
        self.fatal.raise(error());
        error()
    }

    /// True when the stored lease still names this worker as its owner.
    fn still_ours(&self, stored: &Lease) -> bool {
        stored.owner.as_deref() == Some(self.worker_id.as_str())
    }

    /// Gives the lease up: clears the owner so another worker can take it at once, and
    /// refuses further writes.
    pub(crate) async fn release(&self, store: &dyn LeaseStore) -> Result<()> {
        let result = self.write(store, &LeaseUpdate::Release).await.map(drop);
        if result.is_ok() {
            // Not lost, but no longer ours: the same token stops every user of the lease.
            self.lost.cancel();
        }
        result
    }

    /// Deletes the lease (its shard is gone) and ends the hold.
    pub(crate) async fn delete(&self, store: &dyn LeaseStore) -> Result<()> {
        let state = self.state.lock().await;
        if self.is_lost() {
            return Err(self.lost_error());
        }
        store.delete_lease(&self.lease_key, &state.fence()).await?;
        self.lost.cancel();
        Ok(())
    }

    fn lost_error(&self) -> Error {
        Error::LeaseLost {
            lease_key: self.lease_key.clone(),
        }
    }
}

/// The registry of held leases, by lease key.
#[derive(Debug, Default)]
pub(crate) struct HeldLeases {
    leases: SyncMutex<BTreeMap<String, Arc<HeldLease>>>,
}

impl HeldLeases {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<HeldLease>>> {
        // A panic while holding this lock cannot leave the map half-updated (single calls).
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn insert(&self, lease: Arc<HeldLease>) {
        self.map().insert(lease.lease_key().to_owned(), lease);
    }

    pub(crate) fn remove(&self, lease_key: &str) -> Option<Arc<HeldLease>> {
        self.map().remove(lease_key)
    }

    pub(crate) fn get(&self, lease_key: &str) -> Option<Arc<HeldLease>> {
        self.map().get(lease_key).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<HeldLease>> {
        self.map().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Forgets the leases that were lost (their consumers may still be winding down).
    pub(crate) fn remove_lost(&self) -> Vec<Arc<HeldLease>> {
        let mut map = self.map();
        let lost: Vec<String> = map
            .iter()
            .filter(|(_, l)| l.is_lost())
            .map(|(k, _)| k.clone())
            .collect();
        lost.iter().filter_map(|key| map.remove(key)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Faulty, Hang, InMemoryLeaseStore, LeaseCall};

    const DURATION: Duration = Duration::from_secs(10);

    fn taken(store: &InMemoryLeaseStore, key: &str, worker: &str) -> Arc<HeldLease> {
        taken_reporting_to(store, key, worker, Arc::default())
    }

    /// A lease taken now, whose duplicate-id reports go to `fatal`.
    fn taken_reporting_to(
        store: &InMemoryLeaseStore,
        key: &str,
        worker: &str,
        fatal: Arc<Fatal>,
    ) -> Arc<HeldLease> {
        HeldLease::new(
            store.take_as(key, worker),
            worker,
            DURATION,
            Instant::now(),
            fatal,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn writes_chain_their_fences() {
        let store = InMemoryLeaseStore::new("t");
        let held = taken(&store, "s-0", "w1");
        let valid = held.valid_until();
        tokio::time::advance(Duration::from_secs(1)).await;
        held.write(&store, &LeaseUpdate::Renew).await.unwrap();
        held.write(&store, &LeaseUpdate::Renew).await.unwrap();
        assert_eq!(store.get_lease("s-0").await.unwrap().unwrap().counter, 3);
        assert!(held.valid_until() > valid, "a renewal extends the lease");
    }

    #[tokio::test(start_paused = true)]
    async fn a_taken_lease_is_lost_and_refuses_writes() {
        let store = InMemoryLeaseStore::new("t");
        let held = taken(&store, "s-0", "w1");
        store.take_as("s-0", "w2");
        let err = held.write(&store, &LeaseUpdate::Renew).await.unwrap_err();
        assert!(matches!(err, Error::LeaseLost { .. }), "{err:?}");
        assert!(held.is_lost());
        assert!(held.lost_token().is_cancelled());
        // Nothing more is sent, even a write that would match.
        let calls = store.update_calls();
        assert!(held.write(&store, &LeaseUpdate::Renew).await.is_err());
        assert_eq!(store.update_calls(), calls);
    }

    /// Sends a renewal of `held` that the store applies but never answers; the caller gives
    /// up after a second, as the renewer does at its request timeout.
    async fn renew_unanswered(held: &HeldLease, store: &Arc<InMemoryLeaseStore>) {
        let faulty = Faulty::new(store.clone());
        faulty.hang_next(LeaseCall::Update("renew"), Hang::AnswerLost);
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            held.write(&faulty, &LeaseUpdate::Renew),
        );
        assert!(attempt.await.is_err(), "the renewal never answers");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_own_write_is_not_a_lost_lease() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let held = taken(&store, "s-0", "w1");
        renew_unanswered(&held, &store).await;
        assert_eq!(store.get_lease("s-0").await.unwrap().unwrap().counter, 2);
        let lease = held
            .write(store.as_ref(), &LeaseUpdate::Renew)
            .await
            .unwrap();
        assert_eq!(lease.counter, 3);
        assert!(!held.is_lost());
    }

    // Defect 8 of issue 10: two processes running with the same worker id both wrote the same
    // leases, each adopting the other's counter as its own lost write. A counter that moves
    // with no unanswered write of ours to explain it is another process: the lease is dropped
    // without writing, and the worker is told to stop.
    #[tokio::test(start_paused = true)]
    async fn a_counter_moved_by_another_process_with_our_id_is_reported() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let fatal = Arc::new(Fatal::default());
        let held = taken_reporting_to(&store, "s-0", "w1", fatal.clone());
        // The other process takes the lease it believes orphaned, under the same name.
        store.take_as("s-0", "w1");
        let calls = store.update_calls();
        let err = held
            .write(store.as_ref(), &LeaseUpdate::Renew)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::DuplicateWorkerId { worker_id, expected_counter: 1, stored_counter: 2, .. } if worker_id == "w1"),
            "{err:?}"
        );
        assert_eq!(store.update_calls(), calls + 1, "no resend on its fence");
        assert!(held.is_lost());
        assert!(fatal.is_raised());
        assert!(matches!(
            fatal.take(),
            Some(Error::DuplicateWorkerId { .. })
        ));
        assert_eq!(store.get_lease("s-0").await.unwrap().unwrap().counter, 2);
    }

    // An unanswered write explains one step of the counter, not two.
    #[tokio::test(start_paused = true)]
    async fn a_move_larger_than_the_unanswered_writes_is_another_process() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let fatal = Arc::new(Fatal::default());
        let held = taken_reporting_to(&store, "s-0", "w1", fatal.clone());
        renew_unanswered(&held, &store).await;
        store.take_as("s-0", "w1");
        let err = held
            .write(store.as_ref(), &LeaseUpdate::Renew)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateWorkerId { .. }), "{err:?}");
        assert!(fatal.is_raised());
    }

    // A renewal of ours was lost on the way (it never landed), and the other process took the
    // lease: the counter moved by one, which that renewal could explain, but a take counts an
    // owner switch, which no write of ours makes.
    #[tokio::test(start_paused = true)]
    async fn a_take_under_our_name_is_told_from_our_own_unanswered_write() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let fatal = Arc::new(Fatal::default());
        let held = taken_reporting_to(&store, "s-0", "w1", fatal.clone());
        let faulty = Faulty::new(store.clone());
        faulty.hang_next(LeaseCall::Update("renew"), Hang::Lost);
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            held.write(&faulty, &LeaseUpdate::Renew),
        );
        assert!(attempt.await.is_err(), "the renewal never answers");
        store.take_as("s-0", "w1");
        let err = held
            .write(store.as_ref(), &LeaseUpdate::Renew)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateWorkerId { .. }), "{err:?}");
        assert!(fatal.is_raised());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_table_stops_the_lease_at_once() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let held = taken(&store, "s-0", "w1");
        store.drop_table();
        let err = held
            .write(
                store.as_ref(),
                &LeaseUpdate::Checkpoint {
                    checkpoint: crate::Checkpoint::ShardEnd,
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LeaseTableNotFound { .. }), "{err:?}");
        assert!(held.is_lost(), "nothing is retried against a missing table");
    }

    /// Another worker asks for the lease the way the worker does: on the stored fence,
    /// leaving the counter alone.
    async fn request_as(store: &InMemoryLeaseStore, key: &str, worker: &str) {
        let fence = store.get_lease(key).await.unwrap().unwrap().fence();
        let request = LeaseUpdate::RequestHandoff { to: worker.into() };
        store.update_lease(key, &fence, &request).await.unwrap();
    }

    // Defect 3 of issue 9: a worker shutting down offers its lease while another worker's
    // request is pending. The offer's own precondition fails; that is a refusal of the offer,
    // not a lost lease: the lease stays held, its consumer is told to hand it over, and the
    // release keeps the reservation for the worker that asked.
    #[tokio::test(start_paused = true)]
    async fn an_offer_on_a_lease_already_asked_for_is_rejected_not_lost() {
        let store = InMemoryLeaseStore::new("t");
        let held = taken(&store, "s-0", "w1");
        request_as(&store, "s-0", "w2").await;
        let calls = store.update_calls();
        let offer = LeaseUpdate::RequestHandoff { to: "w3".into() };
        let err = held.write(&store, &offer).await.unwrap_err();
        assert!(
            matches!(&err, Error::LeaseUpdateRejected { current, .. } if current.handoff_to.as_deref() == Some("w2")),
            "{err:?}"
        );
        assert_ne!(err.kind(), ErrorKind::ConditionFailed);
        assert_eq!(store.update_calls(), calls + 1, "a rejection is not resent");
        assert!(!held.is_lost(), "the lease is still ours");
        assert!(
            held.handoff_token().is_cancelled(),
            "the request of w2 is passed on to the consumer"
        );
        held.release(&store).await.unwrap();
        let stored = store.get_lease("s-0").await.unwrap().unwrap();
        assert_eq!(stored.owner, None);
        assert_eq!(stored.handoff_to.as_deref(), Some("w2"), "reserved for w2");
    }

    // The same refusal after one of our writes landed without an answer: the precondition is
    // checked before the resend on the stored fence, and the stored lease is adopted, so the
    // next write goes through.
    #[tokio::test(start_paused = true)]
    async fn a_rejection_after_an_unanswered_write_adopts_the_stored_fence() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let held = taken(&store, "s-0", "w1");
        assert_eq!(held.snapshot().await.counter, 1);
        renew_unanswered(&held, &store).await;
        request_as(&store, "s-0", "w2").await;
        let calls = store.update_calls();
        let offer = LeaseUpdate::RequestHandoff { to: "w3".into() };
        let err = held.write(store.as_ref(), &offer).await.unwrap_err();
        assert!(matches!(err, Error::LeaseUpdateRejected { .. }), "{err:?}");
        assert_eq!(
            store.update_calls(),
            calls + 1,
            "no resend of a refused update"
        );
        assert!(!held.is_lost());
        assert_eq!(held.snapshot().await.counter, 2, "stored fence adopted");
        let renewed = held
            .write(store.as_ref(), &LeaseUpdate::Renew)
            .await
            .unwrap();
        assert_eq!(renewed.counter, 3);
        assert_eq!(
            store.update_calls(),
            calls + 2,
            "the next write needs no resend"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn release_clears_the_owner_and_ends_the_hold() {
        let store = InMemoryLeaseStore::new("t");
        let held = taken(&store, "s-0", "w1");
        held.release(&store).await.unwrap();
        assert_eq!(store.get_lease("s-0").await.unwrap().unwrap().owner, None);
        assert!(held.lost_token().is_cancelled());
    }
}
