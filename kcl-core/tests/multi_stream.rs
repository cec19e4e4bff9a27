//! Multi-stream workers on the in-memory fakes: several streams, one lease table, streams that
//! come and go. The same scenarios run against kinesis-mock and DynamoDB Local in
//! `tests/tests/multi_stream.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Event, Faults, Log, Running, TestProcessor, wait_until};
use kcl_core::testing::{Fault, Faulty, IN_MEMORY_ACCOUNT, InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    CancellationToken, FanOutConfig, InitialPosition, LeaseConfig, LeaseStore, MultiStreamConfig,
    MultiStreamLeaseKey, PerStream, Retrieval, ShardContext, StreamClient, StreamConfig,
    StreamsStatus, TrackerFn, Worker, WorkerConfig,
};

const WAIT: Duration = Duration::from_secs(120);
const DISCOVERY: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(30);

/// The streams of a test, by name: what the tracker lists and the clients serve.
#[derive(Clone, Default)]
struct Streams {
    all: Arc<Mutex<BTreeMap<String, Arc<InMemoryStream>>>>,
    /// Streams whose clients go through a fault injector.
    faulty: Arc<Mutex<BTreeMap<String, Arc<Faulty<InMemoryStream>>>>>,
    listed: Arc<Mutex<BTreeSet<String>>>,
    /// While set, the tracker fails (as `ListStreams` denied would).
    tracker_fails: Arc<AtomicBool>,
}

impl Streams {
    fn add(&self, stream: InMemoryStream, name: &str) -> Arc<InMemoryStream> {
        let stream = Arc::new(stream);
        self.all
            .lock()
            .unwrap()
            .insert(name.to_owned(), stream.clone());
        self.listed.lock().unwrap().insert(name.to_owned());
        stream
    }

    /// Adds a stream whose every client call goes through the returned fault injector.
    fn add_faulty(
        &self,
        stream: InMemoryStream,
        name: &str,
    ) -> (Arc<InMemoryStream>, Arc<Faulty<InMemoryStream>>) {
        let stream = self.add(stream, name);
        let faulty = Arc::new(Faulty::new(stream.clone()));
        self.faulty
            .lock()
            .unwrap()
            .insert(name.to_owned(), faulty.clone());
        (stream, faulty)
    }

    fn unlist(&self, name: &str) {
        self.listed.lock().unwrap().remove(name);
    }
}

/// A test's streams, lease table and delivery log.
fn fixture() -> (Streams, Arc<InMemoryLeaseStore>, Log) {
    (
        Streams::default(),
        Arc::new(InMemoryLeaseStore::new("multi-app")),
        Log::default(),
    )
}

/// Every record of `children` (shards of `stream`) was delivered after the last of `parent`.
fn assert_children_after_parent(log: &Log, stream: &str, parent: &str, children: &[String]) {
    let delivered = log.delivered();
    let parent_shard = format!("{stream}/{parent}");
    let parent_last = delivered
        .iter()
        .filter(|d| d.shard == parent_shard)
        .map(|d| d.at)
        .max()
        .expect("the parent's records");
    for child in children {
        let shard = format!("{stream}/{child}");
        for d in delivered.iter().filter(|d| d.shard == shard) {
            assert!(
                d.at >= parent_last,
                "{shard} delivered before its parent ended"
            );
        }
    }
}

fn config(worker: &str) -> WorkerConfig {
    WorkerConfig::new("multi-app", "multi-stream")
        .with_worker_id(worker)
        .with_rng_seed(11)
        .with_lease(LeaseConfig::default().with_shard_sync_interval(Duration::from_secs(10)))
        .with_multi_stream(
            MultiStreamConfig::default()
                .with_stream_discovery_interval(DISCOVERY)
                .with_former_streams_grace(GRACE),
        )
}

fn start(worker: &str, streams: &Streams, store: &Arc<InMemoryLeaseStore>, log: &Log) -> Running {
    start_as(config(worker), streams, store, log)
}

