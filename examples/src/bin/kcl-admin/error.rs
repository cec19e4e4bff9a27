//! The one error type of kcl-admin, and the exit code of each variant.

use std::time::Duration;

use kcl_core::{BoxError, Lease, LeaseFence};
use kcl_dynamo_lease::RepairError;

use crate::render::human_duration;

/// `Result` with [`AdminError`].
pub(crate) type Result<T, E = AdminError> = std::result::Result<T, E>;

/// An AWS call, a table error or anything unexpected.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Bad command-line input (clap's own code for its errors).
pub(crate) const EXIT_USAGE: u8 = 2;
/// kcl-admin declined to write: a live owner, a finished lease, no confirmation.
pub(crate) const EXIT_REFUSED: u8 = 3;
/// The table, lease, stream, shard, worker or sequence number does not exist.
pub(crate) const EXIT_NOT_FOUND: u8 = 4;
/// A lease changed between the read and the conditional write; nothing was written by it.
pub(crate) const EXIT_CHANGED: u8 = 5;

/// Why a kcl-admin command failed. Each variant names what it is about, so the message alone
/// says what to do; [`AdminError::exit_code`] sorts them for scripts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AdminError {
    /// The lease table does not exist.
    #[error("lease table `{table}` does not exist")]
    TableMissing {
        table: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The lease table has no lease with this key.
    #[error("lease table `{table}` has no lease `{lease_key}`")]
    LeaseMissing { table: String, lease_key: String },

    /// The lease item does not decode: it must be repaired before anything else touches it.
    #[error("{source}; repair it first: {repair}")]
    InvalidLease {
        #[source]
        source: kcl_core::Error,
        repair: String,
    },

    /// The stream does not exist.
    #[error("stream `{stream}` does not exist")]
    StreamMissing {
        stream: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The stream has no shard with this id.
    #[error(
        "stream `{stream}` has no shard `{shard_id}` (trimmed after the retention period, or \
         not a shard of this stream)"
    )]
    ShardMissing { stream: String, shard_id: String },

    /// No lease of the table names this worker as its owner.
    #[error("worker `{worker}` owns no lease in table `{table}`")]
    WorkerOwnsNoLease { table: String, worker: String },

    /// `--to` is neither a position keyword nor a sequence number.
    #[error("`{value}` is not trim-horizon, latest, at-timestamp=TIME or a sequence number")]
    BadSequenceNumber {
        value: String,
        #[source]
        source: kcl_core::Error,
    },

    /// The shard has no record with this sequence number (another shard's, or trimmed).
    #[error(
        "shard `{shard_id}` of stream `{stream}` has no record with sequence number \
         {sequence_number}: it belongs to another shard or stream, or was trimmed"
    )]
    SequenceNumberNotInShard {
        stream: String,
        shard_id: String,
        sequence_number: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The command needs the stream and `--stream` was not given.
    #[error("{what} needs the stream: add --stream NAME")]
    StreamRequired { what: &'static str },

    /// The table's leases name another stream than `--stream`.
    #[error("lease table `{table}` belongs to stream `{table_stream}`, not to stream `{stream}`")]
    StreamMismatch {
        table: String,
        table_stream: String,
        stream: String,
    },

    /// `streams` on a table of a single-stream application.
    #[error(
        "lease table `{table}` is a single-stream application's (lease `{lease_key}` names no \
         stream): `streams` reads multi-stream tables; use `leases`"
    )]
    NotMultiStream { table: String, lease_key: String },

    /// The lease's owner renewed it while kcl-admin watched: a live worker holds it.
    #[error(
        "lease `{lease_key}` is owned by `{owner}`, which renewed it within {} (a live worker): \
         refused; stop that worker, or use --force",
        human_duration(*observed)
    )]
    OwnedByLiveWorker {
        lease_key: String,
        owner: String,
        observed: Duration,
    },

    /// The lease is owned and `--observe 0` skipped the watch: whether its owner lives is
    /// unknown, so it counts as alive.
    #[error(
        "lease `{lease_key}` is owned by `{owner}` and was not watched (--observe 0), so its \
         owner may be alive: refused; watch it (--observe), or use --force"
    )]
    OwnerNotWatched { lease_key: String, owner: String },

    /// The shard was processed to its end; its children may have started from it.
    #[error(
        "lease `{lease_key}` is finished (SHARD_END): its children may already be processed; \
         refused; use --force to rewrite it anyway"
    )]
    LeaseFinished { lease_key: String },

    /// Leases of the table are held by live workers.
    #[error(
        "{} lease(s) of table `{table}` renewed within {} by live workers ({}): refused; stop \
         the workers first, or use --force",
        active.len(),
        human_duration(*observed),
        active.join(", ")
    )]
    LeasesActive {
        table: String,
        /// `lease (owner)` of each active lease.
        active: Vec<String>,
        observed: Duration,
    },

    /// The deletion was not confirmed.
    #[error("deleting lease table `{table}` was not confirmed: {reason}")]
    ConfirmationDeclined { table: String, reason: String },

    /// Some of a worker's leases were not released (the report lists each).
    #[error(
        "{refused} lease(s) of `{worker}` refused and {changed} changed meanwhile; the others \
         were released"
    )]
    ReleaseIncomplete {
        worker: String,
        refused: usize,
        changed: usize,
    },

    /// The lease changed between the read and a conditional write: nothing was written by
    /// that write. Not retried: what was decided on the read may no longer hold.
    #[error(
        "lease `{lease_key}` changed while kcl-admin looked: the {operation} expected {}, found \
         {}; nothing was written by it: look again and decide",
        fence_text(expected),
        current.as_deref().map_or_else(|| "no lease".to_owned(), |l| fence_text(&l.fence()))
    )]
    ChangedMeanwhile {
        lease_key: String,
        operation: &'static str,
        expected: LeaseFence,
        current: Option<Box<Lease>>,
    },

    /// A write after kcl-admin took the lease failed: the lease stays owned by kcl-admin, which
    /// never renews it, so a worker takes it once it expires (one lease duration).
    #[error(
        "lease `{lease_key}`: after the {written}, the next write failed; the lease stays owned \
         by `{owner}` until it expires, then a worker takes it from its checkpoint ({checkpoint})"
    )]
    Interrupted {
        lease_key: String,
        written: String,
        owner: String,
        checkpoint: String,
        #[source]
        source: Box<AdminError>,
    },

    /// The stream has no enhanced fan-out consumer of this name or ARN.
    #[error("enhanced fan-out consumer `{consumer}` does not exist")]
    ConsumerMissing {
        consumer: String,
        #[source]
        source: Option<BoxError>,
    },

    /// A consumer's deregistration was not confirmed.
    #[error("deregistering consumer `{consumer}` was not confirmed: {reason}")]
    DeregistrationNotConfirmed { consumer: String, reason: String },

    /// An AWS call failed; the source says what the service answered.
    #[error("{operation} failed")]
    Aws {
        operation: &'static str,
        #[source]
        source: BoxError,
    },

    /// A repair failed (see [`RepairError`]).
    #[error(transparent)]
    Repair(RepairError),

    /// DeleteTable was accepted but the table did not go away in time.
    #[error("lease table `{table}` still exists {} after DeleteTable", human_duration(*waited))]
    DeleteTimedOut { table: String, waited: Duration },

    /// Reading the confirmation or writing the output failed.
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn fence_text(fence: &LeaseFence) -> String {
    match &fence.owner {
        Some(owner) => format!("owner `{owner}` at counter {}", fence.counter),
        None => format!("no owner at counter {}", fence.counter),
    }
}

