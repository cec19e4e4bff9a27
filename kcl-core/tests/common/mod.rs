//! Test processors and helpers shared by the worker tests on the in-memory fakes.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl_core::testing::{InMemoryLeaseStore, InMemoryStream};
use kcl_core::{
    CancellationToken, Checkpoint, Checkpointer, Error, InitialPosition, LeaseStore, Record,
    RecordProcessor, StreamClient, Worker, WorkerConfig, WorkerStatus, async_trait,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Initialized(Checkpoint),
    Batch(usize),
    LeaseLost,
    ShutdownRequested,
}

/// One delivered record: worker, shard, sequence number, data, when.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub worker: String,
    pub shard: String,
    pub sequence_number: String,
    pub data: Vec<u8>,
    pub at: Instant,
}

#[derive(Debug, Clone, Default)]
pub struct Log(Arc<Mutex<LogInner>>);

#[derive(Debug, Default)]
pub struct LogInner {
    delivered: Vec<Delivery>,
    events: Vec<(String, String, Event, Instant)>,
    /// Shard → worker inside `process_records` right now.
    processing: HashMap<String, String>,
    /// Times two workers were inside `process_records` of one shard at once.
    overlaps: Vec<(String, String, String)>,
}

impl Log {
    pub fn delivered(&self) -> Vec<Delivery> {
        self.0.lock().unwrap().delivered.clone()
    }
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().delivered.len()
    }
    pub fn events(&self, shard: &str) -> Vec<Event> {
        let inner = self.0.lock().unwrap();
        inner
            .events
            .iter()
            .filter(|(_, s, _, _)| s == shard)
            .map(|(_, _, e, _)| e.clone())
            .collect()
    }
    pub fn worker_events(&self, worker: &str) -> Vec<(String, Event)> {
        let inner = self.0.lock().unwrap();
        inner
            .events
            .iter()
            .filter(|(w, _, _, _)| w == worker)
            .map(|(_, s, e, _)| (s.clone(), e.clone()))
            .collect()
    }
    /// Two workers in `process_records` of the same shard at the same time.
    pub fn overlaps(&self) -> Vec<(String, String, String)> {
        self.0.lock().unwrap().overlaps.clone()
    }
    fn event(&self, worker: &str, shard: &str, event: Event) {
        self.0.lock().unwrap().events.push((
            worker.to_owned(),
            shard.to_owned(),
            event,
            Instant::now(),
        ));
    }

    /// When `worker` first reported an event matching `what` for `shard` at or after `since`.
    pub fn event_time(
        &self,
        worker: &str,
        shard: &str,
        since: Instant,
        what: impl Fn(&Event) -> bool,
    ) -> Option<Instant> {
        let inner = self.0.lock().unwrap();
        inner
            .events
            .iter()
            .find(|(w, s, e, at)| w == worker && s == shard && *at >= since && what(e))
            .map(|(_, _, _, at)| *at)
    }
    fn enter(&self, worker: &str, shard: &str) {
        let mut inner = self.0.lock().unwrap();
        if let Some(other) = inner.processing.insert(shard.to_owned(), worker.to_owned()) {
            inner
                .overlaps
                .push((shard.to_owned(), other, worker.to_owned()));
        }
    }
    fn exit(&self, shard: &str) {
        self.0.lock().unwrap().processing.remove(shard);
    }
}

/// How a test processor misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// process_records calls that fail, counted over all shards; before failing, the processor
    /// checkpoints at the first record of the batch.
    pub failures_left: Arc<AtomicUsize>,
    /// Shards whose every batch fails.
    pub always_fail: Option<String>,
    /// Time spent per batch.
    pub delay: Duration,
    /// process_records calls that panic (before doing anything), counted over all shards.
    pub panics_left: Arc<AtomicUsize>,
    /// Shards whose every batch panics.
    pub always_panic: Option<String>,
}

pub struct TestProcessor {
    pub worker: String,
    pub shard: String,
    pub log: Log,
    pub faults: Faults,
}

#[async_trait]
impl RecordProcessor for TestProcessor {
    type Error = Error;

    async fn initialize(&mut self, shard_id: &str, checkpoint: &Checkpoint) -> Result<(), Error> {
        self.log.event(
            &self.worker,
            shard_id,
            Event::Initialized(checkpoint.clone()),
        );
        Ok(())
    }

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Error> {
        self.log.enter(&self.worker, &self.shard);
        let result = self.process(records, checkpointer).await;
        self.log.exit(&self.shard);
        result
    }

