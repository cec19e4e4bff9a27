//! The [`Checkpointer`]: how a processor records progress in the shard's lease.

use std::fmt;
use std::sync::Arc;

use tracing::debug;

use crate::backoff::{Backoff, retry};
use crate::consumer::ShardStats;
use crate::error::{Error, Result};
use crate::lease::held::HeldLease;
use crate::lease::{LeaseStore, LeaseUpdate};
use crate::sequence::{Checkpoint, ExtendedSequenceNumber, SequenceNumber};
use crate::stream::Record;

/// Records progress through a shard in its lease.
///
/// A checkpoint must lie between the last checkpoint and the highest record delivered so far;
/// anything else is rejected with [`Error::CheckpointBeforeLast`] or
/// [`Error::CheckpointBeyondDelivered`] and nothing is written. Writes are conditional on the
/// lease's owner and counter: once the lease is lost every call fails with
/// [`Error::LeaseLost`], so a worker that lost a shard can never overwrite the new owner's
/// checkpoint. Retryable store failures are retried with backoff before an error is returned.
pub struct Checkpointer {
    shard_id: String,
    lease: Arc<HeldLease>,
    store: Arc<dyn LeaseStore>,
    retry: Box<dyn Fn() -> Backoff + Send + Sync>,
    last: Checkpoint,
    highest_delivered: Option<ExtendedSequenceNumber>,
    at_shard_end: bool,
    stats: Arc<ShardStats>,
}

impl fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpointer")
            .field("shard_id", &self.shard_id)
            .field("last", &self.last)
            .field("highest_delivered", &self.highest_delivered)
            .field("at_shard_end", &self.at_shard_end)
            .finish()
    }
}

impl Checkpointer {
    pub(crate) fn new(
        lease: Arc<HeldLease>,
        store: Arc<dyn LeaseStore>,
        last: Checkpoint,
        retry: Box<dyn Fn() -> Backoff + Send + Sync>,
        stats: Arc<ShardStats>,
    ) -> Self {
        Checkpointer {
            shard_id: lease.lease_key().to_owned(),
            lease,
            store,
            retry,
            last,
            highest_delivered: None,
            at_shard_end: false,
            stats,
        }
    }

    /// The shard this checkpointer writes for.
    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// The shard's checkpoint as last written (or read when the shard started).
    pub fn last_checkpoint(&self) -> &Checkpoint {
        &self.last
    }

    /// The highest record delivered to the processor so far.
    pub fn highest_delivered(&self) -> Option<&ExtendedSequenceNumber> {
        self.highest_delivered.as_ref()
    }

    /// Checkpoints at the last record delivered (in `shard_ended`: at `SHARD_END`).
    /// Does nothing when that is already the checkpoint.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the lease is no longer held; the store's error when the write
    /// kept failing.
    pub async fn checkpoint(&mut self) -> Result<()> {
        if self.at_shard_end {
            return self.write(Checkpoint::ShardEnd).await;
        }
        match self.highest_delivered.clone() {
            Some(position) => self.checkpoint_position(position).await,
            None => self.ensure_held(),
        }
    }

