//! The consumer's progress, as the worker's watchdog reads it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When a consumer last made progress (a `GetRecords` answer, a processor callback that
/// returned), and whether it is inside a processor callback: what the worker's watchdog reads.
#[derive(Debug)]
pub(crate) struct Progress {
    base: Instant,
    /// Milliseconds after `base` of the last progress.
    last: AtomicU64,
    /// Milliseconds after `base` (plus one, so 0 means "not") since a callback is running.
    in_callback: AtomicU64,
    /// Set while the consumer waits for its parent shards to finish.
    waiting: AtomicBool,
}

impl Progress {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Progress {
            base: Instant::now(),
            last: AtomicU64::new(0),
            in_callback: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn tick(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(super) fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
        self.tick();
    }

    pub(super) fn enter_callback(&self) {
        self.in_callback.store(self.now_ms() + 1, Ordering::Relaxed);
    }

    pub(super) fn exit_callback(&self) {
        self.in_callback.store(0, Ordering::Relaxed);
        self.tick();
    }

    /// How long since the last progress, unless a processor callback is running or the
    /// consumer waits for its parents.
    pub(crate) fn stalled_for(&self) -> Option<Duration> {
        let busy = self.in_callback.load(Ordering::Relaxed) != 0;
        (!busy && !self.waiting.load(Ordering::Relaxed)).then(|| {
            Duration::from_millis(
                self.now_ms()
                    .saturating_sub(self.last.load(Ordering::Relaxed)),
            )
        })
    }

    /// How long the running processor callback has been running, if one is.
    pub(crate) fn in_callback_for(&self) -> Option<Duration> {
        match self.in_callback.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(
                self.now_ms().saturating_sub(since - 1),
            )),
        }
    }
}
