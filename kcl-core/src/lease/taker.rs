//! Which leases to take and which to ask for: a pure function of the lease table, this
//! worker's observations and the time, property-tested without a store or a clock.
//!
//! Expiry is decided by observation, never by comparing clocks across machines: a lease is
//! expired when this worker has seen its counter unchanged for the lease duration, measured on
//! its own monotonic clock ([`LeaseObservations`]).
//!
//! # Balancing
//! Each lease of an unfinished shard counts for one worker: its owner, or the worker a handoff
//! is pending to. The workers are those counted for a live lease, plus this one. With `n`
//! leases and `k` workers a balanced fleet has every worker at `⌊n/k⌋` or `⌈n/k⌉`. A worker
//!
//! 1. takes free leases (reserved for it, unowned, orphaned, expired, lapsed reservations) up
//!    to `⌈n/k⌉`;
//! 2. if it still holds fewer than `⌊n/k⌋`, asks the most loaded workers for the difference,
//!    one lease at a time from whoever holds the most, never taking a worker below `⌊n/k⌋`;
//! 3. if it holds `⌊n/k⌋` and some worker holds more than `⌈n/k⌉`, asks that worker for one.
//!
//! Several leases move in one round when the imbalance is large. No worker asks for a lease
//! that would leave the owner with fewer than it keeps itself, and a lease counts for the
//! worker it is being handed to as soon as it is requested, so two workers never take leases
//! back and forth.
//!
//! # Several streams
//! In a multi-stream table (lease keys `ACCOUNT:STREAM:EPOCH:SHARD`, see
//! [`MultiStreamLeaseKey`](crate::MultiStreamLeaseKey)) the rules above count every lease alike,
//! and the stream decides *which* leases move: among free leases of one reason, this worker
//! takes first from the stream it holds fewest of; from a worker it asks, it asks for a lease
//! of the stream where that worker holds the most more than it does. So each stream's shards
//! spread over the fleet as they are taken, instead of one worker ending up with one stream.
//! How many leases move never depends on the streams, so balancing converges exactly as with
//! one stream; a table of one stream (single-stream keys are one group) is decided exactly as
//! before.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::shuffle_key;
use crate::lease::{Lease, LeaseFence};

/// What this worker has seen of each lease: its counter and when that counter last changed.
#[derive(Debug, Default, Clone)]
pub(crate) struct LeaseObservations {
    seen: HashMap<String, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    counter: u64,
    changed_at: Instant,
}

impl LeaseObservations {
    /// No observations yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records a read of the whole table at `now`. A lease seen for the first time counts as
    /// just changed (its owner gets a full lease duration); leases no longer in the table are
    /// forgotten.
    pub(crate) fn observe(&mut self, leases: &[Lease], now: Instant) {
        let mut next = HashMap::with_capacity(leases.len());
        for lease in leases {
            next.insert(lease.lease_key.clone(), self.seen_now(lease, now));
        }
        self.seen = next;
    }

    /// Records a read of some leases at `now`, keeping what is known of the others.
    pub(crate) fn observe_some(&mut self, leases: &[Lease], now: Instant) {
        for lease in leases {
            let seen = self.seen_now(lease, now);
            self.seen.insert(lease.lease_key.clone(), seen);
        }
    }

    fn seen_now(&self, lease: &Lease, now: Instant) -> Seen {
        match self.seen.get(&lease.lease_key) {
            Some(seen) if seen.counter == lease.counter => *seen,
            _ => Seen {
                counter: lease.counter,
                changed_at: now,
            },
        }
    }

    /// How long the lease's counter has been unchanged as far as this worker has seen, or
    /// `None` if it was never observed with this counter.
    pub(crate) fn unchanged_for(&self, lease: &Lease, now: Instant) -> Option<Duration> {
        self.seen
            .get(&lease.lease_key)
            .filter(|seen| seen.counter == lease.counter)
            .map(|seen| now.saturating_duration_since(seen.changed_at))
    }

