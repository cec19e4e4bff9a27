//! Sequence numbers and checkpoints.
//!
//! Kinesis sequence numbers are decimal strings of up to 128 digits, larger than any machine
//! integer, that increase within a shard. They are compared as numbers, by length first.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Longest sequence number accepted, in digits (the Kinesis API allows `0|([1-9]\d{0,128})`).
const MAX_SEQUENCE_NUMBER_DIGITS: usize = 129;

/// A Kinesis sequence number: a validated decimal string, ordered numerically. Cheap to
/// clone: the user records of a KPL aggregate, and every checkpoint of a record, share one.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(Arc<str>);

impl SequenceNumber {
    /// Parses a sequence number.
    ///
    /// # Errors
    /// [`Error::InvalidSequenceNumber`] when `value` is empty, too long, has a character
    /// that is not a decimal digit, or has a leading zero.
    pub fn new(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        let problem = if value.is_empty() {
            Some("it is empty")
        } else if value.len() > MAX_SEQUENCE_NUMBER_DIGITS {
            Some("it has more than 129 digits")
        } else if !value.bytes().all(|b| b.is_ascii_digit()) {
            Some("it has a character that is not a decimal digit")
        } else if value.len() > 1 && value.starts_with('0') {
            Some("it has a leading zero")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(Error::InvalidSequenceNumber { value, problem }),
            None => Ok(SequenceNumber(Arc::from(value))),
        }
    }

    /// The decimal string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        // Validated: no leading zeros, so a longer number is a larger one.
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for SequenceNumber {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SequenceNumber::new(s)
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.0)
    }
}

/// A position inside a shard: a sequence number plus the index of a user record inside a
/// KPL-aggregated record (0 for plain records).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtendedSequenceNumber {
    /// The Kinesis sequence number.
    pub sequence_number: SequenceNumber,
    /// The user record's index inside an aggregated record; 0 for a plain record.
    pub sub_sequence_number: u64,
}

impl ExtendedSequenceNumber {
    /// A position with the given sequence and sub-sequence numbers.
    pub fn new(sequence_number: SequenceNumber, sub_sequence_number: u64) -> Self {
        ExtendedSequenceNumber {
            sequence_number,
            sub_sequence_number,
        }
    }
}

impl fmt::Display for ExtendedSequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sub_sequence_number == 0 {
            write!(f, "{}", self.sequence_number)
        } else {
            write!(f, "{}/{}", self.sequence_number, self.sub_sequence_number)
        }
    }
}

impl fmt::Debug for ExtendedSequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a lease records as processed: a position, or a sentinel.
///
/// The sentinels are those of the Java KCL, stored in the `checkpoint` attribute as text:
/// `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP` (start of a lease that has no checkpoint yet; the
/// timestamp comes from the worker's configuration) and `SHARD_END` (the shard was processed to
/// its end; its children may start).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Checkpoint {
    /// Nothing processed yet; start at the oldest record.
    TrimHorizon,
    /// Nothing processed yet; start at the newest record.
    Latest,
    /// Nothing processed yet; start at the configured timestamp.
    AtTimestamp,
    /// Every record up to and including this position was processed.
    SequenceNumber(ExtendedSequenceNumber),
    /// The shard is closed and every record of it was processed.
    ShardEnd,
}

impl Checkpoint {
    /// Text stored for [`Checkpoint::TrimHorizon`].
    pub const TRIM_HORIZON: &'static str = "TRIM_HORIZON";
    /// Text stored for [`Checkpoint::Latest`].
    pub const LATEST: &'static str = "LATEST";
    /// Text stored for [`Checkpoint::AtTimestamp`].
    pub const AT_TIMESTAMP: &'static str = "AT_TIMESTAMP";
    /// Text stored for [`Checkpoint::ShardEnd`].
    pub const SHARD_END: &'static str = "SHARD_END";

    /// A checkpoint at a sequence number.
    pub fn at(sequence_number: SequenceNumber, sub_sequence_number: u64) -> Self {
        Checkpoint::SequenceNumber(ExtendedSequenceNumber::new(
            sequence_number,
            sub_sequence_number,
        ))
    }

