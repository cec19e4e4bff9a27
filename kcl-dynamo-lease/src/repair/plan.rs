//! The pure part of a repair: from the item as read to the item to write, or a refusal.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use kcl_core::{Checkpoint, Error, Lease};

use super::{Change, RepairError};
use crate::schema::{
    CHECKPOINT, CHECKPOINT_OWNER, CHECKPOINT_SUB_SEQUENCE_NUMBER, CHILD_SHARD_IDS, Decoder,
    ENDING_HASH_KEY, HANDOFF_TO, LEASE_COUNTER, LEASE_KEY, LEASE_OWNER,
    OWNER_SWITCHES_SINCE_CHECKPOINT, PARENT_SHARD_ID, SHARD_ID, STARTING_HASH_KEY, STREAM_NAME,
    describe_wrong, lease_from_item, number,
};

/// The `leaseCounter` of a repaired lease: above every counter the lease can have had, so a
/// write of a worker that held it before it broke can never match it again, even after the
/// lease has been taken and renewed many times since (no ABA on the fence).
///
/// The stored counter cannot be trusted for that: it may be unreadable, or a hand-written
/// number other than the real one. Clearing the owner already fences out the last owner's
/// writes, but not once the same worker takes the lease again and its counter climbs back to
/// a value an old write still waits to match. So the counter is the current time in
/// milliseconds since the Unix epoch (`floor`): counters grow by one per write, a few per
/// second at most, far slower than the clock since any lease was created. A readable stored
/// counter above that (a clock set back) is incremented instead, so a repair never moves a
/// counter backwards. (The Java KCL stores the counter as a 64-bit long: such values fit.)
pub(crate) fn fresh_counter(stored: Option<&AttributeValue>, floor: u64) -> u64 {
    let readable = match stored {
        Some(AttributeValue::N(text) | AttributeValue::S(text)) => text.trim().parse::<u64>().ok(),
        _ => None,
    };
    readable.map_or(floor, |n| n.saturating_add(1).max(floor))
}

/// The repaired item, the lease it decodes to and what changed.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) item: HashMap<String, AttributeValue>,
    pub(crate) lease: Lease,
    pub(crate) changes: Vec<Change>,
}

impl Plan {
    /// Sets `attribute`, recording the change when the value differs from the one read.
    fn set(&mut self, attribute: &'static str, value: AttributeValue) {
        let before = self.item.insert(attribute.to_owned(), value.clone());
        if before.as_ref() != Some(&value) {
            self.changed(attribute, before.as_ref(), Some(&value));
        }
    }

    /// Removes `attribute`, recording the change when it was there.
    fn remove(&mut self, attribute: &'static str) {
        if let Some(before) = self.item.remove(attribute) {
            self.changed(attribute, Some(&before), None);
        }
    }

    /// Records a change; a second change of one attribute keeps its first `before`.
    fn changed(
        &mut self,
        attribute: &'static str,
        before: Option<&AttributeValue>,
        after: Option<&AttributeValue>,
    ) {
        let after = after.map(render);
        match self.changes.iter_mut().find(|c| c.attribute == attribute) {
            Some(change) => change.after = after,
            None => self.changes.push(Change {
                attribute,
                before: before.map(render),
                after,
            }),
        }
    }
}

