//! Fleets of workers against kinesis-mock and DynamoDB Local: even splits, a joining worker,
//! SIGKILL failover and SIGTERM handoff of `kcl-consumer` processes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kcl_core::{
    InitialPosition, LeaseConfig, LeaseStore, PollingConfig, Watchers, WorkerConfig,
    is_watcher_slot,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{
    PATIENCE, Recorder, by_shard, create_stream, evenly_owned, example_binary, kinesis,
    lease_owners, put_records, puts_by_shard, records, sdk_config, start_worker, unique, wait_for,
};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Faster than the defaults, so that fleets settle in seconds; the same mechanisms.
fn lease_config() -> LeaseConfig {
    LeaseConfig::default()
        .with_lease_duration(Duration::from_secs(6))
        .with_renewal_interval(Duration::from_secs(2))
        .with_taker_interval(Duration::from_secs(1))
        .with_handoff_timeout(Duration::from_secs(6))
}

fn config(app: &str, stream: &str, worker: &str) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_lease(lease_config())
        .with_polling(
            PollingConfig::default().with_idle_time_between_empty_reads(Duration::from_millis(500)),
        )
}

/// Puts a batch of records every 250 ms until stopped; returns everything it put.
struct Producer {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<kcl_integration_tests::Put>>,
}

impl Producer {
    fn start(client: aws_sdk_kinesis::Client, stream: &str, prefix: &str) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let (stream, prefix, token) = (stream.to_owned(), prefix.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut n = 0;
            while !token.is_cancelled() {
                all.extend(put_records(&client, &stream, &records(&prefix, n, 20, 37)).await);
                n += 20;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            all
        });
        Producer { stop, task }
    }

    async fn stop(self) -> Vec<kcl_integration_tests::Put> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

