//! Writes, reads, versions, history, the change sequence and batches.

use std::sync::Arc;

use hearth_fhir::instant::{format_instant, now_micros};
use hearth_store::{Backend, BatchMode, Seq, StoreError, WriteError, WriteKind, Written};

use crate::support::*;

const HOUR: i64 = 3_600_000_000;

fn conflict(expected: u64, current: Option<u64>) -> WriteError {
    WriteError::VersionConflict { expected, current }
}

pub async fn writes_report_created_updated_unchanged_and_deleted_with_versions(
    store: Arc<dyn Backend>,
) {
    let created = write_one(&store, put(&patient("p1", "Smith"))).await;
    assert_eq!(
        (
            created.resource_type,
            created.id.as_str(),
            created.kind,
            created.version
        ),
        ("Patient", "p1", WriteKind::Created, 1)
    );
    let updated = write_one(&store, put(&patient("p1", "Jones"))).await;
    assert_eq!((updated.kind, updated.version), (WriteKind::Updated, 2));
    let unchanged = write_one(&store, put(&patient("p1", "Jones"))).await;
    assert_eq!(
        (unchanged.kind, unchanged.version),
        (WriteKind::Unchanged, 2)
    );
    let deleted = write_one(&store, delete("Patient", "p1")).await;
    assert_eq!(
        (
            deleted.resource_type,
            deleted.id.as_str(),
            deleted.kind,
            deleted.version
        ),
        ("Patient", "p1", WriteKind::Deleted, 3)
    );
    let again = write_one(&store, delete("Patient", "p1")).await;
    assert_eq!(again.kind, WriteKind::NotPresent);
    // Writing a deleted resource again is a create, and its versions go on from the tombstone.
    let recreated = write_one(&store, put(&patient("p1", "Brown"))).await;
    assert_eq!((recreated.kind, recreated.version), (WriteKind::Created, 4));
}

pub async fn unchanged_update_keeps_version_seq_and_last_updated(store: Arc<dyn Backend>) {
    let created = write_one(&store, put(&patient("p1", "Smith"))).await;
    let unchanged = write_one(&store, put(&patient("p1", "Smith"))).await;
    assert_eq!(unchanged.kind, WriteKind::Unchanged);
    assert_eq!(
        (unchanged.version, unchanged.seq, unchanged.last_updated),
        (created.version, created.seq, created.last_updated)
    );
    let history = store.history("Patient", "p1", None, 10).await.unwrap();
    assert_eq!(
        history.len(),
        1,
        "an unchanged update must not add a version"
    );
    let next = write_one(&store, put(&patient("p2", "Smith"))).await;
    assert!(next.seq > created.seq);
}

pub async fn stored_body_carries_the_version_and_last_updated_of_its_write(
    store: Arc<dyn Backend>,
) {
    for (family, version) in [("Smith", 1), ("Jones", 2)] {
        let written = write_one(&store, put(&patient("p1", family))).await;
        let stored = store.read("Patient", "p1").await.unwrap().expect("stored");
        assert_eq!(
            (
                stored.resource_type.as_str(),
                stored.id.as_str(),
                stored.version,
                stored.seq,
                stored.last_updated,
                stored.deleted
            ),
            (
                "Patient",
                "p1",
                version,
                written.seq,
                written.last_updated,
                false
            )
        );
        assert_eq!(
            meta(&stored.body),
            (version.to_string(), format_instant(written.last_updated))
        );
        assert_eq!(field(&stored.body, "name")[0]["family"], family);
    }
}

pub async fn read_returns_a_tombstone_after_delete_and_none_for_unknown(store: Arc<dyn Backend>) {
    write_one(&store, put(&patient("p1", "Smith"))).await;
    let deleted = write_one(&store, delete("Patient", "p1")).await;
    let tombstone = store
        .read("Patient", "p1")
        .await
        .unwrap()
        .expect("tombstone");
    assert!(tombstone.deleted);
    assert!(tombstone.body.is_empty());
    assert_eq!(
        (tombstone.version, tombstone.seq, tombstone.last_updated),
        (2, deleted.seq, deleted.last_updated)
    );
    assert_eq!(store.read("Patient", "p9").await.unwrap(), None);
    // The same id under another type is another resource.
    assert_eq!(store.read("Observation", "p1").await.unwrap(), None);
}

