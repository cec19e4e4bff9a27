use std::collections::HashMap;

use base64::Engine as _;
use proptest::prelude::*;

use super::*;
use crate::sequence::SequenceNumber;

/// What de-aggregating one record gave, in a vector of its own.
#[derive(Debug)]
struct Deaggregated {
    records: Vec<Record>,
    problem: Option<AggregationProblem>,
    dropped_out_of_range: usize,
}

fn deaggregate(record: Record, shard_range: Option<HashKeyRange>) -> Deaggregated {
    let mut records = Vec::new();
    let outcome = super::deaggregate(record, shard_range, &mut records);
    Deaggregated {
        records,
        problem: outcome.problem,
        dropped_out_of_range: outcome.dropped_out_of_range,
    }
}

fn record(data: Vec<u8>) -> Record {
    Record::new(
        SequenceNumber::new("49590338271490256608559692538361571095921575989136588898").unwrap(),
        "outer",
        data,
    )
}

/// The fixtures written by `aws_kinesis_agg` (see scripts/gen-kpl-fixtures.py).
fn fixtures() -> HashMap<String, (Vec<u8>, serde_json::Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kpl");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/fixtures.json")).unwrap())
            .unwrap();
    index
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, expected)| {
            let bytes = std::fs::read(format!("{dir}/{name}.bin")).unwrap();
            (name.clone(), (bytes, expected.clone()))
        })
        .collect()
}

#[test]
fn records_aggregated_by_an_independent_aggregator_come_back_out() {
    let fixtures = fixtures();
    assert_eq!(fixtures.len(), 5);
    for (name, (bytes, expected)) in fixtures {
        let out = deaggregate(record(bytes), None);
        assert_eq!(out.problem, None, "{name}");
        let expected = expected["records"].as_array().unwrap();
        assert_eq!(out.records.len(), expected.len(), "{name}");
        for (i, (got, want)) in out.records.iter().zip(expected).enumerate() {
            assert_eq!(
                got.partition_key,
                want["partition_key"].as_str().unwrap(),
                "{name}[{i}]"
            );
            assert_eq!(
                got.explicit_hash_key.as_deref(),
                want["explicit_hash_key"].as_str(),
                "{name}[{i}]"
            );
            let data = base64::engine::general_purpose::STANDARD
                .decode(want["data_base64"].as_str().unwrap())
                .unwrap();
            assert_eq!(got.data, data, "{name}[{i}]");
            assert_eq!(got.sub_sequence_number, i as u64);
            assert!(got.aggregated);
            assert_eq!(
                got.sequence_number.as_str(),
                "49590338271490256608559692538361571095921575989136588898"
            );
        }
    }
}

#[test]
fn a_plain_record_passes_through() {
    let out = deaggregate(record(b"just data".to_vec()), None);
    assert_eq!(out.records.len(), 1);
    assert!(!out.records[0].aggregated);
    assert_eq!(out.problem, None);
}

// The public form the admin tool uses to tell where a checkpoint covering a whole Kinesis
// record stands.
#[test]
fn user_records_ends_at_the_last_user_record_or_is_the_plain_record() {
    for (name, (bytes, expected)) in fixtures() {
        let users = super::user_records(record(bytes), None);
        let count = expected["records"].as_array().unwrap().len();
        assert_eq!(users.len(), count, "{name}");
        assert_eq!(
            users.last().map(|r| r.sub_sequence_number),
            Some(count as u64 - 1),
            "{name}"
        );
    }
    let plain = super::user_records(record(b"just data".to_vec()), None);
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].sub_sequence_number, 0);
    assert_eq!(plain[0].data, b"just data".as_slice());
}

#[test]
fn a_bad_digest_is_delivered_as_a_plain_record() {
    let (mut bytes, _) = fixtures().remove("five_keys").unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let out = deaggregate(record(bytes.clone()), None);
    assert_eq!(out.problem, Some(AggregationProblem::DigestMismatch));
    assert_eq!(out.records.len(), 1);
    assert_eq!(out.records[0].data, bytes, "delivered unchanged");
    assert!(!out.records[0].aggregated);
    // Too short to even hold a digest.
    let out = deaggregate(record([&KPL_MAGIC[..], &[1, 2, 3]].concat()), None);
    assert_eq!(out.problem, Some(AggregationProblem::DigestMismatch));
}

