use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::sequence::SequenceNumber;

fn range(start: u128, end: u128) -> HashKeyRange {
    HashKeyRange {
        starting_hash_key: start,
        ending_hash_key: end,
    }
}

fn shard(id: &str, parents: &[&str], r: HashKeyRange, open: bool) -> Shard {
    let mut s = Shard::new(id, r);
    s.parent_shard_id = parents.first().map(|p| (*p).to_owned());
    s.adjacent_parent_shard_id = parents.get(1).map(|p| (*p).to_owned());
    if !open {
        s.ending_sequence_number = Some("99".into());
    }
    s
}

const HALF: u128 = u128::MAX / 2;

/// p split into c1 (lower half) and c2 (upper half).
fn split() -> Vec<Shard> {
    vec![
        shard("p", &[], HashKeyRange::FULL, false),
        shard("c1", &["p"], range(0, HALF), true),
        shard("c2", &["p"], range(HALF + 1, u128::MAX), true),
    ]
}

/// The leases a sync creates, without the parents each waits for.
fn planned(shards: &[Shard], leases: &[Lease], initial: &InitialPosition) -> Vec<Lease> {
    leases_to_create(shards, leases, initial)
        .into_iter()
        .map(|new| new.lease)
        .collect()
}

fn keys(leases: &[Lease]) -> Vec<&str> {
    leases.iter().map(|l| l.lease_key.as_str()).collect()
}

fn lease_at(key: &str, checkpoint: Checkpoint) -> Lease {
    Lease::new(key, checkpoint)
}

/// The parents of `child` that a consistent read of their keys (`read`) shows unfinished.
fn unfinished_parents<'a>(child: &'a Lease, read: &BTreeMap<String, Lease>) -> Vec<&'a str> {
    child
        .parent_shard_ids
        .iter()
        .filter(|p| !parent_read_finished(read.get(*p)))
        .map(String::as_str)
        .collect()
}

fn seq(n: u64) -> Checkpoint {
    Checkpoint::at(SequenceNumber::new(n.to_string()).unwrap(), 0)
}

#[test]
fn a_new_application_at_trim_horizon_starts_with_the_oldest_ancestors() {
    let create = planned(&split(), &[], &InitialPosition::TrimHorizon);
    assert_eq!(keys(&create), vec!["p", "c1", "c2"], "parents first");
    assert!(
        create
            .iter()
            .all(|l| l.checkpoint == Checkpoint::TrimHorizon)
    );
    assert_eq!(create[1].parent_shard_ids, BTreeSet::from(["p".to_owned()]));
    assert_eq!(create[1].hash_key_range, Some(range(0, HALF)));
}

#[test]
fn a_new_application_at_latest_starts_at_the_open_shards() {
    let create = planned(&split(), &[], &InitialPosition::Latest);
    assert_eq!(keys(&create), vec!["c1", "c2"]);
    assert!(create.iter().all(|l| l.checkpoint == Checkpoint::Latest));
}

#[test]
fn children_of_a_shard_in_the_lineage_start_at_trim_horizon_whatever_the_initial_position() {
    let existing = [lease_at("p", seq(5))];
    for initial in [InitialPosition::Latest, InitialPosition::TrimHorizon] {
        let create = planned(&split(), &existing, &initial);
        assert_eq!(keys(&create), vec!["c1", "c2"]);
        assert!(
            create
                .iter()
                .all(|l| l.checkpoint == Checkpoint::TrimHorizon),
            "{initial:?}"
        );
    }
}

#[test]
fn a_processed_and_cleaned_up_parent_is_never_leased_again() {
    // p's lease was deleted after c1 and c2 started.
    let existing = [lease_at("c1", seq(7)), lease_at("c2", seq(8))];
    assert!(planned(&split(), &existing, &InitialPosition::TrimHorizon).is_empty());
    // Even when only one child still has a lease, the missing sibling starts at TRIM_HORIZON.
    let create = planned(&split(), &existing[..1], &InitialPosition::Latest);
    assert_eq!(keys(&create), vec!["c2"]);
    assert_eq!(create[0].checkpoint, Checkpoint::TrimHorizon);
}

