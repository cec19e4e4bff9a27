//! The crate's one error type and the retry classification of its variants.

use std::fmt;
use std::time::Duration;

use crate::lease::Lease;
use crate::sequence::{Checkpoint, ExtendedSequenceNumber};

/// A boxed error from a lower layer (the AWS SDK, a user's record processor).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The backing service an operation was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Service {
    /// The Kinesis data stream (or a [`StreamClient`](crate::StreamClient) standing in for it).
    Kinesis,
    /// The lease store (DynamoDB, or a [`LeaseStore`](crate::LeaseStore) standing in for it).
    LeaseStore,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Kinesis => "Kinesis",
            Service::LeaseStore => "lease store",
        })
    }
}

/// How a caller should react to an error. See [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// May succeed when retried after a short backoff: network failures, timeouts, 5xx answers,
    /// an expired shard iterator (after getting a new one).
    Transient,
    /// The service asked the caller to slow down: retry with a longer backoff.
    Throttled,
    /// A conditional lease write found the lease changed: another worker took it, or it was
    /// deleted. Retrying the same write cannot succeed; the lease must be treated as lost.
    /// (An update refused by its own precondition on a lease still held,
    /// [`Error::LeaseUpdateRejected`], is not this: that lease is not lost.)
    ConditionFailed,
    /// Retrying the same request cannot help: bad input, missing resources, permissions.
    Fatal,
}

