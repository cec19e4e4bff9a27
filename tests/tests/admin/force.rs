//! `set-checkpoint --force` racing a live worker that checkpoints every batch while records
//! flow: kcl-admin takes the lease (fenced on the counter it read), so the worker's next
//! renewal or checkpoint fails by the fence and it can never write its own position over the
//! new one; the worker takes the released lease back and resumes from the new checkpoint.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl_core::{Checkpoint, Lease, LeaseStore, SequenceNumber};
use kcl_integration_tests::{
    Event, PATIENCE, Put, Recorder, create_stream, kinesis, put_records, records, start_worker,
    unique, wait_for,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{admin, config, json, table};

/// Puts 5 records every 200 ms until stopped, keeping each put with its sequence number.
struct Producer {
    puts: Arc<Mutex<Vec<Put>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Producer {
    fn start(client: aws_sdk_kinesis::Client, stream: &str) -> Self {
        let (puts, stop) = (Arc::new(Mutex::new(Vec::new())), CancellationToken::new());
        let (stream, all, token) = (stream.to_owned(), puts.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !token.is_cancelled() {
                let put = put_records(&client, &stream, &records("f", n, 5, 3)).await;
                all.lock().unwrap().extend(put);
                n += 5;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Producer { puts, stop, task }
    }

    fn so_far(&self) -> Vec<Put> {
        self.puts.lock().unwrap().clone()
    }

    async fn stop(self) -> Vec<Put> {
        self.stop.cancel();
        self.task.await.unwrap();
        self.puts.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_checkpoint_fences_out_the_live_owner_and_the_shard_resumes_from_it() {
    let kinesis = kinesis().await;
    let stream = unique("admin-force");
    create_stream(&kinesis, &stream, 1).await;
    let app = unique("admin-force-app");
    let producer = Producer::start(kinesis.clone(), &stream);
    let recorder = Recorder::default();
    let worker = start_worker(config(&app, &stream, "w1"), &recorder).await;
    wait_for("40 records processed", PATIENCE, || async {
        recorder.count() >= 40
    })
    .await;
    let shard = worker.status.borrow().held_leases.first().unwrap().clone();
    // An earlier record, processed and checkpointed past.
    let puts = producer.so_far();
    let (target, next) = (puts[10].clone(), puts[11].clone());
    let target_checkpoint = Checkpoint::at(
        SequenceNumber::new(target.sequence_number.as_str()).unwrap(),
        0,
    );

    // Every state of the lease the table shows while it happens.
    let store = table(&app).await;
    let history: Arc<Mutex<Vec<Lease>>> = Arc::default();
    let watching = CancellationToken::new();
    let watcher = {
        let (store, history, watching, shard) = (
            store.clone(),
            history.clone(),
            watching.clone(),
            shard.clone(),
        );
        tokio::spawn(async move {
            while !watching.is_cancelled() {
                if let Ok(Some(lease)) = store.get_lease(&shard).await {
                    let mut seen = history.lock().unwrap();
                    if seen.last() != Some(&lease) {
                        seen.push(lease);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let started = Instant::now();
    let out = admin(
        &app,
        &[
            "--stream",
            &stream,
            "set-checkpoint",
            "--shard",
            &shard,
            "--to",
            &target.sequence_number,
            "--force",
            "--json",
        ],
    )
    .await;
    let doc = json(&out);
    assert_eq!(
        doc["writes"],
        serde_json::json!(["take", "checkpoint", "release"])
    );
    assert!(
        doc["taken_as"].as_str().unwrap().starts_with("kcl-admin@"),
        "{doc:#}"
    );
    assert_eq!(doc["before"]["owner"], "w1", "taken from the live worker");
    assert!(doc["after"]["owner"].is_null(), "released");
    assert_eq!(doc["after"]["checkpoint"], target.sequence_number.as_str());
    let fenced_on = doc["before"]["counter"].as_u64().unwrap();
    let released_at = doc["after"]["counter"].as_u64().unwrap();
    assert_eq!(released_at, fenced_on + 3);

    // The old owner's next renewal or checkpoint failed by the fence: its consumer stopped.
    wait_for("the lease lost by w1", PATIENCE, || async {
        recorder
            .event_time("w1", &shard, started, |e| *e == Event::LeaseLost)
            .is_some()
    })
    .await;
    // It took the released lease again, at the new checkpoint.
    let resumed = Event::Initialized(target_checkpoint.clone());
    wait_for(
        "the shard resumed from the new checkpoint",
        PATIENCE,
        || async {
            recorder
                .event_time("w1", &shard, started, |e| *e == resumed)
                .is_some()
        },
    )
    .await;
    let resumed_at = recorder
        .event_time("w1", &shard, started, |e| *e == resumed)
        .unwrap();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = producer.stop().await;
    let put: BTreeSet<String> = all.iter().map(|p| p.data.clone()).collect();
    wait_for("every record put delivered", PATIENCE, || async {
        let delivered: BTreeSet<String> =
            recorder.delivered().into_iter().map(|d| d.data).collect();
        put.is_subset(&delivered)
    })
    .await;
    watching.cancel();
    watcher.await.unwrap();

    let delivered = recorder.delivered();
    let again: Vec<&str> = delivered
        .iter()
        .filter(|d| d.at >= resumed_at)
        .map(|d| d.sequence_number.as_str())
        .collect();
    assert_eq!(
        again.first().copied(),
        Some(next.sequence_number.as_str()),
        "the shard resumes right after the new checkpoint"
    );
    assert!(
        delivered.iter().filter(|d| d.data == next.data).count() >= 2,
        "the records after the new checkpoint are delivered again"
    );
    // From kcl-admin's checkpoint write to the worker's first checkpoint after taking the
    // lease back (release, take, each keeping it), the table held the new checkpoint: no
    // write of the old owner landed over it.
    let history = history.lock().unwrap().clone();
    let between: Vec<&Lease> = history
        .iter()
        .filter(|l| (fenced_on + 2..=released_at + 1).contains(&l.counter))
        .collect();
    assert!(
        !between.is_empty(),
        "the watcher saw the change: {history:#?}"
    );
    for lease in between {
        assert_eq!(lease.checkpoint, target_checkpoint, "{history:#?}");
    }
    assert!(
        history
            .iter()
            .filter(|l| l.counter > released_at)
            .all(|l| l.owner.as_deref() == Some("w1")),
        "only the worker wrote after the release: {history:#?}"
    );
    worker.stop().await.unwrap();
}
