//! The [`Worker`]: keeps the lease table in step with the stream, takes, balances and renews
//! leases, runs a shard consumer per held lease, hands shards over, and shuts down cleanly.
//!
//! Tasks and their owners:
//! - the worker's own loop (the future returned by [`Worker::run`]) owns everything below;
//! - the stream sync (the shard syncer, or in multi-stream mode the stream sync): one task in
//!   the worker's `background` set, stopped by the same token as the renewer;
//! - the lease renewer: one task in the worker's `background` set, stopped by its own token
//!   after the consumers have stopped and the leases are released; if it ends on its own the
//!   worker treats that as a failure and shuts down;
//! - one shard consumer task per held lease, in the worker's `consumers` set; each is asked to
//!   stop through a child token of `consumers_stop` (or its lease's handoff token) and its
//!   exit is observed and acted on (lease released, handed over, dropped, or kept for release
//!   at shutdown). Each consumer owns its poller;
//! - lease writes the coordinator sends together (see `concurrently`) are futures owned and
//!   awaited by the step that sends them, never spawned: a taking round's takes and requests,
//!   a shard end's child leases, the offers, and the releases in `stop_consumers`.
//!
//! The coordinator's work is split by concern: `taking` (taking rounds, handoff polling,
//! takes), `consumers` (starting shard consumers, acting on their exits, the watchdog),
//! `resharding` (shard ends, child leases, parents before children), `shutdown` (offers,
//! stopping consumers, releases), `status` (what a running worker reports), `startup` (the
//! streams set up before the loop), `streams` (the streams consumed now, by lease-key
//! prefix) and `multi_stream` (the stream sync of a multi-stream worker: discovery,
//! per-stream shard syncs, former streams' leases).

mod consumers;
mod fan_out;
mod multi_stream;
mod resharding;
mod shutdown;
mod startup;
mod status;
mod streams;
mod taking;
mod watching;

use startup::{Source, StreamSync};
pub(crate) use streams::{ActiveStream, SyncRequests};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::backoff::{SeedSource, retry};
use crate::bounded::{BoundedLeaseStore, BoundedStream, LeaseTableContact};
use crate::config::Retrieval;
use crate::config::WorkerConfig;
use crate::consumer::{Progress, ShardExit};
use crate::counters::Counters;
use crate::error::{Error, ErrorChain, Result};
use crate::fatal::Fatal;
use crate::invalid_items::InvalidItems;
use crate::lease::LeaseStore;
use crate::lease::held::HeldLeases;
use crate::lease::renewer::run_renewer;
use crate::lease::taker::LeaseObservations;
use crate::metrics::WorkerMetrics;
use crate::processor::RecordProcessorFactory;
use crate::published::Published;
use crate::stream::{HashKeyRange, StreamClient};
use crate::stream_tracker::{StreamClients, StreamTracker};
use streams::ActiveStreams;

/// Attempts of a lease-table or stream call made at start-up or at shutdown.
const SETUP_ATTEMPTS: usize = 5;

/// Lease-table writes the coordinator sends at once: the takes and handoff requests of a
/// taking round, the offers and releases at shutdown. The renewer's bound (the Java KCL's 20
/// renewal threads): a worker's leases go in one or two waves, so a round or a shutdown
/// takes about one call's time instead of one per lease, without a burst that would throttle
/// a table provisioned for the renewals.
const MAX_CONCURRENT_LEASE_CALLS: usize = 20;

pub use status::{StreamsStatus, WorkerStatus};

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
    source: Source,
    store: Arc<dyn LeaseStore>,
    factory: Arc<F>,
    status: watch::Sender<WorkerStatus>,
    fatal: Arc<Fatal>,
    contact: Arc<LeaseTableContact>,
}

