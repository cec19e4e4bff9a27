//! The example CLIs as processes: `kcl-consumer` consumes a stream written by another client,
//! shuts down on SIGTERM with exit code 0, and a restart continues after its checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kcl_integration_tests::{
    PATIENCE, create_stream, example_binary, kinesis, put_records, puts_by_shard, records,
    sdk_config, unique, wait_for,
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

async fn sigterm(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap()
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

// Issue 10, defect 5: `kcl-leases` printed only "lease store Scan failed" (or that the table
// does not exist), never what DynamoDB said. The cause is printed with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcl_leases_prints_what_dynamodb_said() {
    sdk_config().await;
    let leases = |table: String| async move {
        Command::new(example_binary("kcl-leases"))
            .args(["--app", &table])
            .output()
            .await
            .unwrap()
    };

    let missing = unique("no-such-table");
    let out = leases(missing.clone()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
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
    assert!(!out.status.success(), "{stderr}");
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