pub async fn read_version_returns_each_stored_version(store: Arc<dyn Backend>) {
    let written = write_each(
        &store,
        vec![
            put(&patient("p1", "Smith")),
            put(&patient("p1", "Jones")),
            delete("Patient", "p1"),
        ],
    )
    .await;
    for (version, family) in [(1, "Smith"), (2, "Jones")] {
        let stored = store
            .read_version("Patient", "p1", version)
            .await
            .unwrap()
            .expect("stored version");
        assert_eq!(stored.version, version);
        assert_eq!(stored.seq, written[version as usize - 1].seq);
        assert!(!stored.deleted);
        assert_eq!(field(&stored.body, "name")[0]["family"], family);
    }
    let tombstone = store
        .read_version("Patient", "p1", 3)
        .await
        .unwrap()
        .unwrap();
    assert!(tombstone.deleted);
    assert_eq!(tombstone.seq, written[2].seq);
    assert_eq!(store.read_version("Patient", "p1", 4).await.unwrap(), None);
    assert_eq!(store.read_version("Patient", "p1", 0).await.unwrap(), None);
    assert_eq!(
        store.read_version("Observation", "p1", 1).await.unwrap(),
        None
    );
}

pub async fn history_is_newest_first_and_pages_by_before_version(store: Arc<dyn Backend>) {
    write_each(
        &store,
        vec![
            put(&patient("p1", "Smith")),
            put(&patient("p1", "Jones")),
            delete("Patient", "p1"),
            put(&patient("p1", "Brown")),
            put(&patient("p2", "Other")),
        ],
    )
    .await;
    let versions = |history: Vec<hearth_store::StoredVersion>| -> Vec<(u64, bool)> {
        history
            .into_iter()
            .map(|v| (v.version, v.deleted))
            .collect()
    };
    let all = store.history("Patient", "p1", None, 10).await.unwrap();
    assert!(all.iter().all(|v| v.id == "p1"));
    assert_eq!(
        versions(all),
        [(4, false), (3, true), (2, false), (1, false)]
    );
    let first_page = store.history("Patient", "p1", None, 2).await.unwrap();
    assert_eq!(versions(first_page), [(4, false), (3, true)]);
    let next_page = store.history("Patient", "p1", Some(3), 2).await.unwrap();
    assert_eq!(versions(next_page), [(2, false), (1, false)]);
    let short_page = store.history("Patient", "p1", Some(3), 1).await.unwrap();
    assert_eq!(versions(short_page), [(2, false)]);
    assert!(
        store
            .history("Patient", "p1", Some(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .history("Patient", "p9", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn if_match_conflict_reports_the_current_version_and_writes_nothing(
    store: Arc<dyn Backend>,
) {
    let one = |op| {
        let store = Arc::clone(&store);
        async move {
            let mut results = store.write(vec![op], BatchMode::Independent).await.unwrap();
            results.remove(0)
        }
    };
    one(put(&patient("p1", "Smith"))).await.unwrap();

    let stale_put = one(put_if_match(&patient("p1", "Jones"), Some(2))).await;
    assert_eq!(stale_put, Err(conflict(2, Some(1))));
    let stale_delete = one(delete_if_match("Patient", "p1", Some(5))).await;
    assert_eq!(stale_delete, Err(conflict(5, Some(1))));
    let current = store.read("Patient", "p1").await.unwrap().unwrap();
    assert_eq!((current.version, current.deleted), (1, false));
    assert_eq!(field(&current.body, "name")[0]["family"], "Smith");

    let updated = one(put_if_match(&patient("p1", "Jones"), Some(1)))
        .await
        .unwrap();
    assert_eq!((updated.kind, updated.version), (WriteKind::Updated, 2));
    let deleted = one(delete_if_match("Patient", "p1", Some(2)))
        .await
        .unwrap();
    assert_eq!((deleted.kind, deleted.version), (WriteKind::Deleted, 3));
    // A deleted or never-written resource has no current version to match.
    let on_tombstone = one(put_if_match(&patient("p1", "Brown"), Some(3))).await;
    assert_eq!(on_tombstone, Err(conflict(3, None)));
    let on_unknown = one(put_if_match(&patient("p9", "Brown"), Some(1))).await;
    assert_eq!(on_unknown, Err(conflict(1, None)));
    assert_eq!(store.read("Patient", "p9").await.unwrap(), None);
}

pub async fn delete_of_an_absent_resource_is_not_present(store: Arc<dyn Backend>) {
    let never = write_one(&store, delete("Patient", "p9")).await;
    assert_eq!(
        (
            never.resource_type,
            never.id.as_str(),
            never.kind,
            never.version
        ),
        ("Patient", "p9", WriteKind::NotPresent, 0)
    );
    assert_eq!(store.read("Patient", "p9").await.unwrap(), None);
    assert!(
        store
            .history("Patient", "p9", None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    write_one(&store, put(&patient("p1", "Smith"))).await;
    let deleted = write_one(&store, delete("Patient", "p1")).await;
    let twice = write_one(&store, delete("Patient", "p1")).await;
    assert_eq!(twice.kind, WriteKind::NotPresent);
    let current = store.read("Patient", "p1").await.unwrap().unwrap();
    assert_eq!(
        (current.version, current.seq),
        (2, deleted.seq),
        "no second tombstone"
    );
}

pub async fn seq_and_last_updated_increase_strictly_across_writes(store: Arc<dyn Backend>) {
    let mut calls: Vec<Vec<Written>> = Vec::new();
    calls.push(vec![write_one(&store, put(&patient("a", "A"))).await]);
    calls.push(vec![
        write_one(&store, put(&observation("o1", "Patient/a", 70))).await,
    ]);
    calls.push(vec![write_one(&store, put(&patient("a", "A2"))).await]);
    calls.push(vec![write_one(&store, delete("Patient", "a")).await]);
    for mode in [BatchMode::Independent, BatchMode::Atomic] {
        let prefix = if mode == BatchMode::Atomic { "t" } else { "i" };
        let batch = store
            .write(
                vec![
                    put(&patient(&format!("{prefix}z"), "Z")),
                    put(&patient(&format!("{prefix}b"), "B")),
                    put(&patient(&format!("{prefix}m"), "M")),
                ],
                mode,
            )
            .await
            .unwrap();
        calls.push(batch.into_iter().map(Result::unwrap).collect());
    }
    for pair in calls.windows(2) {
        let earlier = pair[0].iter().map(|w| w.seq).max().unwrap();
        let later = pair[1].iter().map(|w| w.seq).min().unwrap();
        assert!(
            later > earlier,
            "a later write got seq {later} after {earlier}"
        );
    }
    let mut all: Vec<Written> = calls.into_iter().flatten().collect();
    assert!(all.iter().all(|w| w.seq > 0));
    all.sort_by_key(|w| w.seq);
    for pair in all.windows(2) {
        assert!(
            pair[1].seq > pair[0].seq,
            "seq {} handed out twice",
            pair[0].seq
        );
        assert!(
            pair[1].last_updated > pair[0].last_updated,
            "lastUpdated does not grow with seq: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}

pub async fn seq_at_maps_instants_to_the_last_seq_at_or_before_them(store: Arc<dyn Backend>) {
    assert_eq!(store.seq_at(now_micros()).await.unwrap(), 0, "empty store");
    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            put(&patient("p1", "C")),
            delete("Patient", "p2"),
        ],
    )
    .await;
    let at = |instant| {
        let store = Arc::clone(&store);
        async move { store.seq_at(instant).await.unwrap() }
    };
    assert_eq!(at(w[0].last_updated - 1).await, 0, "before the first write");
    assert_eq!(at(w[0].last_updated - HOUR).await, 0);
    for (i, written) in w.iter().enumerate() {
        assert_eq!(at(written.last_updated).await, written.seq, "at write {i}");
        let before: Seq = if i == 0 { 0 } else { w[i - 1].seq };
        assert_eq!(
            at(written.last_updated - 1).await,
            before,
            "just before write {i}"
        );
    }
    assert_eq!(at(w[3].last_updated + HOUR).await, w[3].seq);
}

pub async fn atomic_batch_commits_every_entry_and_answers_in_entry_order(store: Arc<dyn Backend>) {
    let results = store
        .write(
            vec![
                put(&patient("z", "Z")),
                put(&patient("a", "A")),
                put(&patient("z", "Z2")),
                delete("Patient", "absent"),
            ],
            BatchMode::Atomic,
        )
        .await
        .unwrap();
    let written: Vec<Written> = results.into_iter().map(Result::unwrap).collect();
    let summary: Vec<(&str, WriteKind, u64)> = written
        .iter()
        .map(|w| (w.id.as_str(), w.kind, w.version))
        .collect();
    assert_eq!(
        summary,
        [
            ("z", WriteKind::Created, 1),
            ("a", WriteKind::Created, 1),
            ("z", WriteKind::Updated, 2),
            ("absent", WriteKind::NotPresent, 0),
        ]
    );
    // A transaction applies its entries in order: z's update comes after both creates.
    assert!(written[0].seq < written[1].seq && written[1].seq < written[2].seq);
    let z = store.read("Patient", "z").await.unwrap().unwrap();
    assert_eq!(field(&z.body, "name")[0]["family"], "Z2");
}

pub async fn atomic_batch_rolls_everything_back_when_an_entry_conflicts(store: Arc<dyn Backend>) {
    let x = write_one(&store, put(&patient("x", "X"))).await;
    let future = x.last_updated + HOUR;
    let error = store
        .write(
            vec![
                put(&patient("a", "A")),
                put(&patient("x", "X2")),
                put_if_match(&patient("x", "X3"), Some(7)),
                put(&patient("b", "B")),
            ],
            BatchMode::Atomic,
        )
        .await
        .expect_err("the transaction must fail");
    match error {
        StoreError::Entry { index, error } => {
            assert_eq!(index, 2, "the failing entry's position in the batch");
            // The earlier entry of the same transaction made x version 2.
            assert_eq!(error, conflict(7, Some(2)));
        }
        other => panic!("expected StoreError::Entry, got {other:?}"),
    }
    assert_eq!(store.read("Patient", "a").await.unwrap(), None);
    assert_eq!(store.read("Patient", "b").await.unwrap(), None);
    let current = store.read("Patient", "x").await.unwrap().unwrap();
    assert_eq!((current.version, current.seq), (1, x.seq));
    assert_eq!(
        store.seq_at(future).await.unwrap(),
        x.seq,
        "no version escaped"
    );
    let next = write_one(&store, put(&patient("c", "C"))).await;
    assert!(next.seq > x.seq);
}

pub async fn independent_batch_answers_each_entry_on_its_own_in_entry_order(
    store: Arc<dyn Backend>,
) {
    write_one(&store, put(&patient("x", "X"))).await;
    let results = store
        .write(
            vec![
                put(&patient("zz", "Z")),
                put_if_match(&patient("x", "X2"), Some(9)),
                delete("Patient", "absent"),
                put(&patient("aa", "A")),
                put(&patient("mm", "M1")),
                put(&patient("mm", "M2")),
            ],
            BatchMode::Independent,
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 6);
    let ok = |i: usize| {
        results[i]
            .as_ref()
            .map(|w| (w.id.as_str(), w.kind, w.version))
    };
    assert_eq!(ok(0), Ok(("zz", WriteKind::Created, 1)));
    assert_eq!(results[1], Err(conflict(9, Some(1))));
    assert_eq!(ok(2), Ok(("absent", WriteKind::NotPresent, 0)));
    assert_eq!(ok(3), Ok(("aa", WriteKind::Created, 1)));
    // Two versions of one resource in a batch keep their order.
    assert_eq!(ok(4), Ok(("mm", WriteKind::Created, 1)));
    assert_eq!(ok(5), Ok(("mm", WriteKind::Updated, 2)));
    assert!(store.read("Patient", "zz").await.unwrap().is_some());
    assert!(store.read("Patient", "aa").await.unwrap().is_some());
    assert_eq!(
        store.read("Patient", "x").await.unwrap().unwrap().version,
        1
    );
    let mm = store.read("Patient", "mm").await.unwrap().unwrap();
    assert_eq!(field(&mm.body, "name")[0]["family"], "M2");
}

/// Bulk loads hand batches over without waiting for each commit (the store may fold them into
/// one): every batch still gets its own results, in its own order, and everything is readable
/// once its handle says committed, including a resource written twice across batches.
pub async fn queued_batches_each_commit_with_their_own_results(store: Arc<dyn Backend>) {
    let mut pending = Vec::new();
    for batch in 0..5 {
        let ops = (0..40)
            .map(|n| put(&patient(&format!("q{batch}-{n}"), "Queued")))
            .chain(std::iter::once(put(&patient(
                "shared",
                &format!("V{batch}"),
            ))))
            .collect();
        pending.push(
            store
                .write_queued(ops)
                .await
                .expect("the store takes the batch"),
        );
    }
    let mut previous_batch_max: Seq = 0;
    for (batch, handle) in pending.into_iter().enumerate() {
        let results = handle.committed().await.expect("the batch commits");
        assert_eq!(results.len(), 41);
        let written: Vec<&Written> = results
            .iter()
            .map(|r| r.as_ref().expect("each write succeeds"))
            .collect();
        // Within a batch a store may write in its own order; batches follow one another.
        let min = written.iter().map(|w| w.seq).min().unwrap_or(0);
        assert!(
            min > previous_batch_max,
            "batch {batch} was written after the one before"
        );
        previous_batch_max = written.iter().map(|w| w.seq).max().unwrap_or(0);
        for (n, written) in written.iter().enumerate() {
            if n < 40 {
                assert_eq!(written.id, format!("q{batch}-{n}"));
                assert_eq!(written.kind, WriteKind::Created);
            } else {
                assert_eq!(written.id, "shared");
                assert_eq!(written.version, batch as u64 + 1);
            }
        }
    }
    for batch in 0..5 {
        let read = store
            .read("Patient", &format!("q{batch}-39"))
            .await
            .expect("read")
            .expect("the queued write is stored");
        assert!(!read.deleted);
    }
    let shared = store
        .read("Patient", "shared")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(shared.version, 5);
}