    async fn lease_lost(&mut self) {
        self.log.event(&self.worker, &self.shard, Event::LeaseLost);
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Error> {
        self.log
            .event(&self.worker, &self.shard, Event::ShutdownRequested);
        checkpointer.checkpoint().await
    }
}

impl TestProcessor {
    async fn process(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Error> {
        tokio::time::sleep(self.faults.delay).await;
        let panic = self.faults.always_panic.as_deref() == Some(self.shard.as_str())
            || self
                .faults
                .panics_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if panic {
            panic!("injected processor panic in {}", self.shard);
        }
        let fail = self.faults.always_fail.as_deref() == Some(self.shard.as_str())
            || self
                .faults
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        let now = Instant::now();
        let delivery = |r: &Record| Delivery {
            worker: self.worker.clone(),
            shard: self.shard.clone(),
            sequence_number: r.sequence_number.to_string(),
            data: r.data.to_vec(),
            at: now,
        };
        if fail {
            checkpointer.checkpoint_record(&records[0]).await?;
            self.log
                .0
                .lock()
                .unwrap()
                .delivered
                .push(delivery(&records[0]));
            return Err(Error::InvalidConfig {
                field: "test",
                problem: "injected processor failure".into(),
            });
        }
        {
            let mut log = self.log.0.lock().unwrap();
            for r in records {
                log.delivered.push(delivery(r));
            }
            log.events.push((
                self.worker.clone(),
                self.shard.clone(),
                Event::Batch(records.len()),
                now,
            ));
        }
        checkpointer.checkpoint().await
    }
}

pub fn config(worker: &str) -> WorkerConfig {
    WorkerConfig::new("test-app", "test-stream")
        .with_worker_id(worker)
        .with_initial_position(InitialPosition::TrimHorizon)
        .with_rng_seed(7)
}

pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<kcl_core::Result<()>>,
    pub status: watch::Receiver<WorkerStatus>,
}

impl Running {
    pub async fn stop(self) -> kcl_core::Result<()> {
        self.shutdown.cancel();
        self.task.await.expect("worker task")
    }
    pub fn held(&self) -> usize {
        self.status.borrow().held_leases.len()
    }
}

pub fn start(
    config: WorkerConfig,
    stream: &Arc<InMemoryStream>,
    store: &Arc<InMemoryLeaseStore>,
    log: &Log,
    faults: &Faults,
) -> Running {
    start_on(
        config,
        stream.clone() as Arc<dyn StreamClient>,
        store.clone() as Arc<dyn LeaseStore>,
        log,
        faults,
    )
}

/// Starts a worker on any clients (fault-injecting wrappers, say).
pub fn start_on(
    config: WorkerConfig,
    stream: Arc<dyn StreamClient>,
    store: Arc<dyn LeaseStore>,
    log: &Log,
    faults: &Faults,
) -> Running {
    let (worker_id, log, faults) = (config.worker_id.clone(), log.clone(), faults.clone());
    let factory = move |shard: &str| TestProcessor {
        worker: worker_id.clone(),
        shard: shard.to_owned(),
        log: log.clone(),
        faults: faults.clone(),
    };
    start_with(config, stream, store, factory)
}

/// Starts a worker with any processor factory.
pub fn start_with<F: kcl_core::RecordProcessorFactory>(
    config: WorkerConfig,
    stream: Arc<dyn StreamClient>,
    store: Arc<dyn LeaseStore>,
    factory: F,
) -> Running {
    let worker = Worker::new(config, stream, store, factory).unwrap();
    let status = worker.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Running {
        shutdown,
        task,
        status,
    }
}

pub async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn put(stream: &InMemoryStream, from: usize, to: usize) -> BTreeMap<String, Vec<String>> {
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in from..to {
        let (shard, seq) = stream.put_record(&format!("key-{i}"), format!("record-{i}"));
        by_shard.entry(shard).or_default().push(seq.to_string());
    }
    by_shard
}

pub fn merge(into: &mut BTreeMap<String, Vec<String>>, more: BTreeMap<String, Vec<String>>) {
    for (shard, seqs) in more {
        into.entry(shard).or_default().extend(seqs);
    }
}

/// Every put record delivered exactly once, in shard order.
pub fn assert_exactly_once_in_order(log: &Log, expected: &BTreeMap<String, Vec<String>>) {
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in log.delivered() {
        got.entry(d.shard).or_default().push(d.sequence_number);
    }
    assert_eq!(&got, expected);
}

/// Another worker, alive and holding `lease_key` (taken now): renews it every 2 s until the
/// returned task is aborted (the worker dies).
pub fn keep_alive(
    store: &Arc<InMemoryLeaseStore>,
    lease_key: &'static str,
    owner: &str,
) -> JoinHandle<()> {
    store.take_as(lease_key, owner);
    let store = store.clone();
    tokio::spawn(async move {
        loop {
            let lease = store.get_lease(lease_key).await.unwrap().unwrap();
            store
                .update_lease(lease_key, &lease.fence(), &kcl_core::LeaseUpdate::Renew)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// Lease owners as in the table: worker → number of leases of shards (watcher slots left
/// out).
pub fn owners(store: &InMemoryLeaseStore) -> BTreeMap<String, usize> {
    let mut owners = BTreeMap::new();
    for lease in shard_leases(store) {
        if let Some(owner) = lease.owner {
            *owners.entry(owner).or_default() += 1;
        }
    }
    owners
}

/// The leases of shards in the table (watcher slots left out).
pub fn shard_leases(store: &InMemoryLeaseStore) -> Vec<kcl_core::Lease> {
    store
        .leases()
        .into_iter()
        .filter(|l| !kcl_core::is_watcher_slot(&l.lease_key))
        .collect()
}