fn with_digest(message: &[u8]) -> Vec<u8> {
    [&KPL_MAGIC[..], message, Md5::digest(message).as_slice()].concat()
}

#[test]
fn bad_protobuf_with_a_good_digest_is_delivered_as_a_plain_record() {
    let bytes = with_digest(&[0xFF, 0xFF, 0xFF, 0xFF, 0x0F]);
    let out = deaggregate(record(bytes.clone()), None);
    assert!(
        matches!(out.problem, Some(AggregationProblem::Undecodable(_))),
        "{:?}",
        out.problem
    );
    assert_eq!(out.records[0].data, bytes);
}

#[test]
fn an_index_pointing_nowhere_is_delivered_as_a_plain_record() {
    let message = AggregatedRecord {
        partition_key_table: vec!["a".into()],
        explicit_hash_key_table: vec![],
        records: vec![
            UserRecord {
                partition_key_index: 0,
                explicit_hash_key_index: None,
                data: Bytes::from_static(b"ok"),
                tags: vec![],
            },
            UserRecord {
                partition_key_index: 7,
                explicit_hash_key_index: None,
                data: Bytes::from_static(b"bad"),
                tags: vec![],
            },
        ],
    };
    let bytes = with_digest(&prost::Message::encode_to_vec(&message));
    let out = deaggregate(record(bytes), None);
    assert_eq!(out.problem, Some(AggregationProblem::IndexOutOfRange));
    assert_eq!(out.records.len(), 1);
}

#[test]
fn user_records_hashing_outside_the_shard_are_dropped() {
    let (bytes, _) = fixtures().remove("explicit_hash_keys").unwrap();
    // Explicit hash keys 1, 2^128-2 and 2^127: only the first is in the lower half (2^127 is
    // the upper half's first key).
    let lower_half = HashKeyRange {
        starting_hash_key: 0,
        ending_hash_key: (1u128 << 127) - 1,
    };
    let out = deaggregate(record(bytes), Some(lower_half));
    assert_eq!(
        out.records.iter().map(|r| &r.data[..]).collect::<Vec<_>>(),
        vec![&b"low"[..]]
    );
    assert_eq!(out.dropped_out_of_range, 2);
    assert_eq!(
        out.records[0].sub_sequence_number, 0,
        "sub-sequence numbers stay those of the aggregate"
    );
}

#[test]
fn partition_keys_hash_like_kinesis() {
    // MD5("key-0") = a6 0a d2 85 ...
    let hash = partition_key_hash("key-0");
    assert_eq!(hash.to_be_bytes(), <[u8; 16]>::from(Md5::digest(b"key-0")));
    let (bytes, _) = fixtures().remove("five_keys").unwrap();
    let all = deaggregate(record(bytes.clone()), None).records;
    let in_range = HashKeyRange {
        starting_hash_key: hash,
        ending_hash_key: hash,
    };
    let only = deaggregate(record(bytes), Some(in_range)).records;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].partition_key, "key-0");
    assert_eq!(all.len(), 5);
}

proptest! {
    /// Fuzzing: any bytes, with or without the magic prefix and a valid digest, give records
    /// and never a panic; nothing is lost (a record comes out unchanged unless it
    /// de-aggregated cleanly).
    #[test]
    fn arbitrary_bytes_never_panic_and_lose_nothing(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        magic in any::<bool>(),
        valid_digest in any::<bool>(),
    ) {
        let bytes = match (magic, valid_digest) {
            (true, true) => with_digest(&body),
            (true, false) => [&KPL_MAGIC[..], &body].concat(),
            (false, _) => body.clone(),
        };
        let out = deaggregate(record(bytes.clone()), None);
        if out.problem.is_some() || !magic {
            prop_assert_eq!(out.records.len(), 1);
            prop_assert_eq!(&out.records[0].data, &bytes);
        }
    }

    /// Round trip through the protobuf encoder: what goes in comes out.
    #[test]
    fn encoded_aggregates_round_trip(
        keys in proptest::collection::vec("[a-z0-9]{1,8}", 1..4),
        users in proptest::collection::vec((0usize..4, proptest::collection::vec(any::<u8>(), 0..32)), 0..20),
    ) {
        let message = AggregatedRecord {
            partition_key_table: keys.clone(),
            explicit_hash_key_table: vec![],
            records: users.iter().map(|(k, data)| UserRecord {
                partition_key_index: (k % keys.len()) as u64,
                explicit_hash_key_index: None,
                data: Bytes::from(data.clone()),
                tags: vec![],
            }).collect(),
        };
        let out = deaggregate(record(with_digest(&prost::Message::encode_to_vec(&message))), None);
        prop_assert_eq!(out.problem, None);
        prop_assert_eq!(out.records.len(), users.len());
        for (got, (k, data)) in out.records.iter().zip(&users) {
            prop_assert_eq!(&got.partition_key, &keys[k % keys.len()]);
            prop_assert_eq!(&got.data, data);
        }
    }
}

