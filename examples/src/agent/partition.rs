//! Which partition key a line gets (`--partition-key random|file|field:NAME`).
//!
//! Kinesis routes a record to a shard by the MD5 of its partition key and keeps order only
//! within a shard, so the key decides what stays in order: nothing with `random`, each file
//! with `file`, each value of a field (a client, a session) with `field:NAME`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

/// Kinesis takes partition keys of 1 to 256 Unicode characters.
pub const MAX_KEY_CHARS: usize = 256;

/// How lines are keyed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PartitionKey {
    /// A random key per record (per aggregated record with `--aggregate`): lines spread over
    /// all shards, in no particular order. The AWS Kinesis Agent's default.
    #[default]
    Random,
    /// The followed path (its last 256 characters): a file's lines stay in order, in one
    /// shard. A file renamed by rotation keeps the key of the path it was followed at.
    File,
    /// The string or number value of a top-level field of a JSON line; a line that is not a
    /// JSON object, lacks the field, or has a value that is not a valid key (empty, longer
    /// than 256 characters, not a string or number) gets the file's key.
    Field(String),
}

impl FromStr for PartitionKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "random" => Ok(PartitionKey::Random),
            "file" => Ok(PartitionKey::File),
            other => match other.strip_prefix("field:") {
                Some("") => Err("field: needs a field name, as in field:client_ip".to_owned()),
                Some(name) => Ok(PartitionKey::Field(name.to_owned())),
                None => Err(format!("`{other}`: expected random, file or field:NAME")),
            },
        }
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionKey::Random => f.write_str("random"),
            PartitionKey::File => f.write_str("file"),
            PartitionKey::Field(name) => write!(f, "field:{name}"),
        }
    }
}

/// The key chosen for one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKey {
    /// The line must be put under this key (its order among the key's lines matters).
    Exact(String),
    /// Any key will do (random keys): this one was drawn for the line, and an aggregated
    /// record may carry the line under another line's random key.
    Any(String),
}

impl LineKey {
    /// The key.
    pub fn as_str(&self) -> &str {
        match self {
            LineKey::Exact(key) | LineKey::Any(key) => key,
        }
    }
}

impl PartitionKey {
    /// The key of `line` (without its newline), read from the file followed at a path whose
    /// key is `file_key` (see [`file_key`]).
    pub fn key_for(&self, line: &[u8], file_key: &str) -> LineKey {
        match self {
            PartitionKey::Random => LineKey::Any(uuid::Uuid::new_v4().simple().to_string()),
            PartitionKey::File => LineKey::Exact(file_key.to_owned()),
            PartitionKey::Field(name) => LineKey::Exact(
                field_value(line, name)
                    .filter(|v| is_valid_key(v))
                    .unwrap_or_else(|| file_key.to_owned()),
            ),
        }
    }
}

/// A path as a partition key: the path itself, or its last 256 characters when longer.
pub fn file_key(path: &Path) -> String {
    let text = path.to_string_lossy();
    let count = text.chars().count();
    text.chars()
        .skip(count.saturating_sub(MAX_KEY_CHARS))
        .collect()
}

fn is_valid_key(key: &str) -> bool {
    !key.is_empty() && key.chars().count() <= MAX_KEY_CHARS
}

/// The value of the top-level field `name` of a JSON object line, as text: a string as is, a
/// number as written (`42`, `4.5`). `None` for anything else. Only that field's value is
/// built; the rest of the line is skipped over.
pub fn field_value(line: &[u8], name: &str) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(line);
    let value = FieldOf(name).deserialize(&mut de).ok()?;
    de.end().ok()?;
    value
}

