//! The lease item: attribute names (those of the Java KCL, so an operator who knows it can
//! read the table) and the conversion between items and [`Lease`]s.
//!
//! Decoding never panics: a missing or malformed attribute is an
//! [`Error::InvalidLeaseItem`] naming the table, the lease key and the attribute. Attributes
//! this library does not know (the Java KCL's `pendingCheckpoint`, `throughputKBps`, ...) are
//! ignored.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;
use kcl_core::{Checkpoint, Error, HashKeyRange, Lease, Result};

/// Hash key: the shard id.
pub const LEASE_KEY: &str = "leaseKey";
/// Worker id of the owner; absent when the lease is unowned.
pub const LEASE_OWNER: &str = "leaseOwner";
/// Heartbeat and fencing counter.
pub const LEASE_COUNTER: &str = "leaseCounter";
/// Sequence number or sentinel (`TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`, `SHARD_END`).
pub const CHECKPOINT: &str = "checkpoint";
/// Sub-sequence number of the checkpoint (KPL aggregation).
pub const CHECKPOINT_SUB_SEQUENCE_NUMBER: &str = "checkpointSubSequenceNumber";
/// Owner changes since the last checkpoint.
pub const OWNER_SWITCHES_SINCE_CHECKPOINT: &str = "ownerSwitchesSinceCheckpoint";
/// Parent shard ids (string set).
pub const PARENT_SHARD_ID: &str = "parentShardId";
/// Child shard ids (string set).
pub const CHILD_SHARD_IDS: &str = "childShardIds";
/// First hash key of the shard (decimal string).
pub const STARTING_HASH_KEY: &str = "startingHashKey";
/// Last hash key of the shard (decimal string).
pub const ENDING_HASH_KEY: &str = "endingHashKey";
/// The worker a pending handoff goes to (a request to the owner, or a reservation of an
/// unowned lease). Not a Java KCL attribute: KCL 3 hands over through `checkpointOwner` with
/// a leader; this library has no leader.
pub const HANDOFF_TO: &str = "handoffTo";
/// The name of the stream whose shard the lease is, written when the lease is created: a
/// worker refuses a table whose leases name another stream. The Java KCL names the same
/// attribute in multi-stream mode (with its stream identifier); in single-stream mode it
/// ignores it, as it ignores every attribute it does not know.
pub const STREAM_NAME: &str = "streamName";
/// A multi-stream lease's shard id (its key is `ACCOUNT:NAME:EPOCH:SHARD_ID`).
pub const SHARD_ID: &str = "shardId";
/// Java KCL 3.x only: the worker that must checkpoint and shut down before the lease's new
/// `leaseOwner` may process it (set by the Java leader during a graceful handoff, removed when
/// the old owner lets go). A Java 3.x worker does not renew a lease whose `checkpointOwner`
/// is set and is not itself, so a take removes it, as the Java KCL's take and assign do
/// (`DynamoDBLeaseSerializer::getDynamoTakeLeaseUpdate`); otherwise a lease taken from a Java
/// worker mid-handoff could not be renewed after a rollback to Java. This library never sets
/// it and otherwise ignores it.
pub const CHECKPOINT_OWNER: &str = "checkpointOwner";

