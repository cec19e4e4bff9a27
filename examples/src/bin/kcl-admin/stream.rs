//! [`Stream`]: the few reads kcl-admin makes of the stream, to measure lag and to resolve and
//! check checkpoint positions.

use std::time::Duration;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use kcl_core::{AwsSdkError, KinesisStreamClient, Record, Shard, StartingPosition, StreamClient};

use crate::error::{AdminError, Result};

/// Kinesis serves at most 5 `GetRecords` per second and shard, shared with the workers
/// reading it: kcl-admin's reads of one shard are spaced this far apart.
const READ_SPACING: Duration = Duration::from_millis(200);

/// Attempts of one call that is throttled or fails transiently.
const ATTEMPTS: u32 = 5;

/// One Kinesis stream, by name or ARN.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) name: String,
    client: KinesisStreamClient,
    sdk: aws_sdk_kinesis::Client,
}

/// The end of a [`Stream::read_until`].
#[derive(Debug)]
pub(crate) struct Reading {
    /// The first record the predicate accepted; `None` when the shard was read to its tip
    /// (or its end) without one.
    pub(crate) found: Option<Record>,
    /// `MillisBehindLatest` of the last `GetRecords`.
    pub(crate) millis_behind_latest: Option<u64>,
}

impl Stream {
    pub(crate) fn new(sdk: &aws_config::SdkConfig, name: String) -> Self {
        let client = aws_sdk_kinesis::Client::new(sdk);
        Stream {
            client: KinesisStreamClient::new(client.clone(), &name),
            sdk: client,
            name,
        }
    }

    /// How long the stream keeps records.
    pub(crate) async fn retention(&self) -> Result<Duration> {
        let request = self.sdk.describe_stream_summary();
        let request = if self.name.starts_with("arn:") {
            request.stream_arn(&self.name)
        } else {
            request.stream_name(&self.name)
        };
        match request.send().await {
            Ok(output) => {
                let hours = output
                    .stream_description_summary()
                    .map_or(24, |s| s.retention_period_hours());
                Ok(Duration::from_secs(
                    u64::try_from(hours).unwrap_or(24) * 3600,
                ))
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                Err(AdminError::StreamMissing {
                    stream: self.name.clone(),
                    source: Some(AwsSdkError::new(e).into()),
                })
            }
            Err(e) => Err(AdminError::Aws {
                operation: "reading the stream's description",
                source: AwsSdkError::new(e).into(),
            }),
        }
    }

    /// Every shard of the stream (open, and closed but retained).
    pub(crate) async fn shards(&self) -> Result<Vec<Shard>> {
        retrying(|| self.client.list_shards())
            .await
            .map_err(|e| AdminError::kinesis("listing the stream's shards", e))
    }

    /// The shard `shard_id`.
    pub(crate) async fn shard(&self, shard_id: &str) -> Result<Shard> {
        self.shards()
            .await?
            .into_iter()
            .find(|s| s.shard_id == shard_id)
            .ok_or_else(|| AdminError::ShardMissing {
                stream: self.name.clone(),
                shard_id: shard_id.to_owned(),
            })
    }

    /// A shard iterator at `position`, as the service answered (the caller tells a position
    /// outside the shard from other failures).
    pub(crate) async fn iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> kcl_core::Result<String> {
        retrying(|| self.client.get_shard_iterator(shard_id, position)).await
    }

    /// Reads `shard_id` forward from `iterator`, `limit` records per call, until `stop`
    /// accepts a record, the shard's tip (an empty read with nothing behind) or its end.
    pub(crate) async fn read_until(
        &self,
        shard_id: &str,
        iterator: String,
        limit: u32,
        mut stop: impl FnMut(&Record) -> bool,
    ) -> kcl_core::Result<Reading> {
        let mut iterator = iterator;
        loop {
            let page = retrying(|| self.client.get_records(shard_id, &iterator, limit)).await?;
            let read = page.records.len();
            if let Some(record) = page.records.into_iter().find(|r| stop(r)) {
                return Ok(Reading {
                    found: Some(record),
                    millis_behind_latest: page.millis_behind_latest,
                });
            }
            // A short read with nothing behind it is the tip. (Kinesis may answer an empty
            // page far from the tip, over a stretch without records: then it is behind.)
            let at_tip = read < limit as usize && page.millis_behind_latest.unwrap_or(0) == 0;
            match page.next_shard_iterator {
                Some(next) if !at_tip => iterator = next,
                _ => {
                    return Ok(Reading {
                        found: None,
                        millis_behind_latest: page.millis_behind_latest,
                    });
                }
            }
            tokio::time::sleep(READ_SPACING).await;
        }
    }
}

/// The AWS error code behind a Kinesis error, if the service answered one.
pub(crate) fn service_code(error: &kcl_core::Error) -> Option<&str> {
    let source = std::error::Error::source(error)?;
    source.downcast_ref::<AwsSdkError>()?.code()
}

/// Calls `call` until it succeeds, fails for good, or [`ATTEMPTS`] attempts failed with a
/// throttle or a transient error, backing off from [`READ_SPACING`].
async fn retrying<T, F, Fut>(mut call: F) -> kcl_core::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kcl_core::Result<T>>,
{
    let mut delay = READ_SPACING;
    for _ in 1..ATTEMPTS {
        match call().await {
            Err(e) if e.is_retryable() => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    call().await
}
