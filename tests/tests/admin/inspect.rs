//! `leases` and `workers`: each lease state, the lag, and each owner's renewals.

use kcl_core::{Checkpoint, SequenceNumber};
use kcl_integration_tests::{
    PATIENCE, Recorder, create_stream, kinesis, put_records, puts_by_shard, records, start_worker,
    unique, wait_for,
};
use tokio::time::Instant;

use super::{
    OBSERVE, admin, config, failed_with, json, lease_config, put_lease, row, stdout, stored, table,
};

/// The line of `lease_key` in a text table.
fn line<'a>(text: &'a str, lease_key: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(lease_key))
        .unwrap_or_else(|| panic!("{lease_key} not listed:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_workers_show_each_state_and_the_lag() {
    let kinesis = kinesis().await;
    let stream = unique("admin-inspect");
    create_stream(&kinesis, &stream, 4).await;
    let app = unique("admin-inspect-app");
    let puts = put_records(&kinesis, &stream, &records("r", 0, 80, 37)).await;
    let put_done = Instant::now();
    let by_shard = puts_by_shard(&puts);
    let shards: Vec<String> = by_shard.keys().cloned().collect();
    assert_eq!(shards.len(), 4, "records on every shard");

    // A worker that stopped without releasing its lease, a finished shard, and two free
    // leases, of which the live worker (limited to one) takes one.
    let store = table(&app).await;
    let stopped = &shards[1];
    let finished = &shards[2];
    put_lease(&store, &shards[0], &stream, Checkpoint::TrimHorizon, None).await;
    put_lease(
        &store,
        stopped,
        &stream,
        Checkpoint::TrimHorizon,
        Some("w-stopped"),
    )
    .await;
    put_lease(&store, finished, &stream, Checkpoint::ShardEnd, None).await;
    put_lease(&store, &shards[3], &stream, Checkpoint::TrimHorizon, None).await;
    let recorder = Recorder::default();
    let live_config =
        config(&app, &stream, "w-live").with_lease(lease_config().with_max_leases_per_worker(1));
    let worker = start_worker(live_config, &recorder).await;
    let caught_up = |shard: &str| {
        Checkpoint::at(
            SequenceNumber::new(by_shard[shard].last().unwrap().as_str()).unwrap(),
            0,
        )
    };
    wait_for(
        "the live worker caught up with its shard",
        PATIENCE,
        || async {
            let held = worker.status.borrow().held_leases.clone();
            match held.first() {
                Some(shard) => stored(&store, shard).await.checkpoint == caught_up(shard),
                None => false,
            }
        },
    )
    .await;
    let live = worker.status.borrow().held_leases.first().unwrap().clone();
    let unowned = if live == shards[0] {
        &shards[3]
    } else {
        &shards[0]
    };

    let waited = put_done.elapsed();
    let doc = json(
        &admin(
            &app,
            &[
                "--stream",
                &stream,
                "leases",
                "--json",
                "--observe",
                OBSERVE,
            ],
        )
        .await,
    );
    assert_eq!(doc["table"], app.as_str());
    assert_eq!(doc["stream"], stream.as_str());
    assert_eq!(doc["observed_ms"], 1500);
    assert_eq!(doc["leases"].as_array().unwrap().len(), 4);
    assert_eq!(doc["invalid"].as_array().unwrap().len(), 0);

    let active = row(&doc, &live);
    assert_eq!(active["state"], "active", "{active:#}");
    assert_eq!(active["owner"], "w-live");
    assert_eq!(
        active["checkpoint"],
        by_shard[&live].last().unwrap().as_str()
    );
    assert_eq!(active["lag"]["lag_ms"], 0, "caught up: {active:#}");
    assert!(active["lag"]["next_sequence_number"].is_null());

    let expired = row(&doc, stopped);
    assert_eq!(expired["state"], "expired", "{expired:#}");
    assert_eq!(expired["owner"], "w-stopped");
    for (name, shard) in [("expired", stopped), ("unowned", unowned)] {
        let lag = &row(&doc, shard)["lag"];
        assert_eq!(
            lag["next_sequence_number"],
            by_shard[shard.as_str()][0].as_str(),
            "{name}: nothing processed, the first record is next"
        );
        let lag_ms = lag["lag_ms"].as_u64().expect("a lag");
        // The first record arrived before the puts ended, at least `waited` ago.
        assert!(
            lag_ms + 100 >= waited.as_millis() as u64,
            "{name}: lag {lag_ms} ms, records put {waited:?} ago"
        );
        assert!(lag["millis_behind_latest"].is_u64(), "{lag:#}");
    }
    let free = row(&doc, unowned);
    assert_eq!(free["state"], "unowned", "{free:#}");
    assert!(free["owner"].is_null());
    let done = row(&doc, finished);
    assert_eq!(done["state"], "finished", "{done:#}");
    assert_eq!(done["checkpoint"], "SHARD_END");
    assert_eq!(done["lag"]["lag_ms"], 0);

    let text = stdout(&admin(&app, &["--stream", &stream, "leases", "--observe", OBSERVE]).await);
    let header = text.lines().nth(1).expect("a header");
    for column in [
        "shard",
        "owner",
        "counter",
        "checkpoint",
        "parents",
        "state",
        "lag",
        "behind",
    ] {
        assert!(header.contains(column), "{column} missing: {header}");
    }
    assert!(line(&text, &live).contains("w-live"), "{text}");
    assert!(line(&text, &live).contains("active"), "{text}");
    assert!(line(&text, stopped).contains("expired"), "{text}");
    assert!(line(&text, unowned).contains("unowned"), "{text}");
    assert!(line(&text, finished).contains("finished"), "{text}");

    // Not watched: owned, whether alive or not; without --stream, no lag.
    let quick = json(&admin(&app, &["leases", "--json", "--observe", "0"]).await);
    assert_eq!(row(&quick, &live)["state"], "owned");
    assert_eq!(row(&quick, stopped)["state"], "owned");
    assert!(row(&quick, &live).get("lag").is_none(), "{quick:#}");
    assert_eq!(quick["observed_ms"], 0);

    let workers = json(&admin(&app, &["workers", "--json", "--observe", OBSERVE]).await);
    let list = workers["workers"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{workers:#}");
    let of = |id: &str| list.iter().find(|w| w["worker"] == id).expect(id);
    assert_eq!(of("w-live")["leases"], 1);
    assert_eq!(of("w-live")["renewed"], 1);
    assert_eq!(of("w-live")["renewing"], true);
    assert_eq!(of("w-stopped")["leases"], 1);
    assert_eq!(of("w-stopped")["renewed"], 0);
    assert_eq!(of("w-stopped")["renewing"], false);
    let text = stdout(&admin(&app, &["workers", "--observe", OBSERVE]).await);
    assert!(
        line(&text, "w-live").contains("renewed within 1.5s"),
        "{text}"
    );
    assert!(
        line(&text, "w-stopped").contains("not renewed for ≥1.5s (expired?)"),
        "{text}"
    );

    let missing = admin(
        &app,
        &["--stream", "no-such-stream-xq", "leases", "--observe", "0"],
    )
    .await;
    let message = failed_with(&missing, 4);
    assert!(
        message.contains("stream `no-such-stream-xq` does not exist"),
        "{message}"
    );
    worker.stop().await.unwrap();
}
