//! `kcl-archive` against the real servers (kinesis-mock, DynamoDB Local, s3rver): objects are
//! stored by size and by age under the records' UTC hour, binary records survive as base64,
//! a crash between storing an object and checkpointing it leaves each record once in the
//! archive (the replay overwrites the object), and a handoff stores the buffer before the
//! next owner starts.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kcl_core::{ExtendedSequenceNumber, SequenceNumber};
use kcl_examples::archive::line::decode_line;
use kcl_examples::archive::object_name::Hour;
use kcl_examples::archive::read::{ArchivedObject, read_archive};
use kcl_examples::archive::{ArchiveError, DirStore, ObjectStore, S3Store};
use kcl_integration_tests::process::Logged;
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    PATIENCE, create_stream, example_binary, kinesis, put_raw, put_records, records, require_s3,
    sdk_config, unique, wait_for,
};
use tokio::process::Command;

/// `kcl-archive run` with short lease timings, reading from the start of the stream.
fn archive_command(app: &str, stream: &str, worker: &str) -> Command {
    let mut command = Command::new(example_binary("kcl-archive"));
    command
        .args([
            "run",
            "--app",
            app,
            "--stream",
            stream,
            "--worker-id",
            worker,
        ])
        .args(["--lease-duration", "6s", "--renewal-interval", "1s"])
        .args([
            "--taker-interval",
            "1s",
            "--idle-time-between-empty-reads",
            "300ms",
        ]);
    command
}

/// Every payload in the archive with how often it is there, and the objects.
fn payloads(objects: &[ArchivedObject]) -> BTreeMap<Vec<u8>, usize> {
    let mut seen = BTreeMap::new();
    for object in objects {
        for line in &object.lines {
            *seen.entry(decode_line(line).unwrap()).or_default() += 1;
        }
    }
    seen
}

fn assert_each_once(objects: &[ArchivedObject], expected: &[Vec<u8>]) {
    let seen = payloads(objects);
    let missing: Vec<_> = expected.iter().filter(|p| !seen.contains_key(*p)).collect();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "missing from the archive: {missing:?}");
    assert!(twice.is_empty(), "in the archive twice: {twice:?}");
    assert_eq!(seen.len(), expected.len(), "nothing else in the archive");
}

/// The position of an object's first record (sequence numbers do not fit in a u128).
fn first_record(object: &ArchivedObject) -> ExtendedSequenceNumber {
    ExtendedSequenceNumber::new(
        SequenceNumber::new(object.sequence_number.as_str()).unwrap(),
        object.sub_sequence_number,
    )
}

/// A shard's lines in archive order (objects by first sequence number).
fn shard_lines(objects: &[ArchivedObject], shard_id: &str) -> Vec<Vec<u8>> {
    let mut objects: Vec<&ArchivedObject> =
        objects.iter().filter(|o| o.shard_id == shard_id).collect();
    objects.sort_by_key(|o| first_record(o));
    objects
        .iter()
        .flat_map(|o| o.lines.iter().map(|l| decode_line(l).unwrap()))
        .collect()
}

async fn wait_for_lines(
    store: &dyn ObjectStore,
    prefix: &str,
    count: usize,
) -> Vec<ArchivedObject> {
    wait_for(&format!("{count} lines archived"), PATIENCE, || async {
        // s3rver, unlike S3, serves an object being overwritten half-written: such a read is
        // not yet an answer.
        match read_archive(store, prefix).await {
            Ok(objects) => objects.iter().map(|o| o.lines.len()).sum::<usize>() >= count,
            Err(ArchiveError::Corrupt { .. }) => false,
            Err(e) => panic!("reading the archive: {e:?}"),
        }
    })
    .await;
    read_archive(store, prefix).await.unwrap()
}

fn temp_dir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A store for the local S3 server, path-style, and its fresh bucket.
async fn s3_store(bucket: &str) -> S3Store {
    require_s3();
    let store = S3Store::new(&sdk_config().await, bucket, true);
    store.create_bucket().await.unwrap();
    store
}