fn start_as(
    config: WorkerConfig,
    streams: &Streams,
    store: &Arc<InMemoryLeaseStore>,
    log: &Log,
) -> Running {
    let worker = config.worker_id.clone();
    let worker = worker.as_str();
    let (listed, fails) = (streams.listed.clone(), streams.tracker_fails.clone());
    let tracker = TrackerFn::new(move || {
        let names: Vec<StreamConfig> = listed
            .lock()
            .unwrap()
            .iter()
            .map(|n| StreamConfig::new(n).with_initial_position(InitialPosition::TrimHorizon))
            .collect();
        let fails = fails.load(Ordering::SeqCst);
        async move {
            if fails {
                return Err(kcl_core::Error::Service {
                    service: kcl_core::Service::Kinesis,
                    operation: "ListStreams",
                    source: "not authorized to perform kinesis:ListStreams".into(),
                });
            }
            Ok(names)
        }
    });
    let (all, faulty) = (streams.all.clone(), streams.faulty.clone());
    let clients = move |name: &str| -> Arc<dyn StreamClient> {
        if let Some(faulty) = faulty.lock().unwrap().get(name) {
            return faulty.clone();
        }
        match all.lock().unwrap().get(name) {
            Some(stream) => stream.clone(),
            None => Arc::new(InMemoryStream::missing(name)),
        }
    };
    let (id, log) = (worker.to_owned(), log.clone());
    // Each processor logs its shard as `STREAM/SHARD`, so the deliveries of the streams'
    // equally named shards stay apart.
    let factory = PerStream(move |shard: &ShardContext| TestProcessor {
        worker: id.clone(),
        shard: format!(
            "{}/{}",
            shard
                .stream
                .as_ref()
                .expect("multi-stream mode")
                .stream_name(),
            shard.shard_id
        ),
        log: log.clone(),
        faults: Faults::default(),
    });
    let worker = Worker::multi_stream(
        config,
        Arc::new(tracker),
        Arc::new(clients),
        store.clone() as Arc<dyn LeaseStore>,
        factory,
    )
    .unwrap();
    let status = worker.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Running {
        shutdown,
        task,
        status,
    }
}

/// Puts `count` records into `stream`: their sequence numbers by `STREAM/SHARD`.
fn put(
    name: &str,
    stream: &InMemoryStream,
    from: usize,
    to: usize,
) -> BTreeMap<String, Vec<String>> {
    common::put(stream, from, to)
        .into_iter()
        .map(|(shard, seqs)| (format!("{name}/{shard}"), seqs))
        .collect()
}

/// `STREAM/SHARD` → the sequence numbers delivered, in delivery order.
fn delivered(log: &Log) -> BTreeMap<String, Vec<String>> {
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in log.delivered() {
        got.entry(d.shard).or_default().push(d.sequence_number);
    }
    got
}

/// Every expected record was delivered (the streams named in `expected` only).
fn all_delivered(log: &Log, expected: &BTreeMap<String, Vec<String>>) -> bool {
    let got = delivered(log);
    expected
        .iter()
        .all(|(shard, seqs)| got.get(shard).is_some_and(|g| g.len() >= seqs.len()))
}

/// What `worker`'s last status says of its streams.
fn streams_status(worker: &Running) -> StreamsStatus {
    worker
        .status
        .borrow()
        .streams
        .clone()
        .expect("a multi-stream worker reports its streams")
}

/// stream name → the keys of its leases in the table.
fn leases_by_stream(store: &InMemoryLeaseStore) -> BTreeMap<String, Vec<kcl_core::Lease>> {
    let mut by_stream: BTreeMap<String, Vec<kcl_core::Lease>> = BTreeMap::new();
    for lease in common::shard_leases(store) {
        let key = MultiStreamLeaseKey::parse(&lease.lease_key).expect("a multi-stream key");
        by_stream
            .entry(key.stream.stream_name().to_owned())
            .or_default()
            .push(lease);
    }
    by_stream
}

