//! `kcl-admin` as a process against the real servers (kinesis-mock and DynamoDB Local), with
//! workers running in the test: what it shows of the lease table (`inspect`), how it moves a
//! checkpoint (`set_checkpoint`), taking a lease from a live worker (`force`), releasing a
//! worker's leases (`release`), deleting the table (`delete_table`) and a multi-stream
//! table by stream (`streams`).
//!
//! The workers renew every 500 ms and kcl-admin watches 1.5 s (`--observe`), so a live
//! worker's leases are seen renewed; their leases last 30 s, so a lease written as owned by a
//! worker that does not run is not taken by them while a test runs, unless kcl-admin frees it.

mod consumers;
mod delete_table;
mod force;
mod inspect;
mod release;
mod set_checkpoint;
mod streams;

use std::process::{Output, Stdio};
use std::time::Duration;

use kcl_core::{
    Checkpoint, InitialPosition, Lease, LeaseConfig, LeaseStore, LeaseUpdate, PollingConfig,
    WorkerConfig,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{dynamodb, example_binary, sdk_config};
use tokio::process::Command;

/// The watch window given to kcl-admin: three renewal intervals of the test workers.
const OBSERVE: &str = "1500ms";
/// The lease duration of the test workers.
const LEASE_DURATION: Duration = Duration::from_secs(30);

fn lease_config() -> LeaseConfig {
    LeaseConfig::default()
        .with_lease_duration(LEASE_DURATION)
        .with_renewal_interval(Duration::from_millis(500))
        .with_taker_interval(Duration::from_millis(500))
        .with_handoff_timeout(LEASE_DURATION)
        // No balancing by handoff: a worker must not ask a worker that does not run.
        .with_max_leases_to_steal(0)
}

fn config(app: &str, stream: &str, worker: &str) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_lease(lease_config())
        .with_polling(
            PollingConfig::default().with_idle_time_between_empty_reads(Duration::from_millis(200)),
        )
}

/// Runs `kcl-admin --app APP ARGS...`, without a terminal on stdin.
async fn admin(app: &str, args: &[&str]) -> Output {
    sdk_config().await; // fails loudly without the local servers
    Command::new(example_binary("kcl-admin"))
        .args(["--app", app])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run kcl-admin")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON document of a run that succeeded.
fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "kcl-admin failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", stdout(out)))
}

/// Asserts the exit code, and returns stderr.
fn failed_with(out: &Output, code: i32) -> String {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {text}");
    assert!(
        out.stdout.is_empty(),
        "no output on failure: {}",
        stdout(out)
    );
    text
}

/// The lease table of `app`, created if missing.
async fn table(app: &str) -> DynamoLeaseStore {
    let store = DynamoLeaseStore::new(dynamodb().await, app);
    store.initialize().await.expect("lease table");
    store
}

/// Writes a lease of `key` at `checkpoint`, owned by `owner` (a worker that does not run)
/// when given, as a worker would have left it.
async fn put_lease(
    store: &DynamoLeaseStore,
    key: &str,
    stream: &str,
    checkpoint: Checkpoint,
    owner: Option<&str>,
) -> Lease {
    let lease = Lease::new(key, Checkpoint::TrimHorizon).with_stream_name(stream);
    assert!(store.create_lease_if_absent(&lease).await.unwrap());
    let mut lease = store.get_lease(key).await.unwrap().expect("created");
    if checkpoint != Checkpoint::TrimHorizon {
        let update = LeaseUpdate::Checkpoint { checkpoint };
        lease = store
            .update_lease(key, &lease.fence(), &update)
            .await
            .unwrap();
    }
    if let Some(owner) = owner {
        let update = LeaseUpdate::Take {
            new_owner: owner.to_owned(),
        };
        lease = store
            .update_lease(key, &lease.fence(), &update)
            .await
            .unwrap();
    }
    lease
}

/// The lease of `key`.
async fn stored(store: &DynamoLeaseStore, key: &str) -> Lease {
    store.get_lease(key).await.unwrap().expect("the lease")
}

/// The entry of `lease_key` in a `leases --json` document.
fn row<'a>(doc: &'a serde_json::Value, lease_key: &str) -> &'a serde_json::Value {
    doc["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .find(|l| l["lease_key"] == lease_key)
        .unwrap_or_else(|| panic!("{lease_key} not listed: {doc:#}"))
}
