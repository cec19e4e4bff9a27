//! The simulation's record processors: one that checkpoints after each batch, and one that
//! buffers records as an archiver does (a file or an S3 object per flush) and checkpoints only
//! what it flushed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kcl_core::testing::InMemoryLeaseStore;
use kcl_core::{Checkpoint, Checkpointer, Error, ExtendedSequenceNumber, Record, RecordProcessor};
use tokio::time::Instant;

use crate::observe::{RecordId, Rng, Shared, covered, trace, violation};

/// How a buffering processor flushes, drawn per seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buffering {
    /// Flush once this many batches are buffered...
    pub(crate) every_batches: u32,
    /// ...or once the oldest buffered record waited this long (checked when a batch comes).
    pub(crate) after: Duration,
    /// Flush and checkpoint in `shard_ended`, as the documentation asks. Otherwise the
    /// processor keeps the default `shard_ended`, which does nothing: the library must then
    /// not write `SHARD_END` over what it has not flushed.
    pub(crate) flush_at_shard_end: bool,
    /// Flush what is buffered when the lease is lost (harmless duplicates), rather than
    /// dropping it (the next owner delivers it again).
    pub(crate) flush_on_lease_lost: bool,
}

impl Buffering {
    pub(crate) fn draw(rng: &mut Rng) -> Self {
        Buffering {
            every_batches: 2 + rng.below(5) as u32,
            after: rng.millis(500, 15_000),
            flush_at_shard_end: rng.chance(75),
            flush_on_lease_lost: rng.chance(50),
        }
    }
}

/// Records are "processed" when written to the sink (`Observed::processed`): a processor that
/// checkpoints each batch writes each batch; a buffering one writes at each flush.
pub(crate) struct SimProcessor {
    pub(crate) shard: String,
    pub(crate) instance: u64,
    pub(crate) observed: Shared,
    pub(crate) leases: Arc<InMemoryLeaseStore>,
    pub(crate) parents: BTreeSet<String>,
    pub(crate) failing: Arc<AtomicBool>,
    pub(crate) rng: Rng,
    pub(crate) last_ok: Option<ExtendedSequenceNumber>,
    pub(crate) started: bool,
    /// `None`: flush and checkpoint every batch.
    pub(crate) buffering: Option<Buffering>,
    /// Delivered, not yet flushed (also listed in `Observed::buffered` while this lives).
    pub(crate) buffer: Vec<RecordId>,
    pub(crate) batches_buffered: u32,
    pub(crate) buffered_since: Option<Instant>,
    /// The last record buffered, and the last one flushed: where this processor checkpoints.
    pub(crate) last_buffered: Option<Record>,
    pub(crate) last_flushed: Option<Record>,
}

fn record_id(record: &Record) -> Option<RecordId> {
    let text = String::from_utf8_lossy(&record.data);
    let (key, n) = text.split_once(':')?;
    Some((key.to_owned(), n.parse().ok()?))
}

impl SimProcessor {
    /// Invariant 4: every parent finished (or gone) before a child starts, and so before its
    /// first record. (The consumer waits for the parents before it reads the shard, and calls
    /// `initialize` after that wait: a child started early is caught here even when it has no
    /// records yet or its parent had nothing left to read.)
    fn check_parents(&self, when: &str) {
        for parent in &self.parents {
            if let Some(lease) = self
                .leases
                .leases()
                .into_iter()
                .find(|l| l.lease_key == *parent)
                && !lease.is_finished()
            {
                violation(
                    &self.observed,
                    format!(
                        "{} {when} while its parent {parent} is at {}",
                        self.shard, lease.checkpoint
                    ),
                );
            }
        }
    }

    /// Writes the buffer to the sink.
    fn flush(&mut self) {
        let records = std::mem::take(&mut self.buffer);
        self.batches_buffered = 0;
        self.buffered_since = None;
        if let Some(last) = self.last_buffered.take() {
            self.last_flushed = Some(last);
        }
        let mut observed = self.observed.lock().unwrap();
        observed.buffered.remove(&self.instance);
        if !records.is_empty() {
            observed.coverage.flushes += 1;
        }
        observed.flush(records);
    }

    /// Flushes, then checkpoints at the last record flushed.
    async fn flush_and_checkpoint(&mut self, cp: &mut Checkpointer) -> Result<(), Error> {
        self.flush();
        match &self.last_flushed {
            Some(last) => cp.checkpoint_record(last).await,
            None => Ok(()),
        }
    }

    fn drop_buffer(&mut self) {
        self.buffer.clear();
        self.last_buffered = None;
        self.batches_buffered = 0;
        self.buffered_since = None;
        self.observed
            .lock()
            .unwrap()
            .buffered
            .remove(&self.instance);
    }
}

impl Drop for SimProcessor {
    fn drop(&mut self) {
        // Dropped after a panic, a crash or an abort: whatever it buffered is gone.
        if let Ok(mut observed) = self.observed.lock() {
            observed.buffered.remove(&self.instance);
        }
    }
}

