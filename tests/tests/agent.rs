//! `kcl-agent` as a process against kinesis-mock: files followed through rotation by rename
//! and by copy-truncate, a crash and a restart from the state file, partial `PutRecords`
//! failures injected by the proxy, and KPL aggregation read back through the library's
//! de-aggregation. What the agent shipped is read back from every shard of the stream.

// The agents' logs go to stderr, shown with `--nocapture` and with a failure.
#![allow(clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use kcl_core::{Record, SequenceNumber};
use kcl_integration_tests::process::Logged;
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    PATIENCE, create_stream, example_binary, kinesis, list_shards, sdk_config, unique, wait_for,
};
use tokio::process::Command;

/// A user record read back: its shard, partition key and data.
#[derive(Debug, Clone)]
struct Received {
    shard: String,
    key: String,
    data: Vec<u8>,
}

/// Everything in the stream, shard by shard in shard order, KPL aggregates de-aggregated as
/// the library's workers do.
async fn read_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<Received> {
    let mut out = Vec::new();
    for shard in list_shards(client, stream).await {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(&shard.shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("GetShardIterator")
            .shard_iterator;
        while let Some(it) = iterator {
            let page = client
                .get_records()
                .shard_iterator(it)
                .limit(10_000)
                .send()
                .await
                .expect("GetRecords");
            for r in page.records() {
                let seq = SequenceNumber::new(r.sequence_number()).expect("sequence number");
                let record = Record::new(seq, r.partition_key(), r.data().as_ref().to_vec());
                for user in kcl_core::user_records(record, None) {
                    out.push(Received {
                        shard: shard.shard_id.clone(),
                        key: user.partition_key,
                        data: user.data.to_vec(),
                    });
                }
            }
            if page.records().is_empty() && page.millis_behind_latest().unwrap_or(0) == 0 {
                break;
            }
            iterator = page.next_shard_iterator;
        }
    }
    out
}

/// Line `n` of a test log: JSON with its key and its number among the key's lines.
fn log_line(n: usize, keys: usize, key_seq: usize) -> String {
    serde_json::json!({ "k": format!("key-{}", n % keys), "n": n, "seq": key_seq }).to_string()
}

/// The lines written, by number, and checks on what arrived: each line `n` how many times.
fn counts(received: &[Received]) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for r in received {
        let line: serde_json::Value = serde_json::from_slice(&r.data).unwrap_or_else(|e| {
            panic!(
                "not a JSON line: {e}: {:?}",
                String::from_utf8_lossy(&r.data)
            )
        });
        *counts.entry(line["n"].as_u64().expect("n")).or_default() += 1;
    }
    counts
}

/// Per key, the `seq` of its lines in the order they are in the stream (each key's lines are
/// in one shard), first occurrences only, leaving out the lines `skip` names.
fn per_key_order(received: &[Received], skip: &BTreeSet<u64>) -> BTreeMap<String, Vec<u64>> {
    let mut seen = BTreeSet::new();
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut shard_of: HashMap<String, String> = HashMap::new();
    for r in received {
        let line: serde_json::Value = serde_json::from_slice(&r.data).expect("JSON");
        let n = line["n"].as_u64().expect("n");
        let key = line["k"].as_str().expect("k").to_owned();
        assert_eq!(r.key, key, "line {n} put under its field's key");
        let shard = shard_of
            .entry(key.clone())
            .or_insert_with(|| r.shard.clone());
        assert_eq!(*shard, r.shard, "every line of {key} in one shard");
        if seen.insert(n) && !skip.contains(&n) {
            order
                .entry(key)
                .or_default()
                .push(line["seq"].as_u64().expect("seq"));
        }
    }
    order
}

fn assert_in_key_order(order: &BTreeMap<String, Vec<u64>>) {
    for (key, seqs) in order {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: lines out of order: {seqs:?}"
        );
    }
}

fn agent_command(stream: &str, state: &Path, files: &[&Path]) -> Command {
    let mut command = Command::new(example_binary("kcl-agent"));
    command
        .args(["--stream", stream, "--from", "start"])
        .args(["--partition-key", "field:k", "--linger", "50ms"])
        .args(["--poll-interval", "100ms"])
        .arg("--state-file")
        .arg(state);
    for file in files {
        command.arg("--file").arg(file);
    }
    command
}

