//! Watching the lease table: is a lease's owner alive?
//!
//! The table says who owns a lease, not whether that worker still runs. A live worker renews
//! each lease it holds every renewal interval, and every renewal moves the lease's counter.
//! So kcl-admin reads the table, waits `--observe`, and reads it again: an owned lease whose
//! counter moved is *active*, one whose counter did not is *expired* (its owner stopped
//! without releasing it, or cannot reach the table). The window defaults to the library's
//! default renewal interval and a third, so every lease of a live worker with default
//! settings is renewed in it even when a renewal runs late; a fleet configured with a longer
//! `renewal_interval` needs a longer `--observe`, or its live leases look expired.
//!
//! "Expired" here means "not renewed while kcl-admin watched". Workers take a lease only
//! after it sat unchanged for a whole `lease_duration` (10 s by default) in their own eyes.

use std::collections::HashMap;
use std::time::Duration;

use kcl_core::{Lease, LeaseConfig};
use kcl_examples::parse_duration;
use serde::Serialize;

use crate::admin::Admin;
use crate::error::Result;

/// `--observe`: how long to watch the table.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct Watch {
    /// How long to watch the lease table for renewals, e.g. 500ms, 4s; 0 does not watch.
    /// Default: the library's default renewal interval and a third (about 4.7s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    observe: Option<Duration>,
}

impl Watch {
    /// The window, `--observe` or its default.
    pub(crate) fn window(&self) -> Duration {
        self.observe.unwrap_or_else(default_window)
    }
}

/// One renewal interval of [`LeaseConfig::default`] and a third.
pub(crate) fn default_window() -> Duration {
    let renewal = LeaseConfig::default().renewal_interval;
    renewal + renewal / 3
}

/// What the watch tells about a lease.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LeaseState {
    /// Checkpointed at `SHARD_END`: the shard was processed to its end.
    Finished,
    /// No owner: the next taking round of any worker takes it.
    Unowned,
    /// Owned, and its counter moved while watched: a live worker holds it.
    Active,
    /// Owned, and its counter did not move while watched.
    Expired,
    /// Owned, not watched (`--observe 0`).
    Owned,
}

impl LeaseState {
    /// The state of `now`, given the same lease `before` the watch (`None`: not watched, or
    /// absent then).
    pub(crate) fn of(before: Option<&Lease>, now: &Lease, watched: bool) -> Self {
        if now.is_finished() {
            LeaseState::Finished
        } else if now.owner.is_none() {
            LeaseState::Unowned
        } else if !watched {
            LeaseState::Owned
        } else if before.is_none_or(|b| b.counter != now.counter) {
            // Created or written during the watch: someone alive wrote it.
            LeaseState::Active
        } else {
            LeaseState::Expired
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LeaseState::Finished => "finished",
            LeaseState::Unowned => "unowned",
            LeaseState::Active => "active",
            LeaseState::Expired => "expired",
            LeaseState::Owned => "owned",
        }
    }
}

/// A lease as read at the end of the watch, with its state.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) lease: Lease,
    pub(crate) state: LeaseState,
}

/// The table at the end of a watch.
#[derive(Debug)]
pub(crate) struct TableView {
    /// The leases, by lease key.
    pub(crate) leases: Vec<Observed>,
    /// The items that do not decode ([`kcl_core::Error::InvalidLeaseItem`]s).
    pub(crate) invalid: Vec<kcl_core::Error>,
    /// How long the table was watched (zero: read once).
    pub(crate) window: Duration,
}

/// Reads the table, waits `window`, and reads it again (once only for a zero window).
pub(crate) async fn watch_table(admin: &Admin, window: Duration) -> Result<TableView> {
    let first = admin.scan().await?;
    let (before, now) = if window.is_zero() {
        (HashMap::new(), first)
    } else {
        tokio::time::sleep(window).await;
        let before: HashMap<String, Lease> = first
            .leases
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect();
        (before, admin.scan().await?)
    };
    let watched = !window.is_zero();
    let mut leases: Vec<Observed> = now
        .leases
        .into_iter()
        .map(|lease| Observed {
            state: LeaseState::of(before.get(&lease.lease_key), &lease, watched),
            lease,
        })
        .collect();
    leases.sort_by(|a, b| a.lease.lease_key.cmp(&b.lease.lease_key));
    let mut invalid = now.invalid;
    invalid.sort_by_key(ToString::to_string);
    Ok(TableView {
        leases,
        invalid,
        window,
    })
}

/// Reads one lease; if a live owner could hold it (owned, not finished), waits `window` and
/// reads it again. Returns the last read and its state.
pub(crate) async fn watch_lease(
    admin: &Admin,
    lease_key: &str,
    window: Duration,
) -> Result<Observed> {
    let first = admin.lease(lease_key).await?;
    if first.owner.is_none() || first.is_finished() || window.is_zero() {
        let state = LeaseState::of(None, &first, false);
        return Ok(Observed {
            lease: first,
            state,
        });
    }
    tokio::time::sleep(window).await;
    let now = admin.lease(lease_key).await?;
    Ok(Observed {
        state: LeaseState::of(Some(&first), &now, true),
        lease: now,
    })
}

#[cfg(test)]
mod tests {
    use kcl_core::{Checkpoint, LeaseUpdate};

    use super::*;

    fn owned(counter: u64) -> Lease {
        let mut lease = LeaseUpdate::Take {
            new_owner: "w1".into(),
        }
        .apply(&Lease::new("shardId-0", Checkpoint::TrimHorizon));
        lease.counter = counter;
        lease
    }

    #[test]
    fn a_counter_that_moved_is_a_live_owner_and_one_that_did_not_is_expired() {
        assert_eq!(
            LeaseState::of(Some(&owned(5)), &owned(6), true),
            LeaseState::Active
        );
        assert_eq!(
            LeaseState::of(Some(&owned(5)), &owned(5), true),
            LeaseState::Expired
        );
        assert_eq!(LeaseState::of(None, &owned(5), true), LeaseState::Active);
        assert_eq!(LeaseState::of(None, &owned(5), false), LeaseState::Owned);
    }

    #[test]
    fn finished_and_unowned_need_no_watch() {
        let unowned = Lease::new("shardId-0", Checkpoint::TrimHorizon);
        assert_eq!(LeaseState::of(None, &unowned, true), LeaseState::Unowned);
        let finished = LeaseUpdate::Checkpoint {
            checkpoint: Checkpoint::ShardEnd,
        }
        .apply(&owned(5));
        assert_eq!(
            LeaseState::of(Some(&owned(5)), &finished, true),
            LeaseState::Finished
        );
    }

    #[test]
    fn the_default_window_is_a_renewal_interval_and_a_third() {
        let renewal = LeaseConfig::default().renewal_interval;
        assert!(default_window() > renewal);
        // 3.5 s and a third.
        assert_eq!(default_window(), Duration::from_nanos(4_666_666_666));
    }
}
