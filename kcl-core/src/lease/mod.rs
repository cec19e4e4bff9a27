//! Leases: one per shard, the unit of ownership and the home of the shard's checkpoint.
//!
//! Every write to a lease is conditional on its [`LeaseFence`] (owner and counter), and every
//! write but a handoff request increments the counter. So a worker whose lease was taken can
//! never overwrite the new owner's checkpoint: its fence no longer matches.
//!
//! Invariant kept by every writer: a worker changes the counter only of a lease it owns
//! (renew, checkpoint, release) or while changing its owner (take). The one write to another
//! worker's lease that keeps the owner, a handoff request, leaves the counter alone. Hence a
//! failed condition on a lease that still names this worker as owner is never a lost lease.
//! It has one of two causes, told apart by the stored lease the failure carries:
//! - the update's own precondition ([`LeaseUpdate::allowed`]) does not hold: say a handoff
//!   offer of a worker shutting down, on a lease another worker has already asked for. The
//!   update is rejected ([`Error::LeaseUpdateRejected`]); nothing was written, the lease stays
//!   held, and a pending request is passed on to its consumer;
//! - the update is allowed, so the counter moved under this worker's name: one of its own
//!   writes landed but its answer was lost (a timeout, a dropped future). The held lease's
//!   write adopts the stored fence and sends the update again. A write is unanswered until
//!   an answer says whether it landed: a timeout, a transient error or a dropped future leave
//!   it unknown, and so does a failed condition, since the SDK retries a call whose answer
//!   was lost. Each unanswered write moves the counter by one at most, and changes only what
//!   its update sets; a stored lease those writes cannot explain (a larger move, an owner
//!   switch, a checkpoint none of them carried) is another process running with this worker
//!   id: the lease is dropped without a write and the worker ends with
//!   [`Error::DuplicateWorkerId`].
//!
//! And a request never looks like a renewal to a worker watching a dead owner's counter.
//!
//! # Handoff
//! A worker that wants a live worker's lease (to balance the fleet) does not take it: it
//! writes [`LeaseUpdate::RequestHandoff`], setting `handoffTo`. The owner sees the request in
//! its next write's answer or lease scan, lets its processor finish the batch and checkpoint
//! (`shutdown_requested`), and releases the lease, keeping `handoffTo` as a reservation. The
//! requester takes it as soon as it sees it released: no records are delivered twice and the
//! shard pauses only for the checkpoint and two writes. A worker shutting down offers its
//! leases to live workers the same way, and moves an offer whose receiver went away before
//! taking it ([`LeaseUpdate::RedirectHandoff`]). Others leave a reserved lease alone until it
//! has sat unchanged for the handoff timeout.

pub(crate) mod held;
pub(crate) mod lineage;
pub(crate) mod renewer;
pub(crate) mod stream_view;
pub(crate) mod taker;
pub(crate) mod usage;
pub(crate) mod watch;

use std::collections::BTreeSet;
use std::fmt;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::sequence::Checkpoint;
use crate::stream::HashKeyRange;

/// A shard's lease as stored in the lease table.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Lease {
    /// The shard id (`leaseKey`).
    pub lease_key: String,
    /// The worker holding the lease (`leaseOwner`); `None` when nobody does.
    pub owner: Option<String>,
    /// Heartbeat and fencing token (`leaseCounter`), incremented by every write.
    pub counter: u64,
    /// What was processed (`checkpoint`, `checkpointSubSequenceNumber`).
    pub checkpoint: Checkpoint,
    /// Owner changes since the last checkpoint (`ownerSwitchesSinceCheckpoint`).
    pub owner_switches_since_checkpoint: u64,
    /// The shards this one was split or merged from (`parentShardId`).
    pub parent_shard_ids: BTreeSet<String>,
    /// The shards this one was split or merged into (`childShardIds`).
    pub child_shard_ids: BTreeSet<String>,
    /// The hash keys the shard serves (`startingHashKey`, `endingHashKey`).
    pub hash_key_range: Option<HashKeyRange>,
    /// The worker the lease is being handed to (`handoffTo`): set on an owned lease, a request
    /// to its owner to hand it over; on an unowned lease, a reservation for that worker.
    pub handoff_to: Option<String>,
    /// The name of the stream whose shard this is (`streamName`), so that a lease table is
    /// never shared by two streams unnoticed ([`Error::LeaseTableOfAnotherStream`]). `None` on
    /// leases written by the Java KCL or by versions before it: those fit any stream. In
    /// multi-stream mode, the stream's identity `ACCOUNT:NAME:CREATION_EPOCH`, as the Java
    /// KCL writes it.
    pub stream_name: Option<String>,
    /// In multi-stream mode, the shard's id (`shardId`); the lease key is then
    /// `ACCOUNT:NAME:CREATION_EPOCH:SHARD_ID`. `None` in single-stream mode, where the lease
    /// key is the shard id.
    pub shard_id: Option<String>,
}