async fn run_fleet(workers: usize) {
    let kinesis = kinesis().await;
    let stream = unique(&format!("fleet{workers}"));
    create_stream(&kinesis, &stream, 12).await;
    let mut puts = put_records(&kinesis, &stream, &records("a", 0, 600, 53)).await;
    let app = unique("fleet-app");
    let recorder = Recorder::default();
    let mut running = Vec::new();
    for i in 0..workers {
        running.push(start_worker(config(&app, &stream, &format!("w{i}")), &recorder).await);
    }
    wait_for("an even split", PATIENCE, || {
        evenly_owned(&app, workers, 12)
    })
    .await;
    puts.extend(put_records(&kinesis, &stream, &records("b", 0, 600, 53)).await);
    wait_for("every record", PATIENCE, || async {
        recorder.count() >= 1200
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        evenly_owned(&app, workers, 12).await,
        "stays balanced: {:?}",
        lease_owners(&app).await
    );
    for worker in running {
        worker.stop().await.unwrap();
    }
    // Starting together, the workers moved leases by graceful handoff only: no record was
    // delivered twice, and no shard was processed by two workers at once.
    assert_eq!(by_shard(&recorder.delivered()), puts_by_shard(&puts));
    assert_eq!(recorder.overlaps(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_twelve_shards_evenly_and_consume_everything() {
    run_fleet(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_split_twelve_shards_evenly_and_consume_everything() {
    run_fleet(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_workers_split_twelve_shards_evenly_and_consume_everything() {
    run_fleet(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_added_to_a_running_fleet_gets_its_share_without_overlap() {
    let kinesis = kinesis().await;
    let stream = unique("join");
    create_stream(&kinesis, &stream, 8).await;
    let app = unique("join-app");
    let recorder = Recorder::default();
    let producer = Producer::start(kinesis.clone(), &stream, "join");
    let w0 = start_worker(config(&app, &stream, "w0"), &recorder).await;
    let w1 = start_worker(config(&app, &stream, "w1"), &recorder).await;
    wait_for("two workers balanced", PATIENCE, || {
        evenly_owned(&app, 2, 8)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let w2 = start_worker(config(&app, &stream, "w2"), &recorder).await;
    wait_for("three workers balanced", PATIENCE, || {
        evenly_owned(&app, 3, 8)
    })
    .await;
    let status = w2.status.borrow().clone();
    assert!(
        status.received >= 2,
        "the new worker was handed its share: {status:?}"
    );
    assert_eq!(status.forced_takes, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let puts = producer.stop().await;
    wait_for("every record", PATIENCE, || async {
        recorder.count() >= puts.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for worker in [w0, w1, w2] {
        worker.stop().await.unwrap();
    }
    assert_eq!(
        by_shard(&recorder.delivered()),
        puts_by_shard(&puts),
        "every record once, in order"
    );
    assert_eq!(
        recorder.overlaps(),
        vec![],
        "no shard processed by two workers at once"
    );
}

/// With watchers (two of four workers) on the real servers: the fleet balances; a crashed
/// member's shards are taken by the watchers; then a watcher crashes, the last member takes
/// its slot and its shards are taken; every record is delivered, in shard order; the slots
/// are lease-table items that the shard syncs leave alone, held by the watchers, and released
/// at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watchers_a_crashed_member_and_a_crashed_watcher_are_replaced_and_everything_is_consumed()
 {
    let kinesis = kinesis().await;
    let stream = unique("watchers");
    create_stream(&kinesis, &stream, 8).await;
    let app = unique("watchers-app");
    let recorder = Recorder::default();
    let producer = Producer::start(kinesis.clone(), &stream, "watch");
    let lease = lease_config()
        .with_shard_sync_interval(Duration::from_secs(3))
        .with_watchers(Some(
            Watchers::default()
                .with_min_workers(1)
                .with_member_scan_interval(Duration::from_secs(20))
                .with_slot_check_interval(Duration::from_secs(2)),
        ));
    let mut running = Vec::new();
    let mut ids: Vec<String> = (0..4).map(|i| format!("w{i}")).collect();
    for id in &ids {
        let config = config(&app, &stream, id).with_lease(lease.clone());
        running.push(start_worker(config, &recorder).await);
    }
    let watching = |running: &[kcl_integration_tests::RunningWorker]| -> Vec<usize> {
        (0..running.len())
            .filter(|i| running[*i].status.borrow().watcher)
            .collect()
    };
    wait_for("balanced, with two watchers", PATIENCE, || {
        let two = watching(&running).len() == 2;
        let app = app.clone();
        async move { two && evenly_owned(&app, 4, 8).await }
    })
    .await;
    // Past a few shard syncs: the slots are still there, held by the watchers.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let store = DynamoLeaseStore::new(kcl_integration_tests::dynamodb().await, &app);
    let slots: Vec<_> = store
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .filter(|l| is_watcher_slot(&l.lease_key))
        .collect();
    assert_eq!(slots.len(), 2);
    let watchers: BTreeSet<String> = watching(&running)
        .into_iter()
        .map(|i| format!("w{i}"))
        .collect();
    let slot_owners: BTreeSet<String> = slots.iter().filter_map(|s| s.owner.clone()).collect();
    assert_eq!(slot_owners, watchers);

    let member = (0..running.len())
        .find(|i| !watching(&running).contains(i))
        .unwrap();
    let crashed = running.remove(member);
    crashed.task.abort();
    let crashed_id = ids.remove(member);
    let taken_from = |crashed_id: String| {
        let app = app.clone();
        move || {
            let (app, crashed_id) = (app.clone(), crashed_id.clone());
            async move {
                let owners = lease_owners(&app).await;
                !owners.contains_key(&crashed_id) && owners.values().sum::<usize>() == 8
            }
        }
    };
    wait_for(
        "the crashed member's shards taken",
        PATIENCE,
        taken_from(crashed_id),
    )
    .await;

    // A watcher crashes: the last member takes its slot, and its shards are taken.
    let watcher = watching(&running)[0];
    let crashed = running.remove(watcher);
    crashed.task.abort();
    let crashed_id = ids.remove(watcher);
    wait_for("the last member watching", PATIENCE, || {
        let all = watching(&running).len() == running.len();
        async move { all }
    })
    .await;
    wait_for(
        "the crashed watcher's shards taken",
        PATIENCE,
        taken_from(crashed_id.clone()),
    )
    .await;
    let slot_owners: BTreeSet<String> = store
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .filter(|l| is_watcher_slot(&l.lease_key))
        .filter_map(|s| s.owner)
        .collect();
    assert_eq!(slot_owners, ids.iter().cloned().collect::<BTreeSet<_>>());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let puts = producer.stop().await;
    let expected = puts_by_shard(&puts);
    wait_for("every record", PATIENCE, || async {
        let delivered: BTreeSet<String> = recorder
            .delivered()
            .into_iter()
            .map(|d| d.sequence_number)
            .collect();
        delivered.len() >= puts.len()
    })
    .await;
    for worker in running {
        worker.stop().await.unwrap();
    }
    // At least once, and in order: each shard's first deliveries are its records as put.
    for (shard, delivered) in by_shard(&recorder.delivered()) {
        let mut seen = BTreeSet::new();
        let first: Vec<String> = delivered
            .into_iter()
            .filter(|seq| seen.insert(seq.clone()))
            .collect();
        assert_eq!(Some(&first), expected.get(&shard), "{shard}");
    }
    let slots = store.list_leases().await.unwrap().leases;
    assert!(
        slots
            .iter()
            .filter(|l| is_watcher_slot(&l.lease_key))
            .all(|s| s.owner.is_none()),
        "slots released at shutdown"
    );
}

/// A `kcl-consumer` process writing to its own file.
struct Consumer {
    child: Child,
    output: PathBuf,
}

async fn spawn_consumer(app: &str, stream: &str, output: &Path, extra: &[&str]) -> Consumer {
    sdk_config().await;
    let child = Command::new(example_binary("kcl-consumer"))
        .args([
            "--app",
            app,
            "--stream",
            stream,
            "--initial-position",
            "trim-horizon",
        ])
        .args(["--idle-time-between-empty-reads", "500ms"])
        .args(extra)
        .arg("--output")
        .arg(output)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start kcl-consumer");
    Consumer {
        child,
        output: output.to_owned(),
    }
}

/// (data, shard, sequence number) of each line of a consumer's output.
fn output_lines(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap().to_owned();
            (s("data"), s("shard_id"), s("sequence_number"))
        })
        .collect()
}

fn assert_shard_order(path: &Path) {
    let mut last: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (_, shard, seq) in output_lines(path) {
        let key = (seq.len(), seq.clone());
        if let Some(prev) = last.get(&shard) {
            assert!(key > *prev, "{} out of order in {shard}", path.display());
        }
        last.insert(shard, key);
    }
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    assert!(
        std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_is_replaced_from_its_checkpoints() {
    sigkill_is_replaced_from_checkpoints(&[]).await;
}

/// The same with enhanced fan-out: the survivor subscribes to the victim's shards at their
/// checkpoints (refused while the dead worker's subscriptions linger on the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_worker_killed_with_sigkill_is_replaced_from_its_checkpoints() {
    sigkill_is_replaced_from_checkpoints(&["--fan-out"]).await;
}

async fn sigkill_is_replaced_from_checkpoints(retrieval: &[&str]) {
    let kinesis = kinesis().await;
    let stream = unique("sigkill");
    create_stream(&kinesis, &stream, 8).await;
    let mut puts = put_records(&kinesis, &stream, &records("before", 0, 800, 41)).await;
    let app = unique("sigkill-app");
    let dir = std::env::temp_dir().join(unique("kcl-fleet"));
    std::fs::create_dir_all(&dir).unwrap();
    let fast = [
        &[
            "--lease-duration",
            "4s",
            "--renewal-interval",
            "1s",
            "--taker-interval",
            "1s",
        ][..],
        retrieval,
    ]
    .concat();
    let mut victim = spawn_consumer(&app, &stream, &dir.join("victim.jsonl"), &fast).await;
    let survivor = spawn_consumer(&app, &stream, &dir.join("survivor.jsonl"), &fast).await;
    let outputs = [victim.output.clone(), survivor.output.clone()];
    let union = |outputs: &[PathBuf]| {
        outputs
            .iter()
            .flat_map(|p| output_lines(p))
            .map(|l| l.0)
            .collect::<BTreeSet<_>>()
    };
    wait_for("both consuming, everything read", PATIENCE, || async {
        lease_owners(&app).await.len() == 2 && union(&outputs).len() == 800
    })
    .await;

    signal(&victim.child, "-KILL");
    victim.child.wait().await.unwrap();
    puts.extend(put_records(&kinesis, &stream, &records("after", 0, 400, 41)).await);
    wait_for("the survivor takes every shard", PATIENCE, || async {
        lease_owners(&app)
            .await
            .values()
            .copied()
            .collect::<Vec<_>>()
            == vec![8]
    })
    .await;
    wait_for("every record", PATIENCE, || async {
        union(&outputs).len() == 1200
    })
    .await;
    let expected: BTreeSet<String> = puts.iter().map(|p| p.data.clone()).collect();
    assert_eq!(union(&outputs), expected, "nothing lost");
    for path in &outputs {
        assert_shard_order(path);
    }
    // Records after the victim's last checkpoint may be delivered again (at-least-once): at
    // most the batch it was writing when killed, per shard it held.
    let total: usize = outputs.iter().map(|p| output_lines(p).len()).sum();
    assert!(
        total - 1200 <= 800,
        "{} records delivered twice",
        total - 1200
    );
    let mut survivor = survivor;
    signal(&survivor.child, "-TERM");
    assert!(survivor.child.wait().await.unwrap().success());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_hands_its_shards_over_without_redelivery() {
    sigterm_hands_over_without_redelivery(&[]).await;
}

/// The same with enhanced fan-out: the new owner's subscribe is refused while the old
/// owner's subscription is still open on the server, and retried; still nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_worker_stopped_with_sigterm_hands_its_shards_over_without_redelivery() {
    sigterm_hands_over_without_redelivery(&["--fan-out"]).await;
}

async fn sigterm_hands_over_without_redelivery(retrieval: &[&str]) {
    let kinesis = kinesis().await;
    let stream = unique("sigterm");
    create_stream(&kinesis, &stream, 8).await;
    let app = unique("sigterm-app");
    let dir = std::env::temp_dir().join(unique("kcl-fleet"));
    std::fs::create_dir_all(&dir).unwrap();
    // A long lease: a takeover by expiry would take 30 s, a handoff takes about a second.
    let slow_expiry = [
        &[
            "--lease-duration",
            "30s",
            "--renewal-interval",
            "3s",
            "--taker-interval",
            "1s",
        ][..],
        retrieval,
    ]
    .concat();
    let leaving = spawn_consumer(&app, &stream, &dir.join("leaving.jsonl"), &slow_expiry).await;
    let staying = spawn_consumer(&app, &stream, &dir.join("staying.jsonl"), &slow_expiry).await;
    let outputs = [leaving.output.clone(), staying.output.clone()];
    let producer = Producer::start(kinesis.clone(), &stream, "term");
    wait_for("both consuming", PATIENCE, || evenly_owned(&app, 2, 8)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let leaving = Arc::new(Mutex::new(leaving));
    signal(&leaving.lock().await.child, "-TERM");
    let sent = Instant::now();
    wait_for("the other worker owns every shard", PATIENCE, || async {
        lease_owners(&app)
            .await
            .values()
            .copied()
            .collect::<Vec<_>>()
            == vec![8]
    })
    .await;
    let handover = sent.elapsed();
    assert!(
        handover < Duration::from_secs(15),
        "took {handover:?}: no pause of a lease duration"
    );
    let status = leaving.lock().await.child.wait().await.unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let puts = producer.stop().await;
    let lines = || {
        outputs
            .iter()
            .flat_map(|p| output_lines(p))
            .collect::<Vec<_>>()
    };
    wait_for("every record", PATIENCE, || async {
        lines().len() >= puts.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = lines();
    let unique_data: BTreeSet<&String> = all.iter().map(|l| &l.0).collect();
    assert_eq!(unique_data.len(), puts.len(), "nothing lost");
    assert_eq!(
        all.len(),
        puts.len(),
        "nothing delivered twice: the handoff resumed at the final checkpoints"
    );
    for path in &outputs {
        assert_shard_order(path);
    }
    let mut staying = staying;
    signal(&staying.child, "-TERM");
    assert!(staying.child.wait().await.unwrap().success());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_limit_leaves_spillover_unowned_and_reported() {
    let kinesis = kinesis().await;
    let stream = unique("spill");
    create_stream(&kinesis, &stream, 8).await;
    let app = unique("spill-app");
    let recorder = Recorder::default();
    let capped = |worker: &str| {
        let config = config(&app, &stream, worker);
        let lease = config.lease.clone().with_max_leases_per_worker(3);
        config.with_lease(lease)
    };
    let w0 = start_worker(capped("w0"), &recorder).await;
    let w1 = start_worker(capped("w1"), &recorder).await;
    wait_for("both workers at their limit", PATIENCE, || async {
        lease_owners(&app)
            .await
            .values()
            .copied()
            .collect::<Vec<_>>()
            == vec![3, 3]
    })
    .await;
    wait_for("spill-over reported", PATIENCE, || async {
        w0.status.borrow().spillover == 2 && w1.status.borrow().spillover == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lease_owners(&app).await.values().sum::<usize>(),
        6,
        "two leases stay unowned"
    );
    w0.stop().await.unwrap();
    w1.stop().await.unwrap();
}
