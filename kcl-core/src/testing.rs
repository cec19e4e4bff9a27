//! In-memory [`StreamClient`] and [`LeaseStore`] for tests and simulations (feature
//! `test-util`). They implement the same semantics as Kinesis and the DynamoDB lease store
//! (conditional writes, iterators that expire after five minutes of Tokio time, closed
//! shards that end) and let tests inject failures.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{Error, Result, Service};
use crate::lease::{Lease, LeaseFence, LeaseScan, LeaseStore, LeaseUpdate};
use crate::published::Published;
use crate::sequence::SequenceNumber;
use crate::stream::{
    ChildShard, HashKeyRange, Record, RecordsPage, Shard, StartingPosition, StreamClient,
};

/// Shard iterators expire after five minutes, as in Kinesis.
const ITERATOR_LIFETIME: Duration = Duration::from_secs(300);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn injected(service: Service, operation: &'static str) -> Error {
    Error::Transient {
        service,
        operation,
        source: "injected failure".into(),
    }
}

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
    fn place(&self, lease_key: &str) -> (u64, String) {
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
        }
    }

    /// Makes `list_leases` read the table in pages from now on (`None`: at once, a snapshot).
    /// See [`ScanPaging`].
    pub fn set_scan_paging(&self, paging: Option<ScanPaging>) {
        *lock(&self.scan_paging) = paging;
    }

    /// How many paged scans had a write land between their first and last page (each may
    /// have missed a lease created or seen one deleted meanwhile).
    pub fn raced_scans(&self) -> usize {
        self.raced_scans.load(Ordering::SeqCst)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
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
        lock(&self.leases).insert(lease.lease_key.clone(), lease);
        self.wrote();
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
        drop(leases);
        self.wrote();
        taken
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
        let paging = *lock(&self.scan_paging);
        let leases = match paging {
            Some(paging) => self.paged_scan(paging).await,
            None => self.leases(),
        };
        Ok(LeaseScan {
            leases,
            invalid: Vec::new(),
        })
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        Ok(lock(&self.leases).get(lease_key).cloned())
    }

    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        let mut leases = lock(&self.leases);
        if leases.contains_key(&lease.lease_key) {
            return Ok(false);
        }
        leases.insert(lease.lease_key.clone(), lease.clone());
        self.wrote();
        Ok(true)
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
        let mut leases = lock(&self.leases);
        match leases.get_mut(lease_key) {
            Some(stored) if stored.fence() == *fence && update.allowed(stored) => {
                *stored = update.apply(stored);
                self.wrote();
                Ok(stored.clone())
            }
            current => Err(Error::LeaseConditionFailed {
                lease_key: lease_key.to_owned(),
                operation: update.operation(),
                current: current.map(|l| Box::new(l.clone())),
            }),
        }
    }

    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        let mut leases = lock(&self.leases);
        match leases.get(lease_key) {
            Some(stored) if stored.fence() == *fence => {
                leases.remove(lease_key);
                self.wrote();
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

#[derive(Debug)]
struct MemoryShard {
    shard: Shard,
    records: Vec<Record>,
    children: Vec<ChildShard>,
}

#[derive(Debug)]
struct IssuedIterator {
    shard_id: String,
    next_index: usize,
    issued_at: Instant,
}

#[derive(Debug, Default)]
struct StreamState {
    shards: Vec<MemoryShard>,
    next_sequence_number: u128,
    iterators: HashMap<String, IssuedIterator>,
    next_iterator_id: u64,
    get_records_calls: HashMap<String, Vec<Instant>>,
    failing_get_records: VecDeque<Error>,
    /// Shards whose `GetRecords` calls fail with this fault (throttling, say) until cleared.
    shard_faults: HashMap<String, Fault>,
    omit_child_shards: bool,
}

impl StreamState {
    fn shard(&self, shard_id: &str) -> Result<&MemoryShard> {
        self.shards
            .iter()
            .find(|s| s.shard.shard_id == shard_id)
            .ok_or_else(|| Error::ShardNotFound {
                stream: String::new(),
                shard_id: shard_id.to_owned(),
            })
    }

    fn open_shard(&mut self, shard_id: &str) -> &mut MemoryShard {
        let shard = self
            .shards
            .iter_mut()
            .find(|s| s.shard.shard_id == shard_id)
            .unwrap_or_else(|| panic!("no shard {shard_id}"));
        assert!(shard.shard.is_open(), "{shard_id} is closed");
        shard
    }

    fn add_shard(&mut self, parents: &[&str], range: HashKeyRange) -> String {
        let id = format!("shardId-{:012}", self.shards.len());
        let mut shard = Shard::new(&id, range);
        shard.parent_shard_id = parents.first().map(|p| (*p).to_owned());
        shard.adjacent_parent_shard_id = parents.get(1).map(|p| (*p).to_owned());
        self.shards.push(MemoryShard {
            shard,
            records: Vec::new(),
            children: Vec::new(),
        });
        id
    }

    fn close(&mut self, shard_id: &str, children: &[String]) {
        let described: Vec<ChildShard> = children
            .iter()
            .map(|c| {
                let child = &self
                    .shards
                    .iter()
                    .find(|s| s.shard.shard_id == *c)
                    .expect("child")
                    .shard;
                ChildShard::new(c.clone(), child.parent_shard_ids(), child.hash_key_range)
            })
            .collect();
        let next = self.next_sequence_number;
        let shard = self.open_shard(shard_id);
        let last = shard
            .records
            .last()
            .map_or_else(|| next.to_string(), |r| r.sequence_number.to_string());
        shard.shard.ending_sequence_number = Some(last);
        shard.children = described;
    }

    fn issue(&mut self, shard_id: &str, next_index: usize) -> String {
        self.next_iterator_id += 1;
        let id = format!("{shard_id}/{}", self.next_iterator_id);
        self.iterators.insert(
            id.clone(),
            IssuedIterator {
                shard_id: shard_id.to_owned(),
                next_index,
                issued_at: Instant::now(),
            },
        );
        id
    }
}

/// A Kinesis stream in memory.
#[derive(Debug)]
pub struct InMemoryStream {
    name: String,
    state: Mutex<StreamState>,
    exists: std::sync::atomic::AtomicBool,
    puts: AtomicU64,
}

impl InMemoryStream {
    /// A stream of `shard_count` open shards splitting the hash key space evenly.
    pub fn new(name: impl Into<String>, shard_count: u32) -> Self {
        let stream = InMemoryStream {
            name: name.into(),
            state: Mutex::new(StreamState {
                next_sequence_number: 1_000,
                ..StreamState::default()
            }),
            exists: std::sync::atomic::AtomicBool::new(true),
            puts: AtomicU64::new(0),
        };
        let width = u128::MAX / u128::from(shard_count.max(1));
        {
            let mut state = lock(&stream.state);
            for i in 0..shard_count.max(1) {
                let start = width * u128::from(i);
                let end = if i + 1 == shard_count.max(1) {
                    u128::MAX
                } else {
                    start + width - 1
                };
                state.shards.push(MemoryShard {
                    shard: Shard::new(
                        format!("shardId-{i:012}"),
                        HashKeyRange {
                            starting_hash_key: start,
                            ending_hash_key: end,
                        },
                    ),
                    records: Vec::new(),
                    children: Vec::new(),
                });
            }
        }
        stream
    }

    /// A stream that does not exist: every call fails with [`Error::StreamNotFound`].
    pub fn missing(name: impl Into<String>) -> Self {
        let stream = Self::new(name, 1);
        stream.exists.store(false, Ordering::SeqCst);
        stream
    }

    /// The hash key of a partition key: 128 well-mixed bits (Kinesis uses MD5; any even
    /// spread will do here).
    pub fn hash_key(partition_key: &str) -> u128 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in partition_key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (u128::from(mix(h)) << 64) | u128::from(mix(h ^ 0x9e37_79b9_7f4a_7c15))
    }

    /// Appends a record to the open shard serving the partition key; returns its shard id and
    /// sequence number.
    pub fn put_record(
        &self,
        partition_key: &str,
        data: impl Into<Vec<u8>>,
    ) -> (String, SequenceNumber) {
        self.put_hashed(Self::hash_key(partition_key), partition_key, data.into())
    }

    fn put_hashed(
        &self,
        hash: u128,
        partition_key: &str,
        data: Vec<u8>,
    ) -> (String, SequenceNumber) {
        let mut state = lock(&self.state);
        let index = state
            .shards
            .iter()
            .position(|s| {
                s.shard.is_open()
                    && (s.shard.hash_key_range.starting_hash_key
                        ..=s.shard.hash_key_range.ending_hash_key)
                        .contains(&hash)
            })
            .expect("the open shards cover the key space");
        state.next_sequence_number += 1;
        let sequence_number = SequenceNumber::new(state.next_sequence_number.to_string())
            .expect("a number is a sequence number");
        let record = Record::new(sequence_number.clone(), partition_key, data)
            .with_approximate_arrival_timestamp(SystemTime::now());
        let shard = &mut state.shards[index];
        shard.records.push(record);
        self.puts.fetch_add(1, Ordering::Relaxed);
        (shard.shard.shard_id.clone(), sequence_number)
    }

    /// The next `GetRecords` calls fail with these errors, in order.
    pub fn fail_next_get_records(&self, errors: impl IntoIterator<Item = Error>) {
        lock(&self.state).failing_get_records.extend(errors);
    }

    /// Makes every `GetRecords` call on `shard_id` fail with `fault` (`Throttle` or `Fail`)
    /// until set back to [`Fault::None`].
    pub fn set_shard_fault(&self, shard_id: &str, fault: Fault) {
        lock(&self.state)
            .shard_faults
            .insert(shard_id.to_owned(), fault);
    }

    /// Appends a record to the open shard serving `hash_key`, whatever its partition key hashes
    /// to (as an explicit hash key does).
    pub fn put_record_at(
        &self,
        hash_key: u128,
        partition_key: &str,
        data: impl Into<Vec<u8>>,
    ) -> (String, SequenceNumber) {
        self.put_hashed(hash_key, partition_key, data.into())
    }

    /// When each `GetRecords` call on `shard_id` was answered (Tokio time).
    pub fn get_records_calls(&self, shard_id: &str) -> Vec<Instant> {
        lock(&self.state)
            .get_records_calls
            .get(shard_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Splits an open shard in two at the middle of its hash key range; returns the children.
    ///
    /// # Panics
    /// If the shard does not exist or is closed (a test set-up error).
    pub fn split_shard(&self, shard_id: &str) -> [String; 2] {
        let mut state = lock(&self.state);
        let range = state.open_shard(shard_id).shard.hash_key_range;
        let mid = range.starting_hash_key + (range.ending_hash_key - range.starting_hash_key) / 2;
        let halves = [
            HashKeyRange {
                starting_hash_key: range.starting_hash_key,
                ending_hash_key: mid,
            },
            HashKeyRange {
                starting_hash_key: mid + 1,
                ending_hash_key: range.ending_hash_key,
            },
        ];
        let children = halves.map(|r| state.add_shard(&[shard_id], r));
        state.close(shard_id, &children);
        children
    }

    /// Merges two adjacent open shards into one; returns the child.
    ///
    /// # Panics
    /// If a shard does not exist, is closed, or the two are not adjacent.
    pub fn merge_shards(&self, shard_id: &str, adjacent_shard_id: &str) -> String {
        let mut state = lock(&self.state);
        let a = state.open_shard(shard_id).shard.hash_key_range;
        let b = state.open_shard(adjacent_shard_id).shard.hash_key_range;
        let (low, high) = if a.starting_hash_key < b.starting_hash_key {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(
            low.ending_hash_key + 1,
            high.starting_hash_key,
            "shards are not adjacent"
        );
        let range = HashKeyRange {
            starting_hash_key: low.starting_hash_key,
            ending_hash_key: high.ending_hash_key,
        };
        let child = state.add_shard(&[shard_id, adjacent_shard_id], range);
        state.close(shard_id, std::slice::from_ref(&child));
        state.close(adjacent_shard_id, std::slice::from_ref(&child));
        child
    }

    /// Doubles the open shards (each split in two), or halves them (adjacent pairs merged), as
    /// Kinesis' `UpdateShardCount` does with uniform scaling.
    ///
    /// # Panics
    /// If `target` is neither twice nor half the number of open shards.
    pub fn update_shard_count(&self, target: usize) {
        let mut open: Vec<(u128, String)> = {
            let state = lock(&self.state);
            state
                .shards
                .iter()
                .filter(|s| s.shard.is_open())
                .map(|s| {
                    (
                        s.shard.hash_key_range.starting_hash_key,
                        s.shard.shard_id.clone(),
                    )
                })
                .collect()
        };
        open.sort();
        if target == open.len() * 2 {
            for (_, id) in open {
                self.split_shard(&id);
            }
        } else if target * 2 == open.len() {
            for pair in open.chunks(2) {
                self.merge_shards(&pair[0].1, &pair[1].1);
            }
        } else {
            panic!(
                "update_shard_count supports doubling and halving, not {} → {target}",
                open.len()
            );
        }
    }

    /// The shards as `ListShards` would list them.
    pub fn shards(&self) -> Vec<Shard> {
        lock(&self.state)
            .shards
            .iter()
            .map(|s| s.shard.clone())
            .collect()
    }

    /// Leaves `ChildShards` out of the last `GetRecords` answer of a closed shard, as some
    /// emulators and older Kinesis paths do.
    pub fn omit_child_shards(&self, omit: bool) {
        lock(&self.state).omit_child_shards = omit;
    }

    /// Removes a closed shard and its records, as Kinesis does past the retention period.
    pub fn trim_shard(&self, shard_id: &str) {
        let mut state = lock(&self.state);
        state
            .shards
            .retain(|s| s.shard.shard_id != shard_id || s.shard.is_open());
    }

    /// Makes every iterator issued so far expire.
    pub fn expire_iterators(&self) {
        let mut state = lock(&self.state);
        for iterator in state.iterators.values_mut() {
            iterator.issued_at -= ITERATOR_LIFETIME;
        }
    }

    fn check_exists(&self) -> Result<()> {
        if self.exists.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::StreamNotFound {
                stream: self.name.clone(),
            })
        }
    }
}

#[async_trait]
impl StreamClient for InMemoryStream {
    fn stream_name(&self) -> &str {
        &self.name
    }

    async fn list_shards(&self) -> Result<Vec<Shard>> {
        self.check_exists()?;
        Ok(lock(&self.state)
            .shards
            .iter()
            .map(|s| s.shard.clone())
            .collect())
    }

    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String> {
        self.check_exists()?;
        let mut state = lock(&self.state);
        let shard = state.shard(shard_id)?;
        let records = &shard.records;
        let index = match position {
            StartingPosition::TrimHorizon => 0,
            StartingPosition::Latest => records.len(),
            StartingPosition::AtTimestamp(at) => records
                .iter()
                .position(|r| r.approximate_arrival_timestamp.is_some_and(|t| t >= *at))
                .unwrap_or(records.len()),
            StartingPosition::AtSequenceNumber(s) => {
                records.partition_point(|r| r.sequence_number < *s)
            }
            StartingPosition::AfterSequenceNumber(s) => {
                records.partition_point(|r| r.sequence_number <= *s)
            }
        };
        Ok(state.issue(shard_id, index))
    }

    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        self.check_exists()?;
        let mut state = lock(&self.state);
        state
            .get_records_calls
            .entry(shard_id.to_owned())
            .or_default()
            .push(Instant::now());
        if let Some(error) = state.failing_get_records.pop_front() {
            return Err(error);
        }
        match state
            .shard_faults
            .get(shard_id)
            .copied()
            .unwrap_or_default()
        {
            Fault::None => {}
            Fault::Throttle => {
                return Err(Error::Throttled {
                    service: Service::Kinesis,
                    operation: "GetRecords",
                    source: "injected throttling".into(),
                });
            }
            Fault::Fail | Fault::Stall | Fault::Hold => {
                return Err(injected(Service::Kinesis, "GetRecords"));
            }
        }
        // Kinesis lets an iterator be used again until it expires (a retry does that).
        let Some(iterator) = state.iterators.get(shard_iterator) else {
            return Err(Error::Service {
                service: Service::Kinesis,
                operation: "GetRecords",
                source: format!("unknown shard iterator {shard_iterator}").into(),
            });
        };
        if iterator.issued_at + ITERATOR_LIFETIME <= Instant::now() {
            return Err(Error::ExpiredIterator {
                shard_id: shard_id.to_owned(),
            });
        }
        let (shard_id, next_index) = (iterator.shard_id.clone(), iterator.next_index);
        let shard = state.shard(&shard_id)?;
        let end = (next_index + limit as usize).min(shard.records.len());
        let records = shard.records[next_index..end].to_vec();
        let millis_behind = shard.records.get(end).map_or(0, |next| {
            next.approximate_arrival_timestamp
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        let finished = !shard.shard.is_open() && end == shard.records.len();
        let children = if finished && !state.omit_child_shards {
            shard.children.clone()
        } else {
            Vec::new()
        };
        let next = (!finished).then(|| state.issue(&shard_id, end));
        Ok(RecordsPage::new(records, next)
            .with_millis_behind_latest(millis_behind)
            .with_child_shards(children))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pages_through_a_shard_and_expires_iterators() {
        let stream = InMemoryStream::new("s", 1);
        for i in 0..5 {
            stream.put_record(&format!("k{i}"), vec![i]);
        }
        let it = stream
            .get_shard_iterator("shardId-000000000000", &StartingPosition::TrimHorizon)
            .await
            .unwrap();
        let page = stream
            .get_records("shardId-000000000000", &it, 3)
            .await
            .unwrap();
        assert_eq!(page.records.len(), 3);
        let page = stream
            .get_records(
                "shardId-000000000000",
                page.next_shard_iterator.as_ref().unwrap(),
                3,
            )
            .await
            .unwrap();
        assert_eq!(page.records.len(), 2);
        tokio::time::advance(ITERATOR_LIFETIME).await;
        let err = stream
            .get_records(
                "shardId-000000000000",
                page.next_shard_iterator.as_ref().unwrap(),
                3,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ExpiredIterator { .. }));
    }

    #[tokio::test]
    async fn conditional_updates_check_owner_and_counter() {
        let store = InMemoryLeaseStore::new("t");
        assert!(
            store
                .create_lease_if_absent(&Lease::new("a", crate::Checkpoint::TrimHorizon))
                .await
                .unwrap()
        );
        assert!(
            !store
                .create_lease_if_absent(&Lease::new("a", crate::Checkpoint::Latest))
                .await
                .unwrap()
        );
        let wrong = LeaseFence {
            owner: Some("w".into()),
            counter: 0,
        };
        let err = store
            .update_lease("a", &wrong, &LeaseUpdate::Renew)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::LeaseConditionFailed {
                current: Some(_),
                ..
            }
        ));
        let err = store
            .update_lease("zz", &wrong, &LeaseUpdate::Renew)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::LeaseConditionFailed { current: None, .. }
        ));
    }
}

