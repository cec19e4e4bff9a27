//! How far behind a lease's shard is: the age of its first unprocessed record.
//!
//! The first unprocessed record is found the way the worker resumes: at the checkpointed
//! record itself (`AT_SEQUENCE_NUMBER`), skipping what the checkpoint covers. That record is
//! processed when the checkpoint reaches its last user record ([`kcl_core::user_records`]):
//! a plain record always, a KPL aggregate only at its last sub-sequence number. So neither a
//! checkpoint at the last user record of an aggregate (sub-sequence > 0, yet complete) nor
//! one at its first (sub-sequence 0, with more to come) is misread. Lag is then now minus the
//! record's approximate arrival time, 0 when there is none (caught up); `MillisBehindLatest`
//! of the same read is shown beside it.

use std::time::{Duration, SystemTime};

use kcl_core::{Checkpoint, Lease, StartingPosition, user_records};
use serde::Serialize;

use crate::error::{AdminError, Result};
use crate::render::{human_duration, millis};
use crate::stream::Stream;

/// Records per read: the checkpointed record and the one after it.
const READ_LIMIT: u32 = 2;

/// A lease's lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Lag {
    /// Now minus the arrival of the first unprocessed record; 0 when there is none. `null`
    /// when it cannot be told (see `unknown_because`).
    pub(crate) lag_ms: Option<u64>,
    /// `MillisBehindLatest` of the read that found that record.
    pub(crate) millis_behind_latest: Option<u64>,
    /// The first unprocessed record.
    pub(crate) next_sequence_number: Option<String>,
    /// Why `lag_ms` is `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) unknown_because: Option<String>,
}

impl Lag {
    fn caught_up(millis_behind_latest: Option<u64>) -> Self {
        Lag {
            lag_ms: Some(0),
            millis_behind_latest,
            next_sequence_number: None,
            unknown_because: None,
        }
    }

    fn unknown(why: impl Into<String>) -> Self {
        Lag {
            lag_ms: None,
            millis_behind_latest: None,
            next_sequence_number: None,
            unknown_because: Some(why.into()),
        }
    }

    /// The lag column: `0s`, `12.5s`, or `?`.
    pub(crate) fn text(&self) -> String {
        self.lag_ms.map_or_else(
            || "?".to_owned(),
            |ms| human_duration(Duration::from_millis(ms)),
        )
    }

    /// The behind column: `MillisBehindLatest`, or `-`.
    pub(crate) fn behind_text(&self) -> String {
        self.millis_behind_latest
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms}ms"))
    }
}

/// The lag of `lease`'s shard in `stream`.
pub(crate) async fn lag_of(stream: &Stream, lease: &Lease) -> Result<Lag> {
    let (position, done) = match &lease.checkpoint {
        // Closed and read to its end: nothing can arrive any more.
        Checkpoint::ShardEnd => return Ok(Lag::caught_up(None)),
        Checkpoint::AtTimestamp => {
            return Ok(Lag::unknown(
                "AT_TIMESTAMP: the timestamp is in the workers' configuration, not in the lease",
            ));
        }
        Checkpoint::TrimHorizon => (StartingPosition::TrimHorizon, None),
        Checkpoint::Latest => (StartingPosition::Latest, None),
        Checkpoint::SequenceNumber(done) => (
            StartingPosition::AtSequenceNumber(done.sequence_number.clone()),
            Some(done),
        ),
    };
    let shard_id = &lease.lease_key;
    let iterator = match stream.iterator(shard_id, &position).await {
        Ok(iterator) => iterator,
        Err(kcl_core::Error::ShardNotFound { .. }) => {
            return Ok(Lag::unknown(
                "the shard or its checkpointed record is no longer in the stream",
            ));
        }
        Err(e) => return Err(AdminError::kinesis("reading the shard", e)),
    };
    let range = lease.hash_key_range;
    let reading = stream
        .read_until(shard_id, iterator, READ_LIMIT, |record| {
            let Some(done) = done else { return true };
            if record.sequence_number != done.sequence_number {
                return true;
            }
            // The checkpointed record: unprocessed while user records of it come after the
            // checkpoint.
            user_records(record.clone(), range)
                .last()
                .is_some_and(|last| last.sub_sequence_number > done.sub_sequence_number)
        })
        .await
        .map_err(|e| AdminError::kinesis("reading the shard", e))?;
    let Some(next) = reading.found else {
        return Ok(Lag::caught_up(reading.millis_behind_latest));
    };
    let lag = next.approximate_arrival_timestamp.map(|arrived| {
        millis(
            SystemTime::now()
                .duration_since(arrived)
                .unwrap_or(Duration::ZERO),
        )
    });
    Ok(Lag {
        lag_ms: lag,
        millis_behind_latest: reading.millis_behind_latest,
        next_sequence_number: Some(next.sequence_number.to_string()),
        unknown_because: lag
            .is_none()
            .then(|| "the record has no arrival time".to_owned()),
    })
}