    /// Checkpoints at `record`: it and every record before it are processed.
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_sequence_number`].
    pub async fn checkpoint_record(&mut self, record: &Record) -> Result<()> {
        self.checkpoint_position(record.position()).await
    }

    /// Checkpoints at a sequence number and sub-sequence number (0 for plain records).
    ///
    /// # Errors
    /// [`Error::InvalidSequenceNumber`] when `sequence_number` is not one;
    /// [`Error::CheckpointBeforeLast`] / [`Error::CheckpointBeyondDelivered`] when the position
    /// is before the last checkpoint or after the highest record delivered;
    /// [`Error::LeaseLost`] when the lease is no longer held.
    pub async fn checkpoint_sequence_number(
        &mut self,
        sequence_number: &str,
        sub_sequence_number: u64,
    ) -> Result<()> {
        let position =
            ExtendedSequenceNumber::new(SequenceNumber::new(sequence_number)?, sub_sequence_number);
        self.checkpoint_position(position).await
    }

    async fn checkpoint_position(&mut self, requested: ExtendedSequenceNumber) -> Result<()> {
        self.ensure_held()?;
        if self
            .highest_delivered
            .as_ref()
            .is_none_or(|h| requested > *h)
        {
            return Err(Error::CheckpointBeyondDelivered {
                shard_id: self.shard_id.clone(),
                requested,
                highest_delivered: self.highest_delivered.clone(),
            });
        }
        match &self.last {
            Checkpoint::SequenceNumber(last) if requested == *last => return Ok(()),
            last if last.covers(&requested) => {
                return Err(Error::CheckpointBeforeLast {
                    shard_id: self.shard_id.clone(),
                    requested,
                    last: self.last.clone(),
                });
            }
            _ => {}
        }
        self.write(Checkpoint::SequenceNumber(requested)).await
    }

    async fn write(&mut self, checkpoint: Checkpoint) -> Result<()> {
        self.ensure_held()?;
        if checkpoint == self.last {
            return Ok(());
        }
        let update = LeaseUpdate::Checkpoint {
            checkpoint: checkpoint.clone(),
        };
        let (lease, store) = (&self.lease, self.store.as_ref());
        // Once the lease is lost (taken, or run out while writes failed or hung), the
        // checkpoint fails at once: the processor learns it must stop before a new owner can
        // start. A write dropped here is cancel-safe (see `HeldLease::write`).
        let written = tokio::select! {
            biased;
            _ = lease.lost_token().cancelled() => Err(Error::LeaseLost { lease_key: self.shard_id.clone() }),
            written = retry("checkpoint", (self.retry)(), || lease.write(store, &update)) => written.map(drop),
        };
        if let Err(e) = written {
            self.stats.checkpoint_failed();
            return Err(e);
        }
        debug!(shard_id = %self.shard_id, %checkpoint, "checkpointed");
        self.last = checkpoint;
        Ok(())
    }

    fn ensure_held(&self) -> Result<()> {
        if self.lease.is_lost() {
            Err(Error::LeaseLost {
                lease_key: self.shard_id.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Called before a batch is delivered.
    pub(crate) fn set_highest_delivered(&mut self, position: ExtendedSequenceNumber) {
        self.highest_delivered = Some(position);
    }

    /// Called after a failed batch: the highest position `checkpoint()` may cover falls back
    /// to what was processed before the batch (or the checkpoint, if later).
    pub(crate) fn reset_highest_delivered(&mut self, processed: Option<ExtendedSequenceNumber>) {
        let checkpointed = self.last.position().cloned();
        self.highest_delivered = processed.max(checkpointed);
    }

    /// Called when a new processor starts reading from the checkpoint: nothing is delivered
    /// yet in this session.
    pub(crate) fn start_session(&mut self) {
        self.highest_delivered = None;
        self.at_shard_end = false;
    }

    /// True when the checkpoint covers every record delivered in this session.
    pub(crate) fn covers_delivered(&self) -> bool {
        self.highest_delivered
            .as_ref()
            .is_none_or(|delivered| self.last.covers(delivered))
    }

    /// Called before `shard_ended`: from now on `checkpoint()` writes `SHARD_END`.
    pub(crate) fn set_at_shard_end(&mut self) {
        self.at_shard_end = true;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::config::RetryConfig;
    use crate::testing::InMemoryLeaseStore;

    fn seq(s: &str) -> SequenceNumber {
        SequenceNumber::new(s).unwrap()
    }

    async fn checkpointer(store: &Arc<InMemoryLeaseStore>) -> Checkpointer {
        let lease = store.take_as("s-0", "w1");
        let held = HeldLease::new(
            lease,
            "w1",
            Duration::from_secs(10),
            Instant::now(),
            Arc::default(),
        );
        let retry = RetryConfig::new(Duration::from_millis(1), Duration::from_millis(2))
            .with_max_attempts(Some(3));
        Checkpointer::new(
            held,
            store.clone(),
            Checkpoint::TrimHorizon,
            Box::new(move || retry.backoff(0)),
            Arc::new(ShardStats::new(
                Arc::default(),
                &Default::default(),
                "stream",
                "s-0",
            )),
        )
    }

    async fn stored(store: &InMemoryLeaseStore) -> Checkpoint {
        store.get_lease("s-0").await.unwrap().unwrap().checkpoint
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoints_within_the_delivered_range() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let mut cp = checkpointer(&store).await;
        cp.checkpoint().await.unwrap();
        assert_eq!(
            stored(&store).await,
            Checkpoint::TrimHorizon,
            "nothing delivered yet"
        );

        cp.set_highest_delivered(ExtendedSequenceNumber::new(seq("30"), 0));
        cp.checkpoint_sequence_number("20", 0).await.unwrap();
        assert_eq!(stored(&store).await, Checkpoint::at(seq("20"), 0));
        cp.checkpoint_sequence_number("20", 0).await.unwrap();
        cp.checkpoint().await.unwrap();
        assert_eq!(stored(&store).await, Checkpoint::at(seq("30"), 0));
        assert_eq!(cp.last_checkpoint(), &Checkpoint::at(seq("30"), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_out_of_range_checkpoints_without_writing() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let mut cp = checkpointer(&store).await;
        let err = cp.checkpoint_sequence_number("5", 0).await.unwrap_err();
        assert!(matches!(
            err,
            Error::CheckpointBeyondDelivered {
                highest_delivered: None,
                ..
            }
        ));

        cp.set_highest_delivered(ExtendedSequenceNumber::new(seq("30"), 0));
        cp.checkpoint_sequence_number("20", 0).await.unwrap();
        let writes = store.update_calls();
        let err = cp.checkpoint_sequence_number("19", 0).await.unwrap_err();
        assert!(matches!(err, Error::CheckpointBeforeLast { .. }), "{err:?}");
        let err = cp.checkpoint_sequence_number("31", 0).await.unwrap_err();
        assert!(
            matches!(err, Error::CheckpointBeyondDelivered { .. }),
            "{err:?}"
        );
        let err = cp.checkpoint_sequence_number("30", 1).await.unwrap_err();
        assert!(
            matches!(err, Error::CheckpointBeyondDelivered { .. }),
            "{err:?}"
        );
        let err = cp.checkpoint_sequence_number("3x", 0).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidSequenceNumber { .. }),
            "{err:?}"
        );
        assert_eq!(store.update_calls(), writes);
        assert_eq!(stored(&store).await, Checkpoint::at(seq("20"), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_owner_cannot_checkpoint() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let mut cp = checkpointer(&store).await;
        cp.set_highest_delivered(ExtendedSequenceNumber::new(seq("30"), 0));
        store.take_as("s-0", "w2");
        let err = cp.checkpoint().await.unwrap_err();
        assert!(matches!(err, Error::LeaseLost { .. }), "{err:?}");
        assert_eq!(stored(&store).await, Checkpoint::TrimHorizon);
        let err = cp.checkpoint_sequence_number("10", 0).await.unwrap_err();
        assert!(matches!(err, Error::LeaseLost { .. }), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn at_shard_end_checkpoint_writes_shard_end() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let mut cp = checkpointer(&store).await;
        cp.set_highest_delivered(ExtendedSequenceNumber::new(seq("30"), 0));
        cp.set_at_shard_end();
        cp.checkpoint().await.unwrap();
        assert_eq!(stored(&store).await, Checkpoint::ShardEnd);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_store_failures() {
        let store = Arc::new(InMemoryLeaseStore::new("t"));
        let mut cp = checkpointer(&store).await;
        cp.set_highest_delivered(ExtendedSequenceNumber::new(seq("30"), 0));
        store.fail_next_updates(2);
        cp.checkpoint().await.unwrap();
        assert_eq!(stored(&store).await, Checkpoint::at(seq("30"), 0));
    }
}
