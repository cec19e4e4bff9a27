//! The user's side: [`RecordProcessor`] (one per shard) and [`RecordProcessorFactory`].

use async_trait::async_trait;

use crate::checkpoint::Checkpointer;
use crate::error::BoxError;
use crate::sequence::Checkpoint;
use crate::stream::Record;

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
/// failover or a restart. An error from `process_records` never leads to a checkpoint past the
/// failed batch: the batch (minus what was checkpointed) is delivered again, see
/// [`ProcessingConfig`](crate::ProcessingConfig).
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

    /// Processes a non-empty batch of records, in shard order. Checkpoint through
    /// `checkpointer` as often as the application needs; records after the last checkpoint
    /// are delivered again if the shard moves to another worker or the worker restarts.
    /// `millis_behind_latest` tells how far the batch is behind the tip of the stream.
    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        millis_behind_latest: Option<u64>,
    ) -> Result<(), Self::Error>;

    /// Another worker took the shard, or the lease could not be renewed in time. No more
    /// records follow and checkpoints are rejected. Default: nothing.
    async fn lease_lost(&mut self) {}

    /// Every record of the closed shard was delivered. The worker checkpoints `SHARD_END`
    /// after this returns, whether or not the processor did (so children are never blocked by
    /// a forgotten checkpoint). Default: nothing.
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

/// Creates a [`RecordProcessor`] for each shard a worker starts processing.
///
/// Any `Fn(&str) -> P` closure is a factory.
pub trait RecordProcessorFactory: Send + Sync + 'static {
    /// The processor type.
    type Processor: RecordProcessor;

    /// A new processor for `shard_id`.
    fn create_processor(&self, shard_id: &str) -> Self::Processor;
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
