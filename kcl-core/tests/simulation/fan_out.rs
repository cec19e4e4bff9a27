//! Fan-out fleets: every worker of the seed reads through enhanced fan-out
//! (`Retrieval::FanOut`) on the in-memory stream's subscriptions, with settings suited to
//! virtual time, and the seed injects fan-out faults at random times alongside the others:
//! sessions that end early and at varying lengths, subscriptions failing mid-stream, refused
//! subscribes, silent subscriptions, a linger after a drop (a new owner is refused for a few
//! seconds after a handoff, as on AWS), the rate limit of one subscribe a second, a consumer
//! that takes a while to become active, small events. Splits and merges end shards through
//! the subscription (the event naming the children).
//!
//! Invariant 9 (fan-out fleets): a worker holds a subscription to a shard only while it
//! owns the shard's lease, checked once the fleet settled (the subscriptions a worker's client
//! holds are counted by [`Watched`]); and once every worker stopped, none is held and none is
//! open at the stream, except dropped ones still lingering.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kcl_core::testing::{Faulty, InMemoryStream, SubscriptionFault};
use kcl_core::{
    Error, FanOutConfig, RecordsPage, RetryConfig, Shard, ShardSubscription, StartingPosition,
    StreamClient, StreamConsumer, SubscriptionEvent,
};
use tokio::time::Instant;

use crate::Sim;
use crate::observe::{Rng, Shared, covered, violation};

/// Chance per schedule step of a fan-out fault, at a random time before the step.
const FAULT_PERCENT: u64 = 45;
/// How long a settled fan-out fleet runs on before invariant 9 is checked: longer than the
/// lease duration (10 s), so a worker that came back from a pause has learnt that its lease
/// is gone and closed its subscription.
const QUIET: Duration = Duration::from_secs(15);

/// Longer than any run of faults a worker may start into.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// A fan-out fleet's settings and fault generator, drawn per seed.
pub(crate) struct FanOutFleet {
    /// Draws the fan-out settings and faults, apart from the schedule.
    pub(crate) rng: Rng,
    /// Every worker's retrieval settings.
    pub(crate) config: FanOutConfig,
    /// The session length and event interval the seed starts with (restored when the faults
    /// end).
    session_length: Duration,
    event_interval: Duration,
}

/// A session length: mostly short, so sessions end often, at times the full 5 minutes.
fn session_length(rng: &mut Rng) -> Duration {
    match rng.below(10) {
        0..=3 => rng.millis(500, 3_000),
        4..=7 => rng.millis(3_000, 20_000),
        8 => rng.millis(20_000, 90_000),
        _ => Duration::from_secs(300),
    }
}

/// The in-memory stream sends an event without records after this long without records:
/// below every event timeout drawn (at least 4 s), as AWS (at most 5 s) is below the default.
fn event_interval(rng: &mut Rng) -> Duration {
    rng.millis(1_000, 3_000)
}

impl FanOutFleet {
    /// Draws the seed's settings and sets the stream's knobs; returns the trace line.
    pub(crate) fn draw(mut rng: Rng, stream: &InMemoryStream) -> (Self, String) {
        let event_timeout = rng.millis(4_000, 8_000);
        let max_retry = rng.millis(2_000, 6_000);
        // Registration waits out Kinesis outages longer than the default 60 s: a worker
        // starting into pauses and stalls may not reach Kinesis for a minute, and then ends
        // with `ConsumerNotActive` by design (seed 52303), where the simulation wants every
        // worker to run on.
        let config = FanOutConfig::default()
            .with_event_timeout(event_timeout)
            .with_retry(RetryConfig::new(Duration::from_secs(1), max_retry))
            .with_registration_timeout(REGISTRATION_TIMEOUT);
        let session = session_length(&mut rng);
        let interval = event_interval(&mut rng);
        let activation = rng.chance(50).then(|| rng.millis(500, 10_000));
        let max_records = rng.chance(40).then(|| 1 + rng.below(10) as usize);
        let linger = rng.chance(60).then(|| rng.millis(500, 5_000));
        let rate_limit = rng.chance(85);
        stream.set_subscription_session_length(session);
        stream.set_subscription_event_interval(interval);
        stream.set_consumer_activation_delay(activation.unwrap_or_default());
        if let Some(max) = max_records {
            stream.set_subscription_max_records(max);
        }
        stream.set_subscription_linger(linger.unwrap_or_default());
        stream.set_subscribe_rate_limit(rate_limit);
        let line = format!(
            "fan-out: event timeout {event_timeout:?}, retry up to {max_retry:?}; sessions of \
             {session:?}, an event every {interval:?} at least, activation after \
             {activation:?}, at most {max_records:?} records an event, linger {linger:?}, rate \
             limit {rate_limit}"
        );
        let fleet = FanOutFleet {
            rng,
            config,
            session_length: session,
            event_interval: interval,
        };
        (fleet, line)
    }
}

