//! When each stream of a multi-stream application is synced (`ListShards`,
//! `DescribeStreamSummary`): once per interval each, spread over the interval instead of all
//! at once, and later after the service said to slow down. With 50 streams and a 60 s interval
//! that is one stream every 1.2 s, well within `DescribeStreamSummary`'s 20 calls a second per
//! account, however many workers start together (each worker's offsets are its own).
//!
//! Pure: the worker asks [`SyncSchedule::due`] at its ticks and reports each sync's outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::{Backoff, shuffle_key};
use crate::config::RetryConfig;
use crate::stream_identity::StreamIdentity;

#[derive(Debug)]
struct Entry {
    next: Instant,
    /// The delays after throttling, while the stream's syncs are throttled.
    throttled: Option<Backoff>,
}

/// The next sync of each stream of a multi-stream application.
#[derive(Debug)]
pub struct SyncSchedule {
    interval: Duration,
    retry: RetryConfig,
    seed: u64,
    entries: BTreeMap<StreamIdentity, Entry>,
}

impl SyncSchedule {
    /// Syncs every `interval`; after throttling, retries on `retry`'s delays (capped at the
    /// interval). `seed` spreads the streams' first syncs.
    pub fn new(interval: Duration, retry: RetryConfig, seed: u64) -> Self {
        SyncSchedule {
            interval,
            retry,
            seed,
            entries: BTreeMap::new(),
        }
    }

    /// Follows the streams tracked now: a new stream's first sync is at a pseudo-random
    /// offset within one interval from `now`; a stream no longer tracked is dropped.
    pub fn track(&mut self, streams: &[StreamIdentity], now: Instant) {
        self.entries.retain(|s, _| streams.contains(s));
        for stream in streams {
            let offset = self.offset(stream);
            self.entries.entry(stream.clone()).or_insert(Entry {
                next: now + offset,
                throttled: None,
            });
        }
    }

    fn offset(&self, stream: &StreamIdentity) -> Duration {
        let interval = u64::try_from(self.interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(shuffle_key(self.seed, &stream.to_string()) % interval)
    }

    /// The streams whose sync is due at `now`, earliest first.
    pub fn due(&self, now: Instant) -> Vec<StreamIdentity> {
        let mut due: Vec<(&Instant, &StreamIdentity)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.next <= now)
            .map(|(s, e)| (&e.next, s))
            .collect();
        due.sort();
        due.into_iter().map(|(_, s)| s.clone()).collect()
    }

    /// When the next sync is due, if any stream is tracked.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.next).min()
    }

    /// A sync of `stream` finished at `now`: the next one is an interval later.
    pub fn synced(&mut self, stream: &StreamIdentity, now: Instant) {
        if let Some(entry) = self.entries.get_mut(stream) {
            entry.next = now + self.interval;
            entry.throttled = None;
        }
    }

    /// A sync of `stream` was throttled (`LimitExceeded`) or failed for now at `now`: it is
    /// tried again after the next delay of its backoff, never later than an interval.
    pub fn failed(&mut self, stream: &StreamIdentity, now: Instant) {
        let (retry, seed, interval) = (&self.retry, self.seed, self.interval);
        if let Some(entry) = self.entries.get_mut(stream) {
            let delays = entry.throttled.get_or_insert_with(|| {
                retry.backoff(seed ^ shuffle_key(seed, &stream.to_string()))
            });
            let delay = delays.next().unwrap_or(interval).min(interval);
            entry.next = now + delay;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INTERVAL: Duration = Duration::from_secs(60);

    fn streams(n: usize) -> Vec<StreamIdentity> {
        (0..n)
            .map(|i| StreamIdentity::new("123456789012", format!("tenant-{i}"), 1).unwrap())
            .collect()
    }

    fn retry() -> RetryConfig {
        RetryConfig::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    #[test]
    fn fifty_streams_are_spread_over_the_interval() {
        let t0 = Instant::now();
        let all = streams(50);
        let mut schedule = SyncSchedule::new(INTERVAL, retry(), 7);
        schedule.track(&all, t0);
        // Every stream once within the first interval, and no second in any 10 s slice has
        // more than a fair share and a half (50 streams over 6 slices: about 8 each).
        let mut per_slice = [0usize; 6];
        let mut seen = 0;
        for tick in 0..600u64 {
            let now = t0 + Duration::from_millis(tick * 100);
            for stream in schedule.due(now) {
                per_slice[(tick / 100) as usize] += 1;
                seen += 1;
                schedule.synced(&stream, now);
            }
        }
        assert_eq!(seen, 50);
        assert!(per_slice.iter().all(|n| *n <= 16), "{per_slice:?}");
        // Then once per interval each.
        let later = t0 + INTERVAL * 2;
        assert_eq!(schedule.due(later).len(), 50);
    }

    #[test]
    fn a_throttled_stream_backs_off_up_to_the_interval_and_resets_after_a_sync() {
        let t0 = Instant::now();
        let all = streams(1);
        let mut schedule = SyncSchedule::new(INTERVAL, retry(), 1);
        schedule.track(&all, t0);
        let first = schedule.next_due().unwrap();
        let mut now = first;
        let mut delays = Vec::new();
        for _ in 0..10 {
            schedule.failed(&all[0], now);
            let next = schedule.next_due().unwrap();
            delays.push(next - now);
            now = next;
        }
        assert!(delays.iter().all(|d| *d <= INTERVAL), "{delays:?}");
        assert!(delays[9] > delays[0], "the delays grow: {delays:?}");
        schedule.synced(&all[0], now);
        assert_eq!(schedule.next_due(), Some(now + INTERVAL));
        schedule.failed(&all[0], now);
        assert!(schedule.next_due().unwrap() - now <= Duration::from_secs(1));
    }

    #[test]
    fn streams_come_and_go() {
        let t0 = Instant::now();
        let all = streams(3);
        let mut schedule = SyncSchedule::new(INTERVAL, retry(), 3);
        schedule.track(&all[..2], t0);
        assert!(schedule.due(t0 + INTERVAL).len() == 2);
        schedule.track(&all[1..], t0 + INTERVAL);
        let due = schedule.due(t0 + INTERVAL * 3);
        assert_eq!(due.len(), 2);
        assert!(!due.contains(&all[0]));
    }

    proptest! {
        #[test]
        fn every_tracked_stream_is_due_within_an_interval(n in 1usize..60, seed in any::<u64>()) {
            let t0 = Instant::now();
            let all = streams(n);
            let mut schedule = SyncSchedule::new(INTERVAL, retry(), seed);
            schedule.track(&all, t0);
            prop_assert_eq!(schedule.due(t0 + INTERVAL).len(), n);
            prop_assert!(schedule.next_due().unwrap() < t0 + INTERVAL);
        }
    }
}
