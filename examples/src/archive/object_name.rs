//! Where an object of the archive goes: `PREFIX/YYYY/MM/DD/HH/STREAM.SHARD.SEQ.SUBSEQ.gz`.
//!
//! The hour is the UTC hour of the records' arrival in the stream; the rest names the first
//! record the object holds. A name is a function of the first record alone, so the worker that
//! stores the records after a checkpoint again (after a crash between storing and
//! checkpointing) writes to the same name and replaces the object instead of adding a second
//! copy of its records.

use std::fmt;
use std::time::SystemTime;

use kcl_core::{ExtendedSequenceNumber, SequenceNumber};

/// The UTC hour an object's records arrived in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub struct Hour {
    /// Year, e.g. 2026.
    pub year: i32,
    /// Month, 1 to 12.
    pub month: u8,
    /// Day of the month, 1 to 31.
    pub day: u8,
    /// Hour, 0 to 23.
    pub hour: u8,
}

impl Hour {
    /// The UTC hour `time` falls in.
    pub fn of(time: SystemTime) -> Hour {
        let utc = time::OffsetDateTime::from(time);
        Hour {
            year: utc.year(),
            month: u8::from(utc.month()),
            day: utc.day(),
            hour: utc.hour(),
        }
    }
}

impl fmt::Display for Hour {
    /// `YYYY/MM/DD/HH`, as Firehose partitions objects.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}/{:02}/{:02}/{:02}",
            self.year, self.month, self.day, self.hour
        )
    }
}

/// The name of one object.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ObjectName {
    /// The key prefix, empty or ending in `/`.
    pub prefix: String,
    /// The hour its records arrived in.
    pub hour: Hour,
    /// The stream's name (never an ARN).
    pub stream: String,
    /// The shard its records come from.
    pub shard_id: String,
    /// Its first record.
    pub first: ExtendedSequenceNumber,
}

/// The suffix of every object.
const SUFFIX: &str = ".gz";

/// A key that is not an object name of the archive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{key}` is not an archive object name (PREFIX/YYYY/MM/DD/HH/STREAM.SHARD.SEQ.SUBSEQ.gz): {reason}"
)]
pub struct NotAnObjectName {
    /// The key.
    pub key: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A key prefix as objects use it: empty, or ending in one `/`.
pub fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// The stream's name from a name or an ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
pub fn stream_name(stream: &str) -> &str {
    match stream.strip_prefix("arn:") {
        Some(arn) => arn.rsplit_once("stream/").map_or(stream, |(_, name)| name),
        None => stream,
    }
}

impl ObjectName {
    /// The object's key.
    pub fn key(&self) -> String {
        format!(
            "{}{}/{}.{}.{}.{}{SUFFIX}",
            self.prefix,
            self.hour,
            self.stream,
            self.shard_id,
            self.first.sequence_number.as_str(),
            self.first.sub_sequence_number,
        )
    }

