//! Which stream a lease belongs to when one application consumes many streams, and the lease
//! keys that say so, in the Java KCL's format so that both libraries read each other's tables.
//!
//! A stream is identified by its account, its name and the time it was created (seconds since
//! the epoch, `StreamCreationTimestamp` of `DescribeStreamSummary`):
//! `123456789012:orders:1700000000`. A multi-stream lease key adds the shard:
//! `123456789012:orders:1700000000:shardId-000000000004`. The creation time makes a stream
//! deleted and created again under the same name a different stream: its new shards never
//! resume from the old one's checkpoints, and the old leases can be told apart and deleted.
//!
//! Single-stream mode keeps its lease keys (the bare shard id); nothing here applies to it.

use std::fmt;

use crate::error::{Error, Result};

/// The most characters in a stream name (Kinesis's limit).
const MAX_STREAM_NAME: usize = 128;
/// The digits of an AWS account id.
const ACCOUNT_ID_DIGITS: usize = 12;
/// Separates the parts of a stream identity and of a multi-stream lease key.
const SEPARATOR: char = ':';

/// One stream of a multi-stream application: account, name and creation time.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct StreamIdentity {
    account_id: String,
    stream_name: String,
    creation_epoch: u64,
}

impl StreamIdentity {
    /// A stream identity from its parts.
    ///
    /// # Errors
    /// [`Error::InvalidStreamIdentity`] when the account id is not 12 digits or the stream
    /// name is not 1 to 128 of `a-z A-Z 0-9 _ . -`.
    pub fn new(
        account_id: impl Into<String>,
        stream_name: impl Into<String>,
        creation_epoch: u64,
    ) -> Result<Self> {
        let (account_id, stream_name) = (account_id.into(), stream_name.into());
        let identity = StreamIdentity {
            account_id,
            stream_name,
            creation_epoch,
        };
        let invalid = |problem| Error::InvalidStreamIdentity {
            value: identity.to_string(),
            problem,
        };
        if !is_account_id(&identity.account_id) {
            return Err(invalid("the account id is not 12 decimal digits"));
        }
        if !is_stream_name(&identity.stream_name) {
            return Err(invalid(
                "the stream name is not 1 to 128 characters of a-z, A-Z, 0-9, `_`, `.` and `-`",
            ));
        }
        Ok(identity)
    }

    /// The identity of the stream an ARN names
    /// (`arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME`), created at `creation_epoch`.
    ///
    /// # Errors
    /// [`Error::InvalidStreamIdentity`] when `arn` is not a Kinesis stream ARN.
    pub fn from_arn(arn: &str, creation_epoch: u64) -> Result<Self> {
        let invalid = |problem| Error::InvalidStreamIdentity {
            value: arn.to_owned(),
            problem,
        };
        let parts: Vec<&str> = arn.splitn(6, SEPARATOR).collect();
        let [scheme, _partition, service, _region, account, resource] = parts[..] else {
            return Err(invalid(
                "not an ARN (arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME)",
            ));
        };
        if scheme != "arn" || service != "kinesis" {
            return Err(invalid("not a Kinesis ARN"));
        }
        let Some(name) = resource.strip_prefix("stream/") else {
            return Err(invalid("not the ARN of a stream (…:stream/NAME)"));
        };
        StreamIdentity::new(account, name, creation_epoch).map_err(|e| match e {
            Error::InvalidStreamIdentity { problem, .. } => invalid(problem),
            other => other,
        })
    }

