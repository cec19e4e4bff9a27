//! Giving leases back: releasing one (after a handoff, a failure, a shard end), and at
//! shutdown offering every lease to the other workers, stopping the consumers and releasing
//! everything.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::watching::Receivers;
use super::{Coordinator, MAX_CONCURRENT_LEASE_CALLS, SETUP_ATTEMPTS, concurrently};
use crate::backoff::{SeedSource, retry};
use crate::config::WorkerConfig;
use crate::error::{Error, ErrorChain};
use crate::lease::held::HeldLease;
use crate::lease::{LeaseStore, LeaseUpdate};
use crate::processor::RecordProcessorFactory;

impl<F: RecordProcessorFactory> Coordinator<F> {
    pub(super) async fn release(&mut self, key: &str) -> bool {
        match self.held.remove(key) {
            Some(lease) => {
                release_lease(&lease, self.store.as_ref(), &self.config, &self.seeds).await
            }
            None => false,
        }
    }

    /// Before stopping: offers each held lease to the least loaded other live worker (a
    /// handoff request written by the owner), then keeps processing for one taking interval
    /// so the receivers see the offers and watch for the releases. With watchers, the offers
    /// go only to watchers (see [`Coordinator::find_offer_receivers`]), and offers to a
    /// watcher that stopped meanwhile are moved to one that did not.
    pub(super) async fn offer_leases_before_stopping(&mut self) {
        let me = self.config.worker_id.clone();
        let succession_deadline = Instant::now() + self.config.succession_wait();
        let found = self.find_offer_receivers(succession_deadline).await;
        let fresh_receivers = matches!(found, Receivers::Watchers(_, true));
        let receivers: Vec<(usize, String)> = match found {
            Receivers::Anyone => self
                .worker_loads
                .iter()
                .filter(|(w, _)| **w != me)
                .map(|(w, c)| (*c, w.clone()))
                .collect(),
            Receivers::Watchers(watchers, _) => watchers
                .into_iter()
                .map(|w| (self.worker_loads.get(&w).copied().unwrap_or(0), w))
                .collect(),
            Receivers::Nobody => return,
        };
        let leases = self.held.all();
        if receivers.is_empty() || leases.is_empty() {
            return;
        }
        let workers = receivers.len();
        let offers = assign_offers(leases, receivers);
        let store = self.store.clone();
        let mut sent = concurrently(offers, None, |(lease, to)| {
            let store = store.clone();
            async move {
                let offer = LeaseUpdate::RequestHandoff { to: to.clone() };
                let result = lease.write(store.as_ref(), &offer).await;
                (lease, to, result)
            }
        });
        let mut landed = Vec::new();
        let answers = async {
            while let Some((lease, to, result)) = sent.next().await {
                match result {
                    Ok(_) => {
                        debug!(lease_key = %lease.lease_key(), to = %to, "offered lease");
                        landed.push((lease, to));
                    }
                    // Already asked for by another worker: the release goes to that one.
                    Err(e) => {
                        debug!(lease_key = %lease.lease_key(), error = %ErrorChain(&e), "lease not offered")
                    }
                }
            }
        };
        // The offers get one call's time together (see `WorkerConfig::shutdown_deadline`); the
        // rest are given up. Dropping an offer halfway is harmless: an offer does not move the
        // lease counter, so the release still matches its fence, and one that landed unseen
        // only reserves the released lease for its receiver.
        if tokio::time::timeout(self.config.lease.request_timeout, answers)
            .await
            .is_err()
        {
            debug!(
                offered = landed.len(),
                "not every offer was answered in time; those leases are released to any worker"
            );
        }
        // A watcher that only just took its slot may be in the middle of its first read of the
        // table, and see the offers a round later: give it one more taker interval, out of
        // what is left of the succession wait (so the shutdown deadline holds).
        let wait = match (
            fresh_receivers,
            succession_deadline.checked_duration_since(Instant::now()),
        ) {
            (true, Some(left)) => self
                .config
                .offer_wait()
                .max(left.min(self.config.offer_wait() + self.config.lease.taker_interval)),
            _ => self.config.offer_wait(),
        };
        info!(
            offered = landed.len(),
            receivers = workers,
            ?wait,
            "offered leases to other workers; processing until they watch"
        );
        self.process_until(Instant::now() + wait).await;
        self.redirect_offers(landed, succession_deadline).await;
    }

