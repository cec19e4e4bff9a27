//! The archive's `RecordProcessor`: one per shard, buffering the shard's records and storing
//! them as one gzip object per flush, checkpointing only once the object is stored.
//!
//! Exactly once in the archive, in brief: the checkpoint always sits at the last record of
//! the last object stored, so the records after it always begin with the same record, and an
//! object is named after its first record. A worker that stores an object and dies before
//! checkpointing leaves the next owner to read the same records again from the same
//! checkpoint; its first object has the same name and replaces the one stored before. See
//! docs/archive.md for the whole argument and its one hole (a zombie writer).

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use kcl_core::{
    Checkpoint, Checkpointer, ErrorChain, ExtendedSequenceNumber, Record, RecordProcessor,
    async_trait,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::ArchiveError;
use super::buffer::{Buffer, FlushPolicy, FlushReason, position};
use super::line::encode_line;
use super::object_name::{Hour, ObjectName};
use super::store::ObjectStore;

/// How a failed upload is retried before the batch fails: jittered exponential backoff.
/// A batch that fails is delivered again by the worker (see `ProcessingConfig::retry`), which
/// retries the upload again, so the whole schedule is those of both.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct UploadRetry {
    /// Attempts after the first.
    pub retries: usize,
    /// The first pause.
    pub min_delay: Duration,
    /// The longest pause.
    pub max_delay: Duration,
}

impl Default for UploadRetry {
    fn default() -> Self {
        UploadRetry {
            retries: 5,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl UploadRetry {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.retries)
            .with_jitter()
    }
}

/// What every shard's archiver shares: where and how to store.
#[derive(Clone, Debug)]
pub struct ArchiveSettings {
    /// The stream's name, in object names.
    pub stream: String,
    /// The key prefix, empty or ending in `/`.
    pub prefix: String,
    /// When to store.
    pub policy: FlushPolicy,
    /// How to retry an upload.
    pub retry: UploadRetry,
    /// Where to store.
    pub store: Arc<dyn ObjectStore>,
}

impl ArchiveSettings {
    /// The archiver of one shard.
    pub fn archiver(&self, shard_id: &str) -> Archiver {
        Archiver {
            settings: self.clone(),
            shard_id: shard_id.to_owned(),
            buffer: Buffer::default(),
            highest: None,
        }
    }
}

/// Archives one shard.
#[derive(Debug)]
pub struct Archiver {
    settings: ArchiveSettings,
    shard_id: String,
    buffer: Buffer,
    /// The highest position ever buffered. A batch that failed (its upload did) is delivered
    /// again; its records up to here are in the buffer already and are not added twice.
    highest: Option<ExtendedSequenceNumber>,
}

impl Archiver {
    /// Stores the buffer as one object, then checkpoints its last record, then empties it.
    /// On an error nothing is checkpointed and the buffer is kept: the next attempt stores it
    /// again under the same name.
    async fn flush(
        &mut self,
        reason: FlushReason,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), ArchiveError> {
        let Some((hour, first)) = self.buffer.head() else {
            return Ok(());
        };
        let name = ObjectName {
            prefix: self.settings.prefix.clone(),
            hour,
            stream: self.settings.stream.clone(),
            shard_id: self.shard_id.clone(),
            first: first.clone(),
        };
        let key = name.key();
        let lines = self.buffer.lines().to_vec();
        let records = self.buffer.records();
        let plain_bytes = lines.len();
        // Compressing a few MiB takes tens of milliseconds: off the runtime's threads.
        let body = tokio::task::spawn_blocking(move || gzip(&lines))
            .await
            .map_err(|e| ArchiveError::Compress {
                source: std::io::Error::other(e),
            })??;
        let size = body.len();
        let store = self.settings.store.clone();
        (|| {
            let (store, body) = (store.clone(), body.clone());
            let key = key.clone();
            async move { store.put(&key, body).await }
        })
        .retry(self.settings.retry.backoff())
        .when(ArchiveError::is_transient)
        .notify(|error, pause| {
            warn!(key = %key, error = %ErrorChain(error), ?pause, "storing an object failed; retrying");
        })
        .await?;
        let last = self
            .buffer
            .last()
            .expect("a buffer with a head has a last record")
            .clone();
        checkpointer
            .checkpoint_record(&last)
            .await
            .map_err(|source| ArchiveError::Checkpoint {
                key: key.clone(),
                source,
            })?;
        info!(
            shard_id = %self.shard_id,
            key = %key,
            records,
            bytes = size,
            plain_bytes,
            reason = reason.as_str(),
            "stored an object"
        );
        self.buffer.clear();
        Ok(())
    }
}

/// The UTC hour a record is filed under: when it arrived in the stream. Kinesis always
/// reports that; a record without it (from a server that does not) is filed at the time it
/// is buffered, which a replay may not repeat.
fn hour_of(record: &Record) -> Hour {
    Hour::of(
        record
            .approximate_arrival_timestamp
            .unwrap_or_else(SystemTime::now),
    )
}

/// Gzip of the lines, at the default level (Firehose's choice too).
fn gzip(lines: &[u8]) -> Result<Bytes, ArchiveError> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(lines.len() / 4), Compression::default());
    encoder
        .write_all(lines)
        .and_then(|()| encoder.finish())
        .map(Bytes::from)
        .map_err(|source| ArchiveError::Compress { source })
}

#[async_trait]
impl RecordProcessor for Archiver {
    type Error = ArchiveError;

    async fn initialize(
        &mut self,
        shard_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), ArchiveError> {
        debug!(shard_id, ?checkpoint, "archiving the shard");
        Ok(())
    }

    async fn process_records(
        &mut self,
        records: &[Record],
        checkpointer: &mut Checkpointer,
        _millis_behind_latest: Option<u64>,
    ) -> Result<(), ArchiveError> {
        for record in records {
            let at = position(record);
            if self.highest.as_ref().is_some_and(|highest| &at <= highest) {
                continue;
            }
            let hour = hour_of(record);
            if !self.buffer.accepts(hour) {
                self.flush(FlushReason::HourChanged, checkpointer).await?;
            }
            self.buffer
                .push(record, hour, &encode_line(&record.data), Instant::now());
            self.highest = Some(at);
            if let Some(FlushReason::Size) = self.buffer.due(&self.settings.policy, Instant::now())
            {
                self.flush(FlushReason::Size, checkpointer).await?;
            }
        }
        // Also on the empty batches of an idle shard: the age is checked at least once per
        // idle read.
        if let Some(reason) = self.buffer.due(&self.settings.policy, Instant::now()) {
            self.flush(reason, checkpointer).await?;
        }
        Ok(())
    }

    async fn lease_lost(&mut self) {
        // Another worker owns the shard and reads it again from the checkpoint: what is
        // buffered here is its to store.
        if !self.buffer.is_empty() {
            info!(
                shard_id = %self.shard_id,
                records = self.buffer.records(),
                "lease lost; dropping the buffer (the next owner stores it)"
            );
        }
        self.buffer.clear();
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) -> Result<(), ArchiveError> {
        self.flush(FlushReason::ShardEnd, checkpointer).await?;
        checkpointer
            .checkpoint()
            .await
            .map_err(|source| ArchiveError::Checkpoint {
                key: "SHARD_END".into(),
                source,
            })
    }

    async fn shutdown_requested(
        &mut self,
        checkpointer: &mut Checkpointer,
    ) -> Result<(), ArchiveError> {
        // Stored and checkpointed before the next owner starts from the checkpoint.
        self.flush(FlushReason::Shutdown, checkpointer).await
    }
}
