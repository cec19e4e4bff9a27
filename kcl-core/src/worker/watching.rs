//! Watching the lease table: with [`Watchers`], in a fleet of at least `min_workers`, only
//! the workers holding a watcher slot read the whole table every taker interval; the others
//! (members) read it every `member_scan_interval` and check the slots every
//! `slot_check_interval`, taking one that is free or expired. In a smaller fleet every worker
//! reads the table every taker interval, as without watchers.
//!
//! Each worker judges the fleet's size by its own last read of the table, so workers may
//! disagree for a while (a member reads rarely). That costs nothing in safety, and little in
//! liveness: a worker that holds a slot reads every round whatever it judged, and a fleet that
//! shrank below `min_workers` is noticed at each member's next read.
//!
//! Safety does not depend on who watches: every take is still judged by the taker's own
//! observations and fenced on the counter it observed, so a watcher that lost its slot (a
//! pause, a partition) and goes on scanning can only send takes that fail, exactly like any
//! worker with an old view. Watching only decides how soon expiries are seen.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Coordinator;
use super::shutdown::release_lease;
use crate::config::Watchers;
use crate::error::ErrorKind;
use crate::lease::held::{HeldLease, HeldLeases};
use crate::lease::taker::LeaseObservations;
use crate::lease::watch::{new_slot, slot_keys};
use crate::lease::{Lease, LeaseUpdate};
use crate::processor::RecordProcessorFactory;

/// A worker's part in watching, when the fleet has [`Watchers`].
pub(super) struct Watch {
    config: Watchers,
    slots: Vec<String>,
    /// The slot this worker holds, renewed by the slot renewer (it is in `roles`).
    held: Option<Arc<HeldLease>>,
    /// What the slot renewer renews: this worker's slot, if any.
    pub(super) roles: Arc<HeldLeases>,
    /// The slots' counters as this worker saw them (a member judges a watcher's slot
    /// expired the way it judges a lease).
    observations: LeaseObservations,
    /// When this worker last read the whole table.
    last_scan: Option<Instant>,
    /// How many leases this worker held then.
    held_at_scan: usize,
    /// Whether that read's round took or asked for leases, or saw the fleet unbalanced: the
    /// fleet is still settling, so a member reads again at the next taker interval rather
    /// than after `member_scan_interval`.
    settling: bool,
    /// The slots as this worker last read them.
    seen_slots: Vec<Lease>,
    /// Whether this worker's last read of the table counted at least `min_workers`
    /// workers: only then do members read rarely and take slots.
    active: bool,
    /// Whether this worker reads the table every taker interval (it holds a slot, or the
    /// fleet is too small for watching), shared with the shard syncer, which syncs on its
    /// interval only then.
    pub(super) watching: Arc<AtomicBool>,
}

impl Watch {
    pub(super) fn new(config: Watchers) -> Self {
        Watch {
            config,
            slots: slot_keys(config.count),
            held: None,
            roles: Arc::default(),
            observations: LeaseObservations::new(),
            last_scan: None,
            held_at_scan: 0,
            settling: false,
            seen_slots: Vec::new(),
            active: false,
            watching: Arc::new(AtomicBool::new(true)),
        }
    }

    pub(super) fn config(&self) -> &Watchers {
        &self.config
    }

    fn holds_slot(&self) -> bool {
        self.held.as_ref().is_some_and(|slot| !slot.is_lost())
    }

    /// Whether this worker reads the whole table every taker interval.
    fn reads_every_round(&self) -> bool {
        !self.active || self.holds_slot()
    }

    /// Keeps the flag the shard syncer reads in step.
    fn publish(&self) {
        self.watching
            .store(self.reads_every_round(), Ordering::SeqCst);
    }
}

impl<F: RecordProcessorFactory> Coordinator<F> {
    /// Whether this worker reads the whole table every taker interval.
    pub(super) fn watching(&self) -> bool {
        self.watch.as_ref().is_none_or(Watch::reads_every_round)
    }

    /// Whether this worker is one of the fleet's watchers: it takes every free lease, not
    /// only its share, since the members read the table too rarely to take theirs in time.
    pub(super) fn is_watcher(&self) -> bool {
        self.watch
            .as_ref()
            .is_some_and(|w| w.active && w.holds_slot())
    }

    /// Whether a taking round (a read of the whole table) is due: always for a watcher; for
    /// a member while its rounds still take or ask for leases or it waits for some (a new
    /// worker gets its share in a couple of rounds), after its leases changed since its last
    /// read (handoffs it gave may have left it under its share: several new workers can ask
    /// one worker at once), and otherwise every `member_scan_interval`.
    pub(super) fn scan_due(&self, now: Instant) -> bool {
        match &self.watch {
            None => true,
            Some(watch) => {
                watch.reads_every_round()
                    || watch.settling
                    || !self.incoming.is_empty()
                    || self.held.len() != watch.held_at_scan
                    || watch.last_scan.is_none_or(|at| {
                        now.saturating_duration_since(at) >= watch.config.member_scan_interval
                    })
            }
        }
    }

    /// Whether this worker should read the slots now and then: a member that runs on.
    pub(super) fn needs_slot(&self) -> bool {
        self.watch
            .as_ref()
            .is_some_and(|w| w.active && !w.holds_slot())
            && !self.stopping
    }

