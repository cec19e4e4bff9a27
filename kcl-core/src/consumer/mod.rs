//! The shard consumer: runs [`RecordProcessor`]s over one shard lease.
//!
//! States: wait until every parent shard is finished → get the first shard iterator →
//! create a processor and `initialize` it → deliver batches in order → one exit: shard end
//! (`shard_ended`, then `SHARD_END` checkpoint), shutdown or handoff to another worker
//! (`shutdown_requested`), lease lost (`lease_lost`), or failure. The consumer is a task owned
//! by the worker; it owns its poller task and stops it before returning.
//!
//! Processor failures: an error or a panic in `initialize` or `process_records` is retried
//! with backoff, up to `processing.retry.max_attempts` attempts per batch. After an error the
//! same processor gets the batch again (minus what it checkpointed); after a panic the
//! processor is dropped, since its state cannot be trusted, and a new one from the factory is
//! initialized at the current checkpoint first. When the attempts run out the consumer fails:
//! the worker releases the lease and the shard restarts from its checkpoint. Nothing is ever
//! checkpointed past records whose processing failed, and a panic never takes the worker down.

pub(crate) mod poller;

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::{Backoff, SeedSource};
use crate::checkpoint::Checkpointer;
use crate::config::{InitialPosition, WorkerConfig};
use crate::error::{BoxError, Error};
use crate::lease::LeaseStore;
use crate::lease::held::HeldLease;
use crate::metrics::Counters;
use crate::processor::{RecordProcessor, RecordProcessorFactory};
use crate::published::Published;
use crate::sequence::Checkpoint;
use crate::stream::{ChildShard, Record, StartingPosition, StreamClient};
use poller::{FetchedBatch, Poller};

/// How a shard consumer ended.
#[derive(Debug)]
pub(crate) enum ShardExit {
    /// Every record was processed and the lease checkpointed at `SHARD_END`.
    ShardEnded {
        /// The children reported at the shard's end (may be empty).
        children: Vec<ChildShard>,
    },
    /// The shard no longer exists (past retention): its lease is garbage.
    ShardGone,
    /// The lease was lost; the processor was told.
    LeaseLost,
    /// The worker asked the consumer to stop; the processor could checkpoint.
    Shutdown,
    /// Another worker asked for the lease; the processor could checkpoint.
    HandedOff,
    /// The consumer cannot go on; releasing the lease restarts the shard from its checkpoint.
    Failed(Error),
}

/// Why delivery stopped early.
enum Interrupt {
    LeaseLost,
    Shutdown,
    HandedOff,
    Failed(Error),
}

impl From<Interrupt> for ShardExit {
    fn from(i: Interrupt) -> Self {
        match i {
            Interrupt::LeaseLost => ShardExit::LeaseLost,
            Interrupt::Shutdown => ShardExit::Shutdown,
            Interrupt::HandedOff => ShardExit::HandedOff,
            Interrupt::Failed(e) => ShardExit::Failed(e),
        }
    }
}

/// When a consumer last made progress (a `GetRecords` answer, a processor callback that
/// returned), and whether it is inside a processor callback: what the worker's watchdog reads.
#[derive(Debug)]
pub(crate) struct Progress {
    base: Instant,
    /// Milliseconds after `base` of the last progress.
    last: AtomicU64,
    /// Milliseconds after `base` (plus one, so 0 means "not") since a callback is running.
    in_callback: AtomicU64,
    /// Set while the consumer waits for its parent shards to finish.
    waiting: AtomicBool,
}

impl Progress {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Progress {
            base: Instant::now(),
            last: AtomicU64::new(0),
            in_callback: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn tick(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
        self.tick();
    }

    fn enter_callback(&self) {
        self.in_callback.store(self.now_ms() + 1, Ordering::Relaxed);
    }

    fn exit_callback(&self) {
        self.in_callback.store(0, Ordering::Relaxed);
        self.tick();
    }