/// What a [`Faulty`] wrapper does to the calls going through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fault {
    /// Calls go through.
    #[default]
    None,
    /// Calls fail at once with a transient error.
    Fail,
    /// Calls fail at once as throttled.
    Throttle,
    /// Calls never answer (a network stall, or a paused process).
    Stall,
    /// Calls wait until the fault ends, like [`Fault::Stall`], but lease writes are then
    /// delivered even when their caller stopped waiting: a request already on the wire when the
    /// process paused, or a write that timed out at the client and still lands. Only the
    /// conditions on the lease items stand between such a late write and the new owner.
    Hold,
}

/// A kind of lease-store call, to pick the one [`Faulty::hang_next`] makes hang.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseCall {
    /// `update_lease` with this operation, as [`LeaseUpdate::operation`] names it (`"renew"`,
    /// `"checkpoint"`, `"take"`, `"release"`, ...).
    Update(&'static str),
    /// `list_leases`.
    Scan,
    /// `get_lease` or `get_leases`.
    Get,
    /// `create_lease_if_absent`.
    Create,
    /// `delete_lease`.
    Delete,
}

/// What a call made to hang by [`Faulty::hang_next`] did before it stopped answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hang {
    /// The request never reached the store (a dead pooled connection): nothing is applied.
    Lost,
    /// The store applied the call, but its answer never comes back.
    AnswerLost,
}

