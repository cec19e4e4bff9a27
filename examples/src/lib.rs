//! Helpers shared by the example CLIs (`kcl-consumer`, `kcl-producer`, `kcl-agent`,
//! `kcl-archive`), and the building blocks of the agent and the archive.

use std::time::{Duration, SystemTime};

use base64::Engine;
use kcl_core::{ErrorChain, InitialPosition, Record};
use serde::Serialize;

pub mod agent;
pub mod archive;
pub mod health;
pub mod kpl;
pub mod signals;
pub mod summary;
pub mod worker_args;
pub mod worker_run;

/// The workspace README, compiled as a doctest so its example cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// Logs to stderr, at `RUST_LOG` or `info`, in colour only on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Logs an error that ends a program, with its chain of causes (see [`ErrorChain`]).
pub fn log_failure(program: &str, error: &(dyn std::error::Error + 'static)) {
    tracing::error!(error = %ErrorChain(error), "{program} failed");
}

/// Parses `500ms`, `10s`, `2m` or a bare number of milliseconds. A number too large to be a
/// duration is an error, never a wrapped value (the worker's configuration then bounds it).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "ms"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 10s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{text}` is too long a duration")),
        _ => Err(format!("`{text}`: unit must be ms, s or m")),
    }
}

/// Parses a size in bytes: `512`, `64KB`, `5MB`, `1GB` (powers of 1024; `KiB`, `MiB` and `GiB`
/// are accepted too). Zero, and a size too large to count, are errors.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const KIB: u64 = 1024;
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 512, 64KB or 5MB"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KB" | "KiB" => KIB,
        "MB" | "MiB" => KIB * KIB,
        "GB" | "GiB" => KIB * KIB * KIB,
        other => return Err(format!("`{text}`: unit `{other}` is not B, KB, MB or GB")),
    };
    match n.checked_mul(scale) {
        Some(0) => Err(format!("`{text}`: a size must be more than 0")),
        Some(bytes) => Ok(bytes),
        None => Err(format!("`{text}` is too large a size")),
    }
}

/// Parses `trim-horizon`, `latest` or `at-timestamp=RFC3339`.
pub fn parse_initial_position(text: &str) -> Result<InitialPosition, String> {
    match text {
        "trim-horizon" | "TRIM_HORIZON" => Ok(InitialPosition::TrimHorizon),
        "latest" | "LATEST" => Ok(InitialPosition::Latest),
        other => {
            let Some(at) = other.strip_prefix("at-timestamp=") else {
                return Err(format!(
                    "`{other}`: expected trim-horizon, latest or at-timestamp=RFC3339"
                ));
            };
            let time = aws_smithy_types::DateTime::from_str(
                at,
                aws_smithy_types::date_time::Format::DateTime,
            )
            .map_err(|e| format!("`{at}` is not an RFC 3339 time: {e}"))?;
            let time = SystemTime::try_from(time).map_err(|e| format!("`{at}`: {e}"))?;
            Ok(InitialPosition::AtTimestamp(time))
        }
    }
}

#[derive(Serialize)]
struct RecordLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a str>,
    shard_id: &'a str,
    sequence_number: &'a str,
    sub_sequence_number: u64,
    partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

/// One record as a JSON object: `data` as text when it is UTF-8, else `data_base64`.
pub fn record_json_line(shard_id: &str, record: &Record) -> String {
    stream_record_json_line(None, shard_id, record)
}

/// One record as a JSON object, with its stream's name first when there is one (multi-stream
/// mode).
pub fn stream_record_json_line(stream: Option<&str>, shard_id: &str, record: &Record) -> String {
    let text = std::str::from_utf8(&record.data).ok();
    let line = RecordLine {
        stream,
        shard_id,
        sequence_number: record.sequence_number.as_str(),
        sub_sequence_number: record.sub_sequence_number,
        partition_key: &record.partition_key,
        data: text,
        data_base64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&record.data)),
    };
    serde_json::to_string(&line).expect("a record line serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcl_core::SequenceNumber;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        // 307445734561825861 minutes overflow u64 seconds: an error, not a wrapped 44 s.
        assert!(parse_duration("307445734561825861m").is_err());
        assert!(parse_duration("18446744073709551616s").is_err());
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KB"), Ok(64 * 1024));
        assert_eq!(parse_size("5MB"), Ok(5 * 1024 * 1024));
        assert_eq!(parse_size("5MiB"), Ok(5 * 1024 * 1024));
        assert_eq!(parse_size("1GB"), Ok(1024 * 1024 * 1024));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5TB").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("18446744073709551615GB").is_err());
    }

    #[test]
    fn initial_positions() {
        assert_eq!(
            parse_initial_position("trim-horizon"),
            Ok(InitialPosition::TrimHorizon)
        );
        assert_eq!(
            parse_initial_position("latest"),
            Ok(InitialPosition::Latest)
        );
        let at = parse_initial_position("at-timestamp=2024-05-01T12:00:00Z").unwrap();
        let InitialPosition::AtTimestamp(t) = at else {
            panic!("{at:?}")
        };
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_714_564_800
        );
        assert!(parse_initial_position("at-timestamp=yesterday").is_err());
        assert!(parse_initial_position("oldest").is_err());
    }

    #[test]
    fn record_lines_use_text_or_base64() {
        let seq = SequenceNumber::new("495903382714902566085596925383615710959").unwrap();
        let text = Record::new(seq.clone(), "k", "héllo \"x\"");
        let line: serde_json::Value =
            serde_json::from_str(&record_json_line("shardId-1", &text)).unwrap();
        assert_eq!(line["data"], "héllo \"x\"");
        assert_eq!(line["shard_id"], "shardId-1");
        assert_eq!(line["sequence_number"], seq.as_str());
        assert_eq!(line["sub_sequence_number"], 0);
        assert!(line.get("data_base64").is_none());
        let binary = Record::new(seq, "k", vec![0xff, 0x00, 0xfe]);
        let line: serde_json::Value =
            serde_json::from_str(&record_json_line("shardId-1", &binary)).unwrap();
        assert_eq!(line["data_base64"], "/wD+");
        assert!(line.get("data").is_none());
    }
}
