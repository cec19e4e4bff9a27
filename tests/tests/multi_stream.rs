//! Multi-stream mode against kinesis-mock and DynamoDB Local: streams found by name prefix,
//! a stream's identity (account, name, creation time) from `DescribeStreamSummary`, a stream
//! deleted and created again under its name getting another identity; and multi-stream
//! workers: three streams consumed by two workers with a split in one of them and a stream
//! added while running, a stream deleted while running (its leases removed after the grace
//! period, the others undisturbed) and one recreated under its name (consumed afresh).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kcl_core::{
    CancellationToken, Error, FanOutConfig, InitialPosition, KinesisStreamClient, LeaseConfig,
    LeaseStore, MultiStreamConfig, MultiStreamLeaseKey, PerStream, PollingConfig, Retrieval,
    ShardContext, StreamClient, StreamConfig, StreamTracker, StreamsByPrefix, TrackerFn,
    WorkerConfig,
};
use kcl_dynamo_lease::{AwsWorkerBuilder, DynamoLeaseStore};
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    PATIENCE, Recorder, RunningWorker, create_stream, dynamodb, kinesis, list_shards, put_records,
    records, sdk_config, split_shard, unique, wait_for,
};

#[tokio::test]
async fn streams_are_found_by_prefix_and_named_by_account_name_and_creation_time() {
    let client = kinesis().await;
    let prefix = unique("tenant");
    let (a, b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let other = unique("other");
    for stream in [&a, &b, &other] {
        create_stream(&client, stream, 1).await;
    }
    let tracker = StreamsByPrefix::new(client.clone(), format!("{prefix}-"))
        .with_initial_position(InitialPosition::TrimHorizon);
    let found = tracker.streams().await.unwrap();
    let names: Vec<&str> = found.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(names, vec![a.as_str(), b.as_str()]);
    assert!(
        found
            .iter()
            .all(|s| s.initial_position == InitialPosition::TrimHorizon)
    );

    let identity = KinesisStreamClient::new(client.clone(), &a)
        .stream_identity()
        .await
        .unwrap();
    assert_eq!(identity.stream_name(), a);
    assert_eq!(identity.account_id().len(), 12);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        identity.creation_epoch() <= now && now - identity.creation_epoch() < 3600,
        "created {} (now {now})",
        identity.creation_epoch()
    );
    // Named by ARN, the same stream has the same identity.
    let arn = format!(
        "arn:aws:kinesis:{}:{}:stream/{a}",
        std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        identity.account_id()
    );
    let by_arn = KinesisStreamClient::new(client.clone(), &arn)
        .stream_identity()
        .await
        .unwrap();
    assert_eq!(by_arn, identity);
    let key = identity.lease_key("shardId-000000000000");
    assert_eq!(MultiStreamLeaseKey::parse(&key).unwrap().stream, identity);
}

#[tokio::test]
async fn a_stream_created_again_under_its_name_is_another_stream() {
    let client = kinesis().await;
    let name = unique("recreated");
    create_stream(&client, &name, 1).await;
    let stream = KinesisStreamClient::new(client.clone(), &name);
    let before = stream.stream_identity().await.unwrap();
    client
        .delete_stream()
        .stream_name(&name)
        .send()
        .await
        .unwrap();
    wait_for("the stream deleted", PATIENCE, || async {
        matches!(
            stream.stream_identity().await,
            Err(Error::StreamNotFound { .. })
        )
    })
    .await;
    // Creation times have whole seconds.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    create_stream(&client, &name, 1).await;
    let after = stream.stream_identity().await.unwrap();
    assert_eq!(after.stream_name(), before.stream_name());
    assert!(
        after.creation_epoch() > before.creation_epoch(),
        "{before} then {after}"
    );
    assert_ne!(
        after.lease_key("shardId-000000000000"),
        before.lease_key("shardId-000000000000")
    );
}

const DISCOVERY: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(8);