#[tokio::test(start_paused = true)]
async fn three_streams_two_workers_every_record_once_in_order_each_stream_spread() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 4), "orders");
    let payments = streams.add(InMemoryStream::new("payments", 2), "payments");
    let clicks = streams.add(InMemoryStream::new("clicks", 4), "clicks");
    let mut expected = put("orders", &orders, 0, 200);
    expected.extend(put("payments", &payments, 0, 100));
    expected.extend(put("clicks", &clicks, 0, 200));

    let a = start("worker-a", &streams, &store, &log);
    let b = start("worker-b", &streams, &store, &log);
    wait_until("every record delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    // Balanced per stream, not only in total.
    wait_until("each stream spread over both workers", WAIT, || {
        leases_by_stream(&store).values().all(|leases| {
            let mut per_owner: BTreeMap<Option<String>, usize> = BTreeMap::new();
            for lease in leases {
                *per_owner.entry(lease.owner.clone()).or_default() += 1;
            }
            per_owner.len() == 2
                && per_owner.keys().all(Option::is_some)
                && per_owner.values().max().unwrap() - per_owner.values().min().unwrap() <= 1
        })
    })
    .await;
    // Keys and attributes as the Java KCL writes them in multi-stream mode.
    for lease in common::shard_leases(&store) {
        let key = MultiStreamLeaseKey::parse(&lease.lease_key).unwrap();
        assert_eq!(key.stream.account_id(), IN_MEMORY_ACCOUNT);
        assert_eq!(lease.stream_name, Some(key.stream.to_string()));
        assert_eq!(lease.shard_id.as_deref(), Some(key.shard_id.as_str()));
    }
    // More records after the fleet settled, then a clean stop.
    common::merge(&mut expected, put("orders", &orders, 200, 300));
    common::merge(&mut expected, put("clicks", &clicks, 200, 300));
    wait_until("the later records delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
    assert!(log.overlaps().is_empty(), "{:?}", log.overlaps());
}

#[tokio::test(start_paused = true)]
async fn a_stream_added_while_running_is_consumed_within_a_discovery_interval() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let mut expected = put("orders", &orders, 0, 50);
    let a = start("worker-a", &streams, &store, &log);
    wait_until("orders delivered", WAIT, || all_delivered(&log, &expected)).await;

    let added_at = tokio::time::Instant::now();
    let refunds = streams.add(InMemoryStream::new("refunds", 3), "refunds");
    expected.extend(put("refunds", &refunds, 0, 60));
    wait_until("refunds delivered", WAIT, || all_delivered(&log, &expected)).await;
    // Discovered at the next discovery, synced at once, taken at the next taking round.
    let took = added_at.elapsed();
    let bound = DISCOVERY + LeaseConfig::default().taker_interval + Duration::from_secs(2);
    assert!(took <= bound, "took {took:?}, more than {bound:?}");
    a.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
}

