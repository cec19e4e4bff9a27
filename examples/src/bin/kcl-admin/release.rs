//! `release --worker ID`: frees every lease a worker owns at once, instead of waiting for them
//! to expire, so other workers take them in their next taking round.
//!
//! Each release clears the owner and moves the counter, fenced on the lease as read: the
//! worker, should it still run, sees an owner switch at its next write and stops the shard
//! (a lost lease), never a write under its own name. Leases whose counter moved while
//! watched belong to a live worker and are refused unless `--force`.

use serde::Serialize;

use crate::admin::Admin;
use crate::error::{AdminError, Result};
use crate::observe::{LeaseState, Observed, Watch, watch_table};
use crate::render::{Report, emit, human_duration, millis, table};
use crate::writes::write;

/// `release`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The worker whose leases to release.
    #[arg(long, value_name = "ID")]
    worker: String,
    /// Release leases the worker renewed while watched too (it loses them at its next write).
    #[arg(long)]
    force: bool,
    /// Print what would be released, and write nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    watch: Watch,
}

/// The `release` output (`--json`). Printed also when some leases were refused or changed
/// (exit 3 or 5): the others were released.
#[derive(Debug, Serialize)]
pub(crate) struct ReleaseReport {
    /// The lease table.
    table: String,
    /// The worker.
    worker: String,
    /// How long the table was watched; 0: not watched.
    observed_ms: u64,
    /// True when nothing was written.
    dry_run: bool,
    /// Each lease the worker owned, by lease key.
    leases: Vec<Released>,
}

/// What happened to one lease.
#[derive(Debug, Serialize)]
struct Released {
    lease_key: String,
    /// `released`, `would_release` (dry run), `refused`, or `changed` (it moved between the
    /// read and the write: nothing written).
    outcome: Outcome,
    /// Why, for `refused` and `changed`.
    reason: Option<String>,
    /// The counter as read.
    counter: u64,
    /// The counter after the release.
    counter_after: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Released,
    WouldRelease,
    Refused,
    Changed,
}

pub(crate) async fn run(admin: &Admin, args: &Args) -> Result<()> {
    // With --force the owner's liveness does not matter: no watch.
    let window = if args.force {
        std::time::Duration::ZERO
    } else {
        args.watch.window()
    };
    let view = watch_table(admin, window).await?;
    let owned: Vec<&Observed> = view
        .leases
        .iter()
        .filter(|o| o.lease.owner.as_deref() == Some(args.worker.as_str()))
        .collect();
    if owned.is_empty() {
        return Err(AdminError::WorkerOwnsNoLease {
            table: admin.table.clone(),
            worker: args.worker.clone(),
        });
    }
    let mut leases = Vec::with_capacity(owned.len());
    for Observed { lease, state } in owned {
        let refusal = match state {
            _ if args.force => None,
            LeaseState::Active => Some(format!(
                "renewed within {}: the worker is alive",
                human_duration(window)
            )),
            LeaseState::Owned => Some("not watched (--observe 0): the worker may be alive".into()),
            _ => None,
        };
        let (outcome, reason, counter_after) = match refusal {
            Some(reason) => (Outcome::Refused, Some(reason), None),
            None if args.dry_run => (Outcome::WouldRelease, None, Some(lease.counter + 1)),
            None => match write(admin, lease, &kcl_core::LeaseUpdate::Release).await {
                Ok(after) => (Outcome::Released, None, Some(after.counter)),
                Err(e @ AdminError::ChangedMeanwhile { .. }) => {
                    (Outcome::Changed, Some(e.to_string()), None)
                }
                Err(e) => return Err(e),
            },
        };
        leases.push(Released {
            lease_key: lease.lease_key.clone(),
            outcome,
            reason,
            counter: lease.counter,
            counter_after,
        });
    }
    let count = |outcome| leases.iter().filter(|l| l.outcome == outcome).count();
    let (refused, changed) = (count(Outcome::Refused), count(Outcome::Changed));
    let report = ReleaseReport {
        table: admin.table.clone(),
        worker: args.worker.clone(),
        observed_ms: millis(window),
        dry_run: args.dry_run,
        leases,
    };
    emit(&report, admin.json)?;
    if refused + changed > 0 {
        return Err(AdminError::ReleaseIncomplete {
            worker: args.worker.clone(),
            refused,
            changed,
        });
    }
    Ok(())
}

impl Report for ReleaseReport {
    fn text(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .leases
            .iter()
            .map(|l| {
                let counter = match l.counter_after {
                    Some(after) => format!("{} -> {after}", l.counter),
                    None => l.counter.to_string(),
                };
                let outcome = match l.outcome {
                    Outcome::Released => "released",
                    Outcome::WouldRelease => "would release",
                    Outcome::Refused => "refused",
                    Outcome::Changed => "changed meanwhile",
                };
                vec![
                    l.lease_key.clone(),
                    outcome.to_owned(),
                    counter,
                    l.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut out = format!(
            "leases of worker {} in table {}:\n",
            self.worker, self.table
        );
        out.push_str(&table(&["lease", "outcome", "counter", "reason"], &rows));
        if self.dry_run {
            out.push_str("dry run: nothing written\n");
        }
        out
    }
}