impl<F> std::fmt::Debug for Worker<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("source", &self.source)
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
        let stream: Arc<dyn StreamClient> = Arc::new(BoundedStream {
            inner: stream,
            timeout: config.polling.request_timeout,
        });
        Self::with_source(config, Source::Single(stream), lease_store, factory)
    }

    /// A multi-stream worker: it consumes every stream `tracker` lists (asked again every
    /// [`MultiStreamConfig::stream_discovery_interval`](crate::MultiStreamConfig)), each
    /// through the client `clients` makes for it, with one lease table for all of them. Lease
    /// keys are the Java KCL's `ACCOUNT:NAME:CREATION_EPOCH:SHARD_ID`, so a stream deleted and
    /// recreated under its name is another stream. `config.stream` is only a label for logs
    /// and metrics. The factory's
    /// [`create_processor_for`](RecordProcessorFactory::create_processor_for) is told each
    /// shard's stream (see [`PerStream`](crate::PerStream)).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `config` does not validate, or names a fan-out consumer
    /// by ARN (a consumer belongs to one stream: in multi-stream mode each stream registers
    /// its own, under the consumer name).
    pub fn multi_stream(
        config: WorkerConfig,
        tracker: Arc<dyn StreamTracker>,
        clients: Arc<dyn StreamClients>,
        lease_store: Arc<dyn LeaseStore>,
        factory: F,
    ) -> Result<Self> {
        if let Retrieval::FanOut(fan_out) = &config.retrieval
            && matches!(fan_out.consumer, Some(crate::config::ConsumerRef::Arn(_)))
        {
            return Err(Error::invalid_config(
                "retrieval.consumer",
                "a consumer ARN names one stream's consumer; in multi-stream mode name the consumer instead",
            ));
        }
        Self::with_source(
            config,
            Source::Multi { tracker, clients },
            lease_store,
            factory,
        )
    }

    fn with_source(
        config: WorkerConfig,
        source: Source,
        lease_store: Arc<dyn LeaseStore>,
        factory: F,
    ) -> Result<Self> {
        config.validate()?;
        // Every call is bounded in time, so nothing can stall the worker; a vanished lease
        // table, found by any call, ends it.
        let fatal = Arc::new(Fatal::default());
        let contact = Arc::new(LeaseTableContact::default());
        let lease_store: Arc<dyn LeaseStore> = Arc::new(BoundedLeaseStore {
            inner: lease_store,
            timeout: config.lease.request_timeout,
            scan_timeout: config.lease.scan_timeout,
            fatal: fatal.clone(),
            contact: contact.clone(),
        });
        Ok(Worker {
            config: Arc::new(config),
            source,
            store: lease_store,
            factory: Arc::new(factory),
            status: watch::Sender::new(WorkerStatus::default()),
            fatal,
            contact,
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
    /// Once `shutdown` is cancelled no lease is taken any more, and `run` returns within
    /// [`WorkerConfig::shutdown_deadline`]; cancelled before the worker has started (during
    /// lease table initialization, or the first shard sync), it returns `Ok` at once, without
    /// taking any lease.
    ///
    /// # Errors
    /// Fatal start-up errors (lease table unusable, stream missing) and fatal errors while
    /// running (the stream was deleted, a worker task failed). Failures of single shards are
    /// handled and logged, not returned. [`Error::TaskFailed`] when a shutdown did not finish
    /// within its deadline: what was left (processors, releases) was abandoned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let span = info_span!(
            "worker",
            worker_id = %self.config.worker_id,
            application = %self.config.application_name,
            stream = %self.config.stream,
        );
        let deadline = self.config.shutdown_deadline();
        let invalid_items = Arc::new(InvalidItems::new(
            &self.config.application_name,
            self.store.table_name(),
        ));
        crate::metrics::describe();
        let stream_name = self.config.stream.clone();
        let multi_stream = matches!(self.source, Source::Multi { .. });
        let watch = self.config.lease.watchers.map(watching::Watch::new);
        let (streams_tx, streams) = watch::channel(Arc::new(ActiveStreams::new()));
        let coordinator = Coordinator {
            watch,
            seeds: Arc::new(SeedSource::new(self.config.rng_seed)),
            shutdown: shutdown.clone(),
            config: self.config,
            multi_stream,
            source: Some(self.source),
            streams,
            streams_tx: Arc::new(streams_tx),
            store: self.store,
            factory: self.factory,
            held: Arc::new(HeldLeases::default()),
            observations: LeaseObservations::new(),
            consumers: JoinSet::new(),
            consumer_leases: HashMap::new(),
            running: BTreeMap::new(),
            consumers_stop: CancellationToken::new(),
            invalid_items,
            incoming: BTreeMap::new(),
            worker_loads: BTreeMap::new(),
            expiry_check: None,
            status: self.status,
            counters: WorkerStatus::default(),
            awaited_parents: BTreeMap::new(),
            done_parents: BTreeSet::new(),
            parents_done: Arc::new(Published::new(BTreeSet::new())),
            sync_requests: Arc::new(SyncRequests::default()),
            last_holes: BTreeMap::new(),
            stopping: false,
            metrics: Arc::new(Counters::default()),
            cooldown: HashMap::new(),
            fatal: self.fatal,
            contact: self.contact,
            published: WorkerMetrics::new(&stream_name, multi_stream),
        };
        let run = coordinator.run().instrument(span.clone());
        // The shutdown deadline, enforced: every step of a shutdown is bounded (see
        // `WorkerConfig::shutdown_deadline`), but a step under way when the token is cancelled
        // may run long (a release retrying against a failing table), and a processor that
        // blocks its thread cannot be aborted. Dropping the coordinator aborts its tasks.
        let backstop = async {
            shutdown.cancelled().await;
            tokio::time::sleep(deadline).await;
        };
        tokio::select! {
            biased;
            outcome = run => outcome,
            () = backstop => {
                let problem = format!(
                    "did not stop within its shutdown deadline ({deadline:?}); the leases not \
                     released yet will expire"
                );
                error!(parent: &span, ?deadline, "the worker did not stop within its shutdown deadline; abandoning what is left");
                Err(Error::TaskFailed {
                    task: "worker shutdown".into(),
                    problem,
                })
            }
        }
    }
}

