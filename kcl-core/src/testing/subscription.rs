//! Enhanced fan-out on the in-memory stream: registered consumers and `SubscribeToShard`.
//!
//! # What a subscription does
//!
//! A subscription starts where a shard iterator at the same [`StartingPosition`] would, and
//! answers each [`ShardSubscription::next_event`] with:
//!
//! - the records after the previous event, up to a maximum per event, as soon as there are
//!   any (a backlog comes in back-to-back events);
//! - otherwise, once the event interval (default 1 s, as kinesis-mock; AWS: at most 5 s) has
//!   passed since the previous event (or since the subscribe), an event without records;
//! - on a closed shard, once every record was delivered, an event without records, without
//!   continuation and naming the shard's children; the subscription then ends (`Ok(None)`);
//! - `Ok(None)` once the session length (default 5 minutes, as AWS) has passed since the
//!   subscribe, delivered records or not.
//!
//! An event's continuation is the sequence number of its last record, or, without records,
//! that of the last record before the subscription's position; when there is none (nothing
//! read yet from the shard's beginning), the shard's starting sequence number, which is
//! smaller than every sequence number of the shard (see [`InMemoryStream::shards`]). Either
//! way a new subscription `AfterSequenceNumber` the continuation starts at the first record
//! not delivered: nothing is skipped or delivered twice. `millis_behind_latest` is computed
//! as `GetRecords` computes it: the age of the first record not delivered yet, 0 when none.
//!
//! Only one subscription per consumer and shard may be open: another subscribe fails with
//! [`Error::ResourceInUse`] until the open one ended (its last answer given) or was dropped,
//! plus a linger after a drop (default none; AWS keeps a subscription whose client went
//! away up to 5 s, kinesis-mock about 3 s). A subscribe less than a second after the last
//! accepted one for the same consumer and shard fails with [`Error::Throttled`] (Kinesis'
//! `LimitExceededException`); this limit can be switched off.
//!
//! Waits are on Tokio time, and waiters wake in the order they started waiting (a
//! [`Notify`], not a `watch`): a seeded simulation on paused time replays.
//!
//! # Cancel safety
//!
//! [`ShardSubscription::next_event`] changes the subscription only in the poll that answers:
//! a caller that stops waiting (its own timeout) loses no event.
//!
//! # Errors, as the Kinesis client classifies them
//!
//! An unknown consumer ARN, or a consumer deregistered while subscribed, is Kinesis'
//! `ResourceNotFoundException`, which the Kinesis client maps to [`Error::StreamNotFound`];
//! an unknown or trimmed shard is [`Error::ShardNotFound`] (as `GetRecords` answers for a
//! trimmed shard); a consumer not yet active is [`Error::ResourceInUse`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::lock;
use super::stream::{InMemoryStream, MemoryShard, StreamState};
use crate::error::{Error, Result, Service};
use crate::sequence::SequenceNumber;
use crate::stream::StartingPosition;
use crate::subscription::{ConsumerStatus, ShardSubscription, StreamConsumer, SubscriptionEvent};

const SUBSCRIBE: &str = "SubscribeToShard";

/// One subscribe a second per consumer and shard, as Kinesis allows.
const SUBSCRIBE_RATE: Duration = Duration::from_secs(1);

/// An error the in-memory stream injects into fan-out, named after the Kinesis exception it
/// stands for (see [`InMemoryStream::refuse_next_subscribes`],
/// [`InMemoryStream::fail_subscriptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionFault {
    /// `ResourceInUseException`: [`Error::ResourceInUse`].
    ResourceInUse,
    /// `LimitExceededException`: [`Error::Throttled`].
    Throttled,
    /// A reset connection or an `InternalFailureException`: [`Error::Transient`].
    Transient,
    /// `ResourceNotFoundException`: [`Error::StreamNotFound`], as the Kinesis client
    /// classifies it for `SubscribeToShard`.
    ResourceNotFound,
}

