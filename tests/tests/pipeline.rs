//! The log pipeline end to end, as the demo runs it: a log written and rotated by rename,
//! `kcl-agent` tailing it into a 4-shard stream keyed by client, two `kcl-archive` workers
//! storing it in the local S3 server while a shard is split and one worker stops on SIGTERM.
//! The archive, read back, holds every line exactly once, in order per shard and per key.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kcl_integration_tests::process::Logged;
use kcl_integration_tests::{
    PATIENCE, create_stream, example_binary, kinesis, require_s3, sdk_config, split_shard, unique,
    wait_for,
};
use tokio::process::Command;

const LINES: usize = 3_000;
const CLIENTS: usize = 12;
/// Lines written between two pauses of the writer, and the pause: about 1,000 lines/s, so the
/// split and the stop happen while lines flow.
const BURST: usize = 50;
const BURST_PAUSE: Duration = Duration::from_millis(50);
const MARKER: &str = "#kcl-base64:";

/// One access-log line: its number in the log, its client and its number among the client's.
fn access_line(n: usize, client: usize, client_seq: usize) -> String {
    serde_json::json!({
        "remote_addr": format!("10.0.{client}.7"),
        "method": "GET",
        "path": format!("/api/orders/{}", n * 7919 % 100_000),
        "status": 200,
        "n": n,
        "client_seq": client_seq,
    })
    .to_string()
}

/// Writes `LINES` lines to `path` in bursts, renaming it to `path.1` halfway (logrotate).
async fn write_log(path: &Path) {
    let mut seqs = [0usize; CLIENTS];
    let mut file = std::fs::File::create(path).unwrap();
    for n in 0..LINES {
        if n == LINES / 2 {
            drop(file);
            std::fs::rename(path, path.with_extension("log.1")).unwrap();
            file = std::fs::File::create(path).unwrap();
        }
        let client = (n * 31 + n / 7) % CLIENTS;
        writeln!(file, "{}", access_line(n, client, seqs[client])).unwrap();
        seqs[client] += 1;
        if n % BURST == BURST - 1 {
            file.flush().unwrap();
            tokio::time::sleep(BURST_PAUSE).await;
        }
    }
}

fn archive_worker(app: &str, stream: &str, bucket: &str, worker: &str) -> Logged {
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
        .args(["--initial-position", "trim-horizon", "--bucket", bucket])
        .args(["--create-bucket", "--prefix", "logs/"])
        .args(["--flush-size", "64KB", "--flush-age", "2s"])
        .args(["--idle-time-between-empty-reads", "300ms"])
        .args(["--shard-sync-interval", "3s"]);
    Logged::start(command)
}

