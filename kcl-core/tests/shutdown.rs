//! Shutdown on a bad day (issue 10, defect 3): a shutdown requested while the lease table
//! hangs at start-up ends the worker at once without taking a lease, and a shutdown whose
//! lease writes hang still ends within `WorkerConfig::shutdown_deadline`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kcl_core::testing::{Fault, Faulty, Hang, InMemoryLeaseStore, InMemoryStream, LeaseCall};
use kcl_core::{Checkpoint, Error, Lease, LeaseConfig, Watchers};
use tokio::time::Instant;

/// Stands for "at once" in paused time: far below any interval or timeout of the worker.
const AT_ONCE: Duration = Duration::from_millis(10);

#[tokio::test(start_paused = true)]
async fn a_shutdown_while_the_lease_table_hangs_at_start_up_ends_the_worker_without_a_lease() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 4));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    // Free leases, ready to be taken the moment the table answers.
    for shard in stream.shards() {
        store.put(Lease::new(&shard.shard_id, Checkpoint::TrimHorizon));
    }
    let faulty = Arc::new(Faulty::new(store.clone()));
    // Every call hangs, `initialize` (DescribeTable) first; unlike the other calls it has no
    // timeout of its own (creating a table may take minutes).
    faulty.set(Fault::Stall);
    let w1 = start_on(
        config("w1"),
        stream.clone(),
        faulty.clone(),
        &Log::default(),
        &Faults::default(),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!w1.task.is_finished(), "still initializing");

    w1.shutdown.cancel();
    let outcome = tokio::time::timeout(AT_ONCE, w1.task)
        .await
        .expect("run returns at once when asked to stop during initialization")
        .expect("worker task");
    assert!(outcome.is_ok(), "{outcome:?}");

    // The table answers again: nothing of the stopped worker goes on to take a lease.
    faulty.set(Fault::None);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(owners(&store), Default::default(), "no lease taken");
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_whose_offers_and_releases_hang_ends_within_the_shutdown_deadline() {
    // Enough leases for three waves of lease writes (they go 20 at a time).
    const SHARDS: u32 = 120;
    let stream = Arc::new(InMemoryStream::new("test-stream", SHARDS));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    // Another live worker, so that the worker offers its leases before releasing them.
    let other = keep_alive(&store, "shardId-000000000000", "other");
    let faulty = Arc::new(Faulty::new(store.clone()));
    let config = config("w1");
    let deadline = config.shutdown_deadline();
    let w1 = start_on(
        config,
        stream.clone(),
        faulty.clone(),
        &Log::default(),
        &Faults::default(),
    );
    // Its fair share: half the leases, with the other worker counted.
    let held = SHARDS as usize / 2;
    wait_until("w1 holds its share", Duration::from_secs(60), || {
        owners(&store).get("w1") == Some(&held)
    })
    .await;
    // Every offer and every release attempt never answers (requests stuck on dead
    // connections), while renewals and checkpoints go through, so no lease is lost on the
    // way: sent in waves, with their retries, they would take minutes.
    const ATTEMPTS_PER_RELEASE: usize = 10;
    for _ in 0..held {
        faulty.hang_next(LeaseCall::Update("handoff request"), Hang::Lost);
        for _ in 0..ATTEMPTS_PER_RELEASE {
            faulty.hang_next(LeaseCall::Update("release"), Hang::Lost);
        }
    }

    let asked = Instant::now();
    w1.shutdown.cancel();
    let outcome = tokio::time::timeout(deadline * 2, w1.task)
        .await
        .expect("run returns")
        .expect("worker task");
    let took = asked.elapsed();
    assert!(
        took <= deadline,
        "stopped after {took:?}, past the shutdown deadline {deadline:?}"
    );
    // Within the deadline by its own bounded steps, not cut short by the last resort.
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(faulty.hung_calls() > held, "offers and releases did hang");
    other.abort();
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_that_would_overrun_is_cut_at_the_shutdown_deadline() {
    // Enough leases for three waves of releases (they go 20 at a time).
    const SHARDS: u32 = 61;
    let stream = Arc::new(InMemoryStream::new("test-stream", SHARDS));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let faulty = Arc::new(Faulty::new(store.clone()));
    // One shard whose processor always panics: its consumer gives up and the worker releases
    // its lease, a step the worker is in when the shutdown is asked for.
    let (failing, _) = stream.put_record("poison", "poison");
    let faults = Faults {
        always_panic: Some(failing),
        ..Faults::default()
    };
    // No watchers: their steps count in the deadline, and this lone worker would never take
    // them, leaving the releases room to finish.
    let config = config("w1").with_lease(LeaseConfig::default().with_watchers(None));
    let deadline = config.shutdown_deadline();
    let w1 = start_on(
        config,
        stream.clone(),
        faulty.clone(),
        &Log::default(),
        &faults,
    );
    wait_until("w1 holds every lease", Duration::from_secs(60), || {
        owners(&store).get("w1") == Some(&(SHARDS as usize))
    })
    .await;
    // Every release attempt never answers: the failed shard's release retries for longer
    // than a step is counted for, and then the other releases use up their whole window.
    const ATTEMPTS_PER_RELEASE: usize = 10;
    for _ in 0..SHARDS as usize * ATTEMPTS_PER_RELEASE {
        faulty.hang_next(LeaseCall::Update("release"), Hang::Lost);
    }
    wait_until(
        "the failed shard's release hangs",
        Duration::from_secs(120),
        || faulty.hung_calls() > 0,
    )
    .await;

    let asked = Instant::now();
    w1.shutdown.cancel();
    let outcome = tokio::time::timeout(deadline * 2, w1.task)
        .await
        .expect("run returns")
        .expect("worker task");
    let took = asked.elapsed();
    assert!(
        took <= deadline + AT_ONCE,
        "stopped after {took:?}, past the shutdown deadline {deadline:?}"
    );
    let Err(Error::TaskFailed { task, problem }) = outcome else {
        panic!("the abandoned shutdown is an error: {outcome:?}");
    };
    assert_eq!(task, "worker shutdown");
    assert!(problem.contains("shutdown deadline"), "{problem}");
}

// A watcher shutting down looks for another watcher to offer its leases to, and with none
// waits for a member to take a slot. When the slot calls hang too (its slot's release, every
// read of the slots, every offer), those steps end at their bounds and the shutdown still
// ends within the deadline, which counts them.
#[tokio::test(start_paused = true)]
async fn a_watchers_shutdown_whose_slot_calls_hang_ends_within_the_shutdown_deadline() {
    const SHARDS: u32 = 20;
    const HANGS: usize = 200;
    let stream = Arc::new(InMemoryStream::new("test-stream", SHARDS));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    // Another live worker without a slot: one that could take the slot, so the watcher waits.
    let other = keep_alive(&store, "shardId-000000000000", "other");
    let faulty = Arc::new(Faulty::new(store.clone()));
    let watchers = Watchers::default().with_count(1).with_min_workers(1);
    let config = config("w1").with_lease(LeaseConfig::default().with_watchers(Some(watchers)));
    let (deadline, succession) = (config.shutdown_deadline(), config.succession_wait());
    let w1 = start_on(
        config,
        stream.clone(),
        faulty.clone(),
        &Log::default(),
        &Faults::default(),
    );
    let slot = "kcl-watcher-slot-0";
    wait_until(
        "w1 holds its share and watches",
        Duration::from_secs(60),
        || {
            owners(&store).get("w1") == Some(&(SHARDS as usize / 2))
                && store
                    .leases()
                    .iter()
                    .any(|l| l.lease_key == slot && l.owner.as_deref() == Some("w1"))
        },
    )
    .await;
    for _ in 0..HANGS {
        faulty.hang_next(LeaseCall::Get, Hang::Lost);
        faulty.hang_next(LeaseCall::Update("release"), Hang::Lost);
        faulty.hang_next(LeaseCall::Update("handoff request"), Hang::Lost);
    }

    let asked = Instant::now();
    w1.shutdown.cancel();
    let outcome = tokio::time::timeout(deadline * 2, w1.task)
        .await
        .expect("run returns")
        .expect("worker task");
    let took = asked.elapsed();
    assert!(
        took <= deadline,
        "stopped after {took:?}, past the shutdown deadline {deadline:?}"
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        took >= succession,
        "the search for a watcher used its whole wait ({took:?})"
    );
    assert!(faulty.hung_calls() > 0, "slot calls did hang");
    other.abort();
}
