//! Fault injection around a stream client or a lease store.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{injected, lock};
use crate::error::{Error, Result, Service};
use crate::lease::{
    Lease, LeaseCreation, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate, LineageGuard,
};
use crate::published::Published;
use crate::stream::{RecordsPage, Shard, StartingPosition, StreamClient};
use crate::stream_identity::StreamIdentity;
use crate::subscription::{ShardSubscription, StreamConsumer, SubscriptionEvent};

/// What a [`Faulty`] wrapper does to the calls going through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fault {
    /// Calls go through.
    #[default]
    None,
    /// Calls fail at once with a transient error.
    Fail,
    /// Calls fail at once as throttled.
    Throttle,
    /// Calls never answer (a network stall, or a paused process).
    Stall,
    /// Calls wait until the fault ends, like [`Fault::Stall`], but lease writes are then
    /// delivered even when their caller stopped waiting: a request already on the wire when the
    /// process paused, or a write that timed out at the client and still lands. Only the
    /// conditions on the lease items stand between such a late write and the new owner.
    Hold,
}

/// A kind of lease-store call, to pick the one [`Faulty::hang_next`] makes hang.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseCall {
    /// `update_lease` with this operation, as [`LeaseUpdate::operation`] names it (`"renew"`,
    /// `"checkpoint"`, `"take"`, `"release"`, ...).
    Update(&'static str),
    /// `list_leases`.
    Scan,
    /// `get_lease` or `get_leases`.
    Get,
    /// `create_lease_if_absent` or `create_lease_in_lineage`.
    Create,
    /// `delete_lease`.
    Delete,
}

/// What a call made to hang by [`Faulty::hang_next`] did before it stopped answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hang {
    /// The request never reached the store (a dead pooled connection): nothing is applied.
    Lost,
    /// The store applied the call, but its answer never comes back.
    AnswerLost,
}

/// Wraps a [`StreamClient`] or a [`LeaseStore`] of one worker and injects faults into its calls,
/// switchable at any time: one worker can be cut off while the others run on. The fan-out
/// subscriptions opened through it are cut off too: a stall holds their events, a failure
/// ends them (as a reset connection).
#[derive(Debug)]
pub struct Faulty<T: ?Sized> {
    inner: std::sync::Arc<T>,
    /// Stalled calls wait on this; they wake in a fixed order, so simulations replay.
    fault: std::sync::Arc<Published<Fault>>,
    /// Lease-store calls still to hang, each once, in the order they were asked for.
    hangs: Mutex<Vec<(LeaseCall, Hang)>>,
    hung: AtomicUsize,
    /// The calls that hung, with when (Tokio time), in order.
    met: Mutex<Vec<(LeaseCall, Instant)>>,
}

impl<T: ?Sized> Faulty<T> {
    /// No fault until [`Faulty::set`] says otherwise.
    pub fn new(inner: std::sync::Arc<T>) -> Self {
        Faulty {
            inner,
            fault: std::sync::Arc::new(Published::new(Fault::None)),
            hangs: Mutex::new(Vec::new()),
            hung: AtomicUsize::new(0),
            met: Mutex::new(Vec::new()),
        }
    }

    /// The next lease-store call of this kind never answers: it hangs until its caller stops
    /// waiting (the worker's request timeout, or a lease running out), while every other call
    /// goes through. This is one request stuck on a dead connection, not an outage (for that,
    /// see [`Fault::Stall`]). `hang` says whether the store applied it first.
    pub fn hang_next(&self, call: LeaseCall, hang: Hang) {
        lock(&self.hangs).push((call, hang));
    }

    /// How many calls were made to hang so far.
    pub fn hung_calls(&self) -> usize {
        self.hung.load(Ordering::SeqCst)
    }

    /// The calls made to hang so far, each with when it started hanging (Tokio time), in
    /// order. Hangs asked for one at a time may meet consecutive calls (a worker holding no
    /// lease renews nothing until it takes one): a checker needs to know when they struck.
    pub fn hangs_met(&self) -> Vec<(LeaseCall, Instant)> {
        lock(&self.met).clone()
    }

    /// Whether this call is one to hang (consuming the request if so).
    fn hang_for(&self, call: &LeaseCall) -> Option<Hang> {
        let mut hangs = lock(&self.hangs);
        let i = hangs.iter().position(|(c, _)| c == call)?;
        lock(&self.met).push((call.clone(), Instant::now()));
        Some(hangs.remove(i).1)
    }