/// Runs the agent with `--once` and returns its summary line. Its log is printed (shown
/// when the test fails).
async fn run_once(mut command: Command) -> serde_json::Value {
    let out = command
        .arg("--once")
        .env("RUST_LOG", "info")
        .output()
        .await
        .expect("run kcl-agent");
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("{log}");
    assert!(
        out.status.success(),
        "kcl-agent --once: {}\n{log}",
        out.status
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(stdout.lines().count(), 1, "one summary line: {stdout}");
    serde_json::from_str(stdout.trim()).expect("a JSON summary")
}

/// The offset the state file records for the file now at `path`.
fn state_offset(state: &Path, path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(path).ok()?.ino();
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(state).ok()?).ok()?;
    state["files"]
        .as_array()?
        .iter()
        .find(|f| f["ino"].as_u64() == Some(ino))
        .and_then(|f| f["offset"].as_u64())
}

async fn setup(prefix: &str, shards: i32) -> (aws_sdk_kinesis::Client, String, PathBuf) {
    let kinesis = kinesis().await; // fails loudly without the local servers
    let stream = unique(prefix);
    create_stream(&kinesis, &stream, shards).await;
    let dir = std::env::temp_dir().join(unique("kcl-agent"));
    std::fs::create_dir_all(&dir).unwrap();
    (kinesis, stream, dir)
}

/// The writers' pause after every 50 lines.
const PAUSE: Duration = Duration::from_millis(20);

/// Writes lines `from..to` to `file`, flushing every 50 with a pause.
async fn write_lines(
    file: &mut std::fs::File,
    from: usize,
    to: usize,
    seqs: &mut [usize],
    pause: Duration,
) {
    for n in from..to {
        let key = n % seqs.len();
        writeln!(file, "{}", log_line(n, seqs.len(), seqs[key])).unwrap();
        seqs[key] += 1;
        if n % 50 == 49 {
            file.flush().unwrap();
            tokio::time::sleep(pause).await;
        }
    }
    file.flush().unwrap();
}

