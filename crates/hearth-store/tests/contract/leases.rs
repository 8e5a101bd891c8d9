//! Claiming units with leases, renewing them, and fenced commits.

use std::sync::Arc;

use hearth_store::Backend;
use hearth_store::jobs::{
    CancelOutcome, JOB_LEVEL_UNIT, JobStatus, UnitCommit, UnitKind, UnitPlan, UnitScope,
};

use crate::support::*;

async fn insert(store: &Arc<dyn Backend>, job: hearth_store::jobs::NewJob) {
    store.insert_job(job).await.expect("insert_job");
}

async fn nothing_to_claim(store: &Arc<dyn Backend>, now: i64) -> bool {
    store
        .claim_unit("idle", now + LEASE, now)
        .await
        .expect("claim_unit")
        .is_none()
}

pub async fn claim_takes_the_oldest_job_first_then_unit_order(store: Arc<dyn Backend>) {
    insert(
        &store,
        new_job(
            "newer",
            "c",
            2_000,
            vec![
                plan("Patient", UnitKind::Output, 0, 5),
                plan("Observation", UnitKind::Output, 0, 5),
                plan("Patient", UnitKind::Deleted, 0, 5),
            ],
        ),
    )
    .await;
    insert(
        &store,
        new_job(
            "older",
            "c",
            1_000,
            vec![plan("Encounter", UnitKind::Output, 0, 5)],
        ),
    )
    .await;
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(unit_id(&claim(&store, "w", LEASE, NOW).await));
    }
    assert_eq!(
        order,
        [
            ("older".to_owned(), 0),
            ("newer".to_owned(), 0),
            ("newer".to_owned(), 1),
            ("newer".to_owned(), 2)
        ]
    );
    assert!(nothing_to_claim(&store, NOW).await);
}

pub async fn claimed_unit_carries_its_plan_and_starts_the_job(store: Arc<dyn Backend>) {
    let written = write_one(&store, put(&patient("p1", "A"))).await;
    let snapshot = store.snapshot().await.unwrap();
    let mut new = new_job(
        "j",
        "c",
        1,
        vec![UnitPlan {
            resource_type: "Observation,Encounter".into(),
            kind: UnitKind::Deleted,
            scope: UnitScope::Patients(vec!["p1".into(), "p2".into()]),
            seq_after: 0,
            seq_upto: written.seq,
        }],
    );
    new.snapshot = snapshot;
    new.request = r#"{"level":"group"}"#.into();
    insert(&store, new).await;

    let unit = claim(&store, "worker-1", LEASE, NOW).await;
    assert_eq!(unit_id(&unit), ("j".to_owned(), 0));
    assert_eq!(unit.resource_type, "Observation,Encounter");
    assert_eq!(unit.kind, UnitKind::Deleted);
    assert_eq!(
        unit.scope,
        UnitScope::Patients(vec!["p1".into(), "p2".into()])
    );
    assert_eq!((unit.seq_after, unit.seq_upto), (0, written.seq));
    assert_eq!(unit.snapshot_seq, snapshot.seq);
    assert_eq!(unit.request, r#"{"level":"group"}"#);
    assert_eq!(unit.owner, "worker-1");

    let record = store.job("j").await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::Running);
    assert_eq!(record.started_at, Some(NOW));

    // Block-organized units keep their patients, in order.
    let mut blocks = new_job(
        "k",
        "c",
        2,
        vec![UnitPlan {
            resource_type: "Patient,Observation".into(),
            kind: UnitKind::Output,
            scope: UnitScope::PatientBlocks(vec!["p2".into(), "p1".into()]),
            seq_after: 0,
            seq_upto: written.seq,
        }],
    );
    blocks.snapshot = snapshot;
    insert(&store, blocks).await;
    let unit = claim(&store, "worker-1", LEASE, NOW).await;
    assert_eq!(unit_id(&unit), ("k".to_owned(), 0));
    assert_eq!(
        unit.scope,
        UnitScope::PatientBlocks(vec!["p2".into(), "p1".into()])
    );
}

pub async fn an_unexpired_lease_is_not_claimed_again(store: Arc<dyn Backend>) {
    insert(
        &store,
        new_job("j", "c", 1, vec![plan("Patient", UnitKind::Output, 0, 5)]),
    )
    .await;
    claim(&store, "w1", LEASE, NOW).await;
    assert!(nothing_to_claim(&store, NOW + 1).await);
    assert!(nothing_to_claim(&store, LEASE - 1).await);
}

pub async fn an_expired_lease_is_claimed_again_with_the_next_attempt(store: Arc<dyn Backend>) {
    insert(
        &store,
        new_job("j", "c", 1, vec![plan("Patient", UnitKind::Output, 0, 5)]),
    )
    .await;
    let first = claim(&store, "w1", LEASE, NOW).await;
    let second = claim(&store, "w2", AFTER_LEASE + LEASE, AFTER_LEASE).await;
    assert_eq!(unit_id(&second), unit_id(&first));
    assert_eq!(second.owner, "w2");
    assert_eq!(second.attempt, first.attempt + 1);
    assert!(nothing_to_claim(&store, AFTER_LEASE + 1).await);
}

