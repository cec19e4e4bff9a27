//! Shard consumers: one task per held lease, started here, and acted on when it exits or
//! stops making progress.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinError};
use tokio::time::Instant;
use tracing::{Instrument, error, info, warn};

use super::shutdown::release_lease;
use super::streams::shard_id_of;
use super::{Coordinator, MAX_SHARD_COOLDOWN, RunningConsumer};
use crate::consumer::{Progress, ShardConsumer, ShardExit, ShardStats};
use crate::counters::Counters;
use crate::error::{Error, ErrorChain};
use crate::lease::held::{HeldLease, HeldLeases};
use crate::lease::key_prefix;
use crate::processor::{RecordProcessorFactory, ShardContext};

impl<F: RecordProcessorFactory> Coordinator<F> {
    pub(super) fn start_consumer(&mut self, lease: Arc<HeldLease>, parents: BTreeSet<String>) {
        let key = lease.lease_key().to_owned();
        let stop = self.consumers_stop.child_token();
        let progress = Progress::new();
        let stream = self.streams.borrow().get(key_prefix(&key)).cloned();
        let abort = match stream {
            Some(stream) => {
                if !parents.is_subset(&self.done_parents) {
                    self.awaited_parents.insert(key.clone(), parents);
                }
                let consumer = ShardConsumer {
                    shard: ShardContext::new(shard_id_of(&key), stream.identity.clone()),
                    lease,
                    store: self.store.clone(),
                    config: self.config.clone(),
                    seeds: self.seeds.clone(),
                    factory: self.factory.clone(),
                    shutdown: stop.clone(),
                    parents_done: self.parents_done.clone(),
                    stats: Arc::new(ShardStats::new(
                        self.metrics.clone(),
                        &self.config.metrics,
                        &stream.name,
                        &key,
                    )),
                    progress: progress.clone(),
                    stream,
                };
                self.consumers.spawn(consumer.run().in_current_span())
            }
            // Its stream left this worker's list between the take and now: the exit of a
            // consumer asked to stop releases the lease.
            None => {
                info!(lease_key = %key, "took a lease of a stream no longer consumed; releasing it");
                self.consumers.spawn(async { ShardExit::Shutdown })
            }
        };
        self.consumer_leases.insert(abort.id(), key.clone());
        self.running.insert(
            key,
            RunningConsumer {
                abort,
                stop,
                progress,
                warned_slow: false,
            },
        );
    }

    /// Asks the consumers of streams no longer consumed to stop: each processor gets
    /// `shutdown_requested` (to checkpoint), and the exit releases its lease for nobody in
    /// particular. The leases are deleted once the stream has been gone for the grace period
    /// (see `multi_stream`), or taken again if it comes back.
    pub(super) fn stop_consumers_of_former_streams(&mut self) {
        let streams = self.streams.borrow_and_update().clone();
        for (key, consumer) in &self.running {
            if !streams.contains_key(key_prefix(key)) && !consumer.stop.is_cancelled() {
                info!(lease_key = %key, "its stream is no longer consumed; stopping the shard consumer");
                consumer.stop.cancel();
            }
        }
    }

    /// Acts on a consumer's exit, releasing its lease if that is what the exit calls for.
    pub(super) async fn on_consumer_exit(
        &mut self,
        joined: std::result::Result<(Id, ShardExit), JoinError>,
    ) {
        let Some((key, exit)) = self.consumer_exited(joined) else {
            return;
        };
        if let Some(release) = self.act_on_exit(key, exit).await {
            let released = release_lease(
                &release.lease,
                self.store.as_ref(),
                &self.config,
                &self.seeds,
            )
            .await;
            self.count_release(&release, released);
        }
        self.publish_status(None);
    }

    /// The bookkeeping of a consumer's exit: which lease it served, and the shard's cooldown
    /// after a failure. `None` for a task this worker does not know.
    pub(super) fn consumer_exited(
        &mut self,
        joined: std::result::Result<(Id, ShardExit), JoinError>,
    ) -> Option<(String, ShardExit)> {
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
            return None;
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
        Some((key, exit))
    }