#[test]
fn a_merge_child_names_both_parents_and_waits_for_both() {
    let shards = vec![
        shard("a", &[], range(0, HALF), false),
        shard("b", &[], range(HALF + 1, u128::MAX), false),
        shard("m", &["a", "b"], HashKeyRange::FULL, true),
    ];
    let create = planned(&shards, &[], &InitialPosition::TrimHorizon);
    assert_eq!(keys(&create), vec!["a", "b", "m"]);
    let child = &create[2];
    assert_eq!(
        child.parent_shard_ids,
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );

    // One parent finished, the other not: the child waits for the other.
    let mut parents = BTreeMap::new();
    parents.insert("a".to_owned(), lease_at("a", Checkpoint::ShardEnd));
    parents.insert("b".to_owned(), lease_at("b", seq(3)));
    assert_eq!(unfinished_parents(child, &parents), vec!["b"]);
    parents.insert("b".to_owned(), lease_at("b", Checkpoint::ShardEnd));
    assert!(unfinished_parents(child, &parents).is_empty());
    // A parent whose lease is gone (cleaned up, or trimmed) blocks nothing.
    parents.remove("a");
    assert!(unfinished_parents(child, &parents).is_empty());
}

#[test]
fn a_shard_whose_parent_was_trimmed_away_is_a_root() {
    // p is past retention: not listed any more. c1/c2 still name it as parent.
    let shards = split()[1..].to_vec();
    let create = planned(&shards, &[], &InitialPosition::TrimHorizon);
    assert_eq!(keys(&create), vec!["c1", "c2"]);
    assert!(
        create
            .iter()
            .all(|l| l.checkpoint == Checkpoint::TrimHorizon)
    );
    assert!(
        create[0].parent_shard_ids.contains("p"),
        "the lineage is still recorded"
    );
    let latest = planned(&shards, &[], &InitialPosition::Latest);
    assert!(latest.iter().all(|l| l.checkpoint == Checkpoint::Latest));
}

#[test]
fn two_workers_syncing_at_once_decide_the_same_leases() {
    let shards = split();
    let a = planned(&shards, &[], &InitialPosition::TrimHorizon);
    let b = planned(&shards, &[], &InitialPosition::TrimHorizon);
    assert_eq!(
        a, b,
        "same leases: the conditional create lets exactly one of each land"
    );
    // After either created them, nothing is left to create.
    assert!(planned(&shards, &a, &InitialPosition::TrimHorizon).is_empty());
}

#[test]
fn a_finished_parent_is_deleted_once_every_child_started_and_checkpointed() {
    let shards = split();
    let mut parent = lease_at("p", Checkpoint::ShardEnd);
    parent.child_shard_ids = BTreeSet::from(["c1".to_owned(), "c2".to_owned()]);
    let waiting = [
        parent.clone(),
        lease_at("c1", seq(4)),
        lease_at("c2", Checkpoint::TrimHorizon),
    ];
    assert!(
        leases_to_delete(&shards, &waiting).is_empty(),
        "c2 has not checkpointed"
    );
    let started = [
        parent.clone(),
        lease_at("c1", seq(4)),
        lease_at("c2", seq(9)),
    ];
    let delete = leases_to_delete(&shards, &started);
    assert_eq!(delete.len(), 1);
    assert_eq!(
        (delete[0].lease_key.as_str(), delete[0].reason),
        ("p", DeletionReason::ChildrenStarted)
    );
    // A child without a lease that was never started keeps the parent.
    assert!(leases_to_delete(&shards, &[parent.clone(), lease_at("c1", seq(4))]).is_empty());
    // An unfinished lease is never deleted.
    assert!(leases_to_delete(&shards, &[lease_at("p", seq(1))]).is_empty());
}

