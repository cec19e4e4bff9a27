//! Leases written by the Java KCL, in DynamoDB Local: what this library leaves behind must
//! let a fleet roll back to Java.

use aws_sdk_dynamodb::types::AttributeValue;
use kcl_core::{Checkpoint, Lease, LeaseFence, LeaseStore, LeaseUpdate};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_dynamo_lease::schema::{CHECKPOINT_OWNER, LEASE_COUNTER, LEASE_KEY, LEASE_OWNER};
use kcl_integration_tests::{dynamodb, unique};

// Defect 8a of issue 9: a Java KCL 3.x lease mid-handoff has `leaseOwner` = the new owner and
// `checkpointOwner` = the old one, which must checkpoint first. A Java 3.x worker does not
// renew a lease whose `checkpointOwner` is set and is not itself, so after a rollback to Java
// a lease we took and left with the attribute could not be renewed by anyone. A take removes
// it, as the Java KCL's take and assign do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_clears_the_java_checkpoint_owner_of_a_lease_taken_mid_handoff() {
    let ddb = dynamodb().await;
    let table = unique("java-handoff");
    let store = DynamoLeaseStore::new(ddb.clone(), &table);
    store.initialize().await.unwrap();
    store
        .create_lease_if_absent(&Lease::new("shardId-000000000000", Checkpoint::TrimHorizon))
        .await
        .unwrap();
    // What a Java 3.x leader writes when it moves the lease from java-a to java-b.
    ddb.update_item()
        .table_name(&table)
        .key(LEASE_KEY, AttributeValue::S("shardId-000000000000".into()))
        .update_expression("SET #owner = :owner, #cpo = :cpo, #counter = :counter")
        .expression_attribute_names("#owner", LEASE_OWNER)
        .expression_attribute_names("#cpo", CHECKPOINT_OWNER)
        .expression_attribute_names("#counter", LEASE_COUNTER)
        .expression_attribute_values(":owner", AttributeValue::S("java-b".into()))
        .expression_attribute_values(":cpo", AttributeValue::S("java-a".into()))
        .expression_attribute_values(":counter", AttributeValue::N("7".into()))
        .send()
        .await
        .unwrap();
    let java = store
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .expect("the lease");
    assert_eq!(
        java.fence(),
        LeaseFence {
            owner: Some("java-b".into()),
            counter: 7
        }
    );

    // Both Java workers died; a worker of this library sees the lease expire and takes it.
    let taken = store
        .update_lease(
            "shardId-000000000000",
            &java.fence(),
            &LeaseUpdate::Take {
                new_owner: "rust-1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(taken.owner.as_deref(), Some("rust-1"));

    let item = ddb
        .get_item()
        .table_name(&table)
        .key(LEASE_KEY, AttributeValue::S("shardId-000000000000".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .expect("the item");
    assert_eq!(
        item.get(LEASE_OWNER),
        Some(&AttributeValue::S("rust-1".into()))
    );
    assert!(
        !item.contains_key(CHECKPOINT_OWNER),
        "a take ends the Java handoff: {item:?}"
    );
    // Renewals and releases of ours go on as usual.
    let renewed = store
        .update_lease("shardId-000000000000", &taken.fence(), &LeaseUpdate::Renew)
        .await
        .unwrap();
    assert_eq!(renewed.counter, taken.counter + 1);
}