    /// Keeps processing (acting on consumers that exit: shard ends, failures) until
    /// `deadline`.
    pub(super) async fn process_until(&mut self, deadline: Instant) {
        loop {
            tokio::select! {
                biased;
                Some(joined) = self.consumers.join_next_with_id() => self.on_consumer_exit(joined).await,
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Drops every held lease without writing: after `error` nothing may be written in this
    /// worker's name ([`Error::voids_every_lease`]). Each consumer stops at its next step, its
    /// processor told `lease_lost`, and nothing is released.
    pub(super) fn abandon_leases(&mut self, error: &Error) {
        let leases = self.held.all();
        warn!(leases = leases.len(), error = %ErrorChain(error), "dropping every lease without writing");
        for lease in leases {
            lease.mark_lost("the worker stops on an error that voids its leases");
        }
    }

    /// Asks every consumer to stop and waits up to the shutdown timeout; consumers that do not
    /// finish in time are aborted (their processors dropped mid-call). Each lease is released
    /// as soon as its consumer stopped, without waiting for the other shards, and the releases
    /// run together: a worker with many leases stops in about one call's time, not one per
    /// lease. The releases are owned here and awaited before this returns, or given up one
    /// lease duration after the processors' deadline (see `WorkerConfig::shutdown_deadline`):
    /// past that, a lease left to expire would have been free sooner than one still being
    /// released. Returns that instant, the end of the releases.
    pub(super) async fn stop_consumers(&mut self) -> Instant {
        self.consumers_stop.cancel();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let release_deadline = deadline + self.config.lease.lease_duration;
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_LEASE_CALLS));
        let mut releases = FuturesUnordered::new();
        let mut aborted = false;
        loop {
            tokio::select! {
                Some(joined) = self.consumers.join_next_with_id() => {
                    let Some((key, exit)) = self.consumer_exited(joined) else { continue };
                    if let Some(release) = self.act_on_exit(key, exit).await {
                        let (store, config, seeds, permits) = (
                            self.store.clone(),
                            self.config.clone(),
                            self.seeds.clone(),
                            permits.clone(),
                        );
                        releases.push(async move {
                            // Never closed, so always granted.
                            let _permit = permits.acquire_owned().await;
                            let released =
                                release_lease(&release.lease, store.as_ref(), &config, &seeds).await;
                            (release, released)
                        });
                    }
                }
                Some((release, released)) = releases.next() => {
                    self.count_release(&release, released);
                }
                _ = tokio::time::sleep_until(deadline), if !aborted && !self.consumers.is_empty() => {
                    warn!(
                        consumers = self.consumers.len(),
                        timeout = ?self.config.shutdown_timeout,
                        "shard consumers did not stop in time; aborting them"
                    );
                    self.consumers.abort_all();
                    aborted = true;
                }
                // A consumer still there was aborted but never yields (a processor blocking its
                // thread): its lease is left to expire, like the releases still retrying.
                _ = tokio::time::sleep_until(release_deadline), if !releases.is_empty() || !self.consumers.is_empty() => {
                    warn!(
                        releases = releases.len(),
                        consumers = self.consumers.len(),
                        "leases not released in time; they will expire"
                    );
                    break;
                }
                else => break,
            }
        }
        self.publish_status(None);
        release_deadline
    }

    /// Releases every held lease, the releases sent together, until `deadline`; the leases
    /// not released by then are left to expire.
    pub(super) async fn release_all(&mut self, deadline: Instant) {
        let leases = self.held.all();
        for lease in &leases {
            self.held.remove(lease.lease_key());
        }
        let (count, mut ended) = (leases.len(), 0usize);
        let (store, config, seeds) = (self.store.as_ref(), &self.config, &self.seeds);
        let releases = concurrently(leases, None, |lease| async move {
            release_lease(&lease, store, config, seeds).await
        })
        .for_each(|_| {
            ended += 1;
            std::future::ready(())
        });
        if tokio::time::timeout_at(deadline, releases).await.is_err() {
            warn!(
                leases = count - ended,
                "leases not released in time; they will expire"
            );
        }
    }
}

pub(super) async fn release_lease(
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
            warn!(lease_key = %lease.lease_key(), error = %ErrorChain(&e), "could not release lease; it will expire");
            // No longer held, so nothing may write it any more: a renewal still retrying
            // would keep it alive, and would meet this worker's own next take of it as a
            // counter moved by another process.
            lease.mark_lost("could not be released; left to expire");
            false
        }
    }
}

/// Assigns each lease to the least loaded receiver, counting the leases assigned before it.
/// `receivers` are (load, worker id) and must not be empty.
pub(super) fn assign_offers(
    leases: Vec<Arc<HeldLease>>,
    mut receivers: Vec<(usize, String)>,
) -> Vec<(Arc<HeldLease>, String)> {
    leases
        .into_iter()
        .map(|lease| {
            receivers.sort();
            let (load, to) = &mut receivers[0];
            *load += 1;
            (lease, to.clone())
        })
        .collect()
}
