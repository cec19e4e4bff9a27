use std::time::Duration;

use super::stream::ITERATOR_LIFETIME;
use super::*;
use crate::error::Error;
use crate::lease::{Lease, LeaseFence, LeaseStore, LeaseUpdate};
use crate::sequence::Checkpoint;
use crate::stream::{StartingPosition, StreamClient};

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
async fn creations_in_a_lineage_check_parents_and_children() {
    let store = InMemoryLeaseStore::new("t");
    store.initialize().await.unwrap();
    super::check_create_in_lineage(&store).await;
}

#[tokio::test]
async fn conditional_updates_check_owner_and_counter() {
    let store = InMemoryLeaseStore::new("t");
    assert!(
        store
            .create_lease_if_absent(&Lease::new("a", Checkpoint::TrimHorizon))
            .await
            .unwrap()
    );
    assert!(
        !store
            .create_lease_if_absent(&Lease::new("a", Checkpoint::Latest))
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

#[tokio::test(start_paused = true)]
async fn a_paged_scan_sees_what_lands_ahead_of_it_and_misses_what_lands_behind() {
    let store = std::sync::Arc::new(InMemoryLeaseStore::new("t"));
    for i in 0..6 {
        store.put(Lease::new(format!("old-{i}"), Checkpoint::TrimHorizon));
    }
    let paging = ScanPaging::new(1, Duration::from_millis(10), 7);
    store.set_scan_paging(Some(paging));
    // Without writes meanwhile, a paged scan is the whole table, in the order of the keys'
    // places.
    let quiet = store.list_leases().await.unwrap().leases;
    let places: Vec<_> = quiet.iter().map(|l| paging.place(&l.lease_key)).collect();
    assert_eq!(quiet.len(), 6);
    assert!(places.windows(2).all(|w| w[0] < w[1]), "{places:?}");
    assert_eq!(store.raced_scans(), 0);

    let scan = tokio::spawn({
        let store = store.clone();
        async move { store.list_leases().await.unwrap().leases }
    });
    // The first page is read: the scan is past the first place.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let first = places[0].clone();
    let new_keys: Vec<String> = (0..100).map(|i| format!("new-{i}")).collect();
    let behind = new_keys
        .iter()
        .find(|k| paging.place(k) < first)
        .expect("a key placed before the first one");
    let ahead = new_keys
        .iter()
        .find(|k| paging.place(k) > places[5])
        .expect("a key placed after the last one");
    for key in [behind, ahead] {
        let created = store
            .create_lease_if_absent(&Lease::new(key.clone(), Checkpoint::TrimHorizon))
            .await
            .unwrap();
        assert!(created);
    }
    let gone = quiet[5].lease_key.clone();
    let fence = store.get_lease(&gone).await.unwrap().unwrap().fence();
    store.delete_lease(&gone, &fence).await.unwrap();

    let seen: Vec<String> = scan
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.lease_key)
        .collect();
    assert!(seen.contains(ahead), "created ahead of the scan: seen");
    assert!(!seen.contains(behind), "created behind the scan: missed");
    assert!(
        !seen.contains(&gone),
        "deleted before the scan got there: missed"
    );
    assert_eq!(store.raced_scans(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hung_call_never_answers_and_the_others_go_through() {
    let store = std::sync::Arc::new(InMemoryLeaseStore::new("t"));
    let lease = store.take_as("s-0", "w1");
    let faulty = Faulty::new(store.clone());
    faulty.hang_next(LeaseCall::Update("renew"), Hang::Lost);
    faulty.hang_next(LeaseCall::Update("renew"), Hang::AnswerLost);
    let renew = |fence: LeaseFence| {
        let faulty = &faulty;
        async move {
            tokio::time::timeout(
                Duration::from_secs(5),
                faulty.update_lease("s-0", &fence, &LeaseUpdate::Renew),
            )
            .await
        }
    };
    let counter = |store: &InMemoryLeaseStore| store.leases()[0].counter;

    // Lost: never answered, never applied.
    assert!(renew(lease.fence()).await.is_err(), "timed out");
    assert_eq!(counter(&store), lease.counter);
    assert_eq!(faulty.hung_calls(), 1);
    // Another kind of call is not affected.
    let checkpoint = LeaseUpdate::Checkpoint {
        checkpoint: Checkpoint::TrimHorizon,
    };
    let lease = faulty
        .update_lease("s-0", &lease.fence(), &checkpoint)
        .await
        .unwrap();
    // AnswerLost: applied, never answered.
    assert!(renew(lease.fence()).await.is_err(), "timed out");
    assert_eq!(counter(&store), lease.counter + 1);
    assert_eq!(faulty.hung_calls(), 2);
    // Each hang is used once.
    let fence = store.leases()[0].fence();
    assert!(renew(fence).await.unwrap().is_ok());
    assert_eq!(faulty.hung_calls(), 2);
}

// Stale reads serve only states the table was in, each item lagging on its own by at most
// `max_age`, and the latest writes once `max_age` has passed without one.
#[tokio::test(start_paused = true)]
async fn eventually_consistent_scans_lag_per_item_within_max_age() {
    let store = InMemoryLeaseStore::new("t");
    store.put(Lease::new("a", Checkpoint::TrimHorizon));
    store.put(Lease::new("doomed", Checkpoint::TrimHorizon));
    let max_age = Duration::from_secs(1);
    store.set_stale_reads(Some(StaleReads::new(max_age, 7)));
    tokio::time::advance(max_age).await;
    let a0 = store.take_as("a", "w1").counter;
    let doomed = store.leases().into_iter().find(|l| l.lease_key == "doomed");
    store
        .delete_lease("doomed", &doomed.unwrap().fence())
        .await
        .unwrap();
    store.put(Lease::new("born", Checkpoint::TrimHorizon));

    let (mut old_a, mut new_a, mut saw_doomed, mut missed_born) = (0, 0, 0, 0);
    for _ in 0..50 {
        tokio::time::advance(Duration::from_millis(10)).await;
        let scan = store.list_leases_eventually_consistent().await.unwrap();
        let keys: Vec<&str> = scan.leases.iter().map(|l| l.lease_key.as_str()).collect();
        let a = scan.leases.iter().find(|l| l.lease_key == "a").unwrap();
        match a.counter {
            c if c == a0 => new_a += 1,
            0 => old_a += 1,
            other => panic!("a version a never had: {other}"),
        }
        saw_doomed += usize::from(keys.contains(&"doomed"));
        missed_born += usize::from(!keys.contains(&"born"));
    }
    assert!(old_a > 0 && new_a > 0, "old {old_a}, new {new_a}");
    assert!(saw_doomed > 0 && missed_born > 0);
    assert_eq!(
        store.list_leases().await.unwrap().leases.len(),
        2,
        "a strongly consistent scan reads the latest writes"
    );

    tokio::time::advance(max_age).await;
    let scan = store.list_leases_eventually_consistent().await.unwrap();
    let mut keys: Vec<&str> = scan.leases.iter().map(|l| l.lease_key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["a", "born"]);
    assert!(scan.leases.iter().any(|l| l.counter == a0));
}
