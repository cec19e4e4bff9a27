//! The user's side: [`RecordProcessor`] (one per shard) and [`RecordProcessorFactory`].

use async_trait::async_trait;

use crate::checkpoint::Checkpointer;
use crate::error::BoxError;
use crate::sequence::Checkpoint;
use crate::stream::Record;
use crate::stream_identity::StreamIdentity;

/// Processes the records of one shard. The worker creates one per shard lease it holds (with
/// a [`RecordProcessorFactory`]) and calls it from one task, so calls never overlap.
///
/// Life cycle: [`initialize`](Self::initialize), then [`process_records`](Self::process_records)
/// for each batch in shard order, then exactly one of:
/// - [`shard_ended`](Self::shard_ended): the shard was resharded and every record was delivered;
/// - [`shutdown_requested`](Self::shutdown_requested): the worker is shutting down (or handing
///   the shard to another worker) and lets the processor checkpoint first;
/// - [`lease_lost`](Self::lease_lost): another worker owns the shard now; checkpointing is no
///   longer possible.
///
/// Delivery is at least once: records after the last checkpoint are delivered again after a
/// failover, a restart, or a panic of the processor. An error from `process_records` never
/// leads to a checkpoint past the failed batch: the batch (minus what was checkpointed) is
/// delivered again, see [`ProcessingConfig`](crate::ProcessingConfig).
///
/// # Buffering processors
/// A processor may keep records across batches (to write a file or an object) and checkpoint
/// only after a flush: a checkpoint says "everything up to here is safe", so never checkpoint
/// a record before it was flushed. The library guarantees such a processor:
/// - a panic drops the processor with its buffer, and the shard resumes *from the checkpoint*
///   (new iterator, new processor): every record after the last flush comes again;
/// - `SHARD_END` is never written over unflushed records: in
///   [`shard_ended`](Self::shard_ended) flush and call `checkpointer.checkpoint()`; if the
///   processor returns without its checkpoint covering every record delivered, the shard
///   fails loudly ([`Error::ShardEndNotCheckpointed`](crate::Error::ShardEndNotCheckpointed))
///   and restarts from its checkpoint;
/// - in [`shutdown_requested`](Self::shutdown_requested) (shutdown and handoff) it can flush and
///   checkpoint before the next owner starts from that checkpoint;
/// - to flush on time on an idle shard, set
///   [`call_process_records_even_for_empty_list`](crate::ProcessingConfig::call_process_records_even_for_empty_list):
///   `process_records` is then called with no records after each idle read.
///
/// Records are [`bytes::Bytes`]-backed and cheap to clone, so keeping them costs no copy.
#[async_trait]
pub trait RecordProcessor: Send + 'static {
    /// The processor's own error type.
    type Error: Into<BoxError> + Send + 'static;

    /// Called once before the first batch with the shard id and the checkpoint the shard
    /// resumes from (a sequence number, or a sentinel for a shard never checkpointed).
    async fn initialize(
        &mut self,
        shard_id: &str,
        starting_checkpoint: &Checkpoint,
    ) -> Result<(), Self::Error> {
        let _ = (shard_id, starting_checkpoint);
        Ok(())
    }

    /// Processes a batch of records, in shard order. Checkpoint through `checkpointer` as
    /// often as the application needs; records after the last checkpoint are delivered again
    /// if the shard moves to another worker or the worker restarts. `millis_behind_latest`
    /// tells how far the batch is behind the tip of the stream. The batch is never empty
    /// unless [`ProcessingConfig::call_process_records_even_for_empty_list`](crate::ProcessingConfig::call_process_records_even_for_empty_list)
    /// is set.
    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error>;

    /// Another worker took the shard, or the lease could not be renewed in time. No more
    /// records follow and checkpoints are rejected. Default: nothing.
    async fn lease_lost(&mut self) {}

    /// Every record of the closed shard was delivered: flush what is buffered and call
    /// `checkpointer.checkpoint()`, which writes `SHARD_END`. The shard's children start only
    /// once `SHARD_END` is written.
    ///
    /// If this returns `Ok` without writing `SHARD_END`, the worker writes it only when the
    /// checkpoint already covers every record delivered (a processor that checkpoints each
    /// batch needs to do nothing here, so the default is safe for it). Otherwise it does not
    /// write `SHARD_END` over records the processor may still hold: the shard fails with
    /// [`Error::ShardEndNotCheckpointed`](crate::Error::ShardEndNotCheckpointed) and restarts
    /// from its checkpoint, delivering those records again. (The Java KCL fails the same way,
    /// "Application didn't checkpoint at end of shard", whenever `shardEnded` does not
    /// checkpoint.) An error from this callback writes nothing either. Default: nothing.
    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) -> Result<(), Self::Error> {
        let _ = checkpointer;
        Ok(())
    }

    /// The worker is shutting down or handing the shard over: checkpoint what was processed.
    /// Default: nothing (a processor that checkpoints each batch loses nothing).
    async fn shutdown_requested(
        &mut self,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), Self::Error> {
        let _ = checkpointer;
        Ok(())
    }
}

/// The shard a processor is created for: its id and, in multi-stream mode, its stream.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ShardContext {
    /// The shard's id, e.g. `shardId-000000000001`.
    pub shard_id: String,
    /// The stream the shard belongs to; `None` in single-stream mode.
    pub stream: Option<StreamIdentity>,
}

impl ShardContext {
    /// The context of `shard_id` of `stream` (`None`: single-stream mode).
    pub fn new(shard_id: impl Into<String>, stream: Option<StreamIdentity>) -> Self {
        ShardContext {
            shard_id: shard_id.into(),
            stream,
        }
    }
}

/// Creates a [`RecordProcessor`] for each shard a worker starts processing.
///
/// Any `Fn(&str) -> P` closure is a factory; a multi-stream application whose processors
/// need their stream wraps a `Fn(&ShardContext) -> P` closure in [`PerStream`].
pub trait RecordProcessorFactory: Send + Sync + 'static {
    /// The processor type.
    type Processor: RecordProcessor;

    /// A new processor for `shard_id`.
    fn create_processor(&self, shard_id: &str) -> Self::Processor;

    /// A new processor for `shard`: the worker calls this one. Default: [`create_processor`]
    /// with the shard id, so a factory that does not care about the stream implements only
    /// that.
    ///
    /// [`create_processor`]: RecordProcessorFactory::create_processor
    fn create_processor_for(&self, shard: &ShardContext) -> Self::Processor {
        self.create_processor(&shard.shard_id)
    }
}

/// A factory from a `Fn(&ShardContext) -> P` closure: its processors know their stream.
///
/// ```
/// # use kcl_core::{PerStream, ShardContext};
/// # struct Print { stream: String }
/// let factory = PerStream(|shard: &ShardContext| Print {
///     stream: shard.stream.as_ref().map_or("", |s| s.stream_name()).to_owned(),
/// });
/// # let _ = factory;
/// ```
#[derive(Clone, Copy, Debug)]
pub struct PerStream<F>(pub F);

impl<F, P> RecordProcessorFactory for PerStream<F>
where
    F: Fn(&ShardContext) -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    type Processor = P;

    fn create_processor(&self, shard_id: &str) -> P {
        (self.0)(&ShardContext::new(shard_id, None))
    }

    fn create_processor_for(&self, shard: &ShardContext) -> P {
        (self.0)(shard)
    }
}

impl<F, P> RecordProcessorFactory for F
where
    F: Fn(&str) -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    type Processor = P;

    fn create_processor(&self, shard_id: &str) -> P {
        self(shard_id)
    }
}