async fn wait_for_lines(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    lines: usize,
    agent: &Logged,
) {
    wait_for(
        &format!("{lines} lines in the stream"),
        PATIENCE,
        || async {
            let got = counts(&read_stream(kinesis, stream).await).len();
            if got < lines {
                tracing::debug!(got, "waiting\n{}", agent.log());
            }
            got >= lines
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_rename_and_by_copy_truncate_loses_and_repeats_nothing() {
    const LINES: usize = 3_000;
    const KEYS: usize = 8;
    let (kinesis, stream, dir) = setup("agent-rotate", 2).await;
    let log = dir.join("access.log");
    let state = dir.join("agent.state.json");
    let mut file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut agent = Logged::start(agent_command(&stream, &state, &[&log]));
    agent.wait_for_log("following").await;
    let mut seqs = vec![0; KEYS];

    write_lines(&mut file, 0, LINES / 3, &mut seqs, PAUSE).await;
    // Rotation by rename: the writer closes its file, it is renamed, a new one is created.
    drop(file);
    std::fs::rename(&log, dir.join("access.log.1")).unwrap();
    let mut file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    write_lines(&mut file, LINES / 3, 2 * LINES / 3, &mut seqs, PAUSE).await;
    agent.wait_for_log("finished a rotated file").await;

    // Rotation by copy-truncate, once the agent has shipped what is there (lines written
    // between the copy and the truncation are lost to any reader of the file).
    let size = std::fs::metadata(&log).unwrap().len();
    wait_for("the agent to ship the file", PATIENCE, || async {
        state_offset(&state, &log) == Some(size)
    })
    .await;
    std::fs::copy(&log, dir.join("access.log.2")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    write_lines(&mut file, 2 * LINES / 3, LINES, &mut seqs, PAUSE).await;
    agent.wait_for_log("file truncated").await;

    wait_for_lines(&kinesis, &stream, LINES, &agent).await;
    agent.signal("TERM");
    let status = agent.exits_within(PATIENCE, "kcl-agent").await;
    assert!(status.success(), "after SIGTERM: {status}\n{}", agent.log());
    eprintln!("{}", agent.log());

    let received = read_stream(&kinesis, &stream).await;
    let counts = counts(&received);
    let expected: BTreeMap<u64, usize> = (0..LINES as u64).map(|n| (n, 1)).collect();
    assert_eq!(counts, expected, "every line exactly once");
    assert_in_key_order(&per_key_order(&received, &BTreeSet::new()));
    assert_eq!(
        state_offset(&state, &log),
        Some(std::fs::metadata(&log).unwrap().len())
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_restarts_from_its_state_file_and_loses_nothing() {
    const LINES: usize = 4_000;
    const KEYS: usize = 10;
    const MAX_BATCH: usize = 100;
    let (kinesis, stream, dir) = setup("agent-crash", 2).await;
    // Calls are acknowledged 200 ms after they take effect: the agent is killed with a batch
    // put but not acknowledged, which the restart sends again.
    let proxy = kinesis_proxy().await;
    proxy.inject(Rule::on(
        "PutRecords",
        Fault::DelayAnswer(Duration::from_millis(200)),
    ));
    let log = dir.join("app.log");
    let state = dir.join("agent.state.json");
    let mut file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let start = |endpoint: &str| {
        let mut command = agent_command(&stream, &state, &[&log]);
        command
            .args(["--max-batch-records", &MAX_BATCH.to_string()])
            .env("AWS_ENDPOINT_URL_KINESIS", endpoint);
        Logged::start(command)
    };
    let mut agent = start(&proxy.url());
    agent.wait_for_log("following").await;
    let writer = tokio::spawn(async move {
        let mut seqs = vec![0; KEYS];
        write_lines(&mut file, 0, LINES, &mut seqs, Duration::from_millis(100)).await;
    });
    wait_for_lines(&kinesis, &stream, LINES / 5, &agent).await;

    // Killed while lines flow, most likely waiting for an answer.
    assert!(!writer.is_finished(), "the writer is still writing");
    agent.signal("KILL");
    agent
        .exits_within(PATIENCE, "kcl-agent after SIGKILL")
        .await;
    let mut agent = start(&std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap());
    writer.await.unwrap();
    wait_for_lines(&kinesis, &stream, LINES, &agent).await;
    agent.signal("TERM");
    let status = agent.exits_within(PATIENCE, "kcl-agent").await;
    assert!(status.success(), "after SIGTERM: {status}\n{}", agent.log());
    eprintln!("{}", agent.log());

    let received = read_stream(&kinesis, &stream).await;
    let counts = counts(&received);
    let missing: Vec<u64> = (0..LINES as u64)
        .filter(|n| !counts.contains_key(n))
        .collect();
    assert!(missing.is_empty(), "lines lost: {missing:?}");
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!("{duplicates} lines sent twice");
    assert!(
        duplicates <= MAX_BATCH,
        "{duplicates} lines sent twice: more than the batch in flight"
    );
    assert_in_key_order(&per_key_order(&received, &BTreeSet::new()));
    std::fs::remove_dir_all(&dir).ok();
}

async fn kinesis_proxy() -> FaultProxy {
    sdk_config().await;
    FaultProxy::start(&std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap()).await
}

/// Writes `lines` lines over `keys` keys to a new file.
fn write_file(path: &Path, lines: usize, keys: usize) {
    let mut seqs = vec![0; keys];
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for n in 0..lines {
        writeln!(file, "{}", log_line(n, keys, seqs[n % keys])).unwrap();
        seqs[n % keys] += 1;
    }
    file.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_entries_are_sent_again_and_every_line_arrives_once() {
    const LINES: usize = 1_500;
    let (kinesis, stream, dir) = setup("agent-partial", 2).await;
    let proxy = kinesis_proxy().await;
    proxy.inject(Rule::on(
        "PutRecords",
        Fault::FailSomePutRecords { every: 7 },
    ));
    let log = dir.join("app.log");
    write_file(&log, LINES, 10);

    let mut command = agent_command(&stream, &dir.join("state.json"), &[&log]);
    command
        .args(["--max-batch-records", "100"])
        .env("AWS_ENDPOINT_URL_KINESIS", proxy.url());
    let summary = run_once(command).await;
    let failed = proxy.failed_entries();
    assert!(!failed.is_empty(), "the proxy failed entries");
    assert_eq!(summary["entries_retried"], failed.len(), "{summary}");
    assert_eq!(summary["lines"], LINES);
    assert_eq!(summary["records"], LINES);

    let received = read_stream(&kinesis, &stream).await;
    let expected: BTreeMap<u64, usize> = (0..LINES as u64).map(|n| (n, 1)).collect();
    assert_eq!(counts(&received), expected, "every line exactly once");
    // Per key, in order; except that a failed entry may land after later lines of its key
    // from the same call (documented): leave the failed lines out of the check.
    let retried: BTreeSet<u64> = failed
        .iter()
        .map(|(_, data)| {
            serde_json::from_slice::<serde_json::Value>(data).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_in_key_order(&per_key_order(&received, &retried));
    // And the residual case did happen: with the failed lines, some key is out of order.
    let strict = per_key_order(&received, &BTreeSet::new());
    assert!(
        strict
            .values()
            .any(|seqs| seqs.windows(2).any(|w| w[0] > w[1])),
        "a failed entry landed after a later line of its key from the same call"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_lines_keep_strict_key_order_through_failed_entries() {
    const LINES: usize = 2_000;
    let (kinesis, stream, dir) = setup("agent-partial-kpl", 2).await;
    let proxy = kinesis_proxy().await;
    proxy.inject(Rule::on(
        "PutRecords",
        Fault::FailSomePutRecords { every: 3 },
    ));
    let log = dir.join("app.log");
    write_file(&log, LINES, 10);

    let mut command = agent_command(&stream, &dir.join("state.json"), &[&log]);
    command
        .arg("--aggregate")
        .env("AWS_ENDPOINT_URL_KINESIS", proxy.url());
    let summary = run_once(command).await;
    assert!(
        summary["entries_retried"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert_eq!(summary["lines"], LINES);

    let received = read_stream(&kinesis, &stream).await;
    let expected: BTreeMap<u64, usize> = (0..LINES as u64).map(|n| (n, 1)).collect();
    assert_eq!(counts(&received), expected, "every line exactly once");
    assert_in_key_order(&per_key_order(&received, &BTreeSet::new()));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_once_ships_a_file_with_a_long_line_and_an_unfinished_last_line() {
    const LINES: usize = 3_000;
    const KEYS: usize = 5;
    let (kinesis, stream, dir) = setup("agent-kpl", 4).await;
    let log = dir.join("app.log");
    let mut seqs = [0; KEYS];
    let mut text = String::new();
    for n in 0..LINES {
        let mut line: serde_json::Value =
            serde_json::from_str(&log_line(n, KEYS, seqs[n % KEYS])).unwrap();
        if n == 1234 {
            // Longer than a record: shipped in pieces, never dropped.
            line["pad"] = "x".repeat(1_500_000).into();
        }
        seqs[n % KEYS] += 1;
        text.push_str(&line.to_string());
        if n + 1 < LINES {
            text.push('\n'); // the last line has no newline: --once ships it anyway
        }
    }
    std::fs::write(&log, &text).unwrap();
    let state = dir.join("state.json");

    let summary = run_once({
        let mut command = agent_command(&stream, &state, &[&log]);
        command.arg("--aggregate");
        command
    })
    .await;
    assert_eq!(summary["lines"], LINES, "{summary}");
    assert_eq!(summary["bytes"], text.len() - (LINES - 1), "{summary}");
    let records = summary["records"].as_u64().unwrap();
    assert!(records < 100, "lines aggregated: {records} records");
    assert_eq!(state_offset(&state, &log), Some(text.len() as u64));

    // The pieces of the long line are consecutive user records of its key: joined again.
    let mut received = Vec::new();
    let mut pending: HashMap<String, Vec<u8>> = HashMap::new();
    for r in read_stream(&kinesis, &stream).await {
        let buffer = pending.entry(r.key.clone()).or_default();
        buffer.extend_from_slice(&r.data);
        if serde_json::from_slice::<serde_json::Value>(buffer).is_ok() {
            received.push(Received {
                data: std::mem::take(buffer),
                ..r
            });
        }
    }
    assert!(pending.values().all(Vec::is_empty), "no piece left over");
    let expected: BTreeMap<u64, usize> = (0..LINES as u64).map(|n| (n, 1)).collect();
    assert_eq!(counts(&received), expected, "every line exactly once");
    assert_in_key_order(&per_key_order(&received, &BTreeSet::new()));

    // Run again: the state file says everything was shipped.
    let again = run_once({
        let mut command = agent_command(&stream, &state, &[&log]);
        command.arg("--aggregate");
        command
    })
    .await;
    assert_eq!(again["lines"], 0, "{again}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_refused_with_a_clear_error() {
    for (flag, value, says) in [
        ("--max-batch-records", "501", "--max-batch-records"),
        ("--max-batch-bytes", "6MB", "--max-batch-bytes"),
        ("--partition-key", "host", "random, file or field:NAME"),
        ("--linger", "soon", "not a duration"),
        (
            "--file",
            "/var/log/[",
            "not a valid glob: Pattern syntax error",
        ),
    ] {
        let out = Command::new(example_binary("kcl-agent"))
            .args(["--stream", "s", "--file", "/tmp/none.log", flag, value])
            .output()
            .await
            .expect("run kcl-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
