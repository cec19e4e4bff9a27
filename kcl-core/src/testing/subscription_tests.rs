//! Fan-out of the in-memory stream, on paused time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tokio::time::{Instant, advance, sleep};

use super::*;
use crate::error::{Error, ErrorKind};
use crate::sequence::SequenceNumber;
use crate::stream::{StartingPosition, StreamClient};
use crate::subscription::{ConsumerStatus, ShardSubscription, SubscriptionEvent};

const SHARD: &str = "shardId-000000000000";

/// A one-shard stream with a registered consumer; its ARN.
async fn stream_with_consumer() -> (InMemoryStream, String) {
    let stream = InMemoryStream::new("s", 1);
    let consumer = stream.register_stream_consumer("app").await.unwrap();
    (stream, consumer.arn)
}

async fn subscribe(
    stream: &InMemoryStream,
    arn: &str,
    position: &StartingPosition,
) -> crate::Result<Box<dyn ShardSubscription>> {
    stream.subscribe_to_shard(arn, SHARD, position).await
}

async fn next(subscription: &mut Box<dyn ShardSubscription>) -> SubscriptionEvent {
    subscription
        .next_event()
        .await
        .expect("an event")
        .expect("not ended")
}

fn sequence_numbers(event: &SubscriptionEvent) -> Vec<SequenceNumber> {
    event
        .records
        .iter()
        .map(|r| r.sequence_number.clone())
        .collect()
}

fn after(event: &SubscriptionEvent) -> StartingPosition {
    StartingPosition::AfterSequenceNumber(event.continuation_sequence_number.clone().unwrap())
}