/// The worker's state while it runs.
struct Coordinator<F> {
    config: Arc<WorkerConfig>,
    /// Where the streams come from, until the start-up takes it.
    source: Option<Source>,
    /// The streams consumed now, by lease-key prefix: set once in single-stream mode, by the
    /// stream sync in multi-stream mode.
    streams: watch::Receiver<Arc<ActiveStreams>>,
    streams_tx: Arc<watch::Sender<Arc<ActiveStreams>>>,
    /// Multi-stream mode: lease keys are `ACCOUNT:NAME:EPOCH:SHARD_ID`.
    multi_stream: bool,
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
    /// Lease items that do not decode, reported once per worker: shared with the shard
    /// syncer.
    invalid_items: Arc<InvalidItems>,
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
    /// Asks the shard syncer for a sync of a stream now (a shard ended without children, a
    /// hole in the leases, a stream that answered `ResourceNotFound`).
    sync_requests: Arc<SyncRequests>,
    /// Hash keys no lease covered at the last taking round, by stream (lease-key prefix).
    last_holes: BTreeMap<String, Vec<HashKeyRange>>,
    /// Cancelled when the worker is to shut down. Long steps stop starting lease writes once
    /// it is (the ones in flight finish), so the loop acts on it within about one call.
    shutdown: CancellationToken,
    /// Set once shutdown starts: no lease is taken any more.
    stopping: bool,
    /// Counters shared with the shard consumers.
    metrics: Arc<Counters>,
    /// Shards whose consumer failed, with how many times in a row and until when this worker
    /// leaves them alone.
    cooldown: HashMap<String, (u32, Instant)>,
    /// Errors that end the worker, raised by whichever task finds them.
    fatal: Arc<Fatal>,
    /// When a lease-table call last got an answer.
    contact: Arc<LeaseTableContact>,
    /// The worker-wide metrics, published from each status.
    published: WorkerMetrics,
    /// This worker's part in watching the table, when the fleet has watchers (`None`: every
    /// worker watches).
    watch: Option<watching::Watch>,
}