/// The repair of `item` (the item of `lease_key` in `table`, as read): see
/// [the module](super). `checkpoint` replaces a checkpoint that does not decode; the counter is
/// [`fresh_counter`] with `counter_floor`.
pub(crate) fn plan_repair(
    table: &str,
    lease_key: &str,
    item: &HashMap<String, AttributeValue>,
    checkpoint: Option<&Checkpoint>,
    counter_floor: u64,
) -> Result<Plan, RepairError> {
    if lease_from_item(table, item).is_ok() {
        return Err(RepairError::NothingToRepair {
            table: table.to_owned(),
            lease_key: lease_key.to_owned(),
        });
    }
    let decoder = Decoder {
        table,
        lease_key,
        item,
    };
    let mut plan = Plan {
        item: item.clone(),
        // Replaced below, once the item decodes.
        lease: Lease::new(lease_key, Checkpoint::TrimHorizon),
        changes: Vec::new(),
    };
    plan.set(LEASE_KEY, AttributeValue::S(lease_key.to_owned()));

    // The checkpoint first: it is what the caller most likely has to supply.
    let sub_sequence_number = match decoder.optional_number(CHECKPOINT_SUB_SEQUENCE_NUMBER) {
        Ok(sub) => sub.unwrap_or(0),
        Err(_) => {
            plan.set(CHECKPOINT_SUB_SEQUENCE_NUMBER, number(0));
            0
        }
    };
    let stored = match item.get(CHECKPOINT) {
        Some(AttributeValue::S(text)) => Checkpoint::parse(text, sub_sequence_number)
            .map_err(|e| format!("is neither a sequence number nor a sentinel: {e}")),
        other => Err(describe_wrong("a string", other)),
    };
    match (stored, checkpoint) {
        (Ok(_), None) => {}
        (Ok(stored), Some(_)) => {
            return Err(RepairError::CheckpointNotNeeded {
                table: table.to_owned(),
                lease_key: lease_key.to_owned(),
                stored,
            });
        }
        (Err(problem), None) => {
            return Err(RepairError::CheckpointNeeded {
                table: table.to_owned(),
                lease_key: lease_key.to_owned(),
                problem,
            });
        }
        (Err(_), Some(given)) => {
            plan.set(CHECKPOINT, AttributeValue::S(given.as_text().to_owned()));
            plan.set(
                CHECKPOINT_SUB_SEQUENCE_NUMBER,
                number(given.sub_sequence_number()),
            );
        }
    }
    if let Err(Error::InvalidLeaseItem { problem, .. }) = decoder.string_set(PARENT_SHARD_ID) {
        return Err(RepairError::UnknownParents {
            table: table.to_owned(),
            lease_key: lease_key.to_owned(),
            problem,
        });
    }

    // Free for any worker at once: no owner, no handoff under way.
    plan.remove(LEASE_OWNER);
    plan.remove(HANDOFF_TO);
    plan.remove(CHECKPOINT_OWNER);
    plan.set(
        LEASE_COUNTER,
        number(fresh_counter(item.get(LEASE_COUNTER), counter_floor)),
    );
    if decoder
        .optional_number(OWNER_SWITCHES_SINCE_CHECKPOINT)
        .is_err()
    {
        plan.set(OWNER_SWITCHES_SINCE_CHECKPOINT, number(0));
    }
    if decoder.string_set(CHILD_SHARD_IDS).is_err() {
        plan.remove(CHILD_SHARD_IDS);
    }
    if decoder.hash_key_range().is_err() {
        plan.remove(STARTING_HASH_KEY);
        plan.remove(ENDING_HASH_KEY);
    }
    if decoder.optional_string(STREAM_NAME).is_err() {
        plan.remove(STREAM_NAME);
    }
    // A multi-stream lease's shard id is also the end of its key, which the worker reads.
    if decoder.optional_string(SHARD_ID).is_err() {
        plan.remove(SHARD_ID);
    }
    plan.lease = lease_from_item(table, &plan.item)?;
    Ok(plan)
}

