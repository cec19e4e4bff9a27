//! Fleets at the size the lease table's cost is planned for (a thousand leases, up to a
//! hundred workers), on the in-memory stream and lease store and paused Tokio time: what the
//! fleet asks of the lease table, counted per operation against the cost model of
//! `docs/lease-table-cost.md`; a worker holding a thousand leases; four workers splitting them.
//! (The capacity units of each operation are measured on DynamoDB Local by
//! `scripts/bench lease-cost`; these runs count the operations at sizes a machine cannot
//! host against a real server.)

// The counts are the figures BENCHMARKS.md computes the hundred-worker cost from.
#![allow(clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{LeaseConfig, LeaseStore, OperationUsage};
use tokio::time::Instant;

const LEASES: u32 = 1000;

/// The defaults before watchers: every worker scans every taker interval, renewals every 3 s
/// (the model this file checks; `watchers.rs` checks the other).
fn every_worker_scans() -> LeaseConfig {
    LeaseConfig::default()
        .with_watchers(None)
        .with_renewal_interval(Duration::from_secs(3))
}

fn usage(store: &InMemoryLeaseStore) -> BTreeMap<&'static str, OperationUsage> {
    store
        .usage()
        .expect("the in-memory store counts")
        .snapshot()
}

fn since(
    now: &BTreeMap<&'static str, OperationUsage>,
    then: &BTreeMap<&'static str, OperationUsage>,
    operation: &str,
) -> OperationUsage {
    let before = then.get(operation).copied().unwrap_or_default();
    now.get(operation)
        .copied()
        .unwrap_or_default()
        .since(&before)
}

fn start_fleet(
    ids: std::ops::Range<usize>,
    stream: &Arc<InMemoryStream>,
    store: &Arc<InMemoryLeaseStore>,
    log: &Log,
) -> Vec<Running> {
    ids.map(|i| {
        // Every worker scans: the model this file checks (see tests/watchers.rs for watchers).
        let config = config(&format!("w{i:03}"))
            .with_rng_seed(i as u64)
            .with_lease(every_worker_scans());
        start(config, stream, store, log, &Faults::default())
    })
    .collect()
}

fn evenly_held(fleet: &[Running], leases: usize) -> bool {
    let held: Vec<usize> = fleet.iter().map(Running::held).collect();
    let (min, max) = (held.iter().min(), held.iter().max());
    held.iter().sum::<usize>() == leases && matches!((min, max), (Some(a), Some(b)) if b - a <= 1)
}

fn lost(fleet: &[Running]) -> u64 {
    fleet.iter().map(|w| w.status.borrow().leases_lost).sum()
}

/// `count` is within `percent` of `expected`.
fn near(count: u64, expected: f64, percent: f64) -> bool {
    (count as f64 - expected).abs() <= expected * percent / 100.0
}

