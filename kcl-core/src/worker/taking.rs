//! Taking rounds: reading the table, passing on requests for held leases, taking free leases
//! and asking live workers for theirs; and watching the leases this worker waits to be
//! handed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Coordinator, Pending, concurrently};
use crate::error::{ErrorKind, Result};
use crate::lease::held::HeldLease;
use crate::lease::lineage;
use crate::lease::taker::{HandoffRequest, TakeDecision, TakeInput, TakeReason, plan};
use crate::lease::{Lease, LeaseFence, LeaseStore, LeaseUpdate, key_prefix};
use crate::processor::RecordProcessorFactory;

impl<F: RecordProcessorFactory> Coordinator<F> {
    /// One taking round: read the table, update the observations, pass on requests for held
    /// leases, then take and ask for what the planner says.
    pub(super) async fn take_leases(&mut self) {
        // Consumed before the scan: a scan that fails must not leave a past deadline behind,
        // or the event loop would fire this round again at once, forever (a hot loop on the
        // lease table while DynamoDB fails fast; found by the simulation). The regular taker
        // tick retries.
        self.expiry_check = None;
        if !self.scan_due(Instant::now()) {
            self.publish_status(None);
            return;
        }
        let ticket = self.invalid_items.ticket();
        let scan = if self.config.lease.eventually_consistent_scans {
            self.store.list_leases_eventually_consistent()
        } else {
            self.store.list_leases()
        };
        // A read can be dropped at any point: a shutdown does not wait for it.
        let scan = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return,
            scan = scan => scan,
        };
        let mut scan = match scan {
            Ok(scan) => scan,
            Err(e) => {
                warn!(error = %crate::ErrorChain(&e), "lease scan failed; next round retries");
                return;
            }
        };
        let slots = scan.take_watcher_slots();
        // Never take a lease of another stream (another deployment with the same application
        // name): its checkpoint is a position in that stream.
        let checked = if self.is_multi_stream() {
            crate::lease::check_multi_stream(self.store.table_name(), &scan.leases)
        } else {
            crate::lease::check_stream(self.store.table_name(), &scan.leases, &self.config.stream)
        };
        if let Err(e) = checked {
            self.fatal.raise(e);
            return;
        }
        if self.is_multi_stream() {
            self.notice_recreated_streams(&scan.leases);
        }
        let now = Instant::now();
        self.scanned(&slots, now);
        self.invalid_items.scanned(ticket, &scan.invalid);
        self.observations.observe(&scan.leases, now);
        self.forget_lost_leases();
        let me = self.config.worker_id.clone();
        for lease in &scan.leases {
            match (lease.owner.as_deref(), lease.handoff_to.as_deref()) {
                // Someone asked for a lease we hold: hand it over.
                (Some(owner), Some(to)) if owner == me => {
                    if let Some(held) = self.held.get(&lease.lease_key)
                        && held.in_this_term(lease)
                    {
                        held.handoff_requested(to);
                    }
                }
                // A lease offered to us, or asked for by us: watch it closely.
                (Some(_), Some(to)) if to == me => {
                    self.incoming
                        .entry(lease.lease_key.clone())
                        .or_insert(Pending {
                            since: now,
                            asked: false,
                        });
                }
                _ => {}
            }
        }
        self.watchdog();
        // A consumer still winding down keeps its lease out of reach, so one shard never has
        // two consumers in this worker.
        let held: BTreeSet<String> = self
            .held
            .all()
            .iter()
            .map(|l| l.lease_key().to_owned())
            .chain(self.running.keys().cloned())
            .collect();
        // The fleet is balanced over the streams this worker consumes: the leases of a stream
        // it does not (not discovered yet, or gone and waiting for deletion) are neither
        // taken nor counted, or a worker would keep choosing leases it cannot take.
        let consumed: Vec<Lease> = if self.is_multi_stream() {
            scan.leases
                .iter()
                .filter(|l| self.consumes(&l.lease_key))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let leases = if self.is_multi_stream() {
            &consumed
        } else {
            &scan.leases
        };
        let lease_config = &self.config.lease;
        let decisions = plan(&TakeInput {
            worker_id: &self.config.worker_id,
            leases,
            held: &held,
            observations: &self.observations,
            now,
            lease_duration: lease_config.lease_duration,
            handoff_timeout: lease_config.handoff_timeout,
            max_leases_per_worker: lease_config.max_leases_per_worker,
            max_leases_to_steal: lease_config.max_leases_to_steal,
            take_every_free: self.is_watcher(),
            seed: self.seeds.next_seed(),
        });
        if decisions.spillover != self.counters.spillover && decisions.spillover > 0 {
            warn!(
                spillover = decisions.spillover,
                workers = decisions.workers,
                max_leases_per_worker = lease_config.max_leases_per_worker,
                "lease spill-over: more leases than the known workers may hold"
            );
        }
        self.counters.spillover = decisions.spillover;
        if !decisions.take.is_empty() || !decisions.request_handoff.is_empty() {
            debug!(
                workers = decisions.workers,
                leases = decisions.active_leases,
                mine = decisions.counted_for_me,
                take = decisions.take.len(),
                ask = decisions.request_handoff.len(),
                "taking round"
            );
        }
        // A round that moved nothing does not make a balanced fleet: the others may still be
        // taking and handing over (a member that waited for `member_scan_interval` after
        // such a round was left with one lease while a watcher held nineteen).
        let moved = !decisions.take.is_empty() || !decisions.request_handoff.is_empty();
        let (leases, workers) = (decisions.active_leases, decisions.workers.max(1));
        let (floor, ceil) = (leases / workers, leases.div_ceil(workers));
        let loads = decisions.worker_loads.values();
        let balanced = loads.clone().sum::<usize>() == leases
            && loads.into_iter().all(|load| (floor..=ceil).contains(load));
        self.round_decided(workers, moved || !balanced);
        let writes = decisions
            .take
            .into_iter()
            .map(RoundWrite::Take)
            .chain(decisions.request_handoff.into_iter().map(RoundWrite::Ask))
            .collect();
        self.send_round_writes(writes).await;
        self.learn_parents(&scan.leases);
        // An item that does not decode is a lease of unknown range, like an old Java KCL
        // lease without one: the check is inconclusive.
        let mut holes = BTreeMap::new();
        if scan.invalid.is_empty() {
            // Per stream: one stream's hash keys say nothing of another's.
            let mut found = |prefix: &str, leases: &[Lease]| {
                let stream_holes = lineage::hash_key_holes(leases);
                if !stream_holes.is_empty() {
                    holes.insert(prefix.to_owned(), stream_holes);
                }
            };
            if self.is_multi_stream() {
                let mut by_stream: BTreeMap<&str, Vec<Lease>> = BTreeMap::new();
                for lease in &scan.leases {
                    by_stream
                        .entry(key_prefix(&lease.lease_key))
                        .or_default()
                        .push(lease.clone());
                }
                for (prefix, leases) in &by_stream {
                    found(prefix, leases);
                }
            } else {
                found("", &scan.leases);
            }
        }
        for (prefix, found) in &holes {
            if self.last_holes.get(prefix) == Some(found) {
                warn!(
                    stream = prefix.trim_end_matches(':'),
                    holes = ?found,
                    "hash keys no unfinished lease covers; running a full shard sync"
                );
                self.sync_requests.request(prefix);
            }
        }
        self.last_holes = holes;
        // The next lease of another worker to run out before the next regular round.
        let lease_duration = self.config.lease.lease_duration;
        let next_round = now + self.config.lease.taker_interval;
        self.expiry_check = scan
            .leases
            .iter()
            .filter(|l| !l.is_finished() && l.owner.as_deref().is_some_and(|o| o != me))
            .filter_map(|l| self.observations.expires_at(l, lease_duration))
            .filter(|at| *at > now && *at <= next_round)
            .min();
        self.worker_loads = decisions.worker_loads;
        self.counters.taking_rounds += 1;
        self.publish_status(Some((
            decisions.workers,
            decisions.active_leases,
            decisions.spillover,
        )));
    }