#[tokio::test(start_paused = true)]
async fn records_flow_in_order_across_events() {
    let (stream, arn) = stream_with_consumer().await;
    stream.set_subscription_max_records(2);
    let put: Vec<_> = (0..5u8)
        .map(|i| stream.put_record("k", vec![i]).1)
        .collect();
    let start = Instant::now();
    let mut sub = subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    // A backlog comes at once, in events of at most 2 records.
    for chunk in put.chunks(2) {
        let event = next(&mut sub).await;
        assert_eq!(sequence_numbers(&event), chunk);
        assert_eq!(event.continuation_sequence_number.as_ref(), chunk.last());
        assert!(event.child_shards.is_empty());
        assert!(event.millis_behind_latest.is_some());
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    // Caught up: an event without records after the interval, continuing after the last
    // record.
    let event = next(&mut sub).await;
    assert!(event.records.is_empty());
    assert_eq!(event.continuation_sequence_number.as_ref(), put.last());
    assert_eq!(event.millis_behind_latest, Some(0));
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    // A record put meanwhile comes as soon as it is put.
    let (event, put) = tokio::join!(next(&mut sub), async {
        sleep(Duration::from_millis(300)).await;
        stream.put_record("k", vec![5]).1
    });
    assert_eq!(sequence_numbers(&event), [put]);
    assert_eq!(start.elapsed(), Duration::from_millis(1_300));
}

#[tokio::test(start_paused = true)]
async fn starting_positions_mean_what_they_mean_for_iterators() {
    let (stream, arn) = stream_with_consumer().await;
    stream.set_subscribe_rate_limit(false);
    let put: Vec<_> = (0..4u8)
        .map(|i| stream.put_record("k", vec![i]).1)
        .collect();
    let cases = [
        (StartingPosition::TrimHorizon, &put[..]),
        (
            StartingPosition::AtTimestamp(SystemTime::UNIX_EPOCH),
            &put[..],
        ),
        (
            StartingPosition::AtSequenceNumber(put[1].clone()),
            &put[1..],
        ),
        (
            StartingPosition::AfterSequenceNumber(put[1].clone()),
            &put[2..],
        ),
    ];
    for (position, expected) in cases {
        let mut sub = subscribe(&stream, &arn, &position).await.unwrap();
        assert_eq!(
            sequence_numbers(&next(&mut sub).await),
            expected,
            "{position:?}"
        );
    }
    // LATEST: only what is put afterwards; meanwhile the continuation is the last record.
    let mut sub = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    let event = next(&mut sub).await;
    assert!(event.records.is_empty());
    assert_eq!(event.continuation_sequence_number.as_ref(), put.last());
    let new = stream.put_record("k", vec![9]).1;
    assert_eq!(sequence_numbers(&next(&mut sub).await), [new]);
}

#[tokio::test(start_paused = true)]
async fn on_an_empty_shard_the_continuation_is_the_shard_start_and_resumes_from_the_start() {
    let (stream, arn) = stream_with_consumer().await;
    let starting = stream.shards()[0].starting_sequence_number.clone().unwrap();
    let mut sub = subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    let event = next(&mut sub).await;
    assert!(event.records.is_empty());
    assert_eq!(
        event
            .continuation_sequence_number
            .as_ref()
            .map(|s| s.as_str()),
        Some(starting.as_str())
    );
    drop(sub);
    let put = stream.put_record("k", vec![1]).1;
    let mut sub = subscribe(&stream, &arn, &after(&event)).await.unwrap();
    assert_eq!(
        sequence_numbers(&next(&mut sub).await),
        std::slice::from_ref(&put)
    );
    // A child shard starts after everything put before it was created.
    let [child, _] = stream.split_shard(SHARD);
    let child = stream
        .shards()
        .into_iter()
        .find(|s| s.shard_id == child)
        .unwrap();
    let child_start = SequenceNumber::new(child.starting_sequence_number.unwrap()).unwrap();
    assert!(child_start >= put);
}

/// One reader: subscribes again after every end, always after the last continuation.
struct Reader {
    position: StartingPosition,
    subscription: Option<Box<dyn ShardSubscription>>,
    seen: Vec<SequenceNumber>,
    subscribes: usize,
}

impl Reader {
    fn new() -> Self {
        Reader {
            position: StartingPosition::TrimHorizon,
            subscription: None,
            seen: Vec::new(),
            subscribes: 0,
        }
    }

    /// Reads one event (subscribing first if need be); the event, `None` at a session end.
    async fn read(&mut self, stream: &InMemoryStream, arn: &str) -> Option<SubscriptionEvent> {
        if self.subscription.is_none() {
            let subscription = match subscribe(stream, arn, &self.position).await {
                Err(Error::Throttled { .. }) => {
                    sleep(Duration::from_secs(1)).await;
                    subscribe(stream, arn, &self.position).await
                }
                other => other,
            };
            self.subscription = Some(subscription.expect("subscribed"));
            self.subscribes += 1;
        }
        let subscription = self.subscription.as_mut().expect("subscribed");
        match subscription.next_event().await.expect("no failure") {
            Some(event) => {
                self.seen.extend(sequence_numbers(&event));
                if let Some(continuation) = &event.continuation_sequence_number {
                    self.position = StartingPosition::AfterSequenceNumber(continuation.clone());
                }
                Some(event)
            }
            None => {
                self.subscription = None;
                None
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put(u8),
    Read,
    Wait(u64),
    /// The client goes away (its own timeout, say).
    Drop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u8..6).prop_map(Op::Put),
        4 => Just(Op::Read),
        2 => (0u64..2_500).prop_map(Op::Wait),
        1 => Just(Op::Drop),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random puts, reads, waits (sessions end in the middle of backlogs) and dropped
    /// subscriptions; the shard is split at the end and read to its end: every record was
    /// delivered once, in order.
    #[test]
    fn resubscribing_after_each_continuation_delivers_every_record_once(
        session_millis in 500u64..4_000,
        max_records in 1usize..4,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (put, seen) = runtime.block_on(async {
            let (stream, arn) = stream_with_consumer().await;
            stream.set_subscription_session_length(Duration::from_millis(session_millis));
            stream.set_subscription_max_records(max_records);
            let mut put = Vec::new();
            let mut reader = Reader::new();
            for op in ops {
                match op {
                    Op::Put(n) => {
                        put.extend((0..n).map(|i| stream.put_record("k", vec![i]).1));
                    }
                    Op::Read => {
                        reader.read(&stream, &arn).await;
                    }
                    Op::Wait(millis) => sleep(Duration::from_millis(millis)).await,
                    Op::Drop => reader.subscription = None,
                }
            }
            let children = stream.split_shard(SHARD);
            let mut last = None;
            for _ in 0..10_000 {
                if let Some(event) = reader.read(&stream, &arn).await
                    && event.is_shard_end()
                {
                    last = Some(event);
                    break;
                }
            }
            let last = last.expect("the shard ended");
            let named: Vec<_> = last.child_shards.iter().map(|c| c.shard_id.clone()).collect();
            assert_eq!(named, children);
            assert!(last.records.is_empty());
            (put, reader.seen)
        });
        prop_assert_eq!(seen, put);
    }
}

#[tokio::test(start_paused = true)]
async fn a_split_shard_ends_with_an_event_naming_its_children() {
    let (stream, arn) = stream_with_consumer().await;
    let put: Vec<_> = (0..3u8)
        .map(|i| stream.put_record("k", vec![i]).1)
        .collect();
    let mut sub = subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    let records = next(&mut sub).await;
    assert_eq!(sequence_numbers(&records), put);
    let start = Instant::now();
    let (end, children) = tokio::join!(next(&mut sub), async {
        sleep(Duration::from_millis(200)).await;
        let children = stream.split_shard(SHARD);
        // Put after the split: to the children, not to the parent.
        stream.put_record("k", vec![9]);
        children
    });
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    assert!(end.is_shard_end());
    assert!(end.records.is_empty());
    let named: Vec<_> = end
        .child_shards
        .iter()
        .map(|c| c.shard_id.clone())
        .collect();
    assert_eq!(named, children);
    assert!(
        end.child_shards
            .iter()
            .all(|c| c.parent_shard_ids == [SHARD.to_owned()])
    );
    assert!(sub.next_event().await.unwrap().is_none());
    assert!(sub.next_event().await.unwrap().is_none());
    assert!(stream.open_subscriptions().is_empty(), "ended, so closed");
    // Subscribing again after the last record: the end at once.
    advance(Duration::from_secs(1)).await;
    let mut sub = subscribe(&stream, &arn, &after(&records)).await.unwrap();
    assert!(next(&mut sub).await.is_shard_end());
}

#[tokio::test(start_paused = true)]
async fn a_merged_shard_ends_naming_the_child_of_both_parents() {
    let stream = InMemoryStream::new("s", 2);
    let arn = stream.register_stream_consumer("app").await.unwrap().arn;
    let child = stream.merge_shards(SHARD, "shardId-000000000001");
    let mut sub = stream
        .subscribe_to_shard(&arn, "shardId-000000000001", &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    let end = next(&mut sub).await;
    assert!(end.is_shard_end());
    assert_eq!(end.child_shards.len(), 1);
    assert_eq!(end.child_shards[0].shard_id, child);
    assert_eq!(
        end.child_shards[0].parent_shard_ids,
        [SHARD, "shardId-000000000001"]
    );
}

#[tokio::test(start_paused = true)]
async fn one_subscription_per_consumer_and_shard_until_dropped_and_the_linger() {
    let (stream, arn) = stream_with_consumer().await;
    stream.set_subscribe_rate_limit(false);
    let first = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    let err = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ResourceInUse { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Transient);
    // Another consumer of the same shard is not in the way.
    let other = stream.register_stream_consumer("other").await.unwrap().arn;
    let _other = subscribe(&stream, &other, &StartingPosition::Latest)
        .await
        .unwrap();
    drop(first);
    let second = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    assert_eq!(stream.open_subscriptions().len(), 2);

    stream.set_subscription_linger(Duration::from_secs(5));
    drop(second);
    let lingering: Vec<_> = stream
        .open_subscriptions()
        .into_iter()
        .filter(|s| s.consumer_arn == arn)
        .collect();
    assert_eq!(lingering.len(), 1);
    assert!(lingering[0].lingering);
    advance(Duration::from_millis(4_999)).await;
    let err = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ResourceInUse { .. }), "{err:?}");
    advance(Duration::from_millis(1)).await;
    subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn more_than_one_subscribe_a_second_is_throttled() {
    let (stream, arn) = stream_with_consumer().await;
    drop(
        subscribe(&stream, &arn, &StartingPosition::Latest)
            .await
            .unwrap(),
    );
    for wait in [0, 500, 499] {
        advance(Duration::from_millis(wait)).await;
        let err = subscribe(&stream, &arn, &StartingPosition::Latest)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Throttled { .. }), "{err:?}");
    }
    // A second after the last accepted one; the refused ones did not count.
    advance(Duration::from_millis(1)).await;
    drop(
        subscribe(&stream, &arn, &StartingPosition::Latest)
            .await
            .unwrap(),
    );
    assert_eq!(stream.subscribe_calls(SHARD).len(), 5);
    stream.set_subscribe_rate_limit(false);
    drop(
        subscribe(&stream, &arn, &StartingPosition::Latest)
            .await
            .unwrap(),
    );
    drop(
        subscribe(&stream, &arn, &StartingPosition::Latest)
            .await
            .unwrap(),
    );
}

#[tokio::test(start_paused = true)]
async fn a_session_ends_after_its_length_and_closes() {
    let (stream, arn) = stream_with_consumer().await;
    stream.set_subscription_session_length(Duration::from_secs(10));
    let start = Instant::now();
    let mut sub = subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    let mut events = 0;
    while sub.next_event().await.unwrap().is_some() {
        events += 1;
    }
    assert_eq!(events, 9, "one a second, the session's end at the 10th");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert!(sub.next_event().await.unwrap().is_none());
    assert!(stream.open_subscriptions().is_empty());
    subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn settings_apply_to_open_subscriptions() {
    let (stream, arn) = stream_with_consumer().await;
    let mut sub = subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    stream.set_subscription_event_interval(Duration::from_secs(5));
    let start = Instant::now();
    next(&mut sub).await;
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    // Shortened while waiting: the wait ends.
    let (end, ()) = tokio::join!(sub.next_event(), async {
        sleep(Duration::from_secs(1)).await;
        stream.set_subscription_session_length(Duration::ZERO);
    });
    assert!(end.unwrap().is_none());
    assert_eq!(start.elapsed(), Duration::from_secs(6));
}

#[tokio::test(start_paused = true)]
async fn refused_subscribes_fail_with_the_fault_asked_for() {
    let (stream, arn) = stream_with_consumer().await;
    stream.set_subscribe_rate_limit(false);
    stream.refuse_next_subscribes(2, SubscriptionFault::Throttled);
    for fault in [
        SubscriptionFault::ResourceInUse,
        SubscriptionFault::Transient,
        SubscriptionFault::ResourceNotFound,
    ] {
        stream.refuse_next_subscribes(1, fault);
    }
    let mut errors = Vec::new();
    for _ in 0..5 {
        errors.push(
            subscribe(&stream, &arn, &StartingPosition::Latest)
                .await
                .unwrap_err(),
        );
    }
    assert!(matches!(errors[0], Error::Throttled { .. }));
    assert!(matches!(errors[1], Error::Throttled { .. }));
    assert!(matches!(errors[2], Error::ResourceInUse { .. }));
    assert!(matches!(errors[3], Error::Transient { .. }));
    assert!(matches!(errors[4], Error::StreamNotFound { .. }));
    subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    assert_eq!(stream.subscribe_calls(SHARD).len(), 6);
    assert!(stream.subscribe_calls("shardId-000000000009").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_subscription_answers_the_error_once_and_is_over() {
    let (stream, arn) = stream_with_consumer().await;
    assert_eq!(
        stream.fail_subscriptions(SHARD, SubscriptionFault::Transient),
        0
    );
    let mut sub = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    let start = Instant::now();
    let (failed, count) = tokio::join!(sub.next_event(), async {
        sleep(Duration::from_millis(300)).await;
        stream.fail_subscriptions(SHARD, SubscriptionFault::Transient)
    });
    assert_eq!(count, 1);
    assert!(matches!(failed, Err(Error::Transient { .. })), "{failed:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(300), "woken at once");
    assert!(sub.next_event().await.unwrap().is_none());
    assert!(stream.open_subscriptions().is_empty());
    // The next subscription is not affected.
    advance(Duration::from_secs(1)).await;
    let mut sub = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    next(&mut sub).await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_subscription_never_answers_and_stays_open_until_dropped() {
    let (stream, arn) = stream_with_consumer().await;
    stream.set_subscription_session_length(Duration::from_secs(10));
    let mut sub = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    assert_eq!(stream.silence_subscriptions(SHARD), 1);
    stream.put_record("k", vec![1]);
    let waited = tokio::time::timeout(Duration::from_secs(60), sub.next_event()).await;
    assert!(waited.is_err(), "no answer, not even the session's end");
    let open = stream.open_subscriptions();
    assert_eq!(open.len(), 1);
    assert!(!open[0].lingering);
    let err = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ResourceInUse { .. }), "{err:?}");
    drop(sub);
    let mut sub = subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.records.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn consumers_register_once_become_active_and_can_be_deregistered() {
    let stream = InMemoryStream::new("orders", 1);
    let app = stream.register_stream_consumer("app").await.unwrap();
    assert_eq!(
        app.arn,
        "arn:aws:kinesis:us-east-1:000000000000:stream/orders/consumer/app:1"
    );
    assert_eq!(app.status, ConsumerStatus::Active, "no activation delay");
    let err = stream.register_stream_consumer("app").await.unwrap_err();
    assert!(matches!(err, Error::ResourceInUse { .. }), "{err:?}");
    assert_eq!(
        stream.describe_stream_consumer("app").await.unwrap(),
        Some(app.clone())
    );
    assert_eq!(
        stream.describe_stream_consumer(&app.arn).await.unwrap(),
        Some(app.clone())
    );
    assert_eq!(stream.describe_stream_consumer("none").await.unwrap(), None);

    stream.set_consumer_activation_delay(Duration::from_secs(2));
    let slow = stream.register_stream_consumer("slow").await.unwrap();
    assert_eq!(slow.status, ConsumerStatus::Creating);
    let err = subscribe(&stream, &slow.arn, &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ResourceInUse { .. }), "{err:?}");
    advance(Duration::from_secs(2)).await;
    let slow = stream
        .describe_stream_consumer("slow")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(slow.status, ConsumerStatus::Active);
    subscribe(&stream, &slow.arn, &StartingPosition::Latest)
        .await
        .unwrap();

    let mut sub = subscribe(&stream, &app.arn, &StartingPosition::Latest)
        .await
        .unwrap();
    assert!(stream.deregister_stream_consumer("app"));
    assert!(!stream.deregister_stream_consumer("app"));
    let err = sub.next_event().await.unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
    assert_eq!(
        stream.describe_stream_consumer(&app.arn).await.unwrap(),
        None
    );
    let err = subscribe(&stream, &app.arn, &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
    let again = stream.register_stream_consumer("app").await.unwrap();
    assert_ne!(again.arn, app.arn, "a new registration, a new ARN");
}

#[tokio::test(start_paused = true)]
async fn unknown_consumers_shards_and_streams_are_not_found() {
    let (stream, arn) = stream_with_consumer().await;
    let err = subscribe(
        &stream,
        "arn:aws:kinesis:nowhere",
        &StartingPosition::Latest,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
    let err = stream
        .subscribe_to_shard(&arn, "shardId-000000000009", &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShardNotFound { shard_id, .. } if shard_id == "shardId-000000000009"),
        "{err:?}"
    );

    let missing = InMemoryStream::missing("gone");
    let err = missing.register_stream_consumer("app").await.unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
    let err = subscribe(&missing, &arn, &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_trimmed_shard_is_not_found_like_get_records_says() {
    let (stream, arn) = stream_with_consumer().await;
    stream.put_record("k", vec![1]);
    let mut sub = subscribe(&stream, &arn, &StartingPosition::Latest)
        .await
        .unwrap();
    stream.split_shard(SHARD);
    stream.trim_shard(SHARD);
    let err = sub.next_event().await.unwrap_err();
    assert!(matches!(err, Error::ShardNotFound { .. }), "{err:?}");
    advance(Duration::from_secs(1)).await;
    let err = subscribe(&stream, &arn, &StartingPosition::TrimHorizon)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ShardNotFound { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_faulty_client_cuts_its_subscriptions_off_too() {
    let stream = Arc::new(InMemoryStream::new("s", 1));
    // No empty events in the way.
    stream.set_subscription_event_interval(Duration::from_secs(60));
    let faulty = Faulty::new(stream.clone());
    let arn = faulty.register_stream_consumer("app").await.unwrap().arn;
    assert!(
        faulty
            .describe_stream_consumer("app")
            .await
            .unwrap()
            .is_some()
    );
    faulty.set(Fault::Fail);
    let err = faulty
        .subscribe_to_shard(&arn, SHARD, &StartingPosition::Latest)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transient { .. }), "{err:?}");
    faulty.set(Fault::None);
    let mut sub = faulty
        .subscribe_to_shard(&arn, SHARD, &StartingPosition::Latest)
        .await
        .unwrap();

    // A stall holds an event until it ends.
    faulty.set(Fault::Stall);
    let put = stream.put_record("k", vec![1]).1;
    let start = Instant::now();
    let (event, ()) = tokio::join!(next(&mut sub), async {
        sleep(Duration::from_secs(2)).await;
        faulty.set(Fault::None);
    });
    assert_eq!(sequence_numbers(&event), [put]);
    assert_eq!(start.elapsed(), Duration::from_secs(2));

    // A failure ends the wait at once, and the subscription.
    let (failed, ()) = tokio::join!(sub.next_event(), async {
        sleep(Duration::from_millis(300)).await;
        faulty.set(Fault::Fail);
    });
    assert!(matches!(failed, Err(Error::Transient { .. })), "{failed:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(2_300));
    assert!(sub.next_event().await.unwrap().is_none());
    assert!(
        stream.open_subscriptions().is_empty(),
        "closed at the server"
    );
}
