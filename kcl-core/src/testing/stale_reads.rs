//! Eventually consistent reads of the in-memory lease table.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::lease::Lease;

/// How the in-memory store's eventually consistent scans
/// ([`LeaseStore::list_leases_eventually_consistent`](crate::LeaseStore::list_leases_eventually_consistent))
/// read the table once
/// [`InMemoryLeaseStore::set_stale_reads`](super::InMemoryLeaseStore::set_stale_reads) set
/// it: like a DynamoDB eventually consistent `Scan`, each item as some replica holds it, which
/// may lag the latest write by up to `max_age`. Each item's lag is drawn on its own (from `seed`, so runs replay): a scan can
/// see one lease's newest write and another's from before an older write, a lease already
/// deleted, or miss one just created. Only what was once the table's state is ever read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StaleReads {
    /// How far behind the latest writes an item may be read.
    pub max_age: Duration,
    /// Fixes the lags drawn.
    pub seed: u64,
}

impl StaleReads {
    /// Items up to `max_age` old, lags drawn from `seed`.
    pub fn new(max_age: Duration, seed: u64) -> Self {
        StaleReads { max_age, seed }
    }
}

/// The table's recent states, newest last: what stale reads choose from.
#[derive(Debug)]
pub(super) struct StaleHistory {
    reads: StaleReads,
    /// (when, the table then); the first entry is at least `max_age` old or the oldest known.
    states: VecDeque<(Instant, BTreeMap<String, Lease>)>,
    draws: u64,
    /// Scans that read some item behind its latest write.
    pub(super) lagged_scans: usize,
}

impl StaleHistory {
    pub(super) fn new(reads: StaleReads, leases: &BTreeMap<String, Lease>) -> Self {
        let mut history = StaleHistory {
            reads,
            states: VecDeque::new(),
            draws: 0,
            lagged_scans: 0,
        };
        history.remember(leases);
        history
    }

    pub(super) fn remember(&mut self, leases: &BTreeMap<String, Lease>) {
        let now = Instant::now();
        self.states.push_back((now, leases.clone()));
        // Keep one state from before the window: what an item unwritten since then reads as.
        while self
            .states
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.reads.max_age)
        {
            self.states.pop_front();
        }
    }

    /// Each key's version as of a lag drawn for it, keys absent then left out.
    pub(super) fn scan(&mut self) -> Vec<Lease> {
        let now = Instant::now();
        let keys: BTreeSet<&String> = self
            .states
            .iter()
            .flat_map(|(_, state)| state.keys())
            .collect();
        let mut found = Vec::new();
        let latest = self
            .states
            .back()
            .map(|(_, state)| state.clone())
            .unwrap_or_default();
        let mut lagged = false;
        for key in keys {
            self.draws += 1;
            let lag = self
                .reads
                .max_age
                .mul_f64(unit_draw(self.reads.seed, self.draws));
            let as_of = now.checked_sub(lag).unwrap_or(now);
            let state = self
                .states
                .iter()
                .rev()
                .find(|(at, _)| *at <= as_of)
                .or(self.states.front())
                .map(|(_, state)| state);
            let read = state.and_then(|state| state.get(key));
            lagged |= read != latest.get(key);
            if let Some(lease) = read {
                found.push(lease.clone());
            }
        }
        self.lagged_scans += usize::from(lagged);
        found
    }
}

/// A number in [0, 1) from `seed` and `n` (splitmix64).
fn unit_draw(seed: u64, n: u64) -> f64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
