//! In-memory [`StreamClient`](crate::StreamClient) and [`LeaseStore`](crate::LeaseStore) for
//! tests and simulations (feature `test-util`). They implement the same semantics as Kinesis
//! and the DynamoDB lease store (conditional writes, iterators that expire after five minutes
//! of Tokio time, closed shards that end, scans in pages that are not snapshots) and let tests
//! inject failures, down to one call that never answers. The stream also serves enhanced
//! fan-out: registered consumers and shard subscriptions (see [`SubscriptionFault`] and the
//! `subscription` knobs of [`InMemoryStream`]).

mod conformance;
mod faulty;
mod lease_store;
mod stale_reads;
mod stream;
mod subscription;
#[cfg(test)]
mod subscription_tests;
#[cfg(test)]
mod tests;

use std::sync::Mutex;

use crate::error::{Error, Service};

pub use conformance::check_create_in_lineage;
pub use faulty::{Fault, Faulty, Hang, LeaseCall};
pub use lease_store::{InMemoryLeaseStore, ScanPaging};
pub use stale_reads::StaleReads;
pub use stream::{IN_MEMORY_ACCOUNT, IN_MEMORY_CREATION_EPOCH, InMemoryStream};
pub use subscription::{OpenSubscription, SubscriptionFault};

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn injected(service: Service, operation: &'static str) -> Error {
    Error::Transient {
        service,
        operation,
        source: "injected failure".into(),
    }
}
