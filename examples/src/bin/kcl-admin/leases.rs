//! `leases`: the lease table as a person or a program reads it.

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

use crate::admin::Admin;
use crate::error::Result;
use crate::lag::{Lag, lag_of};
use crate::observe::{LeaseState, Observed, Watch, watch_table};
use crate::render::{LeaseSummary, Report, emit, human_duration, millis, owner_text, table};

/// Shards whose lag is measured at once (two Kinesis reads each).
const LAG_CONCURRENCY: usize = 8;

/// `leases`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    watch: Watch,
}

/// The `leases` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct LeasesReport {
    /// The lease table.
    table: String,
    /// The stream the lag was measured in; absent without `--stream`.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    /// How long the table was watched; 0: not watched.
    observed_ms: u64,
    /// Every lease that decodes, by lease key.
    leases: Vec<LeaseRow>,
    /// Every item that does not decode: no worker processes its shard until it is repaired.
    invalid: Vec<InvalidItem>,
}

/// One lease of [`LeasesReport`].
#[derive(Debug, Serialize)]
struct LeaseRow {
    #[serde(flatten)]
    lease: LeaseSummary,
    /// `finished`, `unowned`, `active`, `expired`, or `owned` (not watched).
    state: LeaseState,
    /// Present with `--stream`.
    #[serde(skip_serializing_if = "Option::is_none")]
    lag: Option<Lag>,
}

/// An item that does not decode.
#[derive(Debug, Serialize)]
struct InvalidItem {
    /// Its `leaseKey` (`?` when even that does not decode).
    lease_key: String,
    /// What does not decode.
    problem: String,
    /// The command that repairs it.
    repair: Option<String>,
}

pub(crate) async fn run(admin: &Admin, args: &Args) -> Result<()> {
    if let Some(stream) = admin.stream_if_given() {
        // A missing stream is said as such (and before the watch), not as every shard
        // missing.
        stream.retention().await?;
    }
    let view = watch_table(admin, args.watch.window()).await?;
    admin.check_stream(view.leases.iter().map(|o| &o.lease))?;
    let lags = match admin.stream_if_given() {
        Some(stream) => {
            let lags: Vec<Lag> = futures::stream::iter(&view.leases)
                .map(|observed| lag_of(stream, &observed.lease))
                .buffered(LAG_CONCURRENCY)
                .try_collect()
                .await?;
            lags.into_iter().map(Some).collect()
        }
        None => vec![None; view.leases.len()],
    };
    let invalid = view
        .invalid
        .iter()
        .map(|item| match item {
            kcl_core::Error::InvalidLeaseItem {
                lease_key,
                attribute,
                problem,
                ..
            } => InvalidItem {
                lease_key: lease_key.clone(),
                problem: format!("attribute `{attribute}` {problem}"),
                repair: Some(admin.repair_command(lease_key)),
            },
            other => InvalidItem {
                lease_key: "?".to_owned(),
                problem: kcl_core::ErrorChain(other).to_string(),
                repair: None,
            },
        })
        .collect();
    let report = LeasesReport {
        table: admin.table.clone(),
        stream: admin.stream_if_given().map(|s| s.name.clone()),
        observed_ms: millis(view.window),
        leases: view
            .leases
            .iter()
            .zip(lags)
            .map(|(Observed { lease, state }, lag)| LeaseRow {
                lease: lease.into(),
                state: *state,
                lag,
            })
            .collect(),
        invalid,
    };
    emit(&report, admin.json)
}

impl Report for LeasesReport {
    fn text(&self) -> String {
        let watched = match self.observed_ms {
            0 => "not watched".to_owned(),
            ms => format!("watched {}", human_duration(Duration::from_millis(ms))),
        };
        let mut out = match &self.stream {
            Some(stream) => format!("lease table {} (stream {stream}), {watched}\n", self.table),
            None => format!("lease table {}, {watched}\n", self.table),
        };
        let mut header = vec![
            "shard",
            "owner",
            "counter",
            "checkpoint",
            "parents",
            "state",
        ];
        if self.stream.is_some() {
            header.extend(["lag", "behind"]);
        }
        let rows: Vec<Vec<String>> = self
            .leases
            .iter()
            .map(|row| {
                let lease = &row.lease;
                let checkpoint = match lease.sub_sequence_number {
                    0 => lease.checkpoint.clone(),
                    sub => format!("{}/{sub}", lease.checkpoint),
                };
                let parents = if lease.parents.is_empty() {
                    "-".to_owned()
                } else {
                    lease.parents.join(",")
                };
                let mut cells = vec![
                    lease.lease_key.clone(),
                    owner_text(lease.owner.as_deref()),
                    lease.counter.to_string(),
                    checkpoint,
                    parents,
                    row.state.as_str().to_owned(),
                ];
                if let Some(lag) = &row.lag {
                    cells.extend([lag.text(), lag.behind_text()]);
                }
                cells
            })
            .collect();
        out.push_str(&table(&header, &rows));
        for item in &self.invalid {
            out.push_str(&format!("INVALID {}: {}\n", item.lease_key, item.problem));
            if let Some(repair) = &item.repair {
                out.push_str(&format!(
                    "  no worker processes shard {} until it is repaired: {repair}\n",
                    item.lease_key
                ));
            }
        }
        out
    }
}
