//! Lineage: which leases a stream's shards need, which finished leases can go, and whether
//! the unfinished leases cover every hash key. Pure functions of `ListShards` and the lease
//! table, property-tested.
//!
//! Rules:
//! - Every open shard has a lease.
//! - A shard with a lease, or with a descendant that has one, is in the application's lineage:
//!   it was processed (or deliberately skipped at the start). It never gets a lease again, even
//!   after its own lease was cleaned up.
//! - A shard whose parent is in the lineage starts at `TRIM_HORIZON`: records of a key move
//!   from a parent to its children, and none may be skipped.
//! - A shard with no parent in the lineage (a new application, or parents past retention)
//!   starts at the configured initial position. At `LATEST` only open shards get leases; at
//!   `TRIM_HORIZON` and `AT_TIMESTAMP` every retained shard does, so the oldest ancestors are
//!   processed first and their children wait for them.
//! - A finished lease (`SHARD_END`) is deleted once every child has started and checkpointed
//!   (or is itself gone), or when its shard is past retention; but never while one of its
//!   parents still has a lease. So a lease, once deleted, is never created again: a child's
//!   lease is only created while its parents' leases exist (atomically with that check, see
//!   [`crate::lease::LeaseStore::create_lease_in_lineage`]), and while they exist it was never
//!   deleted. Without this, the worker of a parent whose end was written but not answered
//!   could, on resending, bring back children that were processed and cleaned up meanwhile.
//!   A shard sync's lease is also created only while none of the shard's descendants has a
//!   lease: a shard whose lease was deleted always has a descendant with one (a lease goes
//!   only once its children started, and each of them only once its own children did), so a
//!   shard processed and cleaned up since the sync read the table is not created again,
//!   however long the worker paused. (Up to [`MAX_GUARDED_DESCENDANTS`] descendants are
//!   checked, nearest first; a lineage deeper than that is guarded only that far.)

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::config::InitialPosition;
use crate::lease::{Lease, LeaseFence, LineageGuard};
use crate::sequence::Checkpoint;
use crate::stream::{HashKeyRange, Shard};

/// How many descendants a new lease's guard names at most: a DynamoDB transaction holds 100
/// items, one is the lease and two its parents.
const MAX_GUARDED_DESCENDANTS: usize = 97;

/// The shards of a stream, indexed by id, with their children.
struct Lineage<'a> {
    shards: HashMap<&'a str, &'a Shard>,
    children: HashMap<&'a str, Vec<&'a str>>,
}

impl<'a> Lineage<'a> {
    fn new(shards: &'a [Shard]) -> Self {
        let by_id: HashMap<&str, &Shard> =
            shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for shard in shards {
            for parent in [&shard.parent_shard_id, &shard.adjacent_parent_shard_id]
                .into_iter()
                .flatten()
            {
                if by_id.contains_key(parent.as_str()) {
                    children
                        .entry(parent.as_str())
                        .or_default()
                        .push(shard.shard_id.as_str());
                }
            }
        }
        Lineage {
            shards: by_id,
            children,
        }
    }

    /// Parents still listed (not past retention).
    fn parents(&self, shard: &Shard) -> Vec<&'a str> {
        [&shard.parent_shard_id, &shard.adjacent_parent_shard_id]
            .into_iter()
            .flatten()
            .filter_map(|p| self.shards.get_key_value(p.as_str()).map(|(k, _)| *k))
            .collect()
    }

    /// Shards ordered so that every parent comes before its children.
    fn parents_first(&self, shards: &'a [Shard]) -> Vec<&'a Shard> {
        let mut ordered = Vec::with_capacity(shards.len());
        let mut placed: HashSet<&str> = HashSet::new();
        let mut pending: Vec<&Shard> = shards.iter().collect();
        pending.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|shard| {
                let ready = self.parents(shard).iter().all(|p| placed.contains(p));
                if ready {
                    placed.insert(shard.shard_id.as_str());
                    ordered.push(*shard);
                }
                !ready
            });
            if pending.len() == before {
                // A cycle cannot happen in Kinesis; never loop on bad input.
                ordered.append(&mut pending);
            }
        }
        ordered
    }

    /// The shard's descendants, nearest first, at most [`MAX_GUARDED_DESCENDANTS`].
    fn descendants(&self, shard: &str) -> Vec<&'a str> {
        let mut found: Vec<&'a str> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::from([shard]);
        let mut next = 0;
        let mut frontier: Vec<&str> = vec![shard];
        while next < frontier.len() && found.len() < MAX_GUARDED_DESCENDANTS {
            for child in self.children.get(frontier[next]).into_iter().flatten() {
                if seen.insert(child) && found.len() < MAX_GUARDED_DESCENDANTS {
                    found.push(child);
                    frontier.push(child);
                }
            }
            next += 1;
        }
        found
    }

    /// Shards with a descendant in `leased` (memoised).
    fn with_leased_descendant(&self, leased: &HashSet<&str>) -> HashSet<&'a str> {
        fn visit<'a>(
            lineage: &Lineage<'a>,
            shard: &'a str,
            leased: &HashSet<&str>,
            memo: &mut HashMap<&'a str, bool>,
        ) -> bool {
            if let Some(known) = memo.get(shard) {
                return *known;
            }
            memo.insert(shard, false); // guards against cycles in bad input
            let found = lineage.children.get(shard).is_some_and(|children| {
                children
                    .iter()
                    .any(|c| leased.contains(c) || visit(lineage, c, leased, memo))
            });
            memo.insert(shard, found);
            found
        }
        let mut memo = HashMap::new();
        self.shards
            .keys()
            .copied()
            .filter(|s| visit(self, s, leased, &mut memo))
            .collect()
    }
}

