//! Processors that buffer records and checkpoint only after a flush (the most common real
//! processor: it writes files or objects), on the in-memory fakes and paused time: a panic
//! mid-buffer, a shard end with records still buffered, an idle shard that flushes on time,
//! and the prefetch byte budget. (Against the real servers: `tests/tests/buffering.rs`.)

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Running, config, start_with, wait_until};
use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    Checkpoint, Checkpointer, Error, LeaseStore, PollingConfig, ProcessingConfig, Record,
    RecordProcessor, StreamClient, WorkerConfig, async_trait,
};
use tokio::time::Instant;

/// What the buffering processors of one test wrote: the durable output.
#[derive(Clone, Debug, Default)]
struct Sink {
    flushed: Arc<Mutex<Vec<String>>>,
    /// Records handed to `process_records`, flushed or not.
    delivered: Arc<AtomicUsize>,
    /// `process_records` calls without records.
    empty_calls: Arc<AtomicUsize>,
}

impl Sink {
    fn flushed(&self) -> BTreeSet<String> {
        self.flushed.lock().unwrap().iter().cloned().collect()
    }
}

/// How the buffering processor flushes and misbehaves.
#[derive(Clone, Debug, Default)]
struct Behaviour {
    /// Flush after this many batches.
    flush_every: usize,
    /// Flush a non-empty buffer when called with no records (on an idle shard).
    flush_when_idle: bool,
    /// Flush and checkpoint in `shard_ended`; otherwise keep its default (nothing).
    flush_at_shard_end: bool,
    /// `process_records` calls (over all processors) that panic, with records buffered.
    panics_left: Arc<AtomicUsize>,
    /// Batches (over all processors) before the first panic may happen.
    panic_after_batches: usize,
    /// Time each batch takes.
    delay: Duration,
}

struct Buffering {
    sink: Sink,
    behaviour: Behaviour,
    buffer: Vec<Record>,
    batches: Arc<AtomicUsize>,
}

