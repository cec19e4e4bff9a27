//! [`KinesisStreamClient`]: the [`StreamClient`] for Amazon Kinesis, on the AWS SDK for Rust.

mod stream_clients;
mod streams_by_prefix;
mod subscription;

pub use stream_clients::KinesisStreamClients;
pub use streams_by_prefix::StreamsByPrefix;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::ShardIteratorType;
use aws_smithy_types::DateTime;

use crate::aws::{AwsSdkError, RawAnswer};
use crate::error::{Error, Result, Service};
use crate::sequence::SequenceNumber;
use crate::stream::{
    ChildShard, HashKeyRange, Record, RecordsPage, Shard, StartingPosition, StreamClient,
};
use crate::stream_identity::StreamIdentity;
use crate::subscription::{ShardSubscription, StreamConsumer};

/// Reads one Kinesis data stream through the AWS SDK.
///
/// Endpoints, region and credentials come from the SDK config the client was built with, so
/// `AWS_ENDPOINT_URL_KINESIS` points it at a local server.
#[derive(Debug, Clone)]
pub struct KinesisStreamClient {
    client: Client,
    stream: String,
    list_shards_page_size: Option<i32>,
    /// The stream's ARN, looked up once when the stream is given by name (fan-out needs it).
    stream_arn: Arc<tokio::sync::OnceCell<String>>,
}

impl KinesisStreamClient {
    /// A client for `stream`, a stream name or a stream ARN (`arn:aws:kinesis:...`).
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        KinesisStreamClient {
            client,
            stream: stream.into(),
            list_shards_page_size: None,
            stream_arn: Arc::default(),
        }
    }

    /// Shards per `ListShards` page (1 to 10,000). Default: the service's (1,000).
    #[must_use]
    pub fn with_list_shards_page_size(mut self, size: i32) -> Self {
        self.list_shards_page_size = Some(size);
        self
    }

    fn is_arn(&self) -> bool {
        self.stream.starts_with("arn:")
    }

    fn error<E>(&self, operation: &'static str, shard_id: Option<&str>, err: SdkError<E>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(&self.stream, operation, shard_id, err)
    }
}

