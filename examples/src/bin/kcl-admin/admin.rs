//! [`Admin`]: what every command works on, the lease table and, with `--stream`, the stream.

use kcl_core::{Lease, LeaseScan, LeaseStore};
use kcl_dynamo_lease::DynamoLeaseStore;

use crate::error::{AdminError, Result};
use crate::stream::Stream;

/// The lease table of one application, and its stream when `--stream` names it.
#[derive(Debug)]
pub(crate) struct Admin {
    /// The application name, for the commands kcl-admin prints (`None`: only `--lease-table`).
    pub(crate) app: Option<String>,
    pub(crate) table: String,
    pub(crate) store: DynamoLeaseStore,
    pub(crate) dynamodb: aws_sdk_dynamodb::Client,
    stream: Option<Stream>,
    pub(crate) json: bool,
}

impl Admin {
    pub(crate) fn new(
        sdk: &aws_config::SdkConfig,
        app: Option<String>,
        table: String,
        stream: Option<String>,
        json: bool,
    ) -> Self {
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        Admin {
            app,
            store: DynamoLeaseStore::new(dynamodb.clone(), &table).with_create_if_missing(false),
            table,
            dynamodb,
            stream: stream.map(|name| Stream::new(sdk, name)),
            json,
        }
    }

    /// The stream, if `--stream` named one.
    pub(crate) fn stream_if_given(&self) -> Option<&Stream> {
        self.stream.as_ref()
    }

    /// Every lease of a shard (watcher slots set aside), and the items that do not decode.
    pub(crate) async fn scan(&self) -> Result<LeaseScan> {
        let mut scan = self
            .store
            .list_leases()
            .await
            .map_err(|e| AdminError::lease_store("reading the lease table", e))?;
        scan.take_watcher_slots();
        Ok(scan)
    }

    /// The lease `lease_key`.
    pub(crate) async fn lease(&self, lease_key: &str) -> Result<Lease> {
        match self.store.get_lease(lease_key).await {
            Ok(Some(lease)) => Ok(lease),
            Ok(None) => Err(AdminError::LeaseMissing {
                table: self.table.clone(),
                lease_key: lease_key.to_owned(),
            }),
            Err(e @ kcl_core::Error::InvalidLeaseItem { .. }) => Err(AdminError::InvalidLease {
                source: e,
                repair: self.repair_command(lease_key),
            }),
            Err(e) => Err(AdminError::lease_store("reading the lease", e)),
        }
    }

    /// The command that repairs the item of `lease_key`, as the workers log it.
    pub(crate) fn repair_command(&self, lease_key: &str) -> String {
        match &self.app {
            Some(app) if *app == self.table => format!("kcl-admin --app {app} repair {lease_key}"),
            Some(app) => format!(
                "kcl-admin --app {app} --lease-table {} repair {lease_key}",
                self.table
            ),
            None => format!("kcl-admin --lease-table {} repair {lease_key}", self.table),
        }
    }

    /// Refuses a table whose leases name another stream than `--stream`: lease keys are shard
    /// ids, which repeat across streams, so every position would be looked up in the wrong
    /// stream. Leases without a stream name (the Java KCL's) fit any stream.
    pub(crate) fn check_stream<'a>(
        &self,
        leases: impl IntoIterator<Item = &'a Lease>,
    ) -> Result<()> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        let ours = stream_name_of(&stream.name);
        match leases
            .into_iter()
            .filter_map(|l| l.stream_name.as_deref())
            .find(|other| stream_name_of(other) != ours)
        {
            Some(other) => Err(AdminError::StreamMismatch {
                table: self.table.clone(),
                table_stream: other.to_owned(),
                stream: stream.name.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// The name in a stream name or ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
fn stream_name_of(name_or_arn: &str) -> &str {
    name_or_arn
        .rsplit_once(":stream/")
        .map_or(name_or_arn, |(_, name)| name)
}

/// Who kcl-admin writes leases as: an owner no worker has (worker ids default to a host name
/// and a UUID), so a worker whose lease kcl-admin took sees an owner switch, never its own
/// name with a counter it cannot explain.
pub(crate) fn identity() -> String {
    format!("kcl-admin@{}", gethostname::gethostname().to_string_lossy())
}
