//! `kcl-agent`'s building blocks: tail log files into a Kinesis stream, as the AWS Kinesis
//! Agent does, at least once, in order per partition key. See `docs/agent.md`.
//!
//! - [`tail`]: the files matched by the globs, through rotation, line by line;
//! - [`partition`]: which partition key a line gets (pure);
//! - [`batch`]: lines into `PutRecords` batches, optionally KPL-aggregated (pure);
//! - [`send`]: `PutRecords` with retries of failed entries, the one place that decides what is
//!   retried;
//! - [`state`]: how far each file was shipped, and the state file;
//! - [`run`]: the loop that ties them together, one call in flight.

pub mod batch;
pub mod partition;
pub mod run;
pub mod send;
pub mod state;
pub mod tail;

use std::path::PathBuf;
use std::time::Duration;

pub use batch::{Limits, MAX_BATCH_BYTES, MAX_BATCH_RECORDS};
pub use partition::PartitionKey;
pub use run::Agent;
pub use send::{KinesisPutRecords, PutRecords};

/// The smallest `--max-batch-bytes`: room for a record of a 256-character key (up to 1 KiB
/// of UTF-8) and some data.
pub const MIN_BATCH_BYTES: usize = 4 * 1024;

/// Where a file found at start-up begins, when the state file does not know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// At its end (at the start of its last line when that is not finished), as `tail -f`:
    /// only lines written from now on are shipped.
    #[default]
    End,
    /// At its start: the whole file is shipped.
    Start,
}

/// What the agent does: the settings of `kcl-agent`, with its defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The stream: a name, or an ARN.
    pub stream: String,
    /// Paths or globs of the files to follow.
    pub files: Vec<String>,
    /// Where files found at start-up begin (default: at their end).
    pub start_at: StartAt,
    /// The state file (default: `kcl-agent.state.json` in the current directory).
    pub state_file: PathBuf,
    /// How lines are keyed (default: a random key per record).
    pub partition_key: PartitionKey,
    /// Batch limits, linger and aggregation (default: 500 records, 5 MiB, 200 ms, none).
    pub limits: Limits,
    /// How often the globs are matched again and followed files checked for rotation
    /// (default: 250 ms).
    pub poll_interval: Duration,
    /// Ship what the files hold now, then stop (default: follow until stopped).
    pub once: bool,
    /// How long a shutdown may spend sending what was read (default: 20 s).
    pub shutdown_timeout: Duration,
}

impl AgentConfig {
    /// The defaults, for `stream` and the files `files` names.
    pub fn new(stream: impl Into<String>, files: Vec<String>) -> Self {
        AgentConfig {
            stream: stream.into(),
            files,
            start_at: StartAt::End,
            state_file: PathBuf::from("kcl-agent.state.json"),
            partition_key: PartitionKey::Random,
            limits: Limits::default(),
            poll_interval: Duration::from_millis(250),
            once: false,
            shutdown_timeout: Duration::from_secs(20),
        }
    }

    /// Where files found at start-up begin.
    #[must_use]
    pub fn with_start_at(mut self, start_at: StartAt) -> Self {
        self.start_at = start_at;
        self
    }

    /// The state file.
    #[must_use]
    pub fn with_state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_file = path.into();
        self
    }

    /// How lines are keyed.
    #[must_use]
    pub fn with_partition_key(mut self, key: PartitionKey) -> Self {
        self.partition_key = key;
        self
    }

    /// Batch limits, linger and aggregation.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How often files are looked for and checked.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Ship what the files hold, then stop.
    #[must_use]
    pub fn with_once(mut self, once: bool) -> Self {
        self.once = once;
        self
    }

    /// How long a shutdown may spend sending.
    #[must_use]
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Checks the settings against Kinesis's limits, and the globs.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the option; [`Error::Pattern`].
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |option, problem: String| Err(Error::InvalidConfig { option, problem });
        if self.stream.is_empty() {
            return invalid("--stream", "must not be empty".into());
        }
        if self.files.is_empty() {
            return invalid("--file", "at least one path or glob is needed".into());
        }
        for pattern in &self.files {
            glob::Pattern::new(pattern).map_err(|source| Error::Pattern {
                pattern: pattern.clone(),
                source,
            })?;
        }
        if !(1..=MAX_BATCH_RECORDS).contains(&self.limits.max_records) {
            return invalid(
                "--max-batch-records",
                format!(
                    "{} is not between 1 and {MAX_BATCH_RECORDS} (PutRecords' limit)",
                    self.limits.max_records
                ),
            );
        }
        if !(MIN_BATCH_BYTES..=MAX_BATCH_BYTES).contains(&self.limits.max_bytes) {
            return invalid(
                "--max-batch-bytes",
                format!(
                    "{} bytes is not between 4KB and 5MB (PutRecords' limit)",
                    self.limits.max_bytes
                ),
            );
        }
        if self.poll_interval.is_zero() {
            return invalid("--poll-interval", "must be more than 0".into());
        }
        Ok(())
    }
}

