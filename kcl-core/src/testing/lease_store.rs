//! The in-memory lease table.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::stale_reads::StaleHistory;
use super::{StaleReads, injected, lock};
use crate::error::{Error, Result, Service};
use crate::lease::usage::{LeaseTableUsage, OperationUsage};
use crate::lease::{
    Lease, LeaseCreation, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate, LineageGuard,
};

/// How [`InMemoryLeaseStore::list_leases`] reads the table when it is not a snapshot: in
/// pages, like a DynamoDB `Scan`, with Tokio time passing between pages.
///
/// A DynamoDB scan returns items in the order of the hash of their key and carries on after
/// the last key of the previous page, so a write landing between two pages is seen or not
/// depending on where its key falls: a lease created after the scan passed its place is
/// missed, one created before the scan reaches it is seen, and one deleted before the scan
/// reaches it is missed. A scan can thus return a lease without another one written before it
/// (a child without its parent). Here the order is a fixed pseudo-random permutation of the
/// keys, drawn from `order_seed`, so runs replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanPaging {
    /// Leases per page (at least one).
    pub page_size: usize,
    /// Tokio time between two pages, during which other calls run.
    pub page_gap: Duration,
    /// Fixes the scan order.
    pub order_seed: u64,
}

impl ScanPaging {
    /// Pages of `page_size` leases, `page_gap` apart, in the order drawn from `order_seed`.
    pub fn new(page_size: usize, page_gap: Duration, order_seed: u64) -> Self {
        ScanPaging {
            page_size: page_size.max(1),
            page_gap,
            order_seed,
        }
    }

    /// Where `lease_key` comes in a scan: a well-mixed hash of the key (ties, which a 64-bit
    /// hash makes unlikely, broken by the key itself).
    pub(super) fn place(&self, lease_key: &str) -> (u64, String) {
        let mut h = self.order_seed ^ 0xcbf2_9ce4_8422_2325;
        for b in lease_key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (h ^ (h >> 31), lease_key.to_owned())
    }
}

/// A lease table in memory.
#[derive(Debug)]
pub struct InMemoryLeaseStore {
    table: String,
    leases: Mutex<BTreeMap<String, Lease>>,
    update_calls: AtomicUsize,
    scan_calls: AtomicUsize,
    failing_updates: AtomicUsize,
    failing_scans: AtomicUsize,
    scan_latency: Mutex<Duration>,
    /// `None`: every scan is a snapshot.
    scan_paging: Mutex<Option<ScanPaging>>,
    /// Successful writes so far: a scan that sees it move between its pages raced a write.
    writes: AtomicU64,
    raced_scans: AtomicUsize,
    /// False once the table was dropped, until `initialize` creates it again.
    exists: AtomicBool,
    /// Items that do not decode, by key, with what is wrong: reported by scans and reads,
    /// never overwritten by a create.
    invalid: Mutex<BTreeMap<String, (&'static str, String)>>,
    /// `Some` while eventually consistent scans may read old versions.
    stale: Mutex<Option<StaleHistory>>,
    /// Requests and items by operation, as the DynamoDB store counts them. No capacity
    /// units: they depend on DynamoDB's item encoding, which only the real store knows.
    usage: LeaseTableUsage,
}

impl InMemoryLeaseStore {
    /// An empty table.
    pub fn new(table: impl Into<String>) -> Self {
        InMemoryLeaseStore {
            table: table.into(),
            leases: Mutex::new(BTreeMap::new()),
            update_calls: AtomicUsize::new(0),
            scan_calls: AtomicUsize::new(0),
            failing_updates: AtomicUsize::new(0),
            failing_scans: AtomicUsize::new(0),
            scan_latency: Mutex::new(Duration::ZERO),
            scan_paging: Mutex::new(None),
            writes: AtomicU64::new(0),
            raced_scans: AtomicUsize::new(0),
            exists: AtomicBool::new(true),
            invalid: Mutex::new(BTreeMap::new()),
            stale: Mutex::new(None),
            usage: LeaseTableUsage::default(),
        }
    }

    /// Deletes the table, as an operator might under running workers: every call fails with
    /// [`Error::LeaseTableNotFound`] until `initialize` creates it again, empty.
    pub fn drop_table(&self) {
        self.exists.store(false, Ordering::SeqCst);
        let mut leases = lock(&self.leases);
        leases.clear();
        lock(&self.invalid).clear();
        self.wrote(&leases);
    }

    /// Stores an item under `lease_key` whose `attribute` does not decode (a hand-edited
    /// item, say a text `leaseCounter`), replacing any lease there.
    pub fn put_invalid(&self, lease_key: &str, attribute: &'static str, problem: &str) {
        let mut leases = lock(&self.leases);
        leases.remove(lease_key);
        lock(&self.invalid).insert(lease_key.to_owned(), (attribute, problem.to_owned()));
        self.wrote(&leases);
    }

    /// Replaces an item that does not decode by `lease` (what a repair does).
    pub fn repair(&self, lease: Lease) {
        lock(&self.invalid).remove(&lease.lease_key);
        self.put(lease);
    }

