//! `PutRecords` with retries: a batch is sent until every entry is in.
//!
//! Entries the answer marks failed (`ProvisionedThroughputExceededException`,
//! `InternalFailure`) are sent again, alone and in their original order, before any newer
//! line (the caller sends one batch at a time); a whole call that is throttled, fails with a
//! 5xx, times out or does not connect is sent again too. Delays are exponential with jitter
//! (backon): 100 ms doubling up to 5 s while nothing gets in, back to 100 ms after a call that
//! put some entries. Everything else (no such stream, access denied, an invalid request) ends
//! the agent. This module is the one place that decides what is retried; the SDK's own retries
//! are turned off so that the counts it reports are the calls made.

use std::future::Future;
use std::time::Duration;

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::put_records::PutRecordsError;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use backon::BackoffBuilder as _;
use kcl_core::{AwsSdkError, BoxError, ErrorChain};
use tracing::{debug, warn};

use super::Error;
use super::batch::{Batch, Entry};

/// The first delay before a retry, and the longest.
const MIN_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// What a `PutRecords` answer says of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    /// Put.
    Put,
    /// Not put.
    Failed {
        /// `ProvisionedThroughputExceededException`, `InternalFailure`, or a KMS error.
        code: String,
        /// What the service said.
        message: String,
    },
}

/// Whether a failed call may succeed if made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Throttled: the shard or the account is over its limits for now.
    Throttled,
    /// A 5xx, a timeout, a connection that failed.
    Transient,
    /// Will fail again: no such stream, access denied, an invalid request.
    Never,
}

/// A `PutRecords` call that failed as a whole.
#[derive(Debug)]
pub struct CallError {
    /// Whether to retry.
    pub retry: Retry,
    /// Why it failed.
    pub source: BoxError,
}

/// The one call the agent makes: the seam that tests replace.
pub trait PutRecords {
    /// Puts `entries`; the answer has one result per entry, in order.
    fn put_records(
        &self,
        entries: &[Entry],
    ) -> impl Future<Output = Result<Vec<EntryResult>, CallError>> + Send;
}

/// `PutRecords` on a Kinesis stream, given by name or ARN.
#[derive(Debug, Clone)]
pub struct KinesisPutRecords {
    client: aws_sdk_kinesis::Client,
    stream: String,
}

impl KinesisPutRecords {
    /// Puts into `stream` (a name, or an ARN starting with `arn:`) with `client`.
    pub fn new(client: aws_sdk_kinesis::Client, stream: impl Into<String>) -> Self {
        KinesisPutRecords {
            client,
            stream: stream.into(),
        }
    }
}

impl PutRecords for KinesisPutRecords {
    async fn put_records(&self, entries: &[Entry]) -> Result<Vec<EntryResult>, CallError> {
        let records = entries
            .iter()
            .map(|e| {
                PutRecordsRequestEntry::builder()
                    .partition_key(&e.key)
                    .data(Blob::new(e.data.to_vec()))
                    .build()
                    .expect("partition key and data are set")
            })
            .collect();
        let request = self.client.put_records().set_records(Some(records));
        let request = if self.stream.starts_with("arn:") {
            request.stream_arn(&self.stream)
        } else {
            request.stream_name(&self.stream)
        };
        let output = request.send().await.map_err(classify)?;
        Ok(output
            .records()
            .iter()
            .map(|r| match r.error_code() {
                None => EntryResult::Put,
                Some(code) => EntryResult::Failed {
                    code: code.to_owned(),
                    message: r.error_message().unwrap_or_default().to_owned(),
                },
            })
            .collect())
    }
}

/// Whether a whole call is retried.
pub fn classify(err: SdkError<PutRecordsError>) -> CallError {
    let status = err.raw_response().map(|r| r.status().as_u16());
    let retry = match (&err, err.code()) {
        (
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_),
            _,
        ) => Retry::Transient,
        (
            _,
            Some(
                "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "KMSThrottlingException"
                | "ThrottlingException",
            ),
        ) => Retry::Throttled,
        (_, Some("InternalFailure" | "InternalFailureException" | "ServiceUnavailable")) => {
            Retry::Transient
        }
        _ if status.is_some_and(|s| s >= 500) => Retry::Transient,
        _ => Retry::Never,
    };
    CallError {
        retry,
        source: Box::new(AwsSdkError::new(err)),
    }
}

