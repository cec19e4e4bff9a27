//! The streams a worker consumes now, by the prefix their lease keys share.
//!
//! Single-stream mode has one stream, under the empty prefix: lease keys are shard ids. In
//! multi-stream mode each stream's keys start with `ACCOUNT:NAME:EPOCH:`, and the set changes
//! as the stream sync follows the tracker: it publishes the set, and the coordinator takes
//! leases only of streams in it and stops the consumers of streams that left it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::config::InitialPosition;
use crate::lease::{Lease, key_prefix};
use crate::sequence::Checkpoint;
use crate::stream::StreamClient;
use crate::stream_identity::StreamIdentity;

/// A stream this worker consumes.
#[derive(Debug)]
pub(crate) struct ActiveStream {
    /// The stream's identity; `None` in single-stream mode.
    pub(crate) identity: Option<StreamIdentity>,
    /// The name for logs and metrics.
    pub(crate) name: String,
    /// Where its shards without a checkpoint start.
    pub(crate) initial_position: InitialPosition,
    /// Its client, every call bounded in time.
    pub(crate) client: Arc<dyn StreamClient>,
    /// In fan-out mode: the registered consumer its shards are read as.
    pub(crate) consumer_arn: Option<Arc<str>>,
}

/// The streams consumed now, by lease-key prefix.
pub(crate) type ActiveStreams = BTreeMap<String, Arc<ActiveStream>>;

/// The shard id in a lease key of either mode.
pub(crate) fn shard_id_of(lease_key: &str) -> &str {
    &lease_key[key_prefix(lease_key).len()..]
}

/// A new lease of `shard_id`, in the stream of the lease `sibling_key` (a parent's, when a
/// shard ends): keyed and stamped with the stream's identity in multi-stream mode.
pub(crate) fn lease_beside(sibling_key: &str, shard_id: &str, checkpoint: Checkpoint) -> Lease {
    let prefix = key_prefix(sibling_key);
    let mut lease = Lease::new(format!("{prefix}{shard_id}"), checkpoint);
    if let Some(identity) = prefix.strip_suffix(':') {
        lease.stream_name = Some(identity.to_owned());
        lease.shard_id = Some(shard_id.to_owned());
    }
    lease
}

/// Shard syncs the coordinator asks for, by stream (a shard that ended without naming its
/// children, a hole in a stream's leases, a stream that answered `ResourceNotFound`).
#[derive(Debug, Default)]
pub(crate) struct SyncRequests {
    notify: Notify,
    prefixes: Mutex<BTreeSet<String>>,
}

impl SyncRequests {
    /// Asks for a sync of the stream whose keys start with `prefix` (or of the lease key's
    /// stream: only its prefix is kept).
    pub(crate) fn request(&self, key_or_prefix: &str) {
        self.prefixes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key_prefix(key_or_prefix).to_owned());
        self.notify.notify_one();
    }

    /// Waits for a request.
    pub(crate) async fn requested(&self) {
        self.notify.notified().await;
    }

    /// The streams asked for since the last call.
    pub(crate) fn take(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.prefixes.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_and_sibling_leases_in_both_modes() {
        assert_eq!(shard_id_of("shardId-000000000001"), "shardId-000000000001");
        assert_eq!(
            shard_id_of("123456789012:orders:1700000000:shardId-000000000001"),
            "shardId-000000000001"
        );
        let single = lease_beside("shardId-0", "shardId-3", Checkpoint::TrimHorizon);
        assert_eq!(single.lease_key, "shardId-3");
        assert_eq!((single.stream_name, single.shard_id), (None, None));
        let multi = lease_beside("1:orders:7:shardId-0", "shardId-3", Checkpoint::TrimHorizon);
        assert_eq!(multi.lease_key, "1:orders:7:shardId-3");
        assert_eq!(multi.stream_name.as_deref(), Some("1:orders:7"));
        assert_eq!(multi.shard_id.as_deref(), Some("shardId-3"));
    }

    #[test]
    fn requests_keep_the_stream_of_a_key() {
        let requests = SyncRequests::default();
        requests.request("1:orders:7:shardId-0");
        requests.request("shardId-0");
        requests.request("1:orders:7:");
        let taken = requests.take();
        assert_eq!(
            taken,
            BTreeSet::from(["".to_owned(), "1:orders:7:".to_owned()])
        );
        assert!(requests.take().is_empty());
    }
}
