//! Lines into `PutRecords` batches (pure: no I/O, time passed in).
//!
//! One record per line, the line without its newline; a line too long for one record is split
//! into several, never dropped. A batch is closed when one more record would exceed
//! `--max-batch-records` or `--max-batch-bytes` (data plus partition keys, as Kinesis counts
//! them), and sent when closed or when its oldest line is `--linger` old.
//!
//! With `--aggregate`, lines become user records of KPL aggregated records instead, one
//! partition key per aggregated record, each under the 1 MiB a record may carry. A batch holds
//! at most one aggregated record per key: were there two, the first could fail and be retried
//! after the second had landed, putting the key's lines out of order. A key whose aggregated
//! record is full closes the batch. Lines with random keys may share any aggregated record
//! of random key (their order does not matter).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::partition::LineKey;
use crate::kpl::AggregateBuilder;

/// A Kinesis record carries at most 1 MiB, data and partition key together.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// `PutRecords` takes at most 500 records per call.
pub const MAX_BATCH_RECORDS: usize = 500;
/// `PutRecords` takes at most 5 MiB per call, data and partition keys together.
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// What an aggregated record of one user record adds to its data and key, rounded up: magic
/// bytes and digest (20), the key's table entry and the record's framing (under 16).
const AGGREGATE_OVERHEAD: usize = 64;

/// Identifies one file being read (see the agent's state): a line's [`Position`] names it.
pub type SourceId = u64;

/// Where a line ends in its file: once the line is acknowledged, the file's shipped offset
/// moves there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The file.
    pub source: SourceId,
    /// The offset just past the line and its newline.
    pub end: u64,
}

/// A line read from a file, keyed.
#[derive(Debug, Clone)]
pub struct Line {
    /// The line without its newline.
    pub data: Bytes,
    /// Its partition key.
    pub key: LineKey,
    /// Where it ends.
    pub position: Position,
}

/// One `PutRecords` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The partition key.
    pub key: String,
    /// The data: a line, a piece of one, or a KPL aggregated record.
    pub data: Bytes,
}

/// A closed batch: one `PutRecords` call's entries.
#[derive(Debug, Default)]
pub struct Batch {
    /// The entries, in the order the lines were read (per key, with `--aggregate`).
    pub entries: Vec<Entry>,
    /// Where its lines end, in the order read. A line split over two batches is in the second.
    pub positions: Vec<Position>,
    /// Lines ending in this batch.
    pub lines: u64,
    /// Bytes of those lines, without newlines.
    pub bytes: u64,
}

/// When a batch is full or due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Records per call, 1 to 500.
    pub max_records: usize,
    /// Data plus partition keys per call, up to 5 MiB.
    pub max_bytes: usize,
    /// How long the oldest line of a batch may wait for more.
    pub linger: Duration,
    /// Pack lines into KPL aggregated records.
    pub aggregate: bool,
}

impl Default for Limits {
    /// The `PutRecords` limits, 200 ms of linger (as `kcl-agent`'s defaults), no aggregation.
    fn default() -> Self {
        Limits {
            max_records: MAX_BATCH_RECORDS,
            max_bytes: MAX_BATCH_BYTES,
            linger: Duration::from_millis(200),
            aggregate: false,
        }
    }
}

#[derive(Debug)]
enum Item {
    Plain(Entry),
    Aggregate {
        key: String,
        builder: AggregateBuilder,
    },
}

/// The batch being filled.
#[derive(Debug)]
struct Building {
    opened_at: Instant,
    /// Data plus keys of the items (aggregates at their current size).
    size: usize,
    items: Vec<Item>,
    /// With `--aggregate`: the item of each exact key, and the one taking random-key lines.
    by_key: HashMap<String, usize>,
    any: Option<usize>,
    positions: Vec<Position>,
    lines: u64,
    bytes: u64,
}

impl Building {
    fn new(opened_at: Instant) -> Self {
        Building {
            opened_at,
            size: 0,
            items: Vec::new(),
            by_key: HashMap::new(),
            any: None,
            positions: Vec::new(),
            lines: 0,
            bytes: 0,
        }
    }

    fn fits(&self, limits: &Limits, size: usize) -> bool {
        self.items.len() < limits.max_records && self.size + size <= limits.max_bytes
    }

    fn close(self) -> Batch {
        let entries = self
            .items
            .into_iter()
            .map(|item| match item {
                Item::Plain(entry) => entry,
                Item::Aggregate { key, builder } => Entry {
                    key,
                    data: builder.finish().into(),
                },
            })
            .collect();
        Batch {
            entries,
            positions: self.positions,
            lines: self.lines,
            bytes: self.bytes,
        }
    }
}

/// Turns lines into batches.
#[derive(Debug)]
pub struct Batcher {
    limits: Limits,
    building: Option<Building>,
    closed: VecDeque<Batch>,
}