/// Everything that can go wrong in the Kinesis Client Library.
///
/// Variants carry the names needed to act on them (stream, shard, table, lease key, attribute).
/// Use [`Error::kind`] to decide whether to retry; it is the only place that classifies errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or out of range.
    #[error("invalid configuration: `{field}` {problem}")]
    InvalidConfig {
        /// The configuration field, as named in the config struct.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// The stream does not exist (or is not visible with these credentials).
    #[error("stream `{stream}` does not exist")]
    StreamNotFound {
        /// Stream name or ARN, as configured.
        stream: String,
        /// What the service answered, when it said so (Kinesis `ResourceNotFoundException`).
        #[source]
        source: Option<BoxError>,
    },

    /// A shard does not exist (any more): it was trimmed after the retention period, or the id
    /// is wrong.
    #[error("shard `{shard_id}` of stream `{stream}` does not exist")]
    ShardNotFound {
        /// Stream name or ARN, as configured.
        stream: String,
        /// The shard.
        shard_id: String,
        /// What the service answered, when it said so.
        #[source]
        source: Option<BoxError>,
    },

    /// A shard iterator expired (they live five minutes); get a new one and retry.
    #[error("the shard iterator of shard `{shard_id}` expired")]
    ExpiredIterator {
        /// The shard the iterator belonged to.
        shard_id: String,
        /// What the service answered, when it said so.
        #[source]
        source: Option<BoxError>,
    },

    /// The service throttled the request (Kinesis `ProvisionedThroughputExceeded` or
    /// `LimitExceeded`, DynamoDB `ProvisionedThroughputExceeded`, `RequestLimitExceeded`,
    /// `ThrottlingException`).
    #[error("{service} {operation} was throttled")]
    Throttled {
        /// Which service throttled.
        service: Service,
        /// The API operation, e.g. `GetRecords`.
        operation: &'static str,
        /// The error the SDK returned.
        #[source]
        source: BoxError,
    },

    /// The resource is busy (Kinesis `ResourceInUseException`): a consumer being registered
    /// by another worker, or a shard subscription still open for this consumer (just after a
    /// handoff the old one lingers up to 5 s). Retry after a backoff of at least a second.
    #[error("{service} {operation}: the resource is in use")]
    ResourceInUse {
        /// Which service answered.
        service: Service,
        /// The API operation, e.g. `SubscribeToShard`.
        operation: &'static str,
        /// The error the SDK returned.
        #[source]
        source: BoxError,
    },

    /// The enhanced fan-out consumer did not become `ACTIVE` in time, or the ARN configured
    /// names no consumer.
    #[error("enhanced fan-out consumer `{consumer}` is not active ({status}) after {waited:?}")]
    ConsumerNotActive {
        /// The consumer's name or ARN, as configured.
        consumer: String,
        /// Its status when last described (`not found` for an ARN that names nothing,
        /// `unknown` when it could not be described at all).
        status: String,
        /// How long the worker waited (`retrieval.registration_timeout`).
        waited: std::time::Duration,
        /// The error of the last describe or register call, when the wait ended on one: the
        /// outage that kept the consumer from being seen active, rather than its last status.
        #[source]
        last_error: Option<BoxError>,
    },

    /// The stream client does not implement an operation (say, enhanced fan-out on a client
    /// that only polls).
    #[error("this stream client does not support {operation}")]
    Unsupported {
        /// The API operation.
        operation: &'static str,
    },

    /// A failure that may go away when retried: network error, timeout, 5xx answer.
    #[error("{service} {operation} failed (transient)")]
    Transient {
        /// Which service failed.
        service: Service,
        /// The API operation.
        operation: &'static str,
        /// The error the SDK returned.
        #[source]
        source: BoxError,
    },

    /// A call did not answer within its timeout.
    #[error("{service} {operation} did not answer within {timeout:?}")]
    Timeout {
        /// Which service was called.
        service: Service,
        /// The API operation.
        operation: &'static str,
        /// The timeout that elapsed.
        timeout: Duration,
    },

    /// A service rejected a request in a way retrying cannot fix (validation, permissions, ...).
    #[error("{service} {operation} failed")]
    Service {
        /// Which service rejected the request.
        service: Service,
        /// The API operation.
        operation: &'static str,
        /// The error the SDK returned.
        #[source]
        source: BoxError,
    },

    /// A conditional lease write found the lease in another state than expected: another worker
    /// took it, renewed it under a new owner, or deleted it.
    #[error("conditional {operation} of lease `{lease_key}` failed: the lease changed")]
    LeaseConditionFailed {
        /// The lease that was written.
        lease_key: String,
        /// The lease operation, e.g. `renew`, `take`, `checkpoint`.
        operation: &'static str,
        /// The lease as stored when the condition failed, when the store reports it and it
        /// could be decoded. `None` when the lease no longer exists.
        current: Option<Box<Lease>>,
    },

    /// A lease update was refused by its own precondition ([`LeaseUpdate::allowed`]) while
    /// the lease is still held by this worker: e.g. a handoff offer on a lease another worker
    /// has already asked for. Nothing was written and the lease is not lost; retrying the same
    /// update cannot succeed while the stored lease stays as it is.
    ///
    /// [`LeaseUpdate::allowed`]: crate::LeaseUpdate::allowed
    #[error(
        "{operation} of lease `{lease_key}` was rejected by its precondition; the lease is still held"
    )]
    LeaseUpdateRejected {
        /// The lease (shard id).
        lease_key: String,
        /// The lease operation, e.g. `handoff request`.
        operation: &'static str,
        /// The lease as stored when the update was refused.
        current: Box<Lease>,
    },

    /// This worker no longer holds the lease: it was taken by another worker, expired, or
    /// released. The shard's processor must stop; checkpoints are rejected.
    #[error("lease `{lease_key}` is no longer held by this worker")]
    LeaseLost {
        /// The lease (shard id).
        lease_key: String,
    },

    /// The lease table does not exist and may not be created.
    #[error("lease table `{table}` does not exist")]
    LeaseTableNotFound {
        /// The table name.
        table: String,
        /// What the store answered, when it said so (DynamoDB's `ResourceNotFoundException`).
        #[source]
        source: Option<BoxError>,
    },

    /// The lease table is used by another stream: a lease in it names a stream other than the
    /// one this worker consumes (the same application name configured for two streams). The
    /// worker refuses it: the two streams' shards share lease keys, so each would read its
    /// stream from the other's checkpoints.
    #[error(
        "lease table `{table}` belongs to stream `{table_stream}`, not to stream `{stream}`: \
         give each stream's consumers their own application name (or lease table name)"
    )]
    LeaseTableOfAnotherStream {
        /// The table name.
        table: String,
        /// The stream the table's leases name.
        table_stream: String,
        /// The stream this worker consumes.
        stream: String,
    },

    /// Another process writes the leases of this worker under the same worker id: the counter
    /// of a lease this worker holds moved by more than this worker's own unanswered writes can
    /// explain. Both processes would process the same shards, so this one stops. Worker ids
    /// must be unique across the fleet.
    #[error(
        "another process is using worker id `{worker_id}`: lease `{lease_key}` moved from counter \
         {expected_counter} to {stored_counter} without a write of this process; give every \
         process its own worker id"
    )]
    DuplicateWorkerId {
        /// The worker id both processes use.
        worker_id: String,
        /// The lease whose counter moved.
        lease_key: String,
        /// The counter this process last wrote.
        expected_counter: u64,
        /// The counter found in the table.
        stored_counter: u64,
    },

    /// The lease table exists with a schema this library cannot use.
    #[error("lease table `{table}` has an unexpected schema: {problem}")]
    LeaseTableSchema {
        /// The table name.
        table: String,
        /// What differs from the expected schema.
        problem: String,
    },

    /// An item of the lease table has a missing or malformed attribute.
    #[error("lease `{lease_key}` in table `{table}`: attribute `{attribute}` {problem}")]
    InvalidLeaseItem {
        /// The table name.
        table: String,
        /// The item's `leaseKey` (or `<missing>` when that attribute itself is bad).
        lease_key: String,
        /// The attribute name, e.g. `leaseCounter`.
        attribute: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// A string that should name a stream of a multi-stream application
    /// (`ACCOUNT:STREAM:CREATION_EPOCH`, or a stream ARN) does not.
    #[error("`{value}` is not a stream identity: {problem}")]
    InvalidStreamIdentity {
        /// The rejected string.
        value: String,
        /// Why it was rejected.
        problem: &'static str,
    },

    /// A lease key that should be a multi-stream one (`ACCOUNT:STREAM:CREATION_EPOCH:SHARD_ID`)
    /// is not.
    #[error("`{key}` is not a multi-stream lease key: {problem}")]
    InvalidLeaseKey {
        /// The rejected key.
        key: String,
        /// Why it was rejected.
        problem: &'static str,
    },

    /// A string that should be a Kinesis sequence number is not one.
    #[error("`{value}` is not a sequence number: {problem}")]
    InvalidSequenceNumber {
        /// The rejected string.
        value: String,
        /// Why it was rejected.
        problem: &'static str,
    },

    /// A checkpoint request is before the shard's last checkpoint.
    #[error("checkpoint {requested} for shard `{shard_id}` is before the last checkpoint {last}")]
    CheckpointBeforeLast {
        /// The shard.
        shard_id: String,
        /// The position the processor asked to checkpoint.
        requested: ExtendedSequenceNumber,
        /// The shard's current checkpoint.
        last: Checkpoint,
    },

    /// A checkpoint request is beyond the highest record delivered to the processor.
    #[error(
        "checkpoint {requested} for shard `{shard_id}` is beyond the highest record delivered ({})",
        highest_delivered.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string)
    )]
    CheckpointBeyondDelivered {
        /// The shard.
        shard_id: String,
        /// The position the processor asked to checkpoint.
        requested: ExtendedSequenceNumber,
        /// The highest record delivered so far, if any.
        highest_delivered: Option<ExtendedSequenceNumber>,
    },

    /// A shard ended, but the processor's checkpoint did not cover every record delivered
    /// (it returned from `shard_ended` without checkpointing, say with records still
    /// buffered). `SHARD_END` is not written; the shard restarts from its checkpoint and the
    /// records after it are delivered again.
    #[error(
        "shard `{shard_id}` ended but its checkpoint ({last_checkpoint}) does not cover the records \
         delivered (up to {}): flush and call `checkpointer.checkpoint()` in `shard_ended`; the \
         shard restarts from its checkpoint",
        highest_delivered.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string)
    )]
    ShardEndNotCheckpointed {
        /// The shard.
        shard_id: String,
        /// The checkpoint the shard restarts from.
        last_checkpoint: Checkpoint,
        /// The highest record delivered.
        highest_delivered: Option<ExtendedSequenceNumber>,
    },

    /// A record processor callback kept failing (or panicked) for a shard.
    #[error(
        "record processor of shard `{shard_id}` failed in `{callback}` after {attempts} attempt(s)"
    )]
    Processor {
        /// The shard.
        shard_id: String,
        /// The callback that failed, e.g. `process_records`.
        callback: &'static str,
        /// How many times it was tried.
        attempts: usize,
        /// The processor's last error.
        #[source]
        source: BoxError,
    },

    /// A worker task ended abnormally (panicked or was cancelled without being asked to).
    #[error("worker task `{task}` failed: {problem}")]
    TaskFailed {
        /// Which task.
        task: String,
        /// What happened.
        problem: String,
    },
}

