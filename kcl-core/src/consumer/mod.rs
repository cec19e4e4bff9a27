//! The shard consumer: runs [`RecordProcessor`]s over one shard lease.
//!
//! States: wait until every parent shard is finished → get the first shard iterator →
//! create a processor and `initialize` it → deliver batches in order → one exit: shard end
//! (`shard_ended`, then `SHARD_END`), shutdown or handoff to another worker
//! (`shutdown_requested`), lease lost (`lease_lost`), or failure. The consumer is a task owned
//! by the worker; it owns its poller task and stops it before returning.
//!
//! Processor failures: an error or a panic in `initialize` or `process_records` is retried
//! with backoff, up to `processing.retry.max_attempts` attempts without the checkpoint moving.
//! After an error the same processor gets the batch again (minus what it checkpointed): it
//! still holds whatever it buffered. After a panic the processor is dropped, and with it any
//! records it buffered but had not checkpointed, so the shard *resumes from its checkpoint*:
//! a new iterator at the checkpoint, a new processor initialized there, every record after
//! the checkpoint delivered again. When the attempts run out the consumer fails: the worker
//! releases the lease and the shard restarts from its checkpoint after a cooldown. Nothing is
//! ever checkpointed past records whose processing failed, and a panic never takes the worker
//! down.
//!
//! Shard end: `SHARD_END` is written for the processor only when its checkpoint already
//! covers every record delivered (see [`RecordProcessor::shard_ended`]); otherwise the
//! consumer fails loudly with [`Error::ShardEndNotCheckpointed`] and the shard restarts from
//! its checkpoint, so records a processor buffered are delivered again, never skipped.

mod batch;
mod fan_out;
pub(crate) mod poller;
mod progress;
mod stats;

pub(crate) use progress::Progress;

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::{Backoff, SeedSource};
use crate::checkpoint::Checkpointer;
use crate::config::{InitialPosition, Retrieval, WorkerConfig};
use crate::counters::Counters;
use crate::error::{BoxError, Error, ErrorChain};
use crate::lease::LeaseStore;
use crate::lease::held::HeldLease;
use crate::processor::{RecordProcessor, RecordProcessorFactory, ShardContext};
use crate::published::Published;
use crate::sequence::Checkpoint;
use crate::stream::{ChildShard, Record, StartingPosition};
use crate::worker::ActiveStream;
use batch::{Batches, FetchedBatch};
use fan_out::FanOutReader;
use poller::Poller;
pub(crate) use stats::ShardStats;

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
    /// The processor panicked and was dropped with whatever it buffered: resume from the
    /// checkpoint with a new iterator and a new processor.
    Restart {
        callback: &'static str,
        failure: BoxError,
    },
}

/// How one reading session (an iterator, a processor, a poller) ended.
enum SessionEnd {
    Exit(ShardExit),
    /// The processor panicked and was dropped with whatever it buffered.
    Restart {
        callback: &'static str,
        failure: BoxError,
    },
}

impl From<Interrupt> for SessionEnd {
    fn from(i: Interrupt) -> Self {
        SessionEnd::Exit(match i {
            Interrupt::LeaseLost => ShardExit::LeaseLost,
            Interrupt::Shutdown => ShardExit::Shutdown,
            Interrupt::HandedOff => ShardExit::HandedOff,
            Interrupt::Failed(e) => ShardExit::Failed(e),
            Interrupt::Restart { callback, failure } => {
                return SessionEnd::Restart { callback, failure };
            }
        })
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
    /// The shard the lease is of (in multi-stream mode the lease key is longer).
    pub(crate) shard: ShardContext,
    pub(crate) store: Arc<dyn LeaseStore>,
    /// The shard's stream: its client, initial position and fan-out consumer.
    pub(crate) stream: Arc<ActiveStream>,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) seeds: Arc<SeedSource>,
    pub(crate) factory: Arc<F>,
    /// Cancelled by the worker to ask for a graceful stop.
    pub(crate) shutdown: CancellationToken,
    /// Parent shards known to be finished (or gone), published by the worker.
    pub(crate) parents_done: Arc<Published<BTreeSet<String>>>,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) progress: Arc<Progress>,
}

