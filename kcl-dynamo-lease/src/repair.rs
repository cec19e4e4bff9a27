//! Repairing a lease item that does not decode (a `leaseCounter` rewritten as text by hand,
//! say): [`DynamoLeaseStore::repair_lease`], behind `kcl-admin repair`.
//!
//! Workers skip such an item, so its shard is processed by nobody until it is repaired. The
//! repair rewrites it as a well-formed lease without an owner, which the next taking round of
//! any worker takes:
//! - every attribute that decodes is kept (checkpoint, parents, children, hash key range,
//!   stream name, ...), and so is every attribute this library does not know;
//! - `leaseOwner`, `handoffTo` and `checkpointOwner` are removed: the lease is free for any
//!   worker at once;
//! - `leaseCounter` gets a fresh value, see [`plan::fresh_counter`];
//! - an attribute that does not decode is replaced by a safe value where one exists: a
//!   sub-sequence number by 0 (the rest of that aggregated record is delivered again, never
//!   skipped), an owner-switch count by 0; children, a hash key range or a stream name by
//!   nothing (children are found again at the shard's end, a lease without a range makes the
//!   coverage check inconclusive, one without a stream name fits any stream);
//! - where no safe value exists the repair refuses, writing nothing: a checkpoint that does
//!   not decode (where the shard's processing stands is not guessed; the caller may give one,
//!   [`RepairError::CheckpointNeeded`]) and parents that do not decode (a child started
//!   before its parents would deliver records out of order, [`RepairError::UnknownParents`]).
//!
//! The write is conditional on the item being the one read: the same `leaseCounter` and
//! `handoffTo`, raw, whatever their type. Every lease write, of this library or of the Java
//! KCL, changes one of the two, so a write landing between the read and the repair makes the
//! repair fail with [`RepairError::Changed`] instead of being overwritten.

use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;
use kcl_core::{Checkpoint, Lease, LeaseStore};

mod plan;

use crate::DynamoLeaseStore;
use crate::schema::{HANDOFF_TO, LEASE_COUNTER, LEASE_KEY, PARENT_SHARD_ID};
use plan::plan_repair;

/// What [`DynamoLeaseStore::repair_lease`] wrote.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Repair {
    /// The lease as it is now stored.
    pub lease: Lease,
    /// Each attribute that changed, in the order they were repaired.
    pub changes: Vec<Change>,
}

/// One attribute a repair changed.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Change {
    /// The attribute, e.g. `leaseCounter`.
    pub attribute: &'static str,
    /// The stored value before, as text (`None`: absent).
    pub before: Option<String>,
    /// The value written, as text (`None`: removed).
    pub after: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} -> {}",
            self.attribute,
            self.before.as_deref().unwrap_or("(absent)"),
            self.after.as_deref().unwrap_or("(removed)")
        )
    }
}

/// Why a lease item was not repaired. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepairError {
    /// There is no item with this key.
    #[error("lease table `{table}` has no item with key `{lease_key}`")]
    NotFound {
        /// The table name.
        table: String,
        /// The key asked for.
        lease_key: String,
    },

    /// The item decodes: there is nothing to repair (and its owner, if any, is left alone).
    #[error("lease `{lease_key}` in table `{table}` decodes: nothing to repair")]
    NothingToRepair {
        /// The table name.
        table: String,
        /// The lease.
        lease_key: String,
    },

    /// The checkpoint does not decode, and no checkpoint to resume from was given: where the
    /// shard's processing stands is not guessed.
    #[error(
        "lease `{lease_key}` in table `{table}`: attribute `checkpoint` {problem}; the repair \
         does not guess where the shard's processing stands: give the checkpoint to resume from \
         (`kcl-admin repair KEY --checkpoint TRIM_HORIZON|LATEST|SEQUENCE_NUMBER`: TRIM_HORIZON \
         delivers every record still in the shard again, LATEST skips to new records)"
    )]
    CheckpointNeeded {
        /// The table name.
        table: String,
        /// The lease.
        lease_key: String,
        /// What is wrong with the stored checkpoint.
        problem: String,
    },

    /// A checkpoint was given, but the stored one decodes: it is kept, never overwritten by a
    /// repair.
    #[error(
        "lease `{lease_key}` in table `{table}` has a valid checkpoint {stored}: a checkpoint is \
         given only to replace one that does not decode"
    )]
    CheckpointNotNeeded {
        /// The table name.
        table: String,
        /// The lease.
        lease_key: String,
        /// The stored checkpoint.
        stored: Checkpoint,
    },

    /// The parent shard ids do not decode: a repair cannot know them, and a child started
    /// before its parents would deliver records out of order.
    #[error(
        "lease `{lease_key}` in table `{table}`: attribute `{PARENT_SHARD_ID}` {problem}; the \
         repair does not guess a shard's parents: set it by hand to a string set of the parent \
         shard ids (ListShards names them), or remove it once every parent was processed to its \
         end"
    )]
    UnknownParents {
        /// The table name.
        table: String,
        /// The lease.
        lease_key: String,
        /// What is wrong with the stored parents.
        problem: String,
    },

    /// The item changed between the read and the repair (a worker or another operator wrote
    /// it); the repair was not written. Run it again.
    #[error(
        "lease `{lease_key}` in table `{table}` changed while it was repaired; nothing was \
         written: run the repair again"
    )]
    Changed {
        /// The table name.
        table: String,
        /// The lease.
        lease_key: String,
    },

    /// The lease table could not be read or written.
    #[error(transparent)]
    Store(#[from] kcl_core::Error),
}

