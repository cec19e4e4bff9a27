//! One stream's leases in a multi-stream lease table, seen as a single-stream table: keys are
//! shard ids on this side and `ACCOUNT:NAME:EPOCH:SHARD_ID` in the table. The shard sync of
//! each stream runs unchanged over such a view, so the lineage rules (parents before
//! children, guarded creations, deletions) hold per stream exactly as they do for one stream.
//!
//! Parents and children are stored as shard ids, as the Java KCL stores them in multi-stream
//! mode, so only lease keys (and the keys in guards, answers and errors) are mapped.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Lease, LeaseCreation, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate, LineageGuard};
use crate::error::{Error, Result};
use crate::stream_identity::StreamIdentity;

/// The leases of `stream` in `inner`, keyed by shard id.
#[derive(Debug)]
pub(crate) struct StreamLeases {
    inner: Arc<dyn LeaseStore>,
    stream: StreamIdentity,
    /// `ACCOUNT:NAME:EPOCH:`, what every key of the stream starts with.
    prefix: String,
    /// The identity as the `streamName` attribute holds it.
    stream_name: String,
}

impl StreamLeases {
    pub(crate) fn new(inner: Arc<dyn LeaseStore>, stream: StreamIdentity) -> Self {
        let stream_name = stream.to_string();
        StreamLeases {
            inner,
            prefix: format!("{stream_name}:"),
            stream_name,
            stream,
        }
    }

    fn to_table(&self, shard_id: &str) -> String {
        self.stream.lease_key(shard_id)
    }

    /// The shard id of a key of this stream; `None` for another stream's key.
    fn to_view<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.prefix.as_str())
    }

    fn lease_to_table(&self, lease: &Lease) -> Lease {
        let mut stored = lease.clone();
        stored.lease_key = self.to_table(&lease.lease_key);
        stored.stream_name = Some(self.stream_name.clone());
        stored.shard_id = Some(lease.lease_key.clone());
        stored
    }

    fn lease_to_view(&self, lease: Lease) -> Option<Lease> {
        let shard_id = self.to_view(&lease.lease_key)?.to_owned();
        let mut seen = lease;
        seen.lease_key = shard_id;
        Some(seen)
    }

    fn key_to_view(&self, key: String) -> String {
        self.to_view(&key).map_or(key.clone(), str::to_owned)
    }

    fn error_to_view(&self, error: Error) -> Error {
        match error {
            Error::InvalidLeaseItem {
                table,
                lease_key,
                attribute,
                problem,
            } => Error::InvalidLeaseItem {
                table,
                lease_key: self.key_to_view(lease_key),
                attribute,
                problem,
            },
            Error::LeaseConditionFailed {
                lease_key,
                operation,
                current,
            } => Error::LeaseConditionFailed {
                lease_key: self.key_to_view(lease_key),
                operation,
                current: current.and_then(|c| self.lease_to_view(*c)).map(Box::new),
            },
            other => other,
        }
    }

    /// The part of `scan` that is this stream's, keyed by shard id.
    fn scan_to_view(&self, scan: LeaseScan) -> LeaseScan {
        LeaseScan {
            leases: scan
                .leases
                .into_iter()
                .filter_map(|l| self.lease_to_view(l))
                .collect(),
            invalid: scan
                .invalid
                .into_iter()
                .filter(|e| match e {
                    Error::InvalidLeaseItem { lease_key, .. } => self.to_view(lease_key).is_some(),
                    _ => true,
                })
                .map(|e| self.error_to_view(e))
                .collect(),
        }
    }
}