    /// When the lease will count as expired if its counter does not change again: the
    /// observed change plus `lease_duration`. `None` if never observed.
    pub(crate) fn expires_at(&self, lease: &Lease, lease_duration: Duration) -> Option<Instant> {
        self.seen
            .get(&lease.lease_key)
            .filter(|seen| seen.counter == lease.counter)
            .map(|seen| seen.changed_at + lease_duration)
    }

    /// True when the lease's counter has not changed for `lease_duration` as far as this
    /// worker has seen. A lease never observed, or observed with another counter, is not
    /// expired.
    pub(crate) fn is_expired(&self, lease: &Lease, now: Instant, lease_duration: Duration) -> bool {
        self.unchanged_for(lease, now)
            .is_some_and(|d| d >= lease_duration)
    }
}

/// Why a lease is taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub(crate) enum TakeReason {
    /// Its owner released it for this worker at the end of a handoff.
    Reserved,
    /// The table names this worker as owner but it does not hold the lease: a take whose
    /// answer was lost. Taken back at once instead of waiting for it to expire.
    Orphaned,
    /// Nobody owns it (new, or released by a worker that shut down or finished).
    Unowned,
    /// Its owner stopped renewing it.
    Expired,
    /// It was reserved for a worker that did not take it within the handoff timeout.
    LapsedReservation,
    /// This worker asked for it and its owner did not hand it over within the handoff
    /// timeout. (Decided by the worker while it watches its requests, not by [`plan`].)
    HandoffTimedOut,
}

impl TakeReason {
    /// The reason as a metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            TakeReason::Reserved => "reserved",
            TakeReason::Orphaned => "orphaned",
            TakeReason::Unowned => "unowned",
            TakeReason::Expired => "expired",
            TakeReason::LapsedReservation => "lapsed_reservation",
            TakeReason::HandoffTimedOut => "handoff_timed_out",
        }
    }
}

/// A lease to take, with the fence the take must match.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub(crate) struct TakeDecision {
    /// The lease.
    pub(crate) lease_key: String,
    /// The owner and counter seen in the table.
    pub(crate) fence: LeaseFence,
    /// Why it is taken.
    pub(crate) reason: TakeReason,
}

/// A lease of a live worker to ask for (see [`LeaseUpdate::RequestHandoff`](crate::LeaseUpdate)).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub(crate) struct HandoffRequest {
    /// The lease.
    pub(crate) lease_key: String,
    /// Its owner and counter as seen in the table.
    pub(crate) fence: LeaseFence,
}

/// The inputs of one taking round.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub(crate) struct TakeInput<'a> {
    /// This worker.
    pub(crate) worker_id: &'a str,
    /// The lease table as just read.
    pub(crate) leases: &'a [Lease],
    /// Leases this worker holds (renews, or still runs a consumer for).
    pub(crate) held: &'a BTreeSet<String>,
    /// Counter observations, already updated with `leases`.
    pub(crate) observations: &'a LeaseObservations,
    /// The time of the read.
    pub(crate) now: Instant,
    /// The lease duration.
    pub(crate) lease_duration: Duration,
    /// How long a reservation for another worker is respected.
    pub(crate) handoff_timeout: Duration,
    /// Most leases this worker may hold.
    pub(crate) max_leases_per_worker: usize,
    /// Most handoffs to ask for in one round.
    pub(crate) max_leases_to_steal: usize,
    /// Take every free lease (up to `max_leases_per_worker`), not only up to the fair share:
    /// what a watcher does, since the other workers read the table too rarely to take their
    /// share of a crashed worker's leases in time; they ask for it later.
    pub(crate) take_every_free: bool,
    /// Orders equally good candidates, so that workers starting together pick different
    /// leases instead of all racing for the same ones. Mixed with `worker_id`.
    pub(crate) seed: u64,
}

