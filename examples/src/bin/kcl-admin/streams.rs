//! `streams`: the streams of a multi-stream application's lease table, each with its leases
//! by state and the workers that own them. A stream with leases but none active is not being
//! processed: its workers stopped, or it is a former stream whose leases wait for the grace
//! period (or stay forever when no worker runs to delete them).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kcl_core::MultiStreamLeaseKey;
use serde::Serialize;

use crate::admin::Admin;
use crate::error::{AdminError, Result};
use crate::observe::{LeaseState, Watch, watch_table};
use crate::render::{Report, emit, human_duration, millis, table};

/// `streams`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    watch: Watch,
}

/// The `streams` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct StreamsReport {
    /// The lease table.
    table: String,
    /// How long the table was watched; 0: not watched.
    observed_ms: u64,
    /// Each stream with leases in the table, by identity.
    streams: Vec<StreamRow>,
}

/// One stream of [`StreamsReport`].
#[derive(Debug, Default, Serialize)]
struct StreamRow {
    /// `ACCOUNT:STREAM:CREATION_EPOCH`.
    stream: String,
    /// The stream's name.
    name: String,
    /// Its creation time, seconds since the epoch: a stream recreated under its name has
    /// another.
    creation_epoch: u64,
    /// Its leases.
    leases: usize,
    /// Of those: finished (`SHARD_END`), unowned, renewed while watched (active), owned but
    /// not renewed while watched (expired), owned and not watched.
    finished: usize,
    unowned: usize,
    active: usize,
    expired: usize,
    owned: usize,
    /// The workers owning its leases.
    workers: BTreeSet<String>,
}

pub(crate) async fn run(admin: &Admin, args: &Args) -> Result<()> {
    let view = watch_table(admin, args.watch.window()).await?;
    let mut streams: BTreeMap<String, StreamRow> = BTreeMap::new();
    for observed in &view.leases {
        let key = MultiStreamLeaseKey::parse(&observed.lease.lease_key).map_err(|_| {
            AdminError::NotMultiStream {
                table: admin.table.clone(),
                lease_key: observed.lease.lease_key.clone(),
            }
        })?;
        let identity = key.stream.to_string();
        let row = streams
            .entry(identity.clone())
            .or_insert_with(|| StreamRow {
                stream: identity,
                name: key.stream.stream_name().to_owned(),
                creation_epoch: key.stream.creation_epoch(),
                ..StreamRow::default()
            });
        row.leases += 1;
        *match observed.state {
            LeaseState::Finished => &mut row.finished,
            LeaseState::Unowned => &mut row.unowned,
            LeaseState::Active => &mut row.active,
            LeaseState::Expired => &mut row.expired,
            LeaseState::Owned => &mut row.owned,
        } += 1;
        if let Some(owner) = &observed.lease.owner {
            row.workers.insert(owner.clone());
        }
    }
    let report = StreamsReport {
        table: admin.table.clone(),
        observed_ms: millis(view.window),
        streams: streams.into_values().collect(),
    };
    emit(&report, admin.json)
}

impl Report for StreamsReport {
    fn text(&self) -> String {
        let watched = self.observed_ms > 0;
        let window = human_duration(Duration::from_millis(self.observed_ms));
        let rows: Vec<Vec<String>> = self
            .streams
            .iter()
            .map(|s| {
                let processed = if !watched {
                    "not watched".to_owned()
                } else if s.active > 0 {
                    format!("yes (renewed within {window})")
                } else if s.finished == s.leases {
                    "finished".to_owned()
                } else {
                    "no".to_owned()
                };
                vec![
                    s.stream.clone(),
                    s.leases.to_string(),
                    s.finished.to_string(),
                    s.unowned.to_string(),
                    if watched {
                        format!("{}/{}", s.active, s.expired)
                    } else {
                        format!("{} owned", s.owned)
                    },
                    s.workers.len().to_string(),
                    processed,
                ]
            })
            .collect();
        format!(
            "lease table {}: {} stream(s)\n{}",
            self.table,
            self.streams.len(),
            table(
                &[
                    "stream",
                    "leases",
                    "finished",
                    "unowned",
                    "active/expired",
                    "workers",
                    "processed",
                ],
                &rows
            )
        )
    }
}
