//! `delete-table`: confirmed with `--yes` where there is no terminal, waits until the table is
//! gone; a missing table is "not found".

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use kcl_core::Checkpoint;
use kcl_integration_tests::{dynamodb, unique};

use super::{admin, failed_with, json, put_lease, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_deleted_only_when_confirmed() {
    let app = unique("admin-delete-app");
    let store = table(&app).await;
    for key in ["shardId-000000000000", "shardId-000000000001"] {
        put_lease(&store, key, "orders", Checkpoint::TrimHorizon, None).await;
    }
    let exists = || async {
        match dynamodb()
            .await
            .describe_table()
            .table_name(&app)
            .send()
            .await
        {
            Ok(_) => true,
            Err(e) if e.code() == Some("ResourceNotFoundException") => false,
            Err(e) => panic!("DescribeTable: {e:?}"),
        }
    };

    let declined = admin(&app, &["delete-table", "--observe", "500ms"]).await;
    let message = failed_with(&declined, 3);
    assert!(
        message.contains("not confirmed") && message.contains("--yes"),
        "{message}"
    );
    assert!(exists().await, "not deleted");

    let doc = json(
        &admin(
            &app,
            &["delete-table", "--yes", "--observe", "500ms", "--json"],
        )
        .await,
    );
    assert_eq!(doc["deleted"], true);
    assert_eq!(doc["leases"], 2);
    assert!(!exists().await, "gone when kcl-admin returns");

    let again = admin(&app, &["delete-table", "--yes"]).await;
    let message = failed_with(&again, 4);
    assert!(
        message.contains(&format!("lease table `{app}` does not exist")),
        "{message}"
    );
}