impl Buffering {
    async fn flush(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Error> {
        let Some(last) = self.buffer.last().cloned() else {
            return Ok(());
        };
        self.sink.flushed.lock().unwrap().extend(
            self.buffer
                .drain(..)
                .map(|r| String::from_utf8(r.data.to_vec()).unwrap()),
        );
        checkpointer.checkpoint_record(&last).await
    }
}

#[async_trait]
impl RecordProcessor for Buffering {
    type Error = Error;

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Error> {
        tokio::time::sleep(self.behaviour.delay).await;
        if records.is_empty() {
            self.sink.empty_calls.fetch_add(1, Ordering::SeqCst);
            if self.behaviour.flush_when_idle {
                self.flush(checkpointer).await?;
            }
            return Ok(());
        }
        self.sink
            .delivered
            .fetch_add(records.len(), Ordering::SeqCst);
        self.buffer.extend(records.iter().cloned());
        let batches = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if batches > self.behaviour.panic_after_batches
            && !self.buffer.is_empty()
            && self
                .behaviour
                .panics_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            panic!("injected panic with {} records buffered", self.buffer.len());
        }
        if batches.is_multiple_of(self.behaviour.flush_every) {
            self.flush(checkpointer).await?;
        }
        Ok(())
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Error> {
        if self.behaviour.flush_at_shard_end {
            self.flush(checkpointer).await?;
            checkpointer.checkpoint().await?;
        }
        Ok(())
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Error> {
        self.flush(checkpointer).await
    }
}

fn start(
    config: WorkerConfig,
    stream: &Arc<InMemoryStream>,
    store: &Arc<InMemoryLeaseStore>,
    sink: &Sink,
    behaviour: &Behaviour,
) -> Running {
    let (sink, behaviour) = (sink.clone(), behaviour.clone());
    let batches = Arc::new(AtomicUsize::new(0));
    let factory = move |_: &str| Buffering {
        sink: sink.clone(),
        behaviour: behaviour.clone(),
        buffer: Vec::new(),
        batches: batches.clone(),
    };
    start_with(
        config,
        stream.clone() as Arc<dyn StreamClient>,
        store.clone() as Arc<dyn LeaseStore>,
        factory,
    )
}

/// Puts `record-i` for i in `from..to` under `key-i`; returns the data put.
fn put(stream: &InMemoryStream, from: usize, to: usize) -> BTreeSet<String> {
    (from..to)
        .map(|i| {
            let data = format!("record-{i}");
            stream.put_record(&format!("key-{i}"), data.clone());
            data
        })
        .collect()
}

fn small_batches(worker: &str, records: u32) -> WorkerConfig {
    config(worker).with_polling(PollingConfig::default().with_max_records(records))
}

#[tokio::test(start_paused = true)]
async fn a_panic_with_records_buffered_loses_none_of_them() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let expected = put(&stream, 0, 30);
    let sink = Sink::default();
    // Batches of 3, a flush every 4 batches, and a panic at the 6th batch: batch 5 is
    // buffered but not flushed or checkpointed when the processor dies.
    let behaviour = Behaviour {
        flush_every: 4,
        panics_left: Arc::new(AtomicUsize::new(1)),
        panic_after_batches: 5,
        ..Behaviour::default()
    };
    let worker = start(small_batches("w1", 3), &stream, &store, &sink, &behaviour);
    wait_until("every record delivered", Duration::from_secs(60), || {
        sink.delivered.load(Ordering::SeqCst) >= 33
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();
    assert_eq!(status.processor_panics, 1);
    assert_eq!(status.shard_failures, 0, "a single panic is retried");
    // The last flush happens in `shutdown_requested`.
    assert_eq!(
        sink.flushed(),
        expected,
        "records buffered at the panic were lost"
    );
}

#[tokio::test(start_paused = true)]
async fn a_processor_that_keeps_panicking_without_progress_fails_its_shard() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    put(&stream, 0, 30);
    let sink = Sink::default();
    let behaviour = Behaviour {
        flush_every: 100,
        panics_left: Arc::new(AtomicUsize::new(usize::MAX)),
        ..Behaviour::default()
    };
    let worker = start(small_batches("w1", 3), &stream, &store, &sink, &behaviour);
    wait_until("a shard failure", Duration::from_secs(60), || {
        worker.status.borrow().shard_failures >= 1
    })
    .await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();
    // Each restart resumes at the checkpoint, so the same first batch panics every time: the
    // attempts run out (5 by default) instead of looping forever.
    assert_eq!(status.processor_panics, 5 * status.shard_failures);
    let lease = store
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.checkpoint, Checkpoint::TrimHorizon);
}

#[tokio::test(start_paused = true)]
async fn shard_end_is_not_written_over_records_a_processor_still_buffers() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let parent = "shardId-000000000000";
    put(&stream, 0, 10);
    stream.split_shard(parent);
    let sink = Sink::default();
    // Never flushes while reading, and keeps the default `shard_ended`.
    let behaviour = Behaviour {
        flush_every: 1_000,
        ..Behaviour::default()
    };
    let worker = start(small_batches("w1", 3), &stream, &store, &sink, &behaviour);
    wait_until(
        "the parent delivered twice",
        Duration::from_secs(60),
        || sink.delivered.load(Ordering::SeqCst) >= 20,
    )
    .await;
    let status = worker.status.borrow().clone();
    let lease = store.get_lease(parent).await.unwrap().unwrap();
    assert!(
        !lease.checkpoint.is_shard_end(),
        "SHARD_END written over {} unflushed records",
        10 - sink.flushed().len()
    );
    assert!(status.shard_failures >= 1, "{status:?}");
    assert!(status.shard_end_not_checkpointed >= 1, "{status:?}");
    worker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_processor_that_flushes_at_shard_end_finishes_the_parent_and_reads_the_children() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let parent = "shardId-000000000000";
    let mut expected = put(&stream, 0, 10);
    stream.split_shard(parent);
    expected.extend(put(&stream, 10, 20));
    let sink = Sink::default();
    let behaviour = Behaviour {
        flush_every: 1_000,
        flush_at_shard_end: true,
        ..Behaviour::default()
    };
    let worker = start(small_batches("w1", 3), &stream, &store, &sink, &behaviour);
    wait_until("the parent finished", Duration::from_secs(60), || {
        sink.flushed().len() >= 10
    })
    .await;
    wait_until("the children delivered", Duration::from_secs(60), || {
        sink.delivered.load(Ordering::SeqCst) >= 20
    })
    .await;
    let status = worker.status.borrow().clone();
    worker.stop().await.unwrap();
    let lease = store.get_lease(parent).await.unwrap().unwrap();
    assert!(lease.checkpoint.is_shard_end());
    assert_eq!(status.shard_failures, 0);
    assert_eq!(sink.flushed(), expected);
}

