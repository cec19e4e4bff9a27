//! The [`Worker`]: keeps the lease table in step with the stream, takes, balances and renews
//! leases, runs a shard consumer per held lease, hands shards over, and shuts down cleanly.
//!
//! Tasks and their owners:
//! - the worker's own loop (the future returned by [`Worker::run`]) owns everything below;
//! - the lease renewer: one task in the worker's `background` set, stopped by its own token
//!   after the consumers have stopped and the leases are released; if it ends on its own the
//!   worker treats that as a failure and shuts down;
//! - one shard consumer task per held lease, in the worker's `consumers` set; each is asked to
//!   stop through a child token of `consumers_stop` (or its lease's handoff token) and its
//!   exit is observed and acted on (lease released, handed over, dropped, or kept for release
//!   at shutdown). Each consumer owns its poller.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::{SeedSource, retry};
use crate::bounded::{BoundedLeaseStore, BoundedStream};
use crate::config::WorkerConfig;
use crate::consumer::{Progress, ShardConsumer, ShardExit};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::held::{HeldLease, HeldLeases};
use crate::lease::lineage;
use crate::lease::renewer::run_renewer;
use crate::lease::taker::{LeaseObservations, TakeDecision, TakeInput, TakeReason, plan};
use crate::lease::{Lease, LeaseFence, LeaseStore, LeaseUpdate};
use crate::metrics::Counters;
use crate::processor::RecordProcessorFactory;
use crate::published::Published;
use crate::sequence::Checkpoint;
use crate::shard_sync::ShardSyncer;
use crate::stream::{ChildShard, HashKeyRange, StreamClient};

/// Attempts of a lease-table or stream call made at start-up or at shutdown.
const SETUP_ATTEMPTS: usize = 5;

/// What a running worker reports about itself after each taking round; see
/// [`Worker::status`].
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// Leases this worker holds.
    pub held_leases: BTreeSet<String>,
    /// Leases this worker asked other workers for and waits to be handed.
    pub pending_handoffs: BTreeSet<String>,
    /// Workers seen in the lease table (this one included).
    pub workers: usize,
    /// Leases of unfinished shards.
    pub active_leases: usize,
    /// Leases no known worker has room for under `max_leases_per_worker`.
    pub spillover: usize,
    /// Taking rounds run so far.
    pub taking_rounds: u64,
    /// Leases this worker handed to another worker on request.
    pub handed_over: u64,
    /// Leases this worker received through a handoff.
    pub received: u64,
    /// Handoffs this worker asked for that timed out and were taken by force.
    pub forced_takes: u64,
    /// Failed attempts of record processor callbacks (errors and panics).
    pub processor_failures: u64,
    /// Of those, panics.
    pub processor_panics: u64,
    /// Shard consumers that failed for good (their lease was released).
    pub shard_failures: u64,
    /// Shard consumers the watchdog restarted after they made no progress.
    pub watchdog_restarts: u64,
    /// Throttled `GetRecords` calls.
    pub throttled_reads: u64,
    /// Records that looked KPL-aggregated but were delivered as plain records.
    pub aggregation_errors: u64,
    /// KPL user records dropped for hashing outside their shard.
    pub records_out_of_range: u64,
}

/// Consumes a Kinesis stream with a [`RecordProcessor`](crate::RecordProcessor) per shard,
/// coordinating with the other workers of the same application through the lease table.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use kcl_core::{Checkpointer, LeaseStore, Record, RecordProcessor, StreamClient, Worker, WorkerConfig};
/// # use tokio_util::sync::CancellationToken;
/// struct Print;
///
/// #[async_trait::async_trait]
/// impl RecordProcessor for Print {
///     type Error = kcl_core::Error;
///     async fn process_records(
///         &mut self,
///         records: &[Record],
///         checkpointer: &mut Checkpointer,
///         _millis_behind_latest: Option<u64>,
///     ) -> Result<(), Self::Error> {
///         for record in records {
///             println!("{} {}", record.partition_key, record.data.len());
///         }
///         checkpointer.checkpoint().await
///     }
/// }
///
/// # async fn run(stream: Arc<dyn StreamClient>, leases: Arc<dyn LeaseStore>) -> kcl_core::Result<()> {
/// let config = WorkerConfig::new("orders-app", "orders");
/// let worker = Worker::new(config, stream, leases, |_shard_id: &str| Print)?;
/// let shutdown = CancellationToken::new();
/// worker.run(shutdown).await
/// # }
/// ```
pub struct Worker<F> {
    config: Arc<WorkerConfig>,
    stream: Arc<dyn StreamClient>,
    store: Arc<dyn LeaseStore>,
    factory: Arc<F>,
    status: watch::Sender<WorkerStatus>,
}

