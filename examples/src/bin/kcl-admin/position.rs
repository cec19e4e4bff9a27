//! `set-checkpoint --to`: the position asked for, and the checkpoint that stores it.
//!
//! A checkpoint at a sequence number means every record up to and including it is processed:
//! the shard resumes after it. The lease stores no timestamp (the Java KCL's layout), so
//! `at-timestamp=T` becomes the sequence number of the last record that arrived before T,
//! and the shard resumes at the first record that arrived at or after T. A checkpoint at a
//! KPL aggregate covers all its user records ([`kcl_core::user_records`]): a record is
//! processed whole or not at all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kcl_core::{Checkpoint, HashKeyRange, Record, SequenceNumber, StartingPosition, user_records};

use crate::error::{AdminError, Result};
use crate::render::{human_duration, rfc3339};
use crate::stream::{Stream, service_code};

/// The first look-back of an `at-timestamp` resolution; doubled until a record before the
/// time is found or the stream's retention is covered.
const FIRST_LOOK_BACK: Duration = Duration::from_secs(60);

/// Records per read while resolving.
const READ_LIMIT: u32 = 1_000;

/// Where `--to` puts the shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// Every record the stream still has, again.
    TrimHorizon,
    /// Only records put from now on.
    Latest,
    /// The first record that arrived at or after this time.
    AtTimestamp(SystemTime),
    /// After this record (checked to be a sequence number, and in the shard, later).
    Sequence(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::TrimHorizon => f.write_str("trim-horizon"),
            Target::Latest => f.write_str("latest"),
            Target::AtTimestamp(t) => write!(f, "at-timestamp={}", rfc3339(*t)),
            Target::Sequence(s) => f.write_str(s),
        }
    }
}

/// Parses `trim-horizon`, `latest`, `at-timestamp=T` (RFC 3339, or milliseconds since the
/// Unix epoch), or anything else as a sequence number to check.
pub(crate) fn parse_target(text: &str) -> std::result::Result<Target, String> {
    match text {
        "trim-horizon" | "TRIM_HORIZON" => Ok(Target::TrimHorizon),
        "latest" | "LATEST" => Ok(Target::Latest),
        other => match other.strip_prefix("at-timestamp=") {
            Some(time) => parse_time(time).map(Target::AtTimestamp),
            None => Ok(Target::Sequence(other.to_owned())),
        },
    }
}

fn parse_time(text: &str) -> std::result::Result<SystemTime, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let ms: u64 = text
            .parse()
            .map_err(|_| format!("`{text}` is too large for milliseconds since the epoch"))?;
        return UNIX_EPOCH
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(|| format!("`{text}` is too far in the future"));
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| {
            format!("`{text}` is neither an RFC 3339 time nor milliseconds since the epoch: {e}")
        })
}

/// The checkpoint a target resolves to, and how it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub(crate) checkpoint: Checkpoint,
    /// What the resolution found, for the operator (`at-timestamp` only).
    pub(crate) note: Option<String>,
}

/// Resolves `target` for the shard `shard_id` (`range`: its hash keys, for KPL aggregates).
/// `stream` is required for a sequence number or a time.
pub(crate) async fn resolve(
    target: &Target,
    stream: Option<&Stream>,
    shard_id: &str,
    range: Option<HashKeyRange>,
) -> Result<Resolved> {
    let plain = |checkpoint| Resolved {
        checkpoint,
        note: None,
    };
    match target {
        Target::TrimHorizon => Ok(plain(Checkpoint::TrimHorizon)),
        Target::Latest => Ok(plain(Checkpoint::Latest)),
        Target::Sequence(text) => {
            let sequence_number = SequenceNumber::new(text.as_str()).map_err(|source| {
                AdminError::BadSequenceNumber {
                    value: text.clone(),
                    source,
                }
            })?;
            let stream = stream.ok_or(AdminError::StreamRequired {
                what: "a sequence number (to check that it is in the shard)",
            })?;
            stream.shard(shard_id).await?;
            let record = record_at(stream, shard_id, &sequence_number).await?;
            Ok(plain(covering(record, range)))
        }
        Target::AtTimestamp(at) => {
            let stream = stream.ok_or(AdminError::StreamRequired {
                what: "at-timestamp (to find the records around the time)",
            })?;
            let retention = stream.retention().await?;
            stream.shard(shard_id).await?;
            resolve_time(stream, shard_id, range, *at, retention).await
        }
    }
}

