//! Enhanced fan-out against kinesis-mock (SubscribeToShard over plain HTTP/1.1) and DynamoDB
//! Local: the consumer registered at start, a 4-shard stream consumed fully by two workers
//! with order kept and nothing delivered twice, a subscription refused while another one
//! for the same consumer and shard is open, and (through the fault proxy) subscribes refused
//! or dropped and subscriptions broken off or silenced mid-stream.
//!
//! kinesis-mock never ends a closed shard through fan-out (no child shards, never a null
//! continuation): shard end through fan-out runs on ferrokinesis (a Rust Kinesis server,
//! started in this process), which ends a closed shard's subscription with its child shards.

use std::sync::Arc;
use std::time::Duration;

use kcl_core::{
    FanOutConfig, InitialPosition, LeaseConfig, PollingConfig, Retrieval, StartingPosition,
    WorkerConfig,
};
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    KeyedProducer, PATIENCE, Recorder, assert_complete_and_in_key_order, by_shard, clients,
    create_stream, distinct_delivered, evenly_owned, kinesis, put_records, puts_by_shard, records,
    sdk_config, split_shard, start_worker, start_worker_on, stream_client_via, unique, wait_for,
};

fn config(app: &str, stream: &str, worker: &str) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_lease(
            LeaseConfig::default()
                .with_lease_duration(Duration::from_secs(6))
                .with_renewal_interval(Duration::from_secs(2))
                .with_taker_interval(Duration::from_secs(1))
                .with_handoff_timeout(Duration::from_secs(6)),
        )
        .with_polling(PollingConfig::default())
        .with_retrieval(Retrieval::FanOut(FanOutConfig::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_fan_out_workers_consume_a_four_shard_stream_fully_and_in_order() {
    sdk_config().await;
    let kinesis = kinesis().await;
    let stream = unique("fanout");
    create_stream(&kinesis, &stream, 4).await;
    let mut puts = put_records(&kinesis, &stream, &records("a", 0, 400, 29)).await;
    let app = unique("fanout-app");
    let recorder = Recorder::default();
    let first = start_worker(config(&app, &stream, "w0"), &recorder).await;
    let second = start_worker(config(&app, &stream, "w1"), &recorder).await;
    wait_for("an even split", PATIENCE, || evenly_owned(&app, 2, 4)).await;
    puts.extend(put_records(&kinesis, &stream, &records("b", 0, 400, 29)).await);
    wait_for("every record", PATIENCE, || async {
        recorder.count() >= 800
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Both workers read as the application's consumer, registered by whichever came first.
    let (client, _) = clients(&config(&app, &stream, "check")).await;
    let consumer = client
        .describe_stream_consumer(&app)
        .await
        .unwrap()
        .expect("the consumer was registered");
    assert_eq!(consumer.name, app);
    let statuses = [
        first.status.borrow().clone(),
        second.status.borrow().clone(),
    ];
    for status in &statuses {
        assert!(status.subscriptions >= 1, "{status:?}");
        assert_eq!(status.subscription_failures, 0, "{status:?}");
    }
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    // Every record once, in shard order, by one worker at a time.
    assert_eq!(by_shard(&recorder.delivered()), puts_by_shard(&puts));
    assert_eq!(recorder.overlaps(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_refused_while_another_is_open_is_retried_until_it_succeeds() {
    sdk_config().await;
    let kinesis = kinesis().await;
    let stream = unique("fanout-busy");
    create_stream(&kinesis, &stream, 1).await;
    let puts = put_records(&kinesis, &stream, &records("r", 0, 100, 7)).await;
    let app = unique("fanout-busy-app");
    let config = config(&app, &stream, "w0");
    let (client, _) = clients(&config).await;
    let consumer = client.register_stream_consumer(&app).await.unwrap();
    wait_for("the consumer to be active", PATIENCE, || async {
        client
            .describe_stream_consumer(&consumer.arn)
            .await
            .unwrap()
            .is_some_and(|c| c.status == kcl_core::ConsumerStatus::Active)
    })
    .await;
    // Another reader of this consumer holds the only shard's subscription.
    let shard = "shardId-000000000000";
    let held = client
        .subscribe_to_shard(&consumer.arn, shard, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    let recorder = Recorder::default();
    let worker = start_worker(config, &recorder).await;
    wait_for("a refused subscribe", PATIENCE, || async {
        worker.status.borrow().subscribe_refusals >= 1
    })
    .await;
    assert_eq!(recorder.count(), 0, "nothing read while refused");
    drop(held);
    wait_for("every record", PATIENCE, || async {
        recorder.count() >= 100
    })
    .await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();
    assert!(status.subscriptions >= 1, "{status:?}");
    assert_eq!(by_shard(&recorder.delivered()), puts_by_shard(&puts));
}

/// ferrokinesis in this process, on a free port, with subscriptions that end after
/// `session`: the server that ends a closed shard's subscription with its child shards.
async fn ferrokinesis(session: Duration) -> String {
    let options = ferrokinesis::store::StoreOptions {
        create_stream_ms: 0,
        delete_stream_ms: 0,
        update_stream_ms: 0,
        subscribe_to_shard_session_ms: u64::try_from(session.as_millis()).unwrap(),
        ..Default::default()
    };
    let (app, _store) = ferrokinesis::create_app(options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A Kinesis client of `endpoint` (credentials and region from the test environment).
async fn kinesis_at(endpoint: &str) -> aws_sdk_kinesis::Client {
    let sdk = sdk_config().await;
    aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&sdk)
            .endpoint_url(endpoint)
            .build(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_read_through_fan_out_ends_the_parent_and_starts_the_children_after_it() {
    // Sessions of 2 s: every shard is also re-subscribed several times on the way.
    let endpoint = ferrokinesis(Duration::from_secs(2)).await;
    let kinesis = kinesis_at(&endpoint).await;
    let stream = unique("fanout-split");
    create_stream(&kinesis, &stream, 1).await;
    let producer = KeyedProducer::start(kinesis.clone(), &stream, 16, Duration::from_millis(100));
    let app = unique("fanout-split-app");
    let config = config(&app, &stream, "w0");
    let (_, store) = clients(&config).await;
    let client = Arc::new(stream_client_via(&endpoint, &stream, 3).await);
    let recorder = Recorder::default();
    let worker = start_worker_on(config, &recorder, client, store.clone());
    wait_for("records flowing", PATIENCE, || async {
        recorder.count() >= 100
    })
    .await;
    split_shard(&kinesis, &stream, "shardId-000000000000").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let distinct = producer.stop().await;
    wait_for("every record", PATIENCE, || async {
        distinct_delivered(&recorder) >= distinct
    })
    .await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();

    // No key's records out of order across parent and children: the children started only
    // after the parent was read to its end through fan-out.
    assert_complete_and_in_key_order(&recorder, distinct);
    let parent = store
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .expect("the parent's lease");
    assert!(parent.is_finished(), "{parent:?}");
    let children: Vec<String> = recorder
        .delivered()
        .into_iter()
        .map(|d| d.shard_id)
        .filter(|s| s != "shardId-000000000000")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(children.len(), 2, "both children read: {children:?}");
    // Three shards, each subscribed again after its 2 s sessions.
    assert!(status.subscriptions >= 5, "{status:?}");
    assert_eq!(status.subscription_failures, 0, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_and_dropped_subscribes_through_the_proxy_lose_and_repeat_nothing() {
    sdk_config().await;
    let kinesis = kinesis().await;
    let stream = unique("fanout-proxy");
    create_stream(&kinesis, &stream, 2).await;
    let mut puts = put_records(&kinesis, &stream, &records("p", 0, 200, 11)).await;
    let upstream = std::env::var("AWS_ENDPOINT_URL_KINESIS").expect("kinesis-mock");
    let proxy = FaultProxy::start(&upstream).await;
    // Refused outright, then answered on the server but never to the worker: that
    // subscription stays open there, so the next subscribes are refused until it closes.
    proxy.inject(
        Rule::on(
            "SubscribeToShard",
            Fault::Error {
                status: 400,
                code: "ResourceInUseException",
            },
        )
        .times(2),
    );
    proxy.inject(Rule::on("SubscribeToShard", Fault::DropAnswer).times(1));
    proxy.inject(Rule::on("SubscribeToShard", Fault::DropConnection).times(1));
    let app = unique("fanout-proxy-app");
    let config = config(&app, &stream, "w0");
    let (_, store) = clients(&config).await;
    let client = Arc::new(stream_client_via(&proxy.url(), &stream, 1).await);
    let recorder = Recorder::default();
    let worker = start_worker_on(config, &recorder, client, store);
    wait_for("the first records", PATIENCE, || async {
        recorder.count() >= 200
    })
    .await;
    puts.extend(put_records(&kinesis, &stream, &records("q", 0, 200, 11)).await);
    wait_for("every record", PATIENCE, || async {
        recorder.count() >= 400
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();

    assert_eq!(by_shard(&recorder.delivered()), puts_by_shard(&puts));
    assert_eq!(proxy.faults().get("SubscribeToShard"), Some(&4));
    assert!(status.subscribe_refusals >= 2, "{status:?}");
    assert!(
        status.subscribe_refusals + status.subscription_failures >= 4,
        "{status:?}"
    );
    assert_eq!(status.shard_failures, 0, "{status:?}");
}

/// Subscriptions that fail mid-stream (the connection reset while events flow) and that go
/// silent (the connection open, no more events) on kinesis-mock, through the proxy: each is
/// subscribed again after the last event's continuation, and nothing is lost or delivered
/// twice while records keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_broken_off_or_silenced_mid_stream_resume_without_loss_or_repeats() {
    sdk_config().await;
    let kinesis = kinesis().await;
    let stream = unique("fanout-cut");
    create_stream(&kinesis, &stream, 2).await;
    let upstream = std::env::var("AWS_ENDPOINT_URL_KINESIS").expect("kinesis-mock");
    let proxy = FaultProxy::start(&upstream).await;
    proxy.inject(Rule::on("SubscribeToShard", Fault::CutAfter(Duration::from_secs(2))).times(2));
    proxy.inject(
        Rule::on(
            "SubscribeToShard",
            Fault::SilenceAfter(Duration::from_secs(2)),
        )
        .times(1),
    );
    let app = unique("fanout-cut-app");
    // kinesis-mock sends an event every second: 5 s without one is a silent connection.
    let config = config(&app, &stream, "w0").with_retrieval(Retrieval::FanOut(
        FanOutConfig::default().with_event_timeout(Duration::from_secs(5)),
    ));
    let (_, store) = clients(&config).await;
    let client = Arc::new(stream_client_via(&proxy.url(), &stream, 1).await);
    let recorder = Recorder::default();
    let worker = start_worker_on(config, &recorder, client, store);
    let mut puts = Vec::new();
    for wave in 0..8 {
        let from = wave * 40;
        puts.extend(put_records(&kinesis, &stream, &records("c", from, 40, 13)).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_for("every record", PATIENCE, || async {
        recorder.count() >= puts.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();

    assert_eq!(by_shard(&recorder.delivered()), puts_by_shard(&puts));
    assert_eq!(proxy.faults().get("SubscribeToShard"), Some(&3));
    // Two first subscriptions and one after each fault. The silenced one always counts as a
    // failure (no event within `event_timeout`); a reset mid-answer reaches the reader as a
    // failure or as the stream's end (seen both ways in repeated runs): either way it
    // subscribes again at the continuation.
    assert!(status.subscriptions >= 5, "{status:?}");
    assert!(status.subscription_failures >= 1, "{status:?}");
    assert_eq!(status.shard_failures, 0, "{status:?}");
}