#[test]
fn a_finished_lease_waits_for_its_parents_leases_to_go() {
    // p split into c1 and c2, and c1 split into g1 and g2; all ended but g1 and g2.
    let mut shards = split();
    shards[1].ending_sequence_number = Some("99".into());
    shards.push(shard("g1", &["c1"], range(0, HALF / 2), true));
    shards.push(shard("g2", &["c1"], range(HALF / 2 + 1, HALF), true));
    let finished = |key: &str, children: &[&str]| {
        let mut lease = lease_at(key, Checkpoint::ShardEnd);
        lease.child_shard_ids = children.iter().map(|c| (*c).to_owned()).collect();
        lease.parent_shard_ids = shards
            .iter()
            .find(|s| s.shard_id == key)
            .map(|s| s.parent_shard_ids().into_iter().collect())
            .unwrap_or_default();
        lease
    };
    let table = [
        finished("p", &["c1", "c2"]),
        finished("c1", &["g1", "g2"]),
        lease_at("c2", seq(5)),
        lease_at("g1", seq(6)),
        lease_at("g2", seq(7)),
    ];
    // c1's children started, but p, its parent, still has a lease (its worker may not have
    // heard that its end was written, and would create c1 again): only p goes.
    let delete = leases_to_delete(&shards, &table);
    assert_eq!(
        delete
            .iter()
            .map(|d| (d.lease_key.as_str(), d.parents.clone()))
            .collect::<Vec<_>>(),
        vec![("p", Vec::new())]
    );
    // Once p is gone, c1 goes, after a read of p's key finds nothing.
    let delete = leases_to_delete(&shards, &table[1..]);
    assert_eq!(
        delete
            .iter()
            .map(|d| (d.lease_key.as_str(), d.parents.clone()))
            .collect::<Vec<_>>(),
        vec![("c1", vec!["p".to_owned()])]
    );
}

#[test]
fn a_new_lease_is_guarded_by_its_leased_parents_and_its_descendants() {
    let mut shards = split();
    shards[1].ending_sequence_number = Some("99".into());
    shards.push(shard("g1", &["c1"], range(0, HALF / 2), true));
    shards.push(shard("g2", &["c1"], range(HALF / 2 + 1, HALF), true));
    let create = leases_to_create(&shards, &[], &InitialPosition::TrimHorizon);
    let guards: Vec<(&str, Vec<String>, Vec<String>)> = create
        .iter()
        .map(|n| {
            (
                n.lease.lease_key.as_str(),
                n.guard.parents.clone(),
                n.guard.children.clone(),
            )
        })
        .collect();
    let strings = |keys: &[&str]| keys.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        guards,
        vec![
            ("p", vec![], strings(&["c1", "c2", "g1", "g2"])),
            ("c1", strings(&["p"]), strings(&["g1", "g2"])),
            ("c2", strings(&["p"]), vec![]),
            ("g1", strings(&["c1"]), vec![]),
            ("g2", strings(&["c1"]), vec![]),
        ]
    );
    // A parent without a lease (LATEST: the closed parent is skipped) is not waited for.
    let create = leases_to_create(&split(), &[], &InitialPosition::Latest);
    assert!(create.iter().all(|n| n.guard.parents.is_empty()));
}

#[test]
fn a_finished_lease_past_retention_is_deleted() {
    let shards = split()[1..].to_vec();
    let delete = leases_to_delete(
        &shards,
        &[
            lease_at("p", Checkpoint::ShardEnd),
            lease_at("c1", Checkpoint::TrimHorizon),
        ],
    );
    assert_eq!(delete.len(), 1);
    assert_eq!(delete[0].reason, DeletionReason::PastRetention);
}

#[test]
fn holes_in_the_hash_key_coverage_are_found() {
    let with = |key: &str, r: HashKeyRange, finished: bool| {
        let checkpoint = if finished {
            Checkpoint::ShardEnd
        } else {
            Checkpoint::TrimHorizon
        };
        lease_at(key, checkpoint).with_hash_key_range(r)
    };
    let full = [
        with("c1", range(0, HALF), false),
        with("c2", range(HALF + 1, u128::MAX), false),
    ];
    assert!(hash_key_holes(&full).is_empty());
    let overlapping = [
        with("p", HashKeyRange::FULL, false),
        with("c1", range(0, HALF), false),
    ];
    assert!(hash_key_holes(&overlapping).is_empty());
    let missing_upper = [
        with("c1", range(0, HALF), false),
        with("p", HashKeyRange::FULL, true),
    ];
    assert_eq!(
        hash_key_holes(&missing_upper),
        vec![range(HALF + 1, u128::MAX)]
    );
    let missing_middle = [
        with("a", range(0, 9), false),
        with("b", range(20, u128::MAX), false),
    ];
    assert_eq!(hash_key_holes(&missing_middle), vec![range(10, 19)]);
    assert!(
        hash_key_holes(&[lease_at("x", Checkpoint::TrimHorizon)]).is_empty(),
        "no ranges: nothing to check"
    );
}