impl Lease {
    /// A new unowned lease with counter 0 and the given starting checkpoint.
    pub fn new(lease_key: impl Into<String>, checkpoint: Checkpoint) -> Self {
        Lease {
            lease_key: lease_key.into(),
            owner: None,
            counter: 0,
            checkpoint,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: BTreeSet::new(),
            child_shard_ids: BTreeSet::new(),
            hash_key_range: None,
            handoff_to: None,
            stream_name: None,
            shard_id: None,
        }
    }

    /// Sets the stream the lease belongs to.
    #[must_use]
    pub fn with_stream_name(mut self, stream_name: impl Into<String>) -> Self {
        self.stream_name = Some(stream_name.into());
        self
    }

    /// Sets the parent shards.
    #[must_use]
    pub fn with_parents(mut self, parents: impl IntoIterator<Item = String>) -> Self {
        self.parent_shard_ids = parents.into_iter().collect();
        self
    }

    /// Sets the hash key range.
    #[must_use]
    pub fn with_hash_key_range(mut self, range: HashKeyRange) -> Self {
        self.hash_key_range = Some(range);
        self
    }

    /// The owner and counter a conditional write of this lease must match.
    pub fn fence(&self) -> LeaseFence {
        LeaseFence {
            owner: self.owner.clone(),
            counter: self.counter,
        }
    }

    /// True when the shard was processed to its end.
    pub fn is_finished(&self) -> bool {
        self.checkpoint.is_shard_end()
    }

    /// The lease keys of the parent shards: the parents are stored as shard ids (as the Java
    /// KCL stores them), and a multi-stream lease's parents are shards of its own stream.
    pub(crate) fn parent_keys(&self) -> BTreeSet<String> {
        let prefix = key_prefix(&self.lease_key);
        self.parent_shard_ids
            .iter()
            .map(|p| format!("{prefix}{p}"))
            .collect()
    }
}

/// What a lease key puts before the shard id: `ACCOUNT:NAME:EPOCH:` for a multi-stream key,
/// nothing for a single-stream one (shard ids never contain `:`).
pub(crate) fn key_prefix(lease_key: &str) -> &str {
    lease_key.rfind(':').map_or("", |i| &lease_key[..=i])
}

/// The state a conditional lease write expects to find: the owner and the counter.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct LeaseFence {
    /// Expected `leaseOwner` (`None`: the lease must be unowned).
    pub owner: Option<String>,
    /// Expected `leaseCounter`.
    pub counter: u64,
}

/// A change to a lease. Each one but [`LeaseUpdate::RequestHandoff`] also increments the
/// counter.
///
/// [`LeaseUpdate::apply`] defines the result and [`LeaseUpdate::allowed`] the condition
/// beyond the fence; a [`LeaseStore`] must implement exactly these.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum LeaseUpdate {
    /// Heartbeat: only the counter changes.
    Renew,
    /// Change the owner; counts an owner switch and ends any pending handoff.
    Take {
        /// The new owner's worker id.
        new_owner: String,
    },
    /// Ask the owner to hand the lease over (or, written by the owner, offer it): sets
    /// `handoffTo`. Allowed only when no handoff is pending. The counter does not change.
    RequestHandoff {
        /// The worker that is to own the lease next.
        to: String,
    },
    /// Written by the owner: moves its pending offer to another worker (the one it offered
    /// the lease to went away before taking it). Allowed only while the handoff pending is
    /// to `from`. The counter does not change.
    RedirectHandoff {
        /// The worker the lease was offered to.
        from: String,
        /// The worker that is to own the lease next.
        to: String,
    },
    /// Store a checkpoint; resets the owner-switch count.
    Checkpoint {
        /// The new checkpoint.
        checkpoint: Checkpoint,
    },
    /// Clear the owner so another worker can take the lease at once. A pending handoff stays,
    /// as a reservation for its worker.
    Release,
    /// Record the shards this one was split or merged into (at its end).
    RecordChildren {
        /// The children's shard ids.
        child_shard_ids: BTreeSet<String>,
    },
}

