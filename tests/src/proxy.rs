//! A fault-injecting HTTP proxy between the AWS SDK and a local server.
//!
//! Requests are forwarded unchanged (the local servers accept any SigV4 signature, so the
//! signed `Host` of the proxy does not matter). Rules match the operation (the `X-Amz-Target`
//! header, e.g. `UpdateItem`) and answer with an AWS error (throttling, 500), delay the
//! request or its answer, hold it without ever answering, drop the connection, forward it and
//! drop the answer, break off or silence a streamed answer (an event stream) after a while, or
//! fail some entries of a `PutRecords` call (a partial failure). The proxy also counts
//! requests per operation, which the benchmarks use to report DynamoDB requests per lease.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the proxy does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer at once with this status and AWS error code, without forwarding.
    Error {
        /// HTTP status, e.g. 400 for throttling, 500 for an internal error.
        status: u16,
        /// AWS error code, e.g. `ThrottlingException`, `InternalServerError`.
        code: &'static str,
    },
    /// Wait, then forward.
    Delay(Duration),
    /// Forward (the request takes effect), then wait before answering: a call that is slow
    /// to acknowledge, so a client killed meanwhile never learns that it succeeded.
    DelayAnswer(Duration),
    /// Never forward nor answer: the request hangs (until the proxy stops), as one stuck on a
    /// dead pooled connection. Only the client's own timeout ends it.
    Hang,
    /// Close the connection without an answer.
    DropConnection,
    /// Forward the request (it takes effect), then close the connection without the answer.
    DropAnswer,
    /// Forward, pass the answer on as it streams for this long, then break it off (the
    /// connection is reset mid-answer): a `SubscribeToShard` event stream that fails.
    CutAfter(Duration),
    /// Forward, pass the answer on as it streams for this long, then pass nothing more while
    /// keeping the connection open: an event stream gone silent.
    SilenceAfter(Duration),
    /// A `PutRecords` partial failure: forward the call without every `every`-th entry (the
    /// `every`-th, the `2 × every`-th, …), and answer for those entries
    /// `ProvisionedThroughputExceededException`, in place, with `FailedRecordCount` counting
    /// them, as Kinesis does when a shard is over its limit. The entries failed are recorded
    /// ([`FaultProxy::failed_entries`]). The SDK speaks JSON (`application/x-amz-json-1.1`)
    /// for `PutRecords`, and so does kinesis-mock.
    FailSomePutRecords {
        /// Fail every `every`-th entry of each call (1: all of them).
        every: usize,
    },
}

impl Fault {
    /// DynamoDB or Kinesis throttling (`400 ThrottlingException`).
    pub const THROTTLING: Fault = Fault::Error {
        status: 400,
        code: "ThrottlingException",
    };
    /// DynamoDB `ProvisionedThroughputExceededException` (400).
    pub const THROUGHPUT_EXCEEDED: Fault = Fault::Error {
        status: 400,
        code: "ProvisionedThroughputExceededException",
    };
    /// An internal server error (500).
    pub const INTERNAL_ERROR: Fault = Fault::Error {
        status: 500,
        code: "InternalServerError",
    };
}

/// When a fault applies.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Operation name the `X-Amz-Target` header ends with (`None`: every request).
    pub operation: Option<String>,
    /// What to do.
    pub fault: Fault,
    /// Apply to this many matching requests, then stop (`None`: until cleared).
    pub times: Option<usize>,
    /// Apply to every `every`-th matching request only (1: all).
    pub every: usize,
}

impl Rule {
    /// `fault` for every request of `operation`, until cleared.
    pub fn on(operation: &str, fault: Fault) -> Self {
        Rule {
            operation: Some(operation.to_owned()),
            fault,
            times: None,
            every: 1,
        }
    }
    /// `fault` for every request, until cleared.
    pub fn all(fault: Fault) -> Self {
        Rule {
            operation: None,
            fault,
            times: None,
            every: 1,
        }
    }
    /// Only the next `n` matching requests.
    #[must_use]
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }
    /// Only every `n`-th matching request.
    #[must_use]
    pub fn every(mut self, n: usize) -> Self {
        self.every = n.max(1);
        self
    }
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<(Rule, usize)>,
    requests: BTreeMap<String, usize>,
    faults: BTreeMap<String, usize>,
    /// Entries failed by [`Fault::FailSomePutRecords`]: (partition key, data).
    failed_entries: Vec<(String, Vec<u8>)>,
}

/// A running proxy; stopped when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn operation_of(request: &Request<Incoming>) -> String {
    request
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("unknown")
        .to_owned()
}

