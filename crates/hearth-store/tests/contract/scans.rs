//! Export scans: what a unit sees at its job's snapshot.

use std::sync::Arc;

use hearth_store::jobs::{UnitKind, UnitScope};
use hearth_store::{Backend, resource_key};

use crate::support::*;

fn ids_of(rows: &[Row]) -> Vec<&str> {
    rows.iter().map(|r| r.id.as_str()).collect()
}

/// `(id, patient id it was found through)`, sorted: the order of Patients rows is not part of
/// the contract, only which routes there are.
fn routes(rows: &[Row], patients: &[&str]) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = rows
        .iter()
        .map(|row| {
            let via = patients
                .iter()
                .find(|p| resource_key("Patient", p) == row.via_patient)
                .unwrap_or_else(|| panic!("{} came through an unknown patient key", row.id));
            (row.id.clone(), via.to_string())
        })
        .collect();
    found.sort();
    found
}

pub async fn scan_all_sees_the_versions_visible_at_the_snapshot(store: Arc<dyn Backend>) {
    let before = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            put(&observation("o1", "Patient/p1", 70)),
            put(&patient("p4", "D")),
            delete("Patient", "p4"),
        ],
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    write_each(
        &store,
        vec![
            put(&patient("p1", "A2")),
            put(&patient("p3", "C")),
            delete("Patient", "p2"),
        ],
    )
    .await;
    let unit = scan_unit(
        "Patient",
        UnitKind::Output,
        UnitScope::All,
        0,
        snapshot.seq,
        snapshot.seq,
    );
    let rows = scan(&store, unit).await;
    assert_eq!(ids_of(&rows), ["p1", "p2"]);
    let v1 = store
        .read_version("Patient", "p1", 1)
        .await
        .unwrap()
        .unwrap();
    let p1 = &rows[0];
    assert_eq!(
        (
            p1.seq,
            p1.resource_type.as_str(),
            p1.last_updated,
            p1.compartment_size
        ),
        (before[0].seq, "Patient", before[0].last_updated, 1)
    );
    assert_eq!(
        p1.body, v1.body,
        "the version current at the snapshot, not the later update"
    );
    assert_eq!(rows[1].seq, before[1].seq);
    assert!(
        !rows[1].body.is_empty(),
        "deleted after the snapshot: still exported"
    );
}

pub async fn scan_stays_inside_the_units_seq_window(store: Arc<dyn Backend>) {
    let w = write_each(
        &store,
        ["p1", "p2", "p3", "p4", "p5"]
            .iter()
            .map(|id| put(&patient(id, "X")))
            .collect(),
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    let unit = scan_unit(
        "Patient",
        UnitKind::Output,
        UnitScope::All,
        w[1].seq,
        w[3].seq,
        snapshot.seq,
    );
    assert_eq!(ids_of(&scan(&store, unit).await), ["p3", "p4"]);
}

pub async fn scan_deleted_returns_the_tombstones_of_the_window(store: Arc<dyn Backend>) {
    let old = write_each(
        &store,
        vec![put(&patient("p0", "Z")), delete("Patient", "p0")],
    )
    .await;
    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            delete("Patient", "p2"),
            put(&patient("p3", "C")),
            delete("Patient", "p3"),
            put(&patient("p3", "C2")),
            put(&patient("p4", "D")),
        ],
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    write_one(&store, delete("Patient", "p4")).await;

    let deleted = scan_unit(
        "Patient",
        UnitKind::Deleted,
        UnitScope::All,
        old[1].seq,
        snapshot.seq,
        snapshot.seq,
    );
    let rows = scan(&store, deleted).await;
    // p0 was deleted before the window, p3 came back, p4 went after the snapshot.
    assert_eq!(ids_of(&rows), ["p2"]);
    assert_eq!(
        (rows[0].seq, rows[0].last_updated),
        (w[2].seq, w[2].last_updated)
    );
    assert!(rows[0].body.is_empty());

    let output = scan_unit(
        "Patient",
        UnitKind::Output,
        UnitScope::All,
        old[1].seq,
        snapshot.seq,
        snapshot.seq,
    );
    assert_eq!(ids_of(&scan(&store, output).await), ["p1", "p3", "p4"]);
}

