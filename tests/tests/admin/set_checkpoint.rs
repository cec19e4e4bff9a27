//! `set-checkpoint`: each `--to` form on a lease no worker holds, the worker resuming exactly
//! there; what is refused, and that a refusal or a dry run writes nothing.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::process::Output;

use kcl_core::{Checkpoint, SequenceNumber};
use kcl_integration_tests::{
    Event, PATIENCE, Put, Recorder, create_stream, kinesis, put_records, records, start_worker,
    unique, wait_for,
};

use super::{OBSERVE, admin, config, failed_with, json, put_lease, stderr, stored, table};

/// The payloads of `puts` on `shard`.
fn on(puts: &[Put], shard: &str) -> BTreeSet<String> {
    puts.iter()
        .filter(|p| p.shard_id == shard)
        .map(|p| p.data.clone())
        .collect()
}

/// Runs a worker until it delivered `expected` from `shard`, then a little longer for a
/// record that must not come; returns what it delivered from `shard`, and stops it (its
/// leases are released).
async fn deliveries(
    app: &str,
    stream: &str,
    shard: &str,
    expected: &BTreeSet<String>,
) -> Vec<String> {
    let recorder = Recorder::default();
    let worker = start_worker(config(app, stream, "w-resume"), &recorder).await;
    let from = |recorder: &Recorder| -> Vec<String> {
        recorder
            .delivered()
            .into_iter()
            .filter(|d| d.shard_id == shard)
            .map(|d| d.data)
            .collect()
    };
    wait_for("the records after the new checkpoint", PATIENCE, || async {
        from(&recorder).iter().cloned().collect::<BTreeSet<_>>() == *expected
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    worker.stop().await.unwrap();
    from(&recorder)
}

/// Runs `kcl-admin --stream STREAM set-checkpoint --shard SHARD ARGS...`.
async fn set(app: &str, stream: &str, shard: &str, args: &[&str]) -> Output {
    let mut all = vec!["--stream", stream, "set-checkpoint", "--shard", shard];
    all.extend_from_slice(args);
    admin(app, &all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_position_is_written_to_an_unowned_lease_and_the_shard_resumes_there() {
    let kinesis = kinesis().await;
    let stream = unique("admin-set");
    create_stream(&kinesis, &stream, 2).await;
    let app = unique("admin-set-app");
    let first = put_records(&kinesis, &stream, &records("a", 0, 40, 13)).await;
    let shard = first[0].shard_id.clone();
    let here: Vec<&Put> = first.iter().filter(|p| p.shard_id == shard).collect();
    let foreign = first
        .iter()
        .find(|p| p.shard_id != shard)
        .expect("both shards");
    assert!(here.len() >= 6, "records enough on {shard}");
    // A worker processes everything and shuts down: the leases are unowned, at the end.
    deliveries(&app, &stream, &shard, &on(&first, &shard)).await;
    let store = table(&app).await;
    let before = stored(&store, &shard).await;
    // Refused, each with its exit code, and nothing written.
    let bad = failed_with(&set(&app, &stream, &shard, &["--to", "12x"]).await, 2);
    assert!(bad.contains("`12x` is not a sequence number"), "{bad}");
    let not_here = failed_with(
        &set(&app, &stream, &shard, &["--to", &foreign.sequence_number]).await,
        4,
    );
    assert!(
        not_here.contains(&format!(
            "has no record with sequence number {}",
            foreign.sequence_number
        )),
        "{not_here}"
    );
    let no_stream = admin(
        &app,
        &[
            "set-checkpoint",
            "--shard",
            &shard,
            "--to",
            &here[0].sequence_number,
        ],
    )
    .await;
    let no_stream = failed_with(&no_stream, 2);
    assert!(no_stream.contains("needs the stream"), "{no_stream}");
    let missing = failed_with(
        &set(&app, &stream, "shardId-000000000099", &["--to", "latest"]).await,
        4,
    );
    assert!(
        missing.contains("has no lease `shardId-000000000099`"),
        "{missing}"
    );
    let dry = json(
        &set(
            &app,
            &stream,
            &shard,
            &["--to", &here[2].sequence_number, "--dry-run", "--json"],
        )
        .await,
    );
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["after"]["checkpoint"], here[2].sequence_number.as_str());
    assert_eq!(dry["writes"], serde_json::json!(["checkpoint"]));
    assert_eq!(
        stored(&store, &shard).await,
        before,
        "nothing written by any of them"
    );

    // SEQ: the records after it.
    let k = 2;
    let doc = json(
        &set(
            &app,
            &stream,
            &shard,
            &["--to", &here[k].sequence_number, "--json"],
        )
        .await,
    );
    assert_eq!(doc["state"], "unowned");
    assert_eq!(doc["writes"], serde_json::json!(["checkpoint"]));
    assert_eq!(doc["before"]["counter"], before.counter);
    assert_eq!(doc["after"]["counter"], before.counter + 1);
    let lease = stored(&store, &shard).await;
    assert_eq!(
        lease.checkpoint,
        Checkpoint::at(
            SequenceNumber::new(here[k].sequence_number.as_str()).unwrap(),
            0
        )
    );
    assert_eq!((lease.owner, lease.counter), (None, before.counter + 1));
    let after_k: BTreeSet<String> = here[k + 1..].iter().map(|p| p.data.clone()).collect();
    let got = deliveries(&app, &stream, &shard, &after_k).await;
    assert_eq!(
        got.len(),
        after_k.len(),
        "each once, none up to the checkpoint: {got:?}"
    );

    // at-timestamp=T: exactly the records put after T.
    let older = put_records(&kinesis, &stream, &records("b", 0, 20, 13)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let newer = put_records(&kinesis, &stream, &records("c", 0, 20, 13)).await;
    let millis = t
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let doc = json(
        &set(
            &app,
            &stream,
            &shard,
            &["--to", &format!("at-timestamp={millis}"), "--json"],
        )
        .await,
    );
    let last_before = older
        .iter()
        .filter(|p| p.shard_id == shard)
        .max_by_key(|p| SequenceNumber::new(p.sequence_number.as_str()).unwrap())
        .expect("b records on the shard");
    assert_eq!(
        doc["resolved"],
        last_before.sequence_number.as_str(),
        "{doc:#}"
    );
    assert!(
        doc["note"]
            .as_str()
            .unwrap()
            .contains("the last record before"),
        "{doc:#}"
    );
    let got = deliveries(&app, &stream, &shard, &on(&newer, &shard)).await;
    assert_eq!(
        got.len(),
        on(&newer, &shard).len(),
        "only the records after T: {got:?}"
    );

    // trim-horizon: everything the stream keeps, again.
    json(&set(&app, &stream, &shard, &["--to", "trim-horizon", "--json"]).await);
    assert_eq!(
        stored(&store, &shard).await.checkpoint,
        Checkpoint::TrimHorizon
    );
    let everything: Vec<Put> = first.iter().chain(&older).chain(&newer).cloned().collect();
    let got = deliveries(&app, &stream, &shard, &on(&everything, &shard)).await;
    assert_eq!(got.len(), on(&everything, &shard).len(), "each once");

    // latest: only what is put once the worker reads the shard.
    json(&set(&app, &stream, &shard, &["--to", "latest", "--json"]).await);
    assert_eq!(stored(&store, &shard).await.checkpoint, Checkpoint::Latest);
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w-latest"), &recorder).await;
    wait_for("the shard started at LATEST", PATIENCE, || async {
        recorder.events(&shard).contains(&(
            "w-latest".to_owned(),
            Event::Initialized(Checkpoint::Latest),
        ))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let latest = put_records(&kinesis, &stream, &records("d", 0, 20, 13)).await;
    let expected = on(&latest, &shard);
    wait_for("the records put after it", PATIENCE, || async {
        recorder
            .delivered()
            .iter()
            .filter(|d| d.shard_id == shard)
            .count()
            >= expected.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: BTreeSet<String> = recorder
        .delivered()
        .into_iter()
        .filter(|d| d.shard_id == shard)
        .map(|d| d.data)
        .collect();
    assert_eq!(got, expected, "nothing put before");
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_workers_lease_is_refused_and_nothing_is_written() {
    let kinesis = kinesis().await;
    let stream = unique("admin-live");
    create_stream(&kinesis, &stream, 1).await;
    let app = unique("admin-live-app");
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w-live"), &recorder).await;
    wait_for("the lease held", PATIENCE, || async {
        !worker.status.borrow().held_leases.is_empty()
    })
    .await;
    let shard = worker.status.borrow().held_leases.first().unwrap().clone();
    let store = table(&app).await;
    let before = stored(&store, &shard).await;

    let out = admin(
        &app,
        &[
            "set-checkpoint",
            "--shard",
            &shard,
            "--to",
            "latest",
            "--observe",
            OBSERVE,
        ],
    )
    .await;
    let refused = failed_with(&out, 3);
    assert!(
        refused.contains("is owned by `w-live`, which renewed it within 1.5s"),
        "{refused}"
    );
    let out = admin(
        &app,
        &[
            "set-checkpoint",
            "--shard",
            &shard,
            "--to",
            "latest",
            "--observe",
            "0",
        ],
    )
    .await;
    let unwatched = failed_with(&out, 3);
    assert!(unwatched.contains("was not watched"), "{unwatched}");
    let out = admin(
        &app,
        &[
            "release",
            "--worker",
            "w-live",
            "--observe",
            OBSERVE,
            "--json",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the report");
    assert_eq!(report["leases"][0]["outcome"], "refused", "{report:#}");
    let out = admin(&app, &["delete-table", "--yes", "--observe", OBSERVE]).await;
    let active = failed_with(&out, 3);
    assert!(active.contains(&format!("{shard} (w-live)")), "{active}");

    let after = stored(&store, &shard).await;
    assert_eq!(after.owner.as_deref(), Some("w-live"), "still the worker's");
    assert_eq!(after.checkpoint, before.checkpoint, "nothing written");
    assert_eq!(worker.status.borrow().held_leases.len(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_lease_is_refused_unless_forced() {
    let app = unique("admin-finished-app");
    let store = table(&app).await;
    let key = "shardId-000000000007";
    let before = put_lease(&store, key, "orders", Checkpoint::ShardEnd, None).await;
    let out = admin(
        &app,
        &["set-checkpoint", "--shard", key, "--to", "trim-horizon"],
    )
    .await;
    let refused = failed_with(&out, 3);
    assert!(refused.contains("is finished (SHARD_END)"), "{refused}");
    assert_eq!(stored(&store, key).await, before, "nothing written");

    let doc = json(
        &admin(
            &app,
            &[
                "set-checkpoint",
                "--shard",
                key,
                "--to",
                "trim-horizon",
                "--force",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(doc["before"]["checkpoint"], "SHARD_END");
    assert_eq!(doc["after"]["checkpoint"], "TRIM_HORIZON");
    let after = stored(&store, key).await;
    assert_eq!(after.checkpoint, Checkpoint::TrimHorizon);
    assert_eq!(
        after.counter,
        before.counter + 1,
        "one write: it was unowned"
    );
}
