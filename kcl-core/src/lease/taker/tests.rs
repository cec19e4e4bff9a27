use proptest::prelude::*;

use super::*;
use crate::lease::LeaseUpdate;
use crate::sequence::Checkpoint;

const DURATION: Duration = Duration::from_secs(10);
const HANDOFF: Duration = Duration::from_secs(10);

fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
    let mut lease = Lease::new(key, Checkpoint::TrimHorizon);
    lease.owner = owner.map(str::to_owned);
    lease.counter = counter;
    lease
}

fn input<'a>(
    me: &'a str,
    leases: &'a [Lease],
    held: &'a BTreeSet<String>,
    observations: &'a LeaseObservations,
    now: Instant,
) -> TakeInput<'a> {
    TakeInput {
        worker_id: me,
        leases,
        held,
        observations,
        now,
        lease_duration: DURATION,
        handoff_timeout: HANDOFF,
        max_leases_per_worker: usize::MAX,
        max_leases_to_steal: usize::MAX,
        take_every_free: false,
        seed: 42,
    }
}

fn held_by(me: &str, leases: &[Lease]) -> BTreeSet<String> {
    leases
        .iter()
        .filter(|l| l.owner.as_deref() == Some(me))
        .map(|l| l.lease_key.clone())
        .collect()
}