/// A shard consumer task and its handles.
struct RunningConsumer {
    abort: tokio::task::AbortHandle,
    /// Asks the consumer to stop gracefully (its stream is no longer consumed).
    stop: CancellationToken,
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
    Fatal,
    ConsumerExited(std::result::Result<(Id, ShardExit), JoinError>),
    BackgroundExited(std::result::Result<(&'static str, Result<()>), JoinError>),
    TakeLeases,
    CheckExpiry,
    PollHandoffs,
    PollParents,
    CheckSlots,
    StreamsChanged,
}

impl<F: RecordProcessorFactory> Coordinator<F> {
    pub(super) async fn run(mut self) -> Result<()> {
        let shutdown = self.shutdown.clone();
        let setup = self
            .config
            .lease
            .retry
            .with_max_attempts(Some(SETUP_ATTEMPTS));
        let store = self.store.clone();
        // Initialization (which may wait minutes for a new table, or hang on a stuck call: it
        // is not bounded like the other calls) is dropped when the worker is to shut down:
        // nothing is held yet, and creating the table is idempotent, so a create dropped
        // halfway is completed by the next worker to start.
        let initialized = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                info!("worker stopped before it started");
                return Ok(());
            }
            initialized = retry(
                "lease table initialization",
                setup.backoff(self.seeds.next_seed()),
                || store.initialize(),
            ) => initialized,
        };
        initialized?;
        // The stream sync of either mode: set up (its first sync, or its first discovery)
        // before anything else. Nothing is held yet, and a sync may be dropped at any point
        // (see `ShardSyncer::run`), so a shutdown meanwhile ends the worker at once.
        let sync = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                info!("worker stopped before it started");
                return Ok(());
            }
            sync = self.start_streams() => sync?,
        };
        self.streams.borrow_and_update();
        info!(lease_table = %self.store.table_name(), "worker started");

        // Background tasks, stopped by this token after the leases are released; each returns
        // its name, so an early end can be reported.
        let background_stop = CancellationToken::new();
        let mut background: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
        let renewer = |name: &'static str, leases: Arc<HeldLeases>| {
            let (store, lease_config, seeds, stop) = (
                self.store.clone(),
                self.config.lease.clone(),
                self.seeds.clone(),
                background_stop.clone(),
            );
            async move {
                run_renewer(leases, store, lease_config, seeds, stop).await;
                (name, Ok(()))
            }
            .in_current_span()
        };
        background.spawn(renewer("lease renewer", self.held.clone()));
        if let Some(watch) = &self.watch {
            // The watcher slot is renewed like a lease, by a renewer of its own: it is no
            // shard, so it stays out of `held`.
            background.spawn(renewer("watcher slot renewer", watch.roles.clone()));
        }
        let (requests, stop) = (self.sync_requests.clone(), background_stop.clone());
        background.spawn(
            async move {
                let outcome = match sync {
                    StreamSync::Single(syncer) => syncer.run(requests, stop).await,
                    StreamSync::Multi(sync) => sync.run(requests, stop).await,
                };
                ("shard sync", outcome)
            }
            .in_current_span(),
        );

        let lease_config = &self.config.lease;
        let mut taker = tokio::time::interval(lease_config.taker_interval);
        taker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut handoff_poll = tokio::time::interval(lease_config.handoff_poll_interval);
        handoff_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut parent_poll = tokio::time::interval(lease_config.parent_poll_interval);
        parent_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Without watchers the branch is never enabled, and the period is irrelevant.
        let slot_check_interval = self
            .watch
            .as_ref()
            .map_or(lease_config.taker_interval, |w| {
                w.config().slot_check_interval
            });
        let mut slot_check = tokio::time::interval(slot_check_interval);
        slot_check.set_missed_tick_behavior(MissedTickBehavior::Delay);

        let fatal = self.fatal.clone();
        let outcome = loop {
            // Pick the next event; act on it outside the select so lease writes run to
            // completion.
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Event::Shutdown,
                _ = fatal.token().cancelled() => Event::Fatal,
                Some(joined) = self.consumers.join_next_with_id() => Event::ConsumerExited(joined),
                Some(joined) = background.join_next() => Event::BackgroundExited(joined),
                _ = taker.tick() => Event::TakeLeases,
                _ = sleep_until_some(self.expiry_check), if self.expiry_check.is_some() => Event::CheckExpiry,
                _ = handoff_poll.tick(), if !self.incoming.is_empty() => Event::PollHandoffs,
                _ = parent_poll.tick(), if self.awaits_parents() => Event::PollParents,
                _ = slot_check.tick(), if self.needs_slot() => Event::CheckSlots,
                Ok(()) = self.streams.changed() => Event::StreamsChanged,
            };
            match event {
                Event::Shutdown => break Ok(()),
                Event::Fatal => {
                    break Err(fatal.take().unwrap_or_else(|| Error::TaskFailed {
                        task: "worker".into(),
                        problem: "a fatal error was raised twice".into(),
                    }));
                }
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
                Event::CheckSlots => self.check_slots().await,
                Event::StreamsChanged => self.stop_consumers_of_former_streams(),
            }
        };
        if let Err(e) = &outcome {
            error!(error = %ErrorChain(e), "worker stopping after a fatal error");
        }

        self.stopping = true;
        match &outcome {
            // Nothing may be written in this worker's name: the table is gone, or the leases
            // are another process's. Consumers stop at once, without checkpoints.
            Err(e) if e.voids_every_lease() => self.abandon_leases(e),
            _ => self.offer_leases_before_stopping().await,
        }
        let releases_end = self.stop_consumers().await;
        self.release_all(releases_end).await;
        self.release_slot().await;
        background_stop.cancel();
        while let Some(joined) = background.join_next().await {
            match joined {
                Ok((task, Err(e))) => {
                    warn!(task, error = %ErrorChain(&e), "background task ended with an error")
                }
                Err(e) => error!(error = %ErrorChain(&e), "background task failed"),
                Ok(_) => {}
            }
        }
        self.publish_status(None);
        info!("worker stopped");
        outcome
    }
}

