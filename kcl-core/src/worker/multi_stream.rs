//! The stream sync of a multi-stream worker: one task, owned by the worker's background set
//! like the single-stream shard sync, that
//! - asks the tracker for the streams every `stream_discovery_interval`, resolves the
//!   identity of each new one (`DescribeStreamSummary`) and publishes the set the coordinator
//!   consumes;
//! - syncs each stream's shards with its leases on the [`SyncSchedule`] (spread over the
//!   interval, backing off when throttled), checking first that the stream still has the same
//!   identity: a stream deleted (`ResourceNotFound`) is no longer consumed, and one recreated
//!   under its name is followed as the new stream it is;
//! - deletes the leases of streams that have been missing for the grace period and that no
//!   live worker holds ([`FormerStreams`]).
//!
//! One stream that cannot be reached (throttled, denied, deleted) is logged and retried on its
//! own schedule: it never stops the others. The task ends only when asked to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::fan_out;
use super::streams::{ActiveStream, ActiveStreams, SyncRequests};
use crate::backoff::{SeedSource, retry};
use crate::bounded::BoundedStream;
use crate::config::{Retrieval, WorkerConfig};
use crate::counters::Counters;
use crate::error::{Error, ErrorChain, ErrorKind, Result, Service};
use crate::invalid_items::InvalidItems;
use crate::lease::stream_view::StreamLeases;
use crate::lease::taker::LeaseObservations;
use crate::lease::{LeaseStore, key_prefix};
use crate::shard_sync::ShardSyncer;
use crate::stream::StreamClient;
use crate::stream_identity::{MultiStreamLeaseKey, StreamIdentity};
use crate::stream_sync_schedule::SyncSchedule;
use crate::stream_tracker::{
    FormerStreams, LeasedStream, StreamClients, StreamConfig, StreamTracker,
};

/// Attempts of one stream's identity lookup at discovery.
const IDENTITY_ATTEMPTS: usize = 3;

/// The least time between two `DescribeStreamSummary` calls of a worker (a new stream's
/// lookup, or a sync's identity check): at most 10 a second per worker, half the service's
/// limit of 20 a second per account, however fast the service answers (50 new streams: 5 s),
/// and also when syncs come due together (after one that hung, say). Workers starting
/// together may still meet the limit: a throttled call is retried with backoff.
const LOOKUP_PACE: Duration = Duration::from_millis(100);

/// What the worker hands the stream sync.
pub(super) struct Setup {
    pub(super) tracker: Arc<dyn StreamTracker>,
    pub(super) clients: Arc<dyn StreamClients>,
    pub(super) store: Arc<dyn LeaseStore>,
    pub(super) config: Arc<WorkerConfig>,
    pub(super) seeds: Arc<SeedSource>,
    pub(super) invalid_items: Arc<InvalidItems>,
    /// With watchers: whether this worker watches (only watchers sync on the schedule).
    pub(super) watching: Option<Arc<AtomicBool>>,
    /// Where the streams consumed now are published.
    pub(super) streams: Arc<watch::Sender<Arc<ActiveStreams>>>,
    /// Where what the sync sees of the streams is counted ([`StreamsStatus`]).
    ///
    /// [`StreamsStatus`]: crate::StreamsStatus
    pub(super) counters: Arc<Counters>,
}

/// A stream followed now.
struct Followed {
    /// As the tracker listed it.
    config: StreamConfig,
    active: Arc<ActiveStream>,
    syncer: ShardSyncer,
}

pub(super) struct MultiStreamSync {
    setup: Setup,
    followed: BTreeMap<StreamIdentity, Followed>,
    schedule: SyncSchedule,
    former: FormerStreams,
    /// Counters of the leases seen at the last check for former streams: a lease whose
    /// counter has not moved for a lease duration has no live owner.
    observations: LeaseObservations,
    /// Followed streams whose last identity check or shard sync failed.
    failing: BTreeSet<StreamIdentity>,
    /// Listed streams the last discovery could not look up (throttled, denied, ...).
    lookups_failed: usize,
    /// When this worker may make its next `DescribeStreamSummary` call ([`LOOKUP_PACE`]).
    next_lookup: Instant,
}