/// Faster than the defaults, so that fleets settle in seconds; the same mechanisms.
fn config(app: &str, worker: &str) -> WorkerConfig {
    WorkerConfig::new(app, "multi-stream")
        .with_worker_id(worker)
        .with_lease(
            LeaseConfig::default()
                .with_lease_duration(Duration::from_secs(6))
                .with_renewal_interval(Duration::from_secs(2))
                .with_taker_interval(Duration::from_secs(1))
                .with_handoff_timeout(Duration::from_secs(6))
                .with_shard_sync_interval(Duration::from_secs(5)),
        )
        .with_polling(
            PollingConfig::default().with_idle_time_between_empty_reads(Duration::from_millis(500)),
        )
        .with_multi_stream(
            MultiStreamConfig::default()
                .with_stream_discovery_interval(DISCOVERY)
                .with_former_streams_grace(GRACE),
        )
}

/// The stream names a test's tracker lists, changed as the test goes.
#[derive(Clone, Default)]
struct Listed(Arc<Mutex<BTreeSet<String>>>);

impl Listed {
    fn add(&self, name: &str) {
        self.0.lock().unwrap().insert(name.to_owned());
    }
}

/// A multi-stream worker on the local servers whose processors record `STREAM/SHARD`.
async fn start(app: &str, worker: &str, listed: &Listed, recorder: &Recorder) -> RunningWorker {
    start_as(config(app, worker), listed, recorder).await
}

async fn start_as(config: WorkerConfig, listed: &Listed, recorder: &Recorder) -> RunningWorker {
    start_via(config, listed, recorder, None).await
}

/// As [`start_as`], reaching Kinesis through `kinesis` when given (a fault proxy, say).
async fn start_via(
    config: WorkerConfig,
    listed: &Listed,
    recorder: &Recorder,
    kinesis: Option<aws_sdk_kinesis::Client>,
) -> RunningWorker {
    let worker = config.worker_id.clone();
    let worker = worker.as_str();
    let names = listed.0.clone();
    let tracker = TrackerFn::new(move || {
        let streams: Vec<StreamConfig> = names
            .lock()
            .unwrap()
            .iter()
            .map(|n| StreamConfig::new(n).with_initial_position(InitialPosition::TrimHorizon))
            .collect();
        async move { Ok(streams) }
    });
    let record = recorder.factory(worker);
    let factory = PerStream(move |shard: &ShardContext| {
        let stream = shard.stream.as_ref().expect("multi-stream mode");
        record(&format!("{}/{}", stream.stream_name(), shard.shard_id))
    });
    let mut builder = AwsWorkerBuilder::new(&sdk_config().await, config);
    if let Some(kinesis) = kinesis {
        builder = builder.with_kinesis_client(kinesis);
    }
    let worker = builder
        .build_multi_stream(Arc::new(tracker), factory)
        .expect("valid config");
    let status = worker.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    RunningWorker {
        shutdown,
        task,
        status,
    }
}

/// Puts `count` records into `stream`: `STREAM/SHARD` → sequence numbers, in put order.
async fn put(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    from: usize,
    count: usize,
) -> BTreeMap<String, Vec<String>> {
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for put in put_records(client, stream, &records(stream, from, count, 40)).await {
        by_shard
            .entry(format!("{stream}/{}", put.shard_id))
            .or_default()
            .push(put.sequence_number);
    }
    by_shard
}

fn merge(into: &mut BTreeMap<String, Vec<String>>, more: BTreeMap<String, Vec<String>>) {
    for (shard, seqs) in more {
        into.entry(shard).or_default().extend(seqs);
    }
}

/// `STREAM/SHARD` → the sequence numbers delivered, in delivery order.
fn delivered(recorder: &Recorder) -> BTreeMap<String, Vec<String>> {
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in recorder.delivered() {
        got.entry(d.shard_id).or_default().push(d.sequence_number);
    }
    got
}

