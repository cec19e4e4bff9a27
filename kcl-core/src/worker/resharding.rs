//! Resharding as the coordinator sees it: a shard that ended hands its lease in and creates
//! its children's leases; children wait until their parents are known to be finished.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use tracing::{debug, info, warn};

use super::streams::lease_beside;
use super::{Coordinator, concurrently};
use crate::error::{Error, ErrorChain, Result};
use crate::lease::taker::{TakeDecision, TakeReason};
use crate::lease::{Lease, LeaseCreation, LeaseUpdate, LineageGuard, lineage};
use crate::processor::RecordProcessorFactory;
use crate::sequence::Checkpoint;
use crate::stream::ChildShard;

impl<F: RecordProcessorFactory> Coordinator<F> {
    /// A shard was read to its end and checkpointed at `SHARD_END`: record its children in its
    /// lease, release it, unblock children waiting here, and create the children's leases
    /// (taking them at once, so a split continues without waiting for a taking round). Without
    /// `ChildShards` in the last `GetRecords` answer (some emulators and older paths omit it),
    /// a full shard sync finds the children instead.
    pub(super) async fn on_shard_end(&mut self, key: &str, children: Vec<ChildShard>) {
        let ids: BTreeSet<String> = children.iter().map(|c| c.shard_id.clone()).collect();
        info!(lease_key = %key, children = ?ids, "shard finished");
        if let (Some(lease), false) = (self.held.get(key), ids.is_empty()) {
            let update = LeaseUpdate::RecordChildren {
                child_shard_ids: ids.clone(),
            };
            if let Err(e) = lease.write(self.store.as_ref(), &update).await {
                warn!(lease_key = %key, error = %ErrorChain(&e), "recording the children failed");
            }
        }
        self.release(key).await;
        self.mark_parents_done([key.to_owned()]);
        if children.is_empty() {
            self.sync_requests.request(key);
            return;
        }
        // A child's lease is created only while every parent has a lease, checked in the
        // same write:
        // - this shard's own lease may be gone: when this worker's end was written but not
        //   answered, others may have processed the children and cleaned up both generations
        //   before it resent. Creating them again would process them twice, from the start.
        // - a merged child's other parent may have no lease yet: a child treats a parent
        //   without one as finished long ago (cleaned up, or past retention), so creating it
        //   earlier would let it start before the other parent's records (found by the
        //   simulation: the other parent's own parent was still being processed). The other
        //   parent's end or a shard sync creates it later.
        let creatable: Vec<Lease> = children
            .into_iter()
            .map(|child| {
                lease_beside(key, &child.shard_id, Checkpoint::TrimHorizon)
                    .with_parents(child.parent_shard_ids.iter().cloned())
                    .with_hash_key_range(child.hash_key_range)
            })
            .collect();
        // Creations are conditional and idempotent: sent together, each runs to completion.
        let store = self.store.clone();
        let created: Vec<(Lease, Result<LeaseCreation>)> = concurrently(creatable, None, |lease| {
            let store = store.clone();
            async move {
                // The children's own children are not known here (no shard list). The
                // parents suffice: while this shard's lease exists, no child's lease
                // was ever deleted.
                let guard = LineageGuard::new(lease.parent_keys(), []);
                let created = store.create_lease_in_lineage(&lease, &guard).await;
                (lease, created)
            }
        })
        .collect()
        .await;
        let mut takes = Vec::new();
        for (lease, created) in created {
            match created {
                Ok(LeaseCreation::Created) => {
                    info!(lease_key = %lease.lease_key, parents = ?lease.parent_shard_ids, "created child lease");
                    if self.held.all().len() + takes.len() < self.config.lease.max_leases_per_worker
                    {
                        takes.push(TakeDecision::new(
                            lease.lease_key.clone(),
                            lease.fence(),
                            TakeReason::Unowned,
                        ));
                    }
                }
                // Created by the worker that finished the other parent of a merge, or by a
                // shard sync.
                Ok(LeaseCreation::Exists | LeaseCreation::ChildExists { .. }) => {}
                Ok(LeaseCreation::ParentMissing { parent }) if parent == key => {
                    debug!(lease_key = %lease.lease_key, "not creating a child: this shard's lease is gone, so its children were processed");
                }
                Ok(LeaseCreation::ParentMissing { parent }) => {
                    debug!(child = %lease.lease_key, missing = %parent, "not creating a child before its other parent has a lease");
                    self.sync_requests.request(key);
                }
                Err(e) => {
                    warn!(lease_key = %lease.lease_key, error = %ErrorChain(&e), "creating a child lease failed; a shard sync will");
                    self.sync_requests.request(key);
                }
            }
        }
        self.take_all(takes).await;
    }

