//! [`DynamoLeaseStore`]: the [`LeaseStore`] on a DynamoDB table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    ReturnConsumedCapacity, ReturnValue, ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
    TableStatus,
};
use kcl_core::{
    Error, Lease, LeaseCreation, LeaseFence, LeaseScan, LeaseStore, LeaseTableUsage, LeaseUpdate,
    LineageGuard, Result, Service,
};
use tokio::time::Instant;
use tracing::{debug, info};

pub(crate) use crate::errors::build_error;
use crate::errors::classify;
use crate::schema::{LEASE_COUNTER, LEASE_KEY, LEASE_OWNER, lease_from_item, lease_to_item};
use crate::update_expression::{fence_condition, update_expressions};

/// A lease table in DynamoDB, named after the application.
///
/// The table has the hash key `leaseKey` (string) and no range key, as in the Java KCL, and
/// on-demand billing when this store creates it. Every write is conditional.
#[derive(Debug, Clone)]
pub struct DynamoLeaseStore {
    pub(crate) client: Client,
    table: String,
    create_if_missing: bool,
    table_active_timeout: Duration,
    /// Shared by clones: a worker and a bench reading the same store see the same totals.
    pub(crate) usage: Arc<LeaseTableUsage>,
}

/// BatchGetItem takes at most 100 keys.
const MAX_KEYS_PER_BATCH_GET: usize = 100;

/// How often table creation is polled. DynamoDB usually activates a new on-demand table within
/// seconds.
const TABLE_POLL_INTERVAL: Duration = Duration::from_millis(500);