    /// Reads the leases this worker waits for: takes those released to it, takes by force
    /// those it asked for whose owner did not hand them over in time, forgets those that went
    /// elsewhere.
    pub(super) async fn poll_handoffs(&mut self) {
        let keys: Vec<String> = self.incoming.keys().cloned().collect();
        // A read: dropped when the worker is to shut down.
        let scan = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return,
            scan = self.store.get_leases(&keys) => scan,
        };
        let scan = match scan {
            Ok(scan) => scan,
            Err(e) => {
                warn!(error = %crate::ErrorChain(&e), "reading requested leases failed; retrying");
                return;
            }
        };
        let now = Instant::now();
        self.observations.observe_some(&scan.leases, now);
        let found: BTreeMap<&str, &Lease> = scan
            .leases
            .iter()
            .map(|l| (l.lease_key.as_str(), l))
            .collect();
        let me = self.config.worker_id.clone();
        let mut takes = Vec::new();
        for key in keys {
            let Some(lease) = found.get(key.as_str()) else {
                self.incoming.remove(&key);
                continue;
            };
            let pending = self.incoming[&key];
            let reason = match (lease.owner.as_deref(), lease.handoff_to.as_deref()) {
                (None, Some(to)) if to == me => TakeReason::Reserved,
                (Some(_), Some(to)) if to == me => {
                    let waited = now.duration_since(pending.since);
                    if waited < self.config.lease.handoff_timeout {
                        continue;
                    }
                    if !pending.asked {
                        // An offer whose owner has not released it: it may still be finishing
                        // a batch. If it died, the lease expires like any other.
                        self.incoming.remove(&key);
                        continue;
                    }
                    warn!(lease_key = %key, owner = ?lease.owner, "handoff timed out; taking the lease");
                    self.counters.forced_takes += 1;
                    TakeReason::HandoffTimedOut
                }
                // Taken by someone else, released without reservation, or ours already.
                _ => {
                    self.incoming.remove(&key);
                    continue;
                }
            };
            self.incoming.remove(&key);
            let at_limit =
                self.held.all().len() + takes.len() >= self.config.lease.max_leases_per_worker;
            if at_limit {
                // The reservation lapses and another worker takes the lease.
                debug!(lease_key = %key, "not taking a handed-over lease: at max_leases_per_worker");
                continue;
            }
            if self.held.get(&key).is_none() && !self.running.contains_key(&key) {
                takes.push(TakeDecision::new(key, lease.fence(), reason));
            }
        }
        self.take_all(takes).await;
        self.publish_status(None);
    }

    /// Asks for an identity check of each consumed stream whose name has leases of a later
    /// creation time in the table: another worker found the stream recreated under its name
    /// (a worker that does not sync on the schedule learns it here, at no cost).
    fn notice_recreated_streams(&self, leases: &[Lease]) {
        let streams = self.streams.borrow().clone();
        let consumed: BTreeMap<(&str, &str), (u64, &str)> = streams
            .iter()
            .filter_map(|(prefix, s)| {
                let id = s.identity.as_ref()?;
                Some((
                    (id.account_id(), id.stream_name()),
                    (id.creation_epoch(), prefix.as_str()),
                ))
            })
            .collect();
        let prefixes: BTreeSet<&str> = leases
            .iter()
            .map(|l| key_prefix(&l.lease_key))
            .filter(|p| !streams.contains_key(*p))
            .collect();
        for prefix in prefixes {
            let Ok(other) = crate::StreamIdentity::parse(prefix.trim_end_matches(':')) else {
                continue;
            };
            if let Some((epoch, ours)) = consumed.get(&(other.account_id(), other.stream_name()))
                && other.creation_epoch() > *epoch
            {
                debug!(stream = %other, "leases of a later stream of the same name; checking ours");
                self.sync_requests.request(ours);
            }
        }
    }

    /// Takes these leases, the writes sent together.
    pub(super) async fn take_all(&mut self, decisions: Vec<TakeDecision>) {
        self.send_round_writes(decisions.into_iter().map(RoundWrite::Take).collect())
            .await;
    }

    /// Sends the writes of a round together and applies each outcome as it arrives. A
    /// shutdown stops further writes from being sent; see [`super::concurrently`].
    async fn send_round_writes(&mut self, writes: Vec<RoundWrite>) {
        let writes: Vec<RoundWrite> = writes
            .into_iter()
            .filter(|write| match write {
                RoundWrite::Take(decision) => self.may_take(decision),
                RoundWrite::Ask(request) => !self.stopping && self.consumes(&request.lease_key),
            })
            .collect();
        let (store, me) = (self.store.clone(), self.config.worker_id.clone());
        let mut outcomes = concurrently(writes, Some(self.shutdown.clone()), move |write| {
            write.send(store.clone(), me.clone())
        });
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                RoundOutcome::Take {
                    decision,
                    sent_at,
                    result,
                } => self.took(decision, sent_at, result),
                RoundOutcome::Ask { request, result } => self.asked(request, result),
            }
        }
    }

    fn may_take(&self, decision: &TakeDecision) -> bool {
        if self.stopping || self.shutdown.is_cancelled() || self.fatal.is_raised() {
            return false;
        }

        // A lease of a stream this worker does not consume (not discovered yet, or gone
        // from its list): workers that consume it take it.
        if !self.consumes(&decision.lease_key) {
            return false;
        }
        if let Some((failures, until)) = self.cooldown.get(&decision.lease_key)
            && *until > Instant::now()
        {
            debug!(lease_key = %decision.lease_key, failures, "shard cooling down after failures; not taking it yet");
            return false;
        }
        true
    }

    /// Applies the answer to a take: on success the lease is held and its consumer started.
    fn took(&mut self, decision: TakeDecision, sent_at: Instant, result: Result<Lease>) {
        match result {
            Ok(lease) => {
                info!(lease_key = %lease.lease_key, reason = ?decision.reason, counter = lease.counter, "took lease");
                self.incoming.remove(&lease.lease_key);
                if decision.reason == TakeReason::Reserved {
                    self.counters.received += 1;
                }
                self.counters.leases_taken += 1;
                if decision.reason == TakeReason::Expired {
                    self.counters.leases_taken_expired += 1;
                }
                crate::metrics::lease_taken(
                    &self.stream_label(&lease.lease_key),
                    decision.reason.label(),
                );
                let parents = lease.parent_keys();
                let held = HeldLease::new(
                    lease,
                    &self.config.worker_id,
                    self.config.lease.lease_duration,
                    sent_at,
                    self.fatal.clone(),
                );
                self.held.insert(held.clone());
                self.start_consumer(held, parents);
            }
            Err(e) if e.kind() == ErrorKind::ConditionFailed => {
                debug!(lease_key = %decision.lease_key, "lease changed before the take; another worker got it");
            }
            Err(e) => {
                warn!(lease_key = %decision.lease_key, error = %crate::ErrorChain(&e), "taking a lease failed");
            }
        }
    }

    /// Applies the answer to a handoff request: on success the lease is watched.
    fn asked(&mut self, request: HandoffRequest, result: Result<Lease>) {
        match result {
            Ok(_) => {
                info!(lease_key = %request.lease_key, owner = ?request.fence.owner, "asked for lease");
                let pending = Pending {
                    since: Instant::now(),
                    asked: true,
                };
                self.incoming.insert(request.lease_key, pending);
            }
            Err(e) if e.kind() == ErrorKind::ConditionFailed => {
                debug!(lease_key = %request.lease_key, "lease changed before the handoff request");
            }
            Err(e) => {
                warn!(lease_key = %request.lease_key, error = %crate::ErrorChain(&e), "asking for a lease failed")
            }
        }
    }
}