pub async fn scan_compartment_and_outside_split_resources_by_compartment(store: Arc<dyn Backend>) {
    write_each(
        &store,
        vec![
            put(&observation("o1", "Patient/p1", 70)),
            put(&observation("o2", "Group/g1", 70)),
            put(&shared_observation("o3", "Patient/p1", "Patient/p2")),
        ],
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    let sizes = |rows: Vec<Row>| -> Vec<(String, i64)> {
        rows.into_iter()
            .map(|r| (r.id, r.compartment_size))
            .collect()
    };
    let compartment = scan_unit(
        "Observation",
        UnitKind::Output,
        UnitScope::Compartment,
        0,
        snapshot.seq,
        snapshot.seq,
    );
    assert_eq!(
        sizes(scan(&store, compartment).await),
        [("o1".into(), 1), ("o3".into(), 2)]
    );
    let all = scan_unit(
        "Observation",
        UnitKind::Output,
        UnitScope::All,
        0,
        snapshot.seq,
        snapshot.seq,
    );
    assert_eq!(
        sizes(scan(&store, all).await),
        [("o1".into(), 1), ("o2".into(), 0), ("o3".into(), 2)]
    );
    // A new version that leaves every compartment moves the resource outside; the snapshot
    // still sees the old one inside.
    write_one(&store, put(&observation("o1", "Group/g1", 71))).await;
    let outside = |upto| {
        scan_unit(
            "Observation",
            UnitKind::Output,
            UnitScope::Outside,
            0,
            upto,
            upto,
        )
    };
    assert_eq!(
        sizes(scan(&store, outside(snapshot.seq)).await),
        [("o2".into(), 0)]
    );
    let later = store.snapshot().await.unwrap();
    assert_eq!(
        ids_of(&scan(&store, outside(later.seq)).await),
        ["o2", "o1"]
    );
}

pub async fn scan_patients_returns_the_units_patients_rows_with_via_patient(
    store: Arc<dyn Backend>,
) {
    write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            put(&observation("o1", "Patient/p1", 70)),
            put(&observation("o2", "Patient/p2", 70)),
            put(&encounter("e1", "Patient/p1")),
            put(&encounter("e2", "Patient/p2")),
            put(&shared_observation("o3", "Patient/p1", "Patient/p2")),
            put(&observation("g1", "Group/g1", 70)),
            put(&observation("o2", "Patient/p2", 71)),
        ],
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    // Neither a new resource nor a new version after the snapshot is seen.
    write_one(&store, put(&observation("o4", "Patient/p1", 70))).await;
    write_one(&store, put(&observation("o1", "Patient/p1", 99))).await;
    let unit = |patients: &[&str]| {
        scan_unit(
            "Observation,Encounter",
            UnitKind::Output,
            UnitScope::Patients(patients.iter().map(|p| p.to_string()).collect()),
            0,
            snapshot.seq,
            snapshot.seq,
        )
    };
    let pair = |id: &str, via: &str| (id.to_owned(), via.to_owned());

    let rows = scan(&store, unit(&["p1"])).await;
    assert_eq!(
        routes(&rows, &["p1"]),
        [pair("e1", "p1"), pair("o1", "p1"), pair("o3", "p1")]
    );
    let o3 = rows.iter().find(|r| r.id == "o3").unwrap();
    assert_eq!(
        (o3.resource_type.as_str(), o3.compartment_size),
        ("Observation", 2)
    );
    assert!(!o3.body.is_empty());
    let o1 = rows.iter().find(|r| r.id == "o1").unwrap();
    assert_eq!(field(&o1.body, "valueQuantity")["value"], 70);

    // A resource in two of the unit's patients' compartments comes once through each.
    let rows = scan(&store, unit(&["p1", "p2"])).await;
    assert_eq!(
        routes(&rows, &["p1", "p2"]),
        [
            pair("e1", "p1"),
            pair("e2", "p2"),
            pair("o1", "p1"),
            pair("o2", "p2"),
            pair("o3", "p1"),
            pair("o3", "p2"),
        ]
    );
    assert!(scan(&store, unit(&["p9"])).await.is_empty());
}

