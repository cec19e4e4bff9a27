//! The in-memory Kinesis stream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use super::subscription::FanOut;
use super::{Fault, injected, lock};
use crate::error::{Error, Result, Service};
use crate::sequence::SequenceNumber;
use crate::stream::{
    ChildShard, HashKeyRange, Record, RecordsPage, Shard, StartingPosition, StreamClient,
};
use crate::stream_identity::StreamIdentity;
use crate::subscription::{ShardSubscription, StreamConsumer};

/// Shard iterators expire after five minutes, as in Kinesis.
pub(super) const ITERATOR_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub(super) struct MemoryShard {
    /// As listed. Its starting sequence number is the stream's sequence counter when the shard
    /// was created: every record of the shard has a larger one, so reading after it is reading
    /// from the shard's beginning.
    pub(super) shard: Shard,
    pub(super) records: Vec<Record>,
    pub(super) children: Vec<ChildShard>,
}

impl MemoryShard {
    fn new(shard: Shard, starting_sequence_number: u128) -> Self {
        let mut shard = shard;
        shard.starting_sequence_number = Some(starting_sequence_number.to_string());
        MemoryShard {
            shard,
            records: Vec::new(),
            children: Vec::new(),
        }
    }

    /// The index of the first record at `position`, as a shard iterator starts there.
    pub(super) fn start_index(&self, position: &StartingPosition) -> usize {
        let records = &self.records;
        match position {
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
        }
    }