impl SubscriptionFault {
    fn error(self, stream: &str, operation: &'static str, message: String) -> Error {
        let service = Service::Kinesis;
        match self {
            SubscriptionFault::ResourceInUse => Error::ResourceInUse {
                service,
                operation,
                source: format!("ResourceInUseException: {message}").into(),
            },
            SubscriptionFault::Throttled => Error::Throttled {
                service,
                operation,
                source: format!("LimitExceededException: {message}").into(),
            },
            SubscriptionFault::Transient => Error::Transient {
                service,
                operation,
                source: format!("InternalFailureException: {message}").into(),
            },
            SubscriptionFault::ResourceNotFound => Error::StreamNotFound {
                stream: stream.to_owned(),
                source: Some(format!("ResourceNotFoundException: {message}").into()),
            },
        }
    }
}

/// A subscription that blocks another one of its consumer to its shard, as
/// [`InMemoryStream::open_subscriptions`] reports it.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct OpenSubscription {
    /// The consumer subscribed.
    pub consumer_arn: String,
    /// The shard.
    pub shard_id: String,
    /// When the subscribe was accepted.
    pub opened_at: Instant,
    /// Dropped by its client, and still open for the linger
    /// ([`InMemoryStream::set_subscription_linger`]).
    pub lingering: bool,
}

#[derive(Debug)]
struct Consumer {
    name: String,
    arn: String,
    active_at: Instant,
}

