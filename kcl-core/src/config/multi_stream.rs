//! Settings of multi-stream mode ([`Worker::multi_stream`](crate::Worker::multi_stream)).

use std::time::Duration;

use super::{nonzero, within_bound};
use crate::error::Result;

/// How a multi-stream worker follows the streams its tracker lists. Ignored in single-stream
/// mode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct MultiStreamConfig {
    /// How often the tracker is asked for the streams. A stream that appears gets its leases
    /// within about this long. Default 60 s, the Java KCL's `NEW_STREAM_CHECK_INTERVAL_MILLIS`.
    pub stream_discovery_interval: Duration,
    /// How long a stream must be missing from this worker's tracker (or answer
    /// `ResourceNotFound`) before its leases are deleted; never while a live worker holds one
    /// of them. Other workers may still see the old list, and a stream that comes back within
    /// the grace period resumes from its checkpoints. Default 1 h (the Java KCL has no
    /// default: its deletion strategy is the user's choice, and without one the leases of
    /// former streams stay in the table for ever).
    pub former_streams_grace: Duration,
}

impl Default for MultiStreamConfig {
    fn default() -> Self {
        MultiStreamConfig {
            stream_discovery_interval: Duration::from_secs(60),
            former_streams_grace: Duration::from_secs(3600),
        }
    }
}

impl MultiStreamConfig {
    /// Sets [`MultiStreamConfig::stream_discovery_interval`].
    #[must_use]
    pub fn with_stream_discovery_interval(mut self, interval: Duration) -> Self {
        self.stream_discovery_interval = interval;
        self
    }

    /// Sets [`MultiStreamConfig::former_streams_grace`].
    #[must_use]
    pub fn with_former_streams_grace(mut self, grace: Duration) -> Self {
        self.former_streams_grace = grace;
        self
    }

    pub(super) fn validate(&self) -> Result<()> {
        nonzero(
            "multi_stream.stream_discovery_interval",
            self.stream_discovery_interval,
        )?;
        within_bound(
            "multi_stream.stream_discovery_interval",
            self.stream_discovery_interval,
        )?;
        within_bound(
            "multi_stream.former_streams_grace",
            self.former_streams_grace,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn defaults_validate_and_bad_values_are_named() {
        assert!(MultiStreamConfig::default().validate().is_ok());
        let zero = MultiStreamConfig::default().with_stream_discovery_interval(Duration::ZERO);
        assert!(matches!(
            zero.validate(),
            Err(Error::InvalidConfig { field, .. }) if field == "multi_stream.stream_discovery_interval"
        ));
        let huge = MultiStreamConfig::default()
            .with_former_streams_grace(Duration::from_secs(u64::from(u32::MAX)));
        assert!(matches!(
            huge.validate(),
            Err(Error::InvalidConfig { field, .. }) if field == "multi_stream.former_streams_grace"
        ));
    }
}
