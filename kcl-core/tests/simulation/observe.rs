//! What the simulation watches: the records put and flushed, the trace, the violations of the
//! invariants, and the coverage counters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl_core::{Checkpoint, ExtendedSequenceNumber};
use tokio::time::Instant;

/// splitmix64: the simulation's only source of randomness.
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub(crate) fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// A record as the simulation knows it: its partition key and its number within that key.
pub(crate) type RecordId = (String, u64);

#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// Each record the first time it was flushed (written to the sink), in order.
    pub(crate) first_processed: Vec<RecordId>,
    /// The sink: every record flushed at least once. A processor that checkpoints each batch
    /// flushes each batch before its checkpoint.
    pub(crate) processed: BTreeSet<RecordId>,
    /// Records delivered to a buffering processor and not flushed yet, per processor instance
    /// still alive (an instance removes its entry when it is dropped).
    pub(crate) buffered: BTreeMap<u64, Vec<RecordId>>,
    /// Per shard, the records put, in sequence-number order.
    pub(crate) records: HashMap<String, Vec<(ExtendedSequenceNumber, RecordId)>>,
    /// Per shard, how many of its first records are known to be flushed and covered by a
    /// checkpoint (checked once, since checkpoints never move back and the sink only grows).
    pub(crate) verified: HashMap<String, usize>,
    /// Shards whose processor let the default `shard_ended` pass over unflushed records. A
    /// correct library must not write `SHARD_END` then; later processors of the shard flush
    /// in `shard_ended` (the operator fixed the processor), so the shard can finish.
    pub(crate) ended_unflushed: BTreeSet<String>,
    /// Workers running and not asked to stop.
    pub(crate) live: BTreeSet<String>,
    /// Per worker, until when its lease-table calls may have failed or hung: until then a
    /// lease taken from it as expired is no sign of a bug.
    pub(crate) disturbed_until: HashMap<String, Instant>,
    pub(crate) violations: Vec<String>,
    /// A line per notable event, printed when a seed is replayed.
    pub(crate) trace: Vec<String>,
    pub(crate) coverage: Coverage,
    /// When the run started (virtual time).
    pub(crate) started: Option<Instant>,
    /// Fan-out fleets: per worker id and shard, the subscriptions its client holds open (not
    /// ended, failed or dropped). See [`crate::fan_out::Watched`].
    pub(crate) subscribed: BTreeMap<(String, String), usize>,
}

impl Observed {
    /// Writes records to the sink.
    pub(crate) fn flush(&mut self, records: impl IntoIterator<Item = RecordId>) {
        for id in records {
            if self.processed.insert(id.clone()) {
                self.first_processed.push(id);
            }
        }
    }

    /// Invariant 1 at the moment a checkpoint lands: every record it covers was flushed.
    /// A checkpoint past a record that was delivered but never flushed loses that record for
    /// good (nobody will deliver it again).
    pub(crate) fn check_flushed(&mut self, lease_key: &str, checkpoint: &Checkpoint, by: &str) {
        let Some(records) = self.records.get(lease_key) else {
            return;
        };
        let from = self.verified.get(lease_key).copied().unwrap_or(0);
        let mut lost = Vec::new();
        let mut next = from;
        while next < records.len() && checkpoint.covers(&records[next].0) {
            if !self.processed.contains(&records[next].1) {
                lost.push(records[next].1.clone());
            }
            next += 1;
        }
        self.verified.insert(lease_key.to_owned(), next);
        if let Some(first) = lost.first() {
            let what = format!(
                "{lease_key}: checkpoint {checkpoint} by {by} covers {} records never flushed, \
                 {}:{} first",
                lost.len(),
                first.0,
                first.1
            );
            self.violations.push(what);
        }
    }
}

pub(crate) type Shared = Arc<Mutex<Observed>>;

pub(crate) fn trace(observed: &Shared, line: String) {
    let mut observed = observed.lock().unwrap();
    let at = observed.started.map_or(0, |s| s.elapsed().as_millis());
    observed.trace.push(format!("{at:>8} ms  {line}"));
}

pub(crate) fn violation(observed: &Shared, what: String) {
    observed.lock().unwrap().violations.push(what);
}

pub(crate) fn covered(observed: &Shared, count: impl FnOnce(&mut Coverage)) {
    count(&mut observed.lock().unwrap().coverage);
}