/// Wraps a [`StreamClient`] or a [`LeaseStore`] of one worker and injects faults into its calls,
/// switchable at any time: one worker can be cut off while the others run on.
#[derive(Debug)]
pub struct Faulty<T: ?Sized> {
    inner: std::sync::Arc<T>,
    /// Stalled calls wait on this; they wake in a fixed order, so simulations replay.
    fault: std::sync::Arc<Published<Fault>>,
    /// Lease-store calls still to hang, each once, in the order they were asked for.
    hangs: Mutex<Vec<(LeaseCall, Hang)>>,
    hung: AtomicUsize,
}

impl<T: ?Sized> Faulty<T> {
    /// No fault until [`Faulty::set`] says otherwise.
    pub fn new(inner: std::sync::Arc<T>) -> Self {
        Faulty {
            inner,
            fault: std::sync::Arc::new(Published::new(Fault::None)),
            hangs: Mutex::new(Vec::new()),
            hung: AtomicUsize::new(0),
        }
    }

    /// The next lease-store call of this kind never answers: it hangs until its caller stops
    /// waiting (the worker's request timeout, or a lease running out), while every other call
    /// goes through. This is one request stuck on a dead connection, not an outage (for that,
    /// see [`Fault::Stall`]). `hang` says whether the store applied it first.
    pub fn hang_next(&self, call: LeaseCall, hang: Hang) {
        lock(&self.hangs).push((call, hang));
    }

