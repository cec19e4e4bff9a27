//! What a shard's archiver holds between two objects, and when it must store them: the pure
//! part of the archive, decided from the buffer and the clock alone.

use std::time::Duration;

use kcl_core::{ExtendedSequenceNumber, Record};
use tokio::time::Instant;

use super::object_name::Hour;

/// When a buffer is stored. Firehose's defaults: 5 MiB or 300 s, whichever comes first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FlushPolicy {
    /// Store once the buffered lines reach this many bytes (before compression).
    pub max_bytes: u64,
    /// Store once the oldest buffered line has waited this long.
    pub max_age: Duration,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy {
            max_bytes: 5 * 1024 * 1024,
            max_age: Duration::from_secs(300),
        }
    }
}

/// Why a buffer is stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FlushReason {
    /// It reached `max_bytes`.
    Size,
    /// Its oldest line reached `max_age`.
    Age,
    /// The next record arrived in another UTC hour: an object holds one hour.
    HourChanged,
    /// The shard ended (split or merge): everything must be stored before `SHARD_END`.
    ShardEnd,
    /// The worker shuts down or hands the shard over.
    Shutdown,
}

impl FlushReason {
    /// For the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Size => "size",
            FlushReason::Age => "age",
            FlushReason::HourChanged => "hour changed",
            FlushReason::ShardEnd => "shard end",
            FlushReason::Shutdown => "shutdown",
        }
    }
}

/// Lines of one UTC hour of one shard, in shard order, not yet stored.
#[derive(Debug, Default)]
pub struct Buffer {
    lines: Vec<u8>,
    records: usize,
    hour: Option<Hour>,
    first: Option<ExtendedSequenceNumber>,
    last: Option<Record>,
    opened_at: Option<Instant>,
}

impl Buffer {
    /// Whether a record of `hour` may join: the buffer is empty or holds that hour.
    pub fn accepts(&self, hour: Hour) -> bool {
        self.hour.is_none_or(|held| held == hour)
    }

    /// Adds a record's line (without its `\n`). The caller checked [`Buffer::accepts`].
    pub fn push(&mut self, record: &Record, hour: Hour, line: &str, now: Instant) {
        debug_assert!(self.accepts(hour));
        if self.records == 0 {
            self.hour = Some(hour);
            self.first = Some(position(record));
            self.opened_at = Some(now);
        }
        self.lines.extend_from_slice(line.as_bytes());
        self.lines.push(b'\n');
        self.records += 1;
        self.last = Some(record.clone());
    }

    /// Whether the buffer must be stored now, by size or by age.
    pub fn due(&self, policy: &FlushPolicy, now: Instant) -> Option<FlushReason> {
        let opened_at = self.opened_at?;
        if self.lines.len() as u64 >= policy.max_bytes {
            Some(FlushReason::Size)
        } else if now.saturating_duration_since(opened_at) >= policy.max_age {
            Some(FlushReason::Age)
        } else {
            None
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The buffered lines, each ending in `\n`.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Records buffered.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The hour and the first record's position, which name the object; `None` when empty.
    pub fn head(&self) -> Option<(Hour, &ExtendedSequenceNumber)> {
        Some((self.hour?, self.first.as_ref()?))
    }

    /// The last record buffered: what is checkpointed once the object is stored.
    pub fn last(&self) -> Option<&Record> {
        self.last.as_ref()
    }

    /// Empties it, once its object is stored and checkpointed.
    pub fn clear(&mut self) {
        *self = Buffer::default();
    }
}

/// A record's position in its shard.
pub fn position(record: &Record) -> ExtendedSequenceNumber {
    ExtendedSequenceNumber::new(record.sequence_number.clone(), record.sub_sequence_number)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use kcl_core::SequenceNumber;

    use super::*;

    fn record(seq: u64) -> Record {
        Record::new(SequenceNumber::new(seq.to_string()).unwrap(), "k", "x")
    }

    fn hour(h: u64) -> Hour {
        Hour::of(UNIX_EPOCH + Duration::from_secs(h * 3600))
    }

    #[test]
    fn a_buffer_is_due_by_size_or_by_age_of_its_oldest_line() {
        let policy = FlushPolicy {
            max_bytes: 10,
            max_age: Duration::from_secs(60),
        };
        let start = Instant::now();
        let mut buffer = Buffer::default();
        assert_eq!(buffer.due(&policy, start + Duration::from_secs(3600)), None);
        buffer.push(&record(1), hour(0), "abcd", start);
        assert_eq!(buffer.due(&policy, start), None);
        buffer.push(&record(2), hour(0), "efgh", start + Duration::from_secs(50));
        assert_eq!(buffer.lines(), b"abcd\nefgh\n");
        assert_eq!(buffer.due(&policy, start), Some(FlushReason::Size));
        let mut small = Buffer::default();
        small.push(&record(1), hour(0), "a", start);
        small.push(&record(2), hour(0), "b", start + Duration::from_secs(59));
        assert_eq!(small.due(&policy, start + Duration::from_secs(59)), None);
        // The age counts from the first line, not the last.
        assert_eq!(
            small.due(&policy, start + Duration::from_secs(60)),
            Some(FlushReason::Age)
        );
    }

    #[test]
    fn a_buffer_holds_one_hour_and_is_named_by_its_first_record() {
        let now = Instant::now();
        let mut buffer = Buffer::default();
        assert!(buffer.accepts(hour(5)));
        buffer.push(&record(7), hour(5), "a", now);
        buffer.push(&record(9), hour(5), "b", now);
        assert!(buffer.accepts(hour(5)));
        assert!(!buffer.accepts(hour(6)));
        let (h, first) = buffer.head().unwrap();
        assert_eq!((h, first.sequence_number.as_str()), (hour(5), "7"));
        assert_eq!(buffer.last().unwrap().sequence_number.as_str(), "9");
        assert_eq!(buffer.records(), 2);
        buffer.clear();
        assert!(buffer.is_empty() && buffer.head().is_none() && buffer.accepts(hour(6)));
    }
}
