//! The condition and update expressions of a conditional lease update.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use kcl_core::{Error, LeaseFence, LeaseUpdate, Result, Service};

use crate::schema::{
    CHECKPOINT, CHECKPOINT_OWNER, CHECKPOINT_SUB_SEQUENCE_NUMBER, CHILD_SHARD_IDS, HANDOFF_TO,
    LEASE_COUNTER, LEASE_KEY, LEASE_OWNER, OWNER_SWITCHES_SINCE_CHECKPOINT, number,
};

/// The condition, update expression, names and values of one conditional lease update.
pub(crate) type UpdateRequest = (
    String,
    String,
    HashMap<String, String>,
    HashMap<String, AttributeValue>,
);

/// The condition that a lease is as `fence` saw it: it exists (an update must never create a
/// lease that was deleted), with the fence's counter and owner (or none), and the values the
/// condition uses. It names `#key`, `#owner` and `#counter`.
pub(crate) fn fence_condition(fence: &LeaseFence) -> (String, HashMap<String, AttributeValue>) {
    let mut values = HashMap::from([(":expected_counter".to_owned(), number(fence.counter))]);
    let owner_condition = match &fence.owner {
        Some(owner) => {
            values.insert(
                ":expected_owner".to_owned(),
                AttributeValue::S(owner.clone()),
            );
            "#owner = :expected_owner"
        }
        None => "attribute_not_exists(#owner)",
    };
    let condition =
        format!("attribute_exists(#key) AND #counter = :expected_counter AND {owner_condition}");
    (condition, values)
}

/// The condition and update expressions of one lease update. (DynamoDB rejects names and
/// values that the expressions do not use, so each update adds only its own.)
pub(crate) fn update_expressions(
    fence: &LeaseFence,
    update: &LeaseUpdate,
) -> Result<UpdateRequest> {
    let mut names = HashMap::from([
        ("#key".to_owned(), LEASE_KEY.to_owned()),
        ("#owner".to_owned(), LEASE_OWNER.to_owned()),
        ("#counter".to_owned(), LEASE_COUNTER.to_owned()),
    ]);
    let (mut condition, mut values) = fence_condition(fence);
    let mut name = |placeholder: &str, attribute: &str| {
        names.insert(placeholder.to_owned(), attribute.to_owned());
    };
    let mut next_counter = || values.insert(":next_counter".to_owned(), number(fence.counter + 1));
    let update_expression = match update {
        LeaseUpdate::Renew => {
            next_counter();
            "SET #counter = :next_counter"
        }
        LeaseUpdate::Take { new_owner } => {
            next_counter();
            name("#switches", OWNER_SWITCHES_SINCE_CHECKPOINT);
            name("#handoff", HANDOFF_TO);
            // A fresh assignment: no Java KCL 3.x handoff survives it (see CHECKPOINT_OWNER).
            name("#checkpoint_owner", CHECKPOINT_OWNER);
            values.insert(
                ":new_owner".to_owned(),
                AttributeValue::S(new_owner.clone()),
            );
            values.insert(":zero".to_owned(), number(0));
            values.insert(":one".to_owned(), number(1));
            "SET #owner = :new_owner, #counter = :next_counter, \
             #switches = if_not_exists(#switches, :zero) + :one \
             REMOVE #handoff, #checkpoint_owner"
        }
        LeaseUpdate::RequestHandoff { to } => {
            // One request at a time, and the counter stays (see `kcl_core::lease`).
            name("#handoff", HANDOFF_TO);
            condition.push_str(" AND attribute_not_exists(#handoff)");
            values.insert(":to".to_owned(), AttributeValue::S(to.clone()));
            "SET #handoff = :to"
        }
        LeaseUpdate::RedirectHandoff { from, to } => {
            name("#handoff", HANDOFF_TO);
            condition.push_str(" AND #handoff = :from");
            values.insert(":from".to_owned(), AttributeValue::S(from.clone()));
            values.insert(":to".to_owned(), AttributeValue::S(to.clone()));
            "SET #handoff = :to"
        }
        LeaseUpdate::Checkpoint { checkpoint } => {
            next_counter();
            name("#checkpoint", CHECKPOINT);
            name("#sub", CHECKPOINT_SUB_SEQUENCE_NUMBER);
            name("#switches", OWNER_SWITCHES_SINCE_CHECKPOINT);
            values.insert(
                ":checkpoint".to_owned(),
                AttributeValue::S(checkpoint.as_text().to_owned()),
            );
            values.insert(":sub".to_owned(), number(checkpoint.sub_sequence_number()));
            values.insert(":zero".to_owned(), number(0));
            "SET #checkpoint = :checkpoint, #sub = :sub, #switches = :zero, #counter = :next_counter"
        }
        LeaseUpdate::Release => {
            next_counter();
            "SET #counter = :next_counter REMOVE #owner"
        }
        LeaseUpdate::RecordChildren { child_shard_ids } if child_shard_ids.is_empty() => {
            next_counter();
            name("#children", CHILD_SHARD_IDS);
            "SET #counter = :next_counter REMOVE #children"
        }
        LeaseUpdate::RecordChildren { child_shard_ids } => {
            next_counter();
            name("#children", CHILD_SHARD_IDS);
            values.insert(
                ":children".to_owned(),
                AttributeValue::Ss(child_shard_ids.iter().cloned().collect()),
            );
            "SET #counter = :next_counter, #children = :children"
        }
        // `LeaseUpdate` is non-exhaustive: a kcl-core newer than this crate may add one.
        other => {
            return Err(Error::Service {
                service: Service::LeaseStore,
                operation: "UpdateItem",
                source: format!(
                    "lease update {other:?} is not supported by this kcl-dynamo-lease version"
                )
                .into(),
            });
        }
    };
    Ok((condition, update_expression.to_owned(), names, values))
}
