//! The building blocks of multi-stream mode against kinesis-mock: streams found by name
//! prefix, a stream's identity (account, name, creation time) from `DescribeStreamSummary`,
//! and a stream deleted and created again under its name getting another identity.

use std::time::{Duration, SystemTime};

use kcl_core::{
    Error, InitialPosition, KinesisStreamClient, MultiStreamLeaseKey, StreamClient, StreamTracker,
    StreamsByPrefix,
};
use kcl_integration_tests::{PATIENCE, create_stream, kinesis, unique, wait_for};

#[tokio::test]
async fn streams_are_found_by_prefix_and_named_by_account_name_and_creation_time() {
    let client = kinesis().await;
    let prefix = unique("tenant");
    let (a, b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let other = unique("other");
    for stream in [&a, &b, &other] {
        create_stream(&client, stream, 1).await;
    }
    let tracker = StreamsByPrefix::new(client.clone(), format!("{prefix}-"))
        .with_initial_position(InitialPosition::TrimHorizon);
    let found = tracker.streams().await.unwrap();
    let names: Vec<&str> = found.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(names, vec![a.as_str(), b.as_str()]);
    assert!(
        found
            .iter()
            .all(|s| s.initial_position == InitialPosition::TrimHorizon)
    );

    let identity = KinesisStreamClient::new(client.clone(), &a)
        .stream_identity()
        .await
        .unwrap();
    assert_eq!(identity.stream_name(), a);
    assert_eq!(identity.account_id().len(), 12);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        identity.creation_epoch() <= now && now - identity.creation_epoch() < 3600,
        "created {} (now {now})",
        identity.creation_epoch()
    );
    // Named by ARN, the same stream has the same identity.
    let arn = format!(
        "arn:aws:kinesis:{}:{}:stream/{a}",
        std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        identity.account_id()
    );
    let by_arn = KinesisStreamClient::new(client.clone(), &arn)
        .stream_identity()
        .await
        .unwrap();
    assert_eq!(by_arn, identity);
    let key = identity.lease_key("shardId-000000000000");
    assert_eq!(MultiStreamLeaseKey::parse(&key).unwrap().stream, identity);
}

#[tokio::test]
async fn a_stream_created_again_under_its_name_is_another_stream() {
    let client = kinesis().await;
    let name = unique("recreated");
    create_stream(&client, &name, 1).await;
    let stream = KinesisStreamClient::new(client.clone(), &name);
    let before = stream.stream_identity().await.unwrap();
    client
        .delete_stream()
        .stream_name(&name)
        .send()
        .await
        .unwrap();
    wait_for("the stream deleted", PATIENCE, || async {
        matches!(
            stream.stream_identity().await,
            Err(Error::StreamNotFound { .. })
        )
    })
    .await;
    // Creation times have whole seconds.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    create_stream(&client, &name, 1).await;
    let after = stream.stream_identity().await.unwrap();
    assert_eq!(after.stream_name(), before.stream_name());
    assert!(
        after.creation_epoch() > before.creation_epoch(),
        "{before} then {after}"
    );
    assert_ne!(
        after.lease_key("shardId-000000000000"),
        before.lease_key("shardId-000000000000")
    );
}