/// What the schedules made happen, summed over seeds: proof that the invariants were checked
/// against the situations they are about, not vacuously.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Coverage {
    /// Checkpoints refused because the writer no longer held the lease (zombies fenced out).
    pub(crate) fenced_checkpoints: u64,
    /// Leases taken from another live-looking owner without a handoff (expired or stolen).
    pub(crate) taken_from_another: u64,
    /// Leases handed over on request.
    pub(crate) handed_over: u64,
    /// Child shards that processed records after their parents.
    pub(crate) children_processed: u64,
    /// Injected processor errors and panics.
    pub(crate) processor_failures: u64,
    /// Workers paused past or near their lease duration.
    pub(crate) pauses: u64,
    pub(crate) splits: u64,
    pub(crate) merges: u64,
    /// Seeds run with each new shape (the shapes' counters are demanded only when some ran).
    pub(crate) buffering_seeds: u64,
    pub(crate) paged_scan_seeds: u64,
    pub(crate) hang_seeds: u64,
    pub(crate) stale_scan_seeds: u64,
    pub(crate) watcher_seeds: u64,
    /// Watcher slots taken from another worker (a watcher that crashed, paused or stopped).
    pub(crate) slots_taken_over: u64,
    /// Offers moved by a worker shutting down from a watcher that stopped meanwhile to a live
    /// one.
    pub(crate) offers_redirected: u64,
    /// Eventually consistent scans that read some item behind its latest write.
    pub(crate) lagged_scans: u64,
    /// Takes refused by their fence (planned on a lease that had moved since it was read).
    pub(crate) fenced_takes: u64,
    /// Flushes of buffering processors (each followed by a checkpoint at the last record).
    pub(crate) flushes: u64,
    /// Buffering processors that panicked holding unflushed records.
    pub(crate) panics_mid_buffer: u64,
    /// Shard ends reached by a buffering processor holding unflushed records.
    pub(crate) shard_ends_mid_buffer: u64,
    /// Paged scans during which a write landed (each could miss or see it).
    pub(crate) raced_scans: u64,
    /// Lease-table calls that hung until their caller gave up.
    pub(crate) hangs: u64,
    /// Processes stopped for sharing a worker id with another (the shared-id ending).
    pub(crate) duplicates_stopped: u64,
    /// Seeds whose fleet read through enhanced fan-out (the fan-out counters are demanded
    /// only when some did).
    pub(crate) fan_out_seeds: u64,
    /// Subscriptions opened.
    pub(crate) subscriptions: u64,
    /// Subscriptions that ended cleanly (their session was over) before the shard's end.
    pub(crate) session_ends: u64,
    /// Subscriptions that failed mid-stream (injected, or cut off with their worker's client).
    pub(crate) subscriptions_failed: u64,
    /// Subscribes refused with `ResourceInUse` (another subscription open or lingering, the
    /// consumer not yet active, or injected).
    pub(crate) subscribes_in_use: u64,
    /// ... of which while a dropped subscription of the shard still lingered (a handoff or a
    /// replaced subscription, as on AWS).
    pub(crate) refused_by_lingering: u64,
    /// Subscriptions made silent.
    pub(crate) silenced: u64,
    /// Subscriptions dropped by their client before they ended (a silent one given up, a
    /// lease lost or handed over, a worker stopping).
    pub(crate) subscriptions_dropped: u64,
    /// Shard ends received through a subscription (the event with the child shards).
    pub(crate) fan_out_shard_ends: u64,
}

impl std::ops::AddAssign for Coverage {
    fn add_assign(&mut self, o: Coverage) {
        self.fenced_checkpoints += o.fenced_checkpoints;
        self.taken_from_another += o.taken_from_another;
        self.handed_over += o.handed_over;
        self.children_processed += o.children_processed;
        self.processor_failures += o.processor_failures;
        self.pauses += o.pauses;
        self.splits += o.splits;
        self.merges += o.merges;
        self.buffering_seeds += o.buffering_seeds;
        self.paged_scan_seeds += o.paged_scan_seeds;
        self.hang_seeds += o.hang_seeds;
        self.stale_scan_seeds += o.stale_scan_seeds;
        self.watcher_seeds += o.watcher_seeds;
        self.slots_taken_over += o.slots_taken_over;
        self.offers_redirected += o.offers_redirected;
        self.lagged_scans += o.lagged_scans;
        self.fenced_takes += o.fenced_takes;
        self.flushes += o.flushes;
        self.panics_mid_buffer += o.panics_mid_buffer;
        self.shard_ends_mid_buffer += o.shard_ends_mid_buffer;
        self.raced_scans += o.raced_scans;
        self.hangs += o.hangs;
        self.duplicates_stopped += o.duplicates_stopped;
        self.fan_out_seeds += o.fan_out_seeds;
        self.subscriptions += o.subscriptions;
        self.session_ends += o.session_ends;
        self.subscriptions_failed += o.subscriptions_failed;
        self.subscribes_in_use += o.subscribes_in_use;
        self.refused_by_lingering += o.refused_by_lingering;
        self.silenced += o.silenced;
        self.subscriptions_dropped += o.subscriptions_dropped;
        self.fan_out_shard_ends += o.fan_out_shard_ends;
    }
}

impl Coverage {
    pub(crate) fn missing(&self) -> Vec<&'static str> {
        let mut all = vec![
            ("fenced_checkpoints", self.fenced_checkpoints),
            ("taken_from_another", self.taken_from_another),
            ("handed_over", self.handed_over),
            ("children_processed", self.children_processed),
            ("processor_failures", self.processor_failures),
            ("pauses", self.pauses),
            ("splits", self.splits),
            ("merges", self.merges),
        ];
        if self.buffering_seeds > 0 {
            all.extend([
                ("flushes", self.flushes),
                ("panics_mid_buffer", self.panics_mid_buffer),
                ("shard_ends_mid_buffer", self.shard_ends_mid_buffer),
            ]);
        }
        if self.paged_scan_seeds > 0 {
            all.push(("raced_scans", self.raced_scans));
        }
        if self.hang_seeds > 0 {
            all.push(("hangs", self.hangs));
        }
        if self.watcher_seeds > 0 {
            all.push(("slots_taken_over", self.slots_taken_over));
        }
        if self.stale_scan_seeds > 0 {
            all.extend([
                ("lagged_scans", self.lagged_scans),
                ("fenced_takes", self.fenced_takes),
            ]);
        }
        if self.fan_out_seeds > 0 {
            all.extend([
                ("subscriptions", self.subscriptions),
                ("session_ends", self.session_ends),
                ("subscriptions_failed", self.subscriptions_failed),
                ("subscribes_in_use", self.subscribes_in_use),
                ("refused_by_lingering", self.refused_by_lingering),
                ("silenced", self.silenced),
                ("subscriptions_dropped", self.subscriptions_dropped),
                ("fan_out_shard_ends", self.fan_out_shard_ends),
            ]);
        }
        all.into_iter()
            .filter(|(_, n)| *n == 0)
            .map(|(name, _)| name)
            .collect()
    }
}