fn stored_keys(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("stored an object"))
        .filter_map(|l| {
            let start = l.find("key=")? + 4;
            Some(
                l[start..]
                    .split_whitespace()
                    .next()?
                    .trim_matches('"')
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_store_replaces_an_object_written_again_and_lists_by_prefix() {
    let store = s3_store(&unique("archive-store")).await;
    let body = bytes::Bytes::from(
        (0..200_000u32)
            .flat_map(u32::to_le_bytes)
            .collect::<Vec<u8>>(),
    );
    store.put("p/a.gz", body.clone()).await.unwrap();
    assert_eq!(store.get("p/a.gz").await.unwrap(), body);
    store
        .put("p/a.gz", bytes::Bytes::from_static(b"again"))
        .await
        .unwrap();
    store
        .put("q/b.gz", bytes::Bytes::from_static(b"other"))
        .await
        .unwrap();
    assert_eq!(store.get("p/a.gz").await.unwrap(), &b"again"[..]);
    let listed = store.list("p/").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].key.as_str(), listed[0].size), ("p/a.gz", 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_stored_by_size_and_by_age_under_the_arrival_hour_with_binary_records_kept() {
    let kinesis = kinesis().await;
    let stream = unique("archive-flush");
    create_stream(&kinesis, &stream, 1).await;
    let dir = temp_dir("kcl-archive-dir");
    let before = Hour::of(SystemTime::now());
    // 200 lines of ~100 bytes: 4 KB objects by size, the rest by age.
    let lines = records(
        "line-with-some-padding-to-make-it-about-a-hundred-bytes-long-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        0,
        200,
        7,
    );
    let puts = put_records(&kinesis, &stream, &lines).await;
    let binary: Vec<u8> = vec![0xff, 0xfe, b'\n', 0x00, 0x80];
    put_raw(&kinesis, &stream, "bin", &binary).await;
    let windows_line = b"a line ending in CRLF\r\n".to_vec();
    put_raw(&kinesis, &stream, "crlf", &windows_line).await;

    let mut command = archive_command(&unique("archive-flush-app"), &stream, "w1");
    command.arg("--dir").arg(&dir).args([
        "--prefix",
        "raw/",
        "--flush-size",
        "4KB",
        "--flush-age",
        "2s",
    ]);
    let mut worker = Logged::start(command);
    let store = DirStore::new(&dir);
    let objects = wait_for_lines(&store, "raw/", lines.len() + 2).await;
    let after = Hour::of(SystemTime::now());

    let mut expected: Vec<Vec<u8>> = puts.iter().map(|p| p.data.clone().into_bytes()).collect();
    expected.push(binary.clone());
    expected.push(b"a line ending in CRLF".to_vec());
    assert_each_once(&objects, &expected);
    assert_eq!(
        shard_lines(&objects, "shardId-000000000000"),
        expected,
        "shard order kept"
    );
    // The binary record is stored behind the marker; text without its line break.
    let all: Vec<&String> = objects.iter().flat_map(|o| &o.lines).collect();
    assert!(all.iter().any(|l| l.starts_with("#kcl-base64:")), "{all:?}");
    assert!(all.iter().any(|l| *l == "a line ending in CRLF"), "{all:?}");
    for object in &objects {
        let hour = object.key.strip_prefix("raw/").unwrap();
        assert!(
            hour.starts_with(&before.to_string()) || hour.starts_with(&after.to_string()),
            "{} under the arrival hour ({before} or {after})",
            object.key
        );
        assert!(object.key.ends_with(".gz") && object.stream == stream);
    }
    // Every object but the last reached the size; the last was stored by age, alone.
    let mut sizes: Vec<(ExtendedSequenceNumber, usize)> = objects
        .iter()
        .map(|o| {
            let plain: usize = o.lines.iter().map(|l| l.len() + 1).sum();
            (first_record(o), plain)
        })
        .collect();
    sizes.sort_unstable();
    let (last, full) = sizes.split_last().unwrap();
    assert!(full.len() >= 3, "several objects stored by size: {sizes:?}");
    assert!(full.iter().all(|(_, plain)| *plain >= 4096), "{sizes:?}");
    assert!(last.1 < 4096, "the rest stored by age: {sizes:?}");
    let log = worker.log();
    assert!(log.contains("reason=\"size\""), "{log}");
    assert!(log.contains("reason=\"age\""), "{log}");

    worker.signal("TERM");
    let status = worker.exits_within(PATIENCE, "kcl-archive").await;
    assert!(status.success(), "{status}\n{}", worker.log());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_storing_and_checkpointing_leaves_each_record_once() {
    let kinesis = kinesis().await;
    let stream = unique("archive-crash");
    create_stream(&kinesis, &stream, 1).await;
    let bucket = unique("archive-crash");
    let store = s3_store(&bucket).await;
    let app = unique("archive-crash-app");
    let first = put_records(&kinesis, &stream, &records("first", 0, 40, 3)).await;

    // The first worker reaches DynamoDB through a proxy that, once it holds the lease, never
    // answers an UpdateItem again: its checkpoint after the object is stored hangs.
    let proxy = FaultProxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap()).await;
    let mut command = archive_command(&app, &stream, "doomed");
    command
        .args(["--bucket", &bucket, "--flush-age", "3s"])
        .env("AWS_ENDPOINT_URL_DYNAMODB", proxy.url());
    let mut doomed = Logged::start(command);
    doomed.wait_for_log("took lease").await;
    proxy.inject(Rule::on("UpdateItem", Fault::Hang));
    let objects = wait_for_lines(&store, "", first.len()).await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    let stored = objects[0].key.clone();
    doomed.signal("KILL");
    doomed.exits_within(PATIENCE, "SIGKILL").await;
    assert!(
        proxy.faults().get("UpdateItem").copied().unwrap_or(0) > 0,
        "the checkpoint hung"
    );
    assert_eq!(
        stored_keys(&doomed.log()),
        vec![] as Vec<String>,
        "never checkpointed"
    );

    // More records, then a second worker: it takes the expired lease, reads again from the
    // checkpoint (the start), and its first object has the same name.
    let second = put_records(&kinesis, &stream, &records("second", 0, 40, 3)).await;
    let mut command = archive_command(&app, &stream, "heir");
    command.args(["--bucket", &bucket, "--flush-age", "3s"]);
    let mut heir = Logged::start(command);
    let objects = wait_for_lines(&store, "", first.len() + second.len()).await;
    let expected: Vec<Vec<u8>> = first
        .iter()
        .chain(&second)
        .map(|p| p.data.clone().into_bytes())
        .collect();
    assert_each_once(&objects, &expected);
    assert_eq!(shard_lines(&objects, "shardId-000000000000"), expected);
    let rewritten = stored_keys(&heir.log());
    assert_eq!(
        rewritten.first(),
        Some(&stored),
        "the replay stored its first object under the same name"
    );
    heir.signal("TERM");
    let status = heir.exits_within(PATIENCE, "heir").await;
    assert!(status.success(), "{status}\n{}", heir.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_stores_its_buffers_before_the_other_takes_over() {
    let kinesis = kinesis().await;
    let stream = unique("archive-handoff");
    create_stream(&kinesis, &stream, 2).await;
    let dir = temp_dir("kcl-archive-handoff");
    let app = unique("archive-handoff-app");
    let start = |worker: &str| {
        let mut command = archive_command(&app, &stream, worker);
        // Nothing is stored by age or size: only the shutdown stores.
        command
            .arg("--dir")
            .arg(&dir)
            .args(["--flush-age", "10m", "--flush-size", "64MB"])
            .args(["--summary-interval", "1s"]);
        Logged::start(command)
    };
    let mut a = start("worker-a");
    let mut b = start("worker-b");
    for worker in [&a, &b] {
        worker.wait_for_log("took lease").await;
    }
    let first = put_records(&kinesis, &stream, &records("first", 0, 100, 10)).await;
    // Both shards' records are delivered (buffered) before the stop.
    wait_for("records delivered to both workers", PATIENCE, || async {
        processed_some(&a.log()) && processed_some(&b.log())
    })
    .await;
    b.signal("TERM");
    let status = b.exits_within(PATIENCE, "worker-b").await;
    assert!(status.success(), "{status}\n{}", b.log());
    let b_log = b.log();
    assert!(b_log.contains("reason=\"shutdown\""), "{b_log}");
    assert_eq!(stored_keys(&b_log).len(), 1, "{b_log}");
    // worker-a takes b's shard from b's checkpoint; more records on both shards.
    wait_for("worker-a holding both leases", PATIENCE, || async {
        a.log().matches("took lease").count() >= 2
    })
    .await;
    let second = put_records(&kinesis, &stream, &records("second", 0, 100, 10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.signal("TERM");
    let status = a.exits_within(PATIENCE, "worker-a").await;
    assert!(status.success(), "{status}\n{}", a.log());

    let objects = read_archive(&DirStore::new(&dir), "").await.unwrap();
    let expected: Vec<Vec<u8>> = first
        .iter()
        .chain(&second)
        .map(|p| p.data.clone().into_bytes())
        .collect();
    assert_each_once(&objects, &expected);
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        let in_put_order: Vec<Vec<u8>> = first
            .iter()
            .chain(&second)
            .filter(|p| p.shard_id == shard)
            .map(|p| p.data.clone().into_bytes())
            .collect();
        assert_eq!(
            shard_lines(&objects, shard),
            in_put_order,
            "{shard} in order"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Whether a progress line (`--summary-interval`) reported records processed.
fn processed_some(log: &str) -> bool {
    log.lines().any(|line| {
        line.split_once(" records/s")
            .and_then(|(before, _)| before.rsplit(' ').next()?.parse::<f64>().ok())
            .is_some_and(|rate| rate > 0.0)
    })
}