impl AdminError {
    /// The process exit code for this error (see the binary's documentation).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            AdminError::TableMissing { .. }
            | AdminError::LeaseMissing { .. }
            | AdminError::StreamMissing { .. }
            | AdminError::ShardMissing { .. }
            | AdminError::WorkerOwnsNoLease { .. }
            | AdminError::ConsumerMissing { .. }
            | AdminError::SequenceNumberNotInShard { .. } => EXIT_NOT_FOUND,
            AdminError::BadSequenceNumber { .. }
            | AdminError::StreamRequired { .. }
            | AdminError::StreamMismatch { .. }
            | AdminError::NotMultiStream { .. } => EXIT_USAGE,
            AdminError::OwnedByLiveWorker { .. }
            | AdminError::OwnerNotWatched { .. }
            | AdminError::LeaseFinished { .. }
            | AdminError::LeasesActive { .. }
            | AdminError::ConfirmationDeclined { .. }
            | AdminError::DeregistrationNotConfirmed { .. } => EXIT_REFUSED,
            AdminError::ReleaseIncomplete { refused, .. } if *refused > 0 => EXIT_REFUSED,
            AdminError::ReleaseIncomplete { .. } | AdminError::ChangedMeanwhile { .. } => {
                EXIT_CHANGED
            }
            AdminError::Interrupted { source, .. } => source.exit_code(),
            AdminError::Repair(e) => match e {
                RepairError::NotFound { .. } => EXIT_NOT_FOUND,
                RepairError::Changed { .. } => EXIT_CHANGED,
                RepairError::CheckpointNeeded { .. }
                | RepairError::CheckpointNotNeeded { .. }
                | RepairError::UnknownParents { .. } => EXIT_REFUSED,
                RepairError::Store(kcl_core::Error::LeaseTableNotFound { .. }) => EXIT_NOT_FOUND,
                _ => EXIT_FAILURE,
            },
            AdminError::InvalidLease { .. }
            | AdminError::Aws { .. }
            | AdminError::DeleteTimedOut { .. }
            | AdminError::Io { .. } => EXIT_FAILURE,
        }
    }

    /// A lease-table error of `operation`, with a missing table told apart.
    pub(crate) fn lease_store(operation: &'static str, error: kcl_core::Error) -> Self {
        match error {
            kcl_core::Error::LeaseTableNotFound { table, source } => {
                AdminError::TableMissing { table, source }
            }
            other => AdminError::Aws {
                operation,
                source: other.into(),
            },
        }
    }

    /// A Kinesis error of `operation`, with a missing stream told apart.
    pub(crate) fn kinesis(operation: &'static str, error: kcl_core::Error) -> Self {
        match error {
            kcl_core::Error::StreamNotFound { stream, source } => {
                AdminError::StreamMissing { stream, source }
            }
            other => AdminError::Aws {
                operation,
                source: other.into(),
            },
        }
    }
}