#[async_trait]
impl RecordProcessor for SimProcessor {
    type Error = Error;

    async fn initialize(&mut self, _: &str, _: &Checkpoint) -> Result<(), Error> {
        self.check_parents("initialized");
        Ok(())
    }

    async fn process_records(
        &mut self,
        records: &[Record],
        cp: &mut Checkpointer,
        _: Option<u64>,
    ) -> Result<(), Error> {
        if !self.started {
            self.started = true;
            if !self.parents.is_empty() {
                covered(&self.observed, |c| c.children_processed += 1);
            }
            self.check_parents("processed");
        }
        let first = records[0].position();
        // Invariant 2: in order within a processor (a retry starts after what succeeded).
        if self.last_ok.as_ref().is_some_and(|last| first <= *last) {
            violation(
                &self.observed,
                format!(
                    "{} (instance {}): {first} after {:?}",
                    self.shard, self.instance, self.last_ok
                ),
            );
        }
        if self.failing.load(Ordering::Relaxed) {
            let roll = self.rng.below(100);
            // A buffering processor also panics now and then while it holds records (say an
            // encoder bug on a full buffer): what it buffered dies with it.
            let mid_buffer = self.buffering.is_some() && !self.buffer.is_empty();
            let panics = match roll {
                8..=9 => true,
                10..=19 => mid_buffer,
                _ => false,
            };
            if roll < 10 || panics {
                covered(&self.observed, |c| c.processor_failures += 1);
            }
            if roll <= 7 {
                return Err(Error::InvalidConfig {
                    field: "sim",
                    problem: "injected failure".into(),
                });
            }
            if panics {
                if mid_buffer {
                    covered(&self.observed, |c| c.panics_mid_buffer += 1);
                    trace(
                        &self.observed,
                        format!(
                            "{} (instance {}): panics holding {} unflushed records",
                            self.shard,
                            self.instance,
                            self.buffer.len()
                        ),
                    );
                }
                panic!("injected panic in {}", self.shard);
            }
        }
        // Processing takes a while, so pauses and steals land in the middle of batches.
        tokio::time::sleep(self.rng.millis(0, 300)).await;
        let ids = records.iter().filter_map(record_id);
        let Some(buffering) = self.buffering else {
            self.observed.lock().unwrap().flush(ids);
            // A failed checkpoint fails the call, and the consumer retries the whole batch.
            cp.checkpoint().await?;
            self.last_ok = Some(records.last().unwrap().position());
            return Ok(());
        };
        self.buffer.extend(ids);
        self.observed
            .lock()
            .unwrap()
            .buffered
            .insert(self.instance, self.buffer.clone());
        self.batches_buffered += 1;
        self.last_buffered = records.last().cloned();
        let since = *self.buffered_since.get_or_insert_with(Instant::now);
        if self.batches_buffered >= buffering.every_batches || since.elapsed() >= buffering.after {
            // A failed checkpoint fails the call: the batch comes again (flushed twice).
            self.flush_and_checkpoint(cp).await?;
        }
        self.last_ok = Some(records.last().unwrap().position());
        Ok(())
    }

    async fn lease_lost(&mut self) {
        match self.buffering {
            Some(b) if b.flush_on_lease_lost => self.flush(),
            _ => self.drop_buffer(),
        }
    }

    async fn shard_ended(&mut self, cp: &mut Checkpointer) -> Result<(), Error> {
        let Some(buffering) = self.buffering else {
            // The default: the worker writes SHARD_END (every batch was checkpointed).
            return Ok(());
        };
        if !self.buffer.is_empty() {
            covered(&self.observed, |c| c.shard_ends_mid_buffer += 1);
        }
        // After a shard end that left records unflushed, its operator (alerted by the
        // library's error) deploys a processor that flushes there: from then on every processor
        // of that shard does, so a correct library gets the shard finished.
        let fixed = self
            .observed
            .lock()
            .unwrap()
            .ended_unflushed
            .contains(&self.shard);
        if buffering.flush_at_shard_end || fixed {
            self.flush();
            // At the shard's end, `checkpoint()` writes SHARD_END.
            return cp.checkpoint().await;
        }
        if self.buffer.is_empty() {
            // The default `shard_ended`, harmless here: everything delivered was checkpointed.
            return Ok(());
        }
        trace(
            &self.observed,
            format!(
                "{} (instance {}): default shard_ended with {} unflushed records",
                self.shard,
                self.instance,
                self.buffer.len()
            ),
        );
        self.observed
            .lock()
            .unwrap()
            .ended_unflushed
            .insert(self.shard.clone());
        // What the default `shard_ended` does: nothing.
        Ok(())
    }

    async fn shutdown_requested(&mut self, cp: &mut Checkpointer) -> Result<(), Error> {
        if self.buffering.is_none() {
            return cp.checkpoint().await;
        }
        self.flush_and_checkpoint(cp).await
    }
}
