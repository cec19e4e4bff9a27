//! Checks that a [`LeaseStore`] implementation keeps the contract the coordinator relies on,
//! run against the in-memory store here and against DynamoDB Local by the integration tests.

use crate::lease::{Lease, LeaseCreation, LeaseStore, LineageGuard};
use crate::sequence::Checkpoint;

/// Checks [`LeaseStore::create_lease_in_lineage`] on an initialized, empty `store`: a lease
/// is created only while every guarded parent exists and no guarded child does, and the
/// answer names the condition that failed. Panics on the first difference.
pub async fn check_create_in_lineage(store: &dyn LeaseStore) {
    let lease = |key: &str| Lease::new(key, Checkpoint::TrimHorizon);
    let guard = |parents: &[&str], children: &[&str]| {
        LineageGuard::new(
            parents.iter().map(|p| (*p).to_owned()),
            children.iter().map(|c| (*c).to_owned()),
        )
    };
    let create = |key: &'static str, g: LineageGuard| async move {
        store
            .create_lease_in_lineage(&lease(key).with_parents(g.parents.clone()), &g)
            .await
            .unwrap_or_else(|e| panic!("creating {key} with {g:?}: {e}"))
    };
    assert_eq!(
        create("p1", guard(&[], &["c"])).await,
        LeaseCreation::Created,
        "no parent to wait for, no child with a lease"
    );
    assert_eq!(
        create("c", guard(&["p1", "p2"], &[])).await,
        LeaseCreation::ParentMissing {
            parent: "p2".into()
        },
        "a merge child waits for its other parent's lease"
    );
    assert!(
        store.get_lease("c").await.unwrap().is_none(),
        "nothing written"
    );
    assert_eq!(
        create("p2", guard(&[], &["c"])).await,
        LeaseCreation::Created
    );
    assert_eq!(
        create("c", guard(&["p1", "p2"], &["g"])).await,
        LeaseCreation::Created
    );
    let stored = store.get_lease("c").await.unwrap().expect("c was created");
    assert_eq!(
        stored.parent_shard_ids,
        ["p1".to_owned(), "p2".to_owned()].into(),
        "the lease is stored as given"
    );
    assert_eq!(
        create("c", guard(&["p1", "p2"], &[])).await,
        LeaseCreation::Exists
    );
    assert_eq!(
        create("p3", guard(&[], &["x", "c"])).await,
        LeaseCreation::ChildExists { child: "c".into() },
        "a shard whose child has a lease was processed already"
    );
    assert!(
        store.get_lease("p3").await.unwrap().is_none(),
        "nothing written"
    );
    assert_eq!(
        create("c", guard(&["gone"], &[])).await,
        LeaseCreation::Exists,
        "an existing lease is reported first"
    );
}
