//! `consumers` and `deregister-consumer` on kinesis-mock: the consumer a fan-out worker
//! registered is listed; deregistering needs --yes, a missing one exits "not found", and a
//! deregistered consumer is gone from the list.

use kcl_core::{KinesisStreamClient, StreamClient};
use kcl_integration_tests::{PATIENCE, create_stream, kinesis, unique, wait_for};

use super::{admin, failed_with, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_listed_and_deregistered_only_when_confirmed() {
    let client = kinesis().await;
    let stream = unique("admin-consumers");
    create_stream(&client, &stream, 1).await;
    let name = unique("reader");
    let registered = KinesisStreamClient::new(client.clone(), &stream)
        .register_stream_consumer(&name)
        .await
        .expect("registered");

    let listed = json(&admin("-", &["--stream", &stream, "--json", "consumers"]).await);
    let consumers = listed["consumers"].as_array().expect("a list");
    assert_eq!(consumers.len(), 1, "{listed}");
    assert_eq!(consumers[0]["name"], name.as_str());
    assert_eq!(consumers[0]["arn"], registered.arn.as_str());

    // Without --yes and without a terminal: refused, nothing done.
    let out = admin(
        "-",
        &["--stream", &stream, "deregister-consumer", "--name", &name],
    )
    .await;
    let refused = failed_with(&out, 3);
    assert!(refused.contains("pass --yes"), "{refused}");
    let out = admin(
        "-",
        &[
            "--stream",
            &stream,
            "deregister-consumer",
            "--name",
            "nobody",
            "--yes",
        ],
    )
    .await;
    let missing = failed_with(&out, 4);
    assert!(missing.contains("`nobody` does not exist"), "{missing}");
    let dry = json(
        &admin(
            "-",
            &[
                "--json",
                "deregister-consumer",
                "--arn",
                &registered.arn,
                "--dry-run",
            ],
        )
        .await,
    );
    assert_eq!(dry["deregistered"], false);

    let done = json(
        &admin(
            "-",
            &[
                "--stream",
                &stream,
                "--json",
                "deregister-consumer",
                "--name",
                &name,
                "--yes",
            ],
        )
        .await,
    );
    assert_eq!(done["deregistered"], true);
    wait_for("the consumer gone", PATIENCE, || async {
        let listed = json(&admin("-", &["--stream", &stream, "--json", "consumers"]).await);
        listed["consumers"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["status"] != "ACTIVE"))
    })
    .await;
    // `consumers` without --stream is a usage error.
    failed_with(&admin("-", &["consumers"]).await, 2);
}