/// The decisions of one taking round, and what they were based on.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub(crate) struct TakePlan {
    /// Free leases to take now.
    pub(crate) take: Vec<TakeDecision>,
    /// Leases of live workers to ask for.
    pub(crate) request_handoff: Vec<HandoffRequest>,
    /// Workers counted (this one included).
    pub(crate) workers: usize,
    /// Leases of unfinished shards.
    pub(crate) active_leases: usize,
    /// Leases counted for this worker before this round's decisions.
    pub(crate) counted_for_me: usize,
    /// Leases that no known worker has room for under `max_leases_per_worker`.
    pub(crate) spillover: usize,
    /// Leases counted for each worker (this one included) before this round's decisions.
    pub(crate) worker_loads: BTreeMap<String, usize>,
}

/// Who a lease counts for, or why it is free.
enum Standing<'a> {
    Finished,
    CountsFor(&'a str),
    Free(TakeReason),
}

fn standing<'a>(lease: &'a Lease, input: &TakeInput<'a>) -> Standing<'a> {
    if lease.is_finished() {
        return Standing::Finished;
    }
    let me = input.worker_id;
    // A lease this worker holds, or whose consumer is still winding down, is never free for
    // it: taking it again would start a second consumer of the shard in this worker, its two
    // held leases writing over each other (found by the simulation, seed 12271: a lease
    // taken from a paused worker and released at once was taken back by it while its old
    // consumer was still stopping).
    if input.held.contains(&lease.lease_key) {
        // It counts for this worker, whose consumer still has it, and is never asked for.
        return match free_standing(lease, input) {
            Standing::Free(_) => Standing::CountsFor(me),
            other => other,
        };
    }
    free_standing(lease, input)
}

fn free_standing<'a>(lease: &'a Lease, input: &TakeInput<'a>) -> Standing<'a> {
    let me = input.worker_id;
    let expired = || {
        input
            .observations
            .is_expired(lease, input.now, input.lease_duration)
    };
    match (lease.owner.as_deref(), lease.handoff_to.as_deref()) {
        (Some(owner), _) if owner == me && !input.held.contains(&lease.lease_key) => {
            Standing::Free(TakeReason::Orphaned)
        }
        (Some(owner), _) if owner != me && expired() => Standing::Free(TakeReason::Expired),
        (Some(_), Some(to)) => Standing::CountsFor(to),
        (Some(owner), None) => Standing::CountsFor(owner),
        (None, Some(to)) if to == me => Standing::Free(TakeReason::Reserved),
        (None, Some(to)) => {
            let lapsed = input
                .observations
                .unchanged_for(lease, input.now)
                .is_some_and(|d| d >= input.handoff_timeout);
            if lapsed {
                Standing::Free(TakeReason::LapsedReservation)
            } else {
                Standing::CountsFor(to)
            }
        }
        (None, None) => Standing::Free(TakeReason::Unowned),
    }
}