/// The lease a shard starts with when it has no parent in the lineage, if any.
fn starting_checkpoint(shard: &Shard, initial: &InitialPosition) -> Option<Checkpoint> {
    match initial {
        InitialPosition::TrimHorizon => Some(Checkpoint::TrimHorizon),
        InitialPosition::AtTimestamp(_) => Some(Checkpoint::AtTimestamp),
        InitialPosition::Latest => shard.is_open().then_some(Checkpoint::Latest),
    }
}

/// A lease to create, with what must still hold when it is created.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct NewLease {
    /// The lease.
    pub(crate) lease: Lease,
    /// Its parents that have a lease in the table read (or are created before it), and its
    /// descendants, none of which has one. If by the time of the write a parent's lease is
    /// gone or a descendant's exists, the plan is stale (the shard may have been processed
    /// and its lease deleted since), and nothing is created.
    pub(crate) guard: LineageGuard,
}

/// The leases to create so that the table follows the rules of this module, parents first.
pub(crate) fn leases_to_create(
    shards: &[Shard],
    leases: &[Lease],
    initial: &InitialPosition,
) -> Vec<NewLease> {
    let lineage = Lineage::new(shards);
    let existing: HashSet<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
    let processed = lineage.with_leased_descendant(&existing);
    let mut leased = existing.clone();
    let mut in_lineage: HashSet<&str> = existing
        .iter()
        .copied()
        .chain(processed.iter().copied())
        .collect();
    let mut create = Vec::new();
    for shard in lineage.parents_first(shards) {
        let id = shard.shard_id.as_str();
        if in_lineage.contains(id) {
            continue;
        }
        let checkpoint = if lineage
            .parents(shard)
            .iter()
            .any(|p| in_lineage.contains(p))
        {
            Some(Checkpoint::TrimHorizon)
        } else {
            starting_checkpoint(shard, initial)
        };
        if let Some(checkpoint) = checkpoint {
            let parents = lineage
                .parents(shard)
                .into_iter()
                .filter(|p| leased.contains(p))
                .map(str::to_owned);
            let children = lineage.descendants(id).into_iter().map(str::to_owned);
            create.push(NewLease {
                lease: Lease::new(id, checkpoint)
                    .with_parents(shard.parent_shard_ids())
                    .with_hash_key_range(shard.hash_key_range),
                guard: LineageGuard::new(parents, children),
            });
            in_lineage.insert(id);
            leased.insert(id);
        }
    }
    create
}

/// Why a lease is deleted.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[non_exhaustive]
pub(crate) enum DeletionReason {
    /// The shard was processed to its end and every child has started and checkpointed.
    ChildrenStarted,
    /// The shard was processed to its end and is past the stream's retention.
    PastRetention,
}

/// A finished lease to delete, with the fence the delete must match.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub(crate) struct LeaseDeletion {
    /// The lease.
    pub(crate) lease_key: String,
    /// Its owner and counter as seen.
    pub(crate) fence: LeaseFence,
    /// Why.
    pub(crate) reason: DeletionReason,
    /// Its parents, none of which has a lease in the table read. A scan is not a snapshot (it
    /// misses a lease created after it passed the lease's place), so the delete waits until
    /// a read of these keys finds none of them.
    pub(crate) parents: Vec<String>,
}