    /// Reads the form [`Display`](fmt::Display) writes: `ACCOUNT:NAME:CREATION_EPOCH`, as the
    /// Java KCL serializes a stream identifier (and stores it in the `streamName` attribute).
    ///
    /// # Errors
    /// [`Error::InvalidStreamIdentity`] for anything else.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |problem| Error::InvalidStreamIdentity {
            value: text.to_owned(),
            problem,
        };
        let parts: Vec<&str> = text.split(SEPARATOR).collect();
        let [account, name, epoch] = parts[..] else {
            return Err(invalid("not ACCOUNT:STREAM:CREATION_EPOCH"));
        };
        StreamIdentity::new(account, name, parse_epoch(epoch).map_err(invalid)?)
    }

    /// The account the stream is in.
    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// When the stream was created, in seconds since the Unix epoch.
    pub fn creation_epoch(&self) -> u64 {
        self.creation_epoch
    }

    /// The lease key of one of its shards: `ACCOUNT:NAME:CREATION_EPOCH:SHARD_ID`.
    pub fn lease_key(&self, shard_id: &str) -> String {
        format!("{self}{SEPARATOR}{shard_id}")
    }
}

impl fmt::Display for StreamIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{SEPARATOR}{}{SEPARATOR}{}",
            self.account_id, self.stream_name, self.creation_epoch
        )
    }
}

/// A multi-stream lease key read back: the stream and the shard.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MultiStreamLeaseKey {
    /// The stream.
    pub stream: StreamIdentity,
    /// The shard id.
    pub shard_id: String,
}

impl MultiStreamLeaseKey {
    /// Reads `ACCOUNT:NAME:CREATION_EPOCH:SHARD_ID`.
    ///
    /// # Errors
    /// [`Error::InvalidLeaseKey`] for a key that is not one: a single-stream key (a bare shard
    /// id), a missing part, a part that is not what it should be.
    pub fn parse(key: &str) -> Result<Self> {
        let invalid = |problem| Error::InvalidLeaseKey {
            key: key.to_owned(),
            problem,
        };
        let parts: Vec<&str> = key.split(SEPARATOR).collect();
        let [account, name, epoch, shard_id] = parts[..] else {
            return Err(invalid(
                "not a multi-stream lease key (ACCOUNT:STREAM:CREATION_EPOCH:SHARD_ID)",
            ));
        };
        if shard_id.is_empty() {
            return Err(invalid("the shard id is empty"));
        }
        let epoch = parse_epoch(epoch).map_err(invalid)?;
        let stream = StreamIdentity::new(account, name, epoch).map_err(|e| match e {
            Error::InvalidStreamIdentity { problem, .. } => invalid(problem),
            other => other,
        })?;
        Ok(MultiStreamLeaseKey {
            stream,
            shard_id: shard_id.to_owned(),
        })
    }

    /// The key: `ACCOUNT:NAME:CREATION_EPOCH:SHARD_ID`.
    pub fn key(&self) -> String {
        self.stream.lease_key(&self.shard_id)
    }
}

impl fmt::Display for MultiStreamLeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{SEPARATOR}{}", self.stream, self.shard_id)
    }
}

fn is_account_id(text: &str) -> bool {
    text.len() == ACCOUNT_ID_DIGITS && text.bytes().all(|b| b.is_ascii_digit())
}

