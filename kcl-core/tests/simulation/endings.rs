//! How a seed's bad day ends. Normally the faults stop and the fleet settles; two endings
//! instead end it with a fault no fleet recovers from on its own, each with its expected
//! outcome (issue 10):
//!
//! - the lease table vanishes (an operator deletes it): every worker's `run` ends with
//!   `Error::LeaseTableNotFound` within [`VANISH_BOUND`];
//! - a second process starts with the worker id of a running worker: within
//!   [`DUPLICATE_BOUND`] at least one of the two ends with `Error::DuplicateWorkerId` and
//!   neither ends otherwise; the fleet then settles as usual (every record flushed, balanced).

use std::time::Duration;

use kcl_core::Error;
use tokio::time::Instant;

use crate::Sim;
use crate::observe::{covered, violation};

/// Which ending a seed runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) enum Ending {
    /// The faults end and the fleet settles.
    #[default]
    Settle,
    /// The lease table is deleted.
    TableVanishes,
    /// A second process runs with an existing worker's id.
    SharedWorkerId,
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

    /// Starts a second process with the id of a running worker, one holding leases if any
    /// does (an idle duplicate writes nothing and cannot be told apart until it holds a
    /// lease). The fleet then settles with both; see [`Sim::reap_shared`].
    pub(crate) async fn share_worker_id(&mut self, seed: u64) {
        let holding: Vec<usize> = (0..self.workers.len())
            .filter(|&i| !self.workers[i].status.borrow().held_leases.is_empty())
            .collect();
        let i = if holding.is_empty() {
            self.rng.below(self.workers.len() as u64) as usize
        } else {
            holding[self.rng.below(holding.len() as u64) as usize]
        };
        let id = self.workers[i].id.clone();
        self.start_worker_as(&id, seed);
        self.shared_id = Some(id.clone());
        self.trace(format!("a second process runs as {id}"));
    }

    /// Removes the processes of the shared worker id that ended, each of which must have
    /// ended with `Error::DuplicateWorkerId`. Their leases are abandoned unreleased, so they
    /// expire: the id counts as disturbed from now (invariant 8), and it leaves the fleet once
    /// no process of it runs.
    pub(crate) async fn reap_shared(&mut self) {
        let Some(id) = self.shared_id.clone() else {
            return;
        };
        while let Some(j) = (0..self.workers.len())
            .find(|&j| self.workers[j].id == id && self.workers[j].task.is_finished())
        {
            let w = self.workers.remove(j);
            match w.task.await {
                Ok(Err(Error::DuplicateWorkerId { .. })) => {
                    covered(&self.observed, |c| c.duplicates_stopped += 1);
                    self.trace(format!("a process of {id} stopped: duplicate worker id"));
                }
                other => violation(
                    &self.observed,
                    format!("{id} (a shared id) ended with {other:?}"),
                ),
            }
            self.disturb(&id, Instant::now());
            if !self.workers.iter().any(|w| w.id == id) {
                self.observed.lock().unwrap().live.remove(&id);
            }
        }
    }
}