/// What reads a session's records ahead of the processor.
enum Reader {
    /// The poller, with the shard iterator it starts from.
    Polling(Poller, String),
    FanOut(FanOutReader),
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
                Counters::add(&self.stats.counters().processor_failures, 1);
                Counters::add(&self.stats.counters().processor_panics, 1);
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
        let shard_id = self.shard.shard_id.as_str();
        loop {
            let created = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.factory.create_processor_for(&self.shard)
            }));
            let failure: BoxError = match created {
                Err(payload) => {
                    Counters::add(&self.stats.counters().processor_failures, 1);
                    Counters::add(&self.stats.counters().processor_panics, 1);
                    format!("the processor factory panicked: {}", panic_message(payload)).into()
                }
                Ok(mut processor) => match self
                    .call("initialize", processor.initialize(shard_id, checkpoint))
                    .await
                {
                    Called::Returned(Ok(())) => return Ok(processor),
                    Called::Returned(Err(e)) => {
                        Counters::add(&self.stats.counters().processor_failures, 1);
                        e.into()
                    }
                    Called::Panicked(message) => format!("initialize panicked: {message}").into(),
                },
            };
            let Some(delay) = backoff.next() else {
                return Err(Interrupt::Failed(processor_error(
                    self.lease.lease_key(),
                    "initialize",
                    *attempts,
                    failure,
                )));
            };
            warn!(attempts = *attempts, ?delay, error = %ErrorChain(&*failure), "starting the record processor failed; retrying");
            *attempts += 1;
            self.pause(delay).await?;
        }
    }

    async fn run_in_span(self) -> ShardExit {
        self.progress.tick();
        let lease = self.lease.snapshot().await;
        if lease.is_finished() {
            return ShardExit::ShardEnded {
                children: Vec::new(),
            };
        }
        if let Some(exit) = self.wait_for_parents(&lease.parent_keys()).await {
            return exit;
        }
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
            self.stats.clone(),
        );
        // Sessions end in a restart only after a processor panic. Attempts count panics (and
        // failed starts) since the checkpoint last moved: a processor that panics on the same
        // records again and again fails its shard, one that makes progress never does.
        let mut backoff = self.backoff();
        let mut attempts = 1;
        let mut progress_mark = checkpointer.last_checkpoint().clone();
        loop {
            match self.session(&mut checkpointer, &mut attempts).await {
                SessionEnd::Exit(exit) => return exit,
                SessionEnd::Restart { callback, failure } => {
                    if *checkpointer.last_checkpoint() != progress_mark {
                        progress_mark = checkpointer.last_checkpoint().clone();
                        backoff = self.backoff();
                        attempts = 1;
                    }
                    let Some(delay) = backoff.next() else {
                        let e =
                            processor_error(self.lease.lease_key(), callback, attempts, failure);
                        error!(error = %ErrorChain(&e), "shard consumer failed");
                        return ShardExit::Failed(e);
                    };
                    warn!(attempts, ?delay, error = %ErrorChain(&*failure), checkpoint = %checkpointer.last_checkpoint(), "the record processor panicked; resuming from the checkpoint with a new processor");
                    attempts += 1;
                    if let Err(interrupt) = self.pause(delay).await {
                        return match SessionEnd::from(interrupt) {
                            SessionEnd::Exit(exit) => exit,
                            SessionEnd::Restart { .. } => unreachable!("a pause never restarts"),
                        };
                    }
                }
            }
        }
    }

    /// Waits until every parent shard finished (records of a key continue in the children),
    /// unless the consumer must stop first.
    async fn wait_for_parents(&self, parents: &BTreeSet<String>) -> Option<ShardExit> {
        if parents.is_empty() || parents.is_subset(&self.parents_done.get()) {
            return None;
        }
        info!(?parents, "waiting for the parent shards to finish");
        // Waiting on purpose, for as long as the parents take: not a stall.
        self.progress.set_waiting(true);
        let exit = tokio::select! {
            biased;
            _ = self.lease.lost_token().cancelled() => Some(ShardExit::LeaseLost),
            _ = self.shutdown.cancelled() => Some(ShardExit::Shutdown),
            _ = self.lease.handoff_token().cancelled() => Some(ShardExit::HandedOff),
            _ = self.parents_done.wait_for(|done| parents.is_subset(done)) => None,
        };
        self.progress.set_waiting(false);
        exit
    }

    /// One reading session from the checkpoint: a new iterator, a new processor, a poller.
    async fn session(&self, checkpointer: &mut Checkpointer, attempts: &mut usize) -> SessionEnd {
        let shard_id = self.shard.shard_id.clone();
        let checkpoint = checkpointer.last_checkpoint().clone();
        checkpointer.start_session();
        let lost = self.lease.lost_token().clone();
        let handoff = self.lease.handoff_token().clone();
        let start = starting_position(&checkpoint, &self.stream.initial_position, &shard_id);
        let budget = self.config.polling.max_prefetched_bytes;
        let batches = Batches {
            shard_id: shard_id.clone(),
            skip_through: checkpoint.position().cloned(),
            shard_range: self.lease.snapshot().await.hash_key_range,
            deliver_empty: self
                .config
                .processing
                .call_process_records_even_for_empty_list,
            budget: Arc::new(Semaphore::new(budget)),
            budget_bytes: budget,
            stats: self.stats.clone(),
        };
        let reader = match (&self.config.retrieval, &self.stream.consumer_arn) {
            (Retrieval::FanOut(fan_out), Some(consumer_arn)) => Reader::FanOut(FanOutReader {
                stream: self.stream.client.clone(),
                shard_id: shard_id.clone(),
                consumer_arn: consumer_arn.clone(),
                config: fan_out.clone(),
                seeds: self.seeds.clone(),
                start: start.clone(),
                batches,
                progress: self.progress.clone(),
            }),
            _ => {
                let poller = Poller {
                    stream: self.stream.client.clone(),
                    shard_id: shard_id.clone(),
                    config: self.config.polling.clone(),
                    seeds: self.seeds.clone(),
                    start: start.clone(),
                    batches,
                    progress: self.progress.clone(),
                };
                // The iterator comes before `initialize`, as in the Java KCL: a shard
                // starting at LATEST reads everything put after `initialize` was called.
                let iterator = tokio::select! {
                    biased;
                    _ = lost.cancelled() => return SessionEnd::Exit(ShardExit::LeaseLost),
                    _ = self.shutdown.cancelled() => return SessionEnd::Exit(ShardExit::Shutdown),
                    _ = handoff.cancelled() => return SessionEnd::Exit(ShardExit::HandedOff),
                    it = poller.iterator_at(&start) => it,
                };
                match iterator {
                    Ok(it) => Reader::Polling(poller, it),
                    Err(Error::ShardNotFound { .. }) => {
                        return SessionEnd::Exit(ShardExit::ShardGone);
                    }
                    Err(e) => return SessionEnd::Exit(ShardExit::Failed(e)),
                }
            }
        };
        let processor = match self
            .start_processor(&checkpoint, &mut self.backoff(), attempts)
            .await
        {
            Ok(processor) => processor,
            Err(interrupt) => return interrupt.into(),
        };
        let mut processor = Some(processor);
        info!(%checkpoint, ?start, "shard consumer started");

        let (tx, mut rx) = mpsc::channel(self.config.polling.max_prefetched_batches);
        let stop_poller = CancellationToken::new();
        let mut poller_task = JoinSet::new();
        match reader {
            Reader::Polling(poller, iterator) => poller_task.spawn(
                poller
                    .run(iterator, tx, stop_poller.clone())
                    .instrument(tracing::Span::current()),
            ),
            Reader::FanOut(reader) => poller_task.spawn(
                reader
                    .run(tx, stop_poller.clone())
                    .instrument(tracing::Span::current()),
            ),
        };

        let end = loop {
            // Pick the next event; delivery happens outside the select, so a batch being
            // processed is never abandoned halfway.
            let next = tokio::select! {
                biased;
                _ = lost.cancelled() => break SessionEnd::Exit(ShardExit::LeaseLost),
                _ = self.shutdown.cancelled() => break SessionEnd::Exit(ShardExit::Shutdown),
                _ = handoff.cancelled() => break SessionEnd::Exit(ShardExit::HandedOff),
                next = rx.recv() => next,
            };
            // The batch (and its share of the prefetch budget) lives until it was delivered.
            let batch = match next {
                Some(Ok(batch)) => batch,
                // Found by a reader mid-session (a new iterator, a subscription): the shard
                // went past retention while this worker held it, as at the session's start.
                Some(Err(Error::ShardNotFound { .. })) => {
                    break SessionEnd::Exit(ShardExit::ShardGone);
                }
                Some(Err(e)) => break SessionEnd::Exit(ShardExit::Failed(e)),
                None => {
                    break SessionEnd::Exit(ShardExit::Failed(Error::TaskFailed {
                        task: format!("poller of shard {shard_id}"),
                        problem: "stopped without reaching the shard's end".into(),
                    }));
                }
            };
            if let Err(interrupt) = self.deliver(&batch, &mut processor, checkpointer).await {
                break interrupt.into();
            }
            if let Some(children) = batch.shard_end {
                break self
                    .finish_shard(&mut processor, checkpointer, children)
                    .await;
            }
        };

        // Stop the poller and observe how it ended.
        stop_poller.cancel();
        drop(rx);
        while let Some(joined) = poller_task.join_next().await {
            if let Err(e) = joined {
                error!(error = %ErrorChain(&e), "poller task failed");
            }
        }

        // Tell the processor, if one is left (a panic drops it).
        if let (Some(mut processor), SessionEnd::Exit(exit)) = (processor, &end) {
            match exit {
                ShardExit::LeaseLost => {
                    info!("lease lost; telling the processor");
                    self.call("lease_lost", processor.lease_lost()).await;
                }
                ShardExit::Shutdown | ShardExit::HandedOff => {
                    if let Called::Returned(Err(e)) = self
                        .call(
                            "shutdown_requested",
                            processor.shutdown_requested(checkpointer),
                        )
                        .await
                    {
                        let e: BoxError = e.into();
                        warn!(error = %ErrorChain(&*e), "shutdown_requested failed");
                    }
                }
                _ => {}
            }
        }
        if let SessionEnd::Exit(exit) = &end {
            match exit {
                ShardExit::ShardEnded { .. } => info!("shard processed to its end"),
                ShardExit::ShardGone => warn!("shard is past retention; its lease is deleted"),
                ShardExit::Failed(e) => error!(error = %ErrorChain(e), "shard consumer failed"),
                _ => {}
            }
        }
        end
    }

    /// Delivers a batch. After an error the same processor gets the records its checkpoint
    /// does not cover again, per the processing policy; a panic ends the session (the
    /// processor's buffered records died with it, so only a resume from the checkpoint
    /// delivers everything).
    async fn deliver(
        &self,
        batch: &FetchedBatch,
        processor: &mut Option<F::Processor>,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Interrupt> {
        if let Some(lag) = batch.millis_behind_latest {
            self.stats.lag(lag);
        }
        let Some(last) = batch.records.last() else {
            if batch.shard_end.is_none() {
                return self.deliver_empty(batch, processor, checkpointer).await;
            }
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
            let Some(current) = processor.as_mut() else {
                // Only a panic drops the processor, and a panic ends the session.
                return Err(Interrupt::Failed(Error::TaskFailed {
                    task: format!("shard consumer of {shard_id}"),
                    problem: "no record processor to deliver to".into(),
                }));
            };
            checkpointer.set_highest_delivered(last.position());
            let started = tokio::time::Instant::now();
            let called = self
                .call(
                    "process_records",
                    current.process_records(&pending, checkpointer, batch.millis_behind_latest),
                )
                .await;
            self.stats.process_records_took(started.elapsed());
            let failure: BoxError = match called {
                Called::Returned(Ok(())) => {
                    debug!(records = pending.len(), "batch processed");
                    let bytes = pending.iter().map(|r| r.data.len() as u64).sum();
                    self.stats.processed(pending.len() as u64, bytes);
                    return Ok(());
                }
                Called::Returned(Err(e)) => {
                    Counters::add(&self.stats.counters().processor_failures, 1);
                    e.into()
                }
                Called::Panicked(message) => {
                    // Its state cannot be trusted, and what it buffered is gone.
                    *processor = None;
                    checkpointer.reset_highest_delivered(processed_before);
                    return Err(Interrupt::Restart {
                        callback: "process_records",
                        failure: format!("process_records panicked: {message}").into(),
                    });
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
                warn!(error = %ErrorChain(&*failure), "process_records failed after checkpointing its whole batch");
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
            warn!(attempts, remaining = remaining.len(), ?delay, error = %ErrorChain(&*failure), "process_records failed; delivering the batch again");
            self.pause(delay).await?;
            pending = Cow::Owned(remaining);
            attempts += 1;
        }
    }

    /// Calls `process_records` with no records after an idle read
    /// (`processing.call_process_records_even_for_empty_list`), so a processor can flush on
    /// time. An error is logged and counted; there is nothing to deliver again.
    async fn deliver_empty(
        &self,
        batch: &FetchedBatch,
        processor: &mut Option<F::Processor>,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Interrupt> {
        let Some(current) = processor.as_mut() else {
            return Ok(());
        };
        match self
            .call(
                "process_records",
                current.process_records(&[], checkpointer, batch.millis_behind_latest),
            )
            .await
        {
            Called::Returned(Ok(())) => Ok(()),
            Called::Returned(Err(e)) => {
                Counters::add(&self.stats.counters().processor_failures, 1);
                let e: BoxError = e.into();
                warn!(error = %ErrorChain(&*e), "process_records failed on an empty batch");
                Ok(())
            }
            Called::Panicked(message) => {
                *processor = None;
                Err(Interrupt::Restart {
                    callback: "process_records",
                    failure: format!("process_records panicked on an empty batch: {message}")
                        .into(),
                })
            }
        }
    }

    /// Calls `shard_ended`, then makes sure `SHARD_END` is written only over nothing: if the
    /// processor did not checkpoint `SHARD_END` itself, the consumer writes it when the
    /// checkpoint covers every record delivered, and otherwise fails with
    /// [`Error::ShardEndNotCheckpointed`] (the records after the checkpoint, which the
    /// processor may still buffer, are delivered again). A failing `shard_ended` writes
    /// nothing either: the shard restarts from its last checkpoint.
    async fn finish_shard(
        &self,
        processor: &mut Option<F::Processor>,
        checkpointer: &mut Checkpointer,
        children: Vec<ChildShard>,
    ) -> SessionEnd {
        let shard_id = self.lease.lease_key().to_owned();
        checkpointer.set_at_shard_end();
        if let Some(current) = processor.as_mut() {
            let failure: Option<BoxError> = match self
                .call("shard_ended", current.shard_ended(checkpointer))
                .await
            {
                Called::Returned(Ok(())) => None,
                Called::Returned(Err(e)) => {
                    Counters::add(&self.stats.counters().processor_failures, 1);
                    Some(e.into())
                }
                Called::Panicked(message) => {
                    *processor = None;
                    return SessionEnd::Restart {
                        callback: "shard_ended",
                        failure: format!("shard_ended panicked: {message}").into(),
                    };
                }
            };
            if let Some(failure) = failure {
                return SessionEnd::Exit(ShardExit::Failed(processor_error(
                    &shard_id,
                    "shard_ended",
                    1,
                    failure,
                )));
            }
        }
        if !checkpointer.last_checkpoint().is_shard_end() {
            if !checkpointer.covers_delivered() {
                Counters::add(&self.stats.counters().shard_end_not_checkpointed, 1);
                return SessionEnd::Exit(ShardExit::Failed(Error::ShardEndNotCheckpointed {
                    shard_id,
                    last_checkpoint: checkpointer.last_checkpoint().clone(),
                    highest_delivered: checkpointer.highest_delivered().cloned(),
                }));
            }
            if let Err(e) = checkpointer.checkpoint().await {
                return SessionEnd::Exit(match e {
                    Error::LeaseLost { .. } => ShardExit::LeaseLost,
                    e => ShardExit::Failed(e),
                });
            }
        }
        SessionEnd::Exit(ShardExit::ShardEnded { children })
    }
}