#[test]
fn an_unfinished_lease_without_a_range_makes_the_coverage_check_inconclusive() {
    // An old Java KCL lease (no range) next to one of ours: the old lease may cover the rest.
    let mixed = [
        lease_at("old", seq(3)),
        lease_at("c1", Checkpoint::TrimHorizon).with_hash_key_range(range(0, HALF)),
    ];
    assert!(
        hash_key_holes(&mixed).is_empty(),
        "{:?}",
        hash_key_holes(&mixed)
    );
    // Once the old lease finished, the check counts again.
    let old_finished = [
        lease_at("old", Checkpoint::ShardEnd),
        lease_at("c1", Checkpoint::TrimHorizon).with_hash_key_range(range(0, HALF)),
    ];
    assert_eq!(
        hash_key_holes(&old_finished),
        vec![range(HALF + 1, u128::MAX)]
    );
}

// ---- Properties over random resharding histories ----------------------------------------

/// A stream's shard list after random splits and merges of open shards, and trims of closed
/// shards (past retention).
#[derive(Debug, Clone)]
struct History {
    shards: Vec<Shard>,
}

#[derive(Debug, Clone)]
enum Step {
    Split(usize),
    Merge(usize),
    Trim(usize),
}

fn arb_steps() -> impl Strategy<Value = (usize, Vec<Step>)> {
    let step = prop_oneof![
        (0usize..64).prop_map(Step::Split),
        (0usize..64).prop_map(Step::Merge),
        (0usize..64).prop_map(Step::Trim),
    ];
    (1usize..4, proptest::collection::vec(step, 0..12))
}

impl History {
    fn build(roots: usize, steps: &[Step]) -> Self {
        let width = u128::MAX / roots as u128;
        let mut shards: Vec<Shard> = (0..roots)
            .map(|i| {
                let start = width * i as u128;
                let end = if i + 1 == roots {
                    u128::MAX
                } else {
                    start + width - 1
                };
                shard(&format!("s{i}"), &[], range(start, end), true)
            })
            .collect();
        let mut next = roots;
        for step in steps {
            let mut open: Vec<usize> = (0..shards.len()).filter(|i| shards[*i].is_open()).collect();
            open.sort_by_key(|i| shards[*i].hash_key_range.starting_hash_key);
            match step {
                Step::Split(n) => {
                    let i = open[n % open.len()];
                    let r = shards[i].hash_key_range;
                    if r.ending_hash_key - r.starting_hash_key < 2 {
                        continue;
                    }
                    let mid = r.starting_hash_key + (r.ending_hash_key - r.starting_hash_key) / 2;
                    shards[i].ending_sequence_number = Some("1".into());
                    let parent = shards[i].shard_id.clone();
                    for r in [
                        range(r.starting_hash_key, mid),
                        range(mid + 1, r.ending_hash_key),
                    ] {
                        shards.push(shard(&format!("s{next}"), &[&parent], r, true));
                        next += 1;
                    }
                }
                Step::Merge(n) if open.len() >= 2 => {
                    let k = n % (open.len() - 1);
                    let (a, b) = (open[k], open[k + 1]);
                    let r = range(
                        shards[a].hash_key_range.starting_hash_key,
                        shards[b].hash_key_range.ending_hash_key,
                    );
                    shards[a].ending_sequence_number = Some("1".into());
                    shards[b].ending_sequence_number = Some("1".into());
                    let (pa, pb) = (shards[a].shard_id.clone(), shards[b].shard_id.clone());
                    shards.push(shard(&format!("s{next}"), &[&pa, &pb], r, true));
                    next += 1;
                }
                Step::Merge(_) => {}
                Step::Trim(n) => {
                    // Kinesis trims the oldest closed shards: those without a listed parent.
                    let listed: HashSet<String> =
                        shards.iter().map(|s| s.shard_id.clone()).collect();
                    let trimmable: Vec<usize> = (0..shards.len())
                        .filter(|i| !shards[*i].is_open())
                        .filter(|i| {
                            shards[*i]
                                .parent_shard_ids()
                                .iter()
                                .all(|p| !listed.contains(p))
                        })
                        .collect();
                    if !trimmable.is_empty() {
                        shards.remove(trimmable[n % trimmable.len()]);
                    }
                }
            }
        }
        History { shards }
    }
}

fn arb_initial() -> impl Strategy<Value = InitialPosition> {
    prop_oneof![
        Just(InitialPosition::TrimHorizon),
        Just(InitialPosition::Latest)
    ]
}

/// Hash key cells of the coverage property: 16 cells of 2^124 keys tile the whole space.
const CELL_BITS: u32 = 124;
const CELLS: u8 = 16;

