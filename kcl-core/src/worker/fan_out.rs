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
    let mut last_error: Option<Error>;
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
                last_error = None;
                config.registration_poll_interval
            }
            Ok(None) => {
                // Only an ARN that names nothing comes here: a name gets registered.
                return Err(not_active(
                    &consumer,
                    Seen::NotFound,
                    config.registration_timeout,
                ));
            }
            Err(e) if e.is_retryable() => {
                warn!(error = %ErrorChain(&e), "describing or registering the fan-out consumer failed; retrying");
                last_error = Some(e);
                backoff
                    .get_or_insert_with(|| config.retry.backoff(seeds.next_seed()))
                    .next()
                    .unwrap_or(config.retry.max_delay)
            }
            Err(e) => return Err(e),
        };
        if Instant::now() + pause > deadline {
            let seen = match last_error {
                Some(e) => Seen::Failing(last_seen, e),
                None => Seen::Status(last_seen),
            };
            return Err(not_active(&consumer, seen, config.registration_timeout));
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

/// What the worker last knew of the consumer when it gave up.
enum Seen {
    /// An ARN that names no consumer.
    NotFound,
    /// Described with this status (`None`: registered by another worker, never described).
    Status(Option<ConsumerStatus>),
    /// The last call failed: the status seen before, if any, and the failure.
    Failing(Option<ConsumerStatus>, Error),
}

fn not_active(consumer: &ConsumerRef, seen: Seen, waited: Duration) -> Error {
    let consumer = match consumer {
        ConsumerRef::Name(name) | ConsumerRef::Arn(name) => name.clone(),
    };
    let status =
        |s: Option<ConsumerStatus>| s.map_or_else(|| "unknown".to_owned(), |s| format!("{s:?}"));
    let (status, last_error) = match seen {
        Seen::NotFound => ("not found".to_owned(), None),
        Seen::Status(s) => (status(s), None),
        Seen::Failing(s, e) => (
            format!("{}, the last call failing", status(s)),
            Some(e.into()),
        ),
    };
    Error::ConsumerNotActive {
        consumer,
        status,
        waited,
        last_error,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{Fault, Faulty, InMemoryStream};

    /// A worker that cannot reach Kinesis for the whole registration wait says so: the
    /// error names the consumer, an unknown status, and carries the last failure.
    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ends_on_failing_calls_carries_the_last_failure() {
        let stream = Faulty::new(Arc::new(InMemoryStream::new("s", 1)));
        stream.set(Fault::Fail);
        let config = FanOutConfig::default().with_registration_timeout(Duration::from_secs(20));
        let err = active_consumer(&stream, &config, "app", &SeedSource::new(Some(7)))
            .await
            .unwrap_err();
        match &err {
            Error::ConsumerNotActive {
                consumer,
                status,
                last_error,
                ..
            } => {
                assert_eq!(consumer, "app");
                assert_eq!(status, "unknown, the last call failing");
                assert!(last_error.is_some(), "{err:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(std::error::Error::source(&err).is_some());
    }
}
