//! One worker against kinesis-mock and DynamoDB Local: consumption, restarts, initial
//! positions, checkpoint rules, the lease table's schema and items, fencing, bad input.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use kcl_core::{
    CancellationToken, Checkpoint, Checkpointer, Error, InitialPosition, Lease, LeaseFence,
    LeaseStore, LeaseUpdate, PollingConfig, Record, RecordProcessor, SequenceNumber, Worker,
    WorkerConfig, async_trait,
};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::{
    Event, PATIENCE, Recorder, by_shard, clients, create_stream, dynamodb, kinesis, put_records,
    puts_by_shard, records, start_worker, unique, wait_for,
};

fn config(app: &str, stream: &str, worker: &str) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_polling(
            PollingConfig::default().with_idle_time_between_empty_reads(Duration::from_millis(500)),
        )
}

async fn store(table: &str) -> DynamoLeaseStore {
    DynamoLeaseStore::new(dynamodb().await, table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_shard_stream_is_consumed_exactly_once_in_shard_order() {
    let kinesis = kinesis().await;
    let stream = unique("four-shards");
    create_stream(&kinesis, &stream, 4).await;
    let puts = put_records(&kinesis, &stream, &records("r", 0, 1000, 97)).await;
    let expected = puts_by_shard(&puts);
    assert_eq!(expected.len(), 4, "records in every shard");

    let app = unique("app");
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w1"), &recorder).await;
    wait_for("1000 records", PATIENCE, || async {
        recorder.count() >= 1000
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // room for a duplicate to show up
    worker.stop().await.unwrap();

    assert_eq!(
        by_shard(&recorder.delivered()),
        expected,
        "every record once, in shard order"
    );
    let leases = store(&app).await.list_leases().await.unwrap();
    assert!(leases.invalid.is_empty());
    assert_eq!(leases.leases.len(), 4);
    for lease in leases.leases {
        assert_eq!(lease.owner, None, "released at shutdown");
        assert_eq!(
            lease.checkpoint.as_text(),
            expected[&lease.lease_key].last().unwrap()
        );
        let events = recorder.events(&lease.lease_key);
        assert_eq!(
            events.first().map(|e| &e.1),
            Some(&Event::Initialized(Checkpoint::TrimHorizon))
        );
        assert_eq!(events.last().map(|e| &e.1), Some(&Event::ShutdownRequested));
    }
}

/// What the lease-table cost figures of BENCHMARKS.md rest on: the store counts DynamoDB's
/// own consumed capacity per request, and the worker reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_table_requests_and_consumed_capacity_are_counted_by_operation() {
    let kinesis = kinesis().await;
    let stream = unique("usage");
    create_stream(&kinesis, &stream, 4).await;
    let app = unique("app");
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w1"), &recorder).await;
    let mut status = worker.status.clone();
    wait_for("4 leases held and renewed", PATIENCE, || {
        let status = status.borrow_and_update().clone();
        async move {
            status.held_leases.len() == 4
                && status
                    .lease_table_usage
                    .get("UpdateItem")
                    .is_some_and(|u| u.requests >= 8)
        }
    })
    .await;
    let usage = worker.status.borrow().lease_table_usage.clone();
    worker.stop().await.unwrap();

    let scans = usage["Scan"];
    assert!(scans.requests >= 1 && scans.items >= 4 * (scans.requests - 1));
    // The taking round's scans are eventually consistent: half a unit per 4 KB, at least
    // half a unit per scan but for the first, of the still empty table (DynamoDB Local
    // reports none for it).
    assert!(
        scans.read_units.units() >= 0.5 * (scans.requests - 1) as f64,
        "{scans:?}"
    );
    assert_eq!(scans.write_units.units(), 0.0);
    let updates = usage["UpdateItem"];
    assert_eq!(updates.items, updates.requests);
    assert!(
        updates.write_units.units() >= updates.requests as f64,
        "{updates:?}"
    );
    assert_eq!(updates.read_units.units(), 0.0);
    let creates = usage["PutItem"];
    assert!(creates.requests <= 4 && creates.write_units.units() >= creates.requests as f64);

    // A store of its own counts only its own calls: one strongly consistent scan of four
    // small items is one read unit (4 KB), reported by DynamoDB itself.
    let own = store(&app).await;
    assert!(own.usage().unwrap().snapshot().is_empty());
    let leases = own.list_leases().await.unwrap();
    assert_eq!(leases.leases.len(), 4);
    let counted = own.usage().unwrap().snapshot();
    assert_eq!(counted.len(), 1);
    assert_eq!(counted["Scan"].requests, 1);
    assert_eq!(counted["Scan"].items, 4);
    assert_eq!(counted["Scan"].read_units.units(), 1.0);
    // An eventually consistent one is half of that.
    let leases = own.list_leases_eventually_consistent().await.unwrap();
    assert_eq!(leases.leases.len(), 4);
    let counted = own.usage().unwrap().snapshot();
    assert_eq!(counted["Scan"].requests, 2);
    assert_eq!(counted["Scan"].read_units.units(), 1.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_graceful_shutdown_resumes_after_the_last_checkpoint() {
    let kinesis = kinesis().await;
    let stream = unique("restart");
    create_stream(&kinesis, &stream, 2).await;
    put_records(&kinesis, &stream, &records("before", 0, 300, 31)).await;
    let app = unique("app");

    let first = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w1"), &first).await;
    wait_for("first 300", PATIENCE, || async { first.count() >= 300 }).await;
    worker.stop().await.unwrap();
    assert_eq!(first.count(), 300);

    let after = put_records(&kinesis, &stream, &records("after", 0, 200, 31)).await;
    let second = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w2"), &second).await;
    wait_for("next 200", PATIENCE, || async { second.count() >= 200 }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.stop().await.unwrap();

    assert_eq!(
        by_shard(&second.delivered()),
        puts_by_shard(&after),
        "only the new records, once, in order"
    );
    for (_, shard, event) in second.all_events() {
        if let Event::Initialized(checkpoint) = event {
            assert!(
                matches!(checkpoint, Checkpoint::SequenceNumber(_)),
                "{shard} resumed from {checkpoint}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_initial_position_starts_where_it_should() {
    let kinesis = kinesis().await;
    let stream = unique("positions");
    create_stream(&kinesis, &stream, 2).await;
    let old = put_records(&kinesis, &stream, &records("old", 0, 100, 17)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let timestamp = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mid = put_records(&kinesis, &stream, &records("mid", 0, 100, 17)).await;

    let (trim, at, latest) = (
        Recorder::default(),
        Recorder::default(),
        Recorder::default(),
    );
    let w_trim = start_worker(config(&unique("trim"), &stream, "w-trim"), &trim).await;
    let w_at = start_worker(
        config(&unique("at"), &stream, "w-at")
            .with_initial_position(InitialPosition::AtTimestamp(timestamp)),
        &at,
    )
    .await;
    let w_latest = start_worker(
        config(&unique("latest"), &stream, "w-latest")
            .with_initial_position(InitialPosition::Latest),
        &latest,
    )
    .await;
    // LATEST reads what is put after `initialize`: wait for both shards to be initialized.
    wait_for("LATEST worker initialized", PATIENCE, || async {
        latest
            .all_events()
            .iter()
            .filter(|e| matches!(e.2, Event::Initialized(_)))
            .count()
            == 2
    })
    .await;
    let new = put_records(&kinesis, &stream, &records("new", 0, 100, 17)).await;

    wait_for("trim-horizon worker", PATIENCE, || async {
        trim.count() >= 300
    })
    .await;
    wait_for("at-timestamp worker", PATIENCE, || async {
        at.count() >= 200
    })
    .await;
    wait_for("latest worker", PATIENCE, || async {
        latest.count() >= 100
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for worker in [w_trim, w_at, w_latest] {
        worker.stop().await.unwrap();
    }
    let data = |r: &Recorder| {
        r.delivered()
            .into_iter()
            .map(|d| d.data)
            .collect::<BTreeSet<_>>()
    };
    let put_data = |sets: &[&[kcl_integration_tests::Put]]| {
        sets.iter()
            .flat_map(|s| s.iter().map(|p| p.data.clone()))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(data(&trim), put_data(&[&old, &mid, &new]));
    assert_eq!(trim.count(), 300);
    assert_eq!(data(&at), put_data(&[&mid, &new]));
    assert_eq!(at.count(), 200);
    assert_eq!(data(&latest), put_data(&[&new]));
    assert_eq!(latest.count(), 100);
}

/// What each checkpoint attempt returned.
type Outcomes = Arc<Mutex<Vec<(&'static str, Result<(), String>)>>>;

/// Tries the checkpoints a processor must not make, and one it may.
struct BadCheckpoints {
    outcomes: Outcomes,
    done: bool,
}

#[async_trait]
impl RecordProcessor for BadCheckpoints {
    type Error = Error;

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _: Option<u64>,
    ) -> Result<(), Error> {
        if self.done || records.len() < 2 {
            return Ok(());
        }
        self.done = true;
        let mut outcomes = Vec::new();
        let second = &records[1];
        let last = records.last().unwrap();
        outcomes.push((
            "at the second record",
            checkpointer
                .checkpoint_record(second)
                .await
                .map_err(|e| format!("{e:?}")),
        ));
        outcomes.push((
            "before it",
            checkpointer
                .checkpoint_record(&records[0])
                .await
                .map_err(|e| format!("{e:?}")),
        ));
        let beyond = format!("{}0", last.sequence_number);
        outcomes.push((
            "beyond the batch",
            checkpointer
                .checkpoint_sequence_number(&beyond, 0)
                .await
                .map_err(|e| format!("{e:?}")),
        ));
        outcomes.push((
            "not a number",
            checkpointer
                .checkpoint_sequence_number("12ab", 0)
                .await
                .map_err(|e| format!("{e:?}")),
        ));
        *self.outcomes.lock().unwrap() = outcomes;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_outside_the_delivered_range_are_rejected_with_typed_errors() {
    let kinesis = kinesis().await;
    let stream = unique("checkpoints");
    create_stream(&kinesis, &stream, 1).await;
    let puts = put_records(&kinesis, &stream, &records("c", 0, 20, 5)).await;
    let app = unique("app");
    let config = config(&app, &stream, "w1");
    let (stream_client, store_client) = clients(&config).await;
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let factory = {
        let outcomes = outcomes.clone();
        move |_: &str| BadCheckpoints {
            outcomes: outcomes.clone(),
            done: false,
        }
    };
    let worker = Worker::new(config, stream_client, store_client.clone(), factory).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    wait_for("the checkpoint attempts", PATIENCE, || async {
        outcomes.lock().unwrap().len() == 4
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes[0], ("at the second record", Ok(())));
    assert!(
        outcomes[1]
            .1
            .as_ref()
            .unwrap_err()
            .starts_with("CheckpointBeforeLast"),
        "{outcomes:?}"
    );
    assert!(
        outcomes[2]
            .1
            .as_ref()
            .unwrap_err()
            .starts_with("CheckpointBeyondDelivered"),
        "{outcomes:?}"
    );
    assert!(
        outcomes[3]
            .1
            .as_ref()
            .unwrap_err()
            .starts_with("InvalidSequenceNumber"),
        "{outcomes:?}"
    );
    let lease = store_client
        .get_lease(&puts[0].shard_id)
        .await
        .unwrap()
        .unwrap();
    let second = puts.iter().map(|p| &p.sequence_number).collect::<Vec<_>>()[1];
    assert_eq!(
        lease.checkpoint.as_text(),
        second,
        "only the valid checkpoint was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_table_has_the_java_kcl_schema_and_attributes() {
    let kinesis = kinesis().await;
    let stream = unique("schema");
    create_stream(&kinesis, &stream, 2).await;
    let puts = put_records(&kinesis, &stream, &records("s", 0, 50, 11)).await;
    let app = unique("app");
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w-schema"), &recorder).await;
    wait_for("50 records", PATIENCE, || async { recorder.count() >= 50 }).await;

    let ddb = dynamodb().await;
    let table = ddb
        .describe_table()
        .table_name(&app)
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let keys: Vec<_> = table
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
        .collect();
    assert_eq!(keys, vec![("leaseKey".to_owned(), KeyType::Hash)]);
    assert_eq!(
        table.attribute_definitions()[0].attribute_type(),
        &ScalarAttributeType::S
    );
    assert_eq!(
        table.billing_mode_summary().and_then(|b| b.billing_mode()),
        Some(&BillingMode::PayPerRequest)
    );

    let scan = || async {
        ddb.scan()
            .table_name(&app)
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .items
            .unwrap()
    };
    // The checkpoints follow the consumer; wait until both shards are checkpointed.
    wait_for("checkpoints", PATIENCE, || async {
        scan().await.iter().all(|i| matches!(i.get("checkpoint"), Some(AttributeValue::S(s)) if s.bytes().all(|b| b.is_ascii_digit())))
    })
    .await;
    for item in scan().await {
        let s = |name: &str| match item.get(name) {
            Some(AttributeValue::S(s)) => s.clone(),
            other => panic!("{name} is {other:?}"),
        };
        let n = |name: &str| match item.get(name) {
            Some(AttributeValue::N(n)) => n.parse::<u64>().unwrap(),
            other => panic!("{name} is {other:?}"),
        };
        let key = s("leaseKey");
        assert!(key.starts_with("shardId-"));
        assert_eq!(s("leaseOwner"), "w-schema");
        assert!(
            n("leaseCounter") >= 2,
            "taken, then checkpointed or renewed"
        );
        let last = puts
            .iter()
            .filter(|p| p.shard_id == key)
            .map(|p| &p.sequence_number)
            .max_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
        assert_eq!(Some(&s("checkpoint")), last);
        assert_eq!(n("checkpointSubSequenceNumber"), 0);
        assert_eq!(n("ownerSwitchesSinceCheckpoint"), 0);
        let start: u128 = s("startingHashKey").parse().unwrap();
        let end: u128 = s("endingHashKey").parse().unwrap();
        assert!(start < end);
        assert!(
            !item.contains_key("parentShardId"),
            "a new stream's shards have no parents"
        );
    }
    worker.stop().await.unwrap();
    for item in scan().await {
        assert!(
            !item.contains_key("leaseOwner"),
            "released: no owner attribute"
        );
    }
}

/// The transaction that creates a lease only while its parents' leases exist and its
/// children's do not, with DynamoDB's cancellation reasons read back per item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_in_a_lineage_check_parents_and_children() {
    let table = unique("lineage");
    let store = store(&table).await;
    store.initialize().await.unwrap();
    kcl_core::testing::check_create_in_lineage(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_writes_are_conditional_on_owner_and_counter() {
    let table = unique("fencing");
    let store = store(&table).await;
    store.initialize().await.unwrap();
    let lease = Lease::new("shardId-000000000007", Checkpoint::TrimHorizon);
    assert!(store.create_lease_if_absent(&lease).await.unwrap());
    assert!(
        !store
            .create_lease_if_absent(&lease.clone().with_parents(["x".to_owned()]))
            .await
            .unwrap(),
        "second create is a no-op"
    );

    let key = &lease.lease_key;
    let unowned = LeaseFence {
        owner: None,
        counter: 0,
    };
    let w1 = store
        .update_lease(
            key,
            &unowned,
            &LeaseUpdate::Take {
                new_owner: "w1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            w1.owner.as_deref(),
            w1.counter,
            w1.owner_switches_since_checkpoint
        ),
        (Some("w1"), 1, 1)
    );
    // Another worker takes the lease (it saw it expire).
    let w2 = store
        .update_lease(
            key,
            &w1.fence(),
            &LeaseUpdate::Take {
                new_owner: "w2".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(w2.counter, 2);
    // The old owner's checkpoint, renewal and release are refused, with the stored lease.
    let late = Checkpoint::at(SequenceNumber::new("4242").unwrap(), 0);
    for update in [
        LeaseUpdate::Checkpoint { checkpoint: late },
        LeaseUpdate::Renew,
        LeaseUpdate::Release,
    ] {
        match store.update_lease(key, &w1.fence(), &update).await {
            Err(Error::LeaseConditionFailed {
                current: Some(current),
                ..
            }) => {
                assert_eq!(current.owner.as_deref(), Some("w2"));
            }
            other => panic!("{update:?}: {other:?}"),
        }
    }
    let stored = store.get_lease(key).await.unwrap().unwrap();
    assert_eq!(stored, w2, "nothing written by the stale owner");

    // An offer, moved by its owner only from the worker it went to; the counter stays.
    let offered = store
        .update_lease(
            key,
            &w2.fence(),
            &LeaseUpdate::RequestHandoff { to: "w3".into() },
        )
        .await
        .unwrap();
    let redirect = |from: &str| LeaseUpdate::RedirectHandoff {
        from: from.into(),
        to: "w4".into(),
    };
    match store.update_lease(key, &w2.fence(), &redirect("w9")).await {
        Err(Error::LeaseConditionFailed {
            current: Some(current),
            ..
        }) => assert_eq!(current.handoff_to.as_deref(), Some("w3")),
        other => panic!("a redirect from a worker not offered to: {other:?}"),
    }
    let redirected = store
        .update_lease(key, &offered.fence(), &redirect("w3"))
        .await
        .unwrap();
    assert_eq!(
        (redirected.handoff_to.as_deref(), redirected.counter),
        (Some("w4"), w2.counter)
    );

    let checkpointed = store
        .update_lease(
            key,
            &w2.fence(),
            &LeaseUpdate::Checkpoint {
                checkpoint: Checkpoint::at(SequenceNumber::new("99").unwrap(), 3),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            checkpointed.checkpoint.sub_sequence_number(),
            checkpointed.owner_switches_since_checkpoint
        ),
        (3, 0)
    );
    let released = store
        .update_lease(key, &checkpointed.fence(), &LeaseUpdate::Release)
        .await
        .unwrap();
    assert_eq!(released.owner, None);

    // An update never creates a lease.
    match store
        .update_lease("shardId-999", &unowned, &LeaseUpdate::Renew)
        .await
    {
        Err(Error::LeaseConditionFailed { current: None, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get_lease("shardId-999").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_checkpoint_is_rejected_and_its_consumer_stops() {
    let kinesis = kinesis().await;
    let stream = unique("stale");
    create_stream(&kinesis, &stream, 1).await;
    put_records(&kinesis, &stream, &records("a", 0, 30, 7)).await;
    let app = unique("app");
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w1"), &recorder).await;
    wait_for("30 records", PATIENCE, || async { recorder.count() >= 30 }).await;

    let store = store(&app).await;
    let shard = recorder.delivered()[0].shard_id.clone();
    let before = store.get_lease(&shard).await.unwrap().unwrap();
    store
        .update_lease(
            &shard,
            &before.fence(),
            &LeaseUpdate::Take {
                new_owner: "w2".into(),
            },
        )
        .await
        .unwrap();
    wait_for("lease lost", PATIENCE, || async {
        recorder
            .events(&shard)
            .iter()
            .any(|e| e.1 == Event::LeaseLost)
    })
    .await;
    put_records(&kinesis, &stream, &records("b", 0, 30, 7)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        recorder.count(),
        30,
        "nothing delivered after the lease was lost"
    );
    let after = store.get_lease(&shard).await.unwrap().unwrap();
    assert_eq!(after.owner.as_deref(), Some("w2"));
    assert_eq!(
        after.checkpoint, before.checkpoint,
        "the stale owner wrote no checkpoint"
    );
    worker.stop().await.unwrap();
    assert_eq!(
        store
            .get_lease(&shard)
            .await
            .unwrap()
            .unwrap()
            .owner
            .as_deref(),
        Some("w2"),
        "w1 released nothing it lost"
    );
}

async fn create_table(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    key: &str,
    key_type: ScalarAttributeType,
) {
    ddb.create_table()
        .table_name(table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(key)
                .attribute_type(key_type)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(key)
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_another_schema_is_rejected_with_a_clear_error() {
    let ddb = dynamodb().await;
    let wrong_name = unique("wrong-key");
    create_table(&ddb, &wrong_name, "id", ScalarAttributeType::S).await;
    let wrong_type = unique("wrong-type");
    create_table(&ddb, &wrong_type, "leaseKey", ScalarAttributeType::N).await;
    for table in [&wrong_name, &wrong_type] {
        match store(table).await.initialize().await {
            Err(Error::LeaseTableSchema { table: t, problem }) => {
                assert_eq!(&t, table);
                assert!(problem.contains("leaseKey"), "{problem}");
            }
            other => panic!("{table}: {other:?}"),
        }
    }

    // The worker refuses to start on it, before touching the stream.
    let kinesis = kinesis().await;
    let stream = unique("schema-stream");
    create_stream(&kinesis, &stream, 1).await;
    let recorder = Recorder::default();
    let config = config("app-wrong-schema", &stream, "w1").with_lease_table_name(&wrong_name);
    let worker = start_worker(config, &recorder).await;
    let err = worker.task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::LeaseTableSchema { table, .. } if *table == wrong_name),
        "{err:?}"
    );
    assert!(err.to_string().contains("key schema is [id HASH]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_lease_items_give_typed_errors_and_are_skipped() {
    let kinesis = kinesis().await;
    let stream = unique("garbage");
    create_stream(&kinesis, &stream, 1).await;
    let puts = put_records(&kinesis, &stream, &records("g", 0, 20, 5)).await;
    let app = unique("app");
    let store = store(&app).await;
    store.initialize().await.unwrap();
    let ddb = dynamodb().await;
    let put_item = |item: HashMap<String, AttributeValue>| {
        let ddb = ddb.clone();
        let app = app.clone();
        async move {
            ddb.put_item()
                .table_name(app)
                .set_item(Some(item))
                .send()
                .await
                .unwrap()
        }
    };
    let s = |v: &str| AttributeValue::S(v.to_owned());
    put_item(HashMap::from([
        ("leaseKey".to_owned(), s("shardId-000000000088")),
        ("leaseCounter".to_owned(), s("abc")),
        ("checkpoint".to_owned(), s("TRIM_HORIZON")),
    ]))
    .await;
    put_item(HashMap::from([
        ("leaseKey".to_owned(), s("shardId-000000000089")),
        ("leaseCounter".to_owned(), AttributeValue::N("1".into())),
        ("checkpoint".to_owned(), s("not-a-sequence-number")),
    ]))
    .await;

    match store.get_lease("shardId-000000000088").await {
        Err(Error::InvalidLeaseItem {
            table,
            lease_key,
            attribute,
            ..
        }) => {
            assert_eq!(
                (table.as_str(), lease_key.as_str(), attribute),
                (app.as_str(), "shardId-000000000088", "leaseCounter")
            );
        }
        other => panic!("{other:?}"),
    }
    match store.get_lease("shardId-000000000089").await {
        Err(
            e @ Error::InvalidLeaseItem {
                attribute: "checkpoint",
                ..
            },
        ) => {
            assert!(e.to_string().contains("not-a-sequence-number"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let scan = store.list_leases().await.unwrap();
    assert_eq!(scan.invalid.len(), 2);

    // A worker skips them (with a warning) and consumes the stream.
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w1"), &recorder).await;
    wait_for("20 records", PATIENCE, || async { recorder.count() >= 20 }).await;
    worker.stop().await.unwrap();
    assert_eq!(recorder.count(), puts.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_a_typed_error() {
    let stream = unique("no-such-stream");
    let recorder = Recorder::default();
    let worker = start_worker(config(&unique("app"), &stream, "w1"), &recorder).await;
    let err = worker.task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::StreamNotFound { stream: s, .. } if *s == stream),
        "{err:?}"
    );
    // The service's own answer is kept as the cause (issue 10, defect 5).
    let chain = kcl_core::ErrorChain(&err).to_string();
    assert!(chain.contains("ResourceNotFoundException"), "{chain}");
}

/// Processes records one by one, checkpointing each, and fails on the record `poison`.
struct Poisoned {
    delivered: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl RecordProcessor for Poisoned {
    type Error = Box<dyn std::error::Error + Send + Sync>;

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _: Option<u64>,
    ) -> Result<(), Self::Error> {
        for record in records {
            let data = String::from_utf8_lossy(&record.data).into_owned();
            self.delivered.lock().unwrap().push(data.clone());
            if data == "poison" {
                return Err("cannot process the poison record".into());
            }
            checkpointer.checkpoint_record(record).await?;
        }
        Ok(())
    }

    async fn shutdown_requested(
        &mut self,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Self::Error> {
        // The usual "checkpoint everything on shutdown": must not cover the failed records.
        checkpointer.checkpoint().await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_processor_is_never_checkpointed_past_the_record_it_failed_on() {
    let kinesis = kinesis().await;
    let stream = unique("poison");
    create_stream(&kinesis, &stream, 1).await;
    let mut input = records("ok", 0, 10, 1);
    input.push(("key-0".into(), "poison".into()));
    input.extend(records("after", 0, 10, 1));
    let puts = put_records(&kinesis, &stream, &input).await;
    let app = unique("app");
    let fast_retry = kcl_core::ProcessingConfig::default().with_retry(
        kcl_core::RetryConfig::new(Duration::from_millis(50), Duration::from_millis(100))
            .with_max_attempts(Some(3)),
    );
    let config = config(&app, &stream, "w1").with_processing(fast_retry);
    let (stream_client, store_client) = clients(&config).await;
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let factory = {
        let delivered = delivered.clone();
        move |_: &str| Poisoned {
            delivered: delivered.clone(),
        }
    };
    let worker = Worker::new(config, stream_client, store_client.clone(), factory).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    // Three attempts, then the shard restarts from its checkpoint and fails again.
    wait_for(
        "the poison record to be retried across a restart",
        PATIENCE,
        || async {
            delivered
                .lock()
                .unwrap()
                .iter()
                .filter(|d| *d == "poison")
                .count()
                >= 6
        },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let delivered = delivered.lock().unwrap().clone();
    assert!(
        delivered.iter().all(|d| !d.starts_with("after")),
        "nothing after the poison record"
    );
    let ok: Vec<&String> = delivered.iter().filter(|d| d.starts_with("ok")).collect();
    assert_eq!(
        ok.len(),
        10,
        "the records before it were checkpointed once and not delivered again"
    );
    let lease = store_client
        .get_lease(&puts[0].shard_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        lease.checkpoint.as_text(),
        puts[9].sequence_number,
        "checkpoint at the last good record"
    );
}