impl Sim {
    /// Sleeps `gap`; in fan-out fleets, now and then a fan-out fault strikes on the way.
    pub(crate) async fn sleep_with_fan_out_faults(&mut self, gap: Duration) {
        let Some(fleet) = self.fan_out.as_mut() else {
            tokio::time::sleep(gap).await;
            return;
        };
        if !fleet.rng.chance(FAULT_PERCENT) {
            tokio::time::sleep(gap).await;
            return;
        }
        let at = Duration::from_millis(fleet.rng.below(gap.as_millis() as u64));
        tokio::time::sleep(at).await;
        self.fan_out_fault();
        tokio::time::sleep(gap - at).await;
    }

    /// One fan-out fault, drawn from the fleet's generator.
    fn fan_out_fault(&mut self) {
        let stream = self.stream.clone();
        let fleet = self.fan_out.as_mut().expect("a fan-out fleet");
        let rng = &mut fleet.rng;
        // The shard of a subscription open now (not lingering), if any.
        let open_shard = |rng: &mut Rng| {
            let open: Vec<String> = stream
                .open_subscriptions()
                .into_iter()
                .filter(|s| !s.lingering)
                .map(|s| s.shard_id)
                .collect();
            (!open.is_empty()).then(|| open[rng.below(open.len() as u64) as usize].clone())
        };
        let line = match rng.below(12) {
            0..=2 => {
                let length = session_length(rng);
                stream.set_subscription_session_length(length);
                format!("fan-out: sessions last {length:?}")
            }
            3..=4 => {
                let Some(shard) = open_shard(rng) else {
                    return;
                };
                let fault = if rng.chance(70) {
                    SubscriptionFault::Transient
                } else {
                    SubscriptionFault::ResourceInUse
                };
                let n = stream.fail_subscriptions(&shard, fault);
                format!("fan-out: {n} subscriptions to {shard} fail ({fault:?})")
            }
            5..=6 => {
                let n = 1 + rng.below(4) as usize;
                let fault = [
                    SubscriptionFault::ResourceInUse,
                    SubscriptionFault::Throttled,
                    SubscriptionFault::Transient,
                ][rng.below(3) as usize];
                stream.refuse_next_subscribes(n, fault);
                format!("fan-out: the next {n} subscribes are refused ({fault:?})")
            }
            7..=8 => {
                let Some(shard) = open_shard(rng) else {
                    return;
                };
                let n = stream.silence_subscriptions(&shard);
                covered(&self.observed, |c| c.silenced += n as u64);
                format!("fan-out: {n} subscriptions to {shard} go silent")
            }
            9 => {
                let linger = rng.millis(0, 5_000);
                stream.set_subscription_linger(linger);
                format!("fan-out: dropped subscriptions linger {linger:?}")
            }
            10 => {
                let on = rng.chance(50);
                stream.set_subscribe_rate_limit(on);
                format!("fan-out: rate limit {on}")
            }
            _ => {
                if rng.chance(50) {
                    let max = 1 + rng.below(20) as usize;
                    stream.set_subscription_max_records(max);
                    format!("fan-out: at most {max} records an event")
                } else {
                    let interval = event_interval(rng);
                    stream.set_subscription_event_interval(interval);
                    format!("fan-out: an event every {interval:?} at least")
                }
            }
        };
        self.trace(line);
    }

    /// The fan-out faults end: sessions and events as the seed started, the rate limit on.
    /// (Linger and small events stay: AWS lingers, and small events are no fault.)
    pub(crate) fn end_fan_out_faults(&self) {
        if let Some(fleet) = &self.fan_out {
            self.stream
                .set_subscription_session_length(fleet.session_length);
            self.stream
                .set_subscription_event_interval(fleet.event_interval);
            self.stream.set_subscribe_rate_limit(true);
        }
    }