impl DynamoLeaseStore {
    /// A store for `table` (usually the application name). Endpoint, region and credentials
    /// come from the SDK config the client was built with, so `AWS_ENDPOINT_URL_DYNAMODB`
    /// points it at DynamoDB Local.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoLeaseStore {
            client,
            table: table.into(),
            create_if_missing: true,
            table_active_timeout: Duration::from_secs(120),
            usage: Arc::default(),
        }
    }

    /// Whether [`LeaseStore::initialize`] creates a missing table (default `true`). When
    /// `false`, a missing table is [`Error::LeaseTableNotFound`].
    #[must_use]
    pub fn with_create_if_missing(mut self, create: bool) -> Self {
        self.create_if_missing = create;
        self
    }

    /// How long [`LeaseStore::initialize`] waits for the table to become active (default 2 min).
    #[must_use]
    pub fn with_table_active_timeout(mut self, timeout: Duration) -> Self {
        self.table_active_timeout = timeout;
        self
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    pub(crate) fn error<E>(&self, operation: &'static str, err: SdkError<E>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(&self.table, operation, err)
    }

    /// The table's status and key schema, or `None` when it does not exist.
    async fn describe(&self) -> Result<Option<aws_sdk_dynamodb::types::TableDescription>> {
        match self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
        {
            Ok(output) => Ok(output.table),
            Err(e) => match self.error("DescribeTable", e) {
                Error::LeaseTableNotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn create_table(&self) -> Result<()> {
        let key = AttributeDefinition::builder()
            .attribute_name(LEASE_KEY)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| build_error("CreateTable", e))?;
        let schema = KeySchemaElement::builder()
            .attribute_name(LEASE_KEY)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| build_error("CreateTable", e))?;
        let result = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(key)
            .key_schema(schema)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match result {
            Ok(_) => {
                info!(table = %self.table, "created lease table");
                Ok(())
            }
            // Another worker created it first.
            Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
            Err(e) => Err(self.error("CreateTable", e)),
        }
    }

    fn check_schema(&self, table: &aws_sdk_dynamodb::types::TableDescription) -> Result<()> {
        let keys: Vec<String> = table
            .key_schema()
            .iter()
            .map(|k| format!("{} {}", k.attribute_name(), k.key_type().as_str()))
            .collect();
        let key_type = table
            .attribute_definitions()
            .iter()
            .find(|d| d.attribute_name() == LEASE_KEY)
            .map(|d| d.attribute_type().as_str().to_owned());
        if keys != [format!("{LEASE_KEY} HASH")] || key_type.as_deref() != Some("S") {
            return Err(Error::LeaseTableSchema {
                table: self.table.clone(),
                problem: format!(
                    "key schema is [{}] with `{LEASE_KEY}` of type {}; a lease table has the \
                     single hash key `{LEASE_KEY}` of type S",
                    keys.join(", "),
                    key_type.as_deref().unwrap_or("(undefined)")
                ),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for DynamoLeaseStore {
    fn table_name(&self) -> &str {
        &self.table
    }

    async fn initialize(&self) -> Result<()> {
        let deadline = Instant::now() + self.table_active_timeout;
        let mut created = false;
        loop {
            match self.describe().await? {
                None if !created && self.create_if_missing => {
                    self.create_table().await?;
                    created = true;
                }
                None if !created => {
                    return Err(Error::LeaseTableNotFound {
                        table: self.table.clone(),
                        source: None,
                    });
                }
                // Just created: DescribeTable may not show it yet.
                None => {}
                Some(table) => {
                    self.check_schema(&table)?;
                    if table.table_status() == Some(&TableStatus::Active) {
                        return Ok(());
                    }
                    debug!(table = %self.table, status = ?table.table_status(), "waiting for the lease table");
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    service: Service::LeaseStore,
                    operation: "waiting for the lease table to become active",
                    timeout: self.table_active_timeout,
                });
            }
            tokio::time::sleep(TABLE_POLL_INTERVAL).await;
        }
    }

    async fn list_leases(&self) -> Result<LeaseScan> {
        self.scan(true).await
    }

    async fn list_leases_eventually_consistent(&self) -> Result<LeaseScan> {
        self.scan(false).await
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(lease_key.to_owned()))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| self.error("GetItem", e))?;
        let found = u64::from(output.item.is_some());
        self.record_capacity("GetItem", found, output.consumed_capacity());
        output
            .item
            .as_ref()
            .map(|item| lease_from_item(&self.table, item))
            .transpose()
    }

    async fn get_leases(&self, lease_keys: &[String]) -> Result<LeaseScan> {
        let mut scan = LeaseScan::default();
        for chunk in lease_keys.chunks(MAX_KEYS_PER_BATCH_GET) {
            let keys = chunk
                .iter()
                .map(|key| HashMap::from([(LEASE_KEY.to_owned(), AttributeValue::S(key.clone()))]))
                .collect();
            let mut request = Some(
                KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| build_error("BatchGetItem", e))?,
            );
            let mut delay = TABLE_POLL_INTERVAL / 5;
            while let Some(keys) = request.take() {
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, keys)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(|e| self.error("BatchGetItem", e))?;
                let found = output
                    .responses()
                    .and_then(|tables| tables.get(&self.table))
                    .map_or(0, |items| items.len() as u64);
                self.record_capacity("BatchGetItem", found, output.consumed_capacity());
                for item in output
                    .responses
                    .unwrap_or_default()
                    .remove(&self.table)
                    .unwrap_or_default()
                {
                    match lease_from_item(&self.table, &item) {
                        Ok(lease) => scan.leases.push(lease),
                        Err(e) => scan.invalid.push(e),
                    }
                }
                // Keys DynamoDB did not get to (throttling, size limits) are asked again.
                request = output
                    .unprocessed_keys
                    .and_then(|mut unprocessed| unprocessed.remove(&self.table))
                    .filter(|k| !k.keys().is_empty());
                if request.is_some() {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        Ok(scan)
    }

    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(lease_to_item(lease)))
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", LEASE_KEY)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(output) => {
                self.record_capacity("PutItem", 1, output.consumed_capacity());
                Ok(true)
            }
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(self.error("PutItem", e)),
        }
    }

    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        self.transact_create_in_lineage(lease, guard).await
    }

    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        let (condition, update_expression, names, values) = update_expressions(fence, update)?;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(lease_key.to_owned()))
            .condition_expression(condition)
            .update_expression(update_expression)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(output) => {
                self.record_capacity("UpdateItem", 1, output.consumed_capacity());
                let item = output.attributes.unwrap_or_default();
                lease_from_item(&self.table, &item)
            }
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), UpdateItemError::ConditionalCheckFailedException(_)) =>
            {
                let UpdateItemError::ConditionalCheckFailedException(failed) = e.into_err() else {
                    unreachable!("matched above")
                };
                // The stored lease, if it still exists and decodes; a garbage item counts as
                // changed, which is what it is.
                let current = failed
                    .item
                    .as_ref()
                    .and_then(|item| lease_from_item(&self.table, item).ok())
                    .map(Box::new);
                Err(Error::LeaseConditionFailed {
                    lease_key: lease_key.to_owned(),
                    operation: update.operation(),
                    current,
                })
            }
            Err(e) => Err(self.error("UpdateItem", e)),
        }
    }

    fn usage(&self) -> Option<&LeaseTableUsage> {
        Some(&self.usage)
    }

    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        let (condition, values) = fence_condition(fence);
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(lease_key.to_owned()))
            .condition_expression(condition)
            .expression_attribute_names("#key", LEASE_KEY)
            .expression_attribute_names("#owner", LEASE_OWNER)
            .expression_attribute_names("#counter", LEASE_COUNTER)
            .set_expression_attribute_values(Some(values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(output) => {
                self.record_capacity("DeleteItem", 1, output.consumed_capacity());
                Ok(())
            }
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), DeleteItemError::ConditionalCheckFailedException(_)) =>
            {
                let DeleteItemError::ConditionalCheckFailedException(failed) = e.into_err() else {
                    unreachable!("matched above")
                };
                let current = failed
                    .item
                    .as_ref()
                    .and_then(|item| lease_from_item(&self.table, item).ok())
                    .map(Box::new);
                Err(Error::LeaseConditionFailed {
                    lease_key: lease_key.to_owned(),
                    operation: "delete",
                    current,
                })
            }
            Err(e) => Err(self.error("DeleteItem", e)),
        }
    }
}

impl DynamoLeaseStore {
    /// Every item of the table, in as many pages as it takes.
    async fn scan(&self, consistent: bool) -> Result<LeaseScan> {
        let mut scan = LeaseScan::default();
        let mut start_key = None;
        loop {
            let output = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(consistent)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start_key)
                .send()
                .await
                .map_err(|e| self.error("Scan", e))?;
            let items = output.items().len() as u64;
            self.record_capacity("Scan", items, output.consumed_capacity());
            for item in output.items() {
                match lease_from_item(&self.table, item) {
                    Ok(lease) => scan.leases.push(lease),
                    Err(e) => scan.invalid.push(e),
                }
            }
            start_key = output.last_evaluated_key;
            if start_key.is_none() {
                return Ok(scan);
            }
        }
    }
}
