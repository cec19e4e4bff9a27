//! Renewal of held leases.
//!
//! One task, owned by the worker, renews every held lease each `renewal_interval`. A renewal
//! that fails with a retryable error is retried with backoff until the next round is due; a
//! lease that could not be renewed before it runs out ([`HeldLease::valid_until`]) is marked
//! lost at that instant, so its consumer stops before another worker can see it expired. A
//! failed condition marks the lease lost at once. Lost leases reach the worker through their
//! tokens; the renewer never drops a lease silently.

use std::sync::Arc;

use futures::StreamExt;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::SeedSource;
use crate::config::LeaseConfig;
use crate::error::ErrorKind;
use crate::lease::held::{HeldLease, HeldLeases};
use crate::lease::{LeaseStore, LeaseUpdate};

/// Renewals sent at once. The Java KCL uses a pool of 20 renewal threads.
const MAX_CONCURRENT_RENEWALS: usize = 20;

/// Renews held leases until `stop` is cancelled.
///
/// Exit: returns when `stop` is cancelled, after the round in progress (rounds are not
/// interrupted, so no write is dropped halfway).
pub(crate) async fn run_renewer(
    held: Arc<HeldLeases>,
    store: Arc<dyn LeaseStore>,
    config: LeaseConfig,
    seeds: Arc<SeedSource>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.renewal_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Outside the select: a round runs to completion.
        renew_round(&held, store.as_ref(), &config, &seeds).await;
    }
}

/// Renews every held lease once; returns when each renewal succeeded, failed for good, or
/// ran out of time (the next round is due, or the lease ran out).
pub(crate) async fn renew_round(
    held: &HeldLeases,
    store: &dyn LeaseStore,
    config: &LeaseConfig,
    seeds: &SeedSource,
) {
    let round_deadline = Instant::now() + config.renewal_interval;
    futures::stream::iter(held.all())
        .map(|lease| renew_one(lease, store, config, seeds.next_seed(), round_deadline))
        .buffer_unordered(MAX_CONCURRENT_RENEWALS)
        .collect::<()>()
        .await;
}

async fn renew_one(
    lease: Arc<HeldLease>,
    store: &dyn LeaseStore,
    config: &LeaseConfig,
    seed: u64,
    round_deadline: Instant,
) {
    let mut backoff = config.retry.backoff(seed);
    loop {
        if lease.is_lost() {
            return;
        }
        if Instant::now() >= lease.valid_until() {
            lease.mark_lost("not renewed within the lease duration");
            return;
        }
        // Bounded by the lease's end: past it another worker may take the lease, so an
        // answer that comes later must not keep the consumer running.
        let attempt =
            tokio::time::timeout_at(lease.valid_until(), lease.write(store, &LeaseUpdate::Renew))
                .await;
        let error = match attempt {
            Ok(Ok(renewed)) => {
                debug!(lease_key = %lease.lease_key(), counter = renewed.counter, "renewed");
                return;
            }
            Ok(Err(error)) if error.kind() == ErrorKind::ConditionFailed => return,
            Ok(Err(error)) => error.to_string(),
            Err(_elapsed) => {
                lease.mark_lost("renewal did not answer before the lease ran out");
                return;
            }
        };
        // Any other failure (retryable or not) is retried: a lease is only given up when it
        // runs out or is proven taken.
        let delay = backoff.next().unwrap_or(config.retry.max_delay);
        let retry_at = Instant::now() + delay;
        let lease_deadline = lease.valid_until();
        if retry_at >= round_deadline && round_deadline < lease_deadline {
            warn!(lease_key = %lease.lease_key(), error = %error, "renewal failed; next round retries");
            return;
        }
        warn!(lease_key = %lease.lease_key(), error = %error, ?delay, "renewal failed; retrying");
        // At the lease's end at the latest: the loop's first check then marks it lost.
        tokio::time::sleep_until(retry_at.min(lease_deadline)).await;
    }
}