    /// Reads a key back. Stream names may hold dots, shard ids and sequence numbers do not,
    /// so the name is read from the right.
    pub fn parse(key: &str) -> Result<ObjectName, NotAnObjectName> {
        let bad = |reason| NotAnObjectName {
            key: key.to_owned(),
            reason,
        };
        let rest = key
            .strip_suffix(SUFFIX)
            .ok_or_else(|| bad("no .gz suffix"))?;
        let (path, file) = rest.rsplit_once('/').ok_or_else(|| bad("no hour path"))?;
        let mut parts = path.rsplitn(5, '/');
        let number = |part: Option<&str>, len: usize| -> Result<u32, NotAnObjectName> {
            part.filter(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad("the hour path is not YYYY/MM/DD/HH"))
        };
        let hour = number(parts.next(), 2)?;
        let day = number(parts.next(), 2)?;
        let month = number(parts.next(), 2)?;
        let year = number(parts.next(), 4)?;
        let prefix = parts.next().map(|p| format!("{p}/")).unwrap_or_default();
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 {
            return Err(bad("the hour path is not a valid UTC hour"));
        }
        let mut fields = file.rsplitn(4, '.');
        let sub = fields
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("no sub-sequence number"))?;
        let sequence = fields
            .next()
            .and_then(|s| SequenceNumber::new(s).ok())
            .ok_or_else(|| bad("no sequence number"))?;
        let shard_id = fields
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no shard id"))?;
        let stream = fields
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no stream name"))?;
        Ok(ObjectName {
            prefix,
            hour: Hour {
                year: i32::try_from(year).map_err(|_| bad("the year is out of range"))?,
                month: month as u8,
                day: day as u8,
                hour: hour as u8,
            },
            stream: stream.to_owned(),
            shard_id: shard_id.to_owned(),
            first: ExtendedSequenceNumber::new(sequence, sub),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use proptest::prelude::*;

    const SEQ: &str = "49590338271490256608559692538361571095921575989136588898";

    fn name(prefix: &str, stream: &str) -> ObjectName {
        ObjectName {
            prefix: normalize_prefix(prefix),
            hour: Hour::of(SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_564_800 + 3_599)),
            stream: stream.to_owned(),
            shard_id: "shardId-000000000003".into(),
            first: ExtendedSequenceNumber::new(SequenceNumber::new(SEQ).unwrap(), 7),
        }
    }

    #[test]
    fn keys_are_partitioned_by_utc_hour_and_named_after_the_first_record() {
        let object = name("logs", "access.logs-1");
        assert_eq!(
            object.key(),
            format!("logs/2024/05/01/12/access.logs-1.shardId-000000000003.{SEQ}.7.gz")
        );
        assert_eq!(ObjectName::parse(&object.key()), Ok(object));
        let bare = name("", "s");
        assert_eq!(
            bare.key(),
            format!("2024/05/01/12/s.shardId-000000000003.{SEQ}.7.gz")
        );
        assert_eq!(ObjectName::parse(&bare.key()), Ok(bare));
        let deep = name("/a/b/", "s");
        assert!(deep.key().starts_with("a/b/2024/"));
        assert_eq!(ObjectName::parse(&deep.key()), Ok(deep));
    }

    #[test]
    fn stream_names_come_from_arns() {
        assert_eq!(stream_name("orders"), "orders");
        assert_eq!(
            stream_name("arn:aws:kinesis:eu-west-1:123456789012:stream/orders.eu"),
            "orders.eu"
        );
    }

    #[test]
    fn other_keys_are_rejected_with_a_reason() {
        for key in [
            "logs/2024/05/01/12/s.shardId-1.123.0",
            "logs/2024/05/01/s.shardId-1.123.0.gz",
            "logs/2024/13/01/12/s.shardId-1.123.0.gz",
            "logs/2024/05/01/12/s.shardId-1.12x.0.gz",
            "logs/2024/05/01/12/shardId-1.123.0.gz",
            "logs/2024/05/01/12/.shardId-1.123.0.gz",
        ] {
            let error = ObjectName::parse(key).unwrap_err();
            assert_eq!(error.key, key);
        }
    }

    proptest! {
        #[test]
        fn names_round_trip(
            prefix in "[a-z/]{0,12}",
            stream in "[a-zA-Z0-9_.-]{1,20}",
            shard in 0u32..100_000,
            seq in "[1-9][0-9]{0,55}",
            sub in any::<u64>(),
            secs in 0u64..8_000_000_000,
        ) {
            let object = ObjectName {
                prefix: normalize_prefix(&prefix),
                hour: Hour::of(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
                stream,
                shard_id: format!("shardId-{shard:012}"),
                first: ExtendedSequenceNumber::new(SequenceNumber::new(seq).unwrap(), sub),
            };
            prop_assert_eq!(ObjectName::parse(&object.key()), Ok(object));
        }
    }
}