/// The item stored for `lease`.
pub fn lease_to_item(lease: &Lease) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::new();
    item.insert(
        LEASE_KEY.to_owned(),
        AttributeValue::S(lease.lease_key.clone()),
    );
    if let Some(owner) = &lease.owner {
        item.insert(LEASE_OWNER.to_owned(), AttributeValue::S(owner.clone()));
    }
    item.insert(LEASE_COUNTER.to_owned(), number(lease.counter));
    item.insert(
        CHECKPOINT.to_owned(),
        AttributeValue::S(lease.checkpoint.as_text().to_owned()),
    );
    item.insert(
        CHECKPOINT_SUB_SEQUENCE_NUMBER.to_owned(),
        number(lease.checkpoint.sub_sequence_number()),
    );
    item.insert(
        OWNER_SWITCHES_SINCE_CHECKPOINT.to_owned(),
        number(lease.owner_switches_since_checkpoint),
    );
    // DynamoDB has no empty sets: an empty set is an absent attribute.
    if !lease.parent_shard_ids.is_empty() {
        item.insert(
            PARENT_SHARD_ID.to_owned(),
            AttributeValue::Ss(lease.parent_shard_ids.iter().cloned().collect()),
        );
    }
    if !lease.child_shard_ids.is_empty() {
        item.insert(
            CHILD_SHARD_IDS.to_owned(),
            AttributeValue::Ss(lease.child_shard_ids.iter().cloned().collect()),
        );
    }
    if let Some(to) = &lease.handoff_to {
        item.insert(HANDOFF_TO.to_owned(), AttributeValue::S(to.clone()));
    }
    if let Some(stream) = &lease.stream_name {
        item.insert(STREAM_NAME.to_owned(), AttributeValue::S(stream.clone()));
    }
    if let Some(shard_id) = &lease.shard_id {
        item.insert(SHARD_ID.to_owned(), AttributeValue::S(shard_id.clone()));
    }
    if let Some(range) = lease.hash_key_range {
        item.insert(
            STARTING_HASH_KEY.to_owned(),
            AttributeValue::S(range.starting_hash_key.to_string()),
        );
        item.insert(
            ENDING_HASH_KEY.to_owned(),
            AttributeValue::S(range.ending_hash_key.to_string()),
        );
    }
    item
}

/// A DynamoDB number attribute.
pub(crate) fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// Decodes a lease item of `table`.
///
/// # Errors
/// [`Error::InvalidLeaseItem`] for the first attribute that is missing or malformed.
pub fn lease_from_item(table: &str, item: &HashMap<String, AttributeValue>) -> Result<Lease> {
    let lease_key = match item.get(LEASE_KEY) {
        Some(AttributeValue::S(key)) if !key.is_empty() => key.clone(),
        other => {
            return Err(Error::InvalidLeaseItem {
                table: table.to_owned(),
                lease_key: "<missing>".to_owned(),
                attribute: LEASE_KEY,
                problem: describe_wrong("a non-empty string", other),
            });
        }
    };
    let decoder = Decoder {
        table,
        lease_key: &lease_key,
        item,
    };
    let owner = decoder.optional_string(LEASE_OWNER)?;
    let handoff_to = decoder.optional_string(HANDOFF_TO)?;
    let stream_name = decoder.optional_string(STREAM_NAME)?;
    let shard_id = decoder.optional_string(SHARD_ID)?;
    let counter = decoder.required_number(LEASE_COUNTER)?;
    let sub_sequence_number = decoder
        .optional_number(CHECKPOINT_SUB_SEQUENCE_NUMBER)?
        .unwrap_or(0);
    let checkpoint = match item.get(CHECKPOINT) {
        Some(AttributeValue::S(text)) => {
            Checkpoint::parse(text, sub_sequence_number).map_err(|e| {
                decoder.invalid(
                    CHECKPOINT,
                    format!("is neither a sequence number nor a sentinel: {e}"),
                )
            })?
        }
        other => return Err(decoder.invalid(CHECKPOINT, describe_wrong("a string", other))),
    };
    let owner_switches = decoder
        .optional_number(OWNER_SWITCHES_SINCE_CHECKPOINT)?
        .unwrap_or(0);
    let parents = decoder.string_set(PARENT_SHARD_ID)?;
    let children = decoder.string_set(CHILD_SHARD_IDS)?;
    let hash_key_range = decoder.hash_key_range()?;
    let mut lease = Lease::new(lease_key, checkpoint).with_parents(parents);
    lease.owner = owner;
    lease.counter = counter;
    lease.owner_switches_since_checkpoint = owner_switches;
    lease.child_shard_ids = children;
    lease.hash_key_range = hash_key_range;
    lease.handoff_to = handoff_to;
    lease.stream_name = stream_name;
    lease.shard_id = shard_id;
    Ok(lease)
}