    /// Runs `call` if the hang applies it, then never answers.
    async fn hang<R>(&self, hang: Hang, call: impl Future<Output = Result<R>>) -> Result<R> {
        self.hung.fetch_add(1, Ordering::SeqCst);
        if hang == Hang::AnswerLost {
            let _ = call.await;
        }
        std::future::pending().await
    }

    /// Sets the fault for the calls from now on. Ending a stall lets the stalled calls go on,
    /// meeting whatever fault is set then.
    pub fn set(&self, fault: Fault) {
        self.fault.set(fault);
    }

    async fn gate(&self, service: Service, operation: &'static str) -> Result<()> {
        let now = self
            .fault
            .wait_for(|f| !matches!(f, Fault::Stall | Fault::Hold))
            .await;
        match *now {
            Fault::Fail => Err(injected(service, operation)),
            Fault::Throttle => Err(Error::Throttled {
                service,
                operation,
                source: "injected throttling".into(),
            }),
            Fault::None | Fault::Stall | Fault::Hold => Ok(()),
        }
    }

    fn holding(&self) -> bool {
        *self.fault.get() == Fault::Hold
    }

    /// Runs a held write on a task of its own once the hold ends, whether or not the caller
    /// still waits for the answer.
    async fn deliver_later<R: Send + 'static>(
        &self,
        operation: &'static str,
        write: impl Future<Output = Result<R>> + Send + 'static,
    ) -> Result<R> {
        let fault = self.fault.clone();
        let delivery = tokio::spawn(async move {
            fault.wait_for(|f| *f != Fault::Hold).await;
            write.await
        });
        delivery
            .await
            .unwrap_or_else(|_| Err(injected(Service::LeaseStore, operation)))
    }
}

#[async_trait]
impl<T: StreamClient + ?Sized> StreamClient for Faulty<T> {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }
    async fn list_shards(&self) -> Result<Vec<Shard>> {
        self.gate(Service::Kinesis, "ListShards").await?;
        self.inner.list_shards().await
    }
    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String> {
        self.gate(Service::Kinesis, "GetShardIterator").await?;
        self.inner.get_shard_iterator(shard_id, position).await
    }
    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        self.gate(Service::Kinesis, "GetRecords").await?;
        self.inner
            .get_records(shard_id, shard_iterator, limit)
            .await
    }
    async fn stream_identity(&self) -> Result<StreamIdentity> {
        self.gate(Service::Kinesis, "DescribeStreamSummary").await?;
        self.inner.stream_identity().await
    }
    async fn describe_stream_consumer(&self, consumer: &str) -> Result<Option<StreamConsumer>> {
        self.gate(Service::Kinesis, "DescribeStreamConsumer")
            .await?;
        self.inner.describe_stream_consumer(consumer).await
    }
    async fn register_stream_consumer(&self, name: &str) -> Result<StreamConsumer> {
        self.gate(Service::Kinesis, "RegisterStreamConsumer")
            .await?;
        self.inner.register_stream_consumer(name).await
    }
    // The subscription's events go through the fault too: see `FaultySubscription`.
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<Box<dyn ShardSubscription>> {
        self.gate(Service::Kinesis, SUBSCRIBE).await?;
        let inner = self
            .inner
            .subscribe_to_shard(consumer_arn, shard_id, position)
            .await?;
        Ok(Box::new(FaultySubscription {
            inner: Some(inner),
            fault: self.fault.clone(),
        }))
    }
}

const SUBSCRIBE: &str = "SubscribeToShard";

/// A subscription opened through a [`Faulty`] stream client, cut off with it: while the
/// fault is [`Fault::Stall`] or [`Fault::Hold`] an event is held until the fault ends; at
/// [`Fault::Fail`] the wait for an event (a current one too) fails as a reset connection, and
/// the subscription is over (closed at the server). [`Fault::Throttle`] concerns calls only.
#[derive(Debug)]
struct FaultySubscription {
    /// `None` once failed.
    inner: Option<Box<dyn ShardSubscription>>,
    fault: std::sync::Arc<Published<Fault>>,
}

