//! Snapshots, planning queries and the life of an export job.

use std::sync::Arc;

use hearth_store::Backend;
use hearth_store::jobs::{
    CancelOutcome, FileRecord, JobRecord, JobStatus, NewJob, UnitCommit, UnitKind, UnitPlan,
    UnitScope,
};

use crate::support::*;

async fn job(store: &Arc<dyn Backend>, id: &str) -> JobRecord {
    store
        .job(id)
        .await
        .expect("job")
        .unwrap_or_else(|| panic!("job {id} is missing"))
}

async fn insert(store: &Arc<dyn Backend>, job: NewJob) {
    store.insert_job(job).await.expect("insert_job");
}

fn file_ids(files: &[FileRecord]) -> Vec<&str> {
    files.iter().map(|f| f.id.as_str()).collect()
}

pub async fn snapshot_covers_every_committed_write_and_precedes_later_ones(
    store: Arc<dyn Backend>,
) {
    let empty = store.snapshot().await.unwrap();
    assert_eq!(empty.seq, 0, "nothing committed yet");

    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            delete("Patient", "p1"),
        ],
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    assert_eq!(snapshot.seq, w[2].seq, "the last committed seq");
    assert!(snapshot.transaction_time >= empty.transaction_time);
    for written in &w {
        assert!(
            snapshot.transaction_time >= written.last_updated,
            "transactionTime {} is before a lastUpdated it covers ({})",
            snapshot.transaction_time,
            written.last_updated
        );
    }
    // A `_since` taken from transactionTime must select exactly what came after the snapshot.
    assert_eq!(
        store.seq_at(snapshot.transaction_time).await.unwrap(),
        snapshot.seq
    );

    let later = write_one(&store, put(&patient("p3", "C"))).await;
    assert!(later.last_updated > snapshot.transaction_time);
    assert!(later.seq > snapshot.seq);
    let next = store.snapshot().await.unwrap();
    assert_eq!(next.seq, later.seq);
    assert!(next.transaction_time >= later.last_updated);
}

pub async fn type_range_counts_every_version_of_the_type_in_the_window(store: Arc<dyn Backend>) {
    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&observation("o1", "Patient/p1", 70)),
            put(&patient("p1", "A2")),
            put(&patient("p2", "B")),
            delete("Patient", "p2"),
        ],
    )
    .await;
    let s: Vec<_> = w.iter().map(|w| w.seq).collect();
    let upto = s[4];
    // Superseded versions and tombstones count: the range is an upper bound for planning.
    assert_eq!(
        store.type_range("Patient", 0, upto).await.unwrap(),
        (4, s[0], s[4])
    );
    assert_eq!(
        store.type_range("Patient", s[0], s[3]).await.unwrap(),
        (2, s[2], s[3])
    );
    assert_eq!(
        store.type_range("Observation", 0, upto).await.unwrap(),
        (1, s[1], s[1])
    );
    assert_eq!(store.type_range("Encounter", 0, upto).await.unwrap().0, 0);
    assert_eq!(
        store
            .type_range("Patient", upto, upto + 10)
            .await
            .unwrap()
            .0,
        0
    );
}

pub async fn current_ids_and_keys_list_the_resources_current_at_the_seq(store: Arc<dyn Backend>) {
    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            put(&observation("o1", "Patient/p1", 70)),
            put(&patient("p3", "C")),
            put(&patient("p1", "A2")),
            delete("Patient", "p2"),
        ],
    )
    .await;
    let s: Vec<_> = w.iter().map(|w| w.seq).collect();
    let ids = |upto| {
        let store = Arc::clone(&store);
        async move { store.current_ids("Patient", upto).await.unwrap() }
    };
    assert_eq!(ids(s[5]).await, ["p3", "p1"], "change-sequence order");
    assert_eq!(ids(s[4]).await, ["p2", "p3", "p1"]);
    assert_eq!(ids(s[1]).await, ["p1", "p2"]);
    assert!(ids(0).await.is_empty());
    assert_eq!(
        store.current_ids("Observation", s[5]).await.unwrap(),
        ["o1"]
    );
    // The same resources as sorted keys.
    for upto in [s[5], s[4], s[1], 0] {
        let mut expected: Vec<i64> = ids(upto)
            .await
            .iter()
            .map(|id| hearth_store::resource_key("Patient", id))
            .collect();
        expected.sort_unstable();
        assert_eq!(store.current_keys("Patient", upto).await.unwrap(), expected);
    }
}