    /// Lets a settled fleet run on for [`QUIET`] (processes of a shared worker id that stop
    /// meanwhile reaped as they end).
    pub(crate) async fn stay_a_while(&mut self) {
        let until = Instant::now() + QUIET;
        while Instant::now() < until {
            self.reap_shared().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Invariant 9, in a fleet settled a while ago and settled still: a worker holds
    /// subscriptions only to the shards whose leases it owns (and that did not end).
    pub(crate) fn check_subscriptions_settled(&self) {
        let leases = self.leases.leases();
        let held = self.observed.lock().unwrap().subscribed.clone();
        for ((worker, shard), n) in held {
            if n == 0 {
                continue;
            }
            let lease = leases.iter().find(|l| l.lease_key == shard);
            let owned = lease
                .is_some_and(|l| l.owner.as_deref() == Some(worker.as_str()) && !l.is_finished());
            if !owned || n > 1 {
                let lease = lease.map(|l| (l.owner.clone(), l.checkpoint.to_string()));
                violation(
                    &self.observed,
                    format!(
                        "{worker} holds {n} subscriptions to {shard} in a settled fleet; its \
                         lease (owner, checkpoint): {lease:?}"
                    ),
                );
            }
        }
    }

    /// Invariant 9, once every worker stopped: no subscription held, none open at the stream
    /// but dropped ones still lingering.
    pub(crate) async fn check_subscriptions_closed(&mut self) {
        if self.fan_out.is_none() {
            return;
        }
        // Tasks aborted at a worker's end are dropped when the runtime next runs.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let held: Vec<_> = self
            .observed
            .lock()
            .unwrap()
            .subscribed
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        if !held.is_empty() {
            violation(
                &self.observed,
                format!("subscriptions still held after every worker stopped: {held:?}"),
            );
        }
        let open: Vec<_> = self
            .stream
            .open_subscriptions()
            .into_iter()
            .filter(|s| !s.lingering)
            .map(|s| s.shard_id)
            .collect();
        if !open.is_empty() {
            violation(
                &self.observed,
                format!("subscriptions still open after every worker stopped, to {open:?}"),
            );
        }
    }
}

/// A worker's stream client in a fan-out fleet: its [`Faulty`] client, counting the
/// subscriptions it holds (invariant 9) and what they meet (coverage).
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) inner: Arc<Faulty<InMemoryStream>>,
    pub(crate) worker: String,
    pub(crate) observed: Shared,
    /// The stream itself, to tell a refusal by a lingering subscription.
    pub(crate) server: Arc<InMemoryStream>,
}

#[async_trait]
impl StreamClient for Watched {
    fn stream_name(&self) -> &str {
        self.inner.stream_name()
    }
    async fn list_shards(&self) -> kcl_core::Result<Vec<Shard>> {
        self.inner.list_shards().await
    }
    async fn get_shard_iterator(
        &self,
        shard_id: &str,
        position: &StartingPosition,
    ) -> kcl_core::Result<String> {
        self.inner.get_shard_iterator(shard_id, position).await
    }
    async fn get_records(
        &self,
        shard_id: &str,
        shard_iterator: &str,
        limit: u32,
    ) -> kcl_core::Result<RecordsPage> {
        self.inner
            .get_records(shard_id, shard_iterator, limit)
            .await
    }
    async fn describe_stream_consumer(
        &self,
        consumer: &str,
    ) -> kcl_core::Result<Option<StreamConsumer>> {
        self.inner.describe_stream_consumer(consumer).await
    }
    async fn register_stream_consumer(&self, name: &str) -> kcl_core::Result<StreamConsumer> {
        self.inner.register_stream_consumer(name).await
    }
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &StartingPosition,
    ) -> kcl_core::Result<Box<dyn ShardSubscription>> {
        match self
            .inner
            .subscribe_to_shard(consumer_arn, shard_id, position)
            .await
        {
            Ok(inner) => {
                let key = (self.worker.clone(), shard_id.to_owned());
                let mut observed = self.observed.lock().unwrap();
                *observed.subscribed.entry(key.clone()).or_default() += 1;
                observed.coverage.subscriptions += 1;
                Ok(Box::new(WatchedSubscription {
                    inner,
                    key,
                    observed: self.observed.clone(),
                    held: true,
                }))
            }
            Err(e) => {
                if matches!(e, Error::ResourceInUse { .. }) {
                    let lingering = self
                        .server
                        .open_subscriptions()
                        .iter()
                        .any(|s| s.shard_id == shard_id && s.lingering);
                    covered(&self.observed, |c| {
                        c.subscribes_in_use += 1;
                        c.refused_by_lingering += u64::from(lingering);
                    });
                }
                Err(e)
            }
        }
    }
}

#[derive(Debug)]
struct WatchedSubscription {
    inner: Box<dyn ShardSubscription>,
    key: (String, String),
    observed: Shared,
    /// Not yet ended, failed or dropped.
    held: bool,
}

impl WatchedSubscription {
    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            let mut observed = self.observed.lock().unwrap();
            if let Some(n) = observed.subscribed.get_mut(&self.key) {
                *n -= 1;
            }
        }
    }
}

#[async_trait]
impl ShardSubscription for WatchedSubscription {
    async fn next_event(&mut self) -> kcl_core::Result<Option<SubscriptionEvent>> {
        // Cancel-safe as the inner subscription is: nothing is counted before it answers.
        let answer = self.inner.next_event().await;
        if self.held {
            match &answer {
                Ok(Some(event)) if event.is_shard_end() => {
                    covered(&self.observed, |c| c.fan_out_shard_ends += 1);
                    self.release();
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    covered(&self.observed, |c| c.session_ends += 1);
                    self.release();
                }
                Err(_) => {
                    covered(&self.observed, |c| c.subscriptions_failed += 1);
                    self.release();
                }
            }
        }
        answer
    }
}

impl Drop for WatchedSubscription {
    fn drop(&mut self) {
        if self.held {
            covered(&self.observed, |c| c.subscriptions_dropped += 1);
            self.release();
        }
    }
}
