//! A bad day against kinesis-mock and DynamoDB Local, with a fault-injecting proxy in front of
//! Kinesis: throttling, 500s, dropped connections and stalls of GetRecords; KPL-aggregated
//! records; a panicking processor. Every record still arrives, in shard order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kcl_core::{
    Checkpoint, Checkpointer, Error, InitialPosition, LeaseStore, PollingConfig, Record,
    RecordProcessor, RetryConfig, StreamClient, Worker, WorkerConfig, async_trait,
};
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    PATIENCE, Recorder, by_shard, clients, create_stream, kinesis, put_raw, put_records,
    puts_by_shard, records, sdk_config, start_worker_on, stream_client_via, unique, wait_for,
};

fn config(app: &str, stream: &str) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id("w1")
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_polling(
            PollingConfig::default()
                .with_idle_time_between_empty_reads(Duration::from_millis(500))
                .with_request_timeout(Duration::from_secs(2))
                .with_retry(RetryConfig::new(
                    Duration::from_millis(200),
                    Duration::from_secs(2),
                )),
        )
}

async fn kinesis_proxy() -> FaultProxy {
    sdk_config().await;
    FaultProxy::start(&std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_throttling_server_errors_dropped_connections_and_stalls() {
    let proxy = kinesis_proxy().await;
    let kinesis = kinesis().await;
    let stream = unique("faulty-reads");
    create_stream(&kinesis, &stream, 4).await;
    let app = unique("faulty-app");
    let config = config(&app, &stream);
    let (_, store) = clients(&config).await;
    // One attempt per SDK call: every injected fault reaches the worker's own retries.
    let stream_client: Arc<dyn StreamClient> =
        Arc::new(stream_client_via(&proxy.url(), &stream, 1).await);
    let recorder = Recorder::default();
    let worker = start_worker_on(config, &recorder, stream_client, store);
    let mut puts = put_records(&kinesis, &stream, &records("a", 0, 200, 23)).await;
    wait_for("first records", PATIENCE, || async {
        recorder.count() >= 200
    })
    .await;

    // Each fault for a few seconds while records keep coming.
    for (fault, every) in [
        (
            Fault::Error {
                status: 400,
                code: "ProvisionedThroughputExceededException",
            },
            2,
        ),
        (
            Fault::Error {
                status: 500,
                code: "InternalFailure",
            },
            2,
        ),
        (Fault::DropConnection, 3),
        (Fault::Delay(Duration::from_secs(3)), 3), // beyond the 2 s request timeout
    ] {
        proxy.inject(Rule::on("GetRecords", fault).every(every));
        puts.extend(
            put_records(
                &kinesis,
                &stream,
                &records(&format!("{every}"), puts.len(), 100, 23),
            )
            .await,
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
        proxy.clear();
    }
    assert!(proxy.faults()["GetRecords"] >= 8, "{:?}", proxy.faults());
    wait_for("every record", PATIENCE, || async {
        recorder.count() >= puts.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = worker.status.borrow().clone();
    assert!(status.throttled_reads >= 1, "{status:?}");
    assert_eq!(status.shard_failures, 0, "retried, not failed: {status:?}");
    worker.stop().await.unwrap();
    assert_eq!(
        by_shard(&recorder.delivered()),
        puts_by_shard(&puts),
        "every record once, in shard order"
    );
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../kcl-core/tests/fixtures/kpl/{name}.bin",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Records (sequence number, sub-sequence number, data) and checkpoints each user record,
/// until its budget is spent; then takes batches without processing or checkpointing them.
struct Budgeted {
    budget: Arc<AtomicUsize>,
    seen: Seen,
}

/// (sequence number, sub-sequence number, data, aggregated) of each user record processed.
type Seen = Arc<std::sync::Mutex<Vec<(String, u64, Vec<u8>, bool)>>>;

#[async_trait]
impl RecordProcessor for Budgeted {
    type Error = Error;
    async fn process_records(
        &mut self,
        records: &[Record],
        cp: &mut Checkpointer,
        _: Option<u64>,
    ) -> Result<(), Error> {
        for r in records {
            if self
                .budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return Ok(());
            }
            self.seen.lock().unwrap().push((
                r.sequence_number.to_string(),
                r.sub_sequence_number,
                r.data.to_vec(),
                r.aggregated,
            ));
            cp.checkpoint_record(r).await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpl_aggregates_are_de_aggregated_and_a_restart_resumes_inside_one() {
    let kinesis = kinesis().await;
    let stream = unique("kpl");
    create_stream(&kinesis, &stream, 1).await;
    put_raw(&kinesis, &stream, "plain", b"before").await;
    let aggregate = put_raw(&kinesis, &stream, "agg", &fixture("shared_keys")).await; // 20 user records
    let mut corrupt = fixture("five_keys");
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xFF;
    put_raw(&kinesis, &stream, "bad", &corrupt).await;
    let app = unique("kpl-app");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let run = |budget: usize| {
        let (seen, budget, app, stream) = (
            seen.clone(),
            Arc::new(AtomicUsize::new(budget)),
            app.clone(),
            stream.clone(),
        );
        async move {
            let config = config(&app, &stream);
            let (stream_client, store): (_, Arc<dyn LeaseStore>) = clients(&config).await;
            let factory = move |_: &str| Budgeted {
                budget: budget.clone(),
                seen: seen.clone(),
            };
            let worker = Worker::new(config, stream_client, store.clone(), factory).unwrap();
            let status = worker.status();
            let shutdown = kcl_core::CancellationToken::new();
            (
                shutdown.clone(),
                tokio::spawn(worker.run(shutdown)),
                status,
                store,
            )
        }
    };
    // First run: the plain record and 3 user records of the aggregate, each checkpointed.
    let (shutdown, task, _, store) = run(4).await;
    wait_for("4 records", PATIENCE, || async {
        seen.lock().unwrap().len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let shard = "shardId-000000000000";
    let checkpoint = store.get_lease(shard).await.unwrap().unwrap().checkpoint;
    assert_eq!(checkpoint.as_text(), aggregate);
    assert_eq!(checkpoint.sub_sequence_number(), 2);

    // Second run: from the 4th user record of the aggregate, then the corrupt one, plain.
    let (shutdown, task, status, _) = run(usize::MAX).await;
    wait_for("the rest", PATIENCE, || async {
        seen.lock().unwrap().len() == 1 + 20 + 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let aggregation_errors = status.borrow().aggregation_errors;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    let subs: Vec<u64> = seen
        .iter()
        .filter(|s| s.0 == aggregate)
        .map(|s| s.1)
        .collect();
    assert_eq!(
        subs,
        (0..20).collect::<Vec<_>>(),
        "every user record once, in order, across the restart"
    );
    assert!(
        seen.iter().filter(|s| s.0 == aggregate).all(|s| s.3),
        "marked aggregated"
    );
    assert_eq!(seen[4].2, b"{\"n\": 3}");
    let last = seen.last().unwrap();
    assert_eq!(
        (last.2.as_slice(), last.3),
        (corrupt.as_slice(), false),
        "the corrupt aggregate, as it came"
    );
    assert_eq!(aggregation_errors, 1);
}

/// Panics on every record with data `boom-…` the first time it sees it.
struct PanicsOnce {
    recorder: Arc<std::sync::Mutex<Vec<String>>>,
    panicked: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

#[async_trait]
impl RecordProcessor for PanicsOnce {
    type Error = Error;
    async fn process_records(
        &mut self,
        records: &[Record],
        cp: &mut Checkpointer,
        _: Option<u64>,
    ) -> Result<(), Error> {
        for r in records {
            let data = String::from_utf8_lossy(&r.data).into_owned();
            if data.starts_with("boom") && self.panicked.lock().unwrap().insert(data.clone()) {
                panic!("cannot handle {data}");
            }
            self.recorder.lock().unwrap().push(data);
            cp.checkpoint_record(r).await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_processor_is_replaced_and_nothing_is_lost() {
    let kinesis = kinesis().await;
    let stream = unique("panics");
    create_stream(&kinesis, &stream, 2).await;
    let mut input = records("ok", 0, 30, 7);
    input.extend(records("boom", 0, 3, 7));
    input.extend(records("fine", 0, 30, 7));
    let puts = put_records(&kinesis, &stream, &input).await;
    let app = unique("panics-app");
    let config = config(&app, &stream);
    let (stream_client, store) = clients(&config).await;
    let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let panicked = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let factory = {
        let (delivered, panicked) = (delivered.clone(), panicked.clone());
        move |_: &str| PanicsOnce {
            recorder: delivered.clone(),
            panicked: panicked.clone(),
        }
    };
    let worker = Worker::new(config, stream_client, store.clone(), factory).unwrap();
    let status = worker.status();
    let shutdown = kcl_core::CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    wait_for("every record", PATIENCE, || async {
        delivered.lock().unwrap().len() >= puts.len()
    })
    .await;
    wait_for("the status", PATIENCE, || async {
        status.borrow().processor_panics == 3
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let mut got = delivered.lock().unwrap().clone();
    got.sort();
    let mut want: Vec<String> = puts.iter().map(|p| p.data.clone()).collect();
    want.sort();
    assert_eq!(
        got, want,
        "every record exactly once: each replacement resumed at the checkpoint"
    );
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        let checkpoint = store.get_lease(shard).await.unwrap().unwrap().checkpoint;
        assert!(
            matches!(checkpoint, Checkpoint::SequenceNumber(_)),
            "{checkpoint}"
        );
    }
}