    fn invalid_item(&self, lease_key: &str, attribute: &'static str, problem: &str) -> Error {
        Error::InvalidLeaseItem {
            table: self.table.clone(),
            lease_key: lease_key.to_owned(),
            attribute,
            problem: problem.to_owned(),
        }
    }

    fn invalid_items(&self) -> Vec<Error> {
        lock(&self.invalid)
            .iter()
            .map(|(key, (attribute, problem))| self.invalid_item(key, attribute, problem))
            .collect()
    }

    fn ensure_exists(&self) -> Result<()> {
        if self.exists.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::LeaseTableNotFound {
                table: self.table.clone(),
                source: None,
            })
        }
    }

    /// Makes `list_leases` read the table in pages from now on (`None`: at once, a snapshot).
    /// See [`ScanPaging`].
    pub fn set_scan_paging(&self, paging: Option<ScanPaging>) {
        *lock(&self.scan_paging) = paging;
    }

    /// How many eventually consistent scans read some item behind its latest write.
    pub fn lagged_scans(&self) -> usize {
        lock(&self.stale)
            .as_ref()
            .map_or(0, |stale| stale.lagged_scans)
    }

    /// How many paged scans had a write land between their first and last page (each may
    /// have missed a lease created or seen one deleted meanwhile).
    pub fn raced_scans(&self) -> usize {
        self.raced_scans.load(Ordering::SeqCst)
    }

    /// Called with the table as a write left it, the lock still held.
    fn wrote(&self, leases: &BTreeMap<String, Lease>) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if let Some(stale) = &mut *lock(&self.stale) {
            stale.remember(leases);
        }
    }

    /// Makes scans read with eventual consistency from now on (`None`: every scan reads the
    /// latest writes). See [`StaleReads`].
    pub fn set_stale_reads(&self, stale: Option<StaleReads>) {
        *lock(&self.stale) = stale.map(|reads| StaleHistory::new(reads, &lock(&self.leases)));
    }

    /// A scan in pages: each page is read from the table as it is then, continuing after the
    /// place of the last lease of the previous page.
    async fn paged_scan(&self, paging: ScanPaging) -> Vec<Lease> {
        let writes_before = self.writes.load(Ordering::SeqCst);
        let mut after: Option<(u64, String)> = None;
        let mut found = Vec::new();
        loop {
            let page: Vec<((u64, String), Lease)> = {
                let leases = lock(&self.leases);
                let mut next: Vec<((u64, String), Lease)> = leases
                    .values()
                    .map(|l| (paging.place(&l.lease_key), l))
                    .filter(|(place, _)| after.as_ref().is_none_or(|a| place > a))
                    .map(|(place, l)| (place, l.clone()))
                    .collect();
                next.sort_by(|a, b| a.0.cmp(&b.0));
                next.truncate(paging.page_size);
                next
            };
            let last_page = page.len() < paging.page_size;
            if let Some((place, _)) = page.last() {
                after = Some(place.clone());
            }
            found.extend(page.into_iter().map(|(_, l)| l));
            if last_page {
                break;
            }
            tokio::time::sleep(paging.page_gap).await;
        }
        if self.writes.load(Ordering::SeqCst) != writes_before {
            self.raced_scans.fetch_add(1, Ordering::SeqCst);
        }
        found
    }

    /// How long `list_leases` takes from now on (Tokio time); the table is read at the end.
    pub fn set_scan_latency(&self, latency: Duration) {
        *lock(&self.scan_latency) = latency;
    }

    /// The next `n` calls of `update_lease` fail with a transient error and change nothing.
    pub fn fail_next_updates(&self, n: usize) {
        self.failing_updates.store(n, Ordering::SeqCst);
    }

    /// The next `n` calls of `list_leases` fail with a transient error.
    pub fn fail_next_scans(&self, n: usize) {
        self.failing_scans.store(n, Ordering::SeqCst);
    }

    /// How many times `list_leases` was called.
    pub fn scan_calls(&self) -> usize {
        self.scan_calls.load(Ordering::SeqCst)
    }

    /// How many times `update_lease` was called.
    pub fn update_calls(&self) -> usize {
        self.update_calls.load(Ordering::SeqCst)
    }

    /// A copy of every lease.
    pub fn leases(&self) -> Vec<Lease> {
        lock(&self.leases).values().cloned().collect()
    }

    /// Stores a lease as given, bypassing conditions (test setup).
    pub fn put(&self, lease: Lease) {
        let mut leases = lock(&self.leases);
        leases.insert(lease.lease_key.clone(), lease);
        self.wrote(&leases);
    }

    /// Gives the lease to `owner` with a conditional take on its current fence, creating it
    /// (at `TRIM_HORIZON`) if missing: what a worker does once it saw the lease expire.
    ///
    /// # Panics
    /// If the take fails, which in a test means the setup is wrong.
    pub fn take_as(&self, lease_key: &str, owner: &str) -> Lease {
        let mut leases = lock(&self.leases);
        let stored = leases
            .entry(lease_key.to_owned())
            .or_insert_with(|| Lease::new(lease_key, crate::Checkpoint::TrimHorizon));
        *stored = LeaseUpdate::Take {
            new_owner: owner.to_owned(),
        }
        .apply(stored);
        let taken = stored.clone();
        self.wrote(&leases);
        taken
    }

    fn answered(&self, operation: &'static str, items: usize) {
        self.usage
            .record(operation, OperationUsage::request(items as u64, 0.0, 0.0));
    }

    fn take_failure(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[async_trait]
impl LeaseStore for InMemoryLeaseStore {
    fn table_name(&self) -> &str {
        &self.table
    }

    async fn initialize(&self) -> Result<()> {
        self.exists.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn list_leases(&self) -> Result<LeaseScan> {
        self.scan_calls.fetch_add(1, Ordering::SeqCst);
        let latency = *lock(&self.scan_latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if Self::take_failure(&self.failing_scans) {
            return Err(injected(Service::LeaseStore, "Scan"));
        }
        self.ensure_exists()?;
        let paging = *lock(&self.scan_paging);
        let leases = match paging {
            Some(paging) => self.paged_scan(paging).await,
            None => self.leases(),
        };
        let invalid = self.invalid_items();
        self.answered("Scan", leases.len() + invalid.len());
        Ok(LeaseScan { leases, invalid })
    }

    async fn list_leases_eventually_consistent(&self) -> Result<LeaseScan> {
        let stale = lock(&self.stale).as_mut().map(StaleHistory::scan);
        let Some(leases) = stale else {
            return self.list_leases().await;
        };
        self.scan_calls.fetch_add(1, Ordering::SeqCst);
        if Self::take_failure(&self.failing_scans) {
            return Err(injected(Service::LeaseStore, "Scan"));
        }
        self.ensure_exists()?;
        let invalid = self.invalid_items();
        self.answered("Scan", leases.len() + invalid.len());
        Ok(LeaseScan { leases, invalid })
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        self.ensure_exists()?;
        if let Some((attribute, problem)) = lock(&self.invalid).get(lease_key) {
            return Err(self.invalid_item(lease_key, attribute, problem));
        }
        let lease = lock(&self.leases).get(lease_key).cloned();
        self.answered("GetItem", usize::from(lease.is_some()));
        Ok(lease)
    }

    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        self.ensure_exists()?;
        let mut leases = lock(&self.leases);
        if leases.contains_key(&lease.lease_key)
            || lock(&self.invalid).contains_key(&lease.lease_key)
        {
            return Ok(false);
        }
        leases.insert(lease.lease_key.clone(), lease.clone());
        self.wrote(&leases);
        self.answered("PutItem", 1);
        Ok(true)
    }

    async fn create_lease_in_lineage(
        &self,
        lease: &Lease,
        guard: &LineageGuard,
    ) -> Result<LeaseCreation> {
        self.ensure_exists()?;
        let mut leases = lock(&self.leases);
        let invalid = lock(&self.invalid);
        let exists = |key: &str| leases.contains_key(key) || invalid.contains_key(key);
        let outcome = if exists(&lease.lease_key) {
            Some(LeaseCreation::Exists)
        } else if let Some(parent) = guard.parents.iter().find(|p| !exists(p)) {
            Some(LeaseCreation::ParentMissing {
                parent: parent.clone(),
            })
        } else {
            guard
                .children
                .iter()
                .find(|c| exists(c))
                .map(|child| LeaseCreation::ChildExists {
                    child: child.clone(),
                })
        };
        drop(invalid);
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
        leases.insert(lease.lease_key.clone(), lease.clone());
        self.wrote(&leases);
        self.answered("TransactWriteItems", 1);
        Ok(LeaseCreation::Created)
    }

    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        self.update_calls.fetch_add(1, Ordering::SeqCst);
        if Self::take_failure(&self.failing_updates) {
            return Err(injected(Service::LeaseStore, "UpdateItem"));
        }
        self.ensure_exists()?;
        let mut leases = lock(&self.leases);
        match leases.get_mut(lease_key) {
            Some(stored) if stored.fence() == *fence && update.allowed(stored) => {
                *stored = update.apply(stored);
                let updated = stored.clone();
                self.wrote(&leases);
                self.answered("UpdateItem", 1);
                Ok(updated)
            }
            current => Err(Error::LeaseConditionFailed {
                lease_key: lease_key.to_owned(),
                operation: update.operation(),
                current: current.map(|l| Box::new(l.clone())),
            }),
        }
    }

    fn usage(&self) -> Option<&LeaseTableUsage> {
        Some(&self.usage)
    }

    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        self.ensure_exists()?;
        let mut leases = lock(&self.leases);
        match leases.get(lease_key) {
            Some(stored) if stored.fence() == *fence => {
                leases.remove(lease_key);
                self.wrote(&leases);
                self.answered("DeleteItem", 1);
                Ok(())
            }
            current => Err(Error::LeaseConditionFailed {
                lease_key: lease_key.to_owned(),
                operation: "delete",
                current: current.map(|l| Box::new(l.clone())),
            }),
        }
    }
}