impl TakeDecision {
    pub(super) fn new(lease_key: String, fence: LeaseFence, reason: TakeReason) -> Self {
        TakeDecision {
            lease_key,
            fence,
            reason,
        }
    }
}

/// A lease write of a taking round. It is sent without holding the coordinator, so that the
/// writes of a round go together; the outcomes are applied afterwards, one at a time.
enum RoundWrite {
    Take(TakeDecision),
    Ask(HandoffRequest),
}

enum RoundOutcome {
    Take {
        decision: TakeDecision,
        /// When the take was sent: the lease is valid for a lease duration from then.
        sent_at: Instant,
        result: Result<Lease>,
    },
    Ask {
        request: HandoffRequest,
        result: Result<Lease>,
    },
}

impl RoundWrite {
    async fn send(self, store: Arc<dyn LeaseStore>, me: String) -> RoundOutcome {
        match self {
            RoundWrite::Take(decision) => {
                let sent_at = Instant::now();
                let update = LeaseUpdate::Take { new_owner: me };
                let result = store
                    .update_lease(&decision.lease_key, &decision.fence, &update)
                    .await;
                RoundOutcome::Take {
                    decision,
                    sent_at,
                    result,
                }
            }
            RoundWrite::Ask(request) => {
                let update = LeaseUpdate::RequestHandoff { to: me };
                let result = store
                    .update_lease(&request.lease_key, &request.fence, &update)
                    .await;
                RoundOutcome::Ask { request, result }
            }
        }
    }
}