impl<F> std::fmt::Debug for Worker<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("stream", &self.stream)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<F: RecordProcessorFactory> Worker<F> {
    /// A worker for `config`, reading through `stream`, coordinating through `lease_store`,
    /// with a processor per shard from `factory`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `config` does not validate.
    pub fn new(
        config: WorkerConfig,
        stream: Arc<dyn StreamClient>,
        lease_store: Arc<dyn LeaseStore>,
        factory: F,
    ) -> Result<Self> {
        config.validate()?;
        // Every call is bounded in time, so nothing can stall the worker.
        let stream: Arc<dyn StreamClient> = Arc::new(BoundedStream {
            inner: stream,
            timeout: config.polling.request_timeout,
        });
        let lease_store: Arc<dyn LeaseStore> = Arc::new(BoundedLeaseStore {
            inner: lease_store,
            timeout: config.lease.request_timeout,
        });
        Ok(Worker {
            config: Arc::new(config),
            stream,
            store: lease_store,
            factory: Arc::new(factory),
            status: watch::Sender::new(WorkerStatus::default()),
        })
    }

    /// This worker's id, as written in `leaseOwner`.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// The worker's status, updated after every taking round while it runs.
    pub fn status(&self) -> watch::Receiver<WorkerStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` is cancelled or a fatal error, then shuts down gracefully:
    /// the worker offers its leases to the other live workers, each processor finishes its
    /// batch and gets `shutdown_requested` (within [`WorkerConfig::shutdown_timeout`]), and
    /// every held lease is released to the worker it was offered to (or to anyone, without
    /// other workers), so the shards continue from their checkpoints at once.
    ///
    /// # Errors
    /// Fatal start-up errors (lease table unusable, stream missing) and fatal errors while
    /// running (the stream was deleted, a worker task failed). Failures of single shards are
    /// handled and logged, not returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let span = info_span!(
            "worker",
            worker_id = %self.config.worker_id,
            application = %self.config.application_name,
            stream = %self.config.stream,
        );
        let coordinator = Coordinator {
            seeds: Arc::new(SeedSource::new(self.config.rng_seed)),
            config: self.config,
            stream: self.stream,
            store: self.store,
            factory: self.factory,
            held: Arc::new(HeldLeases::default()),
            observations: LeaseObservations::new(),
            consumers: JoinSet::new(),
            consumer_leases: HashMap::new(),
            running: BTreeMap::new(),
            consumers_stop: CancellationToken::new(),
            reported_invalid: HashSet::new(),
            incoming: BTreeMap::new(),
            worker_loads: BTreeMap::new(),
            expiry_check: None,
            status: self.status,
            counters: WorkerStatus::default(),
            awaited_parents: BTreeMap::new(),
            done_parents: BTreeSet::new(),
            parents_done: Arc::new(Published::new(BTreeSet::new())),
            sync_trigger: Arc::new(Notify::new()),
            last_holes: Vec::new(),
            stopping: false,
            metrics: Arc::new(Counters::default()),
            cooldown: HashMap::new(),
        };
        coordinator.run(shutdown).instrument(span).await
    }
}

/// The worker's state while it runs.
struct Coordinator<F> {
    config: Arc<WorkerConfig>,
    stream: Arc<dyn StreamClient>,
    store: Arc<dyn LeaseStore>,
    factory: Arc<F>,
    seeds: Arc<SeedSource>,
    held: Arc<HeldLeases>,
    observations: LeaseObservations,
    consumers: JoinSet<ShardExit>,
    /// Which lease each consumer task serves (to act on a task that panicked).
    consumer_leases: HashMap<Id, String>,
    /// Lease key → the running consumer.
    running: BTreeMap<String, RunningConsumer>,
    consumers_stop: CancellationToken,
    /// Invalid lease items already logged, so each is reported once.
    reported_invalid: HashSet<String>,
    /// Leases this worker asked for, and when it asked (its own clock).
    incoming: BTreeMap<String, Pending>,
    /// Load of each worker at the last taking round: where to offer leases at shutdown.
    worker_loads: BTreeMap<String, usize>,
    /// An extra taking round at the instant a lease will expire, when that comes before the
    /// next regular round: expiry is judged at the end of a table read (never earlier than
    /// the owner's last write), so without it jitter in read times could let an expired lease
    /// wait one more taker interval.
    expiry_check: Option<Instant>,
    status: watch::Sender<WorkerStatus>,
    /// The counters of the status.
    counters: WorkerStatus,
    /// Held child leases whose consumers may be waiting, and their parents.
    awaited_parents: BTreeMap<String, BTreeSet<String>>,
    /// Parents known to be finished or gone, published to the waiting consumers.
    done_parents: BTreeSet<String>,
    parents_done: Arc<Published<BTreeSet<String>>>,
    /// Asks the shard syncer for a full sync now (a shard ended without children, a hole in
    /// the leases).
    sync_trigger: Arc<Notify>,
    /// Hash keys no lease covered at the last taking round.
    last_holes: Vec<HashKeyRange>,
    /// Set once shutdown starts: no lease is taken any more.
    stopping: bool,
    /// Counters shared with the shard consumers.
    metrics: Arc<Counters>,
    /// Shards whose consumer failed, with how many times in a row and until when this worker
    /// leaves them alone.
    cooldown: HashMap<String, (u32, Instant)>,
}

/// A shard consumer task and its handles.
struct RunningConsumer {
    abort: tokio::task::AbortHandle,
    progress: Arc<Progress>,
    /// The watchdog already warned about a long processor callback.
    warned_slow: bool,
}

/// The longest a worker leaves a shard whose consumer keeps failing (a poison record) before
/// trying it again; the wait doubles from one second with each failure in a row.
const MAX_SHARD_COOLDOWN: Duration = Duration::from_secs(60);

/// A lease this worker waits to be handed.
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// When this worker asked for it, or first saw it offered.
    since: Instant,
    /// Asked for by this worker (then taken by force after the handoff timeout), rather than
    /// offered by a worker shutting down (then left to expire if that worker dies).
    asked: bool,
}

enum Event {
    Shutdown,
    ConsumerExited(std::result::Result<(Id, ShardExit), JoinError>),
    BackgroundExited(std::result::Result<(&'static str, Result<()>), JoinError>),
    TakeLeases,
    CheckExpiry,
    PollHandoffs,
    PollParents,
}

impl<F: RecordProcessorFactory> Coordinator<F> {
    async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let setup = self
            .config
            .lease
            .retry
            .with_max_attempts(Some(SETUP_ATTEMPTS));
        let store = self.store.clone();
        retry(
            "lease table initialization",
            setup.backoff(self.seeds.next_seed()),
            || store.initialize(),
        )
        .await?;
        let mut syncer = ShardSyncer {
            stream: self.stream.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
            seeds: self.seeds.clone(),
            reported_invalid: HashSet::new(),
        };
        // The first sync runs before anything else: a missing stream stops the worker here.
        syncer.sync_once().await?;
        info!(lease_table = %self.store.table_name(), "worker started");

        // Background tasks, stopped by this token after the leases are released; each returns
        // its name, so an early end can be reported.
        let background_stop = CancellationToken::new();
        let mut background: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
        let (held, store, lease_config, seeds, stop) = (
            self.held.clone(),
            self.store.clone(),
            self.config.lease.clone(),
            self.seeds.clone(),
            background_stop.clone(),
        );
        background.spawn(
            async move {
                run_renewer(held, store, lease_config, seeds, stop).await;
                ("lease renewer", Ok(()))
            }
            .in_current_span(),
        );
        let (trigger, stop) = (self.sync_trigger.clone(), background_stop.clone());
        background.spawn(
            async move { ("shard sync", syncer.run(trigger, stop).await) }.in_current_span(),
        );

        let lease_config = &self.config.lease;
        let mut taker = tokio::time::interval(lease_config.taker_interval);
        taker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut handoff_poll = tokio::time::interval(lease_config.handoff_poll_interval);
        handoff_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut parent_poll = tokio::time::interval(lease_config.parent_poll_interval);
        parent_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);

        let outcome = loop {
            // Pick the next event; act on it outside the select so lease writes run to
            // completion.
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Event::Shutdown,
                Some(joined) = self.consumers.join_next_with_id() => Event::ConsumerExited(joined),
                Some(joined) = background.join_next() => Event::BackgroundExited(joined),
                _ = taker.tick() => Event::TakeLeases,
                _ = sleep_until_some(self.expiry_check), if self.expiry_check.is_some() => Event::CheckExpiry,
                _ = handoff_poll.tick(), if !self.incoming.is_empty() => Event::PollHandoffs,
                _ = parent_poll.tick(), if self.awaits_parents() => Event::PollParents,
            };
            match event {
                Event::Shutdown => break Ok(()),
                Event::ConsumerExited(joined) => self.on_consumer_exit(joined).await,
                Event::BackgroundExited(joined) => {
                    break Err(match joined {
                        Ok((_, Err(e))) => e,
                        Ok((task, Ok(()))) => Error::TaskFailed {
                            task: task.into(),
                            problem: "stopped without being asked to".into(),
                        },
                        Err(e) => Error::TaskFailed {
                            task: "background task".into(),
                            problem: e.to_string(),
                        },
                    });
                }
                Event::TakeLeases | Event::CheckExpiry => self.take_leases().await,
                Event::PollHandoffs => self.poll_handoffs().await,
                Event::PollParents => self.poll_parents().await,
            }
        };
        if let Err(e) = &outcome {
            error!(error = %e, "worker stopping after a fatal error");
        }

        self.stopping = true;
        self.offer_leases_before_stopping().await;
        self.stop_consumers().await;
        self.release_all().await;
        background_stop.cancel();
        while let Some(joined) = background.join_next().await {
            match joined {
                Ok((task, Err(e))) => {
                    warn!(task, error = %e, "background task ended with an error")
                }
                Err(e) => error!(error = %e, "background task failed"),
                Ok(_) => {}
            }
        }
        self.publish_status(None);
        info!("worker stopped");
        outcome
    }

    fn report_invalid(&mut self, invalid: &[Error]) {
        for error in invalid {
            let key = match error {
                Error::InvalidLeaseItem { lease_key, .. } => lease_key.clone(),
                other => other.to_string(),
            };
            if self.reported_invalid.insert(key) {
                warn!(error = %error, "skipping a lease item that does not decode");
            }
        }
    }

    /// One taking round: read the table, update the observations, pass on requests for held
    /// leases, then take and ask for what the planner says.
    async fn take_leases(&mut self) {
        // Consumed before the scan: a scan that fails must not leave a past deadline behind,
        // or the event loop would fire this round again at once, forever (a hot loop on the
        // lease table while DynamoDB fails fast; found by the simulation). The regular taker
        // tick retries.
        self.expiry_check = None;
        let scan = match self.store.list_leases().await {
            Ok(scan) => scan,
            Err(e) => {
                warn!(error = %e, "lease scan failed; next round retries");
                return;
            }
        };
        let now = Instant::now();
        self.report_invalid(&scan.invalid);
        self.observations.observe(&scan.leases, now);
        self.forget_lost_leases();
        let me = self.config.worker_id.clone();
        for lease in &scan.leases {
            match (lease.owner.as_deref(), lease.handoff_to.as_deref()) {
                // Someone asked for a lease we hold: hand it over.
                (Some(owner), Some(to)) if owner == me => {
                    if let Some(held) = self.held.get(&lease.lease_key) {
                        held.handoff_requested(to);
                    }
                }
                // A lease offered to us, or asked for by us: watch it closely.
                (Some(_), Some(to)) if to == me => {
                    self.incoming
                        .entry(lease.lease_key.clone())
                        .or_insert(Pending {
                            since: now,
                            asked: false,
                        });
                }
                _ => {}
            }
        }
        self.watchdog();
        // A consumer still winding down keeps its lease out of reach, so one shard never has
        // two consumers in this worker.
        let held: BTreeSet<String> = self
            .held
            .all()
            .iter()
            .map(|l| l.lease_key().to_owned())
            .chain(self.running.keys().cloned())
            .collect();
        let lease_config = &self.config.lease;
        let decisions = plan(&TakeInput {
            worker_id: &self.config.worker_id,
            leases: &scan.leases,
            held: &held,
            observations: &self.observations,
            now,
            lease_duration: lease_config.lease_duration,
            handoff_timeout: lease_config.handoff_timeout,
            max_leases_per_worker: lease_config.max_leases_per_worker,
            max_leases_to_steal: lease_config.max_leases_to_steal,
            seed: self.seeds.next_seed(),
        });
        if decisions.spillover != self.counters.spillover && decisions.spillover > 0 {
            warn!(
                spillover = decisions.spillover,
                workers = decisions.workers,
                max_leases_per_worker = lease_config.max_leases_per_worker,
                "lease spill-over: more leases than the known workers may hold"
            );
        }
        self.counters.spillover = decisions.spillover;
        if !decisions.take.is_empty() || !decisions.request_handoff.is_empty() {
            debug!(
                workers = decisions.workers,
                leases = decisions.active_leases,
                mine = decisions.counted_for_me,
                take = decisions.take.len(),
                ask = decisions.request_handoff.len(),
                "taking round"
            );
        }
        for decision in decisions.take {
            self.take(decision).await;
        }
        for request in decisions.request_handoff {
            let update = LeaseUpdate::RequestHandoff { to: me.clone() };
            match self
                .store
                .update_lease(&request.lease_key, &request.fence, &update)
                .await
            {
                Ok(_) => {
                    info!(lease_key = %request.lease_key, owner = ?request.fence.owner, "asked for lease");
                    let pending = Pending {
                        since: Instant::now(),
                        asked: true,
                    };
                    self.incoming.insert(request.lease_key, pending);
                }
                Err(e) if e.kind() == ErrorKind::ConditionFailed => {
                    debug!(lease_key = %request.lease_key, "lease changed before the handoff request");
                }
                Err(e) => {
                    warn!(lease_key = %request.lease_key, error = %e, "asking for a lease failed")
                }
            }
        }
        self.learn_parents(&scan.leases, true);
        let holes = lineage::hash_key_holes(&scan.leases);
        if !holes.is_empty() && holes == self.last_holes {
            warn!(
                ?holes,
                "hash keys no unfinished lease covers; running a full shard sync"
            );
            self.sync_trigger.notify_one();
        }
        self.last_holes = holes;
        // The next lease of another worker to run out before the next regular round.
        let lease_duration = self.config.lease.lease_duration;
        let next_round = now + self.config.lease.taker_interval;
        self.expiry_check = scan
            .leases
            .iter()
            .filter(|l| !l.is_finished() && l.owner.as_deref().is_some_and(|o| o != me))
            .filter_map(|l| self.observations.expires_at(l, lease_duration))
            .filter(|at| *at > now && *at <= next_round)
            .min();
        self.worker_loads = decisions.worker_loads;
        self.counters.taking_rounds += 1;
        self.publish_status(Some((
            decisions.workers,
            decisions.active_leases,
            decisions.spillover,
        )));
    }

    /// Reads the leases this worker waits for: takes those released to it, takes by force
    /// those it asked for whose owner did not hand them over in time, forgets those that went
    /// elsewhere.
    async fn poll_handoffs(&mut self) {
        let keys: Vec<String> = self.incoming.keys().cloned().collect();
        let scan = match self.store.get_leases(&keys).await {
            Ok(scan) => scan,
            Err(e) => {
                warn!(error = %e, "reading requested leases failed; retrying");
                return;
            }
        };
        let now = Instant::now();
        self.observations.observe_some(&scan.leases, now);
        let found: BTreeMap<&str, &Lease> = scan
            .leases
            .iter()
            .map(|l| (l.lease_key.as_str(), l))
            .collect();
        let me = self.config.worker_id.clone();
        for key in keys {
            let Some(lease) = found.get(key.as_str()) else {
                self.incoming.remove(&key);
                continue;
            };
            let pending = self.incoming[&key];
            let reason = match (lease.owner.as_deref(), lease.handoff_to.as_deref()) {
                (None, Some(to)) if to == me => TakeReason::Reserved,
                (Some(_), Some(to)) if to == me => {
                    let waited = now.duration_since(pending.since);
                    if waited < self.config.lease.handoff_timeout {
                        continue;
                    }
                    if !pending.asked {
                        // An offer whose owner has not released it: it may still be finishing
                        // a batch. If it died, the lease expires like any other.
                        self.incoming.remove(&key);
                        continue;
                    }
                    warn!(lease_key = %key, owner = ?lease.owner, "handoff timed out; taking the lease");
                    self.counters.forced_takes += 1;
                    TakeReason::HandoffTimedOut
                }
                // Taken by someone else, released without reservation, or ours already.
                _ => {
                    self.incoming.remove(&key);
                    continue;
                }
            };
            self.incoming.remove(&key);
            let at_limit = self.held.all().len() >= self.config.lease.max_leases_per_worker;
            if at_limit {
                // The reservation lapses and another worker takes the lease.
                debug!(lease_key = %key, "not taking a handed-over lease: at max_leases_per_worker");
                continue;
            }
            if self.held.get(&key).is_none() && !self.running.contains_key(&key) {
                self.take(TakeDecision::new(key, lease.fence(), reason))
                    .await;
            }
        }
        self.publish_status(None);
    }

    async fn take(&mut self, decision: TakeDecision) -> bool {
        if self.stopping {
            return false;
        }
        if let Some((failures, until)) = self.cooldown.get(&decision.lease_key) {
            if *until > Instant::now() {
                debug!(lease_key = %decision.lease_key, failures, "shard cooling down after failures; not taking it yet");
                return false;
            }
        }
        let sent_at = Instant::now();
        let update = LeaseUpdate::Take {
            new_owner: self.config.worker_id.clone(),
        };
        match self
            .store
            .update_lease(&decision.lease_key, &decision.fence, &update)
            .await
        {
            Ok(lease) => {
                info!(lease_key = %lease.lease_key, reason = ?decision.reason, counter = lease.counter, "took lease");
                self.incoming.remove(&lease.lease_key);
                if decision.reason == TakeReason::Reserved {
                    self.counters.received += 1;
                }
                let parents = lease.parent_shard_ids.clone();
                let held = HeldLease::new(
                    lease,
                    &self.config.worker_id,
                    self.config.lease.lease_duration,
                    sent_at,
                );
                self.held.insert(held.clone());
                self.start_consumer(held, parents);
                true
            }
            Err(e) if e.kind() == ErrorKind::ConditionFailed => {
                debug!(lease_key = %decision.lease_key, "lease changed before the take; another worker got it");
                false
            }
            Err(e) => {
                warn!(lease_key = %decision.lease_key, error = %e, "taking a lease failed");
                false
            }
        }
    }

    fn start_consumer(&mut self, lease: Arc<HeldLease>, parents: BTreeSet<String>) {
        let key = lease.lease_key().to_owned();
        if !parents.is_subset(&self.done_parents) {
            self.awaited_parents.insert(key.clone(), parents);
        }
        let stop = self.consumers_stop.child_token();
        let progress = Progress::new();
        let consumer = ShardConsumer {
            lease,
            store: self.store.clone(),
            stream: self.stream.clone(),
            config: self.config.clone(),
            seeds: self.seeds.clone(),
            factory: self.factory.clone(),
            shutdown: stop.clone(),
            parents_done: self.parents_done.clone(),
            counters: self.metrics.clone(),
            progress: progress.clone(),
        };
        let abort = self.consumers.spawn(consumer.run().in_current_span());
        self.consumer_leases.insert(abort.id(), key.clone());
        self.running.insert(
            key,
            RunningConsumer {
                abort,
                progress,
                warned_slow: false,
            },
        );
    }

    async fn on_consumer_exit(&mut self, joined: std::result::Result<(Id, ShardExit), JoinError>) {
        let (id, exit) = match joined {
            Ok((id, exit)) => (id, exit),
            Err(e) => {
                let problem = if e.is_panic() {
                    "panicked"
                } else {
                    "was aborted"
                };
                (
                    e.id(),
                    ShardExit::Failed(Error::TaskFailed {
                        task: "shard consumer".into(),
                        problem: problem.into(),
                    }),
                )
            }
        };
        let Some(key) = self.consumer_leases.remove(&id) else {
            error!(task = %id, "exit of an unknown shard consumer");
            return;
        };
        self.running.remove(&key);
        self.awaited_parents.remove(&key);
        if matches!(exit, ShardExit::Failed(_)) {
            let failures = self.cooldown.get(&key).map_or(1, |(n, _)| n + 1);
            let wait = Duration::from_secs(1 << (failures - 1).min(6)).min(MAX_SHARD_COOLDOWN);
            self.cooldown
                .insert(key.clone(), (failures, Instant::now() + wait));
            self.counters.shard_failures += 1;
        } else {
            self.cooldown.remove(&key);
        }
        match exit {
            ShardExit::ShardEnded { children } => self.on_shard_end(&key, children).await,
            ShardExit::ShardGone => {
                if let Some(lease) = self.held.remove(&key) {
                    match lease.delete(self.store.as_ref()).await {
                        Ok(()) => {
                            info!(lease_key = %key, "deleted the lease of a shard past retention")
                        }
                        Err(e) => {
                            warn!(lease_key = %key, error = %e, "deleting the lease of a shard past retention failed")
                        }
                    }
                }
                self.mark_parents_done([key]);
            }
            ShardExit::LeaseLost => {
                self.held.remove(&key);
            }
            ShardExit::HandedOff => {
                // The release keeps `handoffTo`: the lease is reserved for the requester.
                if self.release(&key).await {
                    self.counters.handed_over += 1;
                }
            }
            // Only a shutdown stops consumers this way: release at once, to the worker the
            // lease was offered to, without waiting for the other shards.
            ShardExit::Shutdown => {
                self.release(&key).await;
            }
            ShardExit::Failed(e) => {
                let failures = self.cooldown.get(&key).map_or(1, |(n, _)| *n);
                error!(lease_key = %key, error = %e, failures, "shard consumer failed; releasing the lease so the shard restarts from its checkpoint");
                self.release(&key).await;
            }
        }
        self.publish_status(None);
    }

    /// A shard was read to its end and checkpointed at `SHARD_END`: record its children in its
    /// lease, release it, unblock children waiting here, and create the children's leases
    /// (taking them at once, so a split continues without waiting for a taking round). Without
    /// `ChildShards` in the last `GetRecords` answer (some emulators and older paths omit it),
    /// a full shard sync finds the children instead.
    async fn on_shard_end(&mut self, key: &str, children: Vec<ChildShard>) {
        let ids: BTreeSet<String> = children.iter().map(|c| c.shard_id.clone()).collect();
        info!(lease_key = %key, children = ?ids, "shard finished");
        if let (Some(lease), false) = (self.held.get(key), ids.is_empty()) {
            let update = LeaseUpdate::RecordChildren {
                child_shard_ids: ids.clone(),
            };
            if let Err(e) = lease.write(self.store.as_ref(), &update).await {
                warn!(lease_key = %key, error = %e, "recording the children failed");
            }
        }
        self.release(key).await;
        self.mark_parents_done([key.to_owned()]);
        if children.is_empty() {
            self.sync_trigger.notify_one();
            return;
        }
        // A merged child may be created only once its other parent has a lease: a child
        // treats a parent without one as finished long ago (cleaned up, or past retention),
        // so creating it earlier would let it start before the other parent's records
        // (found by the simulation: the other parent's own parent was still being
        // processed). Without that lease, the other parent's end or a shard sync creates it.
        let other_parents: Vec<String> = children
            .iter()
            .flat_map(|c| c.parent_shard_ids.iter())
            .filter(|p| p.as_str() != key)
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let leased: BTreeSet<String> = if other_parents.is_empty() {
            BTreeSet::new()
        } else {
            match self.store.get_leases(&other_parents).await {
                Ok(scan) => scan
                    .leases
                    .into_iter()
                    .map(|l| l.lease_key)
                    .chain(scan.invalid.iter().filter_map(|e| match e {
                        Error::InvalidLeaseItem { lease_key, .. } => Some(lease_key.clone()),
                        _ => None,
                    }))
                    .collect(),
                Err(e) => {
                    warn!(lease_key = %key, error = %e, "reading the other parents failed; a shard sync creates the children");
                    self.sync_trigger.notify_one();
                    return;
                }
            }
        };
        for child in children {
            let missing: Vec<&String> = child
                .parent_shard_ids
                .iter()
                .filter(|p| p.as_str() != key && !leased.contains(*p))
                .collect();
            if !missing.is_empty() {
                debug!(child = %child.shard_id, ?missing, "not creating a child before its other parent has a lease");
                self.sync_trigger.notify_one();
                continue;
            }
            let lease = Lease::new(&child.shard_id, Checkpoint::TrimHorizon)
                .with_parents(child.parent_shard_ids.iter().cloned())
                .with_hash_key_range(child.hash_key_range);
            match self.store.create_lease_if_absent(&lease).await {
                Ok(true) => {
                    info!(lease_key = %lease.lease_key, parents = ?lease.parent_shard_ids, "created child lease");
                    if self.held.all().len() < self.config.lease.max_leases_per_worker {
                        self.take(TakeDecision::new(
                            lease.lease_key.clone(),
                            lease.fence(),
                            TakeReason::Unowned,
                        ))
                        .await;
                    }
                }
                // Created by the worker that finished the other parent of a merge.
                Ok(false) => {}
                Err(e) => {
                    warn!(lease_key = %lease.lease_key, error = %e, "creating a child lease failed; a shard sync will");
                    self.sync_trigger.notify_one();
                }
            }
        }
    }

    /// Restarts shard consumers that made no progress (no `GetRecords` answer, no processor
    /// callback done) for `processing.watchdog_timeout`: aborted, their lease released by the
    /// exit handling, and taken again. A processor callback running that long is the
    /// processor's business: logged once, not interrupted.
    fn watchdog(&mut self) {
        let limit = self.config.processing.watchdog_timeout;
        for (key, consumer) in &mut self.running {
            if let Some(stalled) = consumer.progress.stalled_for().filter(|s| *s >= limit) {
                if !consumer.abort.is_finished() {
                    warn!(lease_key = %key, ?stalled, "shard consumer made no progress; restarting it");
                    consumer.abort.abort();
                    Counters::add(&self.metrics.watchdog_restarts, 1);
                }
            } else if let Some(running) =
                consumer.progress.in_callback_for().filter(|r| *r >= limit)
            {
                if !consumer.warned_slow {
                    warn!(lease_key = %key, ?running, "a record processor callback has been running for a long time");
                    consumer.warned_slow = true;
                }
            }
        }
    }

    /// True while a waiting consumer needs a parent not yet known to be finished.
    fn awaits_parents(&self) -> bool {
        self.awaited_parents
            .values()
            .any(|parents| !parents.is_subset(&self.done_parents))
    }

    /// Reads the parents the waiting consumers need (one `BatchGetItem` for all of them).
    async fn poll_parents(&mut self) {
        let keys: Vec<String> = self
            .awaited_parents
            .values()
            .flatten()
            .filter(|p| !self.done_parents.contains(*p))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        match self.store.get_leases(&keys).await {
            Ok(scan) => {
                let found: BTreeMap<&str, &Lease> = scan
                    .leases
                    .iter()
                    .map(|l| (l.lease_key.as_str(), l))
                    .collect();
                let done: Vec<String> = keys
                    .iter()
                    .filter(|k| found.get(k.as_str()).is_none_or(|l| l.is_finished()))
                    .cloned()
                    .collect();
                self.mark_parents_done(done);
            }
            Err(e) => warn!(error = %e, "reading parent leases failed; retrying"),
        }
    }

    /// Learns from a read of the table which awaited parents finished or are gone; with the
    /// whole table, also forgets finished parents no lease names any more.
    fn learn_parents(&mut self, leases: &[Lease], whole_table: bool) {
        let by_key: BTreeMap<&str, &Lease> =
            leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
        let done: Vec<String> = self
            .awaited_parents
            .values()
            .flatten()
            .filter(|p| by_key.get(p.as_str()).is_none_or(|l| l.is_finished()))
            .cloned()
            .collect();
        if whole_table {
            let named: BTreeSet<&str> = leases
                .iter()
                .flat_map(|l| l.parent_shard_ids.iter().map(String::as_str))
                .collect();
            self.done_parents.retain(|p| named.contains(p.as_str()));
        }
        self.mark_parents_done(done);
    }

    fn mark_parents_done(&mut self, keys: impl IntoIterator<Item = String>) {
        let mut changed = false;
        for key in keys {
            changed |= self.done_parents.insert(key);
        }
        if changed {
            self.parents_done.set(self.done_parents.clone());
        }
    }

    async fn release(&mut self, key: &str) -> bool {
        match self.held.remove(key) {
            Some(lease) => {
                release_lease(&lease, self.store.as_ref(), &self.config, &self.seeds).await
            }
            None => false,
        }
    }

    /// Before stopping: offers each held lease to the least loaded other live worker (a
    /// handoff request written by the owner), then keeps processing for one taking interval
    /// so the receivers see the offers and watch for the releases.
    async fn offer_leases_before_stopping(&mut self) {
        let me = self.config.worker_id.clone();
        let mut receivers: Vec<(usize, String)> = self
            .worker_loads
            .iter()
            .filter(|(w, _)| **w != me)
            .map(|(w, c)| (*c, w.clone()))
            .collect();
        let leases = self.held.all();
        if receivers.is_empty() || leases.is_empty() {
            return;
        }
        let mut offered = 0usize;
        for lease in &leases {
            receivers.sort();
            let (load, to) = &mut receivers[0];
            let offer = LeaseUpdate::RequestHandoff { to: to.clone() };
            match lease.write(self.store.as_ref(), &offer).await {
                Ok(_) => {
                    debug!(lease_key = %lease.lease_key(), to = %to, "offered lease");
                    *load += 1;
                    offered += 1;
                }
                // Already asked for by another worker: the release goes to that one.
                Err(e) => debug!(lease_key = %lease.lease_key(), error = %e, "lease not offered"),
            }
        }
        let wait = (self.config.lease.taker_interval + self.config.lease.handoff_poll_interval)
            .min(self.config.shutdown_timeout / 2);
        info!(
            offered,
            receivers = receivers.len(),
            ?wait,
            "offered leases to other workers; processing until they watch"
        );
        let deadline = Instant::now() + wait;
        loop {
            tokio::select! {
                biased;
                Some(joined) = self.consumers.join_next_with_id() => self.on_consumer_exit(joined).await,
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Asks every consumer to stop and waits up to the shutdown timeout; consumers that do not
    /// finish in time are aborted (their processors dropped mid-call).
    async fn stop_consumers(&mut self) {
        self.consumers_stop.cancel();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.consumers.join_next_with_id()).await {
                Ok(Some(joined)) => self.on_consumer_exit(joined).await,
                Ok(None) => return,
                Err(_) => {
                    warn!(
                        consumers = self.consumers.len(),
                        timeout = ?self.config.shutdown_timeout,
                        "shard consumers did not stop in time; aborting them"
                    );
                    self.consumers.abort_all();
                    while let Some(joined) = self.consumers.join_next_with_id().await {
                        self.on_consumer_exit(joined).await;
                    }
                    return;
                }
            }
        }
    }

    /// Releases every held lease, in parallel.
    async fn release_all(&mut self) {
        let leases = self.held.all();
        for lease in &leases {
            self.held.remove(lease.lease_key());
        }
        let (store, config, seeds) = (self.store.as_ref(), &self.config, &self.seeds);
        futures::future::join_all(
            leases
                .iter()
                .map(|lease| release_lease(lease, store, config, seeds)),
        )
        .await;
    }

    /// Drops the leases the renewer found lost from the registry. Their consumers may still be
    /// finishing a batch; `running` keeps those shards out of reach until they exit.
    fn forget_lost_leases(&mut self) {
        for lease in self.held.remove_lost() {
            debug!(lease_key = %lease.lease_key(), "forgetting lost lease");
        }
    }

    /// Publishes the status; `round` carries the taking round's view of the fleet.
    fn publish_status(&mut self, round: Option<(usize, usize, usize)>) {
        self.forget_lost_leases();
        let held = self
            .held
            .all()
            .iter()
            .map(|l| l.lease_key().to_owned())
            .collect();
        let pending = self.incoming.keys().cloned().collect();
        let (counters, metrics) = (&self.counters, &self.metrics);
        self.status.send_modify(|status| {
            if let Some((workers, active, spillover)) = round {
                status.workers = workers;
                status.active_leases = active;
                status.spillover = spillover;
            }
            status.held_leases = held;
            status.pending_handoffs = pending;
            status.taking_rounds = counters.taking_rounds;
            status.handed_over = counters.handed_over;
            status.received = counters.received;
            status.forced_takes = counters.forced_takes;
            status.shard_failures = counters.shard_failures;
            status.processor_failures = Counters::get(&metrics.processor_failures);
            status.processor_panics = Counters::get(&metrics.processor_panics);
            status.watchdog_restarts = Counters::get(&metrics.watchdog_restarts);
            status.throttled_reads = Counters::get(&metrics.throttled_reads);
            status.aggregation_errors = Counters::get(&metrics.aggregation_errors);
            status.records_out_of_range = Counters::get(&metrics.records_out_of_range);
        });
    }
}

impl TakeDecision {
    fn new(lease_key: String, fence: LeaseFence, reason: TakeReason) -> Self {
        TakeDecision {
            lease_key,
            fence,
            reason,
        }
    }
}

/// Sleeps until `at` (a select branch guarded by `at.is_some()`).
async fn sleep_until_some(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

async fn release_lease(
    lease: &HeldLease,
    store: &dyn LeaseStore,
    config: &WorkerConfig,
    seeds: &SeedSource,
) -> bool {
    if lease.is_lost() {
        return false;
    }
    let backoff = config
        .lease
        .retry
        .with_max_attempts(Some(SETUP_ATTEMPTS))
        .backoff(seeds.next_seed());
    match retry("release lease", backoff, || lease.release(store)).await {
        Ok(()) => {
            info!(lease_key = %lease.lease_key(), "released lease");
            true
        }
        Err(e) => {
            warn!(lease_key = %lease.lease_key(), error = %e, "could not release lease; it will expire");
            false
        }
    }
}