impl Error {
    /// How to react to this error: the single place where errors are classified for retrying.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Throttled { .. } => ErrorKind::Throttled,
            Error::ResourceInUse { .. } => ErrorKind::Transient,
            Error::Transient { .. } | Error::Timeout { .. } | Error::ExpiredIterator { .. } => {
                ErrorKind::Transient
            }
            Error::LeaseConditionFailed { .. } | Error::LeaseLost { .. } => {
                ErrorKind::ConditionFailed
            }
            Error::InvalidConfig { .. }
            | Error::Unsupported { .. }
            | Error::ConsumerNotActive { .. }
            | Error::StreamNotFound { .. }
            | Error::ShardNotFound { .. }
            | Error::Processor { .. }
            | Error::Service { .. }
            // Not retryable as is, and not a lost lease: the caller decides what the refusal
            // means (a refused handoff offer: the lease goes to the worker that asked first).
            | Error::LeaseUpdateRejected { .. }
            | Error::LeaseTableNotFound { .. }
            | Error::LeaseTableOfAnotherStream { .. }
            | Error::DuplicateWorkerId { .. }
            | Error::LeaseTableSchema { .. }
            | Error::InvalidLeaseItem { .. }
            | Error::InvalidSequenceNumber { .. }
            | Error::InvalidStreamIdentity { .. }
            | Error::InvalidLeaseKey { .. }
            | Error::CheckpointBeforeLast { .. }
            | Error::CheckpointBeyondDelivered { .. }
            | Error::ShardEndNotCheckpointed { .. }
            | Error::TaskFailed { .. } => ErrorKind::Fatal,
        }
    }

    /// The service the error came from: the one whose call failed, Kinesis for what a stream
    /// answered, the lease store for what the lease table holds or refused. `None` for the
    /// worker's own and the processor's errors (configuration, checkpoints, tasks).
    pub fn service(&self) -> Option<Service> {
        match self {
            Error::Throttled { service, .. }
            | Error::ResourceInUse { service, .. }
            | Error::Transient { service, .. }
            | Error::Timeout { service, .. }
            | Error::Service { service, .. } => Some(*service),
            Error::StreamNotFound { .. }
            | Error::ShardNotFound { .. }
            | Error::ExpiredIterator { .. }
            | Error::ConsumerNotActive { .. }
            | Error::Unsupported { .. } => Some(Service::Kinesis),
            Error::LeaseConditionFailed { .. }
            | Error::LeaseUpdateRejected { .. }
            | Error::LeaseLost { .. }
            | Error::LeaseTableNotFound { .. }
            | Error::LeaseTableOfAnotherStream { .. }
            | Error::DuplicateWorkerId { .. }
            | Error::LeaseTableSchema { .. }
            | Error::InvalidLeaseItem { .. }
            | Error::InvalidLeaseKey { .. } => Some(Service::LeaseStore),
            Error::InvalidConfig { .. }
            | Error::InvalidStreamIdentity { .. }
            | Error::InvalidSequenceNumber { .. }
            | Error::CheckpointBeforeLast { .. }
            | Error::CheckpointBeyondDelivered { .. }
            | Error::ShardEndNotCheckpointed { .. }
            | Error::Processor { .. }
            | Error::TaskFailed { .. } => None,
        }
    }

    /// True when retrying after a backoff may succeed ([`ErrorKind::Transient`] or
    /// [`ErrorKind::Throttled`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Transient | ErrorKind::Throttled)
    }

    /// True when the error means this worker holds no lease any more, so nothing may be
    /// written in its name: the lease table is gone, or another process writes as this
    /// worker. A worker stopping on such an error releases nothing.
    pub fn voids_every_lease(&self) -> bool {
        matches!(
            self,
            Error::LeaseTableNotFound { .. } | Error::DuplicateWorkerId { .. }
        )
    }

    pub(crate) fn invalid_config(field: &'static str, problem: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            problem: problem.into(),
        }
    }
}

