//! The archive read back: each object's name and lines, for `kcl-archive read`, the demo and
//! the tests.

use std::io::Read as _;

use flate2::read::MultiGzDecoder;
use serde::Serialize;

use super::ArchiveError;
use super::object_name::ObjectName;
use super::store::ObjectStore;

/// One object of the archive, as `kcl-archive read` prints it (one JSON line per object).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ArchivedObject {
    /// Its key.
    pub key: String,
    /// Its size in bytes, gzipped.
    pub size: u64,
    /// The stream its records come from.
    pub stream: String,
    /// Their shard.
    pub shard_id: String,
    /// The first record's sequence number.
    pub sequence_number: String,
    /// The first record's sub-sequence number.
    pub sub_sequence_number: u64,
    /// Its lines as stored (records that are not plain text keep their base64 marker).
    pub lines: Vec<String>,
}

/// Every object under `prefix`, sorted by key, with its lines.
pub async fn read_archive(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<ArchivedObject>, ArchiveError> {
    let mut objects = Vec::new();
    for stored in store.list(prefix).await? {
        let corrupt = |source: kcl_core::BoxError| ArchiveError::Corrupt {
            key: stored.key.clone(),
            source,
        };
        let name = ObjectName::parse(&stored.key).map_err(|e| corrupt(e.into()))?;
        let body = store.get(&stored.key).await?;
        let mut text = String::new();
        MultiGzDecoder::new(&body[..])
            .read_to_string(&mut text)
            .map_err(|e| corrupt(e.into()))?;
        objects.push(ArchivedObject {
            key: stored.key,
            size: stored.size,
            stream: name.stream,
            shard_id: name.shard_id,
            sequence_number: name.first.sequence_number.as_str().to_owned(),
            sub_sequence_number: name.first.sub_sequence_number,
            lines: text.lines().map(str::to_owned).collect(),
        });
    }
    Ok(objects)
}
