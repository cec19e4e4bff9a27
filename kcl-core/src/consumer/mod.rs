//! The shard consumer: runs one [`RecordProcessor`] over one shard lease.
//!
//! States: wait until every parent shard is finished → get the first shard iterator →
//! `initialize` → deliver batches in order → one exit:
//! shard end (`shard_ended`, then `SHARD_END` checkpoint), shutdown or handoff to another
//! worker (`shutdown_requested`), lease lost (`lease_lost`), or failure. The consumer is a task owned by the worker; it owns
//! its poller task and stops it before returning.

pub(crate) mod poller;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::SeedSource;
use crate::checkpoint::Checkpointer;
use crate::config::{InitialPosition, WorkerConfig};
use crate::error::{BoxError, Error};
use crate::lease::LeaseStore;
use crate::lease::held::HeldLease;
use crate::processor::RecordProcessor;
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

pub(crate) struct ShardConsumer<P> {
    pub(crate) lease: Arc<HeldLease>,
    pub(crate) store: Arc<dyn LeaseStore>,
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) seeds: Arc<SeedSource>,
    pub(crate) processor: P,
    /// Cancelled by the worker to ask for a graceful stop.
    pub(crate) shutdown: CancellationToken,
    /// Parent shards known to be finished (or gone), published by the worker.
    pub(crate) parents_done: watch::Receiver<Arc<BTreeSet<String>>>,
}

/// Where a shard resumes, given its lease's checkpoint.
fn starting_position(
    checkpoint: &Checkpoint,
    initial: &InitialPosition,
    shard_id: &str,
) -> StartingPosition {
    match checkpoint {
        Checkpoint::SequenceNumber(done) => {
            StartingPosition::AfterSequenceNumber(done.sequence_number.clone())
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

impl<P: RecordProcessor> ShardConsumer<P> {
    /// Runs the consumer to one of its exits.
    pub(crate) async fn run(self) -> ShardExit {
        let span = info_span!("shard", shard_id = %self.lease.lease_key());
        self.run_in_span().instrument(span).await
    }

    async fn run_in_span(mut self) -> ShardExit {
        let lease = self.lease.snapshot().await;
        let shard_id = lease.lease_key.clone();
        if lease.is_finished() {
            return ShardExit::ShardEnded {
                children: Vec::new(),
            };
        }
        let start = starting_position(&lease.checkpoint, &self.config.initial_position, &shard_id);
        let poller = Poller {
            stream: self.stream.clone(),
            shard_id: shard_id.clone(),
            config: self.config.polling.clone(),
            seeds: self.seeds.clone(),
            start: start.clone(),
        };
        // The iterator comes before `initialize`, as in the Java KCL: a shard starting at
        // LATEST reads everything put after `initialize` was called.
        let lost = self.lease.lost_token().clone();
        let handoff = self.lease.handoff_token().clone();
        if !lease.parent_shard_ids.is_empty() {
            // Records of a key continue in the children: start only after every parent ended.
            let parents = &lease.parent_shard_ids;
            let mut waiting_logged = false;
            loop {
                if parents.is_subset(&self.parents_done.borrow()) {
                    break;
                }
                if !waiting_logged {
                    info!(?parents, "waiting for the parent shards to finish");
                    waiting_logged = true;
                }
                tokio::select! {
                    biased;
                    _ = lost.cancelled() => return ShardExit::LeaseLost,
                    _ = self.shutdown.cancelled() => return ShardExit::Shutdown,
                    _ = handoff.cancelled() => return ShardExit::HandedOff,
                    changed = self.parents_done.changed() => {
                        if changed.is_err() {
                            // The worker is gone; it stops this task next.
                            return ShardExit::Shutdown;
                        }
                    }
                }
            }
        }
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
        if let Err(e) = self
            .processor
            .initialize(&shard_id, &lease.checkpoint)
            .await
        {
            return ShardExit::Failed(processor_error(&shard_id, "initialize", 1, e.into()));
        }
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
            if let Err(interrupt) = self.deliver(&batch, &mut checkpointer).await {
                break interrupt.into();
            }
            if let Some(children) = batch.shard_end {
                break self.finish_shard(&mut checkpointer, children).await;
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

        match &exit {
            ShardExit::LeaseLost => {
                info!("lease lost; telling the processor");
                self.processor.lease_lost().await;
            }
            ShardExit::Shutdown | ShardExit::HandedOff => {
                if let Err(e) = self.processor.shutdown_requested(&mut checkpointer).await {
                    let e: BoxError = e.into();
                    warn!(error = %e, "shutdown_requested failed");
                }
            }
            ShardExit::ShardEnded { .. } => info!("shard processed to its end"),
            ShardExit::ShardGone => warn!("shard is past retention; its lease is deleted"),
            ShardExit::Failed(e) => error!(error = %e, "shard consumer failed"),
        }
        exit
    }

    /// Delivers a batch, retrying it per the processing policy: after a failed attempt the
    /// records not covered by the processor's checkpoint are delivered again, never skipped.
    async fn deliver(
        &mut self,
        batch: &FetchedBatch,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Interrupt> {
        let Some(last) = batch.records.last() else {
            return Ok(());
        };
        let shard_id = self.lease.lease_key().to_owned();
        // What `checkpoint()` may cover if this batch fails: the batches processed before it.
        let processed_before = checkpointer.highest_delivered().cloned();
        checkpointer.set_highest_delivered(last.position());
        let mut pending: Cow<'_, [Record]> = Cow::Borrowed(&batch.records);
        let mut backoff = self.config.processing.retry.backoff(self.seeds.next_seed());
        let mut attempts = 1;
        loop {
            // A lost lease stops delivery at once: the next owner may be reading already.
            if self.lease.is_lost() {
                return Err(Interrupt::LeaseLost);
            }
            let error: BoxError = match self
                .processor
                .process_records(&pending, checkpointer, batch.millis_behind_latest)
                .await
            {
                Ok(()) => {
                    debug!(records = pending.len(), "batch processed");
                    return Ok(());
                }
                Err(e) => e.into(),
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
                warn!(error = %error, "process_records failed after checkpointing its whole batch");
                return Ok(());
            }
            let Some(delay) = backoff.next() else {
                return Err(Interrupt::Failed(processor_error(
                    &shard_id,
                    "process_records",
                    attempts,
                    error,
                )));
            };
            warn!(attempts, remaining = remaining.len(), ?delay, error = %error, "process_records failed; delivering the batch again");
            tokio::select! {
                biased;
                _ = self.lease.lost_token().cancelled() => return Err(Interrupt::LeaseLost),
                _ = self.shutdown.cancelled() => return Err(Interrupt::Shutdown),
                _ = self.lease.handoff_token().cancelled() => return Err(Interrupt::HandedOff),
                _ = tokio::time::sleep(delay) => {}
            }
            pending = Cow::Owned(remaining);
            checkpointer.set_highest_delivered(last.position());
            attempts += 1;
        }
    }

    /// Calls `shard_ended` and checkpoints `SHARD_END` if the processor did not. A failing
    /// `shard_ended` does not write `SHARD_END`: the shard restarts from its last checkpoint
    /// rather than risk losing what the processor had not finished.
    async fn finish_shard(
        &mut self,
        checkpointer: &mut Checkpointer,
        children: Vec<ChildShard>,
    ) -> ShardExit {
        let shard_id = self.lease.lease_key().to_owned();
        checkpointer.set_at_shard_end();
        if let Err(e) = self.processor.shard_ended(checkpointer).await {
            return ShardExit::Failed(processor_error(&shard_id, "shard_ended", 1, e.into()));
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