/// Decodes the attributes of one item, each on its own (a repair keeps those that decode).
pub(crate) struct Decoder<'a> {
    pub(crate) table: &'a str,
    pub(crate) lease_key: &'a str,
    pub(crate) item: &'a HashMap<String, AttributeValue>,
}

impl Decoder<'_> {
    pub(crate) fn invalid(&self, attribute: &'static str, problem: String) -> Error {
        Error::InvalidLeaseItem {
            table: self.table.to_owned(),
            lease_key: self.lease_key.to_owned(),
            attribute,
            problem,
        }
    }

    pub(crate) fn optional_number(&self, attribute: &'static str) -> Result<Option<u64>> {
        match self.item.get(attribute) {
            None => Ok(None),
            Some(AttributeValue::N(text)) => text.parse::<u64>().map(Some).map_err(|_| {
                self.invalid(
                    attribute,
                    format!("is {text}, not a whole number from 0 to 2^64-1"),
                )
            }),
            other => Err(self.invalid(attribute, describe_wrong("a number", other))),
        }
    }

    /// A non-empty string, absent or null for none.
    pub(crate) fn optional_string(&self, attribute: &'static str) -> Result<Option<String>> {
        match self.item.get(attribute) {
            None | Some(AttributeValue::Null(true)) => Ok(None),
            Some(AttributeValue::S(text)) if !text.is_empty() => Ok(Some(text.clone())),
            other => Err(self.invalid(attribute, describe_wrong("a non-empty string", other))),
        }
    }

    /// The hash key range: both ends or neither.
    pub(crate) fn hash_key_range(&self) -> Result<Option<HashKeyRange>> {
        match (
            self.hash_key(STARTING_HASH_KEY)?,
            self.hash_key(ENDING_HASH_KEY)?,
        ) {
            (Some(start), Some(end)) if start <= end => Ok(Some(HashKeyRange {
                starting_hash_key: start,
                ending_hash_key: end,
            })),
            (None, None) => Ok(None),
            (Some(_), Some(_)) => {
                Err(self.invalid(ENDING_HASH_KEY, format!("is below {STARTING_HASH_KEY}")))
            }
            (Some(_), None) => Err(self.invalid(
                ENDING_HASH_KEY,
                format!("is missing while {STARTING_HASH_KEY} is set"),
            )),
            (None, Some(_)) => Err(self.invalid(
                STARTING_HASH_KEY,
                format!("is missing while {ENDING_HASH_KEY} is set"),
            )),
        }
    }

    fn required_number(&self, attribute: &'static str) -> Result<u64> {
        self.optional_number(attribute)?
            .ok_or_else(|| self.invalid(attribute, "is missing".to_owned()))
    }

    pub(crate) fn string_set(&self, attribute: &'static str) -> Result<BTreeSet<String>> {
        match self.item.get(attribute) {
            None => Ok(BTreeSet::new()),
            Some(AttributeValue::Ss(values)) => Ok(values.iter().cloned().collect()),
            other => Err(self.invalid(attribute, describe_wrong("a string set", other))),
        }
    }

    fn hash_key(&self, attribute: &'static str) -> Result<Option<u128>> {
        match self.item.get(attribute) {
            None => Ok(None),
            Some(AttributeValue::S(text)) => text.parse::<u128>().map(Some).map_err(|_| {
                self.invalid(
                    attribute,
                    format!("is `{text}`, not a hash key from 0 to 2^128-1"),
                )
            }),
            other => Err(self.invalid(attribute, describe_wrong("a decimal string", other))),
        }
    }
}