    /// How long since the last progress, unless a processor callback is running or the
    /// consumer waits for its parents.
    pub(crate) fn stalled_for(&self) -> Option<Duration> {
        let busy = self.in_callback.load(Ordering::Relaxed) != 0;
        (!busy && !self.waiting.load(Ordering::Relaxed)).then(|| {
            Duration::from_millis(
                self.now_ms()
                    .saturating_sub(self.last.load(Ordering::Relaxed)),
            )
        })
    }

    /// How long the running processor callback has been running, if one is.
    pub(crate) fn in_callback_for(&self) -> Option<Duration> {
        match self.in_callback.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(
                self.now_ms().saturating_sub(since - 1),
            )),
        }
    }
}

/// The outcome of a processor callback run under `catch_unwind`.
enum Called<T> {
    Returned(T),
    Panicked(String),
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

pub(crate) struct ShardConsumer<F: RecordProcessorFactory> {
    pub(crate) lease: Arc<HeldLease>,
    pub(crate) store: Arc<dyn LeaseStore>,
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) seeds: Arc<SeedSource>,
    pub(crate) factory: Arc<F>,
    /// Cancelled by the worker to ask for a graceful stop.
    pub(crate) shutdown: CancellationToken,
    /// Parent shards known to be finished (or gone), published by the worker.
    pub(crate) parents_done: Arc<Published<BTreeSet<String>>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) progress: Arc<Progress>,
}

/// Where a shard resumes, given its lease's checkpoint.
fn starting_position(
    checkpoint: &Checkpoint,
    initial: &InitialPosition,
    shard_id: &str,
) -> StartingPosition {
    match checkpoint {
        // At the checkpointed record itself: the rest of a KPL aggregate it points into comes
        // next; the poller skips what the checkpoint covers.
        Checkpoint::SequenceNumber(done) => {
            StartingPosition::AtSequenceNumber(done.sequence_number.clone())
        }
        Checkpoint::TrimHorizon | Checkpoint::ShardEnd => StartingPosition::TrimHorizon,
        Checkpoint::Latest => StartingPosition::Latest,
        Checkpoint::AtTimestamp => match initial {
            InitialPosition::AtTimestamp(at) => StartingPosition::AtTimestamp(*at),
            _ => {
                // The lease was created by a worker configured with a timestamp that this
                // worker does not have. Reading from the oldest record loses nothing.
                warn!(
                    shard_id,
                    "lease starts AT_TIMESTAMP but no timestamp is configured; reading from TRIM_HORIZON"
                );
                StartingPosition::TrimHorizon
            }
        },
    }
}

/// Attempts of one checkpoint write when the store keeps failing transiently.
const CHECKPOINT_ATTEMPTS: usize = 5;

fn processor_error(
    shard_id: &str,
    callback: &'static str,
    attempts: usize,
    source: BoxError,
) -> Error {
    Error::Processor {
        shard_id: shard_id.to_owned(),
        callback,
        attempts,
        source,
    }
}

impl<F: RecordProcessorFactory> ShardConsumer<F> {
    /// Runs the consumer to one of its exits.
    pub(crate) async fn run(self) -> ShardExit {
        let span = info_span!("shard", shard_id = %self.lease.lease_key());
        self.run_in_span().instrument(span).await
    }

    /// Runs a processor callback, catching a panic and counting failures.
    async fn call<T>(&self, callback: &'static str, future: impl Future<Output = T>) -> Called<T> {
        self.progress.enter_callback();
        let outcome = AssertUnwindSafe(future).catch_unwind().await;
        self.progress.exit_callback();
        match outcome {
            Ok(value) => Called::Returned(value),
            Err(payload) => {
                let message = panic_message(payload);
                error!(callback, panic = %message, "record processor panicked");
                Counters::add(&self.counters.processor_failures, 1);
                Counters::add(&self.counters.processor_panics, 1);
                Called::Panicked(message)
            }
        }
    }

    fn backoff(&self) -> Backoff {
        self.config.processing.retry.backoff(self.seeds.next_seed())
    }