/// Decides one taking round; see the module documentation for the rules.
pub(crate) fn plan(input: &TakeInput<'_>) -> TakePlan {
    let me = input.worker_id;
    // Mixed with the worker id: workers given one seed (the same `rng_seed` in every
    // process's configuration) must still order candidates differently, or all of them race
    // for the same free leases round after round (the proptest
    // `deciding_at_once_converges_without_oscillating` found 6 workers still unbalanced after
    // 8 rounds that way).
    let seed = shuffle_key(input.seed, me);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::from([(me, 0)]);
    // Leases counted for each worker, per stream.
    let mut per_stream: HashMap<(&str, &str), usize> = HashMap::new();
    let mut free: Vec<(TakeReason, u64, &Lease)> = Vec::new();
    // Leases each other worker owns and could be asked for (no handoff pending).
    let mut requestable: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    let mut active = 0usize;
    for lease in input.leases {
        match standing(lease, input) {
            Standing::Finished => continue,
            Standing::CountsFor(worker) => {
                *counts.entry(worker).or_default() += 1;
                *per_stream
                    .entry((worker, stream_of(&lease.lease_key)))
                    .or_default() += 1;
                if worker != me && lease.handoff_to.is_none() {
                    requestable.entry(worker).or_default().push(lease);
                }
            }
            Standing::Free(reason) => {
                free.push((reason, shuffle_key(seed, &lease.lease_key), lease))
            }
        }
        active += 1;
    }
    let workers = counts.len();
    let floor = active / workers;
    let ceil = active.div_ceil(workers);
    let cap = input.max_leases_per_worker;
    let mine = counts[me];
    let mut plan = TakePlan {
        workers,
        active_leases: active,
        counted_for_me: mine,
        spillover: active.saturating_sub(workers.saturating_mul(cap)),
        worker_loads: counts.iter().map(|(w, c)| ((*w).to_owned(), *c)).collect(),
        ..TakePlan::default()
    };

    // 1. Free leases, best reasons first; what is reserved for or orphaned by this worker is
    //    its own already, the rest only up to the fair share. Within a reason, from the
    //    stream this worker holds fewest of.
    free.sort_by(|a, b| (a.0, a.1, &a.2.lease_key).cmp(&(b.0, b.1, &b.2.lease_key)));
    let had_free = !free.is_empty();
    let mut holding = mine;
    for (reason, leases) in by_reason_and_stream(free) {
        let wanted = |holding: usize| match reason {
            TakeReason::Reserved | TakeReason::Orphaned => holding < cap,
            _ if input.take_every_free => holding < cap,
            _ => holding < ceil.min(cap),
        };
        let mut streams: Vec<(&str, VecDeque<&Lease>)> = leases.into_iter().collect();
        while wanted(holding) {
            // The stream this worker holds fewest of, ties in a per-worker order.
            let Some((stream, queue)) = streams
                .iter_mut()
                .filter(|(_, queue)| !queue.is_empty())
                .min_by_key(|(stream, _)| {
                    let held = per_stream.get(&(me, *stream)).copied().unwrap_or(0);
                    (held, shuffle_key(seed, stream), *stream)
                })
            else {
                break;
            };
            let lease = queue.pop_front().expect("filtered non-empty");
            *per_stream.entry((me, *stream)).or_default() += 1;
            plan.take.push(TakeDecision {
                lease_key: lease.lease_key.clone(),
                fence: lease.fence(),
                reason,
            });
            holding += 1;
        }
    }

    // 2./3. Ask the most loaded workers.
    let (goal, keeps) = if holding < floor.min(cap) {
        (floor.min(cap) - holding, floor)
    } else if holding < ceil.min(cap) && counts.iter().any(|(w, c)| *w != me && *c > ceil) {
        (1, ceil)
    } else {
        (0, ceil)
    };
    let goal = goal.min(input.max_leases_to_steal);
    let mut loads: Vec<(usize, u64, &str)> = counts
        .iter()
        .filter(|(w, _)| **w != me)
        .map(|(w, c)| (*c, shuffle_key(seed, w), *w))
        .collect();
    for lease_list in requestable.values_mut() {
        lease_list.sort_by_key(|l| (shuffle_key(seed, &l.lease_key), l.lease_key.as_str()));
    }
    while plan.request_handoff.len() < goal {
        // The most loaded worker that can give one and stay at or above what it keeps.
        loads.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)));
        let Some(victim) = loads.iter_mut().find(|(count, _, w)| {
            *count > keeps && requestable.get(w).is_some_and(|l| !l.is_empty())
        }) else {
            break;
        };
        victim.0 -= 1;
        let victim_id = victim.2;
        let candidates = requestable.get_mut(victim_id).expect("checked non-empty");
        // The stream where the victim holds the most more than this worker; among equals
        // (always, with one stream) the last in the shuffled order.
        let surplus = |lease: &Lease| {
            let stream = stream_of(&lease.lease_key);
            let theirs = per_stream.get(&(victim_id, stream)).copied().unwrap_or(0);
            let ours = per_stream.get(&(me, stream)).copied().unwrap_or(0);
            theirs as i64 - ours as i64
        };
        let (index, _) = candidates
            .iter()
            .enumerate()
            .max_by_key(|(i, lease)| (surplus(lease), *i))
            .expect("checked non-empty");
        let lease = candidates.remove(index);
        let stream = stream_of(&lease.lease_key);
        if let Some(theirs) = per_stream.get_mut(&(victim_id, stream)) {
            *theirs = theirs.saturating_sub(1);
        }
        *per_stream.entry((me, stream)).or_default() += 1;
        plan.request_handoff.push(HandoffRequest {
            lease_key: lease.lease_key.clone(),
            fence: lease.fence(),
        });
    }

    // 4. A fleet balanced in total but not per stream (from history: a worker holding all of
    //    one stream, another all of another): ask one lease of a stream where a worker with
    //    as many leases as this one, or one more, holds at least two more of it. The victim
    //    then has one fewer than this worker at most, and asks back (rule 2 or 3) from the
    //    stream where this worker holds the most more, which is another stream: each such
    //    exchange narrows the skew by two and creates none. With one stream, a skew of two
    //    is a total imbalance of two, which the rules above handle: single-stream tables are
    //    never decided by this rule.
    if plan.take.is_empty()
        && plan.request_handoff.is_empty()
        && !had_free
        && input.max_leases_to_steal > 0
        && holding < cap
    {
        let skew = |victim: &str, lease: &Lease| {
            let stream = stream_of(&lease.lease_key);
            let theirs = per_stream.get(&(victim, stream)).copied().unwrap_or(0);
            let ours = per_stream.get(&(me, stream)).copied().unwrap_or(0);
            theirs as i64 - ours as i64
        };
        let best = requestable
            .iter()
            .filter(|(victim, _)| (mine..=mine + 1).contains(&counts[**victim]))
            .flat_map(|(victim, leases)| leases.iter().map(move |lease| (*victim, *lease)))
            .filter(|(victim, lease)| skew(victim, lease) >= 2)
            .max_by_key(|(victim, lease)| {
                (
                    skew(victim, lease),
                    shuffle_key(seed, &lease.lease_key),
                    lease.lease_key.as_str(),
                )
            });
        if let Some((_, lease)) = best {
            plan.request_handoff.push(HandoffRequest {
                lease_key: lease.lease_key.clone(),
                fence: lease.fence(),
            });
        }
    }
    plan
}

/// The stream of a lease, to spread each stream's leases: the multi-stream key without its
/// shard id (`ACCOUNT:STREAM:EPOCH`). A single-stream key (a shard id, no `:`) is in the one
/// group `""`.
fn stream_of(lease_key: &str) -> &str {
    lease_key.rsplit_once(':').map_or("", |(stream, _)| stream)
}

/// Free leases (sorted by reason, then shuffled order) grouped by reason, and within a reason
/// by stream, each stream's leases in that order.
fn by_reason_and_stream(
    free: Vec<(TakeReason, u64, &Lease)>,
) -> Vec<(TakeReason, BTreeMap<&str, VecDeque<&Lease>>)> {
    let mut groups: Vec<(TakeReason, BTreeMap<&str, VecDeque<&Lease>>)> = Vec::new();
    for (reason, _, lease) in free {
        if groups.last().is_none_or(|(last, _)| *last != reason) {
            groups.push((reason, BTreeMap::new()));
        }
        let (_, streams) = groups.last_mut().expect("pushed above");
        streams
            .entry(stream_of(&lease.lease_key))
            .or_default()
            .push_back(lease);
    }
    groups
}

#[cfg(test)]
mod tests;
