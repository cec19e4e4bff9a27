//! `kcl-archive`'s building blocks: a [`RecordProcessor`](kcl_core::RecordProcessor) that
//! buffers a shard's records and stores them as gzip-compressed, newline-delimited objects
//! under `PREFIX/YYYY/MM/DD/HH/` in S3 or a directory, checkpointing only what is stored.
//!
//! - [`line`](mod@line): one record, one line (text as is, anything else base64 behind a marker);
//! - [`object_name`]: where an object goes, named after its first record;
//! - [`buffer`]: what is held and when it must be stored (pure);
//! - [`store`]: S3 or a directory;
//! - [`archiver`]: the processor, the one place with I/O and checkpoints;
//! - [`read`]: the archive read back.

pub mod archiver;
pub mod buffer;
pub mod line;
pub mod object_name;
pub mod read;
pub mod store;

pub use archiver::{ArchiveSettings, Archiver, UploadRetry};
pub use buffer::{FlushPolicy, FlushReason};
pub use object_name::{NotAnObjectName, ObjectName};
pub use store::{DirStore, ObjectStore, S3Store, StoredObject};

/// What can go wrong while archiving or reading an archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// The store failed an operation. `transient` failures (throttling, 5xx, timeouts) are
    /// retried; the others (no such bucket, access denied, a local I/O error) fail the batch
    /// at once.
    #[error("{operation} {location} failed")]
    Store {
        /// What was done: `storing`, `listing`, `reading`, `creating the bucket`.
        operation: &'static str,
        /// The object, bucket or path.
        location: String,
        /// Whether a retry may succeed.
        transient: bool,
        /// The store's error.
        #[source]
        source: kcl_core::BoxError,
    },
    /// Gzip failed (compressing) or an object is not gzip (reading).
    #[error("gzip failed")]
    Compress {
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An object was stored but its checkpoint failed: the records are delivered again and
    /// the object is written again under the same name.
    #[error("checkpointing after storing {key} failed")]
    Checkpoint {
        /// The stored object.
        key: String,
        /// The library's error (a lost lease, the lease table unreachable).
        #[source]
        source: kcl_core::Error,
    },
    /// An object of the archive could not be read back.
    #[error("object {key} is not an archive object")]
    Corrupt {
        /// The object.
        key: String,
        /// What is wrong.
        #[source]
        source: kcl_core::BoxError,
    },
}

impl ArchiveError {
    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ArchiveError::Store { transient, .. } => *transient,
            ArchiveError::Compress { .. }
            | ArchiveError::Checkpoint { .. }
            | ArchiveError::Corrupt { .. } => false,
        }
    }
}
