//! Watcher slots: lease-table items that are not leases of shards, but the right to watch the
//! whole table every taker interval (see [`Watchers`](crate::Watchers)).
//!
//! A slot is stored as a lease (key, owner, counter, a `TRIM_HORIZON` checkpoint), so it is
//! taken, renewed, fenced, released and seen expired exactly as a shard's lease is. Its key
//! marks it: every read of the table that plans shards (taking rounds, shard syncs,
//! `kcl-admin`) sets the slots aside first.

use crate::lease::{Lease, LeaseScan};
use crate::sequence::Checkpoint;

/// The key prefix of watcher slots. No Kinesis shard id starts with it (shard ids are
/// `shardId-` and digits), so it cannot collide with a lease of a shard.
pub const WATCHER_SLOT_PREFIX: &str = "kcl-watcher-slot-";

/// Whether `lease_key` names a watcher slot rather than a shard.
pub fn is_watcher_slot(lease_key: &str) -> bool {
    lease_key.starts_with(WATCHER_SLOT_PREFIX)
}

/// The keys of `count` slots.
pub(crate) fn slot_keys(count: u32) -> Vec<String> {
    (0..count)
        .map(|i| format!("{WATCHER_SLOT_PREFIX}{i}"))
        .collect()
}

/// A free slot, as created when missing.
pub(crate) fn new_slot(key: &str) -> Lease {
    Lease::new(key, Checkpoint::TrimHorizon)
}

impl LeaseScan {
    /// Removes the watcher slots from the scan and returns them.
    pub fn take_watcher_slots(&mut self) -> Vec<Lease> {
        let (slots, leases) = std::mem::take(&mut self.leases)
            .into_iter()
            .partition(|lease| is_watcher_slot(&lease.lease_key));
        self.leases = leases;
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_set_aside_and_never_look_like_shards() {
        let keys = slot_keys(2);
        assert_eq!(keys, ["kcl-watcher-slot-0", "kcl-watcher-slot-1"]);
        let mut scan = LeaseScan::default();
        scan.leases.push(new_slot(&keys[1]));
        scan.leases
            .push(Lease::new("shardId-000000000000", Checkpoint::TrimHorizon));
        let slots = scan.take_watcher_slots();
        assert_eq!(slots.len(), 1);
        assert_eq!(scan.leases.len(), 1);
        assert!(!is_watcher_slot("shardId-000000000001"));
    }
}