fn taken(plan: &TakePlan) -> Vec<(&str, TakeReason)> {
    plan.take
        .iter()
        .map(|d| (d.lease_key.as_str(), d.reason))
        .collect()
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
fn a_handoff_request_does_not_look_like_a_renewal() {
    let t0 = Instant::now();
    let mut obs = LeaseObservations::new();
    let dead = lease("a", Some("dead"), 5);
    obs.observe(std::slice::from_ref(&dead), t0);
    let requested = LeaseUpdate::RequestHandoff { to: "w2".into() }.apply(&dead);
    obs.observe(
        std::slice::from_ref(&requested),
        t0 + Duration::from_secs(5),
    );
    assert!(obs.is_expired(&requested, t0 + DURATION, DURATION));
}

#[test]
fn takes_free_leases_but_not_live_or_finished_ones() {
    let t0 = Instant::now();
    let mut finished = lease("done", None, 3);
    finished.checkpoint = Checkpoint::ShardEnd;
    let leases = vec![
        lease("free", None, 0),
        lease("mine-lost-answer", Some("me"), 2),
        lease("dead", Some("w2"), 7),
        lease("alive-1", Some("w3"), 9),
        lease("alive-2", Some("w3"), 9),
        lease("alive-3", Some("w3"), 9),
        lease("held", Some("me"), 4),
        finished,
    ];
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let mut alive = leases.clone();
    for l in &mut alive[3..6] {
        l.counter += 1;
    }
    obs.observe(&alive, t0 + Duration::from_secs(6));
    let held = BTreeSet::from(["held".to_owned()]);
    let plan = plan(&input("me", &alive, &held, &obs, t0 + DURATION));
    assert_eq!(
        taken(&plan),
        vec![
            ("mine-lost-answer", TakeReason::Orphaned),
            ("free", TakeReason::Unowned),
            ("dead", TakeReason::Expired),
        ]
    );
    // 7 active leases, 2 live workers (w2 is dead): me ends with 4, w3 has 3.
    assert!(plan.request_handoff.is_empty());
    assert_eq!((plan.workers, plan.active_leases), (2, 7));
}

#[test]
fn free_leases_are_taken_only_up_to_the_fair_share() {
    let t0 = Instant::now();
    let mut leases: Vec<Lease> = (0..6).map(|i| lease(&format!("u{i}"), None, 0)).collect();
    leases.extend((0..2).map(|i| lease(&format!("w2-{i}"), Some("w2"), 1)));
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let held = BTreeSet::new();
    // 8 leases, 2 workers: 4 each; w2 has 2, so 2 unowned stay for w2.
    let plan = plan(&input("me", &leases, &held, &obs, t0));
    assert_eq!(plan.take.len(), 4);
    assert!(plan.request_handoff.is_empty());
}

// A watcher takes every free lease, expired ones included, up to its limit: the members read
// the table too rarely to take their share in time, and ask for it later.
#[test]
fn a_watcher_takes_every_free_lease_up_to_its_limit() {
    let t0 = Instant::now();
    let mut leases: Vec<Lease> = (0..4).map(|i| lease(&format!("u{i}"), None, 0)).collect();
    leases.extend((0..4).map(|i| lease(&format!("dead-{i}"), Some("dead"), 1)));
    leases.extend((0..2).map(|i| lease(&format!("w2-{i}"), Some("w2"), 1)));
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    // w2 renews; the dead worker does not.
    let later = t0 + DURATION;
    for l in leases
        .iter_mut()
        .filter(|l| l.owner.as_deref() == Some("w2"))
    {
        l.counter += 3;
    }
    obs.observe(&leases, later);
    let held = BTreeSet::new();
    let mut watcher = input("me", &leases, &held, &obs, later);
    watcher.take_every_free = true;
    let took = taken(&plan(&watcher)).len();
    assert_eq!(
        took, 8,
        "all 4 unowned and all 4 expired, beyond the share of 5"
    );
    watcher.max_leases_per_worker = 6;
    assert_eq!(taken(&plan(&watcher)).len(), 6, "but never past its limit");
    let member = input("me", &leases, &held, &obs, later);
    assert_eq!(taken(&plan(&member)).len(), 5, "a member takes its share");
}

#[test]
fn a_new_worker_asks_for_its_whole_share_in_one_round() {
    let t0 = Instant::now();
    let leases: Vec<Lease> = (0..12)
        .map(|i| lease(&format!("s{i:02}"), Some("old"), 3))
        .collect();
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let held = BTreeSet::new();
    let plan = plan(&input("new", &leases, &held, &obs, t0));
    assert!(plan.take.is_empty());
    assert_eq!(plan.request_handoff.len(), 6);
    assert!(
        plan.request_handoff
            .iter()
            .all(|r| r.fence.owner.as_deref() == Some("old"))
    );
    let mut limited = input("new", &leases, &held, &obs, t0);
    limited.max_leases_to_steal = 2;
    assert_eq!(super::plan(&limited).request_handoff.len(), 2);
}

#[test]
fn asks_the_most_loaded_and_never_below_the_floor() {
    let t0 = Instant::now();
    // 10 leases over a:5, b:3, c:2, me:0 → 4 workers, floor 2, ceil 3.
    let mut leases = Vec::new();
    for (owner, n) in [("a", 5), ("b", 3), ("c", 2)] {
        for i in 0..n {
            leases.push(lease(&format!("{owner}{i}"), Some(owner), 1));
        }
    }
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let held = BTreeSet::new();
    let plan = plan(&input("me", &leases, &held, &obs, t0));
    let from: Vec<&str> = plan
        .request_handoff
        .iter()
        .map(|r| r.fence.owner.as_deref().unwrap())
        .collect();
    // a (5) gives until it is no longer the most loaded: a→4, a→3 (tie with b broken by seed)…
    assert_eq!(from.len(), 2, "{from:?}");
    assert!(
        from.iter().all(|w| *w == "a" || *w == "b"),
        "c is at the floor: {from:?}"
    );
}

#[test]
fn a_worker_at_the_floor_asks_only_a_worker_above_the_ceiling() {
    let t0 = Instant::now();
    // me:2, a:3, b:3 → 8 leases, 3 workers: floor 2, ceil 3: balanced.
    let mut leases = Vec::new();
    for (owner, n) in [("me", 2), ("a", 3), ("b", 3)] {
        for i in 0..n {
            leases.push(lease(&format!("{owner}{i}"), Some(owner), 1));
        }
    }
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let held = held_by("me", &leases);
    let balanced = plan(&input("me", &leases, &held, &obs, t0));
    assert!(balanced.take.is_empty() && balanced.request_handoff.is_empty());
    assert_eq!(
        (
            balanced.workers,
            balanced.active_leases,
            balanced.counted_for_me
        ),
        (3, 8, 2)
    );
    assert_eq!(balanced.worker_loads["a"], 3);
    // a:4, b:2 → a is above the ceiling: me (at the floor) asks a for one.
    leases[7].owner = Some("a".into());
    let plan = plan(&input("me", &leases, &held, &obs, t0));
    assert_eq!(plan.request_handoff.len(), 1);
    assert_eq!(plan.request_handoff[0].fence.owner.as_deref(), Some("a"));
}

#[test]
fn pending_handoffs_count_for_their_target() {
    let t0 = Instant::now();
    let mut leases: Vec<Lease> = (0..6)
        .map(|i| lease(&format!("s{i}"), Some("old"), 3))
        .collect();
    for l in leases.iter_mut().take(3) {
        l.handoff_to = Some("new".into());
    }
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let none = BTreeSet::new();
    // The requester does not ask again, the owner does not ask back.
    let new = plan(&input("new", &leases, &none, &obs, t0));
    assert!(new.request_handoff.is_empty() && new.take.is_empty());
    assert_eq!(new.counted_for_me, 3);
    let old_held = held_by("old", &leases);
    let old = plan(&input("old", &leases, &old_held, &obs, t0));
    assert!(old.request_handoff.is_empty() && old.take.is_empty());
    assert_eq!(old.counted_for_me, 3);
}

#[test]
fn a_reservation_is_taken_by_its_worker_and_respected_by_others_until_it_lapses() {
    let t0 = Instant::now();
    let mut reserved = lease("r", None, 4);
    reserved.handoff_to = Some("w2".into());
    let leases = vec![reserved, lease("x", Some("w3"), 1)];
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let none = BTreeSet::new();
    assert_eq!(
        taken(&plan(&input("w2", &leases, &none, &obs, t0))),
        vec![("r", TakeReason::Reserved)]
    );
    let w3 = BTreeSet::from(["x".to_owned()]);
    assert!(
        plan(&input("w3", &leases, &w3, &obs, t0 + HANDOFF / 2))
            .take
            .is_empty()
    );
    // w3 keeps renewing x; r has sat untouched for the handoff timeout.
    let mut renewed = leases.clone();
    renewed[1].counter += 1;
    obs.observe(&renewed, t0 + HANDOFF - Duration::from_secs(1));
    assert_eq!(
        taken(&plan(&input("me", &renewed, &none, &obs, t0 + HANDOFF))),
        vec![("r", TakeReason::LapsedReservation)]
    );
}

#[test]
fn the_lease_limit_caps_taking_and_reports_spillover() {
    let t0 = Instant::now();
    let leases: Vec<Lease> = (0..5).map(|i| lease(&format!("u{i}"), None, 0)).collect();
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let none = BTreeSet::new();
    let mut capped = input("me", &leases, &none, &obs, t0);
    capped.max_leases_per_worker = 2;
    let plan = plan(&capped);
    assert_eq!(plan.take.len(), 2);
    assert_eq!(plan.spillover, 3);
}

// ---- Properties ------------------------------------------------------------------------

fn arb_table() -> impl Strategy<Value = (Vec<Lease>, Vec<bool>, Vec<u64>)> {
    // Owners: none, me, or one of three others; some leases finished, some with a pending
    // handoff; counters advance for some.
    let one = (0usize..5, any::<bool>(), 0u64..3, any::<bool>(), 0usize..6);
    proptest::collection::vec(one, 0..30).prop_map(|rows| {
        let names = ["me", "w1", "w2", "w3"];
        let mut leases = Vec::new();
        let mut held = Vec::new();
        let mut bumps = Vec::new();
        for (i, (owner, finished, bump, is_held, handoff)) in rows.into_iter().enumerate() {
            let owner = owner.checked_sub(1).map(|n| names[n]);
            let mut l = lease(&format!("shardId-{i:012}"), owner, 10);
            if finished {
                l.checkpoint = Checkpoint::ShardEnd;
            }
            l.handoff_to = names.get(handoff).map(|w| (*w).to_owned());
            // Mostly our own leases; now and then a lease whose consumer is still winding
            // down after the lease went elsewhere (released, taken, expired).
            held.push(is_held && (owner == Some("me") || i % 3 == 0));
            leases.push(l);
            bumps.push(bump);
        }
        (leases, held, bumps)
    })
}

proptest! {
    #[test]
    fn decisions_are_safe(
        (leases, held_flags, bumps) in arb_table(),
        elapsed_ms in 0u64..25_000,
        max in 1usize..40,
        steal in 0usize..10,
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
        let mut inp = input("me", &later, &held, &obs, now);
        inp.max_leases_per_worker = max;
        inp.max_leases_to_steal = steal;
        let plan = plan(&inp);

        let by_key: HashMap<&str, &Lease> = later.iter().map(|l| (l.lease_key.as_str(), l)).collect();
        let mut seen = BTreeSet::new();
        for d in &plan.take {
            prop_assert!(seen.insert(d.lease_key.clone()), "decided twice");
            let l = by_key[d.lease_key.as_str()];
            prop_assert!(!l.is_finished());
            prop_assert!(!held.contains(&d.lease_key));
            prop_assert_eq!(&d.fence, &l.fence());
            match l.owner.as_deref() {
                Some("me") | None => {}
                Some(_) => prop_assert!(obs.is_expired(l, now, DURATION), "took a live lease"),
            }
            if l.owner.is_none()
                && let Some(to) = l.handoff_to.as_deref() {
                    prop_assert!(to == "me" || obs.unchanged_for(l, now).unwrap() >= HANDOFF,
                        "took a lease reserved for another worker");
                }
        }
        prop_assert!(plan.request_handoff.len() <= steal);
        for r in &plan.request_handoff {
            prop_assert!(seen.insert(r.lease_key.clone()), "decided twice");
            let l = by_key[r.lease_key.as_str()];
            prop_assert!(!l.is_finished() && l.handoff_to.is_none());
            let owner = l.owner.as_deref().unwrap();
            prop_assert!(owner != "me" && !obs.is_expired(l, now, DURATION));
            prop_assert_eq!(&r.fence, &l.fence());
        }
        let after = plan.counted_for_me + plan.take.len() + plan.request_handoff.len();
        prop_assert!(after <= max.max(plan.counted_for_me), "over the limit: {after} > {max}");
        prop_assert!(after <= plan.active_leases.div_ceil(plan.workers).max(plan.counted_for_me)
            || plan.take.iter().any(|d| matches!(d.reason, TakeReason::Reserved | TakeReason::Orphaned)),
            "more than the fair share");
    }
}

/// A fleet of live workers sharing one table, run round by round.
#[derive(Debug, Clone)]
struct Fleet {
    table: BTreeMap<String, Lease>,
    workers: Vec<String>,
}

impl Fleet {
    fn new(owners: &[Option<usize>], workers: usize) -> Self {
        Fleet::of_streams(owners, workers, 0)
    }

    /// A fleet whose leases belong to `streams` streams in turn (multi-stream keys), or to
    /// one stream with single-stream keys when `streams` is 0.
    fn of_streams(owners: &[Option<usize>], workers: usize, streams: usize) -> Self {
        let workers: Vec<String> = (0..workers).map(|i| format!("w{i}")).collect();
        let table = owners
            .iter()
            .enumerate()
            .map(|(i, owner)| {
                let key = match streams {
                    0 => format!("shardId-{i:012}"),
                    n => multi_stream_key(i % n, i),
                };
                let owner = owner.map(|o| workers[o % workers.len()].as_str());
                (key.clone(), lease(&key, owner, 1))
            })
            .collect();
        Fleet { table, workers }
    }

    fn leases(&self) -> Vec<Lease> {
        self.table.values().cloned().collect()
    }

    /// What `worker` does at its turn: hand over what it was asked for (release keeping the
    /// reservation), then plan against `snapshot`. Returns its decisions.
    fn turn(&mut self, worker: &str, snapshot: &[Lease], seed: u64) -> TakePlan {
        for lease in self.table.values_mut() {
            if lease.owner.as_deref() == Some(worker) && lease.handoff_to.is_some() {
                *lease = LeaseUpdate::Release.apply(lease);
            }
        }
        let held = held_by(worker, snapshot);
        // Everyone renews: nothing is expired, nothing lapses.
        let mut obs = LeaseObservations::new();
        let now = Instant::now();
        obs.observe(snapshot, now);
        let mut inp = input(worker, snapshot, &held, &obs, now);
        inp.seed = seed;
        plan(&inp)
    }

    /// Applies decisions as the store would: conditionally on the fence.
    fn apply(&mut self, worker: &str, plan: &TakePlan) -> usize {
        let mut applied = 0;
        for d in &plan.take {
            let stored = self.table.get_mut(&d.lease_key).unwrap();
            if stored.fence() == d.fence {
                *stored = LeaseUpdate::Take {
                    new_owner: worker.to_owned(),
                }
                .apply(stored);
                applied += 1;
            }
        }
        for r in &plan.request_handoff {
            let stored = self.table.get_mut(&r.lease_key).unwrap();
            let update = LeaseUpdate::RequestHandoff {
                to: worker.to_owned(),
            };
            if stored.fence() == r.fence && update.allowed(stored) {
                *stored = update.apply(stored);
                applied += 1;
            }
        }
        applied
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> =
            self.workers.iter().map(|w| (w.clone(), 0)).collect();
        for l in self.table.values() {
            if let Some(o) = &l.owner {
                *counts.get_mut(o).unwrap() += 1;
            }
        }
        counts
    }

    /// Workers take turns, each seeing the table as the previous one left it, until the fleet
    /// is balanced; fails after `max_rounds` rounds.
    fn take_turns_until_balanced(
        &mut self,
        seed: u64,
        max_rounds: u64,
    ) -> Result<(), TestCaseError> {
        let mut rounds = 0u64;
        while !self.balanced() {
            rounds += 1;
            prop_assert!(
                rounds <= max_rounds,
                "not balanced after {max_rounds} rounds: {:?}",
                self.counts()
            );
            for w in self.workers.clone() {
                let snapshot = self.leases();
                let plan = self.turn(&w, &snapshot, seed ^ rounds);
                self.apply(&w, &plan);
            }
        }
        Ok(())
    }

    /// All workers decide on the same snapshot, then their writes race (first one wins),
    /// until the fleet is balanced; fails after `max_rounds` rounds. Returns the writes that
    /// took effect.
    fn decide_at_once_until_balanced(
        &mut self,
        seed: u64,
        max_rounds: u64,
    ) -> Result<usize, TestCaseError> {
        let mut rounds = 0u64;
        let mut moves = 0usize;
        while !self.balanced() {
            rounds += 1;
            prop_assert!(
                rounds <= max_rounds,
                "not balanced after {max_rounds} rounds: {:?}",
                self.counts()
            );
            let snapshot = self.leases();
            let mut plans = Vec::new();
            for w in self.workers.clone() {
                plans.push((w.clone(), self.turn(&w, &snapshot, seed ^ rounds)));
            }
            let order = (seed ^ rounds) as usize % plans.len();
            plans.rotate_left(order);
            for (w, plan) in &plans {
                moves += self.apply(w, plan);
            }
        }
        Ok(moves)
    }

    /// Workers take turns until nobody takes or asks for anything, each turn followed by the
    /// handoffs asked; fails after `max_rounds` rounds.
    fn spread_streams(&mut self, seed: u64, max_rounds: u64) -> Result<(), TestCaseError> {
        for round in 0..max_rounds {
            let mut moved = false;
            for w in self.workers.clone() {
                let snapshot = self.leases();
                let plan = self.turn(&w, &snapshot, seed ^ round);
                moved |= !plan.take.is_empty() || !plan.request_handoff.is_empty();
                self.apply(&w, &plan);
            }
            // The handoffs asked in the last turn: their owners release, the askers take.
            for w in self.workers.clone() {
                let snapshot = self.leases();
                let plan = self.turn(&w, &snapshot, seed ^ round);
                moved |= !plan.take.is_empty() || !plan.request_handoff.is_empty();
                self.apply(&w, &plan);
            }
            if !moved && self.balanced() {
                return Ok(());
            }
        }
        prop_assert!(
            false,
            "still moving after {max_rounds} rounds: {:?}",
            self.per_stream()
        );
        Ok(())
    }

    /// Stable: nobody takes or asks for anything any more.
    fn still(&mut self, seed: u64) -> Result<(), TestCaseError> {
        for w in self.workers.clone() {
            let snapshot = self.leases();
            let plan = self.turn(&w, &snapshot, seed);
            prop_assert!(
                plan.take.is_empty() && plan.request_handoff.is_empty(),
                "{w} still moves leases in a balanced fleet: {plan:?}"
            );
        }
        Ok(())
    }

    /// Leases owned per (worker, stream).
    fn per_stream(&self) -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        for l in self.table.values() {
            if let Some(o) = &l.owner {
                *counts
                    .entry((o.clone(), stream_of(&l.lease_key).to_owned()))
                    .or_default() += 1;
            }
        }
        counts
    }

    fn balanced(&self) -> bool {
        let n = self.table.len();
        let k = self.workers.len();
        let settled = self
            .table
            .values()
            .all(|l| l.owner.is_some() && l.handoff_to.is_none());
        settled
            && self
                .counts()
                .values()
                .all(|c| (n / k..=n.div_ceil(k)).contains(c))
    }
}