/// The one place where Kinesis SDK errors (of calls, and of `SubscribeToShard`'s event
/// stream) are mapped onto [`Error`] variants.
fn classify<E, R>(
    stream: &str,
    operation: &'static str,
    shard_id: Option<&str>,
    err: SdkError<E, R>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: RawAnswer,
{
    let service = Service::Kinesis;
    let (code, status) = match &err {
        SdkError::ServiceError(e) => (e.err().code().map(str::to_owned), e.raw().http_status()),
        _ => (None, None),
    };
    match (&err, code.as_deref()) {
        (
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_),
            _,
        ) => Error::Transient {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        (_, Some("ResourceNotFoundException")) => match shard_id {
            // GetShardIterator names a shard: a missing one was trimmed or never existed.
            Some(shard_id) if operation == "GetShardIterator" => Error::ShardNotFound {
                stream: stream.to_owned(),
                shard_id: shard_id.to_owned(),
                source: Some(AwsSdkError::new(err).into()),
            },
            _ => Error::StreamNotFound {
                stream: stream.to_owned(),
                source: Some(AwsSdkError::new(err).into()),
            },
        },
        (_, Some("ResourceInUseException")) => Error::ResourceInUse {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        (_, Some("ExpiredIteratorException")) => Error::ExpiredIterator {
            shard_id: shard_id.unwrap_or_default().to_owned(),
            source: Some(AwsSdkError::new(err).into()),
        },
        (
            _,
            Some(
                "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "KMSThrottlingException"
                | "ThrottlingException",
            ),
        ) => Error::Throttled {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        (_, Some("InternalFailureException" | "InternalFailure" | "ServiceUnavailable")) => {
            Error::Transient {
                service,
                operation,
                source: AwsSdkError::new(err).into(),
            }
        }
        _ if status.is_some_and(|s| s >= 500) => Error::Transient {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
        _ => Error::Service {
            service,
            operation,
            source: AwsSdkError::new(err).into(),
        },
    }
}

fn bad_answer(operation: &'static str, problem: String) -> Error {
    Error::Service {
        service: Service::Kinesis,
        operation,
        source: problem.into(),
    }
}

/// The SDK's records of a `GetRecords` answer or a `SubscribeToShard` event.
fn records_from(
    operation: &'static str,
    shard_id: &str,
    records: Vec<aws_sdk_kinesis::types::Record>,
) -> Result<Vec<Record>> {
    records
        .into_iter()
        .map(|r| {
            let sequence_number = SequenceNumber::new(r.sequence_number)
                .map_err(|e| bad_answer(operation, format!("record of shard {shard_id}: {e}")))?;
            let mut record = Record::new(sequence_number, r.partition_key, r.data.into_inner());
            record.approximate_arrival_timestamp = r
                .approximate_arrival_timestamp
                .and_then(|t| SystemTime::try_from(t).ok());
            Ok(record)
        })
        .collect()
}

/// The SDK's child shards of a shard that ended.
fn child_shards_from(
    operation: &'static str,
    children: Vec<aws_sdk_kinesis::types::ChildShard>,
) -> Result<Vec<ChildShard>> {
    children
        .into_iter()
        .map(|c| {
            let range = hash_key_range(operation, &c.shard_id, c.hash_key_range.as_ref())?;
            Ok(ChildShard::new(c.shard_id, c.parent_shards, range))
        })
        .collect()
}

fn hash_key_range(
    operation: &'static str,
    shard_id: &str,
    range: Option<&aws_sdk_kinesis::types::HashKeyRange>,
) -> Result<HashKeyRange> {
    let parse = |text: &str| {
        text.parse::<u128>().map_err(|_| {
            bad_answer(
                operation,
                format!("shard {shard_id} has hash key `{text}`, not a 128-bit number"),
            )
        })
    };
    let range = range
        .ok_or_else(|| bad_answer(operation, format!("shard {shard_id} has no hash key range")))?;
    Ok(HashKeyRange {
        starting_hash_key: parse(range.starting_hash_key())?,
        ending_hash_key: parse(range.ending_hash_key())?,
    })
}

#[async_trait]
impl StreamClient for KinesisStreamClient {
    fn stream_name(&self) -> &str {
        &self.stream
    }

    async fn list_shards(&self) -> Result<Vec<Shard>> {
        const OPERATION: &str = "ListShards";
        let mut shards = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let request = self.client.list_shards();
            // With a NextToken the stream must not be named again (API rule).
            let request = match (&next_token, self.is_arn()) {
                (Some(token), _) => request.next_token(token),
                (None, true) => request.stream_arn(&self.stream),
                (None, false) => request.stream_name(&self.stream),
            };
            let output = request
                .set_max_results(self.list_shards_page_size)
                .send()
                .await
                .map_err(|e| self.error(OPERATION, None, e))?;
            for shard in output.shards() {
                let range = hash_key_range(OPERATION, shard.shard_id(), shard.hash_key_range())?;
                let sequence_range = shard.sequence_number_range();
                shards.push(Shard {
                    shard_id: shard.shard_id().to_owned(),
                    parent_shard_id: shard.parent_shard_id().map(str::to_owned),
                    adjacent_parent_shard_id: shard.adjacent_parent_shard_id().map(str::to_owned),
                    hash_key_range: range,
                    starting_sequence_number: sequence_range
                        .map(|r| r.starting_sequence_number().to_owned()),
                    ending_sequence_number: sequence_range
                        .and_then(|r| r.ending_sequence_number())
                        .map(str::to_owned),
                });
            }
            next_token = output.next_token().map(str::to_owned);
            if next_token.is_none() {
                return Ok(shards);
            }
        }
    }

    async fn stream_identity(&self) -> Result<StreamIdentity> {
        const OPERATION: &str = "DescribeStreamSummary";
        let request = self.client.describe_stream_summary();
        let request = if self.is_arn() {
            request.stream_arn(&self.stream)
        } else {
            request.stream_name(&self.stream)
        };
        let output = request
            .send()
            .await
            .map_err(|e| self.error(OPERATION, None, e))?;
        let summary = output
            .stream_description_summary()
            .ok_or_else(|| bad_answer(OPERATION, "no stream description".into()))?;
        let created = summary.stream_creation_timestamp().secs();
        let created = u64::try_from(created).map_err(|_| {
            bad_answer(
                OPERATION,
                format!("the stream's creation time {created} is before 1970"),
            )
        })?;
        StreamIdentity::from_arn(summary.stream_arn(), created)
    }

    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String> {
        const OPERATION: &str = "GetShardIterator";
        let request = self.client.get_shard_iterator().shard_id(shard_id);
        let request = if self.is_arn() {
            request.stream_arn(&self.stream)
        } else {
            request.stream_name(&self.stream)
        };
        let request = match position {
            StartingPosition::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            StartingPosition::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartingPosition::AtTimestamp(at) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from(*at)),
            StartingPosition::AtSequenceNumber(s) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(s.as_str()),
            StartingPosition::AfterSequenceNumber(s) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(s.as_str()),
        };
        let output = request
            .send()
            .await
            .map_err(|e| self.error(OPERATION, Some(shard_id), e))?;
        output
            .shard_iterator
            .ok_or_else(|| bad_answer(OPERATION, format!("no shard iterator for {shard_id}")))
    }

    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        const OPERATION: &str = "GetRecords";
        let mut request = self
            .client
            .get_records()
            .shard_iterator(shard_iterator)
            .limit(i32::try_from(limit).unwrap_or(i32::MAX));
        if self.is_arn() {
            request = request.stream_arn(&self.stream);
        }
        let output = request
            .send()
            .await
            .map_err(|e| self.error(OPERATION, Some(shard_id), e))?;
        let records = records_from(OPERATION, shard_id, output.records)?;
        let child_shards = child_shards_from(OPERATION, output.child_shards.unwrap_or_default())?;
        let mut page =
            RecordsPage::new(records, output.next_shard_iterator).with_child_shards(child_shards);
        page.millis_behind_latest = output
            .millis_behind_latest
            .and_then(|m| u64::try_from(m).ok());
        Ok(page)
    }

    async fn describe_stream_consumer(&self, consumer: &str) -> Result<Option<StreamConsumer>> {
        self.describe_consumer(consumer).await
    }

    async fn register_stream_consumer(&self, name: &str) -> Result<StreamConsumer> {
        self.register_consumer(name).await
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<Box<dyn ShardSubscription>> {
        self.subscribe(consumer_arn, shard_id, position).await
    }
}