/// An attribute value as text: strings quoted, numbers bare, sets as lists.
fn render(value: &AttributeValue) -> String {
    match value {
        AttributeValue::S(text) => format!("{text:?}"),
        AttributeValue::N(text) => text.clone(),
        AttributeValue::Ss(values) => format!("{values:?}"),
        AttributeValue::Ns(values) => format!("[{}]", values.join(", ")),
        AttributeValue::Bool(b) => b.to_string(),
        AttributeValue::Null(_) => "null".to_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use kcl_core::SequenceNumber;

    const KEY: &str = "shardId-000000000001";
    /// A counter floor, as the clock gives it.
    const NOW: u64 = 1_764_000_000_000;
    const SEQ: &str = "49590338271490256608559692538361571095921575989136588898";

    fn s(text: &str) -> AttributeValue {
        AttributeValue::S(text.to_owned())
    }

    fn n(text: &str) -> AttributeValue {
        AttributeValue::N(text.to_owned())
    }

    /// A lease item of a live shard that was held, with a checkpoint, parents and a range.
    fn held() -> HashMap<String, AttributeValue> {
        HashMap::from([
            (LEASE_KEY.to_owned(), s(KEY)),
            (LEASE_OWNER.to_owned(), s("worker-1")),
            (LEASE_COUNTER.to_owned(), n("41")),
            (CHECKPOINT.to_owned(), s(SEQ)),
            (CHECKPOINT_SUB_SEQUENCE_NUMBER.to_owned(), n("3")),
            (OWNER_SWITCHES_SINCE_CHECKPOINT.to_owned(), n("1")),
            (
                PARENT_SHARD_ID.to_owned(),
                AttributeValue::Ss(vec!["shardId-000000000000".to_owned()]),
            ),
            (STARTING_HASH_KEY.to_owned(), s("0")),
            (
                ENDING_HASH_KEY.to_owned(),
                s("170141183460469231731687303715884105727"),
            ),
            (STREAM_NAME.to_owned(), s("orders")),
            ("throughputKBps".to_owned(), n("1.5")),
        ])
    }

    fn with(
        mut item: HashMap<String, AttributeValue>,
        attribute: &str,
        value: Option<AttributeValue>,
    ) -> HashMap<String, AttributeValue> {
        match value {
            Some(value) => item.insert(attribute.to_owned(), value),
            None => item.remove(attribute),
        };
        item
    }

    fn repair(
        item: &HashMap<String, AttributeValue>,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Plan, RepairError> {
        plan_repair("app", KEY, item, checkpoint, NOW)
    }

    fn attributes(plan: &Plan) -> Vec<&'static str> {
        plan.changes.iter().map(|c| c.attribute).collect()
    }

    #[test]
    fn a_text_counter_is_replaced_and_everything_that_decodes_kept() {
        let item = with(held(), LEASE_COUNTER, Some(s("forty-one")));
        let plan = repair(&item, None).unwrap();
        let lease = &plan.lease;
        assert_eq!(lease.owner, None, "free for any worker");
        assert_eq!(lease.counter, NOW);
        assert_eq!(
            lease.checkpoint,
            Checkpoint::at(SequenceNumber::new(SEQ).unwrap(), 3),
            "the checkpoint is kept, sub-sequence number included"
        );
        assert_eq!(lease.owner_switches_since_checkpoint, 1);
        assert_eq!(
            lease.parent_shard_ids.iter().collect::<Vec<_>>(),
            ["shardId-000000000000"]
        );
        assert!(lease.hash_key_range.is_some());
        assert_eq!(lease.stream_name.as_deref(), Some("orders"));
        assert_eq!(
            plan.item.get("throughputKBps"),
            Some(&n("1.5")),
            "unknown attributes are kept"
        );
        assert_eq!(attributes(&plan), [LEASE_OWNER, LEASE_COUNTER]);
        assert_eq!(
            plan.changes[1].to_string(),
            format!("leaseCounter: \"forty-one\" -> {NOW}")
        );
        assert_eq!(
            plan.changes[0].to_string(),
            "leaseOwner: \"worker-1\" -> (removed)"
        );
    }

    #[test]
    fn the_counter_never_goes_back_and_lands_above_any_counter_the_lease_had() {
        assert_eq!(fresh_counter(Some(&s("41")), NOW), NOW);
        assert_eq!(fresh_counter(Some(&n("41")), NOW), NOW);
        assert_eq!(
            fresh_counter(Some(&s(" 41 ")), 0),
            42,
            "readable text counts"
        );
        assert_eq!(
            fresh_counter(Some(&n(&(NOW + 5).to_string())), NOW),
            NOW + 6,
            "a clock set back never moves a counter backwards"
        );
        assert_eq!(fresh_counter(Some(&n("-3")), NOW), NOW);
        assert_eq!(fresh_counter(Some(&AttributeValue::Bool(true)), NOW), NOW);
        assert_eq!(fresh_counter(None, NOW), NOW);
        assert_eq!(fresh_counter(Some(&n(&u64::MAX.to_string())), 0), u64::MAX);
    }

    #[test]
    fn a_checkpoint_that_does_not_decode_is_never_guessed() {
        for bad in [Some(s("yesterday")), Some(n("12")), None] {
            let item = with(held(), CHECKPOINT, bad.clone());
            let err = repair(&item, None).unwrap_err();
            assert!(
                matches!(&err, RepairError::CheckpointNeeded { lease_key, .. } if lease_key == KEY),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains("--checkpoint"), "{err}");
            let plan = repair(&item, Some(&Checkpoint::Latest)).unwrap();
            assert_eq!(plan.lease.checkpoint, Checkpoint::Latest);
            assert_eq!(plan.item[CHECKPOINT_SUB_SEQUENCE_NUMBER], n("0"));
            assert!(attributes(&plan).contains(&CHECKPOINT));
        }
    }

    #[test]
    fn a_given_checkpoint_never_replaces_one_that_decodes() {
        let item = with(held(), LEASE_COUNTER, Some(s("41")));
        let err = repair(&item, Some(&Checkpoint::TrimHorizon)).unwrap_err();
        assert!(
            matches!(&err, RepairError::CheckpointNotNeeded { stored, .. } if stored.as_text() == SEQ),
            "{err:?}"
        );
    }

    #[test]
    fn an_item_that_decodes_is_left_alone() {
        let err = repair(&held(), None).unwrap_err();
        assert!(
            matches!(err, RepairError::NothingToRepair { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn parents_that_do_not_decode_are_refused() {
        let item = with(held(), PARENT_SHARD_ID, Some(s("shardId-000000000000")));
        let err = repair(&item, None).unwrap_err();
        assert!(matches!(err, RepairError::UnknownParents { .. }), "{err:?}");
    }

    #[test]
    fn attributes_with_a_safe_value_are_replaced_or_removed() {
        let mut item = held();
        for (attribute, value) in [
            (CHECKPOINT_SUB_SEQUENCE_NUMBER, s("three")),
            (OWNER_SWITCHES_SINCE_CHECKPOINT, s("one")),
            (CHILD_SHARD_IDS, n("2")),
            (ENDING_HASH_KEY, s("1e9")),
            (STREAM_NAME, n("7")),
            (HANDOFF_TO, AttributeValue::Bool(true)),
            (LEASE_OWNER, n("1")),
        ] {
            item.insert(attribute.to_owned(), value);
        }
        let plan = repair(&item, None).unwrap();
        let lease = &plan.lease;
        assert_eq!(
            lease.checkpoint,
            Checkpoint::at(SequenceNumber::new(SEQ).unwrap(), 0),
            "the rest of the aggregated record is delivered again, never skipped"
        );
        assert_eq!(lease.owner_switches_since_checkpoint, 0);
        assert!(lease.child_shard_ids.is_empty());
        assert_eq!(lease.hash_key_range, None, "both ends go together");
        assert!(!plan.item.contains_key(STARTING_HASH_KEY));
        assert_eq!(lease.stream_name, None);
        assert_eq!(lease.handoff_to, None);
        assert_eq!(lease.owner, None);
        assert_eq!(
            attributes(&plan),
            [
                CHECKPOINT_SUB_SEQUENCE_NUMBER,
                LEASE_OWNER,
                HANDOFF_TO,
                LEASE_COUNTER,
                OWNER_SWITCHES_SINCE_CHECKPOINT,
                CHILD_SHARD_IDS,
                STARTING_HASH_KEY,
                ENDING_HASH_KEY,
                STREAM_NAME,
            ]
        );
    }

    fn arb_value() -> impl Strategy<Value = Option<AttributeValue>> {
        proptest::option::of(prop_oneof![
            ".{0,8}".prop_map(AttributeValue::S),
            "-?[0-9]{0,25}(\\.[0-9])?".prop_map(AttributeValue::N),
            any::<bool>().prop_map(AttributeValue::Bool),
            proptest::collection::vec(".{0,5}", 0..3).prop_map(AttributeValue::Ss),
            Just(AttributeValue::Null(true)),
        ])
    }

    proptest! {
        #[test]
        fn a_repair_yields_an_unowned_lease_that_decodes_or_refuses(
            changes in proptest::collection::vec(
                (prop_oneof![
                    Just(LEASE_OWNER), Just(LEASE_COUNTER), Just(CHECKPOINT),
                    Just(CHECKPOINT_SUB_SEQUENCE_NUMBER), Just(OWNER_SWITCHES_SINCE_CHECKPOINT),
                    Just(PARENT_SHARD_ID), Just(CHILD_SHARD_IDS), Just(STARTING_HASH_KEY),
                    Just(ENDING_HASH_KEY), Just(HANDOFF_TO), Just(STREAM_NAME),
                ], arb_value()),
                1..5,
            ),
            give_checkpoint in any::<bool>(),
        ) {
            let mut item = held();
            for (attribute, value) in changes {
                item = with(item, attribute, value);
            }
            let given = give_checkpoint.then_some(Checkpoint::TrimHorizon);
            match repair(&item, given.as_ref()) {
                Ok(plan) => {
                    prop_assert_eq!(lease_from_item("app", &plan.item).unwrap(), plan.lease.clone());
                    prop_assert_eq!(plan.lease.owner, None);
                    prop_assert_eq!(plan.lease.handoff_to, None);
                    prop_assert!(plan.lease.counter >= NOW);
                    prop_assert_eq!(plan.item.get("throughputKBps"), Some(&n("1.5")));
                }
                Err(RepairError::NothingToRepair { .. }) => {
                    prop_assert!(lease_from_item("app", &item).is_ok());
                }
                Err(
                    RepairError::CheckpointNeeded { .. }
                    | RepairError::CheckpointNotNeeded { .. }
                    | RepairError::UnknownParents { .. },
                ) => {}
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }
    }
}