impl Consumer {
    fn described(&self, now: Instant) -> StreamConsumer {
        let status = if now >= self.active_at {
            ConsumerStatus::Active
        } else {
            ConsumerStatus::Creating
        };
        StreamConsumer::new(&self.name, &self.arn, status)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Injected {
    Fail(SubscriptionFault),
    Silent,
}

/// The server's side of a subscription, open until it ends or its client dropped it (plus
/// the linger).
#[derive(Debug)]
struct Slot {
    consumer_arn: String,
    shard_id: String,
    opened_at: Instant,
    dropped_until: Option<Instant>,
    injected: Option<Injected>,
}

/// The fan-out part of the stream's state.
#[derive(Debug)]
pub(super) struct FanOut {
    /// In the order they were registered.
    consumers: Vec<Consumer>,
    registrations: u64,
    activation_delay: Duration,
    event_interval: Duration,
    session_length: Duration,
    max_records: usize,
    linger: Duration,
    rate_limit: bool,
    next_subscription: u64,
    /// By subscription number: iterated in the order they were opened.
    slots: BTreeMap<u64, Slot>,
    /// When the last subscribe per (consumer ARN, shard) was accepted.
    accepted: HashMap<(String, String), Instant>,
    calls: HashMap<String, Vec<Instant>>,
    refusals: VecDeque<SubscriptionFault>,
    /// Notified on every change a subscription may be waiting for.
    changed: Arc<Notify>,
}

impl Default for FanOut {
    fn default() -> Self {
        FanOut {
            consumers: Vec::new(),
            registrations: 0,
            activation_delay: Duration::ZERO,
            // kinesis-mock's interval; AWS sends one at least every 5 s.
            event_interval: Duration::from_secs(1),
            // AWS ends a subscription after 5 minutes.
            session_length: Duration::from_secs(300),
            // The most records one GetRecords returns.
            max_records: 10_000,
            linger: Duration::ZERO,
            rate_limit: true,
            next_subscription: 0,
            slots: BTreeMap::new(),
            accepted: HashMap::new(),
            calls: HashMap::new(),
            refusals: VecDeque::new(),
            changed: Arc::new(Notify::new()),
        }
    }
}

impl FanOut {
    /// Wakes every waiting subscription to look again.
    pub(super) fn wake(&self) {
        self.changed.notify_waiters();
    }

    fn consumer(&self, arn: &str) -> Option<&Consumer> {
        self.consumers.iter().find(|c| c.arn == arn)
    }

    /// Forgets dropped subscriptions whose linger is over.
    fn prune(&mut self, now: Instant) {
        self.slots
            .retain(|_, s| s.dropped_until.is_none_or(|until| until > now));
    }

    /// The live (not dropped) subscriptions to `shard_id`, made to misbehave.
    fn inject(&mut self, shard_id: &str, injected: Injected) -> usize {
        let mut count = 0;
        for slot in self.slots.values_mut() {
            if slot.shard_id == shard_id && slot.dropped_until.is_none() {
                slot.injected = Some(injected);
                count += 1;
            }
        }
        self.wake();
        count
    }
}

fn shard_not_found(stream: &str, shard_id: &str) -> Error {
    Error::ShardNotFound {
        stream: stream.to_owned(),
        shard_id: shard_id.to_owned(),
        source: Some(format!("ResourceNotFoundException: shard {shard_id} not found").into()),
    }
}

fn consumer_not_found(stream: &str, operation: &'static str, arn: &str) -> Error {
    SubscriptionFault::ResourceNotFound.error(
        stream,
        operation,
        format!("consumer {arn} not found"),
    )
}

/// Consumer registry.
impl InMemoryStream {
    pub(super) fn describe_consumer(&self, consumer: &str) -> Result<Option<StreamConsumer>> {
        let by_arn = consumer.starts_with("arn:");
        if !by_arn {
            // By name, the stream is looked up first.
            self.check_exists()?;
        }
        let state = lock(&self.state);
        let now = Instant::now();
        Ok(state
            .fan_out
            .consumers
            .iter()
            .find(|c| {
                if by_arn {
                    c.arn == consumer
                } else {
                    c.name == consumer
                }
            })
            .map(|c| c.described(now)))
    }

    pub(super) fn register_consumer(&self, name: &str) -> Result<StreamConsumer> {
        self.check_exists()?;
        let mut state = lock(&self.state);
        let fan_out = &mut state.fan_out;
        if fan_out.consumers.iter().any(|c| c.name == name) {
            return Err(SubscriptionFault::ResourceInUse.error(
                &self.name,
                "RegisterStreamConsumer",
                format!("consumer {name} exists"),
            ));
        }
        fan_out.registrations += 1;
        let now = Instant::now();
        let consumer = Consumer {
            name: name.to_owned(),
            arn: format!(
                "arn:aws:kinesis:us-east-1:000000000000:stream/{}/consumer/{name}:{}",
                self.name, fan_out.registrations
            ),
            active_at: now + fan_out.activation_delay,
        };
        let described = consumer.described(now);
        fan_out.consumers.push(consumer);
        Ok(described)
    }

    /// Makes consumers registered from now on `Creating` for `delay` (Tokio time) before they
    /// are `Active`; subscribing meanwhile fails with [`Error::ResourceInUse`]. Default: no
    /// delay, a consumer is `Active` at once (AWS takes seconds, kinesis-mock ~60 ms).
    pub fn set_consumer_activation_delay(&self, delay: Duration) {
        lock(&self.state).fan_out.activation_delay = delay;
    }

    /// Deregisters a consumer (by name or ARN) at once; returns whether it existed. Its open
    /// subscriptions fail at their next event as Kinesis' `ResourceNotFoundException`
    /// ([`Error::StreamNotFound`]), and so do subscribes with its ARN. Registering the name
    /// again gives a new ARN.
    pub fn deregister_stream_consumer(&self, consumer: &str) -> bool {
        let mut state = lock(&self.state);
        let fan_out = &mut state.fan_out;
        let Some(index) = fan_out
            .consumers
            .iter()
            .position(|c| c.arn == consumer || c.name == consumer)
        else {
            return false;
        };
        let arn = fan_out.consumers.remove(index).arn;
        fan_out.slots.retain(|_, s| s.consumer_arn != arn);
        fan_out.wake();
        true
    }
}

/// Subscriptions and their knobs.
impl InMemoryStream {
    pub(super) fn subscribe(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> Result<MemorySubscription> {
        self.check_exists()?;
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let fan_out = &mut state.fan_out;
        fan_out
            .calls
            .entry(shard_id.to_owned())
            .or_default()
            .push(now);
        if let Some(fault) = fan_out.refusals.pop_front() {
            return Err(fault.error(&self.name, SUBSCRIBE, "injected".to_owned()));
        }
        let consumer = fan_out
            .consumer(consumer_arn)
            .ok_or_else(|| consumer_not_found(&self.name, SUBSCRIBE, consumer_arn))?;
        if consumer.described(now).status != ConsumerStatus::Active {
            return Err(SubscriptionFault::ResourceInUse.error(
                &self.name,
                SUBSCRIBE,
                format!("consumer {consumer_arn} is not ACTIVE"),
            ));
        }
        let start = state
            .shards
            .iter()
            .find(|s| s.shard.shard_id == shard_id)
            .ok_or_else(|| shard_not_found(&self.name, shard_id))?
            .start_index(position);
        let fan_out = &mut state.fan_out;
        fan_out.prune(now);
        if fan_out
            .slots
            .values()
            .any(|s| s.consumer_arn == consumer_arn && s.shard_id == shard_id)
        {
            return Err(SubscriptionFault::ResourceInUse.error(
                &self.name,
                SUBSCRIBE,
                format!(
                    "another active subscription exists for consumer {consumer_arn} and shard \
                     {shard_id}"
                ),
            ));
        }
        let key = (consumer_arn.to_owned(), shard_id.to_owned());
        if fan_out.rate_limit
            && fan_out
                .accepted
                .get(&key)
                .is_some_and(|last| now < *last + SUBSCRIBE_RATE)
        {
            return Err(SubscriptionFault::Throttled.error(
                &self.name,
                SUBSCRIBE,
                format!("more than one subscribe a second for {consumer_arn} and {shard_id}"),
            ));
        }
        fan_out.accepted.insert(key, now);
        fan_out.next_subscription += 1;
        let id = fan_out.next_subscription;
        fan_out.slots.insert(
            id,
            Slot {
                consumer_arn: consumer_arn.to_owned(),
                shard_id: shard_id.to_owned(),
                opened_at: now,
                dropped_until: None,
                injected: None,
            },
        );
        Ok(MemorySubscription {
            state: Arc::clone(&self.state),
            changed: Arc::clone(&fan_out.changed),
            stream: self.name.clone(),
            id,
            consumer_arn: consumer_arn.to_owned(),
            shard_id: shard_id.to_owned(),
            next_index: start,
            opened_at: now,
            last_event_at: now,
            over: false,
        })
    }

    /// Sets how long a subscription waits without records before it sends an event without
    /// them (default 1 s, as kinesis-mock; AWS: at most 5 s). Applies to open subscriptions
    /// too, from their next wait.
    pub fn set_subscription_event_interval(&self, interval: Duration) {
        let mut state = lock(&self.state);
        state.fan_out.event_interval = interval;
        state.fan_out.wake();
    }

    /// Sets how long a subscription lasts before it ends with `Ok(None)` (default 5 minutes,
    /// as AWS). Applies to open subscriptions too, counted from their subscribe: a length of
    /// zero ends every open subscription at its next answer.
    pub fn set_subscription_session_length(&self, length: Duration) {
        let mut state = lock(&self.state);
        state.fan_out.session_length = length;
        state.fan_out.wake();
    }

    /// Sets the most records one event carries (default 10 000, the most `GetRecords`
    /// returns; at least 1). Applies to open subscriptions too.
    pub fn set_subscription_max_records(&self, max: usize) {
        lock(&self.state).fan_out.max_records = max.max(1);
    }

    /// Keeps a subscription open for `linger` after its client dropped it, as AWS does (up
    /// to 5 s) when a client goes away without closing: a subscribe of the same consumer to
    /// the shard meanwhile fails with [`Error::ResourceInUse`]. Default: none.
    pub fn set_subscription_linger(&self, linger: Duration) {
        lock(&self.state).fan_out.linger = linger;
    }

    /// Switches the limit of one subscribe a second per consumer and shard
    /// ([`Error::Throttled`] beyond it) on (the default) or off.
    pub fn set_subscribe_rate_limit(&self, on: bool) {
        lock(&self.state).fan_out.rate_limit = on;
    }

    /// Makes the next `count` subscribes (to any shard) fail with `fault`, before anything
    /// is checked; they are counted by [`InMemoryStream::subscribe_calls`] but do not count
    /// towards the rate limit.
    pub fn refuse_next_subscribes(&self, count: usize, fault: SubscriptionFault) {
        lock(&self.state)
            .fan_out
            .refusals
            .extend(std::iter::repeat_n(fault, count));
    }

    /// Fails the open subscriptions to `shard_id` mid-stream, as an exception frame does:
    /// their next (or current) wait for an event answers the error, and they are over.
    /// Returns how many there were (dropped ones still lingering do not count).
    pub fn fail_subscriptions(&self, shard_id: &str, fault: SubscriptionFault) -> usize {
        lock(&self.state)
            .fan_out
            .inject(shard_id, Injected::Fail(fault))
    }

    /// Makes the open subscriptions to `shard_id` go silent: their waits for an event never
    /// answer, the end of the session included, and they stay open until dropped (plus the
    /// linger), as when a connection dies without a reset. Subscriptions opened later are not
    /// affected. Returns how many there were.
    pub fn silence_subscriptions(&self, shard_id: &str) -> usize {
        lock(&self.state).fan_out.inject(shard_id, Injected::Silent)
    }

    /// When each subscribe to the shard was called, refused ones included.
    pub fn subscribe_calls(&self, shard_id: &str) -> Vec<Instant> {
        lock(&self.state)
            .fan_out
            .calls
            .get(shard_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The subscriptions open now (lingering ones included), in the order they were opened.
    pub fn open_subscriptions(&self) -> Vec<OpenSubscription> {
        let mut state = lock(&self.state);
        state.fan_out.prune(Instant::now());
        state
            .fan_out
            .slots
            .values()
            .map(|s| OpenSubscription {
                consumer_arn: s.consumer_arn.clone(),
                shard_id: s.shard_id.clone(),
                opened_at: s.opened_at,
                lingering: s.dropped_until.is_some(),
            })
            .collect()
    }
}

/// A subscription to a shard of an [`InMemoryStream`].
pub(super) struct MemorySubscription {
    state: Arc<Mutex<StreamState>>,
    changed: Arc<Notify>,
    stream: String,
    id: u64,
    consumer_arn: String,
    shard_id: String,
    /// The index in the shard's records of the first record not delivered yet.
    next_index: usize,
    opened_at: Instant,
    last_event_at: Instant,
    /// Ended, or failed: every answer from now on is `Ok(None)`.
    over: bool,
}

impl fmt::Debug for MemorySubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscription")
            .field("stream", &self.stream)
            .field("consumer_arn", &self.consumer_arn)
            .field("shard_id", &self.shard_id)
            .field("next_index", &self.next_index)
            .field("over", &self.over)
            .finish_non_exhaustive()
    }
}

/// What one look at the stream decided.
enum Step {
    Answer(Result<Option<SubscriptionEvent>>),
    /// Never answer.
    Silent,
    /// Nothing to send before this, unless the stream changes.
    WaitUntil(Instant),
}

impl MemorySubscription {
    /// Looks at the stream once; closes the server's side when the answer is the last one.
    fn step(&mut self, now: Instant) -> Step {
        if self.over {
            return Step::Answer(Ok(None));
        }
        let shared = Arc::clone(&self.state);
        let mut state = lock(&shared);
        let step = self.look(&state, now);
        if let Step::Answer(answer) = &step {
            let last = match answer {
                Ok(Some(event)) => event.is_shard_end(),
                Ok(None) | Err(_) => true,
            };
            if last {
                self.over = true;
                state.fan_out.slots.remove(&self.id);
            }
        }
        step
    }

    fn look(&mut self, state: &StreamState, now: Instant) -> Step {
        let fan_out = &state.fan_out;
        match fan_out.slots.get(&self.id).and_then(|s| s.injected) {
            Some(Injected::Silent) => return Step::Silent,
            Some(Injected::Fail(fault)) => {
                let message = format!("injected into the subscription to {}", self.shard_id);
                return Step::Answer(Err(fault.error(&self.stream, SUBSCRIBE, message)));
            }
            None => {}
        }
        if fan_out.consumer(&self.consumer_arn).is_none() {
            return Step::Answer(Err(consumer_not_found(
                &self.stream,
                SUBSCRIBE,
                &self.consumer_arn,
            )));
        }
        let session_end = self.opened_at + fan_out.session_length;
        if now >= session_end {
            return Step::Answer(Ok(None));
        }
        let Ok(shard) = state.shard(&self.shard_id) else {
            // Trimmed.
            return Step::Answer(Err(shard_not_found(&self.stream, &self.shard_id)));
        };
        let records = &shard.records;
        if self.next_index < records.len() {
            let end = (self.next_index + fan_out.max_records).min(records.len());
            let batch = records[self.next_index..end].to_vec();
            let continuation = batch.last().map(|r| r.sequence_number.clone());
            self.next_index = end;
            self.last_event_at = now;
            let event = SubscriptionEvent::new(batch, continuation)
                .with_millis_behind_latest(shard.millis_behind(end));
            return Step::Answer(Ok(Some(event)));
        }
        if !shard.shard.is_open() {
            let event = SubscriptionEvent::new(Vec::new(), None)
                .with_millis_behind_latest(0)
                .with_child_shards(shard.children.clone());
            return Step::Answer(Ok(Some(event)));
        }
        let due = self.last_event_at + fan_out.event_interval;
        if now >= due {
            self.last_event_at = now;
            let event = SubscriptionEvent::new(Vec::new(), Some(self.position(shard)))
                .with_millis_behind_latest(0);
            return Step::Answer(Ok(Some(event)));
        }
        Step::WaitUntil(due.min(session_end))
    }

    /// The sequence number a subscription after which starts at `next_index`.
    fn position(&self, shard: &MemoryShard) -> SequenceNumber {
        match self.next_index.checked_sub(1) {
            Some(last) => shard.records[last].sequence_number.clone(),
            None => {
                let starting = shard
                    .shard
                    .starting_sequence_number
                    .clone()
                    .expect("in-memory shards have a starting sequence number");
                SequenceNumber::new(starting).expect("a number is a sequence number")
            }
        }
    }
}

#[async_trait]
impl ShardSubscription for MemorySubscription {
    async fn next_event(&mut self) -> Result<Option<SubscriptionEvent>> {
        loop {
            // Registered before the look, so a change after it wakes the wait.
            let changed = Arc::clone(&self.changed);
            let mut change = std::pin::pin!(changed.notified());
            change.as_mut().enable();
            match self.step(Instant::now()) {
                Step::Answer(answer) => return answer,
                Step::Silent => return std::future::pending().await,
                Step::WaitUntil(at) => {
                    // Biased: the default random branch order would make runs differ.
                    tokio::select! {
                        biased;
                        () = change => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }
}

impl Drop for MemorySubscription {
    /// The client going away: the server's side closes, after the linger.
    fn drop(&mut self) {
        if self.over {
            return;
        }
        let mut state = lock(&self.state);
        let fan_out = &mut state.fan_out;
        if fan_out.linger.is_zero() {
            fan_out.slots.remove(&self.id);
        } else if let Some(slot) = fan_out.slots.get_mut(&self.id) {
            slot.dropped_until = Some(Instant::now() + fan_out.linger);
        }
    }
}