impl LeaseUpdate {
    /// The lease after this update.
    pub fn apply(&self, lease: &Lease) -> Lease {
        let mut next = lease.clone();
        next.counter = lease.counter + 1;
        match self {
            LeaseUpdate::Renew => {}
            LeaseUpdate::Take { new_owner } => {
                next.owner = Some(new_owner.clone());
                next.owner_switches_since_checkpoint += 1;
                next.handoff_to = None;
            }
            LeaseUpdate::RequestHandoff { to } | LeaseUpdate::RedirectHandoff { to, .. } => {
                next.counter = lease.counter;
                next.handoff_to = Some(to.clone());
            }
            LeaseUpdate::Checkpoint { checkpoint } => {
                next.checkpoint = checkpoint.clone();
                next.owner_switches_since_checkpoint = 0;
            }
            LeaseUpdate::Release => next.owner = None,
            LeaseUpdate::RecordChildren { child_shard_ids } => {
                next.child_shard_ids = child_shard_ids.clone();
            }
        }
        next
    }

    /// Whether the update may be applied to `lease`, beyond matching the fence.
    pub fn allowed(&self, lease: &Lease) -> bool {
        match self {
            LeaseUpdate::RequestHandoff { .. } => lease.handoff_to.is_none(),
            LeaseUpdate::RedirectHandoff { from, .. } => lease.handoff_to.as_ref() == Some(from),
            _ => true,
        }
    }

    /// The operation's name in errors and logs.
    pub fn operation(&self) -> &'static str {
        match self {
            LeaseUpdate::Renew => "renew",
            LeaseUpdate::Take { .. } => "take",
            LeaseUpdate::RequestHandoff { .. } => "handoff request",
            LeaseUpdate::RedirectHandoff { .. } => "handoff redirect",
            LeaseUpdate::Checkpoint { .. } => "checkpoint",
            LeaseUpdate::Release => "release",
            LeaseUpdate::RecordChildren { .. } => "record children",
        }
    }
}

/// The name in a stream name or ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`): what
/// leases record as their stream, however a deployment names it.
pub(crate) fn stream_name_of(name_or_arn: &str) -> &str {
    name_or_arn
        .rsplit_once(":stream/")
        .map_or(name_or_arn, |(_, name)| name)
}

/// The first lease that names a stream other than `stream` (a name or ARN), as an error: the
/// table belongs to that stream. Leases without a stream name fit any stream.
pub(crate) fn check_stream(table: &str, leases: &[Lease], stream: &str) -> Result<()> {
    let name = stream_name_of(stream);
    match leases
        .iter()
        .filter_map(|l| l.stream_name.as_deref())
        .find(|other| stream_name_of(other) != name)
    {
        Some(other) => Err(Error::LeaseTableOfAnotherStream {
            table: table.to_owned(),
            table_stream: other.to_owned(),
            stream: stream.to_owned(),
        }),
        None => Ok(()),
    }
}

/// In multi-stream mode: the first lease that is not a multi-stream lease, as an error (the
/// table is a single-stream application's, whose leases are keyed by shard id). Watcher slots
/// are taken out of the scan before.
pub(crate) fn check_multi_stream(table: &str, leases: &[Lease]) -> Result<()> {
    match leases.iter().find(|l| key_prefix(&l.lease_key).is_empty()) {
        Some(single) => Err(Error::LeaseTableOfAnotherStream {
            table: table.to_owned(),
            table_stream: single.stream_name.clone().unwrap_or_else(|| {
                format!("a single-stream application (lease `{}`)", single.lease_key)
            }),
            stream: "a multi-stream application".to_owned(),
        }),
        None => Ok(()),
    }
}

/// The result of reading the whole lease table.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct LeaseScan {
    /// The leases that decoded.
    pub leases: Vec<Lease>,
    /// One [`Error::InvalidLeaseItem`] per item that did not decode. These items are skipped:
    /// one garbage item must not stop a whole fleet.
    pub invalid: Vec<Error>,
}

/// The leases that must exist, and those that must not, when a lease is created: see
/// [`LeaseStore::create_lease_in_lineage`].
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct LineageGuard {
    /// Lease keys that must exist: the parents known to have leases.
    pub parents: Vec<String>,
    /// Lease keys that must not exist: the shard's children.
    pub children: Vec<String>,
}

impl LineageGuard {
    /// A guard requiring `parents` to exist and `children` to be absent.
    pub fn new(
        parents: impl IntoIterator<Item = String>,
        children: impl IntoIterator<Item = String>,
    ) -> Self {
        LineageGuard {
            parents: parents.into_iter().collect(),
            children: children.into_iter().collect(),
        }
    }

