//! The lease store and renewal under DynamoDB faults injected by a proxy in front of DynamoDB
//! Local: throttling, 500s, dropped connections, lost answers, a call that never answers.

use std::time::Duration;

use std::collections::BTreeMap;

use kcl_core::{
    Checkpoint, Error, ErrorKind, InitialPosition, Lease, LeaseConfig, LeaseFence, LeaseStore,
    LeaseUpdate, WorkerConfig,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    Event, PATIENCE, Recorder, create_stream, dynamodb, kinesis, lease_owners, lease_store_via,
    put_records, records, sdk_config, start_worker_on, unique, wait_for,
};

async fn proxy() -> FaultProxy {
    sdk_config().await;
    let upstream = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap();
    FaultProxy::start(&upstream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_failures_are_classified_from_the_wire() {
    let proxy = proxy().await;
    let table = unique("classify");
    let direct = DynamoLeaseStore::new(dynamodb().await, &table);
    direct.initialize().await.unwrap();
    direct
        .create_lease_if_absent(&Lease::new("shardId-1", Checkpoint::TrimHorizon))
        .await
        .unwrap();
    // One attempt per call: what the SDK would retry reaches the store as an error.
    let store = lease_store_via(&proxy.url(), &table, 1).await;

    for (fault, kind) in [
        (Fault::THROTTLING, ErrorKind::Throttled),
        (Fault::THROUGHPUT_EXCEEDED, ErrorKind::Throttled),
        (Fault::INTERNAL_ERROR, ErrorKind::Transient),
        (Fault::DropConnection, ErrorKind::Transient),
    ] {
        proxy.inject(Rule::on("GetItem", fault.clone()).times(1));
        let err = store.get_lease("shardId-1").await.unwrap_err();
        assert_eq!(err.kind(), kind, "{fault:?}: {err:?}");
        assert!(err.is_retryable());
    }
    assert!(
        store.get_lease("shardId-1").await.unwrap().is_some(),
        "faults were one-off"
    );

    // A failed condition comes back typed, with the stored lease.
    let stale = LeaseFence {
        owner: Some("nobody".into()),
        counter: 7,
    };
    match store
        .update_lease("shardId-1", &stale, &LeaseUpdate::Renew)
        .await
    {
        Err(Error::LeaseConditionFailed {
            current: Some(current),
            ..
        }) => assert_eq!(current.counter, 0),
        other => panic!("{other:?}"),
    }
    // With the SDK's own retries (3 attempts), two throttled answers are absorbed.
    let retrying = lease_store_via(&proxy.url(), &table, 3).await;
    proxy.inject(Rule::on("GetItem", Fault::THROTTLING).times(2));
    assert!(retrying.get_lease("shardId-1").await.unwrap().is_some());
    assert_eq!(proxy.faults()["GetItem"], 6);
}

async fn worker_through_proxy(
    proxy: &FaultProxy,
    stream: &str,
    recorder: &Recorder,
) -> (String, kcl_integration_tests::RunningWorker) {
    let app = unique("faulty-app");
    let config = WorkerConfig::new(&app, stream)
        .with_worker_id("w1")
        .with_initial_position(InitialPosition::TrimHorizon);
    let (stream_client, _) = kcl_integration_tests::clients(&config).await;
    let store = std::sync::Arc::new(lease_store_via(&proxy.url(), &app, 3).await);
    (app, start_worker_on(config, recorder, stream_client, store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_rides_out_throttling_and_server_errors_within_the_lease_duration() {
    let proxy = proxy().await;
    let kinesis = kinesis().await;
    let stream = unique("renew-faults");
    create_stream(&kinesis, &stream, 4).await;
    let recorder = Recorder::default();
    let (app, worker) = worker_through_proxy(&proxy, &stream, &recorder).await;
    wait_for("4 leases", PATIENCE, || async {
        lease_owners(&app).await.get("w1") == Some(&4)
    })
    .await;

    // 10 s of trouble with a 10 s lease: 4 s of throttling, then 6 s of every other write
    // failing with a 500. Renewals every 3.5 s must get through often enough.
    proxy.inject(Rule::on("UpdateItem", Fault::THROTTLING));
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.clear();
    proxy.inject(Rule::on("UpdateItem", Fault::INTERNAL_ERROR).every(2));
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.clear();
    assert!(
        proxy.faults()["UpdateItem"] >= 4,
        "faults injected: {:?}",
        proxy.faults()
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        recorder
            .all_events()
            .iter()
            .all(|e| e.2 != Event::LeaseLost),
        "{:?}",
        recorder.all_events()
    );
    assert_eq!(
        lease_owners(&app).await.get("w1"),
        Some(&4),
        "every lease still held"
    );
    let puts = put_records(&kinesis, &stream, &records("after", 0, 40, 7)).await;
    wait_for("records after the faults", PATIENCE, || async {
        recorder.count() >= puts.len()
    })
    .await;
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_answer_is_lost_does_not_lose_the_lease() {
    let proxy = proxy().await;
    let kinesis = kinesis().await;
    let stream = unique("lost-answer");
    create_stream(&kinesis, &stream, 2).await;
    let recorder = Recorder::default();
    let (app, worker) = worker_through_proxy(&proxy, &stream, &recorder).await;
    wait_for("2 leases", PATIENCE, || async {
        lease_owners(&app).await.get("w1") == Some(&2)
    })
    .await;
    // The next two writes take effect but their answers never arrive: the SDK's retry then
    // meets a moved counter. The worker must see its own write there, not a thief.
    proxy.inject(Rule::on("UpdateItem", Fault::DropAnswer).times(2));
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(proxy.faults()["UpdateItem"], 2);
    assert!(
        recorder
            .all_events()
            .iter()
            .all(|e| e.2 != Event::LeaseLost),
        "{:?}",
        recorder.all_events()
    );
    assert_eq!(lease_owners(&app).await.get("w1"), Some(&2));
    let puts = put_records(&kinesis, &stream, &records("x", 0, 20, 5)).await;
    wait_for("records", PATIENCE, || async {
        recorder.count() >= puts.len()
    })
    .await;
    worker.stop().await.unwrap();
}

// Defect 5 of issue 9: one UpdateItem stuck on a dead pooled connection, while every other call
// works. A renewal used to be bounded only by the lease's end (the request timeout was the
// whole lease duration), so the lease was lost, the shard paused and records came twice. Each
// attempt now has a short timeout and is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_update_stuck_on_a_dead_connection_loses_no_lease() {
    let proxy = proxy().await;
    let kinesis = kinesis().await;
    let stream = unique("stuck-call");
    create_stream(&kinesis, &stream, 2).await;
    let recorder = Recorder::default();
    let (app, worker) = worker_through_proxy(&proxy, &stream, &recorder).await;
    wait_for("2 leases", PATIENCE, || async {
        lease_owners(&app).await.get("w1") == Some(&2)
    })
    .await;
    let before = put_records(&kinesis, &stream, &records("before", 0, 20, 5)).await;
    wait_for("the first records", PATIENCE, || async {
        recorder.count() >= before.len()
    })
    .await;

    // The next lease write (a renewal, or a checkpoint) never answers.
    proxy.inject(Rule::on("UpdateItem", Fault::Hang).times(1));
    wait_for("the stuck call", PATIENCE, || async {
        proxy.faults().get("UpdateItem") == Some(&1)
    })
    .await;
    // Past the end of the lease that call was renewing, had it not been retried.
    tokio::time::sleep(LeaseConfig::default().lease_duration + Duration::from_secs(2)).await;
    assert!(
        recorder
            .all_events()
            .iter()
            .all(|e| e.2 != Event::LeaseLost),
        "{:?}",
        recorder.all_events()
    );
    assert_eq!(lease_owners(&app).await.get("w1"), Some(&2));

    let after = put_records(&kinesis, &stream, &records("after", 20, 20, 5)).await;
    wait_for("the later records", PATIENCE, || async {
        recorder.count() >= before.len() + after.len()
    })
    .await;
    let mut deliveries: BTreeMap<String, usize> = BTreeMap::new();
    for d in recorder.delivered() {
        *deliveries.entry(d.data).or_default() += 1;
    }
    assert_eq!(deliveries.len(), before.len() + after.len());
    assert!(
        deliveries.values().all(|n| *n == 1),
        "records delivered twice: {:?}",
        deliveries
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    worker.stop().await.unwrap();
}
