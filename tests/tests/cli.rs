//! The example CLIs as processes: `kcl-consumer` consumes a stream written by another client,
//! shuts down on SIGTERM with exit code 0, and a restart continues after its checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kcl_core::{Checkpoint, Lease, LeaseConfig, LeaseStore, WorkerConfig};
use kcl_dynamo_lease::DynamoLeaseStore;
use kcl_integration_tests::process::{Logged, sigterm};
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    PATIENCE, create_stream, dynamodb, example_binary, kinesis, lease_owners, put_records,
    puts_by_shard, records, sdk_config, unique, wait_for,
};
use tokio::process::{Child, Command};

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

async fn consumer(app: &str, stream: &str, output: &Path) -> Child {
    sdk_config().await; // fails loudly without the local servers
    Command::new(example_binary("kcl-consumer"))
        .args([
            "--app",
            app,
            "--stream",
            stream,
            "--initial-position",
            "trim-horizon",
        ])
        .args(["--idle-time-between-empty-reads", "500ms"])
        .arg("--output")
        .arg(output)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start kcl-consumer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_cli_consumes_everything_and_resumes_after_sigterm() {
    let kinesis = kinesis().await;
    let stream = unique("cli");
    create_stream(&kinesis, &stream, 4).await;
    let first = put_records(&kinesis, &stream, &records("first", 0, 2000, 101)).await;
    let dir = std::env::temp_dir().join(unique("kcl-cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("records.jsonl");
    let app = unique("cli-app");

    let child = consumer(&app, &stream, &output).await;
    wait_for("2000 lines", PATIENCE, || async {
        lines(&output).len() >= 2000
    })
    .await;
    let status = sigterm(child).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");

    let second = put_records(&kinesis, &stream, &records("second", 0, 1000, 101)).await;
    let child = consumer(&app, &stream, &output).await;
    wait_for("3000 lines", PATIENCE, || async {
        lines(&output).len() >= 3000
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // room for a re-delivery to show up
    let status = sigterm(child).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");

    let out = lines(&output);
    assert_eq!(
        out.len(),
        3000,
        "no record written twice: the restart resumed after the checkpoints"
    );
    let data: BTreeSet<&str> = out.iter().map(|l| l["data"].as_str().unwrap()).collect();
    let expected: BTreeSet<&str> = first
        .iter()
        .chain(&second)
        .map(|p| p.data.as_str())
        .collect();
    assert_eq!(data, expected, "every record, none missing");
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in &out {
        by_shard
            .entry(l["shard_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(l["sequence_number"].as_str().unwrap().to_owned());
        assert_eq!(l["sub_sequence_number"], 0);
        assert!(l["partition_key"].as_str().unwrap().starts_with("key-"));
    }
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    assert_eq!(by_shard, puts_by_shard(&all), "shard order");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_cli_writes_unique_ids_and_the_consumer_reads_them_back() {
    let stream = unique("producer");
    let app = unique("producer-app");
    sdk_config().await;
    let produced = Command::new(example_binary("kcl-producer"))
        .args([
            "--stream", &stream, "--create", "--shards", "2", "--count", "300", "--keys", "7",
            "--run-id", "run1",
        ])
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    assert!(produced.status.success());
    let ids: Vec<String> = String::from_utf8(produced.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 300);
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        300,
        "ids are unique"
    );

    let dir = std::env::temp_dir().join(unique("kcl-cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("records.jsonl");
    let child = consumer(&app, &stream, &output).await;
    wait_for("300 lines", PATIENCE, || async {
        lines(&output).len() >= 300
    })
    .await;
    assert!(sigterm(child).await.success());
    let out = lines(&output);
    let got: BTreeSet<String> = out
        .iter()
        .map(|l| {
            let payload: serde_json::Value =
                serde_json::from_str(l["data"].as_str().unwrap()).unwrap();
            assert_eq!(payload["key"], l["partition_key"]);
            payload["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(got, ids.into_iter().collect());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_cli_fails_with_a_message_on_a_missing_stream() {
    sdk_config().await;
    let out = Command::new(example_binary("kcl-consumer"))
        .args([
            "--app",
            &unique("app"),
            "--stream",
            "no-such-stream-anywhere",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stream `no-such-stream-anywhere` does not exist"),
        "{stderr}"
    );

    let out = Command::new(example_binary("kcl-consumer"))
        .args([
            "--app",
            "ok-app",
            "--stream",
            "s",
            "--renewal-interval",
            "9s",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lease.renewal_interval"), "{stderr}");

    // Absurd durations are named configuration errors before anything is written, never a
    // panic (exit 101) or a value wrapped around.
    for (flag, value, field) in [
        (
            "--lease-duration",
            "18446744073709551615s",
            "lease.lease_duration",
        ),
        (
            "--shutdown-timeout",
            "18446744073709551615s",
            "shutdown_timeout",
        ),
        (
            "--taker-interval",
            "307445734561825861m",
            "too long a duration",
        ),
    ] {
        let out = Command::new(example_binary("kcl-consumer"))
            .args(["--app", "ok-app", "--stream", "s", flag, value])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: {stderr}");
        assert_ne!(
            out.status.code(),
            Some(101),
            "{flag} {value} panicked: {stderr}"
        );
        assert!(stderr.contains(field), "{flag} {value}: {stderr}");
    }
}

// Issue 10, defect 6: `kcl-consumer ... | head` used to fail the batch, release the shard, take
// it again and fail again, forever. A closed output is fatal: the worker shuts down (releasing
// its leases) and the process exits non-zero, naming the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_cli_stops_when_its_output_pipe_is_closed() {
    let kinesis = kinesis().await;
    let stream = unique("cli-pipe");
    create_stream(&kinesis, &stream, 1).await;
    put_records(&kinesis, &stream, &records("pipe", 0, 20, 4)).await;
    let mut child = Command::new(example_binary("kcl-consumer"))
        .args(["--app", &unique("cli-pipe-app"), "--stream", &stream])
        .args(["--initial-position", "trim-horizon", "--max-records", "5"])
        .args(["--idle-time-between-empty-reads", "500ms"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start kcl-consumer");
    // Read one line, then close the pipe (as `head -1` does) while records keep coming.
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut first)
        .await
        .unwrap();
    assert!(first.contains("pipe-"), "{first}");
    drop(stdout);
    put_records(&kinesis, &stream, &records("more", 0, 20, 4)).await;
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("kcl-consumer exits once its output is closed")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("the output stdout is closed"), "{stderr}");
    assert!(
        stderr.contains("released lease"),
        "the leases were released: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_cli_names_an_output_it_cannot_open() {
    sdk_config().await;
    let out = Command::new(example_binary("kcl-consumer"))
        .args(["--app", "ok-app", "--stream", "s"])
        .args(["--output", "/nonexistent-dir/records.jsonl"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("/nonexistent-dir/records.jsonl"),
        "{stderr}"
    );
}

// Issue 10, defect 5: `kcl-leases` (now `kcl-admin leases`) printed only "lease store Scan
// failed" (or that the table does not exist), never what DynamoDB said. The cause is printed
// with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcl_admin_prints_what_dynamodb_said() {
    sdk_config().await;
    let leases = |table: String| async move {
        Command::new(example_binary("kcl-admin"))
            .args(["--app", &table, "leases", "--observe", "0"])
            .output()
            .await
            .unwrap()
    };

    let missing = unique("no-such-table");
    let out = leases(missing.clone()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "not found: {stderr}");
    assert!(
        stderr.contains(&format!(
            "lease table `{missing}` does not exist: ResourceNotFoundException: "
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("non-existent table"),
        "DynamoDB's message: {stderr}"
    );

    // Too short a name: DynamoDB rejects the request itself, and says why.
    let out = leases("a".to_owned()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "an AWS failure: {stderr}");
    assert!(
        stderr.contains("lease store Scan failed: ValidationException: "),
        "{stderr}"
    );
    // DynamoDB Local's wording; DynamoDB says "Value 'a' at 'tableName' failed to satisfy ...".
    assert!(
        stderr.contains("Invalid table/index name") || stderr.contains("tableName"),
        "DynamoDB's message: {stderr}"
    );
    assert!(stderr.contains("(request id "), "{stderr}");
}

// Issue 10, defect 3: signals and deadlines.

/// A FIFO in a fresh directory of its own.
fn fifo() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("kcl-cli-fifo"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("records.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
    path
}

/// Generous room for a process to act on a signal: an upper bound on a hang, not a speed test.
const PROMPTLY: Duration = Duration::from_secs(10);

/// The records of a batch larger than a pipe holds (64 KiB on Linux), so that writing it to a
/// FIFO nobody reads blocks.
fn big_records(prefix: &str) -> Vec<(String, String)> {
    const RECORDS: usize = 300;
    const PADDING: usize = 1000;
    (0..RECORDS)
        .map(|i| {
            (
                "key".to_owned(),
                format!("{prefix}-{i:04}-{}", "x".repeat(PADDING)),
            )
        })
        .collect()
}

/// Opens the reading end of `fifo` (which waits for the writer) and reads one line: the
/// consumer is then in the middle of writing a batch that the pipe cannot hold, and as the
/// reader reads no more, the write stays blocked while the reader is kept.
async fn read_one_line(fifo: &Path) -> std::io::BufReader<std::fs::File> {
    let fifo = fifo.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(std::fs::File::open(&fifo).unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"shard_id\""), "{line}");
        reader
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_the_output_open_blocks_ends_the_consumer_at_once() {
    let kinesis = kinesis().await;
    let stream = unique("cli-start");
    create_stream(&kinesis, &stream, 2).await;
    let (app, worker) = (unique("cli-start-app"), unique("worker"));
    // A FIFO without a reader: opening it for writing blocks (on a blocking thread) for good.
    let output = fifo();
    let mut command = Command::new(example_binary("kcl-consumer"));
    command
        .args(["--app", &app, "--stream", &stream, "--worker-id", &worker])
        .arg("--output")
        .arg(&output);
    let mut consumer = Logged::start(command);
    consumer.wait_for_log("opening the output").await;
    consumer.signal("TERM");
    let status = consumer
        .exits_within(PROMPTLY, "SIGTERM while opening the output")
        .await;
    assert_eq!(status.code(), Some(0), "{}", consumer.log());
    assert!(
        consumer
            .log()
            .contains("shutdown requested during start-up"),
        "{}",
        consumer.log()
    );
    assert!(!lease_owners(&app).await.contains_key(&worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_the_lease_table_hangs_at_start_up_ends_the_consumer_without_a_lease() {
    let kinesis = kinesis().await;
    let stream = unique("cli-hang");
    create_stream(&kinesis, &stream, 2).await;
    let (app, worker) = (unique("cli-hang-app"), unique("worker"));
    // The table and its leases exist, free to take, but DescribeTable never answers.
    let store = DynamoLeaseStore::new(dynamodb().await, &app);
    store.initialize().await.unwrap();
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        let lease = Lease::new(shard, Checkpoint::TrimHorizon);
        store.create_lease_if_absent(&lease).await.unwrap();
    }
    let dynamodb_url = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap();
    let proxy = FaultProxy::start(&dynamodb_url).await;
    proxy.inject(Rule::on("DescribeTable", Fault::Hang));
    let dir = std::env::temp_dir().join(unique("kcl-cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = Command::new(example_binary("kcl-consumer"));
    command
        .args(["--app", &app, "--stream", &stream, "--worker-id", &worker])
        .args(["--initial-position", "trim-horizon"])
        .arg("--output")
        .arg(dir.join("records.jsonl"))
        .env("AWS_ENDPOINT_URL_DYNAMODB", proxy.url());
    let mut consumer = Logged::start(command);
    wait_for("DescribeTable to hang", PATIENCE, || async {
        proxy.faults().get("DescribeTable").copied().unwrap_or(0) > 0
    })
    .await;
    consumer.signal("TERM");
    let status = consumer
        .exits_within(PROMPTLY, "SIGTERM while the lease table hangs")
        .await;
    assert_eq!(status.code(), Some(0), "{}", consumer.log());
    assert!(
        consumer.log().contains("worker stopped before it started"),
        "{}",
        consumer.log()
    );
    assert_eq!(lease_owners(&app).await, BTreeMap::new(), "no lease taken");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_a_slow_shutdown_at_once() {
    let kinesis = kinesis().await;
    let stream = unique("cli-second");
    create_stream(&kinesis, &stream, 1).await;
    put_records(&kinesis, &stream, &big_records("second")).await;
    let output = fifo();
    let mut command = Command::new(example_binary("kcl-consumer"));
    command
        .args(["--app", &unique("cli-second-app"), "--stream", &stream])
        .args(["--initial-position", "trim-horizon"])
        // The processor stuck in its write is waited for this long.
        .args(["--shutdown-timeout", "10m"])
        .arg("--output")
        .arg(&output);
    let mut consumer = Logged::start(command);
    let _reader = read_one_line(&output).await;
    consumer.signal("TERM");
    consumer.wait_for_log("SIGTERM: shutting down").await;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), consumer.child.wait())
            .await
            .is_err(),
        "the shutdown waits for the processor stuck in its write"
    );
    consumer.signal("INT");
    let status = consumer.exits_within(PROMPTLY, "a second signal").await;
    assert_eq!(status.code(), Some(130), "{}", consumer.log());
    assert!(
        consumer
            .log()
            .contains("second signal (SIGINT): exiting at once"),
        "{}",
        consumer.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stuck_on_its_output_ends_at_the_deadline() {
    let kinesis = kinesis().await;
    let stream = unique("cli-deadline");
    create_stream(&kinesis, &stream, 1).await;
    put_records(&kinesis, &stream, &big_records("deadline")).await;
    let (app, worker) = (unique("cli-deadline-app"), unique("worker"));
    let output = fifo();
    let mut command = Command::new(example_binary("kcl-consumer"));
    command
        .args(["--app", &app, "--stream", &stream, "--worker-id", &worker])
        .args(["--initial-position", "trim-horizon"])
        .args(["--shutdown-timeout", "2s", "--lease-duration", "4s"])
        .args(["--renewal-interval", "1s", "--lease-request-timeout", "1s"])
        .arg("--output")
        .arg(&output);
    let deadline = WorkerConfig::new(&app, &stream)
        .with_shutdown_timeout(Duration::from_secs(2))
        .with_lease(
            LeaseConfig::default()
                .with_lease_duration(Duration::from_secs(4))
                .with_renewal_interval(Duration::from_secs(1))
                .with_request_timeout(Duration::from_secs(1)),
        )
        .shutdown_deadline();
    let mut consumer = Logged::start(command);
    let _reader = read_one_line(&output).await;
    consumer.signal("TERM");
    // The processor stuck in its write is aborted after the shutdown timeout and its lease
    // released; then the final flush of the output waits for that write, which never ends.
    let status = consumer
        .exits_within(deadline + PROMPTLY, "a shutdown stuck on its output")
        .await;
    let log = consumer.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("the shutdown did not finish within its deadline"),
        "{log}"
    );
    assert!(log.contains("released lease"), "{log}");
    assert!(!lease_owners(&app).await.contains_key(&worker));
}