#[async_trait]
impl ShardSubscription for FaultySubscription {
    async fn next_event(&mut self) -> Result<Option<SubscriptionEvent>> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(None);
        };
        // Biased: the default random branch order would make runs differ. Waiting for an
        // event is cancel-safe (the trait's contract), so a failure may cut it short.
        let answer = tokio::select! {
            biased;
            _ = self.fault.wait_for(|f| *f == Fault::Fail) => None,
            answer = inner.next_event() => Some(answer),
        };
        let now = self
            .fault
            .wait_for(|f| !matches!(f, Fault::Stall | Fault::Hold))
            .await;
        match answer {
            Some(answer) if *now != Fault::Fail => answer,
            _ => {
                self.inner = None;
                Err(injected(Service::Kinesis, SUBSCRIBE))
            }
        }
    }
}

#[async_trait]
impl<T: LeaseStore + ?Sized + 'static> LeaseStore for Faulty<T> {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }
    async fn initialize(&self) -> Result<()> {
        self.gate(Service::LeaseStore, "DescribeTable").await?;
        self.inner.initialize().await
    }
    async fn list_leases(&self) -> Result<LeaseScan> {
        self.gate(Service::LeaseStore, "Scan").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Scan) {
            return self.hang(hang, self.inner.list_leases()).await;
        }
        self.inner.list_leases().await
    }
    async fn list_leases_eventually_consistent(&self) -> Result<LeaseScan> {
        self.gate(Service::LeaseStore, "Scan").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Scan) {
            return self
                .hang(hang, self.inner.list_leases_eventually_consistent())
                .await;
        }
        self.inner.list_leases_eventually_consistent().await
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        self.gate(Service::LeaseStore, "GetItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Get) {
            return self.hang(hang, self.inner.get_lease(lease_key)).await;
        }
        self.inner.get_lease(lease_key).await
    }
    async fn get_leases(&self, lease_keys: &[String]) -> Result<LeaseScan> {
        self.gate(Service::LeaseStore, "BatchGetItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Get) {
            return self.hang(hang, self.inner.get_leases(lease_keys)).await;
        }
        self.inner.get_leases(lease_keys).await
    }
    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        if self.holding() {
            let (inner, lease) = (self.inner.clone(), lease.clone());
            let write = async move { inner.create_lease_if_absent(&lease).await };
            return self.deliver_later("PutItem", write).await;
        }
        self.gate(Service::LeaseStore, "PutItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Create) {
            return self
                .hang(hang, self.inner.create_lease_if_absent(lease))
                .await;
        }
        self.inner.create_lease_if_absent(lease).await
    }
    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        if self.holding() {
            let (inner, lease, guard) = (self.inner.clone(), lease.clone(), guard.clone());
            let write = async move { inner.create_lease_in_lineage(&lease, &guard).await };
            return self.deliver_later("TransactWriteItems", write).await;
        }
        self.gate(Service::LeaseStore, "TransactWriteItems").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Create) {
            return self
                .hang(hang, self.inner.create_lease_in_lineage(lease, guard))
                .await;
        }
        self.inner.create_lease_in_lineage(lease, guard).await
    }
    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        if self.holding() {
            let (inner, key, fence, update) = (
                self.inner.clone(),
                lease_key.to_owned(),
                fence.clone(),
                update.clone(),
            );
            let write = async move { inner.update_lease(&key, &fence, &update).await };
            return self.deliver_later("UpdateItem", write).await;
        }
        self.gate(Service::LeaseStore, "UpdateItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Update(update.operation())) {
            return self
                .hang(hang, self.inner.update_lease(lease_key, fence, update))
                .await;
        }
        self.inner.update_lease(lease_key, fence, update).await
    }
    fn usage(&self) -> Option<&crate::LeaseTableUsage> {
        self.inner.usage()
    }

    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        if self.holding() {
            let (inner, key, fence) = (self.inner.clone(), lease_key.to_owned(), fence.clone());
            let write = async move { inner.delete_lease(&key, &fence).await };
            return self.deliver_later("DeleteItem", write).await;
        }
        self.gate(Service::LeaseStore, "DeleteItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Delete) {
            return self
                .hang(hang, self.inner.delete_lease(lease_key, fence))
                .await;
        }
        self.inner.delete_lease(lease_key, fence).await
    }
}