/// What the agent did, printed as one JSON line when it exits.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Lines shipped (acknowledged by `PutRecords`).
    pub lines: u64,
    /// Bytes of those lines, without their newlines.
    pub bytes: u64,
    /// Kinesis records put (an aggregated record counts once).
    pub records: u64,
    /// `PutRecords` calls made.
    pub put_calls: u64,
    /// Entries sent again after a failed entry or call.
    pub entries_retried: u64,
    /// Wall time, in seconds.
    pub seconds: f64,
}

/// What can stop the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is out of range.
    #[error("{option}: {problem}")]
    InvalidConfig {
        /// The command-line option.
        option: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A `--file` value is not a valid glob.
    #[error("--file `{pattern}` is not a valid glob")]
    Pattern {
        /// The value.
        pattern: String,
        /// Why.
        #[source]
        source: glob::PatternError,
    },
    /// A followed file could not be read.
    #[error("reading {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state file could not be read or written.
    #[error("state file {path}")]
    State {
        /// The state file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not one this agent wrote.
    #[error("state file {path} is unreadable: {problem} (move it away to start afresh)")]
    StateCorrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `PutRecords` failed in a way a retry would not fix (no such stream, access denied).
    #[error("PutRecords to {stream} failed")]
    Put {
        /// The stream.
        stream: String,
        /// The SDK's error.
        #[source]
        source: kcl_core::BoxError,
    },
    /// An entry was rejected with an error that a retry would not fix (a KMS key disabled).
    #[error("PutRecords to {stream}: an entry was rejected with {code}: {message}")]
    EntryRejected {
        /// The stream.
        stream: String,
        /// The entry's error code.
        code: String,
        /// The entry's error message.
        message: String,
    },
    /// The answer did not have one result per entry.
    #[error("PutRecords to {stream}: {answered} results for {sent} entries")]
    MalformedAnswer {
        /// The stream.
        stream: String,
        /// Entries sent.
        sent: usize,
        /// Results received.
        answered: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_against_kinesis_limits() {
        let config = AgentConfig::new("s", vec!["/var/log/*.log".into()]);
        assert!(config.validate().is_ok());
        let with = |limits: Limits| config.clone().with_limits(limits).validate();
        let limits = Limits::default();
        for (records, bytes, ok) in [
            (500, MAX_BATCH_BYTES, true),
            (1, MIN_BATCH_BYTES, true),
            (0, MAX_BATCH_BYTES, false),
            (501, MAX_BATCH_BYTES, false),
            (500, MAX_BATCH_BYTES + 1, false),
            (500, 1024, false),
        ] {
            let result = with(Limits {
                max_records: records,
                max_bytes: bytes,
                ..limits
            });
            assert_eq!(
                result.is_ok(),
                ok,
                "{records} records, {bytes} bytes: {result:?}"
            );
        }
        assert!(AgentConfig::new("s", vec![]).validate().is_err());
        assert!(AgentConfig::new("", vec!["a".into()]).validate().is_err());
        let glob = AgentConfig::new("s", vec!["/var/log/[".into()]).validate();
        assert!(matches!(glob, Err(Error::Pattern { .. })), "{glob:?}");
        let zero = config.with_poll_interval(Duration::ZERO).validate();
        assert!(matches!(
            zero,
            Err(Error::InvalidConfig {
                option: "--poll-interval",
                ..
            })
        ));
    }
}