fn multi_stream_key(stream: usize, shard: usize) -> String {
    format!("123456789012:stream-{stream}:1700000000:shardId-{shard:012}")
}

fn arb_fleet() -> impl Strategy<Value = (Vec<Option<usize>>, usize, u64)> {
    (1usize..7).prop_flat_map(|workers| {
        (
            proptest::collection::vec(proptest::option::weighted(0.8, 0..workers), 0..40),
            Just(workers),
            any::<u64>(),
        )
    })
}

proptest! {
    /// Workers take turns, each seeing the table as the previous one left it.
    #[test]
    fn taking_turns_converges_to_a_balanced_fleet_and_stays_there((owners, workers, seed) in arb_fleet()) {
        let mut fleet = Fleet::new(&owners, workers);
        fleet.take_turns_until_balanced(seed, 4)?;
        fleet.still(seed)?;
    }

    /// All workers decide on the same snapshot, then their writes race (first one wins). A
    /// single-stream table then stays still: the per-stream rule never moves its leases.
    #[test]
    fn deciding_at_once_converges_without_oscillating((owners, workers, seed) in arb_fleet()) {
        let mut fleet = Fleet::new(&owners, workers);
        let moves = fleet.decide_at_once_until_balanced(seed, 8)?;
        let n = owners.len();
        prop_assert!(moves <= 3 * n + workers, "{moves} moves for {n} leases");
        fleet.still(seed)?;
    }
}