/// "is missing" or "is a number, not a string".
pub(crate) fn describe_wrong(expected: &str, found: Option<&AttributeValue>) -> String {
    let Some(value) = found else {
        return "is missing".to_owned();
    };
    let kind = match value {
        AttributeValue::S(s) if s.is_empty() => "an empty string",
        AttributeValue::S(_) => "a string",
        AttributeValue::N(_) => "a number",
        AttributeValue::B(_) => "binary",
        AttributeValue::Bool(_) => "a boolean",
        AttributeValue::Null(_) => "null",
        AttributeValue::L(_) => "a list",
        AttributeValue::M(_) => "a map",
        AttributeValue::Ss(_) => "a string set",
        AttributeValue::Ns(_) => "a number set",
        AttributeValue::Bs(_) => "a binary set",
        _ => "of an unknown type",
    };
    format!("is {kind}, not {expected}")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use kcl_core::SequenceNumber;

    fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn valid() -> HashMap<String, AttributeValue> {
        item(&[
            (LEASE_KEY, AttributeValue::S("shardId-000000000001".into())),
            (LEASE_COUNTER, AttributeValue::N("4".into())),
            (CHECKPOINT, AttributeValue::S("TRIM_HORIZON".into())),
        ])
    }

    fn attribute_of(result: Result<Lease>) -> &'static str {
        match result {
            Err(Error::InvalidLeaseItem { attribute, .. }) => attribute,
            other => panic!("expected InvalidLeaseItem, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_java_kcl_item_decodes() {
        let lease = lease_from_item("app", &valid()).unwrap();
        assert_eq!(lease.lease_key, "shardId-000000000001");
        assert_eq!(lease.counter, 4);
        assert_eq!(lease.owner, None);
        assert_eq!(lease.checkpoint, Checkpoint::TrimHorizon);
    }

    #[test]
    fn each_bad_attribute_is_named() {
        let mut it = valid();
        it.remove(LEASE_KEY);
        assert_eq!(attribute_of(lease_from_item("app", &it)), LEASE_KEY);

        let mut it = valid();
        it.insert(LEASE_COUNTER.into(), AttributeValue::S("abc".into()));
        let err = lease_from_item("app", &it).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lease `shardId-000000000001` in table `app`: attribute `leaseCounter` is a string, not a number"
        );

        let mut it = valid();
        it.insert(LEASE_COUNTER.into(), AttributeValue::N("-1".into()));
        assert_eq!(attribute_of(lease_from_item("app", &it)), LEASE_COUNTER);
        let mut it = valid();
        it.remove(LEASE_COUNTER);
        assert_eq!(attribute_of(lease_from_item("app", &it)), LEASE_COUNTER);

        let mut it = valid();
        it.insert(CHECKPOINT.into(), AttributeValue::S("not-a-number".into()));
        assert_eq!(attribute_of(lease_from_item("app", &it)), CHECKPOINT);
        let mut it = valid();
        it.remove(CHECKPOINT);
        assert_eq!(attribute_of(lease_from_item("app", &it)), CHECKPOINT);

        let mut it = valid();
        it.insert(LEASE_OWNER.into(), AttributeValue::N("3".into()));
        assert_eq!(attribute_of(lease_from_item("app", &it)), LEASE_OWNER);

        let mut it = valid();
        it.insert(
            PARENT_SHARD_ID.into(),
            AttributeValue::S("shardId-0".into()),
        );
        assert_eq!(attribute_of(lease_from_item("app", &it)), PARENT_SHARD_ID);

        let mut it = valid();
        it.insert(STARTING_HASH_KEY.into(), AttributeValue::S("12".into()));
        assert_eq!(attribute_of(lease_from_item("app", &it)), ENDING_HASH_KEY);
        it.insert(ENDING_HASH_KEY.into(), AttributeValue::S("1e9".into()));
        assert_eq!(attribute_of(lease_from_item("app", &it)), ENDING_HASH_KEY);
    }

    #[test]
    fn unknown_attributes_are_ignored() {
        let mut it = valid();
        it.insert("pendingCheckpoint".into(), AttributeValue::S("123".into()));
        it.insert("throughputKBps".into(), AttributeValue::N("1.5".into()));
        assert!(lease_from_item("app", &it).is_ok());
    }

    fn arb_lease() -> impl Strategy<Value = Lease> {
        let checkpoint = prop_oneof![
            Just(Checkpoint::TrimHorizon),
            Just(Checkpoint::Latest),
            Just(Checkpoint::AtTimestamp),
            Just(Checkpoint::ShardEnd),
            (any::<u128>(), any::<u64>()).prop_map(|(s, sub)| Checkpoint::at(
                SequenceNumber::new(s.to_string()).unwrap(),
                sub
            )),
        ];
        let ids = proptest::collection::btree_set("shardId-[0-9]{12}", 0..3);
        (
            "shardId-[0-9]{12}",
            proptest::option::of("[a-z0-9-]{1,40}"),
            any::<u64>(),
            checkpoint,
            any::<u64>(),
            ids.clone(),
            ids,
            proptest::option::of((any::<u128>(), any::<u128>())),
            proptest::option::of("[a-z0-9-]{1,40}"),
            proptest::option::of("[a-zA-Z0-9_.-]{1,128}"),
            proptest::option::of("shardId-[0-9]{12}"),
        )
            .prop_map(
                |(
                    key,
                    owner,
                    counter,
                    checkpoint,
                    switches,
                    parents,
                    children,
                    range,
                    handoff_to,
                    stream_name,
                    shard_id,
                )| {
                    let mut lease = Lease::new(key, checkpoint).with_parents(parents);
                    lease.owner = owner;
                    lease.counter = counter;
                    lease.owner_switches_since_checkpoint = switches;
                    lease.child_shard_ids = children;
                    lease.hash_key_range = range.map(|(a, b)| HashKeyRange {
                        starting_hash_key: a.min(b),
                        ending_hash_key: a.max(b),
                    });
                    lease.handoff_to = handoff_to;
                    lease.stream_name = stream_name;
                    lease.shard_id = shard_id;
                    lease
                },
            )
    }

    fn arb_value() -> impl Strategy<Value = AttributeValue> {
        prop_oneof![
            ".{0,12}".prop_map(AttributeValue::S),
            "-?[0-9]{0,45}(\\.[0-9]{1,3})?".prop_map(AttributeValue::N),
            any::<bool>().prop_map(AttributeValue::Bool),
            proptest::collection::vec(".{0,5}", 0..3).prop_map(AttributeValue::Ss),
            Just(AttributeValue::Null(true)),
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(b))),
            proptest::collection::vec("-?[0-9]{0,5}", 0..3).prop_map(AttributeValue::Ns),
            proptest::collection::vec(".{0,5}".prop_map(AttributeValue::S), 0..3)
                .prop_map(AttributeValue::L),
            proptest::collection::hash_map(".{0,5}", ".{0,5}".prop_map(AttributeValue::S), 0..3)
                .prop_map(AttributeValue::M),
        ]
    }

    proptest! {
        #[test]
        fn leases_round_trip(lease in arb_lease()) {
            prop_assert_eq!(lease_from_item("app", &lease_to_item(&lease)).unwrap(), lease);
        }

        #[test]
        fn garbage_items_never_panic(
            base in arb_lease(),
            replacements in proptest::collection::vec(
                (prop_oneof![
                    Just(LEASE_KEY), Just(LEASE_OWNER), Just(LEASE_COUNTER), Just(CHECKPOINT),
                    Just(CHECKPOINT_SUB_SEQUENCE_NUMBER), Just(OWNER_SWITCHES_SINCE_CHECKPOINT),
                    Just(PARENT_SHARD_ID), Just(CHILD_SHARD_IDS), Just(STARTING_HASH_KEY),
                    Just(ENDING_HASH_KEY), Just(HANDOFF_TO), Just(STREAM_NAME), Just(SHARD_ID),
                ], proptest::option::of(arb_value())),
                0..5,
            ),
        ) {
            let mut item = lease_to_item(&base);
            for (name, value) in replacements {
                match value {
                    Some(v) => { item.insert(name.to_owned(), v); }
                    None => { item.remove(name); }
                }
            }
            if let Err(e) = lease_from_item("app", &item) {
                prop_assert!(matches!(e, Error::InvalidLeaseItem { .. }), "{e:?}");
            }
        }
    }
}