    /// True while a waiting consumer needs a parent not yet known to be finished.
    pub(super) fn awaits_parents(&self) -> bool {
        self.awaited_parents
            .values()
            .any(|parents| !parents.is_subset(&self.done_parents))
    }

    /// Reads the parents the waiting consumers need (one `BatchGetItem` for all of them). This
    /// consistent read of their keys is the only evidence that a parent without a lease is
    /// gone: scans miss items (see [`Self::learn_parents`]).
    pub(super) async fn poll_parents(&mut self) {
        let keys: Vec<String> = self
            .awaited_parents
            .values()
            .flatten()
            .filter(|p| !self.done_parents.contains(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // A read: dropped when the worker is to shut down.
        let read = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return,
            read = self.store.get_leases(&keys) => read,
        };
        match read {
            Ok(read) => {
                let mut found: BTreeMap<&str, &Lease> = read
                    .leases
                    .iter()
                    .map(|l| (l.lease_key.as_str(), l))
                    .collect();
                // An item that does not decode is still there: as far as anyone can tell,
                // that parent is not finished.
                let undecoded: Vec<Lease> = read
                    .invalid
                    .iter()
                    .filter_map(|e| match e {
                        Error::InvalidLeaseItem { lease_key, .. } => {
                            Some(Lease::new(lease_key, Checkpoint::TrimHorizon))
                        }
                        _ => None,
                    })
                    .collect();
                found.extend(undecoded.iter().map(|l| (l.lease_key.as_str(), l)));
                let done: Vec<String> = keys
                    .iter()
                    .filter(|k| lineage::parent_read_finished(found.get(k.as_str()).copied()))
                    .cloned()
                    .collect();
                self.mark_parents_done(done);
            }
            Err(e) => warn!(error = %ErrorChain(&e), "reading parent leases failed; retrying"),
        }
    }

    /// Learns from a scan of the table which awaited parents finished, and forgets finished
    /// parents that neither a lease in the scan nor a waiting consumer names any more.
    ///
    /// A parent missing from the scan is not taken as gone: a DynamoDB Scan is not a
    /// snapshot, and a scan that passed the parent's key before the child's lease was created
    /// returns the child without its parent. Such a parent stays awaited, and
    /// [`Self::poll_parents`] reads its key.
    pub(super) fn learn_parents(&mut self, scan: &[Lease]) {
        let by_key: BTreeMap<&str, &Lease> =
            scan.iter().map(|l| (l.lease_key.as_str(), l)).collect();
        let done: Vec<String> = self
            .awaited_parents
            .values()
            .flatten()
            .filter(|p| by_key.get(p.as_str()).is_some_and(|l| l.is_finished()))
            .cloned()
            .collect();
        let named: BTreeSet<String> = scan
            .iter()
            .flat_map(Lease::parent_keys)
            .chain(self.awaited_parents.values().flatten().cloned())
            .collect();
        self.done_parents.retain(|p| named.contains(p));
        self.mark_parents_done(done);
    }

    pub(super) fn mark_parents_done(&mut self, keys: impl IntoIterator<Item = String>) {
        let mut changed = false;
        for key in keys {
            changed |= self.done_parents.insert(key);
        }
        if changed {
            self.parents_done.set(self.done_parents.clone());
        }
    }
}
