//! A KPL aggregate encoder: what the Kinesis Producer Library puts with aggregation on, the
//! magic bytes `F3 89 9A C2`, a protobuf `AggregatedRecord`, and the MD5 digest of that
//! protobuf. `kcl-agent --aggregate` packs lines with it; the library's de-aggregation
//! (`kcl_core::user_records`) is the decoder, and [`user_records`] here a hand-written one for
//! tests.
//!
//! [`AggregateBuilder`] knows the encoded size of what it holds at every step, so a caller can
//! keep each aggregated record under the 1 MiB a Kinesis record may carry without encoding it
//! to find out.

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::encoding::encoded_len_varint;

/// The first bytes of a KPL-aggregated record.
const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// The MD5 digest that ends an aggregated record.
const DIGEST_LEN: usize = 16;
/// One byte: the tag of every field used here (field numbers below 16).
const TAG_LEN: usize = 1;

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

/// An aggregated record being filled: user records (partition key, data) in order, each key
/// once in the partition-key table, as the KPL writes them.
#[derive(Debug, Clone, Default)]
pub struct AggregateBuilder {
    message: AggregatedRecord,
    /// The encoded size of `message`, kept up to date by [`AggregateBuilder::push`].
    body_len: usize,
}

/// The encoded size of a length-delimited field holding `len` bytes.
fn delimited_len(len: usize) -> usize {
    TAG_LEN + encoded_len_varint(len as u64) + len
}

/// The encoded size of a user record pointing at key `index` and holding `data_len` bytes.
fn user_record_len(index: usize, data_len: usize) -> usize {
    let inner = TAG_LEN + encoded_len_varint(index as u64) + delimited_len(data_len);
    delimited_len(inner)
}

impl AggregateBuilder {
    /// An empty aggregate.
    pub fn new() -> Self {
        AggregateBuilder::default()
    }

    /// User records held.
    pub fn len(&self) -> usize {
        self.message.records.len()
    }

    /// True when no user record is held.
    pub fn is_empty(&self) -> bool {
        self.message.records.is_empty()
    }

    /// The size of the aggregated record [`AggregateBuilder::finish`] would return now.
    pub fn size(&self) -> usize {
        KPL_MAGIC.len() + self.body_len + DIGEST_LEN
    }

    /// The size it would have with one more user record of `key` and `data_len` bytes.
    pub fn size_with(&self, key: &str, data_len: usize) -> usize {
        let (index, new_key) = match self.key_index(key) {
            Some(i) => (i, 0),
            None => (
                self.message.partition_key_table.len(),
                delimited_len(key.len()),
            ),
        };
        self.size() + new_key + user_record_len(index, data_len)
    }

    fn key_index(&self, key: &str) -> Option<usize> {
        self.message
            .partition_key_table
            .iter()
            .position(|k| k == key)
    }

    /// Adds a user record.
    pub fn push(&mut self, key: &str, data: Bytes) {
        let index = match self.key_index(key) {
            Some(i) => i,
            None => {
                self.message.partition_key_table.push(key.to_owned());
                self.body_len += delimited_len(key.len());
                self.message.partition_key_table.len() - 1
            }
        };
        self.body_len += user_record_len(index, data.len());
        self.message.records.push(UserRecord {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data,
        });
    }

    /// The aggregated record: magic bytes, protobuf, MD5 digest of the protobuf.
    pub fn finish(self) -> Vec<u8> {
        let body = prost::Message::encode_to_vec(&self.message);
        debug_assert_eq!(body.len(), self.body_len, "size kept in step");
        let mut out = Vec::with_capacity(KPL_MAGIC.len() + body.len() + DIGEST_LEN);
        out.extend_from_slice(&KPL_MAGIC);
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        out
    }
}

/// One aggregated record holding `records` (partition key, data) in order, each key once in
/// the partition-key table, as the KPL writes them. Put it with the first record's partition
/// key, as the KPL does; every key must hash into the same shard, or the consumer drops the
/// user records that belong elsewhere.
pub fn aggregate(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = AggregateBuilder::new();
    for (key, data) in records {
        builder.push(key, Bytes::copy_from_slice(data));
    }
    builder.finish()
}

/// The user records' data of a KPL aggregate, as a hand-written consumer would decode it
/// (views into `data`, not copies): `None` when `data` is not an aggregate with a matching
/// digest.
pub fn user_records(data: Bytes) -> Option<Vec<Bytes>> {
    let digest_at = data.len().checked_sub(DIGEST_LEN)?;
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

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../kcl-core/tests/fixtures/kpl/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The KPL's own bytes for five records with five keys (`kcl-core/tests/fixtures/kpl`).
    #[test]
    fn encodes_five_records_as_the_kpl_does() {
        let fixture = fixture("five_keys.bin");
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
        let fixtures: serde_json::Value =
            serde_json::from_slice(&fixture("fixtures.json")).expect("json");
        let records: Vec<(String, Vec<u8>)> = fixtures["shared_keys"]["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| {
                use base64::Engine as _;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(r["data_base64"].as_str().expect("data"))
                    .expect("base64");
                (r["partition_key"].as_str().expect("key").to_owned(), data)
            })
            .collect();
        assert_eq!(aggregate(&records), fixture("shared_keys.bin"));
    }

    /// The size the builder announces is the size it encodes, across varint boundaries
    /// (127/128 bytes, 16 KiB) and with keys new and repeated.
    #[test]
    fn announces_the_size_it_encodes() {
        let mut builder = AggregateBuilder::new();
        assert_eq!(builder.size(), 20);
        let sizes = [0usize, 1, 126, 127, 128, 300, 16_383, 16_384, 70_000, 5];
        for (i, len) in sizes.into_iter().enumerate() {
            let key = format!("key-{}", i % 3);
            let announced = builder.size_with(&key, len);
            builder.push(&key, Bytes::from(vec![b'x'; len]));
            assert_eq!(builder.size(), announced, "record {i} of {len} bytes");
        }
        assert_eq!(builder.len(), sizes.len());
        let size = builder.size();
        let encoded = builder.finish();
        assert_eq!(encoded.len(), size);
        let decoded = user_records(encoded.into()).expect("an aggregate");
        assert_eq!(
            decoded.iter().map(Bytes::len).collect::<Vec<_>>(),
            sizes.to_vec()
        );
    }
}