// The cost model: each worker scans the table once per taker interval (and once per shard
// sync), and each lease is renewed once per renewal interval, whatever the fleet's size. A
// hundred workers balance a thousand leases, hold them without losing one, and take a new
// worker's share within two taking rounds.
#[tokio::test(start_paused = true)]
async fn a_hundred_workers_share_a_thousand_leases_at_the_modelled_request_rates() {
    let stream = Arc::new(InMemoryStream::new("test-stream", LEASES));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let mut fleet = start_fleet(0..99, &stream, &store, &log);
    wait_until("99 workers balanced", Duration::from_secs(300), || {
        evenly_held(&fleet, LEASES as usize)
    })
    .await;

    // A hundredth worker joins: it asks for its share in its first round.
    fleet.extend(start_fleet(99..100, &stream, &store, &log));
    let joined = Instant::now();
    wait_until("100 workers balanced", Duration::from_secs(60), || {
        fleet.iter().all(|w| w.held() == 10)
    })
    .await;
    let rounds = fleet[99].status.borrow().taking_rounds;
    eprintln!(
        "the 100th worker held its 10 leases {:?} after it started, in {rounds} taking rounds",
        joined.elapsed()
    );
    assert!(
        rounds <= 2,
        "balanced within two taking rounds, not {rounds}"
    );

    // Steady state, measured over two minutes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (before, lost_before) = (usage(&store), lost(&fleet));
    let window = Duration::from_secs(120);
    tokio::time::sleep(window).await;
    let after = usage(&store);
    assert_eq!(lost(&fleet), lost_before, "no lease lost");
    assert!(fleet.iter().all(|w| w.held() == 10), "still balanced");

    let lease = every_worker_scans();
    let (workers, secs) = (fleet.len() as f64, window.as_secs_f64());
    let scans = since(&after, &before, "Scan");
    let renewals = since(&after, &before, "UpdateItem");
    let expected_scans = workers
        * secs
        * (1.0 / lease.taker_interval.as_secs_f64()
            + 1.0 / lease.shard_sync_interval.as_secs_f64());
    let expected_renewals = f64::from(LEASES) * secs / lease.renewal_interval.as_secs_f64();
    let per_hour = |n: u64| n as f64 * 3600.0 / secs;
    eprintln!(
        "1000 leases x 100 workers, per hour: {:.0} scans of {:.0} items, {:.0} UpdateItem; others {:?}",
        per_hour(scans.requests),
        scans.items as f64 / scans.requests as f64,
        per_hour(renewals.requests),
        after
            .keys()
            .filter(|op| !matches!(**op, "Scan" | "UpdateItem"))
            .map(|op| (op, per_hour(since(&after, &before, op).requests)))
            .collect::<Vec<_>>()
    );
    assert!(
        near(scans.requests, expected_scans, 3.0),
        "{} scans, {expected_scans} modelled",
        scans.requests
    );
    assert_eq!(scans.items, scans.requests * u64::from(LEASES));
    assert!(
        near(renewals.requests, expected_renewals, 2.0),
        "{} renewals, {expected_renewals} modelled",
        renewals.requests
    );
    for op in ["PutItem", "TransactWriteItems", "DeleteItem"] {
        assert_eq!(
            since(&after, &before, op).requests,
            0,
            "no {op} in steady state"
        );
    }

    for worker in fleet {
        worker.stop().await.unwrap();
    }
}

// One worker takes a thousand leases at start-up within a few taking rounds and renews every
// one for ten minutes without losing any.
#[tokio::test(start_paused = true)]
async fn one_worker_takes_a_thousand_leases_in_seconds_and_holds_them_for_ten_minutes() {
    let stream = Arc::new(InMemoryStream::new("test-stream", LEASES));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let started = Instant::now();
    let worker = start_fleet(0..1, &stream, &store, &log).remove(0);
    wait_until("every lease held", Duration::from_secs(60), || {
        worker.held() == LEASES as usize
    })
    .await;
    let took = started.elapsed();
    eprintln!("1 worker took 1000 leases in {took:?}");
    assert!(
        took <= every_worker_scans().taker_interval * 3,
        "taken within three taking rounds, not {took:?}"
    );

    let before = usage(&store);
    let window = Duration::from_secs(600);
    tokio::time::sleep(window).await;
    let status = worker.status.borrow().clone();
    assert_eq!(status.leases_lost, 0);
    assert_eq!(status.held_leases.len(), LEASES as usize);
    let renewals = since(&usage(&store), &before, "UpdateItem").requests;
    let expected = f64::from(LEASES) * window.as_secs_f64()
        / every_worker_scans().renewal_interval.as_secs_f64();
    assert!(near(renewals, expected, 1.0), "{renewals} renewals");
    worker.stop().await.unwrap();
    assert!(
        store.leases().iter().all(|l| l.owner.is_none()),
        "all released"
    );
}

#[tokio::test(start_paused = true)]
async fn four_workers_split_a_thousand_leases_evenly() {
    let stream = Arc::new(InMemoryStream::new("test-stream", LEASES));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let log = Log::default();
    let fleet = start_fleet(0..4, &stream, &store, &log);
    wait_until("250 leases each", Duration::from_secs(120), || {
        fleet.iter().all(|w| w.held() == 250)
    })
    .await;
    assert_eq!(
        owners(&store).values().copied().collect::<Vec<_>>(),
        [250; 4]
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(lost(&fleet), 0);
    assert!(fleet.iter().all(|w| w.held() == 250));
    for worker in fleet {
        worker.stop().await.unwrap();
    }
}
