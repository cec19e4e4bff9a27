//! Which streams a multi-stream application consumes ([`StreamTracker`]), and when the leases
//! of a stream it no longer consumes are deleted ([`FormerStreams`]).
//!
//! A tracker is asked again every discovery interval: a fixed list, a user's async function
//! (say "every stream whose name starts with `orders-`"), or
//! [`StreamsByPrefix`](crate::StreamsByPrefix) on `ListStreams`. Workers ask at different
//! moments, so for a while some see a stream that others no longer list: the leases of a
//! stream are deleted only once it has been missing for a grace period, and never while a
//! worker still holds one of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::config::InitialPosition;
use crate::error::Result;
use crate::stream::StreamClient;
use crate::stream_identity::StreamIdentity;

/// One stream to consume, and where its shards without a checkpoint start.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct StreamConfig {
    /// The stream's name or ARN (an ARN names another account's stream).
    pub stream: String,
    /// Where its shards without a checkpoint start. Default [`InitialPosition::Latest`].
    pub initial_position: InitialPosition,
}

impl StreamConfig {
    /// `stream` (a name or an ARN), read from [`InitialPosition::Latest`].
    pub fn new(stream: impl Into<String>) -> Self {
        StreamConfig {
            stream: stream.into(),
            initial_position: InitialPosition::Latest,
        }
    }

    /// Sets [`StreamConfig::initial_position`].
    #[must_use]
    pub fn with_initial_position(mut self, position: InitialPosition) -> Self {
        self.initial_position = position;
        self
    }
}

/// The streams to consume now. Asked once per discovery interval; an error leaves the set of
/// streams as it was (a tracker that cannot list streams must not stop the ones running).
#[async_trait]
pub trait StreamTracker: Send + Sync + fmt::Debug + 'static {
    /// The streams to consume.
    async fn streams(&self) -> Result<Vec<StreamConfig>>;
}

/// The client of each stream a multi-stream worker consumes: any
/// `Fn(&str) -> Arc<dyn StreamClient>` closure, given the name or ARN the tracker listed, or
/// [`KinesisStreamClients`](crate::KinesisStreamClients).
pub trait StreamClients: Send + Sync + 'static {
    /// The client of `stream` (a name or an ARN).
    fn client(&self, stream: &str) -> Arc<dyn StreamClient>;
}

impl<F> StreamClients for F
where
    F: Fn(&str) -> Arc<dyn StreamClient> + Send + Sync + 'static,
{
    fn client(&self, stream: &str) -> Arc<dyn StreamClient> {
        self(stream)
    }
}

/// A fixed list of streams.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FixedStreams(pub Vec<StreamConfig>);

#[async_trait]
impl StreamTracker for FixedStreams {
    async fn streams(&self) -> Result<Vec<StreamConfig>> {
        Ok(self.0.clone())
    }
}

/// A user's async function as a tracker: `TrackerFn::new(|| async { Ok(vec![...]) })`.
pub struct TrackerFn<F>(F);

impl<F> TrackerFn<F> {
    /// The tracker that calls `f`.
    pub fn new(f: F) -> Self {
        TrackerFn(f)
    }
}

impl<F> fmt::Debug for TrackerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrackerFn")
    }
}

#[async_trait]
impl<F, Fut> StreamTracker for TrackerFn<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<StreamConfig>>> + Send,
{
    async fn streams(&self) -> Result<Vec<StreamConfig>> {
        (self.0)().await
    }
}

/// What the lease table holds of one stream, for [`FormerStreams::due`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LeasedStream {
    /// A live worker holds one of its leases (it is being processed).
    pub held: bool,
}

/// The streams whose leases are left in the table although no tracker lists them any more,
/// since when, and which are due for deletion. A pure function of what it is shown and the
/// time: the worker reads the tracker and the table, and deletes what [`FormerStreams::due`]
/// answers.
#[derive(Debug, Default, Clone)]
pub struct FormerStreams {
    missing_since: BTreeMap<StreamIdentity, Instant>,
}

impl FormerStreams {
    /// No stream missing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The streams whose leases are to be deleted now: in the table (`leased`), not in
    /// `tracked` for at least `grace` as seen by this worker, and not held by any live
    /// worker. A stream that is tracked again (or whose leases are gone) is forgotten; a
    /// stream answered `ResourceNotFound` is simply not in `tracked`.
    pub fn due(
        &mut self,
        tracked: &BTreeSet<StreamIdentity>,
        leased: &BTreeMap<StreamIdentity, LeasedStream>,
        now: Instant,
        grace: Duration,
    ) -> Vec<StreamIdentity> {
        self.missing_since
            .retain(|stream, _| leased.contains_key(stream) && !tracked.contains(stream));
        let mut due = Vec::new();
        for (stream, state) in leased {
            if tracked.contains(stream) {
                continue;
            }
            let since = *self.missing_since.entry(stream.clone()).or_insert(now);
            if !state.held && now.saturating_duration_since(since) >= grace {
                due.push(stream.clone());
            }
        }
        due
    }