    /// How many calls were made to hang so far.
    pub fn hung_calls(&self) -> usize {
        self.hung.load(Ordering::SeqCst)
    }

    /// Whether this call is one to hang (consuming the request if so).
    fn hang_for(&self, call: &LeaseCall) -> Option<Hang> {
        let mut hangs = lock(&self.hangs);
        let i = hangs.iter().position(|(c, _)| c == call)?;
        Some(hangs.remove(i).1)
    }

    /// Runs `call` if the hang applies it, then never answers.
    async fn hang<R>(&self, hang: Hang, call: impl Future<Output = Result<R>>) -> Result<R> {
        self.hung.fetch_add(1, Ordering::SeqCst);
        if hang == Hang::AnswerLost {
            let _ = call.await;
        }
        std::future::pending().await
    }

    /// Sets the fault for the calls from now on. Ending a stall lets the stalled calls go on,
    /// meeting whatever fault is set then.
    pub fn set(&self, fault: Fault) {
        self.fault.set(fault);
    }

    async fn gate(&self, service: Service, operation: &'static str) -> Result<()> {
        let now = self
            .fault
            .wait_for(|f| !matches!(f, Fault::Stall | Fault::Hold))
            .await;
        match *now {
            Fault::Fail => Err(injected(service, operation)),
            Fault::Throttle => Err(Error::Throttled {
                service,
                operation,
                source: "injected throttling".into(),
            }),
            Fault::None | Fault::Stall | Fault::Hold => Ok(()),
        }
    }