fn all_delivered(recorder: &Recorder, expected: &BTreeMap<String, Vec<String>>) -> bool {
    let got = delivered(recorder);
    expected
        .iter()
        .all(|(shard, seqs)| got.get(shard).is_some_and(|g| g.len() >= seqs.len()))
}

/// The table's leases by stream name.
async fn leases_by_stream(store: &DynamoLeaseStore) -> BTreeMap<String, Vec<kcl_core::Lease>> {
    let mut by_stream: BTreeMap<String, Vec<kcl_core::Lease>> = BTreeMap::new();
    for lease in store.list_leases().await.expect("scan").leases {
        if kcl_core::is_watcher_slot(&lease.lease_key) {
            continue;
        }
        let key = MultiStreamLeaseKey::parse(&lease.lease_key).expect("a multi-stream key");
        by_stream
            .entry(key.stream.stream_name().to_owned())
            .or_default()
            .push(lease);
    }
    by_stream
}

fn store(app: &str, client: aws_sdk_dynamodb::Client) -> DynamoLeaseStore {
    DynamoLeaseStore::new(client, app)
}

#[tokio::test]
async fn three_streams_two_workers_a_split_in_one_and_a_stream_added_while_running() {
    let (client, app) = (kinesis().await, unique("multi-app"));
    let prefix = unique("ms");
    let [orders, payments, clicks, refunds] =
        ["orders", "payments", "clicks", "refunds"].map(|s| format!("{prefix}-{s}"));
    let listed = Listed::default();
    for (stream, shards) in [(&orders, 2), (&payments, 1), (&clicks, 2)] {
        create_stream(&client, stream, shards).await;
        listed.add(stream);
    }
    let mut expected = BTreeMap::new();
    for stream in [&orders, &payments, &clicks] {
        merge(&mut expected, put(&client, stream, 0, 200).await);
    }
    let recorder = Recorder::default();
    let a = start(&app, "worker-a", &listed, &recorder).await;
    let b = start(&app, "worker-b", &listed, &recorder).await;
    wait_for("every record delivered", PATIENCE, || async {
        all_delivered(&recorder, &expected)
    })
    .await;
    let table = store(&app, dynamodb().await);
    // Each two-shard stream spread over both workers, not only the total.
    wait_for("each stream spread over both workers", PATIENCE, || async {
        let by_stream = leases_by_stream(&table).await;
        [&orders, &clicks].iter().all(|s| {
            let owners: BTreeSet<Option<String>> = by_stream
                .get(s.as_str())
                .into_iter()
                .flatten()
                .map(|l| l.owner.clone())
                .collect();
            owners.len() == 2 && owners.iter().all(Option::is_some)
        })
    })
    .await;
    for lease in leases_by_stream(&table).await.values().flatten() {
        let key = MultiStreamLeaseKey::parse(&lease.lease_key).unwrap();
        assert_eq!(lease.stream_name, Some(key.stream.to_string()));
        assert_eq!(lease.shard_id.as_deref(), Some(key.shard_id.as_str()));
    }

    // A split in one stream while the others flow.
    let parent = list_shards(&client, &orders).await[0].shard_id.clone();
    split_shard(&client, &orders, &parent).await;
    for stream in [&orders, &payments, &clicks] {
        merge(&mut expected, put(&client, stream, 200, 200).await);
    }
    // And a stream added while running.
    create_stream(&client, &refunds, 2).await;
    merge(&mut expected, put(&client, &refunds, 0, 100).await);
    listed.add(&refunds);
    wait_for(
        "everything after the split and the new stream delivered",
        PATIENCE,
        || async { all_delivered(&recorder, &expected) },
    )
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(delivered(&recorder), expected);
    assert!(recorder.overlaps().is_empty(), "{:?}", recorder.overlaps());
    // The split's children were read only after their parent's last record.
    let all = recorder.delivered();
    let parent_shard = format!("{orders}/{parent}");
    let parent_last = all
        .iter()
        .filter(|d| d.shard_id == parent_shard)
        .map(|d| d.at)
        .max()
        .unwrap();
    let children: BTreeSet<String> = list_shards(&client, &orders)
        .await
        .into_iter()
        .filter(|s| s.parent_shard_ids().contains(&parent))
        .map(|s| format!("{orders}/{}", s.shard_id))
        .collect();
    assert_eq!(children.len(), 2);
    for d in all.iter().filter(|d| children.contains(&d.shard_id)) {
        assert!(
            d.at >= parent_last,
            "{} read before its parent ended",
            d.shard_id
        );
    }
}

