//! Which workers watch the whole lease table.

use std::time::Duration;

use super::{nonzero, within_bound};
use crate::error::{Error, Result};

/// In a fleet of at least `min_workers` workers, few workers (the *watchers*) read the whole
/// lease table every `taker_interval`, see expiries and take expired and free leases; the
/// others (*members*) read it every `member_scan_interval`, to balance. A fleet's scans then
/// cost about `count` workers' instead of every worker's (see `docs/lease-table-cost.md`). In
/// a smaller fleet every worker reads the table every taker interval, as without watchers.
///
/// Watching is itself a lease: one of `count` *slot* items in the lease table (keys starting
/// with [`WATCHER_SLOT_PREFIX`](crate::WATCHER_SLOT_PREFIX)), renewed like a lease and seen
/// expired by the same observed-counter rule. A member reads the slots every
/// `slot_check_interval` and takes a free or expired one, so a watcher that crashes is
/// replaced within about a lease duration plus that interval, and one that shuts down (it
/// releases its slot) within that interval. While another watcher lives, a crashed worker's
/// leases are taken as fast as when every worker watches; a worker shutting down offers its
/// leases to the watchers, which see the offers within a taker interval.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Watchers {
    /// How many workers watch. Default 2: one more than needed, so that a watcher's crash
    /// costs no more failover time than another worker's.
    pub count: u32,
    /// How often a member reads the whole table (to take its share when the fleet changed).
    /// Default 120 s.
    pub member_scan_interval: Duration,
    /// How often a member reads the slots to take a free or expired one. Default 10 s.
    pub slot_check_interval: Duration,
    /// The fewest workers a worker must count in its last read of the table (itself included)
    /// for it to take part in watching. Default 10: below that every worker's scans cost less
    /// than its lease renewals (see `docs/lease-table-cost.md`), and a crashed worker's leases
    /// are spread over the fleet at once instead of going to the watchers first. 0 or 1:
    /// watching whatever the fleet's size.
    pub min_workers: usize,
}

impl Default for Watchers {
    fn default() -> Self {
        Watchers {
            count: 2,
            member_scan_interval: Duration::from_secs(120),
            slot_check_interval: Duration::from_secs(10),
            min_workers: 10,
        }
    }
}

impl Watchers {
    /// Sets [`Watchers::count`].
    #[must_use]
    pub fn with_count(mut self, count: u32) -> Self {
        self.count = count;
        self
    }
    /// Sets [`Watchers::member_scan_interval`].
    #[must_use]
    pub fn with_member_scan_interval(mut self, interval: Duration) -> Self {
        self.member_scan_interval = interval;
        self
    }
    /// Sets [`Watchers::slot_check_interval`].
    #[must_use]
    pub fn with_slot_check_interval(mut self, interval: Duration) -> Self {
        self.slot_check_interval = interval;
        self
    }

    /// Sets [`Watchers::min_workers`].
    #[must_use]
    pub fn with_min_workers(mut self, workers: usize) -> Self {
        self.min_workers = workers;
        self
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.count == 0 {
            return Err(Error::invalid_config(
                "lease.watchers.count",
                "must be at least 1 (for every worker to watch, set no watchers)",
            ));
        }
        for (field, d) in [
            (
                "lease.watchers.member_scan_interval",
                self.member_scan_interval,
            ),
            (
                "lease.watchers.slot_check_interval",
                self.slot_check_interval,
            ),
        ] {
            within_bound(field, d)?;
            nonzero(field, d)?;
        }
        Ok(())
    }
}
