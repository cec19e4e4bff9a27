//! `kcl-consumer --metrics-addr` as a process against kinesis-mock and DynamoDB Local: the
//! Prometheus endpoint is scraped while records flow (the lag falls to zero as the consumer
//! catches up), the health checks answer, a progress line is logged, and `/readyz` fails
//! while the lease table is unreachable (through the fault proxy) and recovers after.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kcl_integration_tests::process::{Logged, sigterm};
use kcl_integration_tests::proxy::{Fault, FaultProxy, Rule};
use kcl_integration_tests::{
    PATIENCE, create_stream, example_binary, kinesis, put_records, records, sdk_config, unique,
    wait_for,
};
use tokio::process::Command;

/// `GET http://ADDR/PATH`: status and body, or `None` when nothing answers.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = format!("http://{addr}{path}").parse().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .ok()?
        .ok()?;
    let status = answer.status().as_u16();
    let body = answer.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The samples of metric `name` (a Prometheus name, dots as underscores; a counter's `_total`
/// suffix accepted): labels as written, and value.
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let metric = metric.strip_suffix("_total").unwrap_or(metric);
            if metric != name {
                return None;
            }
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn sum(text: &str, name: &str) -> f64 {
    samples(text, name).iter().map(|(_, v)| v).sum()
}

/// A free loopback port, for the consumer to bind.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Starts `kcl-consumer` serving metrics on `addr`; its stderr lines are collected.
async fn consumer(
    app: &str,
    stream: &str,
    addr: &str,
    output: &Path,
    extra: &[&str],
    env: &[(&str, String)],
) -> Logged {
    sdk_config().await; // fails loudly without the local servers
    let mut command = Command::new(example_binary("kcl-consumer"));
    command
        .args(["--app", app, "--stream", stream])
        .args(["--initial-position", "trim-horizon"])
        .args(["--metrics-addr", addr])
        .args(extra)
        .arg("--output")
        .arg(output)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    Logged::start(command)
}

/// What one scrape showed of the per-shard lag, by shard.
fn shard_lags(text: &str) -> BTreeMap<String, f64> {
    samples(text, "aws_kinesis_client_consumer_lag_duration")
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_endpoint_reports_progress_while_records_flow() {
    sdk_config().await;
    let kinesis = kinesis().await;
    let stream = unique("metrics");
    create_stream(&kinesis, &stream, 2).await;
    // Two groups 3 s apart: while the consumer reads the first, it is about 3 s behind.
    let first = records("m", 0, 1_000, 20);
    let second = records("m", 1_000, 1_000, 20);
    put_records(&kinesis, &stream, &first).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    put_records(&kinesis, &stream, &second).await;
    let total = (first.len() + second.len()) as f64;

    let app = unique("metrics-app");
    let addr = free_address();
    let dir = std::env::temp_dir().join(unique("metrics-out"));
    let consumer = consumer(
        &app,
        &stream,
        &addr,
        &dir,
        &[
            "--per-shard-metrics",
            // Small pages: the catching up takes seconds, for the scrapes to see it.
            "--max-records",
            "20",
            "--taker-interval",
            "500ms",
            "--summary-interval",
            "1s",
        ],
        &[],
    )
    .await;

    wait_for("/healthz to answer 200", PATIENCE, || async {
        get(&addr, "/healthz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    wait_for("/readyz to answer 200", PATIENCE, || async {
        get(&addr, "/readyz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;

    // Scrape until every record is processed and every lag is zero, noting the largest lag
    // seen on the way.
    let mut largest_lag = 0.0_f64;
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    let last = loop {
        let (status, text) = get(&addr, "/metrics").await.expect("/metrics answers");
        assert_eq!(status, 200, "{text}");
        let lags = shard_lags(&text);
        largest_lag = lags.values().copied().fold(largest_lag, f64::max);
        let done = sum(&text, "aws_kinesis_client_records_processed") >= total
            && lags.len() == 2
            && lags.values().all(|lag| *lag == 0.0)
            && sum(&text, "aws_kinesis_client_consumer_lag_max_duration") == 0.0;
        if done {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not caught up; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        largest_lag >= 1_000.0,
        "the lag never showed the 3 s between the groups: {largest_lag} ms"
    );

    // Every record counted once, its bytes too; the fleet and lease metrics as they are.
    assert_eq!(sum(&last, "aws_kinesis_client_records_processed"), total);
    let bytes: usize = first.iter().chain(&second).map(|(_, d)| d.len()).sum();
    assert_eq!(sum(&last, "aws_kinesis_client_records_size"), bytes as f64);
    let per_shard = samples(&last, "aws_kinesis_client_records_processed");
    assert_eq!(per_shard.len(), 2, "one series per shard: {per_shard:?}");
    assert!(
        per_shard.iter().all(
            |(labels, _)| labels.contains("aws_kinesis_shard_id=\"shardId-")
                && labels.contains(&format!("aws_kinesis_stream_name=\"{stream}\""))
                && labels.contains(&format!("application=\"{app}\""))
        ),
        "{per_shard:?}"
    );
    assert_eq!(sum(&last, "aws_kinesis_client_current_leases"), 2.0);
    assert_eq!(sum(&last, "aws_kinesis_client_total_leases"), 2.0);
    assert_eq!(sum(&last, "aws_kinesis_client_workers"), 1.0);
    let taken = samples(&last, "aws_kinesis_client_taken_leases");
    assert_eq!(taken.iter().map(|(_, v)| v).sum::<f64>(), 2.0, "{taken:?}");
    assert!(
        taken
            .iter()
            .all(|(labels, _)| labels.contains("reason=\"unowned\"")),
        "{taken:?}"
    );
    assert_eq!(sum(&last, "aws_kinesis_client_lost_leases"), 0.0);
    assert_eq!(sum(&last, "aws_kinesis_client_checkpoint_failures"), 0.0);
    // The lease table: renewals and checkpoints are UpdateItems, and DynamoDB Local reports
    // the capacity they consumed.
    let updates_ok = samples(&last, "aws_kinesis_client_lease_table_calls")
        .into_iter()
        .filter(|(l, _)| {
            l.contains("aws_kinesis_operation=\"UpdateItem\"") && l.contains("outcome=\"ok\"")
        })
        .map(|(_, v)| v)
        .sum::<f64>();
    assert!(updates_ok >= 2.0, "{last}");
    let scans_ok = samples(&last, "aws_kinesis_client_lease_table_calls")
        .into_iter()
        .any(|(l, v)| l.contains("aws_kinesis_operation=\"Scan\"") && v > 0.0);
    assert!(scans_ok, "{last}");
    let write_units = samples(&last, "aws_kinesis_client_lease_table_consumed_write_units");
    assert!(
        write_units
            .iter()
            .any(|(l, v)| l.contains("UpdateItem") && *v >= updates_ok),
        "at least one write unit per successful UpdateItem: {write_units:?}"
    );
    let read_units = sum(&last, "aws_kinesis_client_lease_table_consumed_read_units");
    assert!(read_units > 0.0, "{last}");
    // process_records timings: a summary (quantiles) with a count of the batches.
    assert!(
        last.lines()
            .any(|l| l
                .starts_with("aws_kinesis_client_record_processor_process_records_duration_count")),
        "{last}"
    );
    assert!(
        last.contains("# HELP aws_kinesis_client_records_processed"),
        "{last}"
    );

    let log = consumer.log();
    let status = sigterm(consumer.child).await;
    assert!(status.success(), "{status:?}");
    let progress: Vec<&str> = log.lines().filter(|l| l.contains("progress:")).collect();
    assert!(
        progress.iter().any(|l| l.contains("records/s")
            && l.contains("max lag 0 ms")
            && l.contains("2 leases held of 2 in the table, 1 workers")),
        "{progress:#?}"
    );
    let _ = std::fs::remove_file(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_fails_while_the_lease_table_is_unreachable_and_recovers() {
    sdk_config().await;
    let kinesis = kinesis().await;
    let stream = unique("ready");
    create_stream(&kinesis, &stream, 1).await;
    let dynamodb = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").expect("DynamoDB Local");
    let proxy = FaultProxy::start(&dynamodb).await;
    let app = unique("ready-app");
    let addr = free_address();
    let dir = std::env::temp_dir().join(unique("ready-out"));
    let consumer = consumer(
        &app,
        &stream,
        &addr,
        &dir,
        &[
            "--lease-duration",
            "4s",
            "--renewal-interval",
            "1s",
            "--lease-request-timeout",
            "1s",
            "--taker-interval",
            "500ms",
        ],
        &[("AWS_ENDPOINT_URL_DYNAMODB", proxy.url())],
    )
    .await;
    wait_for("/readyz to answer 200", PATIENCE, || async {
        get(&addr, "/readyz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;

    proxy.inject(Rule::all(Fault::DropConnection));
    let not_ready = Arc::new(Mutex::new(String::new()));
    wait_for("/readyz to answer 503", PATIENCE, || {
        let not_ready = not_ready.clone();
        let addr = addr.clone();
        async move {
            match get(&addr, "/readyz").await {
                Some((503, body)) => {
                    *not_ready.lock().unwrap() = body;
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    let body = not_ready.lock().unwrap().clone();
    assert!(
        body.contains("the lease table has not answered for"),
        "{body}"
    );
    // The process itself is up all along.
    assert_eq!(get(&addr, "/healthz").await.map(|(s, _)| s), Some(200));

    proxy.clear();
    wait_for("/readyz to answer 200 again", PATIENCE, || async {
        get(&addr, "/readyz").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    let status = sigterm(consumer.child).await;
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(&dir);
}