pub async fn types_present_lists_types_with_a_version_in_the_window(store: Arc<dyn Backend>) {
    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&observation("o1", "Patient/p1", 70)),
            put(&encounter("e1", "Patient/p1")),
            put(&patient("p1", "A2")),
            delete("Observation", "o1"),
        ],
    )
    .await;
    let s: Vec<_> = w.iter().map(|w| w.seq).collect();
    let present = |after, upto| {
        let store = Arc::clone(&store);
        async move {
            let mut types = store.types_present(after, upto).await.unwrap();
            types.sort();
            types
        }
    };
    assert_eq!(
        present(0, s[4]).await,
        ["Encounter", "Observation", "Patient"]
    );
    assert_eq!(present(s[2], s[3]).await, ["Patient"]);
    assert_eq!(present(s[0], s[1]).await, ["Observation"]);
    // A deletion is a version of its type.
    assert_eq!(present(s[3], s[4]).await, ["Observation"]);
    assert!(present(s[4], s[4] + 10).await.is_empty());
}

pub async fn compartment_rows_count_versions_in_the_patients_compartments(store: Arc<dyn Backend>) {
    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&observation("o1", "Patient/p1", 70)),
            put(&observation("o2", "Patient/p2", 70)),
            put(&shared_observation("o3", "Patient/p1", "Patient/p2")),
            put(&encounter("e1", "Patient/p1")),
            put(&observation("g1", "Group/g1", 70)),
            put(&observation("o1", "Patient/p1", 71)),
            // A tombstone stays in the compartments of the version it ends.
            delete("Observation", "o1"),
        ],
    )
    .await;
    let s: Vec<_> = w.iter().map(|w| w.seq).collect();
    let rows = |patients: &[&str], after, upto| {
        let store = Arc::clone(&store);
        let patients: Vec<String> = patients.iter().map(|p| p.to_string()).collect();
        async move {
            store
                .compartment_rows(&patients, after, upto)
                .await
                .unwrap()
        }
    };
    let upto = s[7];
    // p1, o1, o3, e1, o1 v2 and o1's tombstone.
    assert_eq!(rows(&["p1"], 0, upto).await, 6);
    assert_eq!(rows(&["p2"], 0, upto).await, 2);
    assert_eq!(rows(&["p1", "p2"], 0, upto).await, 8);
    assert_eq!(rows(&["p1"], s[3], upto).await, 3);
    assert_eq!(rows(&["p9"], 0, upto).await, 0);
}