/// The record of `shard_id` with `sequence_number`.
async fn record_at(
    stream: &Stream,
    shard_id: &str,
    sequence_number: &SequenceNumber,
) -> Result<Record> {
    let not_in_shard = |source: Option<kcl_core::BoxError>| AdminError::SequenceNumberNotInShard {
        stream: stream.name.clone(),
        shard_id: shard_id.to_owned(),
        sequence_number: sequence_number.to_string(),
        source,
    };
    let position = StartingPosition::AtSequenceNumber(sequence_number.clone());
    let iterator = match stream.iterator(shard_id, &position).await {
        Ok(iterator) => iterator,
        // Kinesis answers InvalidArgumentException for a sequence number of another shard;
        // kinesis-mock answers ResourceNotFoundException, which names the shard (known to
        // exist here).
        Err(e @ kcl_core::Error::ShardNotFound { .. }) => return Err(not_in_shard(Some(e.into()))),
        Err(e) if service_code(&e) == Some("InvalidArgumentException") => {
            return Err(not_in_shard(Some(e.into())));
        }
        Err(e) => return Err(AdminError::kinesis("reading the shard", e)),
    };
    // AT_SEQUENCE_NUMBER of a number between two records starts at the next one: only the
    // record itself proves the number is this shard's.
    let reading = stream
        .read_until(shard_id, iterator, 1, |_| true)
        .await
        .map_err(|e| AdminError::kinesis("reading the shard", e))?;
    match reading.found {
        Some(record) if record.sequence_number == *sequence_number => Ok(record),
        _ => Err(not_in_shard(None)),
    }
}

/// The checkpoint that covers `record` whole: at its last user record.
fn covering(record: Record, range: Option<HashKeyRange>) -> Checkpoint {
    let sequence_number = record.sequence_number.clone();
    let last = user_records(record, range)
        .last()
        .map_or(0, |r| r.sub_sequence_number);
    Checkpoint::at(sequence_number, last)
}

/// The checkpoint after which `shard_id` resumes at the first record that arrived at or after
/// `at`: the last record before `at`, looked for in windows before `at` that double from
/// [`FIRST_LOOK_BACK`] up to the retention; `TRIM_HORIZON` when every record the stream keeps
/// arrived at or after `at`.
async fn resolve_time(
    stream: &Stream,
    shard_id: &str,
    range: Option<HashKeyRange>,
    at: SystemTime,
    retention: Duration,
) -> Result<Resolved> {
    let mut look_back = FIRST_LOOK_BACK.min(retention);
    loop {
        let from = at.checked_sub(look_back).unwrap_or(UNIX_EPOCH);
        let iterator = stream
            .iterator(shard_id, &StartingPosition::AtTimestamp(from))
            .await
            .map_err(|e| AdminError::kinesis("reading the shard", e))?;
        let mut last_before: Option<Record> = None;
        stream
            .read_until(shard_id, iterator, READ_LIMIT, |record| {
                match record.approximate_arrival_timestamp {
                    Some(arrived) if arrived < at => {
                        last_before = Some(record.clone());
                        false
                    }
                    // At or after the time (or of unknown arrival): the shard resumes here.
                    _ => true,
                }
            })
            .await
            .map_err(|e| AdminError::kinesis("reading the shard", e))?;
        if let Some(record) = last_before {
            let arrived = record
                .approximate_arrival_timestamp
                .map_or_else(String::new, |t| format!(", arrived {}", rfc3339(t)));
            let checkpoint = covering(record, range);
            return Ok(Resolved {
                note: Some(format!(
                    "the last record before {}{arrived}: the shard resumes at the first record \
                     at or after it",
                    rfc3339(at)
                )),
                checkpoint,
            });
        }
        if look_back >= retention {
            return Ok(Resolved {
                checkpoint: Checkpoint::TrimHorizon,
                note: Some(format!(
                    "no record before {} within the stream's retention ({}): every record it \
                     keeps is at or after that time",
                    rfc3339(at),
                    human_duration(retention)
                )),
            });
        }
        look_back = (look_back * 2).min(retention);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_keywords_times_and_anything_else_as_a_sequence_number() {
        assert_eq!(parse_target("trim-horizon"), Ok(Target::TrimHorizon));
        assert_eq!(parse_target("LATEST"), Ok(Target::Latest));
        let Ok(Target::AtTimestamp(t)) = parse_target("at-timestamp=2024-05-01T12:00:00Z") else {
            panic!("an RFC 3339 time")
        };
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_714_564_800
        );
        assert_eq!(
            parse_target("at-timestamp=2024-05-01T14:00:00+02:00"),
            Ok(Target::AtTimestamp(t)),
            "any UTC offset"
        );
        assert_eq!(
            parse_target("at-timestamp=1714564800250"),
            Ok(Target::AtTimestamp(
                UNIX_EPOCH + Duration::from_millis(1_714_564_800_250)
            ))
        );
        assert!(parse_target("at-timestamp=yesterday").is_err());
        assert!(parse_target("at-timestamp=").is_err());
        assert_eq!(
            parse_target("12x"),
            Ok(Target::Sequence("12x".into())),
            "checked as a sequence number later, with a typed error"
        );
    }
}