fn is_stream_name(text: &str) -> bool {
    (1..=MAX_STREAM_NAME).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_epoch(text: &str) -> std::result::Result<u64, &'static str> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the creation epoch is not a number of seconds");
    }
    text.parse()
        .map_err(|_| "the creation epoch is too large a number")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn java_kcl_keys_are_read_and_written_alike() {
        // As the Java KCL's MultiStreamLease writes them.
        let key = "123456789012:orders-eu.v2:1700000000:shardId-000000000004";
        let parsed = MultiStreamLeaseKey::parse(key).unwrap();
        assert_eq!(parsed.stream.account_id(), "123456789012");
        assert_eq!(parsed.stream.stream_name(), "orders-eu.v2");
        assert_eq!(parsed.stream.creation_epoch(), 1_700_000_000);
        assert_eq!(parsed.shard_id, "shardId-000000000004");
        assert_eq!(parsed.key(), key);
        assert_eq!(parsed.to_string(), key);
        let stream = StreamIdentity::parse("123456789012:orders-eu.v2:1700000000").unwrap();
        assert_eq!(stream, parsed.stream);
        assert_eq!(stream.lease_key("shardId-000000000004"), key);
    }

    #[test]
    fn an_arn_and_a_creation_time_name_a_stream() {
        let stream = StreamIdentity::from_arn(
            "arn:aws:kinesis:eu-west-1:123456789012:stream/orders",
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(stream.to_string(), "123456789012:orders:1700000000");
        let china =
            StreamIdentity::from_arn("arn:aws-cn:kinesis:cn-north-1:123456789012:stream/a", 1);
        assert_eq!(china.unwrap().stream_name(), "a");
        for arn in [
            "orders",
            "arn:aws:kinesis:eu-west-1:123456789012:orders",
            "arn:aws:dynamodb:eu-west-1:123456789012:stream/orders",
            "arn:aws:kinesis:eu-west-1:1234:stream/orders",
            "arn:aws:kinesis:eu-west-1:123456789012:stream/",
        ] {
            let error = StreamIdentity::from_arn(arn, 1).unwrap_err();
            assert!(
                matches!(&error, Error::InvalidStreamIdentity { value, .. } if value == arn),
                "{arn}: {error}"
            );
        }
    }

    #[test]
    fn a_stream_created_again_is_another_stream() {
        let old = StreamIdentity::new("123456789012", "orders", 1_700_000_000).unwrap();
        let new = StreamIdentity::new("123456789012", "orders", 1_700_086_400).unwrap();
        assert_ne!(old, new);
        assert_ne!(
            old.lease_key("shardId-000000000000"),
            new.lease_key("shardId-000000000000")
        );
    }

    #[test]
    fn garbage_is_rejected_with_a_typed_error_naming_it() {
        for key in [
            "shardId-000000000000",
            "",
            "123456789012:orders:1700000000",
            "123456789012:orders:1700000000:",
            "123456789012:orders:17e8:shardId-0",
            "123456789012:orders:-1:shardId-0",
            "123456789012:orders:99999999999999999999999:shardId-0",
            "12345678901:orders:1700000000:shardId-0",
            "12345678901a:orders:1700000000:shardId-0",
            "123456789012::1700000000:shardId-0",
            "123456789012:or ders:1700000000:shardId-0",
            "123456789012:orders:1700000000:shardId-0:extra",
        ] {
            match MultiStreamLeaseKey::parse(key) {
                Err(Error::InvalidLeaseKey {
                    key: named,
                    problem,
                }) => {
                    assert_eq!(named, key);
                    assert!(!problem.is_empty());
                }
                other => panic!("{key:?}: {other:?}"),
            }
        }
        let long = "a".repeat(129);
        assert!(StreamIdentity::new("123456789012", long, 1).is_err());
        assert!(StreamIdentity::parse("123456789012:orders").is_err());
    }

    proptest! {
        #[test]
        fn keys_round_trip(
            account in "[0-9]{12}",
            name in "[a-zA-Z0-9_.-]{1,128}",
            epoch in any::<u64>(),
            shard in "shardId-[0-9]{12}",
        ) {
            let stream = StreamIdentity::new(&account, &name, epoch).unwrap();
            prop_assert_eq!(StreamIdentity::parse(&stream.to_string()).unwrap(), stream.clone());
            let key = stream.lease_key(&shard);
            let parsed = MultiStreamLeaseKey::parse(&key).unwrap();
            prop_assert_eq!(&parsed.stream, &stream);
            prop_assert_eq!(&parsed.shard_id, &shard);
            prop_assert_eq!(parsed.key(), key);
        }

        #[test]
        fn parsing_never_panics(key in ".{0,80}") {
            let _ = MultiStreamLeaseKey::parse(&key);
            let _ = StreamIdentity::parse(&key);
            let _ = StreamIdentity::from_arn(&key, 0);
        }
    }
}
