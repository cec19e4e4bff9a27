//! De-aggregation of records written by the Kinesis Producer Library (KPL).
//!
//! A KPL-aggregated record's data is the magic bytes `F3 89 9A C2`, a protobuf
//! `AggregatedRecord` (a partition-key table, an explicit-hash-key table, and the user records
//! pointing into them), and the 16-byte MD5 digest of that protobuf. Each user record becomes
//! a [`Record`] with the aggregated record's sequence number and its index as sub-sequence
//! number.
//!
//! As in the Java KCL, a record that starts with the magic bytes but whose digest does not
//! match, whose protobuf does not decode, or whose key indexes point nowhere is delivered
//! unchanged, as a plain record, and counted; nothing is lost or panicked over. User records
//! whose hash key falls outside the shard's range (a KPL that aggregated for the parent before
//! a reshard) are dropped, as the Java KCL does: they belong to the sibling shard, which
//! delivers them too.

use bytes::Bytes;
use md5::{Digest, Md5};

use crate::stream::{HashKeyRange, Record};

/// The first bytes of a KPL-aggregated record.
pub(crate) const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

#[derive(Clone, PartialEq, prost::Message)]
struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<UserRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UserRecord {
    #[prost(uint64, required, tag = "1")]
    partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "bytes", required, tag = "3")]
    data: Bytes,
    #[prost(message, repeated, tag = "4")]
    tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Tag {
    #[prost(string, required, tag = "1")]
    key: String,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

/// Why an aggregated-looking record was delivered as a plain record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum AggregationProblem {
    /// The MD5 trailer does not match the protobuf (or the record is too short for one).
    DigestMismatch,
    /// The protobuf does not decode.
    Undecodable(String),
    /// A user record points outside the partition-key or explicit-hash-key table.
    IndexOutOfRange,
}

/// What de-aggregating one Kinesis record found besides its records.
#[derive(Debug, Default)]
#[non_exhaustive]
pub(crate) struct Outcome {
    /// Set when the record looked aggregated but was delivered as a plain record.
    pub(crate) problem: Option<AggregationProblem>,
    /// User records dropped because their hash key is outside the shard's range.
    pub(crate) dropped_out_of_range: usize,
}

/// The hash key Kinesis routes a partition key to: the MD5 of its UTF-8 bytes as a big-endian
/// 128-bit number.
pub(crate) fn partition_key_hash(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// The records a worker delivers for one Kinesis record, as `GetRecords` returned it: the
/// user records of a KPL aggregate, each with its sub-sequence number, or the record itself
/// (a plain record, or a corrupt aggregate). `shard_range`, when known, drops user records
/// hashing outside it, as the worker does.
///
/// The last one is where a checkpoint covering the whole Kinesis record stands: a checkpoint
/// at the record's sequence number with a smaller sub-sequence number leaves the rest of the
/// aggregate to be delivered.
pub fn user_records(record: Record, shard_range: Option<HashKeyRange>) -> Vec<Record> {
    let mut out = Vec::new();
    deaggregate(record, shard_range, &mut out);
    out
}

/// De-aggregates `record` onto the end of `out`: its user records, or the record itself when
/// it is not aggregated or is corrupt. `shard_range`, when known, drops user records that
/// hash outside it.
pub(crate) fn deaggregate(
    record: Record,
    shard_range: Option<HashKeyRange>,
    out: &mut Vec<Record>,
) -> Outcome {
    let mut plain = |record: Record, problem: Option<AggregationProblem>| {
        out.push(record);
        Outcome {
            problem,
            dropped_out_of_range: 0,
        }
    };
    let Some(body) = record.data.strip_prefix(&KPL_MAGIC) else {
        return plain(record, None);
    };
    let Some(split) = body.len().checked_sub(DIGEST_LEN) else {
        return plain(record, Some(AggregationProblem::DigestMismatch));
    };
    let (message, digest) = body.split_at(split);
    if Md5::digest(message).as_slice() != digest {
        return plain(record, Some(AggregationProblem::DigestMismatch));
    }
    // Decoded from a slice of the record's own buffer: user records' data are views into it.
    let start = KPL_MAGIC.len();
    let message = record.data.slice(start..start + message.len());
    let aggregated = match <AggregatedRecord as prost::Message>::decode(message) {
        Ok(aggregated) => aggregated,
        Err(e) => return plain(record, Some(AggregationProblem::Undecodable(e.to_string()))),
    };
    let AggregatedRecord {
        partition_key_table,
        explicit_hash_key_table,
        records: users,
    } = aggregated;
    // Resolve every user record's table indexes before delivering any: a bad index makes the
    // whole record suspect, and then it is delivered as it came.
    let mut resolved = Vec::with_capacity(users.len());
    for user in &users {
        let key = usize::try_from(user.partition_key_index)
            .ok()
            .filter(|&i| i < partition_key_table.len());
        let explicit = match user.explicit_hash_key_index {
            None => Some(None),
            Some(index) => usize::try_from(index)
                .ok()
                .filter(|&i| i < explicit_hash_key_table.len())
                .map(Some),
        };
        match (key, explicit) {
            (Some(key), Some(explicit)) => resolved.push((key, explicit)),
            _ => return plain(record, Some(AggregationProblem::IndexOutOfRange)),
        }
    }
    let mut outcome = Outcome::default();
    out.reserve(users.len());
    // The MD5 of each partition key, computed once per entry of the table (user records of
    // an aggregate often share keys) and only when there is a range to check.
    let mut key_hashes: Vec<Option<u128>> =
        vec![None; shard_range.map_or(0, |_| partition_key_table.len())];
    for (index, (user, (key, explicit))) in users.into_iter().zip(resolved).enumerate() {
        let explicit = explicit.map(|i| &explicit_hash_key_table[i]);
        if let Some(range) = shard_range {
            let hash = explicit
                .and_then(|e| e.parse::<u128>().ok())
                .unwrap_or_else(|| {
                    *key_hashes[key]
                        .get_or_insert_with(|| partition_key_hash(&partition_key_table[key]))
                });
            if !(range.starting_hash_key..=range.ending_hash_key).contains(&hash) {
                outcome.dropped_out_of_range += 1;
                continue;
            }
        }
        let mut user_record = Record::new(
            record.sequence_number.clone(),
            partition_key_table[key].clone(),
            user.data,
        );
        user_record.sub_sequence_number = index as u64;
        user_record.approximate_arrival_timestamp = record.approximate_arrival_timestamp;
        user_record.explicit_hash_key = explicit.cloned();
        user_record.aggregated = true;
        out.push(user_record);
    }
    outcome
}

#[cfg(test)]
mod tests;