pub async fn renew_lease_holds_the_unit_for_the_current_attempt_only(store: Arc<dyn Backend>) {
    insert(
        &store,
        new_job("j", "c", 1, vec![plan("Patient", UnitKind::Output, 0, 5)]),
    )
    .await;
    let first = claim(&store, "w1", LEASE, NOW).await;
    assert!(store.renew_lease(&first, 5_000_000).await.unwrap());
    assert!(
        nothing_to_claim(&store, AFTER_LEASE).await,
        "the renewed lease holds"
    );

    // The same owner claiming again after expiry must still fence its own older attempt.
    let second = claim(&store, "w1", 9_000_000, 6_000_000).await;
    assert_eq!(second.attempt, first.attempt + 1);
    assert!(!store.renew_lease(&first, 20_000_000).await.unwrap());
    assert!(store.renew_lease(&second, 20_000_000).await.unwrap());
    assert!(
        nothing_to_claim(&store, 10_000_000).await,
        "renewed by the current attempt"
    );
}

pub async fn commit_is_fenced_for_a_stale_attempt_and_counts_the_current_one(
    store: Arc<dyn Backend>,
) {
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
    let stale = claim(&store, "w1", LEASE, NOW).await;
    // The same owner again: the attempt alone must tell the claims apart.
    let current = claim(&store, "w1", AFTER_LEASE + LEASE, AFTER_LEASE).await;
    assert_eq!(unit_id(&current), unit_id(&stale));
    assert_eq!(current.attempt, stale.attempt + 1);

    let stale_file = file("stale", "j", 0, 1, "Patient", "output");
    assert_eq!(
        store
            .commit_unit(&stale, vec![stale_file], 7)
            .await
            .unwrap(),
        UnitCommit::Fenced
    );
    let f0 = file("f0", "j", 0, 1, "Patient", "output");
    assert_eq!(
        store
            .commit_unit(&current, vec![f0.clone()], 5)
            .await
            .unwrap(),
        UnitCommit::Committed
    );
    let last = claim(&store, "w2", AFTER_LEASE + LEASE, AFTER_LEASE).await;
    assert_eq!(unit_id(&last), ("j".to_owned(), 1));
    let f1 = file("f1", "j", 1, 1, "Observation", "output");
    assert_eq!(
        store.commit_unit(&last, vec![f1.clone()], 3).await.unwrap(),
        UnitCommit::JobReady
    );

    let record = store.job("j").await.unwrap().unwrap();
    assert_eq!((record.units_done, record.units_total), (2, 2));
    assert_eq!(
        record.done_resources, 8,
        "the fenced commit's count is not added"
    );
    assert_eq!(store.job_files("j").await.unwrap(), [f1, f0]);
    assert!(store.file("stale").await.unwrap().is_none());
    assert_eq!(store.ready_jobs().await.unwrap(), ["j"]);
}

pub async fn commit_of_an_already_committed_claim_is_fenced(store: Arc<dyn Backend>) {
    insert(
        &store,
        new_job("j", "c", 1, vec![plan("Patient", UnitKind::Output, 0, 5)]),
    )
    .await;
    let unit = claim(&store, "w", LEASE, NOW).await;
    let f0 = file("f0", "j", 0, 1, "Patient", "output");
    assert_eq!(
        store.commit_unit(&unit, vec![f0.clone()], 4).await.unwrap(),
        UnitCommit::JobReady
    );
    let again = file("f0-again", "j", 0, 2, "Patient", "output");
    assert_eq!(
        store.commit_unit(&unit, vec![again], 4).await.unwrap(),
        UnitCommit::Fenced
    );
    assert!(!store.renew_lease(&unit, AFTER_LEASE).await.unwrap());
    let record = store.job("j").await.unwrap().unwrap();
    assert_eq!((record.done_resources, record.units_done), (4, 1));
    assert_eq!(store.job_files("j").await.unwrap(), [f0]);
    assert!(
        nothing_to_claim(&store, AFTER_LEASE * 10).await,
        "a done unit is never claimed"
    );
}