    /// Decodes the stored form: the `checkpoint` text and `checkpointSubSequenceNumber`.
    ///
    /// # Errors
    /// [`Error::InvalidSequenceNumber`] when the text is neither a sentinel nor a sequence number.
    pub fn parse(text: &str, sub_sequence_number: u64) -> Result<Self> {
        Ok(match text {
            Self::TRIM_HORIZON => Checkpoint::TrimHorizon,
            Self::LATEST => Checkpoint::Latest,
            Self::AT_TIMESTAMP => Checkpoint::AtTimestamp,
            Self::SHARD_END => Checkpoint::ShardEnd,
            other => Checkpoint::at(SequenceNumber::new(other)?, sub_sequence_number),
        })
    }

    /// The stored text of the `checkpoint` attribute.
    pub fn as_text(&self) -> &str {
        match self {
            Checkpoint::TrimHorizon => Self::TRIM_HORIZON,
            Checkpoint::Latest => Self::LATEST,
            Checkpoint::AtTimestamp => Self::AT_TIMESTAMP,
            Checkpoint::ShardEnd => Self::SHARD_END,
            Checkpoint::SequenceNumber(position) => position.sequence_number.as_str(),
        }
    }

    /// The stored `checkpointSubSequenceNumber` (0 for sentinels).
    pub fn sub_sequence_number(&self) -> u64 {
        match self {
            Checkpoint::SequenceNumber(position) => position.sub_sequence_number,
            _ => 0,
        }
    }

    /// The position, when this checkpoint is one.
    pub fn position(&self) -> Option<&ExtendedSequenceNumber> {
        match self {
            Checkpoint::SequenceNumber(position) => Some(position),
            _ => None,
        }
    }

    /// True for `SHARD_END`.
    pub fn is_shard_end(&self) -> bool {
        matches!(self, Checkpoint::ShardEnd)
    }

    /// True when `position` lies at or before this checkpoint, so a record there was already
    /// processed. Sentinels other than `SHARD_END` cover nothing.
    pub fn covers(&self, position: &ExtendedSequenceNumber) -> bool {
        match self {
            Checkpoint::TrimHorizon | Checkpoint::Latest | Checkpoint::AtTimestamp => false,
            Checkpoint::SequenceNumber(done) => position <= done,
            Checkpoint::ShardEnd => true,
        }
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Checkpoint::SequenceNumber(position) => fmt::Display::fmt(position, f),
            sentinel => f.write_str(sentinel.as_text()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn seq(s: &str) -> SequenceNumber {
        SequenceNumber::new(s).unwrap()
    }

    #[test]
    fn rejects_what_is_not_a_sequence_number() {
        for bad in ["", "12a", "-1", " 1", "01", &"9".repeat(130)] {
            assert!(
                matches!(
                    SequenceNumber::new(bad),
                    Err(Error::InvalidSequenceNumber { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert!(SequenceNumber::new("0").is_ok());
    }

    #[test]
    fn real_sequence_numbers_order_numerically() {
        let a = seq("49590338271490256608559692538361571095921575989136588898");
        let b = seq("49590338271490256608559692540925702759324208523137515618");
        assert!(a < b);
        assert!(seq("9") < seq("10"));
    }

    #[test]
    fn checkpoint_text_round_trips() {
        for text in ["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP", "SHARD_END", "123"] {
            let cp = Checkpoint::parse(text, 0).unwrap();
            assert_eq!(cp.as_text(), text);
        }
        let cp = Checkpoint::parse("77", 3).unwrap();
        assert_eq!(cp.sub_sequence_number(), 3);
        assert!(Checkpoint::parse("garbage", 0).is_err());
    }

    #[test]
    fn covers_is_inclusive() {
        let cp = Checkpoint::at(seq("100"), 2);
        assert!(cp.covers(&ExtendedSequenceNumber::new(seq("100"), 2)));
        assert!(cp.covers(&ExtendedSequenceNumber::new(seq("99"), 9)));
        assert!(!cp.covers(&ExtendedSequenceNumber::new(seq("100"), 3)));
        assert!(!Checkpoint::TrimHorizon.covers(&ExtendedSequenceNumber::new(seq("0"), 0)));
        assert!(Checkpoint::ShardEnd.covers(&ExtendedSequenceNumber::new(seq("1"), 0)));
    }

    proptest! {
        #[test]
        fn order_matches_u128_order(a in any::<u128>(), b in any::<u128>()) {
            prop_assert_eq!(seq(&a.to_string()).cmp(&seq(&b.to_string())), a.cmp(&b));
        }
    }
}