    /// How far a reader that stopped before `records[end]` is behind the tip: the age of
    /// that record, 0 when it read everything.
    pub(super) fn millis_behind(&self, end: usize) -> u64 {
        self.records.get(end).map_or(0, |next| {
            next.approximate_arrival_timestamp
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
    }
}

#[derive(Debug)]
struct IssuedIterator {
    shard_id: String,
    next_index: usize,
    issued_at: Instant,
}

#[derive(Debug, Default)]
pub(super) struct StreamState {
    pub(super) shards: Vec<MemoryShard>,
    next_sequence_number: u128,
    iterators: HashMap<String, IssuedIterator>,
    next_iterator_id: u64,
    get_records_calls: HashMap<String, Vec<Instant>>,
    /// When each `DescribeStreamSummary` (`stream_identity`) call came.
    identity_calls: Vec<Instant>,
    failing_get_records: VecDeque<Error>,
    /// Shards whose `GetRecords` calls fail with this fault (throttling, say) until cleared.
    shard_faults: HashMap<String, Fault>,
    omit_child_shards: bool,
    /// Enhanced fan-out: consumers and subscriptions.
    pub(super) fan_out: FanOut,
}

impl StreamState {
    pub(super) fn shard(&self, shard_id: &str) -> Result<&MemoryShard> {
        self.shards
            .iter()
            .find(|s| s.shard.shard_id == shard_id)
            .ok_or_else(|| Error::ShardNotFound {
                stream: String::new(),
                shard_id: shard_id.to_owned(),
                source: None,
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
        self.shards
            .push(MemoryShard::new(shard, self.next_sequence_number));
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
        // Its subscriptions send their last event.
        self.fan_out.wake();
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
    pub(super) name: String,
    /// Shared with the open fan-out subscriptions, which read on after the call that opened
    /// them returned.
    pub(super) state: Arc<Mutex<StreamState>>,
    exists: std::sync::atomic::AtomicBool,
    puts: AtomicU64,
    /// How long each `GetRecords` takes to answer (Tokio time).
    get_records_latency: Mutex<std::time::Duration>,
    /// When the stream was created, in seconds since the epoch (its identity).
    creation_epoch: u64,
}

/// The account of every in-memory stream (kinesis-mock's too).
pub const IN_MEMORY_ACCOUNT: &str = "000000000000";
/// The creation time of an in-memory stream unless set with
/// [`InMemoryStream::with_creation_epoch`]: 2023-11-14T22:13:20Z.
pub const IN_MEMORY_CREATION_EPOCH: u64 = 1_700_000_000;

impl InMemoryStream {
    /// The same stream, as if created at `epoch` (seconds since the Unix epoch): a stream
    /// deleted and created again under its name has a later one.
    #[must_use]
    pub fn with_creation_epoch(mut self, epoch: u64) -> Self {
        self.creation_epoch = epoch;
        self
    }

    /// A stream of `shard_count` open shards splitting the hash key space evenly.
    pub fn new(name: impl Into<String>, shard_count: u32) -> Self {
        let stream = InMemoryStream {
            name: name.into(),
            state: Arc::new(Mutex::new(StreamState {
                next_sequence_number: 1_000,
                ..StreamState::default()
            })),
            exists: std::sync::atomic::AtomicBool::new(true),
            puts: AtomicU64::new(0),
            get_records_latency: Mutex::new(std::time::Duration::ZERO),
            creation_epoch: IN_MEMORY_CREATION_EPOCH,
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
                let shard = Shard::new(
                    format!("shardId-{i:012}"),
                    HashKeyRange {
                        starting_hash_key: start,
                        ending_hash_key: end,
                    },
                );
                let starting = state.next_sequence_number;
                state.shards.push(MemoryShard::new(shard, starting));
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

    /// Deletes the stream: from now on every call fails with [`Error::StreamNotFound`], as
    /// Kinesis answers `ResourceNotFoundException` for a deleted stream.
    pub fn delete(&self) {
        self.exists.store(false, Ordering::SeqCst);
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
        let shard_id = shard.shard.shard_id.clone();
        state.fan_out.wake();
        self.puts.fetch_add(1, Ordering::Relaxed);
        (shard_id, sequence_number)
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

    /// Makes every `GetRecords` from now on take `latency` to answer (a big page over a real
    /// network). Calls are recorded when they start.
    pub fn set_get_records_latency(&self, latency: std::time::Duration) {
        *lock(&self.get_records_latency) = latency;
    }

    /// When each `GetRecords` call on the shard started.
    pub fn get_records_calls(&self, shard_id: &str) -> Vec<Instant> {
        lock(&self.state)
            .get_records_calls
            .get(shard_id)
            .cloned()
            .unwrap_or_default()
    }

    /// When each `DescribeStreamSummary` ([`StreamClient::stream_identity`]) call came.
    pub fn identity_calls(&self) -> Vec<Instant> {
        lock(&self.state).identity_calls.clone()
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

    /// The shards as `ListShards` would list them. A shard's starting sequence number is the
    /// stream's sequence counter when it was created: every record put to it has a larger
    /// one, so reading after it reads the shard from its beginning.
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
        // Its subscriptions fail.
        state.fan_out.wake();
    }

    /// Makes every iterator issued so far expire.
    pub fn expire_iterators(&self) {
        let mut state = lock(&self.state);
        for iterator in state.iterators.values_mut() {
            iterator.issued_at -= ITERATOR_LIFETIME;
        }
    }

    pub(super) fn check_exists(&self) -> Result<()> {
        if self.exists.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::StreamNotFound {
                stream: self.name.clone(),
                source: None,
            })
        }
    }
}

#[async_trait]
impl StreamClient for InMemoryStream {
    fn stream_name(&self) -> &str {
        &self.name
    }

    async fn stream_identity(&self) -> Result<StreamIdentity> {
        lock(&self.state).identity_calls.push(Instant::now());
        self.check_exists()?;
        StreamIdentity::new(IN_MEMORY_ACCOUNT, &self.name, self.creation_epoch)
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
        let index = state.shard(shard_id)?.start_index(position);
        Ok(state.issue(shard_id, index))
    }

    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<RecordsPage> {
        self.check_exists()?;
        lock(&self.state)
            .get_records_calls
            .entry(shard_id.to_owned())
            .or_default()
            .push(Instant::now());
        let latency = *lock(&self.get_records_latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut state = lock(&self.state);
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
                source: None,
            });
        }
        let (shard_id, next_index) = (iterator.shard_id.clone(), iterator.next_index);
        let shard = state.shard(&shard_id)?;
        let end = (next_index + limit as usize).min(shard.records.len());
        let records = shard.records[next_index..end].to_vec();
        let millis_behind = shard.millis_behind(end);
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

    async fn describe_stream_consumer(&self, consumer: &str) -> Result<Option<StreamConsumer>> {
        self.describe_consumer(consumer)
    }

    async fn register_stream_consumer(&self, name: &str) -> Result<StreamConsumer> {
        self.register_consumer(name)
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<Box<dyn ShardSubscription>> {
        Ok(Box::new(self.subscribe(
            consumer_arn,
            shard_id,
            position,
        )?))
    }
}