impl Batcher {
    /// A batcher with these limits (already validated: 1 to 500 records, 4 KiB to 5 MiB).
    pub fn new(limits: Limits) -> Self {
        Batcher {
            limits,
            building: None,
            closed: VecDeque::new(),
        }
    }

    /// Adds a line read at `now`.
    pub fn push(&mut self, line: Line, now: Instant) {
        let key = line.key.as_str().to_owned();
        let pieces = split(line.data.clone(), self.piece_limit(&key));
        for piece in pieces {
            if self.limits.aggregate {
                self.push_aggregated(&line.key, piece, now);
            } else {
                self.push_plain(&key, piece, now);
            }
        }
        let building = self.building.as_mut().expect("a piece was just added");
        building.positions.push(line.position);
        building.lines += 1;
        building.bytes += line.data.len() as u64;
        if building.items.len() >= self.limits.max_records {
            self.close();
        }
    }

    /// The most data one record of `key` may carry here.
    fn piece_limit(&self, key: &str) -> usize {
        let record = MAX_RECORD_BYTES.min(self.limits.max_bytes) - key.len();
        if self.limits.aggregate {
            record - key.len() - AGGREGATE_OVERHEAD
        } else {
            record
        }
    }

    fn building(&mut self, now: Instant) -> &mut Building {
        self.building.get_or_insert_with(|| Building::new(now))
    }

    fn close(&mut self) {
        if let Some(building) = self.building.take() {
            self.closed.push_back(building.close());
        }
    }

    fn push_plain(&mut self, key: &str, data: Bytes, now: Instant) {
        let size = key.len() + data.len();
        if self
            .building
            .as_ref()
            .is_some_and(|b| !b.fits(&self.limits, size))
        {
            self.close();
        }
        let building = self.building(now);
        building.size += size;
        building.items.push(Item::Plain(Entry {
            key: key.to_owned(),
            data,
        }));
    }

    fn push_aggregated(&mut self, line_key: &LineKey, data: Bytes, now: Instant) {
        let limits = self.limits;
        let building = self.building(now);
        let slot = match line_key {
            LineKey::Exact(key) => building.by_key.get(key).copied(),
            LineKey::Any(_) => building.any,
        };
        if let Some(index) = slot {
            let Item::Aggregate { key, builder } = &mut building.items[index] else {
                unreachable!("by_key and any point at aggregates");
            };
            let grown = builder.size_with(key, data.len());
            let growth = grown - builder.size();
            if grown + key.len() <= MAX_RECORD_BYTES && building.size + growth <= limits.max_bytes {
                builder.push(key, data);
                building.size += growth;
                return;
            }
            if matches!(line_key, LineKey::Exact(_)) {
                // The key's aggregate is full: a second one must wait for the next call.
                self.close();
            }
        }
        let key = line_key.as_str();
        let mut builder = AggregateBuilder::new();
        let size = builder.size_with(key, data.len()) + key.len();
        if self
            .building
            .as_ref()
            .is_some_and(|b| !b.items.is_empty() && !b.fits(&limits, size))
        {
            self.close();
        }
        builder.push(key, data);
        let building = self.building(now);
        let index = building.items.len();
        match line_key {
            LineKey::Exact(key) => {
                building.by_key.insert(key.clone(), index);
            }
            LineKey::Any(_) => building.any = Some(index),
        }
        building.size += size;
        building.items.push(Item::Aggregate {
            key: key.to_owned(),
            builder,
        });
    }

    /// The next batch to send: a closed one, else the one being filled once its oldest line
    /// is `linger` old at `now`, or at once when `flush`.
    pub fn ready(&mut self, now: Instant, flush: bool) -> Option<Batch> {
        if self.closed.is_empty()
            && self
                .building
                .as_ref()
                .is_some_and(|b| flush || now >= b.opened_at + self.limits.linger)
        {
            self.close();
        }
        self.closed.pop_front()
    }

    /// True when a full batch waits: reading more now would only grow the backlog.
    pub fn has_full_batch(&self) -> bool {
        !self.closed.is_empty()
    }

    /// When the batch being filled is due.
    pub fn deadline(&self) -> Option<Instant> {
        self.building
            .as_ref()
            .map(|b| b.opened_at + self.limits.linger)
    }

    /// True when no line waits.
    pub fn is_empty(&self) -> bool {
        self.building.is_none() && self.closed.is_empty()
    }

    /// Lines waiting (a line split over two batches counts once, in the later one).
    pub fn lines(&self) -> u64 {
        self.closed.iter().map(|b| b.lines).sum::<u64>()
            + self.building.as_ref().map_or(0, |b| b.lines)
    }
}