pub async fn scan_patient_blocks_come_patient_by_patient_with_the_patient_first(
    store: Arc<dyn Backend>,
) {
    write_each(
        &store,
        vec![
            put(&observation("o1", "Patient/p1", 70)),
            put(&patient("p2", "B")),
            put(&encounter("e2", "Patient/p2")),
            put(&shared_observation("o3", "Patient/p1", "Patient/p2")),
            put(&patient("p1", "A")),
            put(&encounter("e1", "Patient/p1")),
            put(&observation("o2", "Patient/p2", 70)),
            put(&observation("g1", "Group/g1", 70)),
            // A later version of p2 moves after its other rows in change-sequence order.
            put(&patient("p2", "B2")),
        ],
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    write_one(&store, put(&observation("o4", "Patient/p1", 70))).await;
    let unit = |types: &str, patients: &[&str]| {
        scan_unit(
            types,
            UnitKind::Output,
            UnitScope::PatientBlocks(patients.iter().map(|p| p.to_string()).collect()),
            0,
            snapshot.seq,
            snapshot.seq,
        )
    };
    let blocks = |rows: &[Row], patients: &[&str]| -> Vec<(String, String)> {
        rows.iter()
            .map(|row| {
                let via = patients
                    .iter()
                    .find(|p| resource_key("Patient", p) == row.via_patient)
                    .unwrap_or_else(|| panic!("{} came through an unknown patient key", row.id));
                (via.to_string(), row.id.clone())
            })
            .collect()
    };
    let pair = |via: &str, id: &str| (via.to_owned(), id.to_owned());

    // In the order of the unit's list; each patient's own Patient first, then by change
    // sequence; the shared o3 in both blocks.
    let rows = scan(&store, unit("Patient,Observation,Encounter", &["p2", "p1"])).await;
    assert_eq!(
        blocks(&rows, &["p2", "p1"]),
        [
            pair("p2", "p2"),
            pair("p2", "e2"),
            pair("p2", "o3"),
            pair("p2", "o2"),
            pair("p1", "p1"),
            pair("p1", "o1"),
            pair("p1", "o3"),
            pair("p1", "e1"),
        ]
    );
    let p2 = &rows[0];
    assert_eq!(
        field(&p2.body, "name")[0]["family"],
        "B2",
        "the version current at the snapshot"
    );
    assert_eq!(rows[2].body, rows[6].body);

    // Types the unit leaves out are not in any block.
    let rows = scan(&store, unit("Observation", &["p1", "p2"])).await;
    assert_eq!(
        blocks(&rows, &["p1", "p2"]),
        [
            pair("p1", "o1"),
            pair("p1", "o3"),
            pair("p2", "o3"),
            pair("p2", "o2"),
        ]
    );
    assert!(scan(&store, unit("Observation", &["p9"])).await.is_empty());
}

pub async fn scan_patients_deleted_passes_the_ended_body_of_shared_tombstones(
    store: Arc<dyn Backend>,
) {
    write_each(
        &store,
        vec![
            put(&observation("o1", "Patient/p1", 70)),
            put(&shared_observation("o3", "Patient/p1", "Patient/p2")),
            put(&observation("o5", "Patient/p1", 70)),
            delete("Observation", "o1"),
            delete("Observation", "o3"),
        ],
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    let ended = store
        .read_version("Observation", "o3", 1)
        .await
        .unwrap()
        .unwrap();
    let unit = scan_unit(
        "Observation",
        UnitKind::Deleted,
        UnitScope::Patients(vec!["p1".into(), "p2".into()]),
        0,
        snapshot.seq,
        snapshot.seq,
    );
    let rows = scan(&store, unit).await;
    let pair = |id: &str, via: &str| (id.to_owned(), via.to_owned());
    assert_eq!(
        routes(&rows, &["p1", "p2"]),
        [pair("o1", "p1"), pair("o3", "p1"), pair("o3", "p2")]
    );
    // The engine keeps one route of a shared tombstone by the compartment of the version it
    // ended, which only that version's body tells.
    for row in rows.iter().filter(|r| r.id == "o3") {
        assert_eq!(row.compartment_size, 2);
        assert_eq!(row.body, ended.body);
    }
    let o1 = rows.iter().find(|r| r.id == "o1").unwrap();
    assert_eq!(o1.compartment_size, 1);
}

pub async fn scan_stops_when_the_consumer_returns_false(store: Arc<dyn Backend>) {
    write_each(
        &store,
        ["p1", "p2", "p3"]
            .iter()
            .map(|id| put(&patient(id, "X")))
            .collect(),
    )
    .await;
    let snapshot = store.snapshot().await.unwrap();
    let unit = scan_unit(
        "Patient",
        UnitKind::Output,
        UnitScope::All,
        0,
        snapshot.seq,
        snapshot.seq,
    );
    assert_eq!(ids_of(&scan_at_most(&store, unit, 1).await), ["p1"]);
}