/// A mutation of a byte string: what a fuzzer does to a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        let len = bytes.len().max(1);
        match self {
            Mutation::Flip { at, bit } => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= 1 << (bit % 8);
                }
            }
            Mutation::Set { at, byte } => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b = *byte;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at % len),
            Mutation::Insert { at, bytes: new } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Remove { at, len: n } => {
                let at = at % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
        }
    }
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

/// The protobuf bodies of the independent aggregator's fixtures: the seed corpus.
fn fixture_bodies() -> &'static [Vec<u8>] {
    static CORPUS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(read_fixture_bodies)
}

fn read_fixture_bodies() -> Vec<Vec<u8>> {
    let mut bodies: Vec<(String, Vec<u8>)> = fixtures()
        .into_iter()
        .filter_map(|(name, (bytes, _))| {
            let body = bytes.strip_prefix(&KPL_MAGIC)?;
            Some((name, body[..body.len().checked_sub(DIGEST_LEN)?].to_vec()))
        })
        .collect();
    bodies.sort();
    bodies.into_iter().map(|(_, body)| body).collect()
}

proptest! {
    /// Structure-aware fuzzing: aggregates made by the independent aggregator, mutated, with
    /// the digest made valid again, so the mutations reach the protobuf decoder and the
    /// index checks. Never a panic; a record that does not de-aggregate cleanly comes out
    /// whole; one that does gives user records whose keys come from its tables.
    #[test]
    fn mutated_aggregates_never_panic_and_lose_nothing(
        which in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(arb_mutation(), 1..6),
        range in proptest::option::of((any::<u128>(), any::<u128>())),
    ) {
        let corpus = fixture_bodies();
        prop_assume!(!corpus.is_empty());
        let mut body = corpus[which.index(corpus.len())].clone();
        for m in &mutations {
            m.apply(&mut body);
        }
        let bytes = with_digest(&body);
        let shard_range = range.map(|(a, b)| HashKeyRange {
            starting_hash_key: a.min(b),
            ending_hash_key: a.max(b),
        });
        let out = deaggregate(record(bytes.clone()), shard_range);
        if out.problem.is_some() {
            prop_assert_eq!(out.records.len(), 1);
            prop_assert_eq!(&out.records[0].data, &bytes);
            prop_assert_eq!(out.dropped_out_of_range, 0);
        } else {
            let message = <AggregatedRecord as prost::Message>::decode(body.as_slice()).unwrap();
            prop_assert_eq!(out.records.len() + out.dropped_out_of_range, message.records.len());
            for r in &out.records {
                prop_assert!(message.partition_key_table.contains(&r.partition_key));
            }
        }
    }
}

#[test]
fn user_records_share_the_aggregate_buffer_instead_of_copying_it() {
    let (bytes, _) = fixtures().remove("five_keys").unwrap();
    let outer = record(bytes);
    let buffer = outer.data.as_ptr_range();
    let out = deaggregate(outer.clone(), None);
    assert!(!out.records.is_empty());
    for user in out.records.iter().filter(|r| !r.data.is_empty()) {
        let view = user.data.as_ptr_range();
        assert!(
            buffer.start <= view.start && view.end <= buffer.end,
            "user record {} was copied out of the aggregate",
            user.sub_sequence_number
        );
    }
}
