//! Enhanced fan-out on the AWS SDK: consumer registration and `SubscribeToShard`.

use async_trait::async_trait;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{self as sdk, ShardIteratorType, SubscribeToShardEventStream};
use aws_smithy_types::DateTime;

use super::{KinesisStreamClient, bad_answer, child_shards_from, classify, records_from};
use crate::error::{Error, Result};
use crate::sequence::SequenceNumber;
use crate::stream::StartingPosition;
use crate::subscription::{ConsumerStatus, ShardSubscription, StreamConsumer, SubscriptionEvent};

pub(super) fn consumer_status(status: &sdk::ConsumerStatus) -> ConsumerStatus {
    match status {
        sdk::ConsumerStatus::Active => ConsumerStatus::Active,
        sdk::ConsumerStatus::Deleting => ConsumerStatus::Deleting,
        // Creating, and any status a later API version adds: not usable yet.
        _ => ConsumerStatus::Creating,
    }
}

pub(super) fn starting_position(position: &StartingPosition) -> Result<sdk::StartingPosition> {
    let builder = sdk::StartingPosition::builder();
    let builder = match position {
        StartingPosition::TrimHorizon => builder.r#type(ShardIteratorType::TrimHorizon),
        StartingPosition::Latest => builder.r#type(ShardIteratorType::Latest),
        StartingPosition::AtTimestamp(at) => builder
            .r#type(ShardIteratorType::AtTimestamp)
            .timestamp(DateTime::from(*at)),
        StartingPosition::AtSequenceNumber(s) => builder
            .r#type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(s.as_str()),
        StartingPosition::AfterSequenceNumber(s) => builder
            .r#type(ShardIteratorType::AfterSequenceNumber)
            .sequence_number(s.as_str()),
    };
    builder
        .build()
        .map_err(|e| bad_answer("SubscribeToShard", format!("starting position: {e}")))
}

/// One open `SubscribeToShard` event stream.
pub(super) struct AwsShardSubscription {
    pub(super) stream: String,
    pub(super) shard_id: String,
    pub(super) events: aws_sdk_kinesis::primitives::event_stream::EventReceiver<
        SubscribeToShardEventStream,
        SubscribeToShardEventStreamError,
    >,
}

impl std::fmt::Debug for AwsShardSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsShardSubscription")
            .field("stream", &self.stream)
            .field("shard_id", &self.shard_id)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ShardSubscription for AwsShardSubscription {
    async fn next_event(&mut self) -> Result<Option<SubscriptionEvent>> {
        loop {
            // An exception frame inside the stream, or the connection failing.
            let received = self
                .events
                .recv()
                .await
                .map_err(|e| stream_error(&self.stream, &self.shard_id, e))?;
            match received {
                None => return Ok(None),
                Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)) => {
                    return event_from(&self.shard_id, event).map(Some);
                }
                // A kind of event a later API version adds: nothing to deliver.
                Some(_) => continue,
            }
        }
    }
}

/// An error of the event stream. Its exception frames carry no error code in the SDK's
/// metadata (only the typed variant says which), so they are told apart here; the rest is
/// classified like any call's error. A `ResourceNotFound` frame (the consumer deregistered,
/// say) fails the shard's consumer, which releases the lease: it never counts as the shard's
/// end or its deletion, which would drop the checkpoint.
fn stream_error(
    stream: &str,
    shard_id: &str,
    err: aws_sdk_kinesis::error::SdkError<
        SubscribeToShardEventStreamError,
        aws_smithy_types::event_stream::RawMessage,
    >,
) -> Error {
    use crate::aws::AwsSdkError;
    use crate::error::Service;
    use aws_sdk_kinesis::error::SdkError;
    const OPERATION: &str = "SubscribeToShard";
    let service = Service::Kinesis;
    let variant = match &err {
        SdkError::ServiceError(context) => Some(context.err()),
        _ => None,
    };
    match variant {
        Some(SubscribeToShardEventStreamError::ResourceInUseException(_)) => Error::ResourceInUse {
            service,
            operation: OPERATION,
            source: AwsSdkError::new(err).into(),
        },
        Some(SubscribeToShardEventStreamError::KmsThrottlingException(_)) => Error::Throttled {
            service,
            operation: OPERATION,
            source: AwsSdkError::new(err).into(),
        },
        Some(SubscribeToShardEventStreamError::InternalFailureException(_)) => Error::Transient {
            service,
            operation: OPERATION,
            source: AwsSdkError::new(err).into(),
        },
        _ => classify(stream, OPERATION, Some(shard_id), err),
    }
}