/// `data` in pieces of at most `max` bytes (all of it in one when it fits). A cut falls on a
/// UTF-8 character boundary when one is within the last 3 bytes, so text stays text.
pub fn split(mut data: Bytes, max: usize) -> Vec<Bytes> {
    assert!(max >= 4, "pieces of at least one character");
    let mut pieces = Vec::with_capacity(data.len() / max + 1);
    while data.len() > max {
        let is_continuation = |i: usize| data[i] & 0xC0 == 0x80;
        let mut cut = max;
        while cut > max - 3 && is_continuation(cut) {
            cut -= 1;
        }
        if is_continuation(cut) {
            cut = max;
        }
        pieces.push(data.split_to(cut));
    }
    pieces.push(data);
    pieces
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::kpl::user_records;

    fn line(source: SourceId, end: u64, key: &str, data: &str) -> Line {
        Line {
            data: Bytes::copy_from_slice(data.as_bytes()),
            key: LineKey::Exact(key.to_owned()),
            position: Position { source, end },
        }
    }

    fn limits(max_records: usize, max_bytes: usize, aggregate: bool) -> Limits {
        Limits {
            max_records,
            max_bytes,
            linger: Duration::from_millis(200),
            aggregate,
        }
    }

    fn drain(batcher: &mut Batcher, now: Instant) -> Vec<Batch> {
        std::iter::from_fn(|| batcher.ready(now, true)).collect()
    }

    #[test]
    fn a_batch_is_full_at_max_records() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(3, MAX_BATCH_BYTES, false));
        for i in 0..7 {
            batcher.push(line(1, (i + 1) * 10, "k", &format!("line {i}")), now);
        }
        assert!(batcher.has_full_batch());
        let first = batcher.ready(now, false).expect("a full batch");
        assert_eq!(first.entries.len(), 3);
        assert_eq!(first.entries[0].data, "line 0");
        assert_eq!(first.positions.last().unwrap().end, 30);
        assert_eq!(batcher.ready(now, false).expect("another").lines, 3);
        assert!(batcher.ready(now, false).is_none(), "the seventh lingers");
        assert_eq!(batcher.lines(), 1);
        assert_eq!(batcher.deadline(), Some(now + Duration::from_millis(200)));
        let later = now + Duration::from_millis(200);
        let last = batcher.ready(later, false).expect("due after linger");
        assert_eq!((last.lines, last.bytes), (1, 6));
        assert!(batcher.is_empty());
    }

    #[test]
    fn a_batch_is_full_at_max_bytes_counting_keys() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(500, 4096, false));
        let data = "x".repeat(1000);
        for i in 0..5 {
            batcher.push(line(1, i, "key-1", &data), now); // 1005 bytes each
        }
        let batches = drain(&mut batcher, now);
        assert_eq!(
            batches.iter().map(|b| b.entries.len()).collect::<Vec<_>>(),
            [4, 1]
        );
    }

    #[test]
    fn long_lines_are_split_never_dropped() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(500, MAX_BATCH_BYTES, false));
        let long = "é".repeat(MAX_RECORD_BYTES); // 2 MiB of two-byte characters
        batcher.push(line(1, 5, "k", "short"), now);
        batcher.push(line(1, 6 + long.len() as u64, "k", &long), now);
        let batches = drain(&mut batcher, now);
        assert_eq!(batches.len(), 1);
        let entries = &batches[0].entries;
        assert_eq!(entries.len(), 4, "the short line and three pieces");
        let mut joined = Vec::new();
        for entry in &entries[1..] {
            assert!(entry.data.len() + entry.key.len() <= MAX_RECORD_BYTES);
            assert!(
                std::str::from_utf8(&entry.data).is_ok(),
                "cut between characters"
            );
            joined.extend_from_slice(&entry.data);
        }
        assert_eq!(joined, long.as_bytes());
        assert_eq!(batches[0].lines, 2);
        assert_eq!(batches[0].positions.len(), 2, "a line ends once");
    }

    #[test]
    fn splits_on_character_boundaries_when_it_can() {
        let pieces = split(Bytes::from("aé€😀b"), 4);
        assert_eq!(pieces, ["aé", "€", "😀", "b"]);
        let binary = Bytes::from(vec![0x80u8; 10]);
        let pieces = split(binary, 4);
        assert_eq!(pieces.iter().map(Bytes::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(split(Bytes::new(), 4), [Bytes::new()]);
    }

    #[test]
    fn aggregates_group_lines_by_key_one_per_key_per_batch() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(500, MAX_BATCH_BYTES, true));
        for i in 0..30u64 {
            let key = format!("client-{}", i % 3);
            batcher.push(line(1, i + 1, &key, &format!("{key} line {i}")), now);
        }
        let batches = drain(&mut batcher, now);
        assert_eq!(batches.len(), 1);
        let batch = &batches[0];
        assert_eq!((batch.lines, batch.positions.len()), (30, 30));
        assert_eq!(batch.entries.len(), 3, "one aggregated record per key");
        for entry in &batch.entries {
            let lines = user_records(entry.data.clone()).expect("an aggregate");
            assert_eq!(lines.len(), 10);
            for (n, l) in lines.iter().enumerate() {
                let expected = format!(
                    "{} line {}",
                    entry.key,
                    n as u64 * 3 + entry.key[7..].parse::<u64>().unwrap()
                );
                assert_eq!(l, expected.as_bytes());
            }
        }
    }

    #[test]
    fn a_full_aggregate_closes_the_batch_and_stays_under_a_record() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(500, MAX_BATCH_BYTES, true));
        let data = "y".repeat(100_000);
        for i in 0..25 {
            batcher.push(line(1, i, "one-key", &data), now);
        }
        let batches = drain(&mut batcher, now);
        assert_eq!(batches.len(), 3, "10 + 10 + 5 lines of 100 kB");
        for batch in &batches {
            assert_eq!(batch.entries.len(), 1);
            let entry = &batch.entries[0];
            assert!(entry.data.len() + entry.key.len() <= MAX_RECORD_BYTES);
        }
        // A line longer than a record is split and each piece aggregated alone.
        let long = "z".repeat(3 * MAX_RECORD_BYTES);
        batcher.push(line(2, 1, "k", &long), now);
        let batches = drain(&mut batcher, now);
        let mut joined = Vec::new();
        for batch in &batches {
            for entry in &batch.entries {
                assert!(entry.data.len() + entry.key.len() <= MAX_RECORD_BYTES);
                for piece in user_records(entry.data.clone()).expect("aggregate") {
                    joined.extend_from_slice(&piece);
                }
            }
        }
        assert_eq!(joined, long.as_bytes());
        assert_eq!(batches.iter().map(|b| b.lines).sum::<u64>(), 1);
    }

    #[test]
    fn random_key_lines_share_aggregates() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits(500, MAX_BATCH_BYTES, true));
        for i in 0..100u64 {
            let mut l = line(1, i, "", "some line");
            l.key = LineKey::Any(format!("random-{i}"));
            batcher.push(l, now);
        }
        let batches = drain(&mut batcher, now);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].entries.len(), 1);
        assert_eq!(batches[0].entries[0].key, "random-0");
        assert_eq!(
            user_records(batches[0].entries[0].data.clone())
                .unwrap()
                .len(),
            100
        );
    }

    /// Many lines of many sizes and keys: every batch within its limits, every line's data
    /// delivered once in per-key order, positions in the order pushed.
    #[test]
    fn batches_keep_limits_and_per_key_order() {
        for aggregate in [false, true] {
            let now = Instant::now();
            let lim = limits(50, 256 * 1024, aggregate);
            let mut batcher = Batcher::new(lim);
            let mut seed = 7u64;
            let mut next = move || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                seed >> 33
            };
            let mut expected: BTreeMap<String, Vec<Bytes>> = BTreeMap::new();
            let mut pushed = Vec::new();
            for i in 0..3000u64 {
                let key = format!("k{}", next() % 7);
                let len = match next() % 100 {
                    0 => 300_000 + (next() % 100_000) as usize,
                    1..=5 => 20_000,
                    _ => (next() % 200) as usize,
                };
                let data = Bytes::from(vec![b'a' + (i % 26) as u8; len]);
                expected.entry(key.clone()).or_default().push(data.clone());
                let position = Position {
                    source: i % 2,
                    end: i,
                };
                pushed.push(position);
                batcher.push(
                    Line {
                        data,
                        key: LineKey::Exact(key),
                        position,
                    },
                    now,
                );
            }
            let mut got: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut positions = Vec::new();
            for batch in drain(&mut batcher, now) {
                assert!(batch.entries.len() <= lim.max_records);
                let size: usize = batch
                    .entries
                    .iter()
                    .map(|e| e.key.len() + e.data.len())
                    .sum();
                assert!(size <= lim.max_bytes, "{size} bytes");
                let mut keys = std::collections::HashSet::new();
                for entry in &batch.entries {
                    assert!(entry.key.len() + entry.data.len() <= MAX_RECORD_BYTES);
                    let pieces = if aggregate {
                        assert!(keys.insert(entry.key.clone()), "one aggregate per key");
                        user_records(entry.data.clone()).expect("aggregate")
                    } else {
                        vec![entry.data.clone()]
                    };
                    for piece in pieces {
                        got.entry(entry.key.clone())
                            .or_default()
                            .extend_from_slice(&piece);
                    }
                }
                positions.extend(batch.positions);
            }
            assert_eq!(positions, pushed, "aggregate: {aggregate}");
            for (key, lines) in expected {
                assert_eq!(got[&key], lines.concat(), "{key}, aggregate: {aggregate}");
            }
        }
    }
}
