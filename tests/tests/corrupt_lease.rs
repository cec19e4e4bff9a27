//! A corrupt lease of a live shard against the real servers (issue 10, defect 9): a lease item
//! whose `leaseCounter` was rewritten as text is skipped by the worker (its shard is not
//! processed) and counted in `WorkerStatus::invalid_lease_items`; `kcl-admin leases` lists it
//! as `INVALID`, and `kcl-admin repair` rewrites it so the worker takes the shard and processes
//! it from its checkpoint. The repair never guesses a checkpoint.

use std::collections::BTreeSet;
use std::process::{Output, Stdio};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use kcl_core::{Checkpoint, InitialPosition, Lease, LeaseStore, WorkerConfig};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{
    PATIENCE, Recorder, create_stream, dynamodb, example_binary, kinesis, put_records, records,
    sdk_config, start_worker, unique, wait_for,
};
use tokio::process::Command;

/// Partition keys of the test records: enough to reach both shards.
const KEYS: usize = 13;
/// How long a skipped shard is watched for deliveries that must not come: a few taking rounds
/// (2 s each).
const SKIPPED_FOR: Duration = Duration::from_secs(6);

fn config(app: &str, stream: &str, worker: &str) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
}

/// Runs `kcl-admin --app APP ARGS...` against the local DynamoDB.
async fn kcl_admin(app: &str, args: &[&str]) -> Output {
    sdk_config().await; // fails loudly without the local servers
    Command::new(example_binary("kcl-admin"))
        .args(["--app", app])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run kcl-admin")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Overwrites one attribute of a lease item with a string, as an operator editing the item by
/// hand might.
async fn overwrite_with_text(table: &str, lease_key: &str, attribute: &str, value: &str) {
    dynamodb()
        .await
        .update_item()
        .table_name(table)
        .key("leaseKey", AttributeValue::S(lease_key.to_owned()))
        .update_expression("SET #a = :text")
        .expression_attribute_names("#a", attribute)
        .expression_attribute_values(":text", AttributeValue::S(value.to_owned()))
        .send()
        .await
        .expect("UpdateItem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_lease_is_skipped_counted_listed_and_processed_again_after_kcl_admin_repair() {
    let kinesis = kinesis().await;
    let stream = unique("corrupt");
    create_stream(&kinesis, &stream, 2).await;
    let app = unique("corrupt-app");

    // A first worker creates both leases, processes the first records and releases them.
    let first = put_records(&kinesis, &stream, &records("first", 0, 40, KEYS)).await;
    let shards: BTreeSet<String> = first.iter().map(|p| p.shard_id.clone()).collect();
    assert_eq!(shards.len(), 2, "records on both shards");
    let (valid, corrupt) = (
        shards.first().unwrap().clone(),
        shards.last().unwrap().clone(),
    );
    let before = Recorder::default();
    let w1 = start_worker(config(&app, &stream, "w1"), &before).await;
    wait_for("the first records", PATIENCE, || async {
        before.count() >= first.len()
    })
    .await;
    w1.stop().await.unwrap();

    overwrite_with_text(&app, &corrupt, "leaseCounter", "7").await;
    let listed = kcl_admin(&app, &["leases", "--observe", "0"]).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let stdout = text(&listed.stdout);
    assert!(
        stdout.contains(&format!(
            "INVALID {corrupt}: attribute `leaseCounter` is a string, not a number"
        )),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with(&valid)),
        "the valid lease is listed: {stdout}"
    );

    // A worker skips the corrupt item: its shard is not processed.
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w2"), &recorder).await;
    let second = put_records(&kinesis, &stream, &records("second", 0, 40, KEYS)).await;
    let on = |shard: &str| -> BTreeSet<String> {
        recorder
            .delivered()
            .into_iter()
            .filter(|d| d.shard_id == shard)
            .map(|d| d.data)
            .collect()
    };
    let put_on = |puts: &[kcl_integration_tests::Put], shard: &str| -> BTreeSet<String> {
        puts.iter()
            .filter(|p| p.shard_id == shard)
            .map(|p| p.data.clone())
            .collect()
    };
    wait_for(
        "the valid shard's records and the corrupt item counted",
        PATIENCE,
        || async {
            on(&valid) == put_on(&second, &valid) && worker.status.borrow().invalid_lease_items == 1
        },
    )
    .await;
    tokio::time::sleep(SKIPPED_FOR).await;
    assert!(
        on(&corrupt).is_empty(),
        "the corrupt shard is not processed"
    );
    let status = worker.status.borrow().clone();
    assert_eq!(status.held_leases, BTreeSet::from([valid.clone()]));
    assert_eq!(status.invalid_lease_items, 1);

    // The repair: the counter replaced, the owner cleared, the checkpoint kept.
    let repaired = kcl_admin(&app, &["repair", &corrupt]).await;
    assert!(repaired.status.success(), "{}", text(&repaired.stderr));
    let stdout = text(&repaired.stdout);
    assert!(stdout.contains("leaseCounter: \"7\" -> "), "{stdout}");
    let third = put_records(&kinesis, &stream, &records("third", 0, 40, KEYS)).await;
    let mut expected = put_on(&second, &corrupt);
    expected.extend(put_on(&third, &corrupt));
    wait_for(
        "the repaired shard taken and processed",
        PATIENCE,
        || async { on(&corrupt) == expected },
    )
    .await;
    let status = worker.status.borrow().clone();
    assert_eq!(status.held_leases, shards, "both leases held");
    assert_eq!(status.invalid_lease_items, 0);
    assert!(
        !recorder
            .delivered()
            .iter()
            .any(|d| d.data.starts_with("first")),
        "resumed from the kept checkpoints: nothing of the first run delivered again"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcl_admin_repair_never_guesses_a_checkpoint() {
    let app = unique("repair-app");
    let store = DynamoLeaseStore::new(dynamodb().await, &app);
    store.initialize().await.unwrap();
    let key = "shardId-000000000003";
    let lease = Lease::new(key, Checkpoint::TrimHorizon).with_stream_name("orders");
    assert!(store.create_lease_if_absent(&lease).await.unwrap());
    overwrite_with_text(&app, key, "checkpoint", "somewhere in the middle").await;

    let refused = kcl_admin(&app, &["repair", key]).await;
    assert_eq!(refused.status.code(), Some(3), "refused");
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("does not guess") && stderr.contains("--checkpoint"),
        "{stderr}"
    );
    assert!(
        matches!(
            store.get_lease(key).await,
            Err(kcl_core::Error::InvalidLeaseItem {
                attribute: "checkpoint",
                ..
            })
        ),
        "nothing written"
    );

    let repaired = kcl_admin(&app, &["repair", key, "--checkpoint", "TRIM_HORIZON"]).await;
    assert!(repaired.status.success(), "{}", text(&repaired.stderr));
    let stdout = text(&repaired.stdout);
    assert!(
        stdout.contains("checkpoint: \"somewhere in the middle\" -> \"TRIM_HORIZON\""),
        "{stdout}"
    );
    let stored = store.get_lease(key).await.unwrap().expect("the lease");
    assert_eq!(stored.checkpoint, Checkpoint::TrimHorizon);
    assert_eq!(stored.owner, None);
    assert_eq!(stored.stream_name.as_deref(), Some("orders"), "kept");
    assert!(stored.counter > lease.counter);

    let again = kcl_admin(&app, &["repair", key]).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("nothing to repair"));
    let missing = kcl_admin(&app, &["repair", "shardId-000000000099"]).await;
    assert_eq!(missing.status.code(), Some(4), "not found");
    assert!(text(&missing.stderr).contains("has no item with key"));
}