/// How a stream is synced.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SyncKind {
    /// Just after discovery found its identity: the shards only.
    First,
    /// On the schedule, or asked for: its identity checked, then the shards.
    Checked,
}

/// What one stream's sync found.
enum Synced {
    Done,
    /// Throttled or failing for now: retried after a backoff. `unreachable` when Kinesis
    /// failed (not the lease table).
    Failed {
        unreachable: bool,
    },
    /// Deleted (`ResourceNotFound`) or recreated under its name (then `Some` new identity).
    Gone(Option<StreamIdentity>),
}

impl MultiStreamSync {
    pub(super) fn new(setup: Setup) -> Self {
        let schedule = SyncSchedule::new(
            setup.config.lease.shard_sync_interval,
            setup.config.lease.retry,
            setup.seeds.next_seed(),
        );
        MultiStreamSync {
            setup,
            followed: BTreeMap::new(),
            schedule,
            former: FormerStreams::new(),
            observations: LeaseObservations::new(),
            failing: BTreeSet::new(),
            lookups_failed: 0,
            next_lookup: Instant::now(),
        }
    }

    /// Syncs on the schedule, asks the tracker every discovery interval, and syncs the
    /// streams the coordinator asks for, until `stop`. Each step may be dropped halfway when
    /// the worker stops: every write is conditional and idempotent (see
    /// [`ShardSyncer::run`]).
    pub(super) async fn run(
        mut self,
        requests: Arc<SyncRequests>,
        stop: CancellationToken,
    ) -> Result<()> {
        let every = self.setup.config.multi_stream.stream_discovery_interval;
        let mut discovery = tokio::time::interval_at(Instant::now() + every, every);
        discovery.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let next_due = self.schedule.next_due();
            let step = async {
                tokio::select! {
                    biased;
                    _ = requests.requested() => {
                        for prefix in requests.take() {
                            if let Some(stream) = self.by_prefix(&prefix) {
                                self.sync_now(&stream, SyncKind::Checked).await;
                            }
                        }
                    }
                    _ = discovery.tick() => self.discover().await,
                    _ = super::sleep_until_some(next_due), if next_due.is_some() => {
                        self.sync_due().await;
                    }
                }
            };
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                () = step => {}
            }
        }
    }

    fn by_prefix(&self, prefix: &str) -> Option<StreamIdentity> {
        self.followed
            .keys()
            .find(|id| key_prefix(&id.lease_key("")) == prefix)
            .cloned()
    }

    /// Refuses a table that holds a single-stream application's leases, before any write:
    /// creating this application's leases there would end that application's workers
    /// ([`Error::LeaseTableOfAnotherStream`]). The taking rounds check every scan after.
    ///
    /// # Errors
    /// [`Error::LeaseTableOfAnotherStream`]; a table that cannot be read after retries.
    pub(super) async fn check_table(&self) -> Result<()> {
        let backoff = self
            .setup
            .config
            .lease
            .retry
            .with_max_attempts(Some(IDENTITY_ATTEMPTS))
            .backoff(self.setup.seeds.next_seed());
        let store = self.setup.store.clone();
        let mut scan = retry("lease scan", backoff, || store.list_leases()).await?;
        scan.take_watcher_slots();
        crate::lease::check_multi_stream(store.table_name(), &scan.leases)
    }

    /// Asks the tracker for the streams, follows the new ones (their first sync at once, so
    /// a new stream gets its leases within one discovery interval) and drops the ones it no
    /// longer lists; then deletes the leases of former streams that are due. A tracker that
    /// fails leaves the streams as they were.
    pub(super) async fn discover(&mut self) {
        let listed = match self.setup.tracker.streams().await {
            Ok(listed) => listed,
            Err(e) => {
                warn!(error = %ErrorChain(&e), "the stream tracker failed; consuming the same streams until the next discovery");
                Counters::add(&self.setup.counters.streams.discovery_failures, 1);
                return;
            }
        };
        let mut names: BTreeSet<&str> = BTreeSet::new();
        let mut kept = BTreeMap::new();
        let mut new = Vec::new();
        let mut lookups_failed = 0usize;
        for config in &listed {
            if !names.insert(config.stream.as_str()) {
                continue;
            }
            if let Some((id, _)) = self
                .followed
                .iter()
                .find(|(_, f)| f.config.stream == config.stream)
            {
                let id = id.clone();
                if let Some(followed) = self.followed.remove(&id) {
                    kept.insert(id, followed);
                }
                continue;
            }
            self.pace_lookup().await;
            let client = self.client(&config.stream);
            let seeds = self.setup.seeds.clone();
            let backoff = self
                .setup
                .config
                .lease
                .retry
                .with_max_attempts(Some(IDENTITY_ATTEMPTS))
                .backoff(seeds.next_seed());
            match retry("DescribeStreamSummary", backoff, || {
                client.stream_identity()
            })
            .await
            {
                Ok(id) if kept.contains_key(&id) => {}
                Ok(id) => match self.follow(config.clone(), id.clone(), client).await {
                    Some(followed) => {
                        kept.insert(id.clone(), followed);
                        new.push(id);
                    }
                    None => continue,
                },
                Err(e @ Error::StreamNotFound { .. }) => {
                    info!(stream = %config.stream, error = %ErrorChain(&e), "a listed stream does not exist; not consuming it");
                }
                Err(e) => {
                    warn!(stream = %config.stream, error = %ErrorChain(&e), "could not look up a listed stream; trying again at the next discovery");
                    lookups_failed += 1;
                }
            }
        }
        for (id, _) in std::mem::take(&mut self.followed) {
            info!(stream = %id, "stream no longer listed by the tracker; stopping its consumers");
        }
        self.followed = kept;
        self.lookups_failed = lookups_failed;
        self.publish();
        for id in new {
            info!(stream = %id, "consuming a new stream");
            self.sync_now(&id, SyncKind::First).await;
        }
        self.delete_former_streams().await;
    }

    /// Waits for this worker's next `DescribeStreamSummary` slot ([`LOOKUP_PACE`]).
    async fn pace_lookup(&mut self) {
        tokio::time::sleep_until(self.next_lookup).await;
        self.next_lookup = Instant::now() + LOOKUP_PACE;
    }

    /// The bounded client of `stream`.
    fn client(&self, stream: &str) -> Arc<dyn StreamClient> {
        Arc::new(BoundedStream {
            inner: self.setup.clients.client(stream),
            timeout: self.setup.config.polling.request_timeout,
        })
    }

    /// Follows `id`: in fan-out mode once its consumer is registered and active (`None`, and
    /// tried again at the next discovery, when that failed).
    async fn follow(
        &self,
        config: StreamConfig,
        id: StreamIdentity,
        client: Arc<dyn StreamClient>,
    ) -> Option<Followed> {
        let setup = &self.setup;
        let consumer_arn = match &setup.config.retrieval {
            Retrieval::FanOut(fan_out) => match fan_out::active_consumer(
                client.as_ref(),
                fan_out,
                &setup.config.application_name,
                &setup.seeds,
            )
            .await
            {
                Ok(arn) => Some(arn.into()),
                Err(e) => {
                    warn!(stream = %id, error = %ErrorChain(&e), "could not register the stream's fan-out consumer; trying again at the next discovery");
                    return None;
                }
            },
            Retrieval::Polling => None,
        };
        let syncer = ShardSyncer {
            stream: client.clone(),
            store: Arc::new(StreamLeases::new(setup.store.clone(), id.clone())),
            stream_name: None,
            initial_position: config.initial_position,
            config: setup.config.clone(),
            seeds: setup.seeds.clone(),
            invalid_items: setup.invalid_items.clone(),
            watching: setup.watching.clone(),
        };
        let active = Arc::new(ActiveStream {
            identity: Some(id.clone()),
            name: id.stream_name().to_owned(),
            initial_position: config.initial_position,
            client,
            consumer_arn,
        });
        Some(Followed {
            config,
            active,
            syncer,
        })
    }

    fn publish(&mut self) {
        let ids: Vec<StreamIdentity> = self.followed.keys().cloned().collect();
        self.failing.retain(|id| self.followed.contains_key(id));
        self.count_streams();
        self.schedule.track(&ids, Instant::now());
        let streams: ActiveStreams = self
            .followed
            .iter()
            .map(|(id, f)| (format!("{id}:"), f.active.clone()))
            .collect();
        self.setup.streams.send_if_modified(|current| {
            let changed = current.keys().ne(streams.keys());
            if changed {
                *current = Arc::new(streams);
            }
            changed
        });
    }

    /// Sets the counts of followed and unreachable streams.
    fn count_streams(&self) {
        let counts = &self.setup.counters.streams;
        Counters::set(&counts.followed, self.followed.len() as u64);
        Counters::set(
            &counts.unreachable,
            (self.failing.len() + self.lookups_failed) as u64,
        );
    }

    /// Syncs the streams due on the schedule. With watchers, only watchers do (a member's
    /// syncs would cost scans and `DescribeStreamSummary` calls for nothing the watchers
    /// miss): a member learns that a stream was deleted or recreated from its consumers'
    /// failures and from the new stream's leases in the table, and checks it then.
    async fn sync_due(&mut self) {
        let now = Instant::now();
        let watching = self
            .setup
            .watching
            .as_ref()
            .is_none_or(|w| w.load(Ordering::SeqCst));
        for id in self.schedule.due(now) {
            if watching {
                self.sync_now(&id, SyncKind::Checked).await;
            } else {
                self.schedule.synced(&id, now);
                // A member does not check the stream: what one of its own syncs found is
                // stale by now (its consumers ask for a sync when the stream fails them).
                if self.failing.remove(&id) {
                    self.count_streams();
                }
            }
        }
    }

    /// Syncs one stream now, and acts on what the sync found.
    async fn sync_now(&mut self, id: &StreamIdentity, kind: SyncKind) {
        let synced = self.sync_stream(id, kind).await;
        let now = Instant::now();
        let changed = match synced {
            Synced::Failed { unreachable: true } => self.failing.insert(id.clone()),
            _ => self.failing.remove(id),
        };
        if changed {
            self.count_streams();
        }
        match synced {
            // A first sync leaves the stream's next one where the schedule spread it.
            Synced::Done if kind == SyncKind::First => {}
            Synced::Done => self.schedule.synced(id, now),
            Synced::Failed { .. } => self.schedule.failed(id, now),
            Synced::Gone(recreated) => {
                let Some(gone) = self.followed.remove(id) else {
                    return;
                };
                match recreated {
                    None => {
                        info!(stream = %id, "stream deleted; stopping its consumers (its leases are deleted after the grace period)")
                    }
                    Some(new_id) => {
                        info!(stream = %id, recreated = %new_id, "stream recreated under its name; consuming the new stream from its start position");
                        if let Some(followed) = self
                            .follow(gone.config, new_id.clone(), gone.active.client.clone())
                            .await
                        {
                            self.followed.insert(new_id.clone(), followed);
                            self.publish();
                            Box::pin(self.sync_now(&new_id, SyncKind::First)).await;
                            return;
                        }
                    }
                }
                self.publish();
            }
        }
    }

    async fn sync_stream(&mut self, id: &StreamIdentity, kind: SyncKind) -> Synced {
        if !self.followed.contains_key(id) {
            return Synced::Done;
        }
        if kind == SyncKind::Checked {
            self.pace_lookup().await;
        }
        let Some(followed) = self.followed.get_mut(id) else {
            return Synced::Done;
        };
        // The stream's name (or ARN) may now name another stream: check before writing
        // leases of its shards under this identity (`ListShards` goes by name too). A first
        // sync follows the lookup that found the identity.
        if kind == SyncKind::Checked {
            match followed.active.client.stream_identity().await {
                Ok(current) if current == *id => {}
                Ok(current) => return Synced::Gone(Some(current)),
                Err(Error::StreamNotFound { .. }) => return Synced::Gone(None),
                Err(e) => {
                    warn!(stream = %id, error = %ErrorChain(&e), "could not check the stream; its sync is retried later");
                    return Synced::Failed { unreachable: true };
                }
            }
        }
        match followed.syncer.sync_once().await {
            Ok(()) => Synced::Done,
            Err(Error::StreamNotFound { .. }) => Synced::Gone(None),
            Err(e) => {
                warn!(stream = %id, error = %ErrorChain(&e), "shard sync failed; retried later");
                Synced::Failed {
                    unreachable: e.service() == Some(Service::Kinesis),
                }
            }
        }
    }

    /// Deletes the leases of streams missing from this worker's list for the grace period
    /// that no live worker holds: a lease is held while its owner's counter moves (the same
    /// observed-counter rule as expiry, never clocks). Each delete is fenced at the version
    /// read, so a lease taken meanwhile is kept.
    async fn delete_former_streams(&mut self) {
        // With watchers only they read the whole table for this (members' scans are what
        // watchers save); each keeps its own missing-since times.
        if self
            .setup
            .watching
            .as_ref()
            .is_some_and(|w| !w.load(Ordering::SeqCst))
        {
            // Not counted by a member (it may have watched before).
            Counters::set(&self.setup.counters.streams.pending_deletion, 0);
            return;
        }
        let scan = match self.setup.store.list_leases().await {
            Ok(scan) => scan,
            Err(e) => {
                warn!(error = %ErrorChain(&e), "reading the lease table for former streams failed; the next discovery retries");
                return;
            }
        };
        let now = Instant::now();
        let lease_duration = self.setup.config.lease.lease_duration;
        self.observations.observe(&scan.leases, now);
        let mut leased: BTreeMap<StreamIdentity, LeasedStream> = BTreeMap::new();
        let mut keys: BTreeMap<StreamIdentity, Vec<&crate::lease::Lease>> = BTreeMap::new();
        for lease in &scan.leases {
            let Ok(key) = MultiStreamLeaseKey::parse(&lease.lease_key) else {
                continue;
            };
            let held =
                lease.owner.is_some() && !self.observations.is_expired(lease, now, lease_duration);
            leased.entry(key.stream.clone()).or_default().held |= held;
            keys.entry(key.stream).or_default().push(lease);
        }
        let tracked: BTreeSet<StreamIdentity> = self.followed.keys().cloned().collect();
        let grace = self.setup.config.multi_stream.former_streams_grace;
        let due = self.former.due(&tracked, &leased, now, grace);
        let mut pending = self.former.pending();
        for stream in due {
            let mut deleted = 0usize;
            for lease in keys.get(&stream).into_iter().flatten() {
                match self
                    .setup
                    .store
                    .delete_lease(&lease.lease_key, &lease.fence())
                    .await
                {
                    Ok(()) => deleted += 1,
                    Err(e) if e.kind() == ErrorKind::ConditionFailed => {
                        debug!(lease_key = %lease.lease_key, "a former stream's lease changed; kept");
                    }
                    Err(e) => {
                        warn!(lease_key = %lease.lease_key, error = %ErrorChain(&e), "deleting a former stream's lease failed; the next discovery retries");
                    }
                }
            }
            info!(%stream, deleted, "deleted the leases of a former stream");
            if deleted > 0 {
                Counters::add(&self.setup.counters.streams.deleted, 1);
            }
            if deleted == keys.get(&stream).map_or(0, Vec::len) {
                pending -= 1;
            }
        }
        Counters::set(
            &self.setup.counters.streams.pending_deletion,
            pending as u64,
        );
    }
}