/// An answer's body: a whole one, or the upstream's streamed through as it comes (a
/// `SubscribeToShard` event stream never ends on its own).
type ProxyBody = BoxBody<Bytes, BoxError>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn whole(body: Bytes) -> ProxyBody {
    Full::new(body).map_err(|never| match never {}).boxed()
}

/// The upstream's answer passed on for `for_how_long`, then broken off (`silence`: then held
/// open without another byte until the proxy stops or the client goes).
fn cut_short(
    body: Incoming,
    for_how_long: Duration,
    silence: bool,
    stop: CancellationToken,
) -> ProxyBody {
    let deadline = tokio::time::sleep(for_how_long);
    let passed = body
        .into_data_stream()
        .map_err(|e| -> BoxError { Box::new(e) })
        .take_until(deadline);
    let after = futures::stream::once(async move {
        if silence {
            stop.cancelled().await;
        }
        Err::<Bytes, BoxError>(Box::new(dropped("answer cut by the test proxy")))
    });
    BodyExt::boxed(StreamBody::new(passed.chain(after).map_ok(Frame::data)))
}

fn aws_error(status: u16, code: &str) -> Response<ProxyBody> {
    let body = format!(r#"{{"__type":"{code}","message":"injected by the test proxy"}}"#);
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amzn-errortype", code)
        .body(whole(Bytes::from(body)))
        .expect("valid response")
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let upstream: hyper::Uri = upstream.parse().expect("upstream URL");
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let (task_state, task_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (socket, _) = tokio::select! {
                    _ = task_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (state, client, upstream, stop) = (
                    task_state.clone(),
                    client.clone(),
                    upstream.clone(),
                    task_stop.clone(),
                );
                let service = service_fn(move |request: Request<Incoming>| {
                    let (state, client, upstream, stop) = (
                        state.clone(),
                        client.clone(),
                        upstream.clone(),
                        stop.clone(),
                    );
                    handle(request, state, client, upstream, stop)
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        FaultProxy { addr, state, stop }
    }

    /// The proxy's URL, to use as the SDK's endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a rule (rules are tried in the order they were added).
    pub fn inject(&self, rule: Rule) {
        self.state.lock().unwrap().rules.push((rule, 0));
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Requests seen, by operation.
    pub fn requests(&self) -> BTreeMap<String, usize> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Faults injected, by operation.
    pub fn faults(&self) -> BTreeMap<String, usize> {
        self.state.lock().unwrap().faults.clone()
    }

    /// The `PutRecords` entries failed by [`Fault::FailSomePutRecords`], in the order failed,
    /// as (partition key, data).
    pub fn failed_entries(&self) -> Vec<(String, Vec<u8>)> {
        self.state.lock().unwrap().failed_entries.clone()
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        let mut state = self.state.lock().unwrap();
        state.requests.clear();
        state.faults.clear();
    }
}

/// The fault for a request of `operation`, if a rule applies (and counts it).
fn fault_for(state: &Mutex<State>, operation: &str) -> Option<Fault> {
    let mut state = state.lock().unwrap();
    *state.requests.entry(operation.to_owned()).or_default() += 1;
    let mut chosen = None;
    for (rule, seen) in state.rules.iter_mut() {
        if rule.operation.as_deref().is_some_and(|o| o != operation) {
            continue;
        }
        if rule.times == Some(0) {
            continue;
        }
        *seen += 1;
        if *seen % rule.every != 0 {
            continue;
        }
        if let Some(times) = &mut rule.times {
            *times -= 1;
        }
        chosen = Some(rule.fault.clone());
        break;
    }
    if chosen.is_some() {
        *state.faults.entry(operation.to_owned()).or_default() += 1;
    }
    chosen
}

/// Why the proxy closes a connection without an answer.
#[derive(Debug)]
struct Dropped(String);

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Dropped {}

fn dropped(why: impl std::fmt::Display) -> Dropped {
    Dropped(why.to_string())
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<Mutex<State>>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: hyper::Uri,
    stop: CancellationToken,
) -> Result<Response<ProxyBody>, Dropped> {
    let operation = operation_of(&request);
    let fault = fault_for(&state, &operation);
    match &fault {
        Some(Fault::Error { status, code }) => return Ok(aws_error(*status, code)),
        Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
        Some(Fault::Hang) => {
            stop.cancelled().await;
            return Err(dropped("the test proxy stopped"));
        }
        Some(Fault::DropConnection) => return Err(dropped("connection dropped by the test proxy")),
        Some(
            Fault::DropAnswer
            | Fault::DelayAnswer(_)
            | Fault::CutAfter(_)
            | Fault::SilenceAfter(_)
            | Fault::FailSomePutRecords { .. },
        )
        | None => {}
    }
    let (mut parts, body) = request.into_parts();
    let mut body = body.collect().await.map_err(dropped)?.to_bytes();
    let mut failed_at = Vec::new();
    if let Some(Fault::FailSomePutRecords { every }) = fault {
        let (kept, failed) = remove_entries(&body, every).map_err(dropped)?;
        failed_at = failed.iter().map(|(i, _, _)| *i).collect();
        state
            .lock()
            .unwrap()
            .failed_entries
            .extend(failed.into_iter().map(|(_, key, data)| (key, data)));
        let Some(kept) = kept else {
            // Every entry fails: nothing to forward.
            return Ok(put_records_answer(&[], &failed_at));
        };
        body = kept;
        parts
            .headers
            .insert(hyper::header::CONTENT_LENGTH, body.len().into());
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = format!(
        "{}://{}{}",
        upstream.scheme_str().unwrap_or("http"),
        upstream.authority().expect("upstream authority"),
        path
    )
    .parse()
    .map_err(dropped)?;
    let answer = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(dropped)?;
    match fault {
        Some(Fault::DropAnswer) => Err(dropped("answer dropped by the test proxy")),
        Some(Fault::DelayAnswer(d)) => {
            tokio::time::sleep(d).await;
            Ok(answer.map(|body| body.map_err(|e| -> BoxError { Box::new(e) }).boxed()))
        }
        Some(Fault::CutAfter(d)) => Ok(answer.map(|body| cut_short(body, d, false, stop))),
        Some(Fault::SilenceAfter(d)) => Ok(answer.map(|body| cut_short(body, d, true, stop))),
        Some(Fault::FailSomePutRecords { .. }) if answer.status() == StatusCode::OK => {
            let body = answer
                .into_body()
                .collect()
                .await
                .map_err(dropped)?
                .to_bytes();
            let answer: serde_json::Value = serde_json::from_slice(&body).map_err(dropped)?;
            let records = answer["Records"].as_array().cloned().unwrap_or_default();
            Ok(put_records_answer(&records, &failed_at))
        }
        _ => Ok(answer.map(|body| body.map_err(|e| -> BoxError { Box::new(e) }).boxed())),
    }
}

/// A `PutRecords` request without every `every`-th entry (`None` when none is left), and the
/// entries taken out: (index, partition key, data).
#[allow(clippy::type_complexity)]
fn remove_entries(
    body: &[u8],
    every: usize,
) -> Result<(Option<Bytes>, Vec<(usize, String, Vec<u8>)>), String> {
    use base64::Engine as _;
    let mut request: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("PutRecords request: {e}"))?;
    let records = request["Records"]
        .as_array_mut()
        .ok_or("PutRecords request without Records")?;
    let mut kept = Vec::new();
    let mut failed = Vec::new();
    for (i, record) in std::mem::take(records).into_iter().enumerate() {
        if (i + 1) % every.max(1) == 0 {
            let key = record["PartitionKey"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let data = base64::engine::general_purpose::STANDARD
                .decode(record["Data"].as_str().unwrap_or_default())
                .map_err(|e| format!("PutRecords entry data: {e}"))?;
            failed.push((i, key, data));
        } else {
            kept.push(record);
        }
    }
    if kept.is_empty() {
        return Ok((None, failed));
    }
    *records = kept;
    let body = serde_json::to_vec(&request).expect("JSON serializes");
    Ok((Some(Bytes::from(body)), failed))
}

/// A `PutRecords` answer: the upstream's results `put`, with a throughput error inserted at
/// each index of `failed_at`.
fn put_records_answer(put: &[serde_json::Value], failed_at: &[usize]) -> Response<ProxyBody> {
    let total = put.len() + failed_at.len();
    let mut put = put.iter();
    let mut records = Vec::with_capacity(total);
    let mut failed = 0;
    for i in 0..total {
        if failed_at.contains(&i) {
            records.push(serde_json::json!({
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": "Rate exceeded for shard (injected by the test proxy)",
            }));
        } else if let Some(record) = put.next() {
            if record.get("ErrorCode").is_some() {
                failed += 1;
            }
            records.push(record.clone());
        }
    }
    failed += failed_at.len();
    let body = serde_json::json!({ "FailedRecordCount": failed, "Records": records });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-amz-json-1.1")
        .body(whole(Bytes::from(body.to_string())))
        .expect("valid response")
}
