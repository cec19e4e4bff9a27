//! Creating a lease only while its lineage allows it: one DynamoDB transaction, a conditional
//! put of the lease, a condition check that each parent exists and one that each child does
//! not.

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Put, ReturnConsumedCapacity, TransactWriteItem,
};
use kcl_core::{AwsSdkError, Error, Lease, LeaseCreation, LineageGuard, Result, Service};

use crate::schema::{LEASE_KEY, lease_to_item};
use crate::store::{DynamoLeaseStore, build_error};

const OPERATION: &str = "TransactWriteItems";

/// The code of a cancellation reason whose condition did not hold.
const CONDITION_FAILED: &str = "ConditionalCheckFailed";

impl DynamoLeaseStore {
    /// See [`kcl_core::LeaseStore::create_lease_in_lineage`]. The transaction's items are the
    /// lease, then the parents, then the children: DynamoDB reports why it cancelled a
    /// transaction per item, in that order.
    pub(crate) async fn transact_create_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        let table = self.table();
        let put = Put::builder()
            .table_name(table)
            .set_item(Some(lease_to_item(lease)))
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", LEASE_KEY)
            .build()
            .map_err(|e| build_error(OPERATION, e))?;
        let mut items = vec![TransactWriteItem::builder().put(put).build()];
        let checks = (guard.parents.iter().map(|p| (p, "attribute_exists(#key)"))).chain(
            guard
                .children
                .iter()
                .map(|c| (c, "attribute_not_exists(#key)")),
        );
        for (key, condition) in checks {
            let check = ConditionCheck::builder()
                .table_name(table)
                .key(LEASE_KEY, AttributeValue::S(key.clone()))
                .condition_expression(condition)
                .expression_attribute_names("#key", LEASE_KEY)
                .build()
                .map_err(|e| build_error(OPERATION, e))?;
            items.push(TransactWriteItem::builder().condition_check(check).build());
        }
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        let err = match result {
            Ok(output) => {
                self.record_capacity(OPERATION, 1, output.consumed_capacity());
                return Ok(LeaseCreation::Created);
            }
            Err(err) => err,
        };
        let failed_items: Option<Vec<bool>> = match &err {
            SdkError::ServiceError(e) => match e.err() {
                TransactWriteItemsError::TransactionCanceledException(cancelled) => Some(
                    cancelled
                        .cancellation_reasons()
                        .iter()
                        .map(|r| r.code() == Some(CONDITION_FAILED))
                        .collect(),
                ),
                _ => None,
            },
            _ => None,
        };
        let Some(failed_items) = failed_items else {
            return Err(self.error(OPERATION, err));
        };
        let failed = |item: usize| failed_items.get(item).copied().unwrap_or(false);
        if failed(0) {
            return Ok(LeaseCreation::Exists);
        }
        let parents = guard.parents.len();
        if let Some(i) = (0..parents).find(|i| failed(1 + i)) {
            return Ok(LeaseCreation::ParentMissing {
                parent: guard.parents[i].clone(),
            });
        }
        if let Some(i) = (0..guard.children.len()).find(|i| failed(1 + parents + i)) {
            return Ok(LeaseCreation::ChildExists {
                child: guard.children[i].clone(),
            });
        }
        // Cancelled with every condition holding: a conflict with a write in flight on one of
        // the items (a parent being renewed, say), or a capacity shortfall. Worth a retry.
        Err(Error::Transient {
            service: Service::LeaseStore,
            operation: OPERATION,
            source: AwsSdkError::new(err).into(),
        })
    }
}
