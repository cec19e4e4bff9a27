//! Backoff as data ([`RetryConfig`]) plus an iterator of jittered delays, and one retry loop.
//!
//! The delays come from the `backon` crate (maintained; the `backoff` crate is unmaintained,
//! RUSTSEC-2025-0012). Its jitter generator is seeded from the worker's [`SeedSource`], so a
//! simulation with a fixed seed replays the same delays.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::BackoffBuilder;
use tracing::warn;

use crate::config::RetryConfig;
use crate::error::{ErrorChain, Result};

/// The delays of one retry sequence: exponential, capped, with jitter.
#[derive(Debug)]
pub(crate) struct Backoff(backon::ExponentialBackoff);

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.0.next()
    }
}

impl RetryConfig {
    /// A fresh delay sequence. `seed` drives the jitter.
    pub(crate) fn backoff(&self, seed: u64) -> Backoff {
        let builder = backon::ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_jitter()
            .with_jitter_seed(seed);
        let builder = match self.max_attempts {
            // backon counts retries, the config counts attempts.
            Some(attempts) => builder.with_max_times(attempts.saturating_sub(1)),
            None => builder.without_max_times(),
        };
        Backoff(builder.build())
    }
}

/// Seeds for jitter and shuffling, derived from one worker seed (splitmix64), so one number
/// reproduces every random choice of a worker.
#[derive(Debug)]
pub(crate) struct SeedSource(AtomicU64);

impl SeedSource {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
        SeedSource(AtomicU64::new(seed))
    }

    pub(crate) fn next_seed(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Runs `attempt` until it succeeds, fails with an error that is not retryable (see
/// [`Error::kind`](crate::Error::kind)), or `backoff` runs out of delays.
///
/// # Cancel safety
/// Dropping the future between attempts is safe; dropping it during an attempt drops that
/// attempt, so callers that write state must not race this against a cancellation.
pub(crate) async fn retry<T, F, Fut>(
    operation: &str,
    mut backoff: Backoff,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempts = 1usize;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_retryable() => match backoff.next() {
                Some(delay) => {
                    warn!(operation, attempts, ?delay, error = %ErrorChain(&error), "retrying");
                    tokio::time::sleep(delay).await;
                    attempts += 1;
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        }
    }
}

/// A per-seed pseudo-random position of a key (FNV-1a, then a splitmix64 finaliser): orders
/// equally good candidates differently per worker, the same way every time.
pub(crate) fn shuffle_key(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::error::{Error, Service};

    #[test]
    fn delays_grow_stay_capped_and_repeat_for_a_seed() {
        let config = RetryConfig::new(Duration::from_millis(100), Duration::from_secs(1))
            .with_max_attempts(Some(8));
        let a: Vec<_> = config.backoff(7).collect();
        let b: Vec<_> = config.backoff(7).collect();
        assert_eq!(a, b, "same seed, same delays");
        assert_eq!(a.len(), 7, "8 attempts are 7 retries");
        // With jitter each delay is within [base, 2·base], base capped at max_delay.
        assert!(a[0] >= Duration::from_millis(100) && a[0] <= Duration::from_millis(200));
        assert!(a.iter().all(|d| *d <= Duration::from_secs(2)));
        assert_ne!(
            a,
            config.backoff(8).collect::<Vec<_>>(),
            "other seed, other jitter"
        );
    }

    #[test]
    fn seeds_are_reproducible() {
        let (a, b) = (SeedSource::new(Some(1)), SeedSource::new(Some(1)));
        let xs: Vec<u64> = (0..4).map(|_| a.next_seed()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_seed()).collect();
        assert_eq!(xs, ys);
        assert_eq!(xs.iter().collect::<std::collections::HashSet<_>>().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_only() {
        let config = RetryConfig::new(Duration::from_millis(10), Duration::from_millis(10))
            .with_max_attempts(Some(3));
        let calls = AtomicUsize::new(0);
        let result: Result<()> = retry("op", config.backoff(1), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::Transient {
                service: Service::Kinesis,
                operation: "GetRecords",
                source: "reset".into(),
            })
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let result: Result<()> = retry("op", config.backoff(1), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::StreamNotFound {
                stream: "s".into(),
                source: None,
            })
        })
        .await;
        assert!(matches!(result, Err(Error::StreamNotFound { .. })));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "fatal errors are not retried"
        );
    }
}