#[async_trait]
impl LeaseStore for StreamLeases {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }

    async fn initialize(&self) -> Result<()> {
        self.inner.initialize().await
    }

    async fn list_leases(&self) -> Result<LeaseScan> {
        Ok(self.scan_to_view(self.inner.list_leases().await?))
    }

    async fn list_leases_eventually_consistent(&self) -> Result<LeaseScan> {
        Ok(self.scan_to_view(self.inner.list_leases_eventually_consistent().await?))
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        match self.inner.get_lease(&self.to_table(lease_key)).await {
            Ok(lease) => Ok(lease.and_then(|l| self.lease_to_view(l))),
            Err(e) => Err(self.error_to_view(e)),
        }
    }

    async fn get_leases(&self, lease_keys: &[String]) -> Result<LeaseScan> {
        let keys: Vec<String> = lease_keys.iter().map(|k| self.to_table(k)).collect();
        Ok(self.scan_to_view(self.inner.get_leases(&keys).await?))
    }

    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        self.inner
            .create_lease_if_absent(&self.lease_to_table(lease))
            .await
            .map_err(|e| self.error_to_view(e))
    }

    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        let guard = LineageGuard::new(
            guard.parents.iter().map(|p| self.to_table(p)),
            guard.children.iter().map(|c| self.to_table(c)),
        );
        let created = self
            .inner
            .create_lease_in_lineage(&self.lease_to_table(lease), &guard)
            .await
            .map_err(|e| self.error_to_view(e))?;
        Ok(match created {
            LeaseCreation::ParentMissing { parent } => LeaseCreation::ParentMissing {
                parent: self.key_to_view(parent),
            },
            LeaseCreation::ChildExists { child } => LeaseCreation::ChildExists {
                child: self.key_to_view(child),
            },
            other => other,
        })
    }

    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        let stored = self
            .inner
            .update_lease(&self.to_table(lease_key), fence, update)
            .await
            .map_err(|e| self.error_to_view(e))?;
        self.lease_to_view(stored.clone())
            .ok_or_else(|| Error::InvalidLeaseKey {
                key: stored.lease_key,
                problem: "the store answered with a lease of another stream",
            })
    }

    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        self.inner
            .delete_lease(&self.to_table(lease_key), fence)
            .await
            .map_err(|e| self.error_to_view(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::Checkpoint;
    use crate::testing::InMemoryLeaseStore;

    fn stream(epoch: u64) -> StreamIdentity {
        StreamIdentity::new("123456789012", "orders", epoch).unwrap()
    }

    #[tokio::test]
    async fn keys_are_shard_ids_in_the_view_and_stream_keys_in_the_table() {
        let table = Arc::new(InMemoryLeaseStore::new("app"));
        let orders = StreamLeases::new(table.clone(), stream(7));
        let recreated = StreamLeases::new(table.clone(), stream(8));
        let parent = Lease::new("shardId-0", Checkpoint::TrimHorizon);
        assert!(orders.create_lease_if_absent(&parent).await.unwrap());
        // Stored under the stream's key, with the Java KCL's multi-stream attributes.
        let stored = table.leases();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].lease_key, "123456789012:orders:7:shardId-0");
        assert_eq!(
            stored[0].stream_name.as_deref(),
            Some("123456789012:orders:7")
        );
        assert_eq!(stored[0].shard_id.as_deref(), Some("shardId-0"));
        // A child guarded by its parent: the guard's keys are mapped too, and so is the answer.
        let child =
            Lease::new("shardId-1", Checkpoint::TrimHorizon).with_parents(["shardId-0".to_owned()]);
        let guard = LineageGuard::new(["shardId-0".to_owned()], []);
        assert_eq!(
            orders
                .create_lease_in_lineage(&child, &guard)
                .await
                .unwrap(),
            LeaseCreation::Created
        );
        assert_eq!(
            recreated
                .create_lease_in_lineage(&child, &guard)
                .await
                .unwrap(),
            LeaseCreation::ParentMissing {
                parent: "shardId-0".to_owned()
            }
        );
        // Each view sees its own stream's leases only, keyed by shard id; parents stay ids.
        let scan = orders.list_leases().await.unwrap();
        let keys: Vec<&str> = scan.leases.iter().map(|l| l.lease_key.as_str()).collect();
        assert_eq!(keys, ["shardId-0", "shardId-1"]);
        assert_eq!(
            scan.leases[1].parent_shard_ids.iter().collect::<Vec<_>>(),
            ["shardId-0"]
        );
        assert!(recreated.list_leases().await.unwrap().leases.is_empty());
        // Reads, updates and deletes go to the stream's key; a refusal names the shard id.
        let read = orders.get_lease("shardId-1").await.unwrap().unwrap();
        assert_eq!(read.lease_key, "shardId-1");
        let taken = orders
            .update_lease(
                "shardId-1",
                &read.fence(),
                &LeaseUpdate::Take {
                    new_owner: "w1".into(),
                },
            )
            .await
            .unwrap();
        assert_eq!(taken.lease_key, "shardId-1");
        let stale = orders.delete_lease("shardId-1", &read.fence()).await;
        assert!(
            matches!(&stale, Err(Error::LeaseConditionFailed { lease_key, .. }) if lease_key == "shardId-1"),
            "{stale:?}"
        );
        orders
            .delete_lease("shardId-1", &taken.fence())
            .await
            .unwrap();
        assert_eq!(table.leases().len(), 1);
    }
}