fn event_from(shard_id: &str, event: sdk::SubscribeToShardEvent) -> Result<SubscriptionEvent> {
    const OPERATION: &str = "SubscribeToShard";
    let records = records_from(OPERATION, shard_id, event.records)?;
    // The SDK turns the service's null continuation (a closed shard's last event) into "".
    let continuation = match event.continuation_sequence_number.as_str() {
        "" => None,
        text => Some(SequenceNumber::new(text).map_err(|e| {
            bad_answer(
                OPERATION,
                format!("continuation sequence number of shard {shard_id}: {e}"),
            )
        })?),
    };
    let child_shards = child_shards_from(OPERATION, event.child_shards.unwrap_or_default())?;
    if continuation.is_none() && child_shards.is_empty() {
        return Err(bad_answer(
            OPERATION,
            format!("shard {shard_id}: an event with neither a continuation nor child shards"),
        ));
    }
    let mut out = SubscriptionEvent::new(records, continuation).with_child_shards(child_shards);
    out.millis_behind_latest = u64::try_from(event.millis_behind_latest).ok();
    Ok(out)
}

impl KinesisStreamClient {
    /// The stream's ARN: the consumer APIs name the stream only by ARN.
    pub(super) async fn stream_arn(&self) -> Result<String> {
        if self.is_arn() {
            return Ok(self.stream.clone());
        }
        const OPERATION: &str = "DescribeStreamSummary";
        let arn = self
            .stream_arn
            .get_or_try_init(|| async {
                let output = self
                    .client
                    .describe_stream_summary()
                    .stream_name(&self.stream)
                    .send()
                    .await
                    .map_err(|e| self.error(OPERATION, None, e))?;
                output
                    .stream_description_summary()
                    .map(|s| s.stream_arn().to_owned())
                    .ok_or_else(|| bad_answer(OPERATION, "no stream description".into()))
            })
            .await?;
        Ok(arn.clone())
    }

    pub(super) async fn describe_consumer(&self, consumer: &str) -> Result<Option<StreamConsumer>> {
        const OPERATION: &str = "DescribeStreamConsumer";
        let request = self.client.describe_stream_consumer();
        let request = if consumer.starts_with("arn:") {
            request.consumer_arn(consumer)
        } else {
            request
                .stream_arn(self.stream_arn().await?)
                .consumer_name(consumer)
        };
        match request.send().await {
            Ok(output) => {
                let d = output.consumer_description().ok_or_else(|| {
                    bad_answer(OPERATION, format!("no description of consumer {consumer}"))
                })?;
                Ok(Some(StreamConsumer::new(
                    d.consumer_name(),
                    d.consumer_arn(),
                    consumer_status(d.consumer_status()),
                )))
            }
            Err(e) => match self.error(OPERATION, None, e) {
                // The consumer is missing (the stream may be too: registration tells).
                Error::StreamNotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    pub(super) async fn register_consumer(&self, name: &str) -> Result<StreamConsumer> {
        const OPERATION: &str = "RegisterStreamConsumer";
        let output = self
            .client
            .register_stream_consumer()
            .stream_arn(self.stream_arn().await?)
            .consumer_name(name)
            .send()
            .await
            .map_err(|e| self.error(OPERATION, None, e))?;
        let c = output.consumer().ok_or_else(|| {
            bad_answer(OPERATION, format!("no consumer in the answer for {name}"))
        })?;
        Ok(StreamConsumer::new(
            c.consumer_name(),
            c.consumer_arn(),
            consumer_status(c.consumer_status()),
        ))
    }

    pub(super) async fn subscribe(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<Box<dyn ShardSubscription>> {
        const OPERATION: &str = "SubscribeToShard";
        let output = self
            .client
            .subscribe_to_shard()
            .consumer_arn(consumer_arn)
            .shard_id(shard_id)
            .starting_position(starting_position(position)?)
            .send()
            .await
            .map_err(|e| self.error(OPERATION, Some(shard_id), e))?;
        Ok(Box::new(AwsShardSubscription {
            stream: self.stream.clone(),
            shard_id: shard_id.to_owned(),
            events: output.event_stream,
        }))
    }
}