    /// The streams missing from the list whose leases were in the table at the last
    /// [`FormerStreams::due`] (those it answered included).
    pub fn pending(&self) -> usize {
        self.missing_since.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GRACE: Duration = Duration::from_secs(300);

    fn stream(name: &str, epoch: u64) -> StreamIdentity {
        StreamIdentity::new("123456789012", name, epoch).unwrap()
    }

    fn leased(streams: &[(&StreamIdentity, bool)]) -> BTreeMap<StreamIdentity, LeasedStream> {
        streams
            .iter()
            .map(|(s, held)| ((*s).clone(), LeasedStream { held: *held }))
            .collect()
    }

    #[tokio::test]
    async fn trackers_answer_a_list_or_a_function() {
        let fixed = FixedStreams(vec![StreamConfig::new("a")]);
        assert_eq!(fixed.streams().await.unwrap(), vec![StreamConfig::new("a")]);
        let f = TrackerFn::new(|| async {
            Ok(vec![
                StreamConfig::new("orders-1").with_initial_position(InitialPosition::TrimHorizon),
            ])
        });
        let streams = f.streams().await.unwrap();
        assert_eq!(streams[0].initial_position, InitialPosition::TrimHorizon);
        let boxed: Box<dyn StreamTracker> = Box::new(f);
        assert_eq!(boxed.streams().await.unwrap().len(), 1);
    }

    #[test]
    fn a_stream_missing_for_the_grace_period_is_due_unless_held() {
        let t0 = Instant::now();
        let (a, b) = (stream("a", 1), stream("b", 1));
        let mut former = FormerStreams::new();
        let tracked = BTreeSet::from([a.clone()]);
        // b disappears at t0: not due before the grace period.
        let table = leased(&[(&a, true), (&b, false)]);
        assert!(former.due(&tracked, &table, t0, GRACE).is_empty());
        assert!(
            former
                .due(&tracked, &table, t0 + GRACE / 2, GRACE)
                .is_empty()
        );
        assert_eq!(
            former.due(&tracked, &table, t0 + GRACE, GRACE),
            vec![b.clone()]
        );
        // Still held by a worker: wait until it lets go.
        let busy = leased(&[(&a, true), (&b, true)]);
        assert!(
            former
                .due(&tracked, &busy, t0 + GRACE * 2, GRACE)
                .is_empty()
        );
        assert_eq!(former.due(&tracked, &table, t0 + GRACE * 2, GRACE), vec![b]);
    }

    #[test]
    fn a_stream_listed_again_starts_its_grace_period_anew() {
        let t0 = Instant::now();
        let b = stream("b", 1);
        let mut former = FormerStreams::new();
        let table = leased(&[(&b, false)]);
        assert!(former.due(&BTreeSet::new(), &table, t0, GRACE).is_empty());
        // Another worker's stale list, or a tracker that flickered: b is back.
        assert!(
            former
                .due(&BTreeSet::from([b.clone()]), &table, t0 + GRACE / 2, GRACE)
                .is_empty()
        );
        let later = t0 + GRACE;
        assert!(
            former
                .due(&BTreeSet::new(), &table, later, GRACE)
                .is_empty()
        );
        assert_eq!(
            former.due(&BTreeSet::new(), &table, later + GRACE, GRACE),
            vec![b]
        );
    }

    #[test]
    fn a_stream_created_again_under_its_name_leaves_the_old_one_former() {
        let t0 = Instant::now();
        let (old, new) = (
            stream("orders", 1_700_000_000),
            stream("orders", 1_700_086_400),
        );
        let mut former = FormerStreams::new();
        let tracked = BTreeSet::from([new.clone()]);
        let table = leased(&[(&old, false), (&new, true)]);
        assert!(former.due(&tracked, &table, t0, GRACE).is_empty());
        assert_eq!(former.due(&tracked, &table, t0 + GRACE, GRACE), vec![old]);
    }

    proptest! {
        /// Whatever the sequence of lists and table reads: a tracked or held stream is never
        /// due, and a due stream was missing from every list for the whole grace period.
        #[test]
        fn only_streams_missing_for_the_grace_period_and_free_are_due(
            steps in proptest::collection::vec(
                (proptest::collection::btree_set(0usize..4, 0..4),
                 proptest::collection::btree_map(0usize..4, any::<bool>(), 0..4),
                 0u64..200),
                1..30),
        ) {
            let streams: Vec<StreamIdentity> = (0..4).map(|i| stream(&format!("s{i}"), 1)).collect();
            let grace = Duration::from_secs(100);
            let mut former = FormerStreams::new();
            let mut now = Instant::now();
            // Since when each stream has been missing from every list, as far as shown.
            let mut missing: BTreeMap<usize, Instant> = BTreeMap::new();
            for (tracked, table, step) in steps {
                now += Duration::from_secs(step);
                let tracked_ids: BTreeSet<StreamIdentity> = tracked.iter().map(|i| streams[*i].clone()).collect();
                let leased_ids: BTreeMap<StreamIdentity, LeasedStream> = table
                    .iter()
                    .map(|(i, held)| (streams[*i].clone(), LeasedStream { held: *held }))
                    .collect();
                missing.retain(|i, _| table.contains_key(i) && !tracked.contains(i));
                for i in table.keys() {
                    if !tracked.contains(i) {
                        missing.entry(*i).or_insert(now);
                    }
                }
                for due in former.due(&tracked_ids, &leased_ids, now, grace) {
                    let i = streams.iter().position(|s| *s == due).unwrap();
                    prop_assert!(!tracked.contains(&i), "a tracked stream is due");
                    prop_assert!(!table[&i], "a held stream is due");
                    prop_assert!(now.duration_since(missing[&i]) >= grace, "due before the grace period");
                }
            }
        }
    }
}