    /// Takes note of a read of the whole table: when it was, and the slots it found.
    pub(super) fn scanned(&mut self, slots: &[Lease], now: Instant) {
        if let Some(watch) = &mut self.watch {
            watch.last_scan = Some(now);
            watch.held_at_scan = self.held.len();
            watch.observations.observe_some(slots, now);
            watch.seen_slots = slots.to_vec();
        }
    }

    /// Takes note of what the round after a read found: how many workers the fleet has, and
    /// whether it is still settling (this round took or asked for leases, or some worker is
    /// off its share).
    pub(super) fn round_decided(&mut self, workers: usize, moved: bool) {
        if let Some(watch) = &mut self.watch {
            watch.settling = moved;
            let active = workers >= watch.config.min_workers;
            if active != watch.active {
                info!(
                    workers,
                    min_workers = watch.config.min_workers,
                    "{}",
                    if active {
                        "the fleet is big enough for watchers: reading the table rarely unless watching"
                    } else {
                        "the fleet is too small for watchers: reading the table every round"
                    }
                );
                watch.active = active;
                watch.publish();
            }
        }
    }

    /// The workers to offer leases to at shutdown, when they are to be limited to the
    /// watchers: a member reads the table too rarely to see an offer before the lease is
    /// released, a watcher sees it within a taker interval.
    /// A watcher counts only while its slot was seen renewed lately: one that crashed still
    /// owns its slot for a lease duration, and a lease offered to it would wait out the
    /// handoff timeout.
    pub(super) fn offer_receivers(&self) -> Option<BTreeSet<String>> {
        let watch = self.watch.as_ref().filter(|w| w.active)?;
        let me = self.config.worker_id.as_str();
        let now = Instant::now();
        let lately = self.config.lease.renewal_interval * 2;
        let live: BTreeSet<String> = watch
            .seen_slots
            .iter()
            .filter(|slot| {
                watch
                    .observations
                    .unchanged_for(slot, now)
                    .is_some_and(|d| d <= lately)
            })
            .filter_map(|slot| slot.owner.clone())
            .filter(|owner| owner != me)
            .collect();
        (!live.is_empty()).then_some(live)
    }

    /// Reads the slots; creates missing ones; takes a free, expired or orphaned one.
    pub(super) async fn check_slots(&mut self) {
        let Some(watch) = &mut self.watch else { return };
        if let Some(slot) = &watch.held
            && slot.is_lost()
        {
            info!(slot = %slot.lease_key(), "lost the watcher slot; watching no more");
            watch.held = None;
            watch.roles.remove_lost();
            watch.publish();
        }
        if watch.held.is_some() {
            return;
        }
        let keys = watch.slots.clone();
        let store = self.store.clone();
        // A read: dropped when the worker is to shut down.
        let read = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return,
            read = store.get_leases(&keys) => read,
        };
        let slots = match read {
            Ok(scan) => scan.leases,
            Err(e) => {
                warn!(error = %crate::ErrorChain(&e), "reading the watcher slots failed; the next check retries");
                return;
            }
        };
        let now = Instant::now();
        let Some(watch) = &mut self.watch else { return };
        watch.observations.observe_some(&slots, now);
        watch.seen_slots = slots.clone();
        for key in keys
            .iter()
            .filter(|k| !slots.iter().any(|s| &s.lease_key == *k))
        {
            match store.create_lease_if_absent(&new_slot(key)).await {
                Ok(created) => debug!(slot = %key, created, "watcher slot created"),
                Err(e) => {
                    warn!(slot = %key, error = %crate::ErrorChain(&e), "creating a watcher slot failed")
                }
            }
        }
        let me = self.config.worker_id.clone();
        let lease_duration = self.config.lease.lease_duration;
        let mut candidates: Vec<&Lease> = slots
            .iter()
            .filter(|slot| match slot.owner.as_deref() {
                None => true,
                // A take of ours whose answer was lost: take it back.
                Some(owner) if owner == me => true,
                Some(_) => watch.observations.is_expired(slot, now, lease_duration),
            })
            .collect();
        candidates.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
        for slot in candidates {
            if self.shutdown.is_cancelled() {
                return;
            }
            let sent_at = Instant::now();
            let take = LeaseUpdate::Take {
                new_owner: me.clone(),
            };
            match store
                .update_lease(&slot.lease_key, &slot.fence(), &take)
                .await
            {
                Ok(taken) => {
                    info!(slot = %taken.lease_key, previous = ?slot.owner, "took a watcher slot: watching the lease table");
                    let held =
                        HeldLease::new(taken, &me, lease_duration, sent_at, self.fatal.clone());
                    let Some(watch) = &mut self.watch else { return };
                    watch.roles.insert(held.clone());
                    watch.held = Some(held);
                    watch.publish();
                    return;
                }
                Err(e) if e.kind() == ErrorKind::ConditionFailed => {
                    debug!(slot = %slot.lease_key, "watcher slot taken by another worker first");
                }
                Err(e) => {
                    warn!(slot = %slot.lease_key, error = %crate::ErrorChain(&e), "taking a watcher slot failed; the next check retries");
                    return;
                }
            }
        }
    }

    /// At shutdown: gives the slot back, so a member takes it at its next check instead of
    /// waiting for it to expire.
    pub(super) async fn release_slot(&mut self) {
        let Some(watch) = &mut self.watch else { return };
        let Some(slot) = watch.held.take() else {
            return;
        };
        watch.roles.remove(slot.lease_key());
        watch.publish();
        release_lease(&slot, self.store.as_ref(), &self.config, &self.seeds).await;
    }
}
