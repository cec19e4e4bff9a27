//! Giving leases back: releasing one (after a handoff, a failure, a shard end), and at
//! shutdown offering every lease to the other workers, stopping the consumers and releasing
//! everything.

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Coordinator, SETUP_ATTEMPTS};
use crate::backoff::{SeedSource, retry};
use crate::config::WorkerConfig;
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
    /// so the receivers see the offers and watch for the releases.
    pub(super) async fn offer_leases_before_stopping(&mut self) {
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
    pub(super) async fn stop_consumers(&mut self) {
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
    pub(super) async fn release_all(&mut self) {
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
            warn!(lease_key = %lease.lease_key(), error = %e, "could not release lease; it will expire");
            false
        }
    }
}