impl<F> Coordinator<F> {
    /// True in multi-stream mode (lease keys name their stream).
    fn is_multi_stream(&self) -> bool {
        self.multi_stream
    }

    /// True when this worker consumes the stream of `lease_key`.
    fn consumes(&self, lease_key: &str) -> bool {
        self.streams
            .borrow()
            .contains_key(crate::lease::key_prefix(lease_key))
    }

    /// The stream name of `lease_key` for metrics: the configured stream in single-stream
    /// mode, the stream's name in multi-stream mode.
    fn stream_label(&self, lease_key: &str) -> String {
        match crate::lease::key_prefix(lease_key) {
            "" => self.config.stream.clone(),
            prefix => crate::MultiStreamLeaseKey::parse(&format!("{prefix}x")).map_or_else(
                |_| prefix.trim_end_matches(':').to_owned(),
                |key| key.stream.stream_name().to_owned(),
            ),
        }
    }
}

/// Sends `calls` with at most [`MAX_CONCURRENT_LEASE_CALLS`] in flight and yields their
/// outcomes as they arrive, for the caller to apply one at a time. Once `stop` is cancelled no
/// further call starts; the ones in flight run to completion (each is bounded by the request
/// timeout), so no write is dropped halfway: a take whose answer was dropped would leave a
/// lease owned by this worker that it does not know it holds.
fn concurrently<T, Fut: Future>(
    calls: Vec<T>,
    stop: Option<CancellationToken>,
    send: impl FnMut(T) -> Fut,
) -> impl Stream<Item = Fut::Output> {
    futures::stream::iter(calls)
        .take_while(move |_| std::future::ready(stop.as_ref().is_none_or(|s| !s.is_cancelled())))
        .map(send)
        .buffer_unordered(MAX_CONCURRENT_LEASE_CALLS)
}

/// Sleeps until `at` (a select branch guarded by `at.is_some()`).
async fn sleep_until_some(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}
