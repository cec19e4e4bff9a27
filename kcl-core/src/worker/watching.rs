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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use futures::StreamExt;

use super::shutdown::{assign_offers, release_lease};
use super::{Coordinator, concurrently};
use crate::config::Watchers;
use crate::error::ErrorKind;
use crate::lease::held::{HeldLease, HeldLeases};
use crate::lease::taker::LeaseObservations;
use crate::lease::watch::{new_slot, slot_keys};
use crate::lease::{Lease, LeaseUpdate};
use crate::processor::RecordProcessorFactory;

/// Whom a worker shutting down offers its leases to.
pub(super) enum Receivers {
    /// The least loaded other workers: there are no watchers, or the fleet is too small for
    /// them.
    Anyone,
    /// Only these watchers: members would not see an offer before the release. True if the
    /// worker waited for one of them to take a slot.
    Watchers(BTreeSet<String>, bool),
    /// Nobody: no watcher was left, so the leases are released unoffered.
    Nobody,
}

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

    /// Whether some workers of the fleet may read the table rarely: this worker judges the
    /// fleet big enough for watchers, or some slot is held (the fleet watched, and members
    /// that have not noticed it shrink still read rarely). Never in a fleet that was never
    /// big enough: no slot is ever taken there.
    fn fleet_watches(&self) -> bool {
        self.active || self.seen_slots.iter().any(|slot| slot.owner.is_some())
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
    /// A slot holder is a watcher whatever it judged the fleet's size: in a fleet that just
    /// shrank below `min_workers`, members that have not read the table since still read it
    /// rarely, and the slot holders are the only workers sure to see a free lease soon.
    pub(super) fn is_watcher(&self) -> bool {
        self.watch.as_ref().is_some_and(Watch::holds_slot)
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

    /// The workers that hold a slot and were seen renewing it lately (this one excepted).
    /// One that crashed still owns its slot for a lease duration, and a lease offered to it
    /// would wait out the handoff timeout.
    fn live_watchers(&self, now: Instant) -> BTreeSet<String> {
        let Some(watch) = &self.watch else {
            return BTreeSet::new();
        };
        let me = self.config.worker_id.as_str();
        let lately = self.config.lease.renewal_interval * 2;
        watch
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
            .collect()
    }

    /// Whether `worker` held a slot at this worker's last read of the slots.
    fn holds_a_slot(&self, worker: &str) -> bool {
        self.watch.as_ref().is_some_and(|watch| {
            watch
                .seen_slots
                .iter()
                .any(|slot| slot.owner.as_deref() == Some(worker))
        })
    }

    /// Reads the slots and takes note of them; false if the read failed or did not answer
    /// by `deadline`.
    async fn read_slots(&mut self, deadline: Instant) -> bool {
        let Some(watch) = &self.watch else {
            return false;
        };
        let keys = watch.slots.clone();
        let store = self.store.clone();
        match tokio::time::timeout_at(deadline, store.get_leases(&keys)).await {
            Ok(Ok(scan)) => {
                self.slots_read(scan.leases, Instant::now());
                true
            }
            Ok(Err(e)) => {
                debug!(error = %crate::ErrorChain(&e), "reading the watcher slots failed");
                false
            }
            Err(_) => false,
        }
    }

    fn slots_read(&mut self, slots: Vec<Lease>, now: Instant) {
        if let Some(watch) = &mut self.watch {
            watch.observations.observe_some(&slots, now);
            watch.seen_slots = slots;
        }
    }

    /// At shutdown: whom to offer this worker's leases to. Without watching (no watchers,
    /// or a fleet too small for them that never watched), anyone. Otherwise only watchers: a member reads the
    /// table too rarely to see an offer before the lease is released, a watcher sees it
    /// within a taker interval.
    ///
    /// A watcher first gives its slot back, so a member replaces it at its next slot check.
    /// Then the slots are read afresh (not trusted from the last read: the other watcher may
    /// be stopping too). Two watchers stopping together cannot both count the other as a
    /// receiver: each releases its slot before it reads, so whichever reads last sees the
    /// other's slot released. (One may still offer to the other: see
    /// [`Coordinator::redirect_offers`].) With no other live watcher, the worker processes on
    /// until a member takes a slot, for up to [`WorkerConfig::succession_wait`]; if none does,
    /// its leases are released unoffered, for whichever worker watches next to take at once,
    /// rather than reserved for a member that would not see them before the reservation lapses.
    ///
    /// [`WorkerConfig::succession_wait`]: crate::WorkerConfig::succession_wait
    pub(super) async fn find_offer_receivers(&mut self, deadline: Instant) -> Receivers {
        if !self.watch.as_ref().is_some_and(Watch::fleet_watches) {
            return Receivers::Anyone;
        }
        // Given up at the deadline: the slot, no longer renewed, then expires.
        let _ = tokio::time::timeout_at(deadline, self.release_slot()).await;
        let poll = self.config.lease.handoff_poll_interval;
        let mut waited = false;
        loop {
            self.read_slots(deadline).await;
            let live = self.live_watchers(Instant::now());
            if !live.is_empty() {
                if waited {
                    info!(watchers = ?live, "a member took a watcher slot: offering leases to the watchers");
                }
                return Receivers::Watchers(live, waited);
            }
            // Only a worker that holds no slot can take one: with none known, nobody will.
            let takers = self
                .worker_loads
                .keys()
                .filter(|w| **w != self.config.worker_id && !self.holds_a_slot(w))
                .count();
            let next = Instant::now() + poll;
            if takers == 0 {
                info!("no other worker to take a watcher slot: releasing the leases unoffered");
                return Receivers::Nobody;
            }
            if next >= deadline {
                info!(
                    waited = ?self.config.succession_wait(),
                    "no watcher took a slot in time: releasing the leases unoffered"
                );
                return Receivers::Nobody;
            }
            if !waited {
                info!("no other live watcher: processing until a member takes a slot");
                waited = true;
            }
            self.process_until(next).await;
        }
    }

    /// After the offer wait: moves each offer whose receiver no longer watches (it stopped
    /// at the same time, and read its slot as held before this worker's release was visible,
    /// or crashed) to a watcher that still does. With no live watcher, it processes on until
    /// a member takes a slot, up to the end of the [`WorkerConfig::succession_wait`] that
    /// began the shutdown (or one call's time if that is past); the moves get one call's time,
    /// and then an offer wait if the succession wait has that much left.
    /// An offer not moved stays, a reservation that lapses after the handoff timeout.
    ///
    /// [`WorkerConfig::succession_wait`]: crate::WorkerConfig::succession_wait
    pub(super) async fn redirect_offers(
        &mut self,
        offers: Vec<(Arc<HeldLease>, String)>,
        succession_deadline: Instant,
    ) {
        if offers.is_empty() || !self.watch.as_ref().is_some_and(Watch::fleet_watches) {
            return;
        }
        let call = self.config.lease.request_timeout;
        let until = succession_deadline.max(Instant::now() + call);
        let poll = self.config.lease.handoff_poll_interval;
        let (live, stale) = loop {
            self.read_slots(until).await;
            let live = self.live_watchers(Instant::now());
            let stale: Vec<(Arc<HeldLease>, String)> = offers
                .iter()
                .filter(|(lease, to)| !live.contains(to) && !lease.is_lost())
                .cloned()
                .collect();
            if stale.is_empty() {
                return;
            }
            if !live.is_empty() {
                break (live, stale);
            }
            let next = Instant::now() + poll;
            if next >= until {
                warn!(
                    leases = stale.len(),
                    "the workers these leases were offered to stopped watching, and no watcher took their place in time; the leases are taken when their reservations lapse"
                );
                return;
            }
            self.process_until(next).await;
        };
        let deadline = Instant::now() + call;
        let from: BTreeMap<String, String> = stale
            .iter()
            .map(|(lease, to)| (lease.lease_key().to_owned(), to.clone()))
            .collect();
        let receivers = live
            .into_iter()
            .map(|w| (self.worker_loads.get(&w).copied().unwrap_or(0), w))
            .collect();
        let moves = assign_offers(stale.into_iter().map(|(l, _)| l).collect(), receivers);
        let store = self.store.clone();
        let mut moved = 0usize;
        let sends = concurrently(moves, None, |(lease, to)| {
            let store = store.clone();
            let redirect = LeaseUpdate::RedirectHandoff {
                from: from[lease.lease_key()].clone(),
                to,
            };
            async move { (lease.write(store.as_ref(), &redirect).await, redirect) }
        })
        .for_each(|(result, redirect)| {
            match result {
                Ok(lease) => {
                    moved += 1;
                    info!(lease_key = %lease.lease_key, ?redirect, "moved an offer to a live watcher");
                }
                Err(e) => debug!(error = %crate::ErrorChain(&e), "offer not moved"),
            }
            std::future::ready(())
        });
        // Dropping a redirect halfway is harmless, as for an offer: it does not move the
        // counter, and whichever receiver it names gets the reservation.
        let _ = tokio::time::timeout_at(deadline, sends).await;
        info!(moved, "offers to workers that stopped watching moved");
        // The new receivers see the moved offers at their next round: process on for an
        // offer wait, out of what is left of the succession wait (the shutdown deadline
        // holds). Without the time, they take the leases at that round instead, reserved.
        if moved > 0 {
            let wait_until = succession_deadline.min(Instant::now() + self.config.offer_wait());
            self.process_until(wait_until).await;
        }
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
        self.slots_read(slots.clone(), now);
        let Some(watch) = &mut self.watch else { return };
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