pub async fn provenance_units_wait_until_every_other_unit_of_the_job_is_done(
    store: Arc<dyn Backend>,
) {
    insert(
        &store,
        new_job(
            "j",
            "c",
            1,
            vec![
                plan("Provenance", UnitKind::Provenance, 0, 5),
                plan("Patient", UnitKind::Output, 0, 5),
                plan("Patient", UnitKind::Deleted, 0, 5),
            ],
        ),
    )
    .await;
    let output = claim(&store, "w", LEASE, NOW).await;
    let deleted = claim(&store, "w", LEASE, NOW).await;
    assert_eq!((output.unit_no, output.kind), (1, UnitKind::Output));
    assert_eq!((deleted.unit_no, deleted.kind), (2, UnitKind::Deleted));
    assert!(
        nothing_to_claim(&store, NOW).await,
        "running units still block provenance"
    );
    assert_eq!(
        store.commit_unit(&output, vec![], 1).await.unwrap(),
        UnitCommit::Committed
    );
    assert!(
        nothing_to_claim(&store, NOW).await,
        "one unit is still open"
    );
    assert_eq!(
        store.commit_unit(&deleted, vec![], 1).await.unwrap(),
        UnitCommit::Committed
    );
    let provenance = claim(&store, "w", LEASE, NOW).await;
    assert_eq!(
        (provenance.unit_no, provenance.kind),
        (0, UnitKind::Provenance)
    );
    assert_eq!(
        store.commit_unit(&provenance, vec![], 1).await.unwrap(),
        UnitCommit::JobReady
    );
}

pub async fn cancel_fences_units_in_flight_and_stops_claims(store: Arc<dyn Backend>) {
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
    assert_eq!(
        store.cancel_job("j").await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert!(!store.renew_lease(&unit, AFTER_LEASE).await.unwrap());
    let late = file("late", "j", 0, 1, "Patient", "output");
    assert_eq!(
        store.commit_unit(&unit, vec![late], 2).await.unwrap(),
        UnitCommit::Fenced
    );
    assert!(nothing_to_claim(&store, NOW).await);
    assert!(nothing_to_claim(&store, AFTER_LEASE).await);
    assert!(store.job_files("j").await.unwrap().is_empty());
    assert!(store.ready_jobs().await.unwrap().is_empty());
    assert_eq!(
        store.job("j").await.unwrap().unwrap().status,
        JobStatus::Cancelled
    );
}

const NONE: [i64; 0] = [];

pub async fn committed_units_and_unit_files_cover_only_committed_units_in_the_range(
    store: Arc<dyn Backend>,
) {
    let mut new = new_job(
        "j",
        "c",
        1,
        vec![
            plan("Patient", UnitKind::Output, 0, 5),
            plan("Observation", UnitKind::Output, 0, 5),
            plan("Encounter", UnitKind::Output, 0, 5),
            plan("Patient", UnitKind::Deleted, 0, 5),
        ],
    );
    let report = file(
        "f-error",
        "j",
        JOB_LEVEL_UNIT,
        1,
        "OperationOutcome",
        "error",
    );
    new.files = vec![report.clone()];
    insert(&store, new).await;
    insert(
        &store,
        new_job(
            "other",
            "c",
            2,
            vec![plan("Patient", UnitKind::Output, 0, 5)],
        ),
    )
    .await;
    assert_eq!(store.committed_units("j", 0..4).await.unwrap(), NONE);

    let u0 = claim(&store, "w", LEASE, NOW).await;
    let u1 = claim(&store, "w", LEASE, NOW).await;
    let u2 = claim(&store, "w", LEASE, NOW).await;
    assert_eq!((u0.unit_no, u1.unit_no, u2.unit_no), (0, 1, 2));
    let f2 = file("f2", "j", 2, 1, "Encounter", "output");
    store.commit_unit(&u2, vec![f2.clone()], 1).await.unwrap();
    // A unit that wrote nothing still counts as committed.
    store.commit_unit(&u0, vec![], 0).await.unwrap();
    let other = claim(&store, "w", LEASE, NOW).await;
    assert_eq!(other.job_id, "j", "unit 3 of the older job comes first");
    let theirs = claim(&store, "w", LEASE, NOW).await;
    store
        .commit_unit(
            &theirs,
            vec![file("f-other", "other", 0, 1, "Patient", "output")],
            1,
        )
        .await
        .unwrap();

    assert_eq!(store.committed_units("j", 0..4).await.unwrap(), [0, 2]);
    assert_eq!(store.committed_units("j", 1..2).await.unwrap(), NONE);
    assert_eq!(store.committed_units("j", 2..100).await.unwrap(), [2]);
    assert_eq!(store.committed_units("other", 0..4).await.unwrap(), [0]);
    assert_eq!(store.committed_units("nope", 0..4).await.unwrap(), NONE);

    // Running units have no files yet; job-level files sit below every unit.
    assert_eq!(
        store.unit_files("j", 0..4).await.unwrap(),
        std::slice::from_ref(&f2)
    );
    assert_eq!(store.unit_files("j", 0..2).await.unwrap(), []);
    assert_eq!(
        store.unit_files("j", JOB_LEVEL_UNIT..4).await.unwrap(),
        [report, f2]
    );

    let f1a = file("f1a", "j", 1, 1, "Observation", "output");
    let f1b = file("f1b", "j", 1, 2, "Observation", "output");
    store
        .commit_unit(&u1, vec![f1b.clone(), f1a.clone()], 2)
        .await
        .unwrap();
    assert_eq!(store.committed_units("j", 0..4).await.unwrap(), [0, 1, 2]);
    assert_eq!(
        store.unit_files("j", 1..2).await.unwrap(),
        [f1a, f1b],
        "in manifest order"
    );
}
