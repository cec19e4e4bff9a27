//! Enhanced fan-out at start: the consumer described, registered when missing, and waited
//! for until `ACTIVE`, before any lease is taken. Deregistering is an admin's decision,
//! never the worker's: another application, or this one's next deploy, may read as it.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::{Backoff, SeedSource};
use crate::config::{ConsumerRef, FanOutConfig};
use crate::error::{Error, ErrorChain, Result};
use crate::stream::StreamClient;
use crate::subscription::{ConsumerStatus, StreamConsumer};

/// The ARN of the consumer to read as, once it is `ACTIVE`.
///
/// Several workers starting at once may all find the consumer missing: all register, one
/// succeeds and the others get `ResourceInUse`, which means "it exists now": they describe
/// it like the rest. A throttled call (AWS allows 5 registrations a second per account) backs
/// off and tries again within the registration timeout.
///
/// # Errors
/// [`Error::ConsumerNotActive`] when the consumer did not become `ACTIVE` within
/// `registration_timeout` (or an ARN names no consumer); the stream's errors that retrying
/// cannot help.
pub(super) async fn active_consumer(
    stream: &dyn StreamClient,
    config: &FanOutConfig,
    application_name: &str,
    seeds: &SeedSource,
) -> Result<String> {
    let consumer = config.consumer_or(application_name);
    let deadline = Instant::now() + config.registration_timeout;
    let mut backoff: Option<Backoff> = None;
    let mut last_seen: Option<ConsumerStatus> = None;
    loop {
        let found = match &consumer {
            ConsumerRef::Arn(arn) => stream.describe_stream_consumer(arn).await,
            ConsumerRef::Name(name) => match stream.describe_stream_consumer(name).await {
                Ok(None) => register(stream, name).await,
                other => other,
            },
        };
        let pause = match found {
            Ok(Some(StreamConsumer {
                arn,
                status: ConsumerStatus::Active,
                ..
            })) => {
                info!(consumer = %arn, "enhanced fan-out consumer active");
                return Ok(arn);
            }
            Ok(Some(c)) => {
                last_seen = Some(c.status);
                config.registration_poll_interval
            }
            Ok(None) => {
                // Only an ARN that names nothing comes here: a name gets registered.
                return Err(not_active(&consumer, None, config.registration_timeout));
            }
            Err(e) if e.is_retryable() => {
                warn!(error = %ErrorChain(&e), "describing or registering the fan-out consumer failed; retrying");
                backoff
                    .get_or_insert_with(|| config.retry.backoff(seeds.next_seed()))
                    .next()
                    .unwrap_or(config.retry.max_delay)
            }
            Err(e) => return Err(e),
        };
        if Instant::now() + pause > deadline {
            return Err(not_active(
                &consumer,
                last_seen,
                config.registration_timeout,
            ));
        }
        tokio::time::sleep(pause).await;
    }
}

/// Registers `name`; `Ok(None)` when another worker registered it first (describe again).
async fn register(stream: &dyn StreamClient, name: &str) -> Result<Option<StreamConsumer>> {
    match stream.register_stream_consumer(name).await {
        Ok(consumer) => {
            info!(consumer = %consumer.arn, "registered the enhanced fan-out consumer");
            Ok(Some(consumer))
        }
        Err(Error::ResourceInUse { .. }) => Ok(Some(StreamConsumer::new(
            name,
            String::new(),
            ConsumerStatus::Creating,
        ))),
        Err(e) => Err(e),
    }
}

fn not_active(consumer: &ConsumerRef, status: Option<ConsumerStatus>, waited: Duration) -> Error {
    let consumer = match consumer {
        ConsumerRef::Name(name) | ConsumerRef::Arn(name) => name.clone(),
    };
    Error::ConsumerNotActive {
        consumer,
        status: status.map_or_else(|| "not found".to_owned(), |s| format!("{s:?}")),
        waited,
    }
}
