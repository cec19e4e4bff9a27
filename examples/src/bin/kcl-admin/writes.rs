//! kcl-admin's lease writes: each one conditional on the lease as kcl-admin last read it.
//!
//! A worker fences its own writes the same way (owner and counter), so whatever kcl-admin
//! writes, a worker's write based on an older read fails instead of overwriting it, and the
//! reverse. Two rules keep workers sane (see `kcl_core::lease`):
//! - kcl-admin never writes a lease under a live owner's name. A worker that finds its lease's
//!   counter moved while it still names it as owner takes it for another process with its
//!   worker id and stops. So an owned lease is first *taken* (owner = kcl-admin's identity,
//!   counter + 1): the old owner's next renewal or checkpoint then fails its condition on
//!   an owner switch, the ordinary sign of a lost lease, and its consumer stops.
//! - a change is never retried blindly: a failed condition means the lease moved since the
//!   read, and what was decided on that read may no longer hold.

use kcl_core::{Checkpoint, Lease, LeaseStore as _, LeaseUpdate};

use crate::admin::Admin;
use crate::error::{AdminError, Result};

/// The writes that move `lease` to `checkpoint`: one checkpoint write on an unowned lease;
/// take, checkpoint and release on an owned one, so the new checkpoint is written under
/// kcl-admin's name and the lease is free again for any worker to take and resume from.
pub(crate) fn checkpoint_plan(
    lease: &Lease,
    checkpoint: Checkpoint,
    identity: &str,
) -> Vec<LeaseUpdate> {
    let write = LeaseUpdate::Checkpoint { checkpoint };
    if lease.owner.is_none() {
        vec![write]
    } else {
        vec![
            LeaseUpdate::Take {
                new_owner: identity.to_owned(),
            },
            write,
            LeaseUpdate::Release,
        ]
    }
}

/// The lease after `plan`, without writing.
pub(crate) fn apply_all(lease: &Lease, plan: &[LeaseUpdate]) -> Lease {
    plan.iter()
        .fold(lease.clone(), |l, update| update.apply(&l))
}

/// Writes `plan` to `lease`, each write fenced on the lease the previous one left. Returns
/// the lease after the last write.
///
/// # Errors
/// [`AdminError::ChangedMeanwhile`] when the first write finds the lease changed (nothing
/// written); [`AdminError::Interrupted`] when a later write fails, naming what was written.
pub(crate) async fn execute(admin: &Admin, lease: &Lease, plan: &[LeaseUpdate]) -> Result<Lease> {
    let mut current = lease.clone();
    for (i, update) in plan.iter().enumerate() {
        current = match write(admin, &current, update).await {
            Ok(next) => next,
            Err(e) if i == 0 => return Err(e),
            Err(e) => {
                let written: Vec<&str> = plan[..i].iter().map(LeaseUpdate::operation).collect();
                return Err(AdminError::Interrupted {
                    lease_key: lease.lease_key.clone(),
                    written: written.join(" and "),
                    owner: current.owner.clone().unwrap_or_default(),
                    checkpoint: current.checkpoint.to_string(),
                    source: Box::new(e),
                });
            }
        };
    }
    Ok(current)
}

/// One conditional write of `update` on `lease` as read.
///
/// A write whose answer was lost is retried by the SDK, and the retry finds the counter its
/// first attempt moved: when the stored lease is exactly what the update makes of the lease
/// read, the write landed, and that is its answer.
pub(crate) async fn write(admin: &Admin, lease: &Lease, update: &LeaseUpdate) -> Result<Lease> {
    let fence = lease.fence();
    match admin
        .store
        .update_lease(&lease.lease_key, &fence, update)
        .await
    {
        Ok(written) => Ok(written),
        Err(kcl_core::Error::LeaseConditionFailed { current, .. }) => match current {
            Some(stored) if *stored == update.apply(lease) => Ok(*stored),
            current => Err(AdminError::ChangedMeanwhile {
                lease_key: lease.lease_key.clone(),
                operation: update.operation(),
                expected: fence,
                current,
            }),
        },
        Err(e) => Err(AdminError::lease_store("writing the lease", e)),
    }
}

#[cfg(test)]
mod tests {
    use kcl_core::SequenceNumber;

    use super::*;

    #[test]
    fn an_owned_lease_is_taken_checkpointed_and_released_under_kcl_admins_name() {
        let lease = LeaseUpdate::Take {
            new_owner: "w1".into(),
        }
        .apply(&Lease::new("shardId-0", Checkpoint::TrimHorizon));
        let to = Checkpoint::at(SequenceNumber::new("42").unwrap(), 0);
        let plan = checkpoint_plan(&lease, to.clone(), "kcl-admin@h");
        let ops: Vec<&str> = plan.iter().map(LeaseUpdate::operation).collect();
        assert_eq!(ops, ["take", "checkpoint", "release"]);
        let after = apply_all(&lease, &plan);
        assert_eq!(after.checkpoint, to);
        assert_eq!(after.owner, None, "free for any worker");
        assert_eq!(after.counter, lease.counter + 3);
        let taken = plan[0].apply(&lease);
        assert_eq!(
            taken.owner.as_deref(),
            Some("kcl-admin@h"),
            "the checkpoint is written under kcl-admin's name, never under the old owner's"
        );
    }

    #[test]
    fn an_unowned_lease_takes_one_write() {
        let lease = Lease::new("shardId-0", Checkpoint::TrimHorizon);
        let plan = checkpoint_plan(&lease, Checkpoint::Latest, "kcl-admin@h");
        assert_eq!(plan.len(), 1);
        let after = apply_all(&lease, &plan);
        assert_eq!(after.checkpoint, Checkpoint::Latest);
        assert_eq!(after.owner, None);
        assert_eq!(after.counter, lease.counter + 1);
    }
}