/// Finds one field of a JSON object (the first, if the field is repeated).
struct FieldOf<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for FieldOf<'_> {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldOf<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(matches) = map.next_key_seed(KeyIs(self.0))? {
            if matches && found.is_none() {
                found = match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::String(s) => Some(s),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Compares an object key with a name without allocating it.
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_option() {
        assert_eq!("random".parse(), Ok(PartitionKey::Random));
        assert_eq!("file".parse(), Ok(PartitionKey::File));
        assert_eq!(
            "field:remote_addr".parse(),
            Ok(PartitionKey::Field("remote_addr".into()))
        );
        assert!("field:".parse::<PartitionKey>().is_err());
        assert!("host".parse::<PartitionKey>().is_err());
        for text in ["random", "file", "field:a.b"] {
            assert_eq!(text.parse::<PartitionKey>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn reads_a_top_level_string_or_number_field() {
        let line = br#"{"path":"/x","client":{"ip":"nested"},"ip":"10.0.0.1","n":42,"f":4.5}"#;
        assert_eq!(field_value(line, "ip").as_deref(), Some("10.0.0.1"));
        assert_eq!(field_value(line, "n").as_deref(), Some("42"));
        assert_eq!(field_value(line, "f").as_deref(), Some("4.5"));
        // Nested fields are not top-level; objects, booleans and null are not keys.
        assert_eq!(field_value(line, "client"), None);
        assert_eq!(field_value(br#"{"ok":true,"x":null}"#, "ok"), None);
        assert_eq!(field_value(br#"{"ok":true,"x":null}"#, "x"), None);
        assert_eq!(field_value(line, "missing"), None);
        // Escaped keys and values are compared and returned unescaped.
        assert_eq!(
            field_value(br#"{"a\"b":"v\u00e9"}"#, "a\"b").as_deref(),
            Some("vé")
        );
        // The first of a repeated field.
        assert_eq!(
            field_value(br#"{"k":"one","k":"two"}"#, "k").as_deref(),
            Some("one")
        );
    }

    #[test]
    fn lines_that_are_not_json_objects_have_no_field() {
        for line in [
            &b"GET /index.html 200"[..],
            b"[1,2]",
            b"\"ip\"",
            b"{\"ip\":\"1\"",
            b"{\"ip\":\"1\"} trailing",
            b"",
        ] {
            assert_eq!(field_value(line, "ip"), None, "{line:?}");
        }
        // Whitespace around the object is JSON.
        assert_eq!(
            field_value(b" {\"ip\":\"1\"}\r", "ip").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn field_keys_fall_back_to_the_file() {
        let keys = PartitionKey::Field("ip".into());
        assert_eq!(
            keys.key_for(br#"{"ip":"10.0.0.1"}"#, "/var/log/a.log"),
            LineKey::Exact("10.0.0.1".into())
        );
        for line in [
            &b"not json"[..],
            br#"{"other":1}"#,
            br#"{"ip":""}"#,
            br#"{"ip":false}"#,
        ] {
            assert_eq!(
                keys.key_for(line, "/var/log/a.log"),
                LineKey::Exact("/var/log/a.log".into()),
                "{line:?}"
            );
        }
        let long = format!(r#"{{"ip":"{}"}}"#, "é".repeat(257));
        assert_eq!(keys.key_for(long.as_bytes(), "f").as_str(), "f");
        let longest = format!(r#"{{"ip":"{}"}}"#, "é".repeat(256));
        assert_eq!(
            keys.key_for(longest.as_bytes(), "f")
                .as_str()
                .chars()
                .count(),
            256
        );
    }

    #[test]
    fn file_and_random_keys() {
        assert_eq!(
            PartitionKey::File.key_for(b"x", "/a.log"),
            LineKey::Exact("/a.log".into())
        );
        let (a, b) = (
            PartitionKey::Random.key_for(b"x", "/a.log"),
            PartitionKey::Random.key_for(b"x", "/a.log"),
        );
        assert!(matches!(a, LineKey::Any(_)));
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
    }

    #[test]
    fn long_paths_keep_their_last_256_characters() {
        assert_eq!(file_key(Path::new("/var/log/a.log")), "/var/log/a.log");
        let long = format!("/{}/access.log", "d".repeat(300));
        let key = file_key(Path::new(&long));
        assert_eq!(key.chars().count(), MAX_KEY_CHARS);
        assert!(key.ends_with("/access.log"));
    }
}
