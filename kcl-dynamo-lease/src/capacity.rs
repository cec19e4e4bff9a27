//! What each call consumed, counted by operation.

use aws_sdk_dynamodb::types::ConsumedCapacity;
use kcl_core::OperationUsage;

use crate::store::DynamoLeaseStore;

impl DynamoLeaseStore {
    /// Counts one answered request of `operation` that returned or wrote `items` items, and
    /// reports what it consumed ([`kcl_core::metrics::record_consumed_capacity`]). With
    /// `ReturnConsumedCapacity=TOTAL` DynamoDB reports the operation's `CapacityUnits` (one
    /// entry per table for batch and transaction calls), and on some endpoints its read and
    /// write split as well; a read operation's units are read units, a write's are write
    /// units.
    pub(crate) fn record_capacity<'a>(
        &self,
        operation: &'static str,
        items: u64,
        consumed: impl IntoIterator<Item = &'a ConsumedCapacity>,
    ) {
        let reads = matches!(operation, "Scan" | "Query" | "GetItem" | "BatchGetItem");
        let (mut read, mut write) = (0.0, 0.0);
        for one in consumed {
            let total = one.capacity_units().unwrap_or(0.0);
            if reads {
                read += one.read_capacity_units().unwrap_or(total);
            } else {
                write += one.write_capacity_units().unwrap_or(total);
            }
        }
        kcl_core::metrics::record_consumed_capacity(operation, read, write);
        self.usage
            .record(operation, OperationUsage::request(items, read, write));
    }
}
