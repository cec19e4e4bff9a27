//! Which leases to take: a pure function of the lease table, this worker's observations and
//! the time, so it can be property-tested without a store or a clock.
//!
//! Expiry is decided by observation, never by comparing clocks across machines: a lease is
//! expired when this worker has seen its counter unchanged for the lease duration, measured on
//! its own monotonic clock ([`LeaseObservations`]).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::lease::{Lease, LeaseFence};

/// What this worker has seen of each lease: its counter and when that counter last changed.
#[derive(Debug, Default, Clone)]
pub struct LeaseObservations {
    seen: HashMap<String, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    counter: u64,
    changed_at: Instant,
}

impl LeaseObservations {
    /// No observations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a read of the whole table at `now`. A lease seen for the first time counts as
    /// just changed (its owner gets a full lease duration); leases no longer in the table are
    /// forgotten.
    pub fn observe(&mut self, leases: &[Lease], now: Instant) {
        let mut next = HashMap::with_capacity(leases.len());
        for lease in leases {
            let seen = match self.seen.get(&lease.lease_key) {
                Some(seen) if seen.counter == lease.counter => *seen,
                _ => Seen {
                    counter: lease.counter,
                    changed_at: now,
                },
            };
            next.insert(lease.lease_key.clone(), seen);
        }
        self.seen = next;
    }

    /// True when the lease's counter has not changed for `lease_duration` as far as this
    /// worker has seen. A lease never observed, or observed with another counter, is not
    /// expired.
    pub fn is_expired(&self, lease: &Lease, now: Instant, lease_duration: Duration) -> bool {
        self.seen.get(&lease.lease_key).is_some_and(|seen| {
            seen.counter == lease.counter
                && now.saturating_duration_since(seen.changed_at) >= lease_duration
        })
    }
}

/// Why a lease is taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TakeReason {
    /// Nobody owns it (new, or released by a worker that shut down or finished).
    Unowned,
    /// The table names this worker as owner but it does not hold the lease: a take whose
    /// answer was lost. Taken back at once instead of waiting for it to expire.
    Orphaned,
    /// Its owner stopped renewing it.
    Expired,
}

/// A lease to take, with the fence the take must match.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct TakeDecision {
    /// The lease.
    pub lease_key: String,
    /// The owner and counter seen in the table.
    pub fence: LeaseFence,
    /// Why it is taken.
    pub reason: TakeReason,
}

/// The inputs of one taking round.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TakeInput<'a> {
    /// This worker.
    pub worker_id: &'a str,
    /// The lease table as just read.
    pub leases: &'a [Lease],
    /// Leases this worker holds (and renews).
    pub held: &'a BTreeSet<String>,
    /// Counter observations, already updated with `leases`.
    pub observations: &'a LeaseObservations,
    /// The time of the read.
    pub now: Instant,
    /// The lease duration.
    pub lease_duration: Duration,
    /// Most leases this worker may hold.
    pub max_leases_per_worker: usize,
    /// Orders equally good candidates, so that workers starting together pick different
    /// leases instead of all racing for the same ones.
    pub seed: u64,
}

/// Decides which leases to take: every unowned, orphaned or expired lease of an unfinished
/// shard, in that order of preference, up to `max_leases_per_worker` held in all.
pub fn leases_to_take(input: &TakeInput<'_>) -> Vec<TakeDecision> {
    let room = input.max_leases_per_worker.saturating_sub(input.held.len());
    let mut candidates: Vec<(TakeReason, u64, &Lease)> = input
        .leases
        .iter()
        .filter(|lease| !lease.is_finished() && !input.held.contains(&lease.lease_key))
        .filter_map(|lease| {
            let reason = match lease.owner.as_deref() {
                None => TakeReason::Unowned,
                Some(owner) if owner == input.worker_id => TakeReason::Orphaned,
                Some(_)
                    if input
                        .observations
                        .is_expired(lease, input.now, input.lease_duration) =>
                {
                    TakeReason::Expired
                }
                Some(_) => return None,
            };
            Some((reason, shuffle_key(input.seed, &lease.lease_key), lease))
        })
        .collect();
    candidates.sort_by(|a, b| (a.0, a.1, &a.2.lease_key).cmp(&(b.0, b.1, &b.2.lease_key)));
    candidates
        .into_iter()
        .take(room)
        .map(|(reason, _, lease)| TakeDecision {
            lease_key: lease.lease_key.clone(),
            fence: lease.fence(),
            reason,
        })
        .collect()
}

