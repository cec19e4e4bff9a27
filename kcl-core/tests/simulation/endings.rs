//! How a seed's bad day ends. Normally the faults stop and the fleet settles. Instead, the
//! lease table may vanish (an operator deletes it), a fault no fleet recovers from on its own
//! (issue 10): every worker's `run` must then end with `Error::LeaseTableNotFound` within
//! [`VANISH_BOUND`].

use std::time::Duration;

use kcl_core::Error;
use tokio::time::Instant;

use crate::Sim;
use crate::observe::violation;

/// Which ending a seed runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) enum Ending {
    /// The faults end and the fleet settles.
    #[default]
    Settle,
    /// The lease table is deleted.
    TableVanishes,
}

/// A worker ends within a renewal interval or a taking round of the table's deletion (the
/// first call that meets it), plus its shutdown: consumers of void leases stop at once, but
/// a processor call in flight (up to the simulation's slowest) is waited for, bounded by the
/// shutdown timeout.
const VANISH_BOUND: Duration = Duration::from_secs(30);
/// Long enough for a worker started with the fleet's faults off to have initialized.
const STARTED_WITHIN: Duration = Duration::from_secs(5);

impl Sim {
    /// Deletes the table and checks that every worker ends with the typed error in time.
    /// Leaves no worker running.
    pub(crate) async fn vanish_table(&mut self) {
        // Workers just started first create the table if it is missing (as a worker starting
        // after an operator deleted it would: a new, empty table, positions lost). That is
        // another story: here every worker is past its start-up when the table goes.
        tokio::time::sleep(STARTED_WITHIN).await;
        self.leases.drop_table();
        self.trace("the lease table vanishes".into());
        let deadline = Instant::now() + VANISH_BOUND;
        while !self.workers.is_empty() {
            let w = self.remove_worker(0);
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, w.task).await {
                Ok(Ok(Err(Error::LeaseTableNotFound { .. }))) => {}
                Ok(other) => violation(
                    &self.observed,
                    format!("{} ended with {other:?} after the table vanished", w.id),
                ),
                Err(_) => violation(
                    &self.observed,
                    format!(
                        "{} still running {VANISH_BOUND:?} after the table vanished",
                        w.id
                    ),
                ),
            }
        }
    }
}
