#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links, rustdoc::bare_urls)]
#![warn(missing_docs)]

mod aggregation;
#[cfg(feature = "kinesis")]
mod aws;
mod backoff;
mod bounded;
mod checkpoint;
mod config;
mod consumer;
mod counters;
mod error;
mod fatal;
mod invalid_items;
#[cfg(feature = "kinesis")]
mod kinesis;
mod lease;
pub mod metrics;
mod processor;
mod published;
mod sequence;
mod shard_sync;
mod stream;
mod stream_identity;
mod stream_sync_schedule;
mod stream_tracker;
mod subscription;
#[cfg(feature = "test-util")]
pub mod testing;
mod worker;

pub use aggregation::user_records;
#[cfg(feature = "kinesis")]
pub use aws::AwsSdkError;
pub use checkpoint::Checkpointer;
pub use config::{
    ConsumerRef, FanOutConfig, InitialPosition, LeaseConfig, MAX_SETTING_DURATION,
    MIN_SUBSCRIBE_BACKOFF, MultiStreamConfig, PollingConfig, ProcessingConfig, Retrieval,
    RetryConfig, Watchers, WorkerConfig,
};
pub use error::{BoxError, Error, ErrorChain, ErrorKind, Result, Service};
#[cfg(feature = "kinesis")]
pub use kinesis::{KinesisStreamClient, KinesisStreamClients, StreamsByPrefix};
pub use lease::usage::{CapacityUnits, LeaseTableUsage, OperationUsage};
pub use lease::watch::{WATCHER_SLOT_PREFIX, is_watcher_slot};
pub use lease::{
    Lease, LeaseCreation, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate, LineageGuard,
};
pub use metrics::MetricsConfig;
pub use processor::{PerStream, RecordProcessor, RecordProcessorFactory, ShardContext};
pub use sequence::{Checkpoint, ExtendedSequenceNumber, SequenceNumber};
pub use stream::{
    ChildShard, HashKeyRange, Record, RecordsPage, Shard, StartingPosition, StreamClient,
};
pub use stream_identity::{MultiStreamLeaseKey, StreamIdentity};
pub use stream_sync_schedule::SyncSchedule;
pub use stream_tracker::{
    FixedStreams, FormerStreams, LeasedStream, StreamClients, StreamConfig, StreamTracker,
    TrackerFn,
};
pub use subscription::{ConsumerStatus, ShardSubscription, StreamConsumer, SubscriptionEvent};
pub use worker::{StreamsStatus, Worker, WorkerStatus};

/// Re-exported so processors need no direct dependency to implement the trait.
pub use async_trait::async_trait;
/// Re-exported: the type of [`Record::data`].
pub use bytes::Bytes;
/// Re-exported: [`Worker::run`] takes one to know when to shut down.
pub use tokio_util::sync::CancellationToken;
