//! Lease items that do not decode, as one worker sees them.
//!
//! An item that does not decode (say a `leaseCounter` rewritten as text by hand) is skipped:
//! one garbage item must not stop a fleet. But its shard is then processed by nobody until an
//! operator repairs the item, so each one is reported as an error, with the command that
//! repairs it, and counted in [`WorkerStatus::invalid_lease_items`].
//!
//! Two tasks of a worker scan the whole table, the coordinator's taking rounds and the shard
//! syncer, so they share one [`InvalidItems`]: each item is reported once per worker, not once
//! per task. An item no longer invalid at a later scan (repaired, or deleted) is forgotten,
//! so if it breaks again it is reported again.
//!
//! The two tasks' scans run concurrently and may finish in either order. Each scan takes a
//! ticket before it is sent, and a scan older than one already applied is ignored: otherwise
//! a scan sent before a repair and answered after a newer one would bring the repaired item
//! back and report it a second time. Ignoring it only delays a report to the next scan.
//!
//! [`WorkerStatus::invalid_lease_items`]: crate::WorkerStatus::invalid_lease_items

use std::collections::BTreeSet;
use std::sync::Mutex;

use tracing::error;

use crate::error::Error;

/// The invalid items of one worker's lease table; see the module documentation.
#[derive(Debug)]
pub(crate) struct InvalidItems {
    /// The application name, for the repair command.
    application: String,
    /// The lease table, for the repair command.
    table: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last ticket handed out.
    issued: u64,
    /// The ticket of the newest scan applied.
    applied: u64,
    /// Keys of the items invalid at the newest scan applied: each reported once.
    reported: BTreeSet<String>,
}

impl InvalidItems {
    pub(crate) fn new(application: impl Into<String>, table: impl Into<String>) -> Self {
        InvalidItems {
            application: application.into(),
            table: table.into(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket for a scan of the whole table about to be sent.
    pub(crate) fn ticket(&self) -> u64 {
        let mut state = self.state();
        state.issued += 1;
        state.issued
    }

    /// Applies the invalid items of a whole-table scan sent with `ticket`: reports each item
    /// not reported yet, and forgets those no longer invalid. Returns the keys reported now.
    pub(crate) fn scanned(&self, ticket: u64, invalid: &[Error]) -> Vec<String> {
        let mut state = self.state();
        if ticket <= state.applied {
            return Vec::new();
        }
        state.applied = ticket;
        let mut now = BTreeSet::new();
        let mut reported = Vec::new();
        for item in invalid {
            let key = match item {
                Error::InvalidLeaseItem { lease_key, .. } => lease_key.clone(),
                other => other.to_string(),
            };
            if !state.reported.contains(&key) && !now.contains(&key) {
                self.report(item);
                reported.push(key.clone());
            }
            now.insert(key);
        }
        state.reported = now;
        reported
    }

    /// How many items did not decode at the newest scan applied.
    pub(crate) fn count(&self) -> usize {
        self.state().reported.len()
    }

    fn report(&self, item: &Error) {
        match item {
            Error::InvalidLeaseItem {
                table,
                lease_key,
                attribute,
                problem,
            } => error!(
                %table,
                %lease_key,
                attribute,
                %problem,
                repair = %repair_command(&self.application, &self.table, lease_key),
                "a lease item does not decode: its shard is processed by no worker until the item is repaired"
            ),
            other => error!(error = %crate::ErrorChain(other), "a lease item does not decode"),
        }
    }
}

/// The `kcl-admin` command that repairs the item of `lease_key`.
pub(crate) fn repair_command(application: &str, table: &str, lease_key: &str) -> String {
    if table == application {
        format!("kcl-admin --app {application} repair {lease_key}")
    } else {
        format!("kcl-admin --app {application} --lease-table {table} repair {lease_key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(key: &str) -> Error {
        Error::InvalidLeaseItem {
            table: "app".into(),
            lease_key: key.into(),
            attribute: "leaseCounter",
            problem: "is a string, not a number".into(),
        }
    }

    #[test]
    fn each_item_is_reported_once_until_it_is_repaired() {
        let items = InvalidItems::new("app", "app");
        let (a, b) = (invalid("shardId-a"), invalid("shardId-b"));
        assert_eq!(items.scanned(items.ticket(), &[a]), ["shardId-a"]);
        let a = invalid("shardId-a");
        assert!(items.scanned(items.ticket(), &[a]).is_empty(), "once");
        let a = invalid("shardId-a");
        assert_eq!(items.scanned(items.ticket(), &[a, b]), ["shardId-b"]);
        assert_eq!(items.count(), 2);
        // shardId-a repaired, then broken again.
        assert!(
            items
                .scanned(items.ticket(), &[invalid("shardId-b")])
                .is_empty()
        );
        assert_eq!(items.count(), 1);
        let again = [invalid("shardId-a"), invalid("shardId-b")];
        assert_eq!(items.scanned(items.ticket(), &again), ["shardId-a"]);
    }

    #[test]
    fn a_scan_older_than_one_applied_is_ignored() {
        let items = InvalidItems::new("app", "app");
        assert_eq!(
            items.scanned(items.ticket(), &[invalid("shardId-a")]),
            ["shardId-a"]
        );
        // A sync's scan sent before the repair, answered after a taking round's scan that
        // saw the item repaired.
        let (older, newer) = (items.ticket(), items.ticket());
        assert!(items.scanned(newer, &[]).is_empty());
        assert!(
            items.scanned(older, &[invalid("shardId-a")]).is_empty(),
            "not reported again"
        );
        assert_eq!(items.count(), 0);
    }

    #[test]
    fn the_repair_command_names_the_table_only_when_it_is_not_the_application() {
        assert_eq!(
            repair_command("orders", "orders", "shardId-000000000001"),
            "kcl-admin --app orders repair shardId-000000000001"
        );
        assert_eq!(
            repair_command("orders", "orders-leases", "shardId-000000000001"),
            "kcl-admin --app orders --lease-table orders-leases repair shardId-000000000001"
        );
    }
}
