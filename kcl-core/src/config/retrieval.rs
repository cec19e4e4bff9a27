//! How shard consumers read: `GetRecords` polling (the default) or enhanced fan-out.

use std::time::Duration;

use super::{RetryConfig, nonzero, within_bound};
use crate::error::{Error, Result};

/// How shard consumers read records.
#[derive(Clone, PartialEq, Debug, Default)]
#[non_exhaustive]
pub enum Retrieval {
    /// `GetRecords` polling, with [`WorkerConfig::polling`](crate::WorkerConfig::polling).
    /// The default: it needs no registration, costs nothing beyond the stream, and is what
    /// every server and emulator supports.
    #[default]
    Polling,
    /// Enhanced fan-out: a registered consumer gets its own 2 MB/s per shard, pushed by
    /// `SubscribeToShard`, with about 70 ms from put to delivery.
    FanOut(FanOutConfig),
}

/// Which consumer enhanced fan-out reads as.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum ConsumerRef {
    /// The consumer of this name on the stream, registered at start if missing. The
    /// application name when not set otherwise, as in the Java KCL.
    Name(String),
    /// A consumer registered beforehand, by its ARN: never registered by the worker.
    Arn(String),
}

/// Enhanced fan-out settings.
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct FanOutConfig {
    /// The consumer. Default `None`: a consumer named after the application.
    pub consumer: Option<ConsumerRef>,
    /// Longest wait at start for the consumer to become `ACTIVE` (registration takes seconds
    /// on AWS). Default 60 s; the Java KCL waits 10 describes one second apart.
    pub registration_timeout: Duration,
    /// How often the consumer's status is described while waiting for it. Default 1 s.
    pub registration_poll_interval: Duration,
    /// Longest wait for the next event of a subscription before it is given up as stuck and
    /// replaced. The service sends an event at least every 5 s; the AWS SDK bounds nothing.
    /// Default 15 s.
    pub event_timeout: Duration,
    /// Backoff between subscribes after a refusal (another subscription still open, one
    /// subscribe a second per shard) or a failure. At least 1 s: AWS takes over an abandoned
    /// subscription after about 5 s. Default 1 s … 10 s, jittered.
    pub retry: RetryConfig,
}

impl Default for FanOutConfig {
    fn default() -> Self {
        FanOutConfig {
            consumer: None,
            registration_timeout: Duration::from_secs(60),
            registration_poll_interval: Duration::from_secs(1),
            event_timeout: Duration::from_secs(15),
            retry: RetryConfig::new(Duration::from_secs(1), Duration::from_secs(10)),
        }
    }
}

/// The shortest backoff between subscribes the service tolerates (one a second per shard and
/// consumer).
pub const MIN_SUBSCRIBE_BACKOFF: Duration = Duration::from_secs(1);

impl FanOutConfig {
    /// Reads as the consumer of this name (registered at start if missing).
    #[must_use]
    pub fn with_consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(ConsumerRef::Name(name.into()));
        self
    }

    /// Reads as the consumer of this ARN (never registered by the worker).
    #[must_use]
    pub fn with_consumer_arn(mut self, arn: impl Into<String>) -> Self {
        self.consumer = Some(ConsumerRef::Arn(arn.into()));
        self
    }

    /// Sets [`FanOutConfig::registration_timeout`].
    #[must_use]
    pub fn with_registration_timeout(mut self, d: Duration) -> Self {
        self.registration_timeout = d;
        self
    }

    /// Sets [`FanOutConfig::event_timeout`].
    #[must_use]
    pub fn with_event_timeout(mut self, d: Duration) -> Self {
        self.event_timeout = d;
        self
    }

    /// Sets [`FanOutConfig::retry`].
    #[must_use]
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// The consumer to read as, given the application name.
    pub fn consumer_or(&self, application_name: &str) -> ConsumerRef {
        self.consumer
            .clone()
            .unwrap_or_else(|| ConsumerRef::Name(application_name.to_owned()))
    }

    pub(crate) fn validate(&self, application_name: &str) -> Result<()> {
        match self.consumer_or(application_name) {
            ConsumerRef::Name(name) => validate_consumer_name(&name)?,
            ConsumerRef::Arn(arn) => {
                if !arn.starts_with("arn:") || !arn.contains("/consumer/") {
                    return Err(Error::invalid_config(
                        "retrieval.consumer",
                        format!(
                            "`{arn}` is not a stream consumer ARN (arn:...:stream/NAME/consumer/NAME:...)"
                        ),
                    ));
                }
            }
        }
        for (field, d) in [
            ("retrieval.registration_timeout", self.registration_timeout),
            (
                "retrieval.registration_poll_interval",
                self.registration_poll_interval,
            ),
            ("retrieval.event_timeout", self.event_timeout),
        ] {
            within_bound(field, d)?;
            nonzero(field, d)?;
        }
        self.retry.validate("retrieval.retry")?;
        if self.retry.min_delay < MIN_SUBSCRIBE_BACKOFF {
            return Err(Error::invalid_config(
                "retrieval.retry",
                format!(
                    "min_delay ({:?}) must be at least {MIN_SUBSCRIBE_BACKOFF:?}: the service allows one subscribe a second per shard",
                    self.retry.min_delay
                ),
            ));
        }
        Ok(())
    }
}

/// Kinesis consumer names: 1 to 128 of `[a-zA-Z0-9_.-]`.
fn validate_consumer_name(name: &str) -> Result<()> {
    const MAX_LEN: usize = 128;
    let valid = !name.is_empty()
        && name.len() <= MAX_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_config(
            "retrieval.consumer",
            format!(
                "`{name}` is not a consumer name: 1 to {MAX_LEN} of a-z, A-Z, 0-9, `_`, `.`, `-` (the application name is used when none is set)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_the_consumer_is_the_application() {
        let config = FanOutConfig::default();
        config.validate("orders-app").unwrap();
        assert_eq!(
            config.consumer_or("orders-app"),
            ConsumerRef::Name("orders-app".into())
        );
    }

    #[test]
    fn bad_consumers_and_settings_are_refused_by_field() {
        let field = |r: Result<()>| match r {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        // An application name that is no consumer name needs a consumer set.
        assert_eq!(
            field(FanOutConfig::default().validate("orders app")),
            "retrieval.consumer"
        );
        assert_eq!(
            field(
                FanOutConfig::default()
                    .with_consumer_arn("orders")
                    .validate("a")
            ),
            "retrieval.consumer"
        );
        FanOutConfig::default()
            .with_consumer_arn("arn:aws:kinesis:eu-west-1:1:stream/s/consumer/c:1")
            .validate("a")
            .unwrap();
        assert_eq!(
            field(
                FanOutConfig::default()
                    .with_retry(RetryConfig::new(
                        Duration::from_millis(200),
                        Duration::from_secs(1)
                    ))
                    .validate("a")
            ),
            "retrieval.retry"
        );
        assert_eq!(
            field(
                FanOutConfig::default()
                    .with_event_timeout(Duration::ZERO)
                    .validate("a")
            ),
            "retrieval.event_timeout"
        );
    }
}