    fn holding(&self) -> bool {
        *self.fault.get() == Fault::Hold
    }

    /// Runs a held write on a task of its own once the hold ends, whether or not the caller
    /// still waits for the answer.
    async fn deliver_later<R: Send + 'static>(
        &self,
        operation: &'static str,
        write: impl Future<Output = Result<R>> + Send + 'static,
    ) -> Result<R> {
        let fault = self.fault.clone();
        let delivery = tokio::spawn(async move {
            fault.wait_for(|f| *f != Fault::Hold).await;
            write.await
        });
        delivery
            .await
            .unwrap_or_else(|_| Err(injected(Service::LeaseStore, operation)))
    }
}

#[async_trait]
impl<T: StreamClient + ?Sized> StreamClient for Faulty<T> {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }
    async fn list_shards(&self) -> Result<Vec<Shard>> {
        self.gate(Service::Kinesis, "ListShards").await?;
        self.inner.list_shards().await
    }
    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<String> {
        self.gate(Service::Kinesis, "GetShardIterator").await?;
        self.inner.get_shard_iterator(shard_id, position).await
    }
    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        self.gate(Service::Kinesis, "GetRecords").await?;
        self.inner
            .get_records(shard_id, shard_iterator, limit)
            .await
    }
}

#[async_trait]
impl<T: LeaseStore + ?Sized + 'static> LeaseStore for Faulty<T> {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }
    async fn initialize(&self) -> Result<()> {
        self.gate(Service::LeaseStore, "DescribeTable").await?;
        self.inner.initialize().await
    }
    async fn list_leases(&self) -> Result<LeaseScan> {
        self.gate(Service::LeaseStore, "Scan").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Scan) {
            return self.hang(hang, self.inner.list_leases()).await;
        }
        self.inner.list_leases().await
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>> {
        self.gate(Service::LeaseStore, "GetItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Get) {
            return self.hang(hang, self.inner.get_lease(lease_key)).await;
        }
        self.inner.get_lease(lease_key).await
    }
    async fn get_leases(&self, lease_keys: &[String]) -> Result<LeaseScan> {
        self.gate(Service::LeaseStore, "BatchGetItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Get) {
            return self.hang(hang, self.inner.get_leases(lease_keys)).await;
        }
        self.inner.get_leases(lease_keys).await
    }
    async fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool> {
        if self.holding() {
            let (inner, lease) = (self.inner.clone(), lease.clone());
            let write = async move { inner.create_lease_if_absent(&lease).await };
            return self.deliver_later("PutItem", write).await;
        }
        self.gate(Service::LeaseStore, "PutItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Create) {
            return self
                .hang(hang, self.inner.create_lease_if_absent(lease))
                .await;
        }
        self.inner.create_lease_if_absent(lease).await
    }
    async fn update_lease(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        update: &LeaseUpdate,
    ) -> Result<Lease> {
        if self.holding() {
            let (inner, key, fence, update) = (
                self.inner.clone(),
                lease_key.to_owned(),
                fence.clone(),
                update.clone(),
            );
            let write = async move { inner.update_lease(&key, &fence, &update).await };
            return self.deliver_later("UpdateItem", write).await;
        }
        self.gate(Service::LeaseStore, "UpdateItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Update(update.operation())) {
            return self
                .hang(hang, self.inner.update_lease(lease_key, fence, update))
                .await;
        }
        self.inner.update_lease(lease_key, fence, update).await
    }
    async fn delete_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<()> {
        if self.holding() {
            let (inner, key, fence) = (self.inner.clone(), lease_key.to_owned(), fence.clone());
            let write = async move { inner.delete_lease(&key, &fence).await };
            return self.deliver_later("DeleteItem", write).await;
        }
        self.gate(Service::LeaseStore, "DeleteItem").await?;
        if let Some(hang) = self.hang_for(&LeaseCall::Delete) {
            return self
                .hang(hang, self.inner.delete_lease(lease_key, fence))
                .await;
        }
        self.inner.delete_lease(lease_key, fence).await
    }
}