/// Displays an error followed by its chain of causes, `error: cause: cause of the cause`, so a
/// log line says why and not only what failed: `warn!(error = %ErrorChain(&e), "...")`.
///
/// A cause whose text is already part of what was written is left out: many wrappers (the
/// AWS SDK's among them) repeat their source's message, which would otherwise show twice.
///
/// ```
/// # use kcl_core::{Error, ErrorChain, Service};
/// let e = Error::Transient {
///     service: Service::LeaseStore,
///     operation: "UpdateItem",
///     source: "connection reset".into(),
/// };
/// assert_eq!(
///     ErrorChain(&e).to_string(),
///     "lease store UpdateItem failed (transient): connection reset"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut written = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !written.contains(&text) {
                written.push_str(": ");
                written.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_covers_the_retry_cases() {
        let io = || -> BoxError { "connection reset".into() };
        let throttled = Error::Throttled {
            service: Service::Kinesis,
            operation: "GetRecords",
            source: io(),
        };
        assert_eq!(throttled.kind(), ErrorKind::Throttled);
        assert!(throttled.is_retryable());
        let transient = Error::Transient {
            service: Service::LeaseStore,
            operation: "UpdateItem",
            source: io(),
        };
        assert_eq!(transient.kind(), ErrorKind::Transient);
        let ccf = Error::LeaseConditionFailed {
            lease_key: "shardId-000000000000".into(),
            operation: "renew",
            current: None,
        };
        assert_eq!(ccf.kind(), ErrorKind::ConditionFailed);
        assert!(!ccf.is_retryable());
        let missing = Error::StreamNotFound {
            stream: "orders".into(),
            source: None,
        };
        assert_eq!(missing.kind(), ErrorKind::Fatal);
        assert_eq!(missing.to_string(), "stream `orders` does not exist");

        // Where each came from.
        assert_eq!(throttled.service(), Some(Service::Kinesis));
        assert_eq!(transient.service(), Some(Service::LeaseStore));
        assert_eq!(ccf.service(), Some(Service::LeaseStore));
        assert_eq!(missing.service(), Some(Service::Kinesis));
        let processor = Error::Processor {
            shard_id: "shardId-000000000000".into(),
            callback: "process_records",
            attempts: 3,
            source: io(),
        };
        assert_eq!(processor.service(), None);
    }

    #[test]
    fn invalid_item_names_table_key_and_attribute() {
        let e = Error::InvalidLeaseItem {
            table: "app".into(),
            lease_key: "shardId-000000000001".into(),
            attribute: "leaseCounter",
            problem: "is not a number: \"abc\"".into(),
        };
        let text = e.to_string();
        assert!(text.contains("`app`") && text.contains("shardId-000000000001"));
        assert!(text.contains("leaseCounter"));
    }

    /// An error with a chain of causes, each displaying its own message only.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    fn chain(texts: &[&'static str]) -> Layer {
        let mut layer = None;
        for text in texts.iter().rev() {
            layer = Some(Layer(text, layer.map(Box::new)));
        }
        layer.expect("at least one layer")
    }

    #[test]
    fn an_error_chain_shows_every_cause() {
        let e = Error::Service {
            service: Service::Kinesis,
            operation: "GetShardIterator",
            source: Box::new(chain(&[
                "InvalidArgumentException: Timestamp cannot be in the future",
                "caused here",
            ])),
        };
        assert_eq!(
            ErrorChain(&e).to_string(),
            "Kinesis GetShardIterator failed: InvalidArgumentException: Timestamp cannot be in \
             the future: caused here"
        );
        assert_eq!(ErrorChain(&chain(&["alone"])).to_string(), "alone");
    }

    #[test]
    fn an_error_chain_leaves_out_causes_already_shown() {
        // An SDK-style wrapper repeating its source, an empty cause, and one repeating an
        // earlier layer than the last: each shown once, the order kept.
        let e = chain(&[
            "dispatch failure: io error",
            "io error",
            "",
            "tcp connect error",
            "dispatch failure",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            ErrorChain(&e).to_string(),
            "dispatch failure: io error: tcp connect error: Connection refused (os error 111)"
        );
    }
}
