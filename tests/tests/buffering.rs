//! A buffering processor (flushes every few batches, checkpoints only what it flushed) against
//! kinesis-mock and DynamoDB Local: a panic with records buffered, and a shard end with
//! records buffered, with and without a flush in `shard_ended`; the panic also with records
//! read through enhanced fan-out. (On the fakes and paused time: `kcl-core/tests/buffering.rs`.)

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use kcl_core::{
    CancellationToken, FanOutConfig, InitialPosition, LeaseConfig, LeaseStore, PollingConfig,
    Retrieval, Worker, WorkerConfig, WorkerStatus,
};
use kcl_integration_tests::buffering::{Buffering, Sink};
use kcl_integration_tests::{
    PATIENCE, clients, create_stream, kinesis, put_records, records, split_shard, unique, wait_for,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

fn config(app: &str, stream: &str) -> WorkerConfig {
    WorkerConfig::new(app, stream)
        .with_worker_id("w1")
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_lease(
            LeaseConfig::default()
                .with_taker_interval(Duration::from_secs(1))
                .with_shard_sync_interval(Duration::from_secs(3)),
        )
        .with_polling(
            PollingConfig::default()
                .with_max_records(5)
                .with_idle_time_between_empty_reads(Duration::from_millis(500)),
        )
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<kcl_core::Result<()>>,
    status: watch::Receiver<WorkerStatus>,
    store: Arc<dyn LeaseStore>,
}

impl Running {
    async fn start(config: WorkerConfig, behaviour: &Buffering, sink: &Sink) -> Self {
        let (stream, store) = clients(&config).await;
        let worker = Worker::new(config, stream, store.clone(), behaviour.factory(sink))
            .expect("valid config");
        let status = worker.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        Running {
            shutdown,
            task,
            status,
            store,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("worker shut down in time")
            .expect("worker task did not panic")
            .expect("worker ended cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_with_records_buffered_loses_none_of_them() {
    let kinesis = kinesis().await;
    let stream = unique("buffer-panic");
    create_stream(&kinesis, &stream, 1).await;
    let puts = put_records(&kinesis, &stream, &records("rec", 0, 60, 6)).await;
    let expected: BTreeSet<String> = puts.into_iter().map(|p| p.data).collect();
    let sink = Sink::default();
    // Batches of 5, a flush every 4 batches, one panic with a batch or two buffered.
    let behaviour = Buffering {
        flush_every: 4,
        panics: Arc::new(AtomicUsize::new(1)),
        panic_after_batches: 5,
        ..Buffering::default()
    };
    let worker = Running::start(config(&unique("buffer-app"), &stream), &behaviour, &sink).await;
    wait_for("the panic", PATIENCE, || async {
        worker.status.borrow().processor_panics >= 1
    })
    .await;
    wait_for("every record delivered", PATIENCE, || async {
        sink.seen() == expected
    })
    .await;
    let status = worker.status.borrow().clone();
    worker.stop().await;
    assert_eq!(status.processor_panics, 1, "{status:?}");
    let flushed: BTreeSet<String> = sink.flushed().into_iter().collect();
    let lost: Vec<&String> = expected.difference(&flushed).collect();
    assert!(lost.is_empty(), "never flushed: {lost:?}");
}

/// The same through enhanced fan-out (kinesis-mock pushes an event a second): records are
/// put in waves while the worker reads, so they arrive over many events, and the processor
/// panics with a few of them buffered. The session after the panic subscribes again at the
/// checkpoint, not after the last event it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_with_records_buffered_loses_none_of_them_through_fan_out() {
    let kinesis = kinesis().await;
    let stream = unique("buffer-panic-efo");
    create_stream(&kinesis, &stream, 1).await;
    let sink = Sink::default();
    let behaviour = Buffering {
        flush_every: 4,
        panics: Arc::new(AtomicUsize::new(1)),
        panic_after_batches: 5,
        ..Buffering::default()
    };
    let config = config(&unique("buffer-app-efo"), &stream)
        .with_retrieval(Retrieval::FanOut(FanOutConfig::default()));
    let worker = Running::start(config, &behaviour, &sink).await;
    let mut expected = BTreeSet::new();
    for wave in 0..12 {
        let puts = put_records(&kinesis, &stream, &records("efo", wave * 5, 5, 3)).await;
        expected.extend(puts.into_iter().map(|p| p.data));
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    wait_for("the panic", PATIENCE, || async {
        worker.status.borrow().processor_panics >= 1
    })
    .await;
    wait_for("every record delivered", PATIENCE, || async {
        sink.seen() == expected
    })
    .await;
    let status = worker.status.borrow().clone();
    worker.stop().await;
    assert_eq!(status.processor_panics, 1, "{status:?}");
    assert!(
        status.subscriptions >= 2,
        "subscribed again after the panic: {status:?}"
    );
    let flushed: BTreeSet<String> = sink.flushed().into_iter().collect();
    let lost: Vec<&String> = expected.difference(&flushed).collect();
    assert!(lost.is_empty(), "never flushed: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_end_waits_for_a_buffering_processor_to_flush() {
    let kinesis = kinesis().await;
    let stream = unique("buffer-end");
    create_stream(&kinesis, &stream, 1).await;
    let parent = "shardId-000000000000";
    let before = put_records(&kinesis, &stream, &records("old", 0, 20, 4)).await;
    split_shard(&kinesis, &stream, parent).await;
    let after = put_records(&kinesis, &stream, &records("new", 0, 20, 4)).await;
    let parent_records: BTreeSet<String> = before.iter().map(|p| p.data.clone()).collect();
    let app = unique("buffer-app");

    // A processor that never flushes while reading and keeps the default `shard_ended`: the
    // parent's end must not be written over its buffer.
    let lazy = Buffering {
        flush_every: 1_000,
        ..Buffering::default()
    };
    let sink = Sink::default();
    let worker = Running::start(config(&app, &stream), &lazy, &sink).await;
    wait_for("the parent's end reached twice", PATIENCE, || async {
        sink.shard_ends() >= 2
    })
    .await;
    let lease = worker
        .store
        .get_lease(parent)
        .await
        .expect("GetItem")
        .expect("the parent's lease");
    let status = worker.status.borrow().clone();
    worker.stop().await;
    assert!(
        !lease.checkpoint.is_shard_end(),
        "SHARD_END written over unflushed records; flushed {:?}",
        sink.flushed()
    );
    assert!(status.shard_failures >= 1, "{status:?}");
    assert!(status.shard_end_not_checkpointed >= 1, "{status:?}");

    // The same application with a processor that flushes in `shard_ended`: the parent ends,
    // its children follow, and every record of both generations is flushed.
    let flushing = Buffering {
        flush_every: 1_000,
        flush_at_shard_end: true,
        ..Buffering::default()
    };
    let sink = Sink::default();
    let worker = Running::start(config(&app, &stream), &flushing, &sink).await;
    wait_for("the parent's records flushed", PATIENCE, || async {
        let flushed: BTreeSet<String> = sink.flushed().into_iter().collect();
        parent_records.is_subset(&flushed)
    })
    .await;
    wait_for("the children's records delivered", PATIENCE, || async {
        sink.delivered() >= before.len() + after.len()
    })
    .await;
    let lease = worker
        .store
        .get_lease(parent)
        .await
        .expect("GetItem")
        .expect("the parent's lease");
    worker.stop().await;
    assert!(lease.checkpoint.is_shard_end(), "{:?}", lease.checkpoint);
    // Stopping flushes the children's buffers in `shutdown_requested`.
    let flushed: BTreeSet<String> = sink.flushed().into_iter().collect();
    let expected: BTreeSet<String> = before
        .iter()
        .chain(&after)
        .map(|p| p.data.clone())
        .collect();
    let lost: Vec<&String> = expected.difference(&flushed).collect();
    assert!(lost.is_empty(), "never flushed: {lost:?}");
}