fn cells(first: u8, last: u8) -> HashKeyRange {
    range(
        u128::from(first) << CELL_BITS,
        ((u128::from(last) + 1) << CELL_BITS).wrapping_sub(1),
    )
}

/// A lease over whole cells, or without a range; finished or not.
fn arb_cell_lease() -> impl Strategy<Value = (Option<(u8, u8)>, bool)> {
    let cell_range = (0..CELLS, 0..CELLS).prop_map(|(a, b)| (a.min(b), a.max(b)));
    (proptest::option::weighted(0.85, cell_range), any::<bool>())
}

proptest! {
    /// The coverage check against a cell-by-cell model: the holes are exactly the runs of
    /// cells no unfinished lease covers, and an unfinished lease without a range (an old Java
    /// KCL lease) makes the check inconclusive.
    #[test]
    fn the_coverage_check_finds_exactly_the_uncovered_hash_keys(
        specs in proptest::collection::vec(arb_cell_lease(), 0..8),
    ) {
        let leases: Vec<Lease> = specs
            .iter()
            .enumerate()
            .map(|(i, (cell_range, finished))| {
                let checkpoint = if *finished { Checkpoint::ShardEnd } else { seq(1) };
                let lease = lease_at(&format!("l{i}"), checkpoint);
                match cell_range {
                    Some((a, b)) => lease.with_hash_key_range(cells(*a, *b)),
                    None => lease,
                }
            })
            .collect();
        let unfinished: Vec<Option<(u8, u8)>> =
            specs.iter().filter(|(_, f)| !f).map(|(r, _)| *r).collect();
        let expected = if unfinished.iter().any(|r| r.is_none()) || unfinished.is_empty() {
            Vec::new()
        } else {
            let covered = |c: u8| unfinished.iter().flatten().any(|(a, b)| (*a..=*b).contains(&c));
            let mut holes = Vec::new();
            let mut c = 0;
            while c < CELLS {
                if covered(c) {
                    c += 1;
                    continue;
                }
                let first = c;
                while c < CELLS && !covered(c) {
                    c += 1;
                }
                holes.push(cells(first, c - 1));
            }
            holes
        };
        prop_assert_eq!(hash_key_holes(&leases), expected);
    }

    #[test]
    fn every_open_shard_gets_one_lease_and_a_second_sync_changes_nothing(
        (roots, steps) in arb_steps(),
        initial in arb_initial(),
    ) {
        let history = History::build(roots, &steps);
        let created = planned(&history.shards, &[], &initial);
        let leased: HashSet<&str> = keys(&created).into_iter().collect();
        prop_assert_eq!(leased.len(), created.len(), "a lease created twice");
        for s in history.shards.iter().filter(|s| s.is_open()) {
            prop_assert!(leased.contains(s.shard_id.as_str()), "open shard {} without a lease", s.shard_id);
        }
        if matches!(initial, InitialPosition::TrimHorizon) {
            prop_assert_eq!(created.len(), history.shards.len(), "every retained shard, oldest first");
        } else {
            prop_assert!(created.iter().all(|l| l.checkpoint == Checkpoint::Latest));
            prop_assert_eq!(created.len(), history.shards.iter().filter(|s| s.is_open()).count());
        }
        // Parents come before children in the creation order.
        let position: HashMap<&str, usize> = keys(&created).into_iter().enumerate().map(|(i, k)| (k, i)).collect();
        for lease in &created {
            for p in &lease.parent_shard_ids {
                if let Some(pi) = position.get(p.as_str()) {
                    prop_assert!(*pi < position[lease.lease_key.as_str()]);
                }
            }
        }
        prop_assert!(planned(&history.shards, &created, &initial).is_empty());
        prop_assert!(hash_key_holes(&created).is_empty());
    }

    /// Process the stream shard by shard as the workers would (a lease finishes only once its
    /// parents did), cleaning up and re-syncing after each step: no shard is ever leased twice,
    /// open shards are always covered, and the table shrinks back to the open shards.
    #[test]
    fn a_processed_lineage_is_cleaned_up_and_never_processed_again(
        (roots, steps) in arb_steps(),
        initial in arb_initial(),
        order in any::<u64>(),
    ) {
        let history = History::build(roots, &steps);
        let mut table: BTreeMap<String, Lease> = BTreeMap::new();
        let mut ever_leased: HashSet<String> = HashSet::new();
        let sync = |table: &mut BTreeMap<String, Lease>, ever: &mut HashSet<String>| -> Result<(), TestCaseError> {
            for new in leases_to_create(&history.shards, &table.values().cloned().collect::<Vec<_>>(), &initial) {
                let lease = new.lease;
                prop_assert!(new.guard.parents.iter().all(|p| table.contains_key(p)), "{} waits for a parent without a lease", lease.lease_key);
                prop_assert!(!new.guard.children.iter().any(|c| table.contains_key(c)), "{} has a child with a lease", lease.lease_key);
                prop_assert!(ever.insert(lease.lease_key.clone()), "{} leased a second time", lease.lease_key);
                table.insert(lease.lease_key.clone(), lease);
            }
            Ok(())
        };
        // A plan made from an old read of the table, applied now as the store does: a lease
        // only if absent, while the parents it names have leases and its children have none.
        let apply_stale = |plan: Vec<NewLease>, table: &mut BTreeMap<String, Lease>, ever: &mut HashSet<String>| -> Result<(), TestCaseError> {
            for new in plan {
                let key = new.lease.lease_key.clone();
                let guard = &new.guard;
                if table.contains_key(&key)
                    || !guard.parents.iter().all(|p| table.contains_key(p))
                    || guard.children.iter().any(|c| table.contains_key(c))
                {
                    continue;
                }
                prop_assert!(ever.insert(key.clone()), "a stale plan leased {key} a second time");
                table.insert(key, new.lease);
            }
            Ok(())
        };
        // Reads of the table, the first one before any lease existed.
        let mut snapshots: Vec<Vec<Lease>> = vec![Vec::new()];
        // Deletes what the lineage lets go, as a sync does: only leases whose parents a read
        // finds no lease for.
        let clean_up = |table: &mut BTreeMap<String, Lease>| -> Result<usize, TestCaseError> {
            let deletions = leases_to_delete(&history.shards, &table.values().cloned().collect::<Vec<_>>());
            let mut deleted = 0;
            for deletion in deletions {
                prop_assert!(deletion.parents.iter().all(|p| !table.contains_key(p)), "{} deleted while a parent has a lease", deletion.lease_key);
                table.remove(&deletion.lease_key);
                deleted += 1;
            }
            Ok(deleted)
        };
        sync(&mut table, &mut ever_leased)?;
        let mut rng = order;
        let is_open = |key: &str| history.shards.iter().any(|s| s.shard_id == key && s.is_open());
        for _ in 0..4 * history.shards.len() + 4 {
            // Finish a closed shard whose parents are done; an open one gets its first
            // checkpoint (after which it has nothing more to do here).
            let ready: Vec<String> = table
                .values()
                .filter(|l| !l.is_finished())
                .filter(|l| !(is_open(&l.lease_key) && l.checkpoint.position().is_some()))
                .filter(|l| unfinished_parents(l, &table).is_empty())
                .map(|l| l.lease_key.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = &ready[(rng >> 33) as usize % ready.len()];
            let open = is_open(key);
            let lease = table.get_mut(key).unwrap();
            lease.checkpoint = if open { seq(1) } else { Checkpoint::ShardEnd };
            clean_up(&mut table)?;
            // Now and then a worker that read the table a while ago and stalled sends its
            // plan.
            if (rng >> 40) % 3 == 0 {
                let old = &snapshots[(rng >> 20) as usize % snapshots.len()];
                apply_stale(leases_to_create(&history.shards, old, &initial), &mut table, &mut ever_leased)?;
            }
            snapshots.push(table.values().cloned().collect());
            sync(&mut table, &mut ever_leased)?;
            let holes = hash_key_holes(&table.values().cloned().collect::<Vec<_>>());
            prop_assert!(holes.is_empty(), "holes {holes:?}");
        }
        // Cleaning up goes one generation per sync: a lease waits for its parents' deletion.
        while clean_up(&mut table)? > 0 {
            sync(&mut table, &mut ever_leased)?;
        }
        for s in history.shards.iter().filter(|s| s.is_open()) {
            prop_assert!(table.contains_key(&s.shard_id));
        }
        // Everything closed was processed and cleaned up.
        prop_assert!(table.values().all(|l| !l.is_finished()), "{:?}", table.keys().collect::<Vec<_>>());
    }
}
