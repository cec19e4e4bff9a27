//! A KPL aggregate encoder, so that tests and benches can put what the Kinesis Producer
//! Library puts: the magic bytes `F3 89 9A C2`, a protobuf `AggregatedRecord`, and the MD5
//! digest of that protobuf. The library's de-aggregation (`kcl-core`) is the decoder.

use bytes::Bytes;
use md5::{Digest, Md5};

/// The first bytes of a KPL-aggregated record.
const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

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
}

/// One aggregated record holding `records` (partition key, data) in order, each key once in
/// the partition-key table, as the KPL writes them. Put it with the first record's partition
/// key, as the KPL does; every key must hash into the same shard, or the consumer drops the
/// user records that belong elsewhere.
pub fn aggregate(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut partition_key_table: Vec<String> = Vec::new();
    let mut user_records = Vec::with_capacity(records.len());
    for (key, data) in records {
        let index = match partition_key_table.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                partition_key_table.push(key.clone());
                partition_key_table.len() - 1
            }
        };
        user_records.push(UserRecord {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data: Bytes::copy_from_slice(data),
        });
    }
    let message = AggregatedRecord {
        partition_key_table,
        explicit_hash_key_table: Vec::new(),
        records: user_records,
    };
    let body = prost::Message::encode_to_vec(&message);
    let mut out = Vec::with_capacity(KPL_MAGIC.len() + body.len() + 16);
    out.extend_from_slice(&KPL_MAGIC);
    out.extend_from_slice(&body);
    out.extend_from_slice(&Md5::digest(&body));
    out
}

/// The user records' data of a KPL aggregate, as a hand-written consumer would decode it
/// (views into `data`, not copies): `None` when `data` is not an aggregate with a matching
/// digest.
pub fn user_records(data: Bytes) -> Option<Vec<Bytes>> {
    let digest_at = data.len().checked_sub(16)?;
    if digest_at < KPL_MAGIC.len() || data[..KPL_MAGIC.len()] != KPL_MAGIC {
        return None;
    }
    let body = data.slice(KPL_MAGIC.len()..digest_at);
    if Md5::digest(&body).as_slice() != &data[digest_at..] {
        return None;
    }
    let message: AggregatedRecord = prost::Message::decode(body).ok()?;
    Some(message.records.into_iter().map(|r| r.data).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The KPL's own bytes for five records with five keys (`kcl-core/tests/fixtures/kpl`).
    #[test]
    fn encodes_five_records_as_the_kpl_does() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../kcl-core/tests/fixtures/kpl/five_keys.bin"
        ))
        .expect("fixture");
        let records: Vec<(String, Vec<u8>)> = (0..5)
            .map(|i| (format!("key-{i}"), format!("record {i}").into_bytes()))
            .collect();
        assert_eq!(aggregate(&records), fixture);
        let data: Vec<Bytes> = records.into_iter().map(|(_, d)| d.into()).collect();
        assert_eq!(user_records(fixture.clone().into()), Some(data));
        let mut corrupt = fixture;
        *corrupt.last_mut().unwrap() ^= 0xFF;
        assert_eq!(user_records(corrupt.into()), None);
        assert_eq!(user_records(Bytes::from_static(b"plain")), None);
    }

    /// The KPL's own bytes for twenty records over three keys, each key once in the table.
    #[test]
    fn shares_repeated_keys_as_the_kpl_does() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../kcl-core/tests/fixtures/kpl/shared_keys.bin"
        ))
        .expect("fixture");
        let fixtures: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../kcl-core/tests/fixtures/kpl/fixtures.json"
            ))
            .expect("fixtures.json"),
        )
        .expect("json");
        let records: Vec<(String, Vec<u8>)> = fixtures["shared_keys"]["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| {
                let data = r["data_base64"].as_str().expect("data");
                (
                    r["partition_key"].as_str().expect("key").to_owned(),
                    base64_decode(data),
                )
            })
            .collect();
        assert_eq!(aggregate(&records), fixture);
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64")
    }
}