impl DynamoLeaseStore {
    /// Rewrites the item of `lease_key`, which does not decode, as a well-formed lease without
    /// an owner, which the next taking round of any worker takes. Every attribute that decodes
    /// is kept (checkpoint, parents, hash key range, ..., and attributes this library does not
    /// know); `leaseOwner`, `handoffTo` and `checkpointOwner` are removed; `leaseCounter` is set
    /// above any value the lease can have had (the time in milliseconds since the Unix epoch,
    /// or the stored number plus one if larger), so no write from before can match it again;
    /// a sub-sequence number or owner-switch count that does not decode becomes 0, children, a
    /// hash key range or a stream name that does not decode are removed. `checkpoint` replaces
    /// a stored checkpoint that does not decode; without it such an item is refused.
    ///
    /// The write is conditional on the stored `leaseCounter` and `handoffTo` being the ones
    /// read, raw: a lease write landing meanwhile fails the repair instead of being lost.
    ///
    /// # Errors
    /// A [`RepairError`]; nothing was written.
    pub async fn repair_lease(
        &self,
        lease_key: &str,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Repair, RepairError> {
        let table = self.table_name().to_owned();
        let item = self
            .client
            .get_item()
            .table_name(&table)
            .key(LEASE_KEY, AttributeValue::S(lease_key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", e))?
            .item
            .ok_or_else(|| RepairError::NotFound {
                table: table.clone(),
                lease_key: lease_key.to_owned(),
            })?;
        let plan = plan_repair(
            &table,
            lease_key,
            &item,
            checkpoint.as_ref(),
            fresh_counter_floor(),
        )?;
        let (condition, names, values) = unchanged_condition(&item);
        let result = self
            .client
            .put_item()
            .table_name(&table)
            .set_item(Some(plan.item))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values((!values.is_empty()).then_some(values))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Repair {
                lease: plan.lease,
                changes: plan.changes,
            }),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                Err(RepairError::Changed {
                    table,
                    lease_key: lease_key.to_owned(),
                })
            }
            Err(e) => Err(self.error("PutItem", e).into()),
        }
    }
}

/// The lower bound of a repaired `leaseCounter`: the time in milliseconds since the Unix
/// epoch. See [`plan::fresh_counter`].
fn fresh_counter_floor() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The condition that `item`, as read, is still the stored item: its raw `leaseCounter` and
/// `handoffTo` (each equal, or absent as read), with the expression's names and values.
pub(crate) fn unchanged_condition(
    item: &HashMap<String, AttributeValue>,
) -> (
    String,
    HashMap<String, String>,
    HashMap<String, AttributeValue>,
) {
    let mut names = HashMap::from([("#key".to_owned(), LEASE_KEY.to_owned())]);
    let mut values = HashMap::new();
    let mut condition = "attribute_exists(#key)".to_owned();
    for (placeholder, attribute) in [("counter", LEASE_COUNTER), ("handoff", HANDOFF_TO)] {
        names.insert(format!("#{placeholder}"), attribute.to_owned());
        match item.get(attribute) {
            Some(value) => {
                condition.push_str(&format!(" AND #{placeholder} = :{placeholder}"));
                values.insert(format!(":{placeholder}"), value.clone());
            }
            None => condition.push_str(&format!(" AND attribute_not_exists(#{placeholder})")),
        }
    }
    (condition, names, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::LEASE_OWNER;

    fn s(text: &str) -> AttributeValue {
        AttributeValue::S(text.to_owned())
    }

    fn item_of(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn the_write_is_conditional_on_the_raw_counter_and_handoff_as_read() {
        let key = (LEASE_KEY, s("shardId-000000000001"));
        let owner = (LEASE_OWNER, s("worker-1"));
        let item = item_of(&[key.clone(), owner, (LEASE_COUNTER, s("41"))]);
        let (condition, names, values) = unchanged_condition(&item);
        assert_eq!(
            condition,
            "attribute_exists(#key) AND #counter = :counter AND attribute_not_exists(#handoff)"
        );
        assert_eq!(names["#counter"], LEASE_COUNTER);
        assert_eq!(names["#handoff"], HANDOFF_TO);
        assert_eq!(values, HashMap::from([(":counter".to_owned(), s("41"))]));
        let (condition, _, values) = unchanged_condition(&item_of(&[key, (HANDOFF_TO, s("w2"))]));
        assert_eq!(
            condition,
            "attribute_exists(#key) AND attribute_not_exists(#counter) AND #handoff = :handoff"
        );
        assert_eq!(values, HashMap::from([(":handoff".to_owned(), s("w2"))]));
    }
}