#[test]
fn free_leases_of_several_streams_are_taken_evenly_from_each() {
    let t0 = Instant::now();
    let mut leases: Vec<Lease> = (0..12)
        .map(|i| lease(&multi_stream_key(i % 3, i), None, 0))
        .collect();
    leases.extend((12..16).map(|i| lease(&multi_stream_key(3, i), Some("w2"), 1)));
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let held = BTreeSet::new();
    // 16 leases, 2 workers: 8 each, taken from the three free streams as evenly as can be.
    let plan = plan(&input("me", &leases, &held, &obs, t0));
    assert_eq!(plan.take.len(), 8);
    let mut per_stream: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &plan.take {
        *per_stream.entry(stream_of(&d.lease_key)).or_default() += 1;
    }
    let counts: Vec<usize> = per_stream.values().copied().collect();
    assert_eq!(per_stream.len(), 3, "{per_stream:?}");
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{per_stream:?}"
    );
}

#[test]
fn a_new_worker_asks_for_the_streams_its_victim_holds_most_of() {
    let t0 = Instant::now();
    // w1 holds 4 leases of stream 0 and 2 of stream 1; a new worker asks for 3 and ends with
    // 2 of stream 0 and 1 of stream 1, as w1 does.
    let leases: Vec<Lease> = (0..6)
        .map(|i| lease(&multi_stream_key(usize::from(i >= 4), i), Some("w1"), 1))
        .collect();
    let mut obs = LeaseObservations::new();
    obs.observe(&leases, t0);
    let held = BTreeSet::new();
    let plan = plan(&input("me", &leases, &held, &obs, t0));
    assert!(plan.take.is_empty());
    let mut asked: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &plan.request_handoff {
        *asked.entry(stream_of(&r.lease_key)).or_default() += 1;
    }
    assert_eq!(
        asked,
        BTreeMap::from([
            ("123456789012:stream-0:1700000000", 2),
            ("123456789012:stream-1:1700000000", 1)
        ])
    );
}

