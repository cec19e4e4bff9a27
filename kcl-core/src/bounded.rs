//! The worker's edge around the clients it is given: time limits on every call to Kinesis and
//! the lease store, and a vanished lease table reported to the worker.
//!
//! No call can stall the worker: a call that
//! does not answer in time fails with [`Error::Timeout`], which [`Error::kind`] classifies as
//! transient, and the caller's usual retry applies. A timed-out conditional write may still
//! have been applied; the next write on that lease then finds the counter moved under its own
//! name and adopts it (see [`crate::lease`]).
//!
//! A lease table that is gone (deleted under running workers, or a DynamoDB endpoint replaced)
//! takes every lease with it, whichever call finds out: that call raises
//! [`Error::LeaseTableNotFound`] to the worker ([`Fatal`]), which stops delivering and ends.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result, Service};
use crate::fatal::Fatal;
use crate::lease::{
    Lease, LeaseCreation, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate, LineageGuard,
};
use crate::stream::{RecordsPage, Shard, StartingPosition, StreamClient};
use crate::stream_identity::StreamIdentity;
use crate::subscription::{ShardSubscription, StreamConsumer};

async fn bounded<T>(
    service: Service,
    operation: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(Error::Timeout {
            service,
            operation,
            timeout,
        }))
}

/// A [`StreamClient`] whose calls fail with [`Error::Timeout`] after `timeout`.
#[derive(Debug)]
pub(crate) struct BoundedStream {
    pub(crate) inner: Arc<dyn StreamClient>,
    pub(crate) timeout: Duration,
}

#[async_trait]
impl StreamClient for BoundedStream {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }

    async fn list_shards(&self) -> Result<Vec<Shard>> {
        bounded(
            Service::Kinesis,
            "ListShards",
            self.timeout,
            self.inner.list_shards(),
        )
        .await
    }

    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String> {
        bounded(
            Service::Kinesis,
            "GetShardIterator",
            self.timeout,
            self.inner.get_shard_iterator(shard_id, position),
        )
        .await
    }

    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        bounded(
            Service::Kinesis,
            "GetRecords",
            self.timeout,
            self.inner.get_records(shard_id, shard_iterator, limit),
        )
        .await
    }

    async fn stream_identity(&self) -> Result<StreamIdentity> {
        bounded(
            Service::Kinesis,
            "DescribeStreamSummary",
            self.timeout,
            self.inner.stream_identity(),
        )
        .await
    }

    async fn describe_stream_consumer(&self, consumer: &str) -> Result<Option<StreamConsumer>> {
        bounded(
            Service::Kinesis,
            "DescribeStreamConsumer",
            self.timeout,
            self.inner.describe_stream_consumer(consumer),
        )
        .await
    }

    async fn register_stream_consumer(&self, name: &str) -> Result<StreamConsumer> {
        bounded(
            Service::Kinesis,
            "RegisterStreamConsumer",
            self.timeout,
            self.inner.register_stream_consumer(name),
        )
        .await
    }

    /// Bounds the subscribe call; the events that follow are bounded by the reader.
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<Box<dyn ShardSubscription>> {
        bounded(
            Service::Kinesis,
            "SubscribeToShard",
            self.timeout,
            self.inner
                .subscribe_to_shard(consumer_arn, shard_id, position),
        )
        .await
    }
}

/// When the worker last heard from the lease table: any answer, a refused condition or a
/// throttle included, shows the table is reachable; a timeout or a failed connection does not.
/// Readiness checks (`kcl-consumer`'s `/readyz`) compare it with the lease duration.
#[derive(Debug, Default)]
pub(crate) struct LeaseTableContact {
    last: Mutex<Option<tokio::time::Instant>>,
}

impl LeaseTableContact {
    fn reached(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
    }

    pub(crate) fn last_reached(&self) -> Option<tokio::time::Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a lease-table call ended, for [`metrics::LEASE_TABLE_CALLS`](crate::metrics) and
/// [`LeaseTableContact`]: `(outcome label, the table answered)`.
fn call_outcome<T>(result: &Result<T>) -> (&'static str, bool) {
    match result {
        Ok(_) => ("ok", true),
        Err(Error::Timeout { .. }) => ("timeout", false),
        Err(e) => match e.kind() {
            crate::ErrorKind::ConditionFailed => ("condition_failed", true),
            crate::ErrorKind::Throttled => ("throttled", true),
            crate::ErrorKind::Transient => ("error", false),
            // A refused update or an item that does not decode: the table answered.
            crate::ErrorKind::Fatal => (
                "error",
                !matches!(e, Error::LeaseTableNotFound { .. } | Error::Service { .. }),
            ),
        },
    }
}

/// A [`LeaseStore`] whose calls fail with [`Error::Timeout`] after `timeout`, reads of many
/// leases after `scan_timeout` (table set-up, which may wait minutes for a new table,
/// excepted), which raises a missing table to `fatal`, and counts every call.
#[derive(Debug)]
pub(crate) struct BoundedLeaseStore {
    pub(crate) inner: Arc<dyn LeaseStore>,
    pub(crate) timeout: Duration,
    pub(crate) scan_timeout: Duration,
    pub(crate) fatal: Arc<Fatal>,
    pub(crate) contact: Arc<LeaseTableContact>,
}

impl BoundedLeaseStore {
    async fn call<T>(
        &self,
        operation: &'static str,
        timeout: Duration,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let result = bounded(Service::LeaseStore, operation, timeout, call).await;
        let (outcome, answered) = call_outcome(&result);
        if answered {
            self.contact.reached();
        }
        crate::metrics::lease_table_call(operation, outcome);
        if let Err(Error::LeaseTableNotFound { table, source }) = &result {
            // The caller keeps the error; the worker gets a copy, its cause as text.
            let source = source.as_deref().map(|cause| -> crate::error::BoxError {
                crate::ErrorChain(cause).to_string().into()
            });
            self.fatal.raise(Error::LeaseTableNotFound {
                table: table.clone(),
                source,
            });
        }
        result
    }
}

#[async_trait]
impl LeaseStore for BoundedLeaseStore {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }

    async fn initialize(&self) -> Result<()> {
        self.inner.initialize().await
    }

    async fn list_leases(&self) -> Result<LeaseScan> {
        self.call("Scan", self.scan_timeout, self.inner.list_leases())
            .await
    }

    async fn list_leases_eventually_consistent(&self) -> Result<LeaseScan> {
        self.call(
            "Scan",
            self.scan_timeout,
            self.inner.list_leases_eventually_consistent(),
        )
        .await
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        self.call("GetItem", self.timeout, self.inner.get_lease(lease_key))
            .await
    }

    async fn get_leases(&self, lease_keys: &[String]) -> Result<LeaseScan> {
        self.call(
            "BatchGetItem",
            self.scan_timeout,
            self.inner.get_leases(lease_keys),
        )
        .await
    }

    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        self.call(
            "PutItem",
            self.timeout,
            self.inner.create_lease_if_absent(lease),
        )
        .await
    }

    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        self.call(
            "TransactWriteItems",
            self.timeout,
            self.inner.create_lease_in_lineage(lease, guard),
        )
        .await
    }

    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        self.call(
            "UpdateItem",
            self.timeout,
            self.inner.update_lease(lease_key, fence, update),
        )
        .await
    }

    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        self.call(
            "DeleteItem",
            self.timeout,
            self.inner.delete_lease(lease_key, fence),
        )
        .await
    }

    fn usage(&self) -> Option<&crate::LeaseTableUsage> {
        self.inner.usage()
    }
}
