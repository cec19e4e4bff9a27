//! `repair KEY`: rewrites a lease item that does not decode as a lease without an owner,
//! which the next taking round of any worker takes ([`DynamoLeaseStore::repair_lease`]).
//!
//! It keeps every attribute that decodes (checkpoint, parents, hash key range, ...), gives
//! `leaseCounter` a fresh value above any the lease had, and prints each attribute it
//! changed. It refuses, writing nothing, when the checkpoint does not decode (then
//! `--checkpoint TRIM_HORIZON|LATEST|SEQUENCE_NUMBER` says where the shard resumes), when the
//! parents do not decode, and when the item changed while it was repaired. An item that
//! decodes is left alone. Workers log this command for each item they skip.
//!
//! [`DynamoLeaseStore::repair_lease`]: kcl_dynamo_lease::DynamoLeaseStore::repair_lease

use kcl_core::{Checkpoint, SequenceNumber};
use kcl_dynamo_lease::{Change, RepairError};
use serde::Serialize;

use crate::admin::Admin;
use crate::error::{AdminError, Result};
use crate::render::{LeaseSummary, Report, emit};

/// `repair`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The item's `leaseKey` (the shard id).
    lease_key: String,
    /// Where the shard resumes, when the stored checkpoint does not decode: TRIM_HORIZON
    /// (every record still in the shard, again), LATEST (new records only) or a sequence
    /// number (the records after it).
    #[arg(long, value_parser = parse_checkpoint)]
    checkpoint: Option<Checkpoint>,
}

fn parse_checkpoint(text: &str) -> std::result::Result<Checkpoint, String> {
    match text {
        Checkpoint::TRIM_HORIZON => Ok(Checkpoint::TrimHorizon),
        Checkpoint::LATEST => Ok(Checkpoint::Latest),
        other => SequenceNumber::new(other)
            .map(|seq| Checkpoint::at(seq, 0))
            .map_err(|e| format!("expected TRIM_HORIZON, LATEST or a sequence number: {e}")),
    }
}

/// The `repair` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct RepairReport {
    /// The lease table.
    table: String,
    /// The item repaired.
    lease_key: String,
    /// False when the item decodes and was left alone.
    repaired: bool,
    /// Each attribute changed: `{attribute, before, after}`, values as text, `null` absent.
    changes: Vec<ChangeRow>,
    /// The lease as now stored, when repaired.
    lease: Option<LeaseSummary>,
}

#[derive(Debug, Serialize)]
struct ChangeRow {
    attribute: &'static str,
    before: Option<String>,
    after: Option<String>,
    #[serde(skip)]
    text: String,
}

impl From<&Change> for ChangeRow {
    fn from(change: &Change) -> Self {
        ChangeRow {
            attribute: change.attribute,
            before: change.before.clone(),
            after: change.after.clone(),
            text: change.to_string(),
        }
    }
}

pub(crate) async fn run(admin: &Admin, args: &Args) -> Result<()> {
    let report = match admin
        .store
        .repair_lease(&args.lease_key, args.checkpoint.clone())
        .await
    {
        Ok(repair) => RepairReport {
            table: admin.table.clone(),
            lease_key: args.lease_key.clone(),
            repaired: true,
            changes: repair.changes.iter().map(ChangeRow::from).collect(),
            lease: Some((&repair.lease).into()),
        },
        // The goal is reached: the item decodes.
        Err(RepairError::NothingToRepair { .. }) => RepairReport {
            table: admin.table.clone(),
            lease_key: args.lease_key.clone(),
            repaired: false,
            changes: Vec::new(),
            lease: None,
        },
        Err(e) => return Err(AdminError::Repair(e)),
    };
    emit(&report, admin.json)
}

impl Report for RepairReport {
    fn text(&self) -> String {
        let Some(lease) = &self.lease else {
            return format!(
                "lease `{}` in table `{}` decodes: nothing to repair\n",
                self.lease_key, self.table
            );
        };
        let mut out = format!(
            "repaired lease {} in table {}:\n",
            self.lease_key, self.table
        );
        for change in &self.changes {
            out.push_str(&format!("  {}\n", change.text));
        }
        let checkpoint = match lease.sub_sequence_number {
            0 => lease.checkpoint.clone(),
            sub => format!("{}/{sub}", lease.checkpoint),
        };
        out.push_str(&format!(
            "now: no owner, counter {}, checkpoint {checkpoint}\n",
            lease.counter
        ));
        out
    }
}
