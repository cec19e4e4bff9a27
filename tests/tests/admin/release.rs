//! `release --worker`: a stopped worker's leases, freed at once, are taken by a live worker
//! long before they would have expired. (A live worker's refusal is in `set_checkpoint`.)

use std::time::Duration;

use kcl_core::Checkpoint;
use kcl_integration_tests::{
    PATIENCE, Recorder, create_stream, kinesis, list_shards, start_worker, unique, wait_for,
};
use tokio::time::Instant;

use super::{LEASE_DURATION, OBSERVE, admin, config, failed_with, json, put_lease, stored, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_workers_leases_are_released_and_taken_before_they_expire() {
    let kinesis = kinesis().await;
    let stream = unique("admin-release");
    create_stream(&kinesis, &stream, 2).await;
    let app = unique("admin-release-app");
    let store = table(&app).await;
    let shards: Vec<String> = list_shards(&kinesis, &stream)
        .await
        .into_iter()
        .map(|s| s.shard_id)
        .collect();
    for shard in &shards {
        put_lease(
            &store,
            shard,
            &stream,
            Checkpoint::TrimHorizon,
            Some("w-stopped"),
        )
        .await;
    }
    let recorder = Recorder::default();
    let started = Instant::now();
    let worker = start_worker(config(&app, &stream, "w-new"), &recorder).await;
    // A few taking rounds: the leases have not expired in its eyes, it takes none.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(worker.status.borrow().held_leases.is_empty());

    let dry = json(
        &admin(
            &app,
            &[
                "release",
                "--worker",
                "w-stopped",
                "--observe",
                OBSERVE,
                "--dry-run",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(dry["dry_run"], true);
    for lease in dry["leases"].as_array().unwrap() {
        assert_eq!(lease["outcome"], "would_release", "{dry:#}");
    }
    for shard in &shards {
        assert_eq!(
            stored(&store, shard).await.owner.as_deref(),
            Some("w-stopped"),
            "dry run"
        );
    }

    let doc = json(
        &admin(
            &app,
            &[
                "release",
                "--worker",
                "w-stopped",
                "--observe",
                OBSERVE,
                "--json",
            ],
        )
        .await,
    );
    let released = doc["leases"].as_array().unwrap();
    assert_eq!(released.len(), shards.len());
    for lease in released {
        assert_eq!(lease["outcome"], "released", "{doc:#}");
        assert_eq!(
            lease["counter_after"],
            lease["counter"].as_u64().unwrap() + 1
        );
    }
    wait_for("the released leases taken", PATIENCE, || async {
        worker.status.borrow().held_leases.len() == shards.len()
    })
    .await;
    assert!(
        started.elapsed() < LEASE_DURATION,
        "taken after {:?}, before they would have expired ({LEASE_DURATION:?})",
        started.elapsed()
    );

    let none = admin(
        &app,
        &["release", "--worker", "w-stopped", "--observe", "0"],
    )
    .await;
    let message = failed_with(&none, 4);
    assert!(
        message.contains("worker `w-stopped` owns no lease"),
        "{message}"
    );
    worker.stop().await.unwrap();
}