#[tokio::test(start_paused = true)]
async fn an_idle_shard_gets_empty_batches_to_flush_on_time_when_asked() {
    for call_when_empty in [false, true] {
        let stream = Arc::new(InMemoryStream::new("test-stream", 1));
        let store = Arc::new(InMemoryLeaseStore::new("test-app"));
        let expected = put(&stream, 0, 5);
        let sink = Sink::default();
        let behaviour = Behaviour {
            flush_every: 1_000,
            flush_when_idle: true,
            ..Behaviour::default()
        };
        let config = config("w1").with_processing(
            ProcessingConfig::default()
                .with_call_process_records_even_for_empty_list(call_when_empty),
        );
        let worker = start(config, &stream, &store, &sink, &behaviour);
        wait_until("the records delivered", Duration::from_secs(60), || {
            sink.delivered.load(Ordering::SeqCst) >= 5
        })
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let lease = store
            .get_lease("shardId-000000000000")
            .await
            .unwrap()
            .unwrap();
        let empty_calls = sink.empty_calls.load(Ordering::SeqCst);
        let flushed = sink.flushed();
        worker.stop().await.unwrap();
        if call_when_empty {
            assert!(empty_calls >= 3, "{empty_calls} empty calls in 10 s");
            assert_eq!(flushed, expected, "flushed on the first idle read");
            assert!(matches!(lease.checkpoint, Checkpoint::SequenceNumber(_)));
        } else {
            assert_eq!(empty_calls, 0);
            assert!(flushed.is_empty(), "nothing flushes an idle shard");
            assert_eq!(lease.checkpoint, Checkpoint::TrimHorizon);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_processor_holds_back_at_most_the_byte_budget() {
    let stream = Arc::new(InMemoryStream::new("test-stream", 1));
    let store = Arc::new(InMemoryLeaseStore::new("test-app"));
    let shard = "shardId-000000000000";
    // 1 KiB records, one per GetRecords call, a 2.5 KiB budget and room for 3 batches.
    for i in 0..20 {
        stream.put_record(&format!("key-{i}"), vec![b'x'; 1024]);
    }
    let budget = 2_560;
    let sink = Sink::default();
    let behaviour = Behaviour {
        flush_every: 1,
        delay: Duration::from_secs(3_600),
        ..Behaviour::default()
    };
    let polling = PollingConfig::default()
        .with_max_records(1)
        .with_max_prefetched_batches(3)
        .with_max_prefetched_bytes(budget);
    let worker = start(
        config("w1").with_polling(polling),
        &stream,
        &store,
        &sink,
        &behaviour,
    );
    let started = Instant::now();
    wait_until("the first batch", Duration::from_secs(60), || {
        !stream.get_records_calls(shard).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = stream.get_records_calls(shard).len();
    // The batch being processed and the next hold 2 KiB; a third read is allowed while the
    // budget has room and then waits for its share. Without the budget the poller reads until
    // the channel is full: 1 processing + 3 queued + 1 waiting to be queued.
    assert_eq!(calls, 3, "GetRecords calls within {:?}", started.elapsed());
    worker.shutdown.cancel();
    worker.task.abort();
}