    /// True when it checks nothing: a plain create-if-absent does.
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty() && self.children.is_empty()
    }
}

/// What [`LeaseStore::create_lease_in_lineage`] did.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum LeaseCreation {
    /// The lease was created.
    Created,
    /// An item with the lease's key exists; nothing was written.
    Exists,
    /// No item has this parent's key; nothing was written.
    ParentMissing {
        /// The missing parent's lease key.
        parent: String,
    },
    /// An item has this child's key; nothing was written.
    ChildExists {
        /// The child's lease key.
        child: String,
    },
}

/// Storage of the lease table: the seam between the core and DynamoDB.
///
/// Implementations map failures onto [`Error`] variants: `LeaseConditionFailed` when a
/// condition does not hold, `Throttled` / `Transient` for retryable failures, and
/// `LeaseTableNotFound`, `LeaseTableSchema`, `InvalidLeaseItem`, `Service` otherwise.
#[async_trait]
pub trait LeaseStore: Send + Sync + fmt::Debug + 'static {
    /// The table's name, for messages.
    fn table_name(&self) -> &str;

    /// Makes the table usable: creates it if missing, waits until it is active, and checks
    /// its schema.
    async fn initialize(&self) -> Result<()>;

    /// Every lease in the table, each item as of its latest write (a strongly consistent
    /// read).
    async fn list_leases(&self) -> Result<LeaseScan>;

    /// Every lease in the table, each item possibly a little behind its latest write (an
    /// eventually consistent read: DynamoDB charges half the read units, and an item usually
    /// lags by under a second). Items lag independently, so the result may mix old and new
    /// versions, show a lease just deleted, or miss one just created. The default reads like
    /// [`list_leases`](LeaseStore::list_leases).
    ///
    /// Safe for the taking round: a lease's counter only grows, so an old version can only
    /// make an expiry look later than it is, and any write based on an old version fails its
    /// condition on the fence.
    async fn list_leases_eventually_consistent(&self) -> Result<LeaseScan> {
        self.list_leases().await
    }

    /// One lease, or `None` if there is no item with that key.
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>>;

    /// The leases with these keys that exist (in any order). Used to watch a few leases more
    /// often than the whole table, e.g. pending handoffs.
    async fn get_leases(&self, lease_keys: &[String]) -> Result<LeaseScan> {
        let mut scan = LeaseScan::default();
        for key in lease_keys {
            match self.get_lease(key).await {
                Ok(Some(lease)) => scan.leases.push(lease),
                Ok(None) => {}
                Err(e @ Error::InvalidLeaseItem { .. }) => scan.invalid.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok(scan)
    }

    /// Stores `lease` unless an item with its key exists. Returns whether it was created.
    /// Two workers creating the same lease at once is harmless: exactly one creates it.
    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool>;

    /// Stores `lease` unless an item with its key exists, and only while an item exists for
    /// every parent and for no child that `guard` names, all in one atomic write (a DynamoDB
    /// transaction).
    ///
    /// This is how a shard sync or a shard's end creates leases. A finished lease is deleted
    /// only once its own parents' leases are gone (see the lineage rules), so while a parent's
    /// lease exists its children's leases were never deleted: a creation that lands while the
    /// parents exist can only create a lease that never existed. And a lease that was
    /// processed and deleted leaves children with leases. A plain create sent late (an answer
    /// lost and the write resent, a worker paused between reading the table and writing)
    /// could bring back a lease that was processed and cleaned up meanwhile, and process its
    /// shard again from the start.
    ///
    /// When several conditions fail, the answer names the first of: the lease exists, a
    /// parent is missing, a child exists.
    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation>;

    /// Applies `update` if the stored lease matches `fence`; returns the lease as stored after
    /// the write (`update.apply(stored)`).
    ///
    /// # Errors
    /// [`Error::LeaseConditionFailed`] when the lease is missing, does not match `fence`, or
    /// does not allow the update ([`LeaseUpdate::allowed`]), with the stored lease in `current`
    /// when available (the caller tells these cases apart from it, so it must be the lease the
    /// condition was evaluated on).
    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease>;

    /// Deletes the lease if the stored one matches `fence`.
    ///
    /// # Errors
    /// [`Error::LeaseConditionFailed`] when it is missing or does not match `fence`.
    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()>;

    /// The requests and capacity units of this store's calls so far, if it counts them
    /// (the DynamoDB store does; the default is `None`).
    fn usage(&self) -> Option<&usage::LeaseTableUsage> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::SequenceNumber;

    #[test]
    fn a_handoff_request_sets_handoff_to_without_bumping_the_counter() {
        let lease = Lease::new("shardId-0", Checkpoint::TrimHorizon);
        let request = LeaseUpdate::RequestHandoff { to: "w2".into() };
        assert!(request.allowed(&lease));
        let requested = request.apply(&lease);
        assert_eq!(requested.counter, lease.counter);
        assert_eq!(requested.handoff_to.as_deref(), Some("w2"));
        assert!(
            !LeaseUpdate::RequestHandoff { to: "w3".into() }.allowed(&requested),
            "one at a time"
        );
        let released = LeaseUpdate::Release.apply(&requested);
        assert_eq!(
            released.handoff_to.as_deref(),
            Some("w2"),
            "a release keeps the reservation"
        );
        let taken = LeaseUpdate::Take {
            new_owner: "w2".into(),
        }
        .apply(&released);
        assert_eq!(taken.handoff_to, None, "a take ends the handoff");
    }

    #[test]
    fn an_offer_is_redirected_only_from_the_worker_it_went_to() {
        let lease = Lease::new("shardId-0", Checkpoint::TrimHorizon);
        let redirect = LeaseUpdate::RedirectHandoff {
            from: "w2".into(),
            to: "w3".into(),
        };
        assert!(!redirect.allowed(&lease), "no offer pending");
        let offered = LeaseUpdate::RequestHandoff { to: "w2".into() }.apply(&lease);
        assert!(redirect.allowed(&offered));
        let redirected = redirect.apply(&offered);
        assert_eq!(redirected.counter, lease.counter);
        assert_eq!(redirected.handoff_to.as_deref(), Some("w3"));
        assert!(!redirect.allowed(&redirected), "already moved");
    }

    #[test]
    fn a_lease_of_another_stream_is_found_and_arns_match_names() {
        let of = |stream: Option<&str>| {
            let lease = Lease::new("shardId-0", Checkpoint::TrimHorizon);
            match stream {
                Some(s) => lease.with_stream_name(s),
                None => lease,
            }
        };
        let arn = "arn:aws:kinesis:us-east-1:123456789012:stream/orders";
        assert_eq!(stream_name_of(arn), "orders");
        assert_eq!(stream_name_of("orders"), "orders");
        let ours = [of(Some("orders")), of(None)];
        assert!(check_stream("app", &ours, "orders").is_ok());
        assert!(
            check_stream("app", &ours, arn).is_ok(),
            "an ARN names the same stream"
        );
        assert!(
            check_stream("app", &[of(None)], "payments").is_ok(),
            "Java KCL leases fit"
        );
        let err = check_stream("app", &ours, "payments").unwrap_err();
        assert!(
            matches!(&err, Error::LeaseTableOfAnotherStream { table, table_stream, stream }
                if table == "app" && table_stream == "orders" && stream == "payments"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("`orders`") && text.contains("`payments`"),
            "{text}"
        );
    }

    #[test]
    fn every_update_bumps_the_counter() {
        let lease = Lease::new("shardId-0", Checkpoint::TrimHorizon);
        let updates = [
            LeaseUpdate::Renew,
            LeaseUpdate::Take {
                new_owner: "w1".into(),
            },
            LeaseUpdate::Checkpoint {
                checkpoint: Checkpoint::at(SequenceNumber::new("5").unwrap(), 0),
            },
            LeaseUpdate::Release,
        ];
        for update in updates {
            assert_eq!(
                update.apply(&lease).counter,
                lease.counter + 1,
                "{update:?}"
            );
        }
    }

    #[test]
    fn take_counts_owner_switches_and_checkpoint_resets_them() {
        let lease = Lease::new("shardId-0", Checkpoint::TrimHorizon);
        let taken = LeaseUpdate::Take {
            new_owner: "w1".into(),
        }
        .apply(&lease);
        assert_eq!(taken.owner.as_deref(), Some("w1"));
        assert_eq!(taken.owner_switches_since_checkpoint, 1);
        let checkpointed = LeaseUpdate::Checkpoint {
            checkpoint: Checkpoint::ShardEnd,
        }
        .apply(&taken);
        assert_eq!(checkpointed.owner_switches_since_checkpoint, 0);
        assert!(checkpointed.is_finished());
        assert_eq!(LeaseUpdate::Release.apply(&checkpointed).owner, None);
    }
}
