//! How a worker's streams are set up before its loop starts: in single-stream mode the first
//! shard sync and the fan-out consumer, then the one stream published; in multi-stream mode
//! the table checked and the first discovery run, which publishes the streams it found.

use std::sync::Arc;

use tracing::warn;

use super::multi_stream::{self, MultiStreamSync};
use super::streams::{ActiveStream, ActiveStreams};
use super::{Coordinator, fan_out};
use crate::config::Retrieval;
use crate::error::{Error, ErrorChain, Result};
use crate::processor::RecordProcessorFactory;
use crate::shard_sync::ShardSyncer;
use crate::stream::StreamClient;
use crate::stream_tracker::{StreamClients, StreamTracker};

/// Where a worker's streams come from.
pub(super) enum Source {
    /// One stream; lease keys are shard ids.
    Single(Arc<dyn StreamClient>),
    /// The streams a tracker lists; lease keys are `ACCOUNT:NAME:EPOCH:SHARD_ID`.
    Multi {
        tracker: Arc<dyn StreamTracker>,
        clients: Arc<dyn StreamClients>,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Single(stream) => f.debug_tuple("Single").field(stream).finish(),
            Source::Multi { tracker, .. } => f
                .debug_struct("Multi")
                .field("tracker", tracker)
                .finish_non_exhaustive(),
        }
    }
}

/// The background task that keeps the lease table in step with the streams.
pub(super) enum StreamSync {
    Single(ShardSyncer),
    Multi(Box<MultiStreamSync>),
}

impl<F: RecordProcessorFactory> Coordinator<F> {
    /// Sets up the streams: in single-stream mode the first shard sync and the fan-out
    /// consumer, then the one stream is published; in multi-stream mode the first discovery,
    /// which publishes the streams it found. Returns the sync to run in the background.
    pub(super) async fn start_streams(&mut self) -> Result<StreamSync> {
        let source = self.source.take().ok_or_else(|| Error::TaskFailed {
            task: "worker".into(),
            problem: "started twice".into(),
        })?;
        let watching = self.watch.as_ref().map(|w| w.watching.clone());
        let (tracker, clients) = match source {
            Source::Single(stream) => {
                let mut syncer = ShardSyncer {
                    stream: stream.clone(),
                    store: self.store.clone(),
                    stream_name: Some(self.config.stream.clone()),
                    initial_position: self.config.initial_position,
                    config: self.config.clone(),
                    seeds: self.seeds.clone(),
                    invalid_items: self.invalid_items.clone(),
                    watching,
                };
                // The first sync runs before anything else: a missing stream stops the
                // worker here.
                match syncer.sync_once().await {
                    // A lease store or stream failing for longer than the sync's retries is
                    // no reason to give up a worker (found by the simulation: a worker started
                    // during an outage ended with a transient PutItem error and the fleet
                    // never balanced): the background sync tries again at once, and the
                    // taking rounds go on meanwhile.
                    Err(e) if e.is_retryable() => {
                        warn!(error = %ErrorChain(&e), "the first shard sync failed; retrying in the background");
                        self.sync_requests.request("");
                    }
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
                // Before any lease is taken: shards are read as this consumer.
                let consumer_arn = match &self.config.retrieval {
                    Retrieval::FanOut(fan_out) => Some(
                        fan_out::active_consumer(
                            stream.as_ref(),
                            fan_out,
                            &self.config.application_name,
                            &self.seeds,
                        )
                        .await?
                        .into(),
                    ),
                    Retrieval::Polling => None,
                };
                let active = ActiveStream {
                    identity: None,
                    name: self.config.stream.clone(),
                    initial_position: self.config.initial_position,
                    client: stream,
                    consumer_arn,
                };
                self.streams_tx.send_replace(Arc::new(ActiveStreams::from([(
                    String::new(),
                    Arc::new(active),
                )])));
                return Ok(StreamSync::Single(syncer));
            }
            Source::Multi { tracker, clients } => (tracker, clients),
        };
        let mut sync = multi_stream::MultiStreamSync::new(multi_stream::Setup {
            tracker,
            clients,
            store: self.store.clone(),
            config: self.config.clone(),
            seeds: self.seeds.clone(),
            invalid_items: self.invalid_items.clone(),
            watching,
            streams: self.streams_tx.clone(),
            counters: self.metrics.clone(),
        });
        sync.check_table().await?;
        sync.discover().await;
        Ok(StreamSync::Multi(Box::new(sync)))
    }
}
