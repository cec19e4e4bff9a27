//! `streams`: a multi-stream application's table by stream, with a live worker's streams
//! seen processed and, once the worker is gone without releasing them, not; a single-stream
//! table refused.

use std::collections::BTreeSet;
use std::sync::Arc;

use kcl_core::{
    CancellationToken, Checkpoint, FixedStreams, InitialPosition, MultiStreamConfig, StreamConfig,
};
use kcl_dynamo_lease::AwsWorkerBuilder;
use kcl_integration_tests::{
    PATIENCE, Recorder, create_stream, kinesis, sdk_config, unique, wait_for,
};

use super::{OBSERVE, admin, config, failed_with, json, put_lease, stdout, table};

/// The `streams --json` entry of `name`.
fn stream<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {doc:#}"))
}

/// (leases, finished, unowned, active, expired, owned) of a `streams --json` entry.
fn counts(entry: &serde_json::Value) -> [u64; 6] {
    [
        "leases", "finished", "unowned", "active", "expired", "owned",
    ]
    .map(|k| entry[k].as_u64().unwrap_or_else(|| panic!("{k}: {entry}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_shows_each_stream_processed_or_not() {
    let kinesis = kinesis().await;
    let (orders, clicks) = (unique("admin-ms-orders"), unique("admin-ms-clicks"));
    create_stream(&kinesis, &orders, 2).await;
    create_stream(&kinesis, &clicks, 1).await;
    let app = unique("admin-ms-app");
    let tracker = FixedStreams(
        [&orders, &clicks]
            .map(|n| StreamConfig::new(n).with_initial_position(InitialPosition::TrimHorizon))
            .to_vec(),
    );
    let recorder = Recorder::default();
    let factory = recorder.factory("w-live");
    let worker = AwsWorkerBuilder::new(
        &sdk_config().await,
        config(&app, "multi-stream", "w-live").with_multi_stream(MultiStreamConfig::default()),
    )
    .build_multi_stream(Arc::new(tracker), factory)
    .expect("valid config");
    let status = worker.status();
    let task = tokio::spawn(worker.run(CancellationToken::new()));
    wait_for("the worker holds every lease", PATIENCE, || async {
        status.borrow().held_leases.len() == 3
    })
    .await;

    let doc = json(&admin(&app, &["streams", "--observe", OBSERVE, "--json"]).await);
    assert_eq!(doc["streams"].as_array().unwrap().len(), 2, "{doc:#}");
    assert_eq!(counts(stream(&doc, &orders)), [2, 0, 0, 2, 0, 0]);
    assert_eq!(counts(stream(&doc, &clicks)), [1, 0, 0, 1, 0, 0]);
    for name in [&orders, &clicks] {
        let entry = stream(&doc, name);
        assert_eq!(entry["workers"], serde_json::json!(["w-live"]));
        let epoch = entry["creation_epoch"].as_u64().unwrap();
        assert!(epoch > 1_600_000_000, "{entry}");
        let identity = entry["stream"].as_str().unwrap();
        assert!(
            identity.ends_with(&format!(":{name}:{epoch}")),
            "{identity}"
        );
    }
    let text = stdout(&admin(&app, &["streams", "--observe", OBSERVE]).await);
    assert!(text.contains("2 stream(s)"), "{text}");
    assert_eq!(text.matches("yes (renewed within").count(), 2, "{text}");

    // The worker dies without releasing its leases: still owned, no longer renewed.
    task.abort();
    let _ = task.await;
    let doc = json(&admin(&app, &["streams", "--observe", OBSERVE, "--json"]).await);
    assert_eq!(counts(stream(&doc, &orders)), [2, 0, 0, 0, 2, 0]);
    assert_eq!(counts(stream(&doc, &clicks)), [1, 0, 0, 0, 1, 0]);
    let text = stdout(&admin(&app, &["streams", "--observe", OBSERVE]).await);
    assert_eq!(text.matches("yes (renewed").count(), 0, "{text}");
    // Not watched: owned, neither active nor expired.
    let doc = json(&admin(&app, &["streams", "--observe", "0", "--json"]).await);
    assert_eq!(counts(stream(&doc, &orders)), [2, 0, 0, 0, 0, 2]);
    assert_eq!(doc["observed_ms"], 0);
    let names: BTreeSet<&str> = doc["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from([orders.as_str(), clicks.as_str()]));
}

#[tokio::test]
async fn streams_refuses_a_single_stream_table() {
    let app = unique("admin-ss-app");
    let store = table(&app).await;
    put_lease(
        &store,
        "shardId-000000000000",
        "orders",
        Checkpoint::TrimHorizon,
        None,
    )
    .await;
    let out = admin(&app, &["streams", "--observe", "0"]).await;
    let err = failed_with(&out, 2);
    assert!(err.contains("single-stream"), "{err}");
    assert!(err.contains("shardId-000000000000"), "{err}");
}