pub async fn inserted_job_reads_back_with_every_field(store: Arc<dyn Backend>) {
    write_one(&store, put(&patient("p1", "A"))).await;
    let snapshot = store.snapshot().await.unwrap();
    let mut new = new_job(
        "job-1",
        "client-a",
        123_456,
        vec![
            plan("Patient", UnitKind::Output, 0, snapshot.seq),
            plan("Patient", UnitKind::Deleted, 0, snapshot.seq),
            plan("Provenance", UnitKind::Provenance, 0, snapshot.seq),
        ],
    );
    new.snapshot = snapshot;
    new.estimated_resources = 42;
    new.request = r#"{"level":"system","types":["Patient"]}"#.to_owned();
    new.request_url = "http://hearth.test/fhir/$export?_type=Patient".to_owned();
    let report = file("f-report", "job-1", 0, 1, "OperationOutcome", "error");
    new.files = vec![report.clone()];
    insert(&store, new).await;

    let record = job(&store, "job-1").await;
    assert_eq!(record.id, "job-1");
    assert_eq!(record.client, "client-a");
    assert_eq!(record.status, JobStatus::Queued);
    assert_eq!(record.request, r#"{"level":"system","types":["Patient"]}"#);
    assert_eq!(
        record.request_url,
        "http://hearth.test/fhir/$export?_type=Patient"
    );
    assert_eq!(record.snapshot, snapshot);
    assert_eq!(record.created_at, 123_456);
    assert_eq!(
        (record.started_at, record.completed_at, record.expires_at),
        (None, None, None)
    );
    assert_eq!((record.polls, record.manifest_shown), (0, false));
    assert_eq!((record.estimated_resources, record.done_resources), (42, 0));
    assert_eq!((record.units_total, record.units_done), (3, 0));
    assert_eq!((record.manifest, record.error), (None, None));
    assert_eq!(store.job_files("job-1").await.unwrap(), [report]);
    assert!(store.job("job-2").await.unwrap().is_none());
}

pub async fn record_poll_returns_the_count_before_and_remembers_manifest_shown(
    store: Arc<dyn Backend>,
) {
    insert(&store, new_job("j", "c", 1, vec![])).await;
    assert_eq!(store.record_poll("j", false).await.unwrap(), 0);
    assert_eq!(store.record_poll("j", false).await.unwrap(), 1);
    assert!(!job(&store, "j").await.manifest_shown);
    assert_eq!(store.record_poll("j", true).await.unwrap(), 2);
    let record = job(&store, "j").await;
    assert_eq!((record.polls, record.manifest_shown), (3, true));
    // Once shown, always shown: the cancel contract depends on it.
    assert_eq!(store.record_poll("j", false).await.unwrap(), 3);
    let record = job(&store, "j").await;
    assert_eq!((record.polls, record.manifest_shown), (4, true));
}

pub async fn active_jobs_counts_only_unfinished_jobs_of_the_client(store: Arc<dyn Backend>) {
    insert(
        &store,
        new_job(
            "running",
            "a",
            1,
            vec![plan("Patient", UnitKind::Output, 0, 1)],
        ),
    )
    .await;
    for (id, client) in [
        ("queued", "a"),
        ("completed", "a"),
        ("failed", "a"),
        ("cancelled", "a"),
        ("other", "b"),
    ] {
        insert(&store, new_job(id, client, 2, vec![])).await;
    }
    assert_eq!(store.active_jobs("a").await.unwrap(), 5);
    claim(&store, "w", LEASE, NOW).await;
    assert_eq!(job(&store, "running").await.status, JobStatus::Running);
    store
        .complete_job("completed", "{}".into(), 10, 20)
        .await
        .unwrap();
    store.fail_job("failed", "boom").await.unwrap();
    assert_eq!(
        store.cancel_job("cancelled").await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(store.active_jobs("a").await.unwrap(), 2);
    assert_eq!(store.active_jobs("b").await.unwrap(), 1);
    assert_eq!(store.active_jobs("nobody").await.unwrap(), 0);
}

pub async fn complete_job_stores_the_manifest_and_cannot_revive_a_cancelled_job(
    store: Arc<dyn Backend>,
) {
    insert(&store, new_job("done", "c", 1, vec![])).await;
    insert(&store, new_job("gone", "c", 1, vec![])).await;
    let manifest = r#"{"transactionTime":"2026-01-01T00:00:00Z","output":[]}"#;
    store
        .complete_job("done", manifest.into(), 500, 900)
        .await
        .unwrap();
    let record = job(&store, "done").await;
    assert_eq!(record.status, JobStatus::Completed);
    assert_eq!(record.manifest.as_deref(), Some(manifest));
    assert_eq!(
        (record.completed_at, record.expires_at),
        (Some(500), Some(900))
    );
    assert_eq!(store.active_jobs("c").await.unwrap(), 1);

    // A worker finishing after a cancel must not bring the job back.
    assert_eq!(
        store.cancel_job("gone").await.unwrap(),
        CancelOutcome::Cancelled
    );
    store
        .complete_job("gone", manifest.into(), 500, 900)
        .await
        .unwrap();
    let record = job(&store, "gone").await;
    assert_eq!(record.status, JobStatus::Cancelled);
    assert_eq!(record.manifest, None);
}

pub async fn fail_job_records_the_error_and_finishes_the_job(store: Arc<dyn Backend>) {
    insert(&store, new_job("bad", "c", 1, vec![])).await;
    insert(&store, new_job("good", "c", 1, vec![])).await;
    store.fail_job("bad", "disk full").await.unwrap();
    let record = job(&store, "bad").await;
    assert_eq!(record.status, JobStatus::Failed);
    assert_eq!(record.error.as_deref(), Some("disk full"));
    assert!(
        !store
            .ready_jobs()
            .await
            .unwrap()
            .contains(&"bad".to_owned())
    );
    // A finished job keeps its outcome.
    store.complete_job("bad", "{}".into(), 5, 6).await.unwrap();
    let record = job(&store, "bad").await;
    assert_eq!((record.status, record.manifest), (JobStatus::Failed, None));
    store.complete_job("good", "{}".into(), 5, 6).await.unwrap();
    store.fail_job("good", "late").await.unwrap();
    let record = job(&store, "good").await;
    assert_eq!((record.status, record.error), (JobStatus::Completed, None));
}

pub async fn job_files_come_in_manifest_order(store: Arc<dyn Backend>) {
    let mut new = new_job("j", "c", 1, vec![]);
    new.files = vec![file("f-error", "j", 0, 1, "OperationOutcome", "error")];
    insert(&store, new).await;
    store
        .add_job_files(vec![
            file("f-pat-u1p1", "j", 1, 1, "Patient", "output"),
            file("f-obs-u0p2", "j", 0, 2, "Observation", "output"),
            file("f-obs-u2p1", "j", 2, 1, "Observation", "output"),
            file("f-del-u3p1", "j", 3, 1, "Patient", "deleted"),
            file("f-obs-u0p1", "j", 0, 1, "Observation", "output"),
        ])
        .await
        .unwrap();
    let files = store.job_files("j").await.unwrap();
    // Kind, then type, then unit, then part.
    assert_eq!(
        file_ids(&files),
        [
            "f-del-u3p1",
            "f-error",
            "f-obs-u0p1",
            "f-obs-u0p2",
            "f-obs-u2p1",
            "f-pat-u1p1"
        ]
    );
    assert_eq!(
        files[2],
        file("f-obs-u0p1", "j", 0, 1, "Observation", "output")
    );
}

pub async fn add_job_files_and_file_lookup_return_the_file_with_its_job(store: Arc<dyn Backend>) {
    insert(&store, new_job("j", "c", 1, vec![])).await;
    insert(&store, new_job("k", "c", 1, vec![])).await;
    let f1 = FileRecord {
        continues: true,
        ..file("f1", "j", 0, 1, "Patient", "output")
    };
    let f2 = file("f2", "j", 0, 2, "Patient", "output");
    store
        .add_job_files(vec![f1.clone(), f2.clone()])
        .await
        .unwrap();
    assert_eq!(store.job_files("j").await.unwrap(), [f1.clone(), f2]);
    assert!(store.job_files("k").await.unwrap().is_empty());
    let (found, owner) = store.file("f1").await.unwrap().expect("file f1");
    assert_eq!(found, f1);
    assert_eq!((owner.id.as_str(), owner.client.as_str()), ("j", "c"));
    assert!(store.file("nope").await.unwrap().is_none());
}

pub async fn cancel_of_a_running_job_cancels_it_and_drops_its_files(store: Arc<dyn Backend>) {
    insert(
        &store,
        new_job(
            "j",
            "c",
            1,
            vec![
                plan("Patient", UnitKind::Output, 0, 5),
                plan("Observation", UnitKind::Output, 0, 5),
            ],
        ),
    )
    .await;
    let unit = claim(&store, "w", LEASE, NOW).await;
    let f = file("f0", "j", unit.unit_no, 1, "Patient", "output");
    assert_eq!(
        store.commit_unit(&unit, vec![f], 3).await.unwrap(),
        UnitCommit::Committed
    );
    assert_eq!(job(&store, "j").await.status, JobStatus::Running);

    assert_eq!(
        store.cancel_job("j").await.unwrap(),
        CancelOutcome::Cancelled
    );
    let record = job(&store, "j").await;
    assert_eq!(
        (record.status, record.manifest),
        (JobStatus::Cancelled, None)
    );
    assert!(store.job_files("j").await.unwrap().is_empty());
    assert!(store.file("f0").await.unwrap().is_none());
    assert_eq!(store.active_jobs("c").await.unwrap(), 0);
}

pub async fn cancel_of_an_unknown_or_cancelled_job_is_not_found(store: Arc<dyn Backend>) {
    assert_eq!(
        store.cancel_job("nope").await.unwrap(),
        CancelOutcome::NotFound
    );
    insert(
        &store,
        new_job("j", "c", 1, vec![plan("Patient", UnitKind::Output, 0, 5)]),
    )
    .await;
    assert_eq!(
        store.cancel_job("j").await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        store.cancel_job("j").await.unwrap(),
        CancelOutcome::NotFound
    );
    // The cancelled job stays until it expires.
    assert_eq!(job(&store, "j").await.status, JobStatus::Cancelled);
}

pub async fn cancel_after_the_manifest_was_shown_removes_the_job(store: Arc<dyn Backend>) {
    insert(&store, new_job("j", "c", 1, vec![])).await;
    store
        .add_job_files(vec![file("f1", "j", 0, 1, "Patient", "output")])
        .await
        .unwrap();
    store.complete_job("j", "{}".into(), 10, 20).await.unwrap();
    store.record_poll("j", true).await.unwrap();
    assert_eq!(
        store.cancel_job("j").await.unwrap(),
        CancelOutcome::AlreadyFinished
    );
    assert!(store.job("j").await.unwrap().is_none());
    assert!(store.job_files("j").await.unwrap().is_empty());
    assert!(store.file("f1").await.unwrap().is_none());
    assert_eq!(
        store.cancel_job("j").await.unwrap(),
        CancelOutcome::NotFound
    );
}

pub async fn cancel_of_a_completed_job_never_shown_cancels_it(store: Arc<dyn Backend>) {
    insert(&store, new_job("j", "c", 1, vec![])).await;
    store
        .add_job_files(vec![file("f1", "j", 0, 1, "Patient", "output")])
        .await
        .unwrap();
    store.complete_job("j", "{}".into(), 10, 20).await.unwrap();
    store.record_poll("j", false).await.unwrap();
    assert_eq!(
        store.cancel_job("j").await.unwrap(),
        CancelOutcome::Cancelled
    );
    let record = job(&store, "j").await;
    assert_eq!(
        (record.status, record.manifest),
        (JobStatus::Cancelled, None)
    );
    assert!(store.job_files("j").await.unwrap().is_empty());
}

pub async fn expired_jobs_lists_completed_past_expiry_and_old_failed_or_cancelled(
    store: Arc<dyn Backend>,
) {
    for id in [
        "completed-early",
        "completed-late",
        "failed",
        "cancelled",
        "queued",
    ] {
        insert(&store, new_job(id, "c", 1_000, vec![])).await;
    }
    store
        .complete_job("completed-early", "{}".into(), 5_000, 10_000)
        .await
        .unwrap();
    store
        .complete_job("completed-late", "{}".into(), 5_000, 50_000)
        .await
        .unwrap();
    store.fail_job("failed", "boom").await.unwrap();
    store.cancel_job("cancelled").await.unwrap();
    let expired = |now, ttl| {
        let store = Arc::clone(&store);
        async move {
            let mut ids = store.expired_jobs(now, ttl).await.unwrap();
            ids.sort();
            ids
        }
    };
    assert!(expired(5_000, 100_000).await.is_empty());
    assert_eq!(expired(20_000, 100_000).await, ["completed-early"]);
    // A completed job lives until its expiry, however old it is; the others live for the ttl.
    assert_eq!(
        expired(20_000, 10_000).await,
        ["cancelled", "completed-early", "failed"]
    );
    assert_eq!(
        expired(60_000, 10_000).await,
        ["cancelled", "completed-early", "completed-late", "failed"]
    );
}

pub async fn ready_jobs_lists_unfinished_jobs_without_open_units(store: Arc<dyn Backend>) {
    insert(&store, new_job("empty", "c", 1, vec![])).await;
    insert(
        &store,
        new_job(
            "work",
            "c",
            2,
            vec![plan("Patient", UnitKind::Output, 0, 5)],
        ),
    )
    .await;
    assert_eq!(store.ready_jobs().await.unwrap(), ["empty"]);
    let unit = claim(&store, "w", LEASE, NOW).await;
    assert_eq!(
        store.ready_jobs().await.unwrap(),
        ["empty"],
        "a running unit is still open"
    );
    store.commit_unit(&unit, vec![], 0).await.unwrap();
    let mut ready = store.ready_jobs().await.unwrap();
    ready.sort();
    assert_eq!(ready, ["empty", "work"]);
    store
        .complete_job("empty", "{}".into(), 10, 20)
        .await
        .unwrap();
    assert_eq!(store.ready_jobs().await.unwrap(), ["work"]);
}

pub async fn delete_job_removes_the_job_its_units_and_its_files(store: Arc<dyn Backend>) {
    let mut new = new_job(
        "j",
        "c",
        1,
        vec![
            plan("Patient", UnitKind::Output, 0, 5),
            UnitPlan {
                scope: UnitScope::Patients(vec!["p1".into()]),
                ..plan("Observation", UnitKind::Output, 0, 5)
            },
        ],
    );
    new.files = vec![file("f1", "j", 0, 1, "OperationOutcome", "error")];
    insert(&store, new).await;
    insert(&store, new_job("k", "c", 2, vec![])).await;
    store.delete_job("j").await.unwrap();
    assert!(store.job("j").await.unwrap().is_none());
    assert!(store.job_files("j").await.unwrap().is_empty());
    assert!(store.file("f1").await.unwrap().is_none());
    assert!(
        store.claim_unit("w", LEASE, NOW).await.unwrap().is_none(),
        "its units are gone"
    );
    assert_eq!(store.ready_jobs().await.unwrap(), ["k"]);
    assert!(store.job("k").await.unwrap().is_some(), "other jobs stay");
}
