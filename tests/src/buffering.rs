//! A processor shaped like the most common real one: it buffers records (as for a file or an
//! object), flushes every few batches to a [`Sink`], and checkpoints only what it flushed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kcl_core::{Checkpointer, Record, RecordProcessor, async_trait};

/// What the buffering processors of one test flushed (the durable output), and what they
/// were handed.
#[derive(Debug, Clone, Default)]
pub struct Sink {
    flushed: Arc<Mutex<Vec<String>>>,
    delivered: Arc<AtomicUsize>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    shard_ends: Arc<AtomicUsize>,
}

impl Sink {
    /// Payloads flushed, in flush order (duplicates included).
    pub fn flushed(&self) -> Vec<String> {
        self.flushed.lock().unwrap().clone()
    }
    /// Records handed to `process_records`, flushed or not.
    pub fn delivered(&self) -> usize {
        self.delivered.load(Ordering::SeqCst)
    }
    /// Distinct payloads handed to `process_records`.
    pub fn seen(&self) -> BTreeSet<String> {
        self.seen.lock().unwrap().clone()
    }
    /// `shard_ended` calls.
    pub fn shard_ends(&self) -> usize {
        self.shard_ends.load(Ordering::SeqCst)
    }
}

/// How a [`BufferingProcessor`] flushes and misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Buffering {
    /// Flush after this many batches.
    pub flush_every: usize,
    /// Flush and checkpoint in `shard_ended`; otherwise keep the trait's default (nothing).
    pub flush_at_shard_end: bool,
    /// `process_records` calls (over all processors of the factory) that panic with records
    /// buffered, once `panic_after_batches` batches were processed.
    pub panics: Arc<AtomicUsize>,
    /// Batches before a panic may happen.
    pub panic_after_batches: usize,
}

impl Buffering {
    /// A factory of buffering processors writing to `sink`.
    pub fn factory(
        &self,
        sink: &Sink,
    ) -> impl Fn(&str) -> BufferingProcessor + Send + Sync + 'static {
        let (behaviour, sink) = (self.clone(), sink.clone());
        let batches = Arc::new(AtomicUsize::new(0));
        move |_: &str| BufferingProcessor {
            behaviour: behaviour.clone(),
            sink: sink.clone(),
            buffer: Vec::new(),
            batches: batches.clone(),
        }
    }
}

/// Buffers records, flushes every few batches, checkpoints after each flush.
#[derive(Debug)]
pub struct BufferingProcessor {
    behaviour: Buffering,
    sink: Sink,
    buffer: Vec<Record>,
    batches: Arc<AtomicUsize>,
}

impl BufferingProcessor {
    async fn flush(&mut self, checkpointer: &mut Checkpointer) -> kcl_core::Result<()> {
        let Some(last) = self.buffer.last().cloned() else {
            return Ok(());
        };
        let flushed = self
            .buffer
            .drain(..)
            .map(|r| String::from_utf8_lossy(&r.data).into_owned());
        self.sink.flushed.lock().unwrap().extend(flushed);
        checkpointer.checkpoint_record(&last).await
    }
}

#[async_trait]
impl RecordProcessor for BufferingProcessor {
    type Error = kcl_core::Error;

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error> {
        self.sink
            .delivered
            .fetch_add(records.len(), Ordering::SeqCst);
        self.sink.seen.lock().unwrap().extend(
            records
                .iter()
                .map(|r| String::from_utf8_lossy(&r.data).into_owned()),
        );
        self.buffer.extend(records.iter().cloned());
        let batches = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if batches > self.behaviour.panic_after_batches
            && !self.buffer.is_empty()
            && self
                .behaviour
                .panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            panic!("injected panic with {} records buffered", self.buffer.len());
        }
        if batches.is_multiple_of(self.behaviour.flush_every.max(1)) {
            self.flush(checkpointer).await?;
        }
        Ok(())
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Self::Error> {
        self.sink.shard_ends.fetch_add(1, Ordering::SeqCst);
        if self.behaviour.flush_at_shard_end {
            self.flush(checkpointer).await?;
            checkpointer.checkpoint().await?;
        }
        Ok(())
    }

    async fn shutdown_requested(
        &mut self,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Self::Error> {
        self.flush(checkpointer).await
    }
}