    /// Acts on a consumer's exit, but for the release of its lease, which it returns: the
    /// caller sends it at once, alone or (at shutdown) together with the others.
    pub(super) async fn act_on_exit(&mut self, key: String, exit: ShardExit) -> Option<Release> {
        let release = |held: &HeldLeases, handed_over| {
            held.remove(&key)
                .map(|lease| Release { lease, handed_over })
        };
        match exit {
            ShardExit::ShardEnded { children } => {
                self.on_shard_end(&key, children).await;
                None
            }
            ShardExit::ShardGone => {
                // In multi-stream mode a shard is also "gone" when its whole stream was
                // deleted (or recreated): its leases then wait for the grace period instead.
                if self.stream_is_gone(&key).await {
                    info!(lease_key = %key, "the shard's stream is gone; releasing its lease for the grace period");
                    self.sync_requests.request(&key);
                    return release(&self.held, false);
                }
                if let Some(lease) = self.held.remove(&key) {
                    match lease.delete(self.store.as_ref()).await {
                        Ok(()) => {
                            info!(lease_key = %key, "deleted the lease of a shard past retention")
                        }
                        Err(e) => {
                            warn!(lease_key = %key, error = %ErrorChain(&e), "deleting the lease of a shard past retention failed");
                            // No longer held: nothing may write it any more (see `release_lease`).
                            lease.mark_lost("its deletion failed");
                        }
                    }
                }
                self.mark_parents_done([key]);
                None
            }
            ShardExit::LeaseLost => {
                self.held.remove(&key);
                None
            }
            // The release keeps `handoffTo`: the lease is reserved for the requester.
            ShardExit::HandedOff => release(&self.held, true),
            // Only a shutdown stops consumers this way: release at once, to the worker the
            // lease was offered to, without waiting for the other shards.
            ShardExit::Shutdown => release(&self.held, false),
            ShardExit::Failed(e) => {
                // A deleted stream: its sync finds out and stops consuming it (in single-stream
                // mode the worker stops). In multi-stream mode any failure of the stream's
                // side asks for its identity to be checked: a stream recreated under its
                // name answers old checkpoints with errors of its own.
                let stream_side = !matches!(
                    e,
                    Error::Processor { .. } | Error::ShardEndNotCheckpointed { .. }
                );
                if matches!(e, Error::StreamNotFound { .. })
                    || (self.is_multi_stream() && stream_side)
                {
                    self.sync_requests.request(&key);
                }
                let failures = self.cooldown.get(&key).map_or(1, |(n, _)| *n);
                error!(lease_key = %key, error = %ErrorChain(&e), failures, "shard consumer failed; releasing the lease so the shard restarts from its checkpoint");
                release(&self.held, false)
            }
        }
    }

    /// In multi-stream mode: true when the stream of `key` no longer exists under the identity
    /// in the key (deleted, or recreated under its name). A failed check says no: the shard
    /// is then treated as past retention, as in single-stream mode.
    async fn stream_is_gone(&self, key: &str) -> bool {
        if !self.is_multi_stream() {
            return false;
        }
        let Some(stream) = self.streams.borrow().get(key_prefix(key)).cloned() else {
            return true;
        };
        match stream.client.stream_identity().await {
            Ok(current) => stream.identity.as_ref() != Some(&current),
            Err(Error::StreamNotFound { .. }) => true,
            Err(_) => false,
        }
    }

    /// Counts a release that ended a handoff.
    pub(super) fn count_release(&mut self, release: &Release, released: bool) {
        if released && release.handed_over {
            self.counters.handed_over += 1;
        }
    }

    /// Restarts shard consumers that made no progress (no `GetRecords` answer, no processor
    /// callback done) for `processing.watchdog_timeout`: aborted, their lease released by the
    /// exit handling, and taken again. A processor callback running that long is the
    /// processor's business: logged once, not interrupted.
    pub(super) fn watchdog(&mut self) {
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
                && !consumer.warned_slow
            {
                warn!(lease_key = %key, ?running, "a record processor callback has been running for a long time");
                consumer.warned_slow = true;
            }
        }
    }
}

/// A lease to release after its consumer exited.
pub(super) struct Release {
    pub(super) lease: Arc<HeldLease>,
    /// The consumer handed the shard over on request.
    handed_over: bool,
}