#[tokio::test]
async fn a_deleted_stream_is_cleaned_up_and_one_recreated_under_its_name_starts_fresh() {
    let (client, app) = (kinesis().await, unique("multi-app"));
    let prefix = unique("ms");
    let [orders, doomed, reborn] = ["orders", "doomed", "reborn"].map(|s| format!("{prefix}-{s}"));
    let listed = Listed::default();
    for stream in [&orders, &doomed, &reborn] {
        create_stream(&client, stream, 1).await;
        listed.add(stream);
    }
    let mut expected = BTreeMap::new();
    for stream in [&orders, &doomed, &reborn] {
        merge(&mut expected, put(&client, stream, 0, 100).await);
    }
    let recorder = Recorder::default();
    let a = start(&app, "worker-a", &listed, &recorder).await;
    let b = start(&app, "worker-b", &listed, &recorder).await;
    wait_for("every record delivered", PATIENCE, || async {
        all_delivered(&recorder, &expected)
    })
    .await;
    let table = store(&app, dynamodb().await);
    let old_reborn_keys: BTreeSet<String> = leases_by_stream(&table).await[&reborn]
        .iter()
        .map(|l| l.lease_key.clone())
        .collect();

    // Both deleted while running (still listed by the tracker); one created again.
    let deleted_at = tokio::time::Instant::now();
    for stream in [&doomed, &reborn] {
        client
            .delete_stream()
            .stream_name(stream)
            .send()
            .await
            .unwrap();
    }
    let reborn_client = KinesisStreamClient::new(client.clone(), &reborn);
    wait_for("the streams deleted", PATIENCE, || async {
        matches!(
            reborn_client.stream_identity().await,
            Err(Error::StreamNotFound { .. })
        )
    })
    .await;
    // Creation times have whole seconds.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    create_stream(&client, &reborn, 1).await;
    // The new stream's records are read from its start, not from the old checkpoints (its
    // shard has the old one's id, and sequence numbers may repeat).
    let reborn_records = put(&client, &reborn, 100, 50).await;
    merge(&mut expected, reborn_records);
    // The other stream flows on.
    merge(&mut expected, put(&client, &orders, 100, 100).await);
    wait_for(
        "the other stream and the recreated one delivered",
        PATIENCE,
        || async { all_delivered(&recorder, &expected) },
    )
    .await;
    wait_for("the deleted streams' leases removed", PATIENCE, || async {
        let by_stream = leases_by_stream(&table).await;
        !by_stream.contains_key(doomed.as_str())
            && by_stream.get(reborn.as_str()).is_some_and(|leases| {
                leases
                    .iter()
                    .all(|l| !old_reborn_keys.contains(&l.lease_key))
            })
    })
    .await;
    assert!(deleted_at.elapsed() >= GRACE);
    let by_stream = leases_by_stream(&table).await;
    assert_eq!(
        by_stream.keys().collect::<BTreeSet<_>>(),
        BTreeSet::from([&orders, &reborn])
    );
    // What the workers report: two streams each, none waiting; the two former streams (one
    // lease each) deleted once in all.
    let streams = |w: &RunningWorker| w.status.borrow().streams.clone().expect("multi-stream");
    wait_for("the workers' stream counts", PATIENCE, || async {
        [&a, &b].iter().all(|w| {
            let s = streams(w);
            (s.followed, s.unreachable, s.pending_deletion) == (2, 0, 0)
        })
    })
    .await;
    assert_eq!(streams(&a).deleted + streams(&b).deleted, 2);
    assert!(!a.task.is_finished() && !b.task.is_finished());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(delivered(&recorder), expected);
}