    /// Waits `delay` unless the lease is lost or the consumer asked to stop first.
    async fn pause(&self, delay: Duration) -> Result<(), Interrupt> {
        tokio::select! {
            biased;
            _ = self.lease.lost_token().cancelled() => Err(Interrupt::LeaseLost),
            _ = self.shutdown.cancelled() => Err(Interrupt::Shutdown),
            _ = self.lease.handoff_token().cancelled() => Err(Interrupt::HandedOff),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// A new processor, initialized at `checkpoint`; retried per the processing policy.
    async fn start_processor(
        &self,
        checkpoint: &Checkpoint,
        backoff: &mut Backoff,
        attempts: &mut usize,
    ) -> Result<F::Processor, Interrupt> {
        let shard_id = self.lease.lease_key();
        loop {
            let created = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.factory.create_processor(shard_id)
            }));
            let failure: BoxError = match created {
                Err(payload) => {
                    Counters::add(&self.counters.processor_failures, 1);
                    Counters::add(&self.counters.processor_panics, 1);
                    format!("the processor factory panicked: {}", panic_message(payload)).into()
                }
                Ok(mut processor) => match self
                    .call("initialize", processor.initialize(shard_id, checkpoint))
                    .await
                {
                    Called::Returned(Ok(())) => return Ok(processor),
                    Called::Returned(Err(e)) => {
                        Counters::add(&self.counters.processor_failures, 1);
                        e.into()
                    }
                    Called::Panicked(message) => format!("initialize panicked: {message}").into(),
                },
            };
            let Some(delay) = backoff.next() else {
                return Err(Interrupt::Failed(processor_error(
                    shard_id,
                    "initialize",
                    *attempts,
                    failure,
                )));
            };
            warn!(attempts = *attempts, ?delay, error = %failure, "starting the record processor failed; retrying");
            *attempts += 1;
            self.pause(delay).await?;
        }
    }

    async fn run_in_span(self) -> ShardExit {
        self.progress.tick();
        let lease = self.lease.snapshot().await;
        let shard_id = lease.lease_key.clone();
        if lease.is_finished() {
            return ShardExit::ShardEnded {
                children: Vec::new(),
            };
        }
        let lost = self.lease.lost_token().clone();
        let handoff = self.lease.handoff_token().clone();
        if !lease.parent_shard_ids.is_empty() {
            // Records of a key continue in the children: start only after every parent ended.
            let parents = &lease.parent_shard_ids;
            let parents_done = self.parents_done.clone();
            if !parents.is_subset(&parents_done.get()) {
                info!(?parents, "waiting for the parent shards to finish");
                // Waiting on purpose, for as long as the parents take: not a stall.
                self.progress.set_waiting(true);
                let exit = tokio::select! {
                    biased;
                    _ = lost.cancelled() => Some(ShardExit::LeaseLost),
                    _ = self.shutdown.cancelled() => Some(ShardExit::Shutdown),
                    _ = handoff.cancelled() => Some(ShardExit::HandedOff),
                    _ = parents_done.wait_for(|done| parents.is_subset(done)) => None,
                };
                self.progress.set_waiting(false);
                if let Some(exit) = exit {
                    return exit;
                }
            }
        }
        let start = starting_position(&lease.checkpoint, &self.config.initial_position, &shard_id);
        let poller = Poller {
            stream: self.stream.clone(),
            shard_id: shard_id.clone(),
            config: self.config.polling.clone(),
            seeds: self.seeds.clone(),
            start: start.clone(),
            skip_through: lease.checkpoint.position().cloned(),
            shard_range: lease.hash_key_range,
            counters: self.counters.clone(),
            progress: self.progress.clone(),
        };
        // The iterator comes before `initialize`, as in the Java KCL: a shard starting at
        // LATEST reads everything put after `initialize` was called.
        let iterator = tokio::select! {
            biased;
            _ = lost.cancelled() => return ShardExit::LeaseLost,
            _ = self.shutdown.cancelled() => return ShardExit::Shutdown,
            _ = handoff.cancelled() => return ShardExit::HandedOff,
            it = poller.iterator_at(&start) => it,
        };
        let iterator = match iterator {
            Ok(it) => it,
            Err(Error::ShardNotFound { .. }) => return ShardExit::ShardGone,
            Err(e) => return ShardExit::Failed(e),
        };
        let mut attempts = 1;
        let processor = match self
            .start_processor(&lease.checkpoint, &mut self.backoff(), &mut attempts)
            .await
        {
            Ok(processor) => processor,
            Err(interrupt) => return interrupt.into(),
        };
        let mut processor = Some(processor);
        info!(checkpoint = %lease.checkpoint, ?start, "shard consumer started");

        let retry = self
            .config
            .lease
            .retry
            .with_max_attempts(Some(CHECKPOINT_ATTEMPTS));
        let seeds = self.seeds.clone();
        let mut checkpointer = Checkpointer::new(
            self.lease.clone(),
            self.store.clone(),
            lease.checkpoint.clone(),
            Box::new(move || retry.backoff(seeds.next_seed())),
        );

        let (tx, mut rx) = mpsc::channel(self.config.polling.max_prefetched_batches);
        let stop_poller = CancellationToken::new();
        let mut poller_task = JoinSet::new();
        poller_task.spawn(
            poller
                .run(iterator, tx, stop_poller.clone())
                .instrument(tracing::Span::current()),
        );

        let exit = loop {
            // Pick the next event; delivery happens outside the select, so a batch being
            // processed is never abandoned halfway.
            let next = tokio::select! {
                biased;
                _ = lost.cancelled() => break ShardExit::LeaseLost,
                _ = self.shutdown.cancelled() => break ShardExit::Shutdown,
                _ = handoff.cancelled() => break ShardExit::HandedOff,
                next = rx.recv() => next,
            };
            let batch = match next {
                Some(Ok(batch)) => batch,
                Some(Err(e)) => break ShardExit::Failed(e),
                None => {
                    break ShardExit::Failed(Error::TaskFailed {
                        task: format!("poller of shard {shard_id}"),
                        problem: "stopped without reaching the shard's end".into(),
                    });
                }
            };
            if let Err(interrupt) = self
                .deliver(&batch, &mut processor, &mut checkpointer)
                .await
            {
                break interrupt.into();
            }
            if let Some(children) = batch.shard_end {
                break self
                    .finish_shard(&mut processor, &mut checkpointer, children)
                    .await;
            }
        };

        // Stop the poller and observe how it ended.
        stop_poller.cancel();
        drop(rx);
        while let Some(joined) = poller_task.join_next().await {
            if let Err(e) = joined {
                error!(error = %e, "poller task failed");
            }
        }

        // Tell the processor, if one is left (a panic may have dropped it).
        if let Some(mut processor) = processor {
            match &exit {
                ShardExit::LeaseLost => {
                    info!("lease lost; telling the processor");
                    self.call("lease_lost", processor.lease_lost()).await;
                }
                ShardExit::Shutdown | ShardExit::HandedOff => {
                    if let Called::Returned(Err(e)) = self
                        .call(
                            "shutdown_requested",
                            processor.shutdown_requested(&mut checkpointer),
                        )
                        .await
                    {
                        let e: BoxError = e.into();
                        warn!(error = %e, "shutdown_requested failed");
                    }
                }
                _ => {}
            }
        }
        match &exit {
            ShardExit::ShardEnded { .. } => info!("shard processed to its end"),
            ShardExit::ShardGone => warn!("shard is past retention; its lease is deleted"),
            ShardExit::Failed(e) => error!(error = %e, "shard consumer failed"),
            _ => {}
        }
        exit
    }

    /// Delivers a batch, retrying it per the processing policy: after a failed attempt the
    /// records not covered by the processor's checkpoint are delivered again, never skipped;
    /// after a panic, to a new processor.
    async fn deliver(
        &self,
        batch: &FetchedBatch,
        processor: &mut Option<F::Processor>,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Interrupt> {
        let Some(last) = batch.records.last() else {
            return Ok(());
        };
        let shard_id = self.lease.lease_key().to_owned();
        // What `checkpoint()` may cover if this batch fails: the batches processed before it.
        let processed_before = checkpointer.highest_delivered().cloned();
        let mut pending: Cow<'_, [Record]> = Cow::Borrowed(&batch.records);
        let mut backoff = self.backoff();
        let mut attempts = 1;
        loop {
            // A lost lease stops delivery at once: the next owner may be reading already.
            if self.lease.is_lost() {
                return Err(Interrupt::LeaseLost);
            }
            let current = match processor {
                Some(p) => p,
                None => {
                    let fresh = self
                        .start_processor(
                            checkpointer.last_checkpoint(),
                            &mut backoff,
                            &mut attempts,
                        )
                        .await?;
                    processor.insert(fresh)
                }
            };
            checkpointer.set_highest_delivered(last.position());
            let failure: BoxError = match self
                .call(
                    "process_records",
                    current.process_records(&pending, checkpointer, batch.millis_behind_latest),
                )
                .await
            {
                Called::Returned(Ok(())) => {
                    debug!(records = pending.len(), "batch processed");
                    return Ok(());
                }
                Called::Returned(Err(e)) => {
                    Counters::add(&self.counters.processor_failures, 1);
                    e.into()
                }
                Called::Panicked(message) => {
                    // Its state cannot be trusted: the next attempt gets a new processor.
                    *processor = None;
                    format!("process_records panicked: {message}").into()
                }
            };
            // The failed records are not processed: from now on, until a retry succeeds, a
            // checkpoint (say in `shutdown_requested`) may not cover them.
            checkpointer.reset_highest_delivered(processed_before.clone());
            if self.lease.is_lost() {
                return Err(Interrupt::LeaseLost);
            }
            let remaining: Vec<Record> = pending
                .iter()
                .filter(|r| !checkpointer.last_checkpoint().covers(&r.position()))
                .cloned()
                .collect();
            if remaining.is_empty() {
                warn!(error = %failure, "process_records failed after checkpointing its whole batch");
                return Ok(());
            }
            let Some(delay) = backoff.next() else {
                return Err(Interrupt::Failed(processor_error(
                    &shard_id,
                    "process_records",
                    attempts,
                    failure,
                )));
            };
            warn!(attempts, remaining = remaining.len(), ?delay, error = %failure, "process_records failed; delivering the batch again");
            self.pause(delay).await?;
            pending = Cow::Owned(remaining);
            attempts += 1;
        }
    }

    /// Calls `shard_ended` and checkpoints `SHARD_END` if the processor did not. A failing
    /// `shard_ended` does not write `SHARD_END`: the shard restarts from its last checkpoint
    /// rather than risk losing what the processor had not finished.
    async fn finish_shard(
        &self,
        processor: &mut Option<F::Processor>,
        checkpointer: &mut Checkpointer,
        children: Vec<ChildShard>,
    ) -> ShardExit {
        let shard_id = self.lease.lease_key().to_owned();
        checkpointer.set_at_shard_end();
        if let Some(current) = processor.as_mut() {
            let failure: Option<BoxError> = match self
                .call("shard_ended", current.shard_ended(checkpointer))
                .await
            {
                Called::Returned(Ok(())) => None,
                Called::Returned(Err(e)) => {
                    Counters::add(&self.counters.processor_failures, 1);
                    Some(e.into())
                }
                Called::Panicked(message) => {
                    *processor = None;
                    Some(format!("shard_ended panicked: {message}").into())
                }
            };
            if let Some(failure) = failure {
                return ShardExit::Failed(processor_error(&shard_id, "shard_ended", 1, failure));
            }
        }
        if !checkpointer.last_checkpoint().is_shard_end() {
            if let Err(e) = checkpointer.checkpoint().await {
                return match e {
                    Error::LeaseLost { .. } => ShardExit::LeaseLost,
                    e => ShardExit::Failed(e),
                };
            }
        }
        ShardExit::ShardEnded { children }
    }
}