/// The archive as `kcl-archive read` prints it: one JSON object per stored object.
async fn read_archive(bucket: &str) -> Vec<serde_json::Value> {
    let out = Command::new(example_binary("kcl-archive"))
        .args(["read", "--bucket", bucket, "--prefix", "logs/"])
        .output()
        .await
        .expect("run kcl-archive read");
    assert!(
        out.status.success(),
        "kcl-archive read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn archived_lines(objects: &[serde_json::Value]) -> usize {
    objects
        .iter()
        .map(|o| o["lines"].as_array().map_or(0, Vec::len))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_archives_every_line_once_in_order_across_a_split_and_a_stopped_worker() {
    sdk_config().await; // fails loudly without the local servers
    require_s3();
    let kinesis = kinesis().await;
    let stream = unique("pipeline");
    create_stream(&kinesis, &stream, 4).await;
    let (app, bucket) = (unique("pipeline-app"), unique("pipeline-bucket"));
    let dir = std::env::temp_dir().join(unique("kcl-pipeline"));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    std::fs::File::create(&log).unwrap();

    let mut agent = {
        let mut command = Command::new(example_binary("kcl-agent"));
        command
            .args(["--stream", &stream, "--from", "start"])
            .args(["--partition-key", "field:remote_addr", "--linger", "100ms"])
            .arg("--file")
            .arg(&log)
            .arg("--state-file")
            .arg(dir.join("agent.state.json"));
        Logged::start(command)
    };
    let mut worker_a = archive_worker(&app, &stream, &bucket, "worker-a");
    let mut worker_b = archive_worker(&app, &stream, &bucket, "worker-b");
    let writer = tokio::spawn({
        let log = log.clone();
        async move { write_log(&log).await }
    });

    tokio::time::sleep(Duration::from_secs(1)).await;
    let shards = kcl_integration_tests::list_shards(&kinesis, &stream).await;
    split_shard(&kinesis, &stream, &shards[0].shard_id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    worker_b.signal("TERM");
    let status = worker_b.exits_within(PATIENCE, "worker-b").await;
    assert!(
        status.success(),
        "worker-b after SIGTERM: {status}\n{}",
        worker_b.log()
    );
    writer.await.unwrap();

    wait_for("every line archived", PATIENCE, || async {
        archived_lines(&read_archive(&bucket).await) >= LINES
    })
    .await;
    agent.signal("TERM");
    let status = agent.exits_within(PATIENCE, "kcl-agent").await;
    assert!(
        status.success(),
        "kcl-agent after SIGTERM: {status}\n{}",
        agent.log()
    );
    worker_a.signal("TERM");
    let status = worker_a.exits_within(PATIENCE, "worker-a").await;
    assert!(
        status.success(),
        "worker-a after SIGTERM: {status}\n{}",
        worker_a.log()
    );

    let mut objects = read_archive(&bucket).await;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    // Per client: its lines' client_seq in each shard, in archive order.
    let mut per_key: BTreeMap<String, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
    objects.sort_by_key(|o| {
        let seq = kcl_core::SequenceNumber::new(o["sequence_number"].as_str().unwrap()).unwrap();
        let sub = o["sub_sequence_number"].as_u64().unwrap();
        (o["shard_id"].as_str().unwrap().to_owned(), seq, sub)
    });
    let mut last_n: HashMap<String, u64> = HashMap::new();
    for object in &objects {
        let key = object["key"].as_str().unwrap();
        assert!(
            key.starts_with("logs/") && key.ends_with(".gz"),
            "object {key} under the prefix, gzip"
        );
        let shard = object["shard_id"].as_str().unwrap().to_owned();
        for text in object["lines"].as_array().unwrap() {
            let text = text.as_str().unwrap();
            assert!(
                !text.starts_with(MARKER),
                "a JSON line stored as text: {text}"
            );
            let line: serde_json::Value = serde_json::from_str(text).unwrap();
            let n = line["n"].as_u64().unwrap();
            *seen.entry(n).or_default() += 1;
            // The agent ships in file order with one call in flight: per shard, n grows.
            if let Some(&before) = last_n.get(&shard) {
                assert!(n > before, "shard {shard}: line {n} after line {before}");
            }
            last_n.insert(shard.clone(), n);
            per_key
                .entry(line["remote_addr"].as_str().unwrap().to_owned())
                .or_default()
                .entry(shard.clone())
                .or_default()
                .push(line["client_seq"].as_u64().unwrap());
        }
    }
    let missing: Vec<u64> = (0..LINES as u64)
        .filter(|n| !seen.contains_key(n))
        .collect();
    let twice: Vec<u64> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        missing.is_empty(),
        "{} lines missing: {missing:?}",
        missing.len()
    );
    assert!(
        twice.is_empty(),
        "{} lines archived twice: {twice:?}",
        twice.len()
    );
    // Per key, across the split: each shard's run grows, and the runs do not interleave
    // (all of the parent's lines of a client come before the child's).
    for (client, shards) in &per_key {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (shard, seqs) in shards {
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "client {client} in {shard}: {seqs:?}"
            );
            runs.push((seqs[0], seqs[seqs.len() - 1]));
        }
        runs.sort_unstable();
        assert!(
            runs.windows(2).all(|w| w[0].1 < w[1].0),
            "client {client}: runs interleave across shards: {runs:?}"
        );
    }
    let shards_used: std::collections::BTreeSet<&str> = objects
        .iter()
        .map(|o| o["shard_id"].as_str().unwrap())
        .collect();
    assert!(
        shards_used.len() > 4,
        "lines reached the split's children: {shards_used:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