#[test]
fn single_stream_keys_are_one_group_and_multi_stream_keys_name_their_stream() {
    assert_eq!(stream_of("shardId-000000000001"), "");
    assert_eq!(
        stream_of("123456789012:orders:1700000000:shardId-000000000001"),
        "123456789012:orders:1700000000"
    );
}

/// The issue's example: two workers each holding all of one stream, balanced in total, end
/// with half of each stream each, in exchanges of one lease.
#[test]
fn workers_each_holding_one_whole_stream_end_with_half_of_each() {
    let owners: Vec<Option<usize>> = (0..8).map(|i| Some(i % 2)).collect();
    let mut fleet = Fleet::of_streams(&owners, 2, 2);
    fleet.spread_streams(3, 20).unwrap();
    fleet.still(3).unwrap();
    let per_stream = fleet.per_stream();
    assert_eq!(per_stream.len(), 4, "{per_stream:?}");
    assert!(per_stream.values().all(|held| *held == 2), "{per_stream:?}");
}

proptest! {
    /// Leases of several streams converge as one stream's do; then a fleet left skewed per
    /// stream exchanges leases until no worker holds two more of a stream than a worker with
    /// as many leases (or one fewer), and stays still.
    #[test]
    fn several_streams_converge_like_one((owners, workers, seed) in arb_fleet(), streams in 1usize..5) {
        let mut fleet = Fleet::of_streams(&owners, workers, streams);
        // Balanced in total within the rounds one stream needs; the exchanges of skewed
        // streams (one lease per worker and round, each settled by the next round) after.
        let rounds = if streams == 1 { 8 } else { 8 + 2 * owners.len() as u64 };
        fleet.decide_at_once_until_balanced(seed, rounds)?;
        fleet.spread_streams(seed, 4 * owners.len() as u64 + 4)?;
        fleet.still(seed)?;
        let (counts, per_stream) = (fleet.counts(), fleet.per_stream());
        for ((v, stream), theirs) in &per_stream {
            for w in &fleet.workers {
                let ours = per_stream.get(&(w.clone(), stream.clone())).copied().unwrap_or(0);
                let (cv, cw) = (counts.get(v).copied().unwrap_or(0), counts.get(w).copied().unwrap_or(0));
                prop_assert!(
                    *theirs < ours + 2 || !(cw..=cw + 1).contains(&cv),
                    "{v} holds {theirs} of {stream}, {w} {ours}: {per_stream:?}"
                );
            }
        }
    }

    /// Streams of equal size taken from scratch by workers in turn (a fleet starting, or
    /// streams discovered together): every worker holds each stream's fair share, give or
    /// take one.
    #[test]
    fn each_stream_spreads_over_the_fleet(
        workers in 1usize..7,
        streams in 1usize..6,
        shards in 1usize..9,
        seed in any::<u64>(),
    ) {
        let owners = vec![None; streams * shards];
        let mut fleet = Fleet::of_streams(&owners, workers, streams);
        let rounds = if streams == 1 { 4 } else { 4 + 2 * owners.len() as u64 };
        fleet.take_turns_until_balanced(seed, rounds)?;
        let per_stream = fleet.per_stream();
        for w in &fleet.workers {
            for s in 0..streams {
                let stream = stream_of(&multi_stream_key(s, 0)).to_owned();
                let held = per_stream.get(&(w.clone(), stream)).copied().unwrap_or(0);
                prop_assert!(
                    held + 1 >= shards / workers && held <= shards.div_ceil(workers) + 1,
                    "{w} holds {held} of stream {s} ({shards} shards, {workers} workers): {per_stream:?}"
                );
            }
        }
    }
}
