//! Text output: durations, times and aligned tables for a person; JSON for a program.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime};

use aws_smithy_types::DateTime;
use aws_smithy_types::date_time::Format;
use kcl_core::Lease;
use serde::Serialize;

use crate::error::{AdminError, Result};

/// What a command prints: a text for a person, and with `--json` one JSON document (its
/// `Serialize` form).
pub(crate) trait Report: Serialize {
    /// The text form, ending with a newline.
    fn text(&self) -> String;
}

/// Prints `report` on stdout, as JSON when `json`.
pub(crate) fn emit(report: &impl Report, json: bool) -> Result<()> {
    let text = if json {
        let mut doc = serde_json::to_string_pretty(report).map_err(|e| AdminError::Io {
            what: "writing the JSON output",
            source: e.into(),
        })?;
        doc.push('\n');
        doc
    } else {
        report.text()
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| AdminError::Io {
            what: "writing to stdout",
            source,
        })
}

/// A lease in JSON output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct LeaseSummary {
    /// `leaseKey`: the shard id.
    pub(crate) lease_key: String,
    /// `leaseOwner`; `null` when unowned.
    pub(crate) owner: Option<String>,
    /// `leaseCounter`.
    pub(crate) counter: u64,
    /// `checkpoint`: a sequence number, or `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`,
    /// `SHARD_END`.
    pub(crate) checkpoint: String,
    /// `checkpointSubSequenceNumber`.
    pub(crate) sub_sequence_number: u64,
    /// `parentShardId`.
    pub(crate) parents: Vec<String>,
}

impl From<&Lease> for LeaseSummary {
    fn from(lease: &Lease) -> Self {
        LeaseSummary {
            lease_key: lease.lease_key.clone(),
            owner: lease.owner.clone(),
            counter: lease.counter,
            checkpoint: lease.checkpoint.as_text().to_owned(),
            sub_sequence_number: lease.checkpoint.sub_sequence_number(),
            parents: lease.parent_shard_ids.iter().cloned().collect(),
        }
    }
}

/// An owner for a person: the worker id, or `-`.
pub(crate) fn owner_text(owner: Option<&str>) -> String {
    owner.unwrap_or("-").to_owned()
}

/// `250ms`, `4s`, `1.5s`, `2m05s`, `3h07m`.
pub(crate) fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        1_000..60_000 => format!("{:.1}s", d.as_secs_f64()),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1_000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// RFC 3339 in UTC, e.g. `2024-05-01T12:00:00.250Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    DateTime::from(t)
        .fmt(Format::DateTime)
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// Milliseconds of `d`, saturated, for JSON.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Rows under a header, each column as wide as its widest cell, two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_secs(4)), "4s");
        assert_eq!(human_duration(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(
            human_duration(Duration::from_secs(3 * 3600 + 7 * 60)),
            "3h07m"
        );
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let text = table(
            &["shard", "owner"],
            &[
                vec!["shardId-1".into(), "w".into()],
                vec!["s".into(), "worker-2".into()],
            ],
        );
        assert_eq!(
            text,
            "shard      owner\nshardId-1  w\ns          worker-2\n"
        );
    }
}
