//! The Kinesis stream client against kinesis-mock: paging, ARNs.

use std::collections::BTreeSet;

use kcl_core::{HashKeyRange, InitialPosition, KinesisStreamClient, StreamClient, WorkerConfig};
use kcl_integration_tests::{
    PATIENCE, Recorder, create_stream, kinesis, put_records, records, start_worker, unique,
    wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shards_follows_every_page() {
    let kinesis = kinesis().await;
    let stream = unique("paging");
    create_stream(&kinesis, &stream, 5).await;
    let client = KinesisStreamClient::new(kinesis, &stream).with_list_shards_page_size(2);
    let mut shards = client.list_shards().await.unwrap();
    assert_eq!(shards.len(), 5, "three pages of 2, 2 and 1");
    let ids: BTreeSet<_> = shards.iter().map(|s| s.shard_id.clone()).collect();
    assert_eq!(ids.len(), 5);
    // The hash key ranges tile the whole key space.
    shards.sort_by_key(|s| s.hash_key_range.starting_hash_key);
    assert_eq!(
        shards[0].hash_key_range.starting_hash_key,
        HashKeyRange::FULL.starting_hash_key
    );
    assert_eq!(
        shards[4].hash_key_range.ending_hash_key,
        HashKeyRange::FULL.ending_hash_key
    );
    for pair in shards.windows(2) {
        assert_eq!(
            pair[0].hash_key_range.ending_hash_key + 1,
            pair[1].hash_key_range.starting_hash_key
        );
    }
    assert!(
        shards
            .iter()
            .all(|s| s.is_open() && s.parent_shard_ids().is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_named_by_its_arn_is_consumed() {
    let kinesis = kinesis().await;
    let stream = unique("by-arn");
    create_stream(&kinesis, &stream, 2).await;
    let summary = kinesis
        .describe_stream_summary()
        .stream_name(&stream)
        .send()
        .await
        .unwrap();
    let arn = summary
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_owned();
    assert!(arn.starts_with("arn:"), "{arn}");
    put_records(&kinesis, &stream, &records("arn", 0, 60, 13)).await;

    let recorder = Recorder::default();
    let config = WorkerConfig::new(unique("arn-app"), &arn)
        .with_worker_id("w1")
        .with_initial_position(InitialPosition::TrimHorizon);
    let worker = start_worker(config, &recorder).await;
    wait_for("60 records", PATIENCE, || async { recorder.count() >= 60 }).await;
    worker.stop().await.unwrap();
    assert_eq!(recorder.count(), 60);
}