/// The JSON lines of a `kcl-consumer` output file.
fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// `kcl-consumer` with `args` (its streams), writing to `output`.
fn consumer_process(app: &str, args: &[&str], output: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(kcl_integration_tests::example_binary("kcl-consumer"))
        .args(["--app", app, "--initial-position", "trim-horizon"])
        .args(args)
        .args(["--idle-time-between-empty-reads", "500ms"])
        .args(["--stream-discovery-interval", "2s"])
        .arg("--output")
        .arg(output)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start kcl-consumer")
}

/// (stream, data) of every line, and whether each line names its stream.
fn stream_and_data(lines: &[serde_json::Value]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().expect("a stream field").to_owned(),
                l["data"].as_str().expect("text data").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcl_consumer_reads_several_streams_by_name_or_by_prefix_and_names_each_lines_stream() {
    sdk_config().await; // fails loudly without the local servers
    let client = kinesis().await;
    let prefix = unique("cli-ms");
    let (a, b, other) = (
        format!("{prefix}-a"),
        format!("{prefix}-b"),
        unique("cli-other"),
    );
    for (stream, shards) in [(&a, 2), (&b, 1), (&other, 1)] {
        create_stream(&client, stream, shards).await;
    }
    let mut put_data: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for stream in [&a, &b, &other] {
        for put in put_records(&client, stream, &records(stream, 0, 150, 20)).await {
            put_data.entry(stream.clone()).or_default().insert(put.data);
        }
    }
    let dir = std::env::temp_dir().join(unique("kcl-cli-ms"));
    std::fs::create_dir_all(&dir).unwrap();

    // By name, twice: `a` and the other stream, not `b`.
    let by_name = dir.join("by-name.jsonl");
    let child = consumer_process(
        &unique("cli-ms-app"),
        &["--stream", &a, "--stream", &other],
        &by_name,
    );
    wait_for("300 lines by name", PATIENCE, || async {
        json_lines(&by_name).len() >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // room for an extra line to show up
    let status = kcl_integration_tests::process::sigterm(child).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let got = stream_and_data(&json_lines(&by_name));
    assert_eq!(got.len(), 300, "every record once");
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (stream, data) in got {
        // Each record is in the stream the line names.
        assert!(data.starts_with(&stream), "{data} in {stream}");
        seen.entry(stream).or_default().insert(data);
    }
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[&a], put_data[&a]);
    assert_eq!(seen[&other], put_data[&other]);

    // By prefix: `a` and `b`, not the other stream.
    let by_prefix = dir.join("by-prefix.jsonl");
    let child = consumer_process(
        &unique("cli-ms-app"),
        &["--stream-prefix", &format!("{prefix}-")],
        &by_prefix,
    );
    wait_for("300 lines by prefix", PATIENCE, || async {
        json_lines(&by_prefix).len() >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = kcl_integration_tests::process::sigterm(child).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let got = stream_and_data(&json_lines(&by_prefix));
    assert_eq!(got.len(), 300, "every record once");
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (stream, data) in got {
        seen.entry(stream).or_default().insert(data);
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), [&a, &b]);
    assert_eq!(seen[&a], put_data[&a]);
    assert_eq!(seen[&b], put_data[&b]);

    // A name and a prefix together are refused before anything starts.
    let refused =
        tokio::process::Command::new(kcl_integration_tests::example_binary("kcl-consumer"))
            .args(["--app", "x", "--stream", &a, "--stream-prefix", &prefix])
            .stderr(std::process::Stdio::piped())
            .output()
            .await
            .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--stream-prefix"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_out_registers_a_consumer_per_stream_and_reads_every_record_once() {
    let (client, app) = (kinesis().await, unique("multi-fan-out"));
    let prefix = unique("msfo");
    let [orders, clicks] = ["orders", "clicks"].map(|s| format!("{prefix}-{s}"));
    let listed = Listed::default();
    for (stream, shards) in [(&orders, 2), (&clicks, 1)] {
        create_stream(&client, stream, shards).await;
        listed.add(stream);
    }
    let mut expected = BTreeMap::new();
    for stream in [&orders, &clicks] {
        merge(&mut expected, put(&client, stream, 0, 150).await);
    }
    let recorder = Recorder::default();
    let fan_out = |worker: &str| {
        config(&app, worker).with_retrieval(Retrieval::FanOut(FanOutConfig::default()))
    };
    let a = start_as(fan_out("worker-a"), &listed, &recorder).await;
    let b = start_as(fan_out("worker-b"), &listed, &recorder).await;
    wait_for("every record delivered", PATIENCE, || async {
        all_delivered(&recorder, &expected)
    })
    .await;
    for stream in [&orders, &clicks] {
        merge(&mut expected, put(&client, stream, 150, 100).await);
    }
    wait_for("the later records delivered", PATIENCE, || async {
        all_delivered(&recorder, &expected)
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(delivered(&recorder), expected);
    // Each stream has its own consumer, named after the application.
    for stream in [&orders, &clicks] {
        let arn = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .unwrap()
            .stream_description_summary()
            .unwrap()
            .stream_arn()
            .to_owned();
        let consumers = client
            .list_stream_consumers()
            .stream_arn(&arn)
            .send()
            .await
            .unwrap();
        let names: Vec<&str> = consumers
            .consumers()
            .iter()
            .map(|c| c.consumer_name())
            .collect();
        assert_eq!(names, [app.as_str()], "{stream}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_whose_control_plane_is_throttled_are_reported_unreachable_while_records_flow() {
    let (client, app) = (kinesis().await, unique("multi-app"));
    let prefix = unique("ms-thr");
    let [orders, clicks] = ["orders", "clicks"].map(|s| format!("{prefix}-{s}"));
    let listed = Listed::default();
    for stream in [&orders, &clicks] {
        create_stream(&client, stream, 1).await;
        listed.add(stream);
    }
    // The worker reaches Kinesis through a fault proxy, with no SDK retries: a throttled
    // call fails at once.
    let proxy = FaultProxy::start(&std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap()).await;
    let via = aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&sdk_config().await)
            .endpoint_url(proxy.url())
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
            .build(),
    );
    let recorder = Recorder::default();
    let a = start_via(config(&app, "worker-a"), &listed, &recorder, Some(via)).await;
    let mut expected = BTreeMap::new();
    for stream in [&orders, &clicks] {
        merge(&mut expected, put(&client, stream, 0, 50).await);
    }
    wait_for("every record delivered", PATIENCE, || async {
        all_delivered(&recorder, &expected)
    })
    .await;
    let streams = |w: &RunningWorker| w.status.borrow().streams.clone().expect("multi-stream");
    assert_eq!((streams(&a).followed, streams(&a).unreachable), (2, 0));

    // Every DescribeStreamSummary throttled: each stream's next sync fails its identity
    // check. Both stay followed and their records keep flowing (GetRecords is not throttled).
    proxy.inject(Rule::on("DescribeStreamSummary", Fault::THROTTLING));
    for stream in [&orders, &clicks] {
        merge(&mut expected, put(&client, stream, 50, 50).await);
    }
    wait_for("both streams reported unreachable", PATIENCE, || async {
        let s = streams(&a);
        (s.followed, s.unreachable) == (2, 2)
    })
    .await;
    wait_for("the records put meanwhile delivered", PATIENCE, || async {
        all_delivered(&recorder, &expected)
    })
    .await;
    assert!(proxy.faults()["DescribeStreamSummary"] >= 2);

    proxy.clear();
    wait_for("both streams reachable again", PATIENCE, || async {
        streams(&a).unreachable == 0
    })
    .await;
    assert_eq!(streams(&a).followed, 2);
    a.stop().await.unwrap();
    assert_eq!(delivered(&recorder), expected);
}