/// Whether an entry that failed with `code` is sent again. The documented codes are
/// `ProvisionedThroughputExceededException` and `InternalFailure`; a KMS error other than
/// throttling (a disabled or inaccessible key) would fail every time.
pub fn entry_is_retried(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException" | "InternalFailure" | "KMSThrottlingException"
    )
}

/// Sends batches, one at a time, until each is entirely in.
#[derive(Debug)]
pub struct Sender<P> {
    client: P,
    stream: String,
    jitter_seed: u64,
    /// `PutRecords` calls made.
    pub put_calls: u64,
    /// Entries sent again (after a failed entry or a failed call).
    pub entries_retried: u64,
}

impl<P: PutRecords> Sender<P> {
    /// A sender to `stream` (for messages) through `client`.
    pub fn new(client: P, stream: impl Into<String>) -> Self {
        Sender {
            client,
            stream: stream.into(),
            jitter_seed: uuid::Uuid::new_v4().as_u64_pair().0,
            put_calls: 0,
            entries_retried: 0,
        }
    }

    /// The same, with a fixed jitter seed (tests).
    #[must_use]
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = seed;
        self
    }

    fn backoff(&mut self) -> backon::ExponentialBackoff {
        self.jitter_seed = self.jitter_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        backon::ExponentialBuilder::new()
            .with_min_delay(MIN_DELAY)
            .with_max_delay(MAX_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .with_jitter_seed(self.jitter_seed)
            .without_max_times()
            .build()
    }

    /// Sends `batch` until every entry is put.
    ///
    /// # Errors
    /// A call or an entry failing in a way that is not retried.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the batch: a call in flight may or may not have put its
    /// entries. Nothing is recorded here, so the caller re-sends the batch (or, after a
    /// restart, the state file makes the agent read its lines again): at least once.
    pub async fn send(&mut self, batch: &Batch) -> Result<(), Error> {
        let mut pending: Vec<&Entry> = batch.entries.iter().collect();
        let mut backoff = self.backoff();
        loop {
            let entries: Vec<Entry> = pending.iter().map(|e| (*e).clone()).collect();
            self.put_calls += 1;
            let (failed, progressed) = match self.client.put_records(&entries).await {
                Ok(results) => {
                    if results.len() != entries.len() {
                        return Err(Error::MalformedAnswer {
                            stream: self.stream.clone(),
                            sent: entries.len(),
                            answered: results.len(),
                        });
                    }
                    let mut failed = Vec::new();
                    let mut first_code = None;
                    for (entry, result) in pending.iter().zip(results) {
                        if let EntryResult::Failed { code, message } = result {
                            if !entry_is_retried(&code) {
                                return Err(Error::EntryRejected {
                                    stream: self.stream.clone(),
                                    code,
                                    message,
                                });
                            }
                            first_code.get_or_insert(code);
                            failed.push(*entry);
                        }
                    }
                    if failed.is_empty() {
                        debug!(entries = entries.len(), "PutRecords: all in");
                        return Ok(());
                    }
                    warn!(
                        failed = failed.len(),
                        of = entries.len(),
                        code = first_code.unwrap_or_default(),
                        "PutRecords: entries failed; sending them again, before newer lines"
                    );
                    let progressed = failed.len() < pending.len();
                    (failed, progressed)
                }
                Err(CallError {
                    retry: Retry::Never,
                    source,
                }) => {
                    return Err(Error::Put {
                        stream: self.stream.clone(),
                        source,
                    });
                }
                Err(CallError { retry, source }) => {
                    warn!(
                        ?retry,
                        entries = entries.len(),
                        error = %ErrorChain(source.as_ref()),
                        "PutRecords failed; sending it again"
                    );
                    (pending, false)
                }
            };
            if progressed {
                backoff = self.backoff();
            }
            let delay = backoff.next().unwrap_or(MAX_DELAY);
            self.entries_retried += failed.len() as u64;
            tokio::time::sleep(delay).await;
            pending = failed;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;

    /// Answers from a script; records what it was sent.
    #[derive(Debug, Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Result<Vec<EntryResult>, CallError>>>,
        calls: Mutex<Vec<Vec<String>>>,
    }

    impl PutRecords for &Scripted {
        async fn put_records(&self, entries: &[Entry]) -> Result<Vec<EntryResult>, CallError> {
            self.calls.lock().unwrap().push(
                entries
                    .iter()
                    .map(|e| String::from_utf8(e.data.to_vec()).unwrap())
                    .collect(),
            );
            self.answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| Ok(vec![EntryResult::Put; entries.len()]))
        }
    }

    fn batch(lines: &[&str]) -> Batch {
        Batch {
            entries: lines
                .iter()
                .map(|l| Entry {
                    key: "k".into(),
                    data: Bytes::copy_from_slice(l.as_bytes()),
                })
                .collect(),
            ..Batch::default()
        }
    }

    fn throttled() -> EntryResult {
        EntryResult::Failed {
            code: "ProvisionedThroughputExceededException".into(),
            message: "Rate exceeded".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_entries_are_sent_again_in_order() {
        let put = EntryResult::Put;
        let script = Scripted::default();
        script.answers.lock().unwrap().extend([
            Ok(vec![
                put.clone(),
                throttled(),
                put.clone(),
                throttled(),
                throttled(),
            ]),
            Ok(vec![put.clone(), throttled(), put.clone()]),
        ]);
        let mut sender = Sender::new(&script, "s").with_jitter_seed(1);
        sender
            .send(&batch(&["a", "b", "c", "d", "e"]))
            .await
            .unwrap();
        assert_eq!(
            *script.calls.lock().unwrap(),
            [
                vec!["a", "b", "c", "d", "e"],
                vec!["b", "d", "e"],
                vec!["d"]
            ]
        );
        assert_eq!((sender.put_calls, sender.entries_retried), (3, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_calls_are_retried_with_growing_delays() {
        let script = Scripted::default();
        for _ in 0..4 {
            script.answers.lock().unwrap().push_back(Err(CallError {
                retry: Retry::Transient,
                source: "connection reset".into(),
            }));
        }
        let mut sender = Sender::new(&script, "s").with_jitter_seed(1);
        let started = tokio::time::Instant::now();
        sender.send(&batch(&["a", "b"])).await.unwrap();
        // 100 + 200 + 400 + 800 ms, each plus up to as much jitter.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(1500), "{waited:?}");
        assert!(waited <= Duration::from_millis(3000), "{waited:?}");
        assert_eq!((sender.put_calls, sender.entries_retried), (5, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_not_retried_ends_the_send() {
        let script = Scripted::default();
        script.answers.lock().unwrap().push_back(Err(CallError {
            retry: Retry::Never,
            source: "ResourceNotFoundException".into(),
        }));
        let mut sender = Sender::new(&script, "s");
        let err = sender.send(&batch(&["a"])).await.unwrap_err();
        assert!(matches!(err, Error::Put { .. }), "{err}");

        script
            .answers
            .lock()
            .unwrap()
            .push_back(Ok(vec![EntryResult::Failed {
                code: "KMSAccessDeniedException".into(),
                message: "no".into(),
            }]));
        let err = sender.send(&batch(&["a"])).await.unwrap_err();
        assert!(matches!(err, Error::EntryRejected { .. }), "{err}");

        script.answers.lock().unwrap().push_back(Ok(vec![]));
        let err = sender.send(&batch(&["a"])).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::MalformedAnswer {
                    sent: 1,
                    answered: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn only_throttling_and_internal_failures_of_entries_are_retried() {
        assert!(entry_is_retried("ProvisionedThroughputExceededException"));
        assert!(entry_is_retried("InternalFailure"));
        assert!(entry_is_retried("KMSThrottlingException"));
        assert!(!entry_is_retried("KMSDisabledException"));
    }
}
