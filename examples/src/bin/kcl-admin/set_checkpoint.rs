//! `set-checkpoint`: moves a shard's checkpoint, so the shard resumes elsewhere.
//!
//! Without `--force`, kcl-admin writes only a lease no live worker holds: unowned, or owned
//! but not renewed while watched (expired). With `--force` it takes the lease from whoever
//! holds it; the old owner's next renewal or checkpoint then fails by the fence and its
//! consumer stops, so it cannot write its own position over the new one (see
//! [`crate::writes`]). Either way the lease ends unowned at the new checkpoint, and the next
//! worker to take it resumes there.

use kcl_core::{Lease, LeaseUpdate};
use serde::Serialize;

use crate::admin::{Admin, identity};
use crate::error::{AdminError, Result};
use crate::observe::{LeaseState, Observed, Watch, watch_lease};
use crate::position::{Resolved, Target, parse_target, resolve};
use crate::render::{LeaseSummary, Report, emit, owner_text};
use crate::writes::{apply_all, checkpoint_plan, execute};

/// Reads and takes tried with `--force` when a live owner's renewal or checkpoint lands
/// between the read and the take. Each take is fenced on its own fresh read.
const FORCE_ATTEMPTS: usize = 3;

/// `set-checkpoint`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The shard whose checkpoint to set (its lease key).
    #[arg(long, value_name = "ID")]
    shard: String,
    /// Where the shard resumes: trim-horizon (every record the stream keeps), latest (new
    /// records only), at-timestamp=TIME (the first record that arrived at or after TIME:
    /// RFC 3339 or milliseconds since the epoch), or a sequence number SEQ (the records after
    /// it). SEQ and at-timestamp need --stream.
    #[arg(long, value_name = "POSITION", value_parser = parse_target)]
    to: Target,
    /// Take the lease even from a live worker (its checkpoints then fail by the fence), and
    /// rewrite a finished (SHARD_END) lease.
    #[arg(long)]
    force: bool,
    /// Print what would change, and write nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    watch: Watch,
}

/// The `set-checkpoint` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct SetCheckpointReport {
    /// The lease table.
    table: String,
    /// The lease (shard id).
    lease_key: String,
    /// `--to` as given (a time in RFC 3339).
    to: String,
    /// The checkpoint it resolved to (`SEQ/SUB` inside a KPL aggregate).
    resolved: String,
    /// How a time was resolved.
    note: Option<String>,
    /// The lease's state when decided on.
    state: LeaseState,
    /// The writes, in order: `checkpoint`, or `take`, `checkpoint`, `release`.
    writes: Vec<&'static str>,
    /// The owner the lease was taken as, when it was taken.
    taken_as: Option<String>,
    /// True when nothing was written.
    dry_run: bool,
    /// The lease as read, and as written (or as it would be).
    before: LeaseSummary,
    after: LeaseSummary,
}

pub(crate) async fn run(admin: &Admin, args: &Args) -> Result<()> {
    let first = admin.lease(&args.shard).await?;
    admin.check_stream([&first])?;
    let resolved = resolve(
        &args.to,
        admin.stream_if_given(),
        &args.shard,
        first.hash_key_range,
    )
    .await?;
    if !args.force {
        let window = args.watch.window();
        let observed = watch_lease(admin, &args.shard, window).await?;
        match observed.state {
            LeaseState::Unowned | LeaseState::Expired => {}
            LeaseState::Finished => {
                return Err(AdminError::LeaseFinished {
                    lease_key: args.shard.clone(),
                });
            }
            LeaseState::Active => {
                return Err(AdminError::OwnedByLiveWorker {
                    lease_key: args.shard.clone(),
                    owner: observed.lease.owner.clone().unwrap_or_default(),
                    observed: window,
                });
            }
            LeaseState::Owned => {
                return Err(AdminError::OwnerNotWatched {
                    lease_key: args.shard.clone(),
                    owner: observed.lease.owner.clone().unwrap_or_default(),
                });
            }
        }
        return apply(admin, args, &resolved, observed).await;
    }
    // A live owner renews and checkpoints all the time: one of its writes may land between a
    // read and the take. The take is then refused by its fence, and tried on a fresh read.
    let mut read = first;
    let mut attempt = 1;
    loop {
        let state = LeaseState::of(None, &read, false);
        let observed = Observed { lease: read, state };
        match apply(admin, args, &resolved, observed).await {
            Err(AdminError::ChangedMeanwhile { .. }) if attempt < FORCE_ATTEMPTS => {
                read = admin.lease(&args.shard).await?;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Writes (or with `--dry-run` only plans) the new checkpoint on the lease as observed.
async fn apply(admin: &Admin, args: &Args, resolved: &Resolved, observed: Observed) -> Result<()> {
    let identity = identity();
    let Observed { lease, state } = observed;
    let plan = checkpoint_plan(&lease, resolved.checkpoint.clone(), &identity);
    let after: Lease = if args.dry_run {
        apply_all(&lease, &plan)
    } else {
        execute(admin, &lease, &plan).await?
    };
    let taken = plan.iter().any(|u| matches!(u, LeaseUpdate::Take { .. }));
    let report = SetCheckpointReport {
        table: admin.table.clone(),
        lease_key: lease.lease_key.clone(),
        to: args.to.to_string(),
        resolved: resolved.checkpoint.to_string(),
        note: resolved.note.clone(),
        state,
        writes: plan.iter().map(LeaseUpdate::operation).collect(),
        taken_as: taken.then_some(identity),
        dry_run: args.dry_run,
        before: (&lease).into(),
        after: (&after).into(),
    };
    emit(&report, admin.json)
}

impl Report for SetCheckpointReport {
    fn text(&self) -> String {
        let checkpoint = |l: &LeaseSummary| match l.sub_sequence_number {
            0 => l.checkpoint.clone(),
            sub => format!("{}/{sub}", l.checkpoint),
        };
        let writes: Vec<String> = self
            .writes
            .iter()
            .map(|w| match (*w, &self.taken_as) {
                ("take", Some(identity)) => format!("take (as {identity})"),
                (w, _) => w.to_owned(),
            })
            .collect();
        let mut out = format!(
            "lease {} of table {} ({}):\n",
            self.lease_key,
            self.table,
            self.state.as_str()
        );
        out.push_str(&format!("  to          {} -> {}\n", self.to, self.resolved));
        if let Some(note) = &self.note {
            out.push_str(&format!("              {note}\n"));
        }
        out.push_str(&format!(
            "  checkpoint  {} -> {}\n  owner       {} -> {}\n  counter     {} -> {}\n",
            checkpoint(&self.before),
            checkpoint(&self.after),
            owner_text(self.before.owner.as_deref()),
            owner_text(self.after.owner.as_deref()),
            self.before.counter,
            self.after.counter,
        ));
        out.push_str(&format!("  writes      {}\n", writes.join(", ")));
        if self.dry_run {
            out.push_str("dry run: nothing written\n");
        }
        out
    }
}