/// True once a child lease has left its starting sentinel: it read and checkpointed records.
fn has_checkpointed(lease: &Lease) -> bool {
    matches!(
        lease.checkpoint,
        Checkpoint::SequenceNumber(_) | Checkpoint::ShardEnd
    )
}

/// The finished leases that can be deleted, once a read of their parents' keys finds none.
pub(crate) fn leases_to_delete(shards: &[Shard], leases: &[Lease]) -> Vec<LeaseDeletion> {
    let lineage = Lineage::new(shards);
    let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
    let leased: HashSet<&str> = by_key.keys().copied().collect();
    let processed = lineage.with_leased_descendant(&leased);
    let mut delete = Vec::new();
    for lease in leases.iter().filter(|l| l.is_finished()) {
        let key = lease.lease_key.as_str();
        let parents: BTreeSet<&str> = lease
            .parent_shard_ids
            .iter()
            .map(String::as_str)
            .chain(
                lineage
                    .shards
                    .get(key)
                    .map(|shard| lineage.parents(shard))
                    .unwrap_or_default(),
            )
            .collect();
        if parents.iter().any(|p| by_key.contains_key(p)) {
            continue;
        }
        let reason = if !lineage.shards.contains_key(key) {
            Some(DeletionReason::PastRetention)
        } else {
            let children: BTreeSet<&str> = lease
                .child_shard_ids
                .iter()
                .map(String::as_str)
                .chain(lineage.children.get(key).into_iter().flatten().copied())
                .collect();
            let started = |child: &str| match by_key.get(child) {
                Some(child_lease) => has_checkpointed(child_lease),
                // Cleaned up after its own children started, or past retention.
                None => processed.contains(child) || !lineage.shards.contains_key(child),
            };
            (!children.is_empty() && children.iter().all(|c| started(c)))
                .then_some(DeletionReason::ChildrenStarted)
        };
        if let Some(reason) = reason {
            delete.push(LeaseDeletion {
                lease_key: lease.lease_key.clone(),
                fence: lease.fence(),
                reason,
                parents: parents.into_iter().map(str::to_owned).collect(),
            });
        }
    }
    delete
}

/// The hash key ranges that no unfinished lease covers.
///
/// Inconclusive, so empty, when an unfinished lease has no hash key range: leases written by
/// old Java KCL versions carry none, and such a lease may cover any range, a hole included.
/// (Taking each hole for covered by some unknown lease is the only sound reading: a lease's
/// range is contiguous, but an unfinished parent's range overlaps its children's, so even the
/// number of holes says nothing.) Reporting those holes would make every worker run a full
/// shard sync each round for as long as the old lease lives. Finished leases do not count
/// either way.
pub(crate) fn hash_key_holes(leases: &[Lease]) -> Vec<HashKeyRange> {
    let unfinished = leases.iter().filter(|l| !l.is_finished());
    let Some(mut ranges) = unfinished
        .map(|l| l.hash_key_range)
        .collect::<Option<Vec<HashKeyRange>>>()
    else {
        return Vec::new();
    };
    if ranges.is_empty() {
        return Vec::new();
    }
    ranges.sort_by_key(|r| (r.starting_hash_key, r.ending_hash_key));
    let mut holes = Vec::new();
    // The first hash key not yet covered; None once the whole space is covered.
    let mut next: Option<u128> = Some(0);
    for range in ranges {
        let Some(start) = next else { break };
        if range.starting_hash_key > start {
            holes.push(HashKeyRange {
                starting_hash_key: start,
                ending_hash_key: range.starting_hash_key - 1,
            });
        }
        if range.ending_hash_key >= start {
            next = range.ending_hash_key.checked_add(1);
        }
    }
    if let Some(start) = next {
        holes.push(HashKeyRange {
            starting_hash_key: start,
            ending_hash_key: u128::MAX,
        });
    }
    holes
}

/// Whether a parent is finished, from a consistent read of its key (`None`: no item). A
/// parent without a lease was processed and cleaned up, or is past retention, or was skipped
/// at the start: it blocks nothing, since a child's lease is only ever created after its
/// parents' leases. Only a read of the key itself tells that the item is absent: a scan is
/// not a snapshot and can leave out an item that exists.
pub(crate) fn parent_read_finished(read: Option<&Lease>) -> bool {
    read.is_none_or(Lease::is_finished)
}

#[cfg(test)]
mod tests;