#[tokio::test(start_paused = true)]
async fn a_stream_no_longer_listed_stops_cleanly_and_its_leases_go_after_the_grace_period() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let legacy = streams.add(InMemoryStream::new("legacy", 2), "legacy");
    let mut expected = put("orders", &orders, 0, 50);
    expected.extend(put("legacy", &legacy, 0, 50));
    let a = start("worker-a", &streams, &store, &log);
    let b = start("worker-b", &streams, &store, &log);
    wait_until("both streams delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;

    streams.unlist("legacy");
    let unlisted_at = tokio::time::Instant::now();
    // The processors of the stream are shut down (and checkpoint), their leases released.
    wait_until("legacy's leases released", WAIT, || {
        leases_by_stream(&store)
            .get("legacy")
            .is_some_and(|leases| leases.iter().all(|l| l.owner.is_none()))
    })
    .await;
    for shard in ["legacy/shardId-000000000000", "legacy/shardId-000000000001"] {
        assert!(
            log.events(shard).contains(&Event::ShutdownRequested),
            "{shard}: {:?}",
            log.events(shard)
        );
    }
    // Kept through the grace period (another worker might still list the stream), and
    // reported as pending deletion by both workers (both check the table) ...
    wait_until("legacy reported as pending deletion", WAIT, || {
        [&a, &b].iter().all(|w| {
            let s = streams_status(w);
            s.followed == 1 && s.pending_deletion == 1
        })
    })
    .await;
    assert!(leases_by_stream(&store).contains_key("legacy"));
    // ... while the other stream flows on.
    common::merge(&mut expected, put("orders", &orders, 50, 100));
    let later_legacy = put("legacy", &legacy, 50, 60);
    wait_until("orders keeps flowing", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    wait_until("legacy's leases deleted", WAIT, || {
        !leases_by_stream(&store).contains_key("legacy")
    })
    .await;
    assert!(unlisted_at.elapsed() >= GRACE);
    wait_until("no stream pending deletion", WAIT, || {
        [&a, &b]
            .iter()
            .all(|w| streams_status(w).pending_deletion == 0)
    })
    .await;
    // Each worker that deleted some of the leases counted the stream (both, if their
    // deletes interleaved); nothing else changed.
    let (sa, sb) = (streams_status(&a), streams_status(&b));
    assert!(
        (1..=2).contains(&(sa.deleted + sb.deleted)),
        "{sa:?} {sb:?}"
    );
    for s in [&sa, &sb] {
        assert_eq!(
            (s.followed, s.unreachable, s.discovery_failures),
            (1, 0, 0),
            "{s:?}"
        );
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    // Nothing of the unlisted stream was read after it left the list.
    let got = delivered(&log);
    for (shard, seqs) in &later_legacy {
        assert!(
            got.get(shard)
                .is_none_or(|g| !seqs.iter().any(|s| g.contains(s))),
            "{shard} read after it was unlisted"
        );
    }
    assert_eq!(got, expected);
}

#[tokio::test(start_paused = true)]
async fn a_deleted_stream_leaves_the_others_undisturbed_and_its_leases_are_deleted() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let doomed = streams.add(InMemoryStream::new("doomed", 2), "doomed");
    let mut expected = put("orders", &orders, 0, 50);
    let doomed_records = put("doomed", &doomed, 0, 50);
    expected.extend(doomed_records.clone());
    let a = start("worker-a", &streams, &store, &log);
    let b = start("worker-b", &streams, &store, &log);
    wait_until("both streams delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;

    doomed.delete();
    common::merge(&mut expected, put("orders", &orders, 50, 100));
    wait_until("orders keeps flowing", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    wait_until("the deleted stream's leases deleted", WAIT, || {
        !leases_by_stream(&store).contains_key("doomed")
    })
    .await;
    assert_eq!(
        leases_by_stream(&store).keys().collect::<Vec<_>>(),
        ["orders"]
    );
    // Both workers still run: a deleted stream is no fatal error in multi-stream mode.
    assert!(!a.task.is_finished() && !b.task.is_finished());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
}

#[tokio::test(start_paused = true)]
async fn a_stream_recreated_under_its_name_starts_fresh() {
    let (streams, store, log) = fixture();
    let first = streams.add(InMemoryStream::new("orders", 2), "orders");
    let first_records = put("orders", &first, 0, 40);
    let a = start("worker-a", &streams, &store, &log);
    wait_until("the first stream delivered", WAIT, || {
        all_delivered(&log, &first_records)
    })
    .await;
    let old_keys: BTreeSet<String> = common::shard_leases(&store)
        .into_iter()
        .map(|l| l.lease_key)
        .collect();

    first.delete();
    let second = streams.add(
        InMemoryStream::new("orders", 2).with_creation_epoch(1_800_000_000),
        "orders",
    );
    let second_records = put("orders", &second, 0, 30);
    // The second stream's records are read from its start: its shard ids equal the first
    // one's, but its leases are new (another creation epoch), without the old checkpoints.
    let mut expected = first_records.clone();
    common::merge(&mut expected, second_records.clone());
    wait_until("the recreated stream delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    let keys_now: BTreeSet<String> = common::shard_leases(&store)
        .into_iter()
        .map(|l| l.lease_key)
        .collect();
    assert!(
        keys_now
            .iter()
            .any(|k| k.starts_with(&format!("{IN_MEMORY_ACCOUNT}:orders:1800000000:"))),
        "{keys_now:?}"
    );
    wait_until("the first stream's leases deleted", WAIT, || {
        common::shard_leases(&store)
            .iter()
            .all(|l| !old_keys.contains(&l.lease_key))
    })
    .await;
    a.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
}

#[tokio::test(start_paused = true)]
async fn a_split_in_one_stream_keeps_parents_before_children_while_the_others_flow() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let clicks = streams.add(InMemoryStream::new("clicks", 2), "clicks");
    let mut expected = put("orders", &orders, 0, 60);
    expected.extend(put("clicks", &clicks, 0, 60));
    let a = start("worker-a", &streams, &store, &log);
    let b = start("worker-b", &streams, &store, &log);
    wait_until("both streams delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;

    let children = orders.split_shard("shardId-000000000000");
    common::merge(&mut expected, put("orders", &orders, 60, 200));
    common::merge(&mut expected, put("clicks", &clicks, 60, 200));
    wait_until("everything after the split delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    // Cleanup per stream: the finished parent's lease is deleted once its children started.
    wait_until("the parent's lease cleaned up", WAIT, || {
        leases_by_stream(&store)["orders"]
            .iter()
            .all(|l| !l.lease_key.ends_with(":shardId-000000000000"))
    })
    .await;
    assert_eq!(leases_by_stream(&store)["clicks"].len(), 2);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
    // Every child record came after the parent's last one.
    assert_children_after_parent(&log, "orders", "shardId-000000000000", &children);
    // The children's leases name their parent by shard id, in their own stream.
    let child_leases: Vec<_> = leases_by_stream(&store)["orders"]
        .iter()
        .filter(|l| !l.parent_shard_ids.is_empty())
        .cloned()
        .collect();
    assert!(!child_leases.is_empty());
    for lease in child_leases {
        assert_eq!(
            lease.parent_shard_ids,
            BTreeSet::from(["shardId-000000000000".to_owned()])
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_single_stream_table_is_refused_before_anything_is_written() {
    let (streams, store, log) = fixture();
    // A single-stream application's lease, keyed by shard id.
    store
        .create_lease_if_absent(
            &kcl_core::Lease::new("shardId-000000000000", kcl_core::Checkpoint::TrimHorizon)
                .with_stream_name("orders"),
        )
        .await
        .unwrap();
    streams.add(InMemoryStream::new("payments", 2), "payments");
    let a = start("worker-a", &streams, &store, &log);
    let outcome = tokio::time::timeout(WAIT, a.task).await.unwrap().unwrap();
    assert!(
        matches!(
            outcome,
            Err(kcl_core::Error::LeaseTableOfAnotherStream { .. })
        ),
        "{outcome:?}"
    );
    let keys: Vec<String> = common::shard_leases(&store)
        .into_iter()
        .map(|l| l.lease_key)
        .collect();
    assert_eq!(keys, ["shardId-000000000000"]);
}

#[tokio::test(start_paused = true)]
async fn workers_each_holding_a_whole_stream_from_history_end_with_half_of_each() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 4), "orders");
    let clicks = streams.add(InMemoryStream::new("clicks", 4), "clicks");
    // As a past run left the table: worker-a holds every lease of orders, worker-b every one
    // of clicks. Balanced in total, not per stream.
    for (stream, owner) in [(&orders, "worker-a"), (&clicks, "worker-b")] {
        let id = stream.stream_identity().await.unwrap();
        for shard in stream.shards() {
            let key = id.lease_key(&shard.shard_id);
            let mut lease = kcl_core::Lease::new(&key, kcl_core::Checkpoint::TrimHorizon)
                .with_hash_key_range(shard.hash_key_range);
            lease.stream_name = Some(id.to_string());
            lease.shard_id = Some(shard.shard_id.clone());
            store.create_lease_if_absent(&lease).await.unwrap();
            store.take_as(&key, owner);
        }
    }
    let mut expected = put("orders", &orders, 0, 100);
    expected.extend(put("clicks", &clicks, 0, 100));
    let a = start("worker-a", &streams, &store, &log);
    let b = start("worker-b", &streams, &store, &log);
    wait_until("each worker holding half of each stream", WAIT, || {
        let mut per: BTreeMap<(String, Option<String>), usize> = BTreeMap::new();
        for (stream, leases) in leases_by_stream(&store) {
            for lease in leases.iter().filter(|l| l.handoff_to.is_none()) {
                *per.entry((stream.clone(), lease.owner.clone()))
                    .or_default() += 1;
            }
        }
        per.len() == 4 && per.keys().all(|(_, o)| o.is_some()) && per.values().all(|n| *n == 2)
    })
    .await;
    wait_until("every record delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
}

#[tokio::test(start_paused = true)]
async fn fan_out_per_stream_with_a_split_and_a_handoff_on_shutdown_repeats_nothing() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let clicks = streams.add(InMemoryStream::new("clicks", 2), "clicks");
    for stream in [&orders, &clicks] {
        stream.set_subscription_session_length(Duration::from_secs(5));
    }
    let fan_out = |worker: &str| {
        config(worker).with_retrieval(Retrieval::FanOut(
            FanOutConfig::default().with_event_timeout(Duration::from_secs(10)),
        ))
    };
    let mut expected = put("orders", &orders, 0, 100);
    expected.extend(put("clicks", &clicks, 0, 100));
    let a = start_as(fan_out("worker-a"), &streams, &store, &log);
    let b = start_as(fan_out("worker-b"), &streams, &store, &log);
    wait_until("every record delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    // Each stream registered its own consumer and is read through subscriptions.
    for stream in [&orders, &clicks] {
        assert!(
            stream
                .subscribe_calls("shardId-000000000000")
                .len()
                .max(stream.subscribe_calls("shardId-000000000001").len())
                > 0
        );
    }
    // A split in one stream, read through fan-out: parents before children.
    let children = orders.split_shard("shardId-000000000001");
    common::merge(&mut expected, put("orders", &orders, 100, 200));
    common::merge(&mut expected, put("clicks", &clicks, 100, 200));
    wait_until("the records after the split", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    // A deploy: worker-b stops and hands its leases of both streams over; nothing is
    // delivered twice.
    b.stop().await.unwrap();
    common::merge(&mut expected, put("orders", &orders, 200, 300));
    common::merge(&mut expected, put("clicks", &clicks, 200, 300));
    wait_until("the records after the handoff", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    a.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
    assert_children_after_parent(&log, "orders", "shardId-000000000001", &children);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_stream_does_not_stop_the_others() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let clicks = streams.add(InMemoryStream::new("clicks", 2), "clicks");
    // Throttled (or denied) from the start: it cannot even be looked up.
    let (throttled, faults) = streams.add_faulty(InMemoryStream::new("audit", 1), "audit");
    faults.set(Fault::Throttle);
    let mut expected = put("orders", &orders, 0, 50);
    expected.extend(put("clicks", &clicks, 0, 50));
    let audit = put("audit", &throttled, 0, 20);
    let a = start("worker-a", &streams, &store, &log);
    let b = start("worker-b", &streams, &store, &log);
    wait_until("the reachable streams delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    assert!(!leases_by_stream(&store).contains_key("audit"));
    for w in [&a, &b] {
        let s = streams_status(w);
        assert_eq!((s.followed, s.unreachable), (2, 1), "{s:?}");
    }

    faults.set(Fault::None);
    expected.extend(audit);
    wait_until("the stream reachable again is consumed", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    // A consumed stream fails for a while (every call): the others flow on meanwhile.
    faults.set(Fault::Fail);
    let more_audit = put("audit", &throttled, 20, 40);
    common::merge(&mut expected, put("orders", &orders, 50, 100));
    common::merge(&mut expected, put("clicks", &clicks, 50, 100));
    let without_audit: BTreeMap<String, Vec<String>> = expected
        .iter()
        .filter(|(k, _)| !k.starts_with("audit/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    wait_until("the others flow while one stream fails", WAIT, || {
        all_delivered(&log, &without_audit)
    })
    .await;
    // Its next sync fails: reported unreachable, still followed.
    wait_until("the failing stream reported unreachable", WAIT, || {
        [&a, &b].iter().all(|w| {
            let s = streams_status(w);
            s.followed == 3 && s.unreachable == 1
        })
    })
    .await;
    faults.set(Fault::None);
    common::merge(&mut expected, more_audit);
    wait_until("everything once the stream answers again", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    assert!(!a.task.is_finished() && !b.task.is_finished());
    wait_until("no stream unreachable", WAIT, || {
        [&a, &b].iter().all(|w| streams_status(w).unreachable == 0)
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    // At least once, in order per shard (a failing checkpoint may deliver a batch again).
    let got = delivered(&log);
    for (shard, seqs) in &expected {
        let mut seen: Vec<&String> = Vec::new();
        for seq in &got[shard] {
            if seen.last().is_none_or(|last| *last != seq) && !seen.contains(&seq) {
                seen.push(seq);
            }
        }
        assert_eq!(seen, seqs.iter().collect::<Vec<_>>(), "{shard}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_watchdog_restarts_a_stalled_streams_consumers_while_the_others_flow() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let (stuck, faults) = streams.add_faulty(InMemoryStream::new("stuck", 1), "stuck");
    let mut expected = put("orders", &orders, 0, 30);
    expected.extend(put("stuck", &stuck, 0, 10));
    let a = start("worker-a", &streams, &store, &log);
    wait_until("both streams delivered", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;

    // Every call to one stream hangs (a dead connection): its consumer makes no progress.
    faults.set(Fault::Stall);
    let timeout = kcl_core::ProcessingConfig::default().watchdog_timeout;
    common::merge(&mut expected, put("orders", &orders, 30, 60));
    let stuck_later = put("stuck", &stuck, 10, 20);
    wait_until("orders flows while the other stream hangs", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    tokio::time::sleep(timeout + Duration::from_secs(10)).await;
    assert!(
        a.status.borrow().watchdog_restarts >= 1,
        "{:?}",
        a.status.borrow()
    );
    faults.set(Fault::None);
    common::merge(&mut expected, stuck_later);
    wait_until("the stalled stream's records once it answers", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    a.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
}

#[tokio::test(start_paused = true)]
async fn a_failing_tracker_keeps_the_streams_consumed_and_is_counted() {
    let (streams, store, log) = fixture();
    let orders = streams.add(InMemoryStream::new("orders", 2), "orders");
    let mut expected = put("orders", &orders, 0, 50);
    let a = start("worker-a", &streams, &store, &log);
    wait_until("orders delivered", WAIT, || all_delivered(&log, &expected)).await;

    // The tracker fails (ListStreams denied, say) while a stream is added and another
    // unlisted: the worker goes on with the streams it had.
    streams.tracker_fails.store(true, Ordering::SeqCst);
    let refunds = streams.add(InMemoryStream::new("refunds", 1), "refunds");
    let refunds_records = put("refunds", &refunds, 0, 20);
    streams.unlist("orders");
    common::merge(&mut expected, put("orders", &orders, 50, 100));
    wait_until("orders flows while the tracker fails", WAIT, || {
        all_delivered(&log, &expected)
    })
    .await;
    wait_until("the failures counted", WAIT, || {
        streams_status(&a).discovery_failures >= 3
    })
    .await;
    let s = streams_status(&a);
    assert_eq!(
        (s.followed, s.unreachable, s.pending_deletion),
        (1, 0, 0),
        "{s:?}"
    );
    assert!(!leases_by_stream(&store).contains_key("refunds"));

    // Once it answers, its list counts again.
    streams.tracker_fails.store(false, Ordering::SeqCst);
    expected.extend(refunds_records);
    wait_until("refunds delivered", WAIT, || all_delivered(&log, &expected)).await;
    wait_until("orders no longer followed", WAIT, || {
        let s = streams_status(&a);
        s.followed == 1 && s.pending_deletion == 1
    })
    .await;
    let failures = streams_status(&a).discovery_failures;
    tokio::time::sleep(DISCOVERY * 2).await;
    assert_eq!(streams_status(&a).discovery_failures, failures);
    a.stop().await.unwrap();
    assert_eq!(delivered(&log), expected);
}

#[tokio::test(start_paused = true)]
async fn a_worker_looks_streams_up_at_most_ten_times_a_second_even_after_a_hung_sync() {
    let (streams, store, log) = fixture();
    let mut all: Vec<Arc<InMemoryStream>> = (0..20)
        .map(|i| {
            let name = format!("s{i:02}");
            streams.add(InMemoryStream::new(&name, 1), &name)
        })
        .collect();
    let (hung, faults) = streams.add_faulty(InMemoryStream::new("hung", 1), "hung");
    all.push(hung);
    let a = start("worker-a", &streams, &store, &log);
    wait_until("every stream's lease held", WAIT, || {
        a.status.borrow().held_leases.len() == 21
    })
    .await;

    // The hung stream's sync waits for its calls' timeout; the other streams' syncs, spread
    // over the interval, come due meanwhile and are all due at once when it gives up.
    faults.set(Fault::Stall);
    tokio::time::sleep(Duration::from_secs(40)).await;
    faults.set(Fault::None);
    tokio::time::sleep(Duration::from_secs(20)).await;
    a.stop().await.unwrap();

    let mut calls: Vec<tokio::time::Instant> =
        all.iter().flat_map(|s| s.identity_calls()).collect();
    calls.sort();
    // Discovery's 21 lookups, and the syncs' checks over a minute (10 s interval).
    assert!(calls.len() >= 21 + 60, "{} calls", calls.len());
    for (i, at) in calls.iter().enumerate() {
        let within = calls[i..]
            .iter()
            .take_while(|t| t.duration_since(*at) < Duration::from_secs(1))
            .count();
        assert!(
            within <= 10,
            "{within} DescribeStreamSummary calls within 1 s"
        );
    }
}