/// A per-seed pseudo-random position of a lease key (FNV-1a, then a splitmix64 finaliser).
fn shuffle_key(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::sequence::Checkpoint;

    const DURATION: Duration = Duration::from_secs(10);

    fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
        let mut lease = Lease::new(key, Checkpoint::TrimHorizon);
        lease.owner = owner.map(str::to_owned);
        lease.counter = counter;
        lease
    }

    fn take(
        me: &str,
        leases: &[Lease],
        held: &BTreeSet<String>,
        observations: &LeaseObservations,
        now: Instant,
        max: usize,
    ) -> Vec<TakeDecision> {
        leases_to_take(&TakeInput {
            worker_id: me,
            leases,
            held,
            observations,
            now,
            lease_duration: DURATION,
            max_leases_per_worker: max,
            seed: 42,
        })
    }

    #[test]
    fn expiry_needs_an_unchanged_counter_for_the_lease_duration() {
        let t0 = Instant::now();
        let mut obs = LeaseObservations::new();
        let l = lease("a", Some("w2"), 5);
        obs.observe(std::slice::from_ref(&l), t0);
        assert!(!obs.is_expired(&l, t0 + DURATION - Duration::from_millis(1), DURATION));
        assert!(obs.is_expired(&l, t0 + DURATION, DURATION));

        // A renewal seen at t0+8s restarts the count.
        let renewed = lease("a", Some("w2"), 6);
        obs.observe(std::slice::from_ref(&renewed), t0 + Duration::from_secs(8));
        assert!(!obs.is_expired(&renewed, t0 + Duration::from_secs(17), DURATION));
        assert!(obs.is_expired(&renewed, t0 + Duration::from_secs(18), DURATION));
    }

    #[test]
    fn a_lease_seen_once_is_fresh_and_a_forgotten_one_is_not_expired() {
        let t0 = Instant::now();
        let mut obs = LeaseObservations::new();
        let l = lease("a", Some("w2"), 5);
        assert!(!obs.is_expired(&l, t0, DURATION), "never observed");
        obs.observe(std::slice::from_ref(&l), t0 + Duration::from_secs(100));
        assert!(!obs.is_expired(&l, t0 + Duration::from_secs(105), DURATION));
        obs.observe(&[], t0 + Duration::from_secs(106));
        assert!(!obs.is_expired(&l, t0 + Duration::from_secs(200), DURATION));
    }

    #[test]
    fn takes_unowned_orphaned_and_expired_but_not_live_or_finished() {
        let t0 = Instant::now();
        let mut finished = lease("done", None, 3);
        finished.checkpoint = Checkpoint::ShardEnd;
        let leases = vec![
            lease("free", None, 0),
            lease("mine-lost-answer", Some("me"), 2),
            lease("dead", Some("w2"), 7),
            lease("alive", Some("w3"), 9),
            lease("held", Some("me"), 4),
            finished,
        ];
        let mut obs = LeaseObservations::new();
        obs.observe(&leases, t0);
        let mut alive = leases.clone();
        alive[3].counter += 1;
        obs.observe(&alive, t0 + Duration::from_secs(6));
        let held = BTreeSet::from(["held".to_owned()]);
        let got = take("me", &alive, &held, &obs, t0 + DURATION, usize::MAX);
        let got: Vec<_> = got
            .iter()
            .map(|d| (d.lease_key.as_str(), d.reason))
            .collect();
        assert_eq!(
            got,
            vec![
                ("free", TakeReason::Unowned),
                ("mine-lost-answer", TakeReason::Orphaned),
                ("dead", TakeReason::Expired),
            ]
        );
    }

    #[test]
    fn respects_the_lease_limit_preferring_unowned() {
        let t0 = Instant::now();
        let leases = vec![lease("x", Some("dead"), 1), lease("y", None, 0)];
        let mut obs = LeaseObservations::new();
        obs.observe(&leases, t0);
        let held = BTreeSet::from(["h".to_owned()]);
        let got = take("me", &leases, &held, &obs, t0 + DURATION, 2);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].lease_key, "y");
        assert!(take("me", &leases, &held, &obs, t0 + DURATION, 1).is_empty());
    }

    fn arb_table() -> impl Strategy<Value = (Vec<Lease>, Vec<bool>, Vec<u64>)> {
        // Owners: none, me, or one of three others; some leases finished; counter advances.
        let one = (0usize..5, any::<bool>(), 0u64..3, any::<bool>());
        proptest::collection::vec(one, 0..30).prop_map(|rows| {
            let mut leases = Vec::new();
            let mut held = Vec::new();
            let mut bumps = Vec::new();
            for (i, (owner, finished, bump, is_held)) in rows.into_iter().enumerate() {
                let owner = match owner {
                    0 => None,
                    1 => Some("me"),
                    n => Some(["w1", "w2", "w3"][n - 2]),
                };
                let mut l = lease(&format!("shardId-{i:012}"), owner, 10);
                if finished {
                    l.checkpoint = Checkpoint::ShardEnd;
                }
                held.push(is_held && owner == Some("me"));
                leases.push(l);
                bumps.push(bump);
            }
            (leases, held, bumps)
        })
    }

    proptest! {
        #[test]
        fn decisions_are_safe_and_complete(
            (leases, held_flags, bumps) in arb_table(),
            elapsed_ms in 0u64..20_000,
            max in 1usize..40,
        ) {
            let t0 = Instant::now();
            let now = t0 + Duration::from_millis(elapsed_ms);
            let mut obs = LeaseObservations::new();
            obs.observe(&leases, t0);
            // Leases whose counter was bumped were renewed just now.
            let later: Vec<Lease> = leases.iter().zip(&bumps).map(|(l, b)| {
                let mut l = l.clone();
                l.counter += b;
                l
            }).collect();
            obs.observe(&later, now);
            let held: BTreeSet<String> = later.iter().zip(&held_flags)
                .filter(|(_, h)| **h).map(|(l, _)| l.lease_key.clone()).collect();
            let got = take("me", &later, &held, &obs, now, max);

            let by_key: HashMap<&str, &Lease> = later.iter().map(|l| (l.lease_key.as_str(), l)).collect();
            let mut seen = BTreeSet::new();
            for d in &got {
                prop_assert!(seen.insert(d.lease_key.clone()), "taken twice");
                let l = by_key[d.lease_key.as_str()];
                prop_assert!(!l.is_finished());
                prop_assert!(!held.contains(&d.lease_key));
                prop_assert_eq!(&d.fence, &l.fence());
                if let Some(owner) = &l.owner {
                    if owner != "me" {
                        prop_assert!(obs.is_expired(l, now, DURATION), "took a live lease");
                    }
                }
            }
            prop_assert!(held.len() + got.len() <= max.max(held.len()));
            // Complete: everything takeable is taken unless the limit was reached.
            let takeable = later.iter().filter(|l| !l.is_finished() && !held.contains(&l.lease_key)
                && match l.owner.as_deref() {
                    None | Some("me") => true,
                    Some(_) => obs.is_expired(l, now, DURATION),
                }).count();
            prop_assert_eq!(got.len(), takeable.min(max.saturating_sub(held.len())));
        }
    }
}
