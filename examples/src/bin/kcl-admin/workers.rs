//! `workers`: the owners in the lease table, and whether each renewed its leases while
//! watched. A worker holding no lease is not in the table, so it is not listed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::admin::Admin;
use crate::error::Result;
use crate::observe::{LeaseState, Watch, watch_table};
use crate::render::{Report, emit, human_duration, millis, table};

/// `workers`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    watch: Watch,
}

/// The `workers` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct WorkersReport {
    /// The lease table.
    table: String,
    /// How long the table was watched; 0: not watched.
    observed_ms: u64,
    /// Each owner at the end of the watch, by worker id.
    workers: Vec<WorkerRow>,
}

/// One owner of [`WorkersReport`].
#[derive(Debug, Serialize)]
struct WorkerRow {
    /// The worker id.
    worker: String,
    /// Leases it owns.
    leases: usize,
    /// Of those, how many it renewed while watched.
    renewed: usize,
    /// Whether it renewed any lease while watched: `true` (alive), `false` (stopped, or cut
    /// off from the table: its leases expire), `null` (not watched).
    renewing: Option<bool>,
}

pub(crate) async fn run(admin: &Admin, args: &Args) -> Result<()> {
    let view = watch_table(admin, args.watch.window()).await?;
    let watched = !view.window.is_zero();
    let mut owners: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for observed in &view.leases {
        if let Some(owner) = observed.lease.owner.as_deref() {
            let (leases, renewed) = owners.entry(owner).or_default();
            *leases += 1;
            *renewed += usize::from(observed.state == LeaseState::Active);
        }
    }
    let report = WorkersReport {
        table: admin.table.clone(),
        observed_ms: millis(view.window),
        workers: owners
            .into_iter()
            .map(|(worker, (leases, renewed))| WorkerRow {
                worker: worker.to_owned(),
                leases,
                renewed,
                renewing: watched.then_some(renewed > 0),
            })
            .collect(),
    };
    emit(&report, admin.json)
}

impl Report for WorkersReport {
    fn text(&self) -> String {
        let window = human_duration(Duration::from_millis(self.observed_ms));
        let rows: Vec<Vec<String>> = self
            .workers
            .iter()
            .map(|w| {
                let last = match w.renewing {
                    Some(true) => format!("renewed within {window}"),
                    Some(false) => format!("not renewed for ≥{window} (expired?)"),
                    None => "not watched".to_owned(),
                };
                vec![
                    w.worker.clone(),
                    w.leases.to_string(),
                    w.renewing
                        .map_or_else(|| "-".to_owned(), |_| w.renewed.to_string()),
                    last,
                ]
            })
            .collect();
        format!(
            "lease table {}: {} worker(s) own leases\n{}",
            self.table,
            self.workers.len(),
            table(&["worker", "leases", "renewed", "last renewal"], &rows)
        )
    }
}
