//! `delete-table`: deletes the lease table, with every checkpoint in it.
//!
//! Workers running against the table stop when they find it gone
//! (`Error::LeaseTableNotFound`), and a worker started later creates it empty, starting every
//! shard from its initial position. So the deletion is refused while leases are renewed, and
//! it is confirmed by typing the table's name (or `--yes` where there is no terminal).

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use kcl_core::AwsSdkError;
use serde::Serialize;
use tokio::time::Instant;

use crate::admin::Admin;
use crate::error::{AdminError, Result};
use crate::observe::{LeaseState, Watch, watch_table};
use crate::render::{Report, emit};

/// How long to wait for DynamoDB to finish deleting the table.
const DELETE_TIMEOUT: Duration = Duration::from_secs(300);
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// `delete-table`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Delete without asking (required when standard input is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Delete even while live workers renew leases (they stop, with the table gone).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    watch: Watch,
}

/// The `delete-table` output (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct DeleteReport {
    /// The table, now gone.
    table: String,
    /// Leases it held when deleted (invalid items included).
    leases: usize,
    deleted: bool,
}

pub(crate) async fn run(admin: &Admin, args: &Args) -> Result<()> {
    let window = if args.force {
        Duration::ZERO
    } else {
        args.watch.window()
    };
    let view = watch_table(admin, window).await?;
    if !args.force {
        // Owned and not watched (--observe 0): its owner may be alive.
        if let Some(o) = view.leases.iter().find(|o| o.state == LeaseState::Owned) {
            return Err(AdminError::OwnerNotWatched {
                lease_key: o.lease.lease_key.clone(),
                owner: o.lease.owner.clone().unwrap_or_default(),
            });
        }
        let active: Vec<String> = view
            .leases
            .iter()
            .filter(|o| o.state == LeaseState::Active)
            .map(|o| {
                format!(
                    "{} ({})",
                    o.lease.lease_key,
                    o.lease.owner.as_deref().unwrap_or_default()
                )
            })
            .collect();
        if !active.is_empty() {
            return Err(AdminError::LeasesActive {
                table: admin.table.clone(),
                active,
                observed: window,
            });
        }
    }
    confirm(admin, args.yes)?;
    delete(admin).await?;
    emit(
        &DeleteReport {
            table: admin.table.clone(),
            leases: view.leases.len() + view.invalid.len(),
            deleted: true,
        },
        admin.json,
    )
}

/// `--yes`, or the table's name typed at the terminal.
fn confirm(admin: &Admin, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    let declined = |reason: String| AdminError::ConfirmationDeclined {
        table: admin.table.clone(),
        reason,
    };
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(declined(
            "standard input is not a terminal: pass --yes to delete without a prompt".into(),
        ));
    }
    let io = |source| AdminError::Io {
        what: "asking for confirmation",
        source,
    };
    let mut stderr = std::io::stderr();
    write!(
        stderr,
        "Delete lease table `{}` and every checkpoint in it? Type its name to confirm: ",
        admin.table
    )
    .and_then(|()| stderr.flush())
    .map_err(io)?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer).map_err(io)?;
    match answer.trim() {
        typed if typed == admin.table => Ok(()),
        typed => Err(declined(format!("`{typed}` is not the table's name"))),
    }
}

/// Deletes the table and waits until DynamoDB no longer has it.
async fn delete(admin: &Admin) -> Result<()> {
    let missing = |source: Option<kcl_core::BoxError>| AdminError::TableMissing {
        table: admin.table.clone(),
        source,
    };
    match admin
        .dynamodb
        .delete_table()
        .table_name(&admin.table)
        .send()
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Some("ResourceNotFoundException") => {
            return Err(missing(Some(AwsSdkError::new(e).into())));
        }
        Err(e) => {
            return Err(AdminError::Aws {
                operation: "deleting the lease table",
                source: AwsSdkError::new(e).into(),
            });
        }
    }
    let deadline = Instant::now() + DELETE_TIMEOUT;
    loop {
        match admin
            .dynamodb
            .describe_table()
            .table_name(&admin.table)
            .send()
            .await
        {
            Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(()),
            Err(e) => {
                return Err(AdminError::Aws {
                    operation: "waiting for the lease table to be deleted",
                    source: AwsSdkError::new(e).into(),
                });
            }
            Ok(_) if Instant::now() >= deadline => {
                return Err(AdminError::DeleteTimedOut {
                    table: admin.table.clone(),
                    waited: DELETE_TIMEOUT,
                });
            }
            Ok(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

impl Report for DeleteReport {
    fn text(&self) -> String {
        format!(
            "deleted lease table {} ({} lease(s))\n",
            self.table, self.leases
        )
    }
}
