//! Builders and small helpers shared by the checks.

use std::sync::Arc;

use hearth_fhir::envelope::{IdPolicy, prepare};
use hearth_fhir::instant::Micros;
use hearth_store::jobs::{
    ClaimedUnit, FileRecord, NewJob, ScanRow, Snapshot, UnitKind, UnitPlan, UnitScope,
};
use hearth_store::{Backend, BatchMode, Seq, StoredVersion, WriteOp, Written};

/// A create-or-update of the resource in `json`, as the bulk loader builds it.
pub fn put(json: &str) -> WriteOp {
    put_if_match(json, None)
}

pub fn put_if_match(json: &str, if_match: Option<u64>) -> WriteOp {
    let resource = prepare(json.as_bytes(), None, IdPolicy::FromBody)
        .unwrap_or_else(|e| panic!("test resource {json} was refused: {e}"));
    WriteOp::Put { resource, if_match }
}

pub fn delete(resource_type: &'static str, id: &str) -> WriteOp {
    delete_if_match(resource_type, id, None)
}

pub fn delete_if_match(resource_type: &'static str, id: &str, if_match: Option<u64>) -> WriteOp {
    WriteOp::Delete {
        resource_type,
        id: id.to_owned(),
        if_match,
    }
}

pub fn patient(id: &str, family: &str) -> String {
    format!(r#"{{"resourceType":"Patient","id":"{id}","name":[{{"family":"{family}"}}]}}"#)
}

/// An Observation whose `subject` is `subject` (a reference such as `Patient/p1`).
pub fn observation(id: &str, subject: &str, value: u32) -> String {
    format!(
        r#"{{"resourceType":"Observation","id":"{id}","status":"final","code":{{"text":"weight"}},"subject":{{"reference":"{subject}"}},"valueQuantity":{{"value":{value},"unit":"kg"}}}}"#
    )
}

/// An Observation in two patients' compartments: `subject` and a Patient `performer`.
pub fn shared_observation(id: &str, subject: &str, performer: &str) -> String {
    format!(
        r#"{{"resourceType":"Observation","id":"{id}","status":"final","code":{{"text":"weight"}},"subject":{{"reference":"{subject}"}},"performer":[{{"reference":"{performer}"}}]}}"#
    )
}

pub fn encounter(id: &str, subject: &str) -> String {
    format!(
        r#"{{"resourceType":"Encounter","id":"{id}","status":"finished","class":{{"code":"AMB"}},"subject":{{"reference":"{subject}"}}}}"#
    )
}

/// Writes one operation on its own and returns what it did; a refusal fails the check.
pub async fn write_one(store: &Arc<dyn Backend>, op: WriteOp) -> Written {
    let mut results = store
        .write(vec![op], BatchMode::Independent)
        .await
        .expect("write");
    assert_eq!(results.len(), 1, "one result per operation");
    results.remove(0).expect("the write was refused")
}

/// Writes each operation in its own call, in order.
pub async fn write_each(store: &Arc<dyn Backend>, ops: Vec<WriteOp>) -> Vec<Written> {
    let mut written = Vec::with_capacity(ops.len());
    for op in ops {
        written.push(write_one(store, op).await);
    }
    written
}

pub fn ids<'a>(versions: impl IntoIterator<Item = &'a StoredVersion>) -> Vec<&'a str> {
    versions.into_iter().map(|v| v.id.as_str()).collect()
}

pub fn plan(resource_type: &str, kind: UnitKind, after: Seq, upto: Seq) -> UnitPlan {
    UnitPlan {
        resource_type: resource_type.to_owned(),
        kind,
        scope: UnitScope::All,
        seq_after: after,
        seq_upto: upto,
    }
}

pub fn new_job(id: &str, client: &str, created_at: Micros, units: Vec<UnitPlan>) -> NewJob {
    NewJob {
        id: id.to_owned(),
        client: client.to_owned(),
        request: format!("{{\"job\":\"{id}\"}}"),
        request_url: format!("http://hearth.test/fhir/$export?job={id}"),
        snapshot: Snapshot {
            seq: 0,
            transaction_time: created_at,
        },
        created_at,
        estimated_resources: 0,
        units,
        files: Vec::new(),
    }
}

pub fn file(
    id: &str,
    job_id: &str,
    unit_no: i64,
    part: i64,
    resource_type: &str,
    kind: &str,
) -> FileRecord {
    FileRecord {
        id: id.to_owned(),
        job_id: job_id.to_owned(),
        unit_no,
        part,
        resource_type: resource_type.to_owned(),
        kind: kind.to_owned(),
        path: format!("{job_id}/{resource_type}.{unit_no}.{part}.ndjson"),
        count: 10 + part as u64,
        bytes: 1000 + part as u64,
        continues: false,
    }
}

/// Lease instants far from each other, so no check depends on how a backend treats a lease
/// that ends exactly now.
pub const NOW: Micros = 1_000_000;
pub const LEASE: Micros = 2_000_000;
pub const AFTER_LEASE: Micros = 3_000_000;

/// Claims the next unit; there must be one.
pub async fn claim(
    store: &Arc<dyn Backend>,
    owner: &str,
    lease_until: Micros,
    now: Micros,
) -> ClaimedUnit {
    store
        .claim_unit(owner, lease_until, now)
        .await
        .expect("claim_unit")
        .unwrap_or_else(|| panic!("{owner} found no unit to claim at {now}"))
}

/// Which unit a claim is, for comparing claim orders.
pub fn unit_id(unit: &ClaimedUnit) -> (String, i64) {
    (unit.job_id.clone(), unit.unit_no)
}

/// A unit as a worker would hold it, for scans that need no job rows.
pub fn scan_unit(
    resource_type: &str,
    kind: UnitKind,
    scope: UnitScope,
    after: Seq,
    upto: Seq,
    snapshot_seq: Seq,
) -> ClaimedUnit {
    ClaimedUnit {
        job_id: "scan".to_owned(),
        unit_no: 0,
        resource_type: resource_type.to_owned(),
        kind,
        scope,
        seq_after: after,
        seq_upto: upto,
        snapshot_seq,
        request: String::new(),
        attempt: 1,
        owner: "scanner".to_owned(),
    }
}

/// A scanned row, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub seq: Seq,
    pub resource_type: String,
    pub id: String,
    pub compartment_size: i64,
    pub via_patient: i64,
    pub last_updated: Micros,
    pub body: Vec<u8>,
}

impl From<ScanRow<'_>> for Row {
    fn from(row: ScanRow<'_>) -> Self {
        Self {
            seq: row.seq,
            resource_type: row.resource_type.to_owned(),
            id: row.id.to_owned(),
            compartment_size: row.compartment_size,
            via_patient: row.via_patient,
            last_updated: row.last_updated,
            body: row.body.to_vec(),
        }
    }
}

/// Every row of a unit. `scan_unit` blocks its thread, as export workers call it.
pub async fn scan(store: &Arc<dyn Backend>, unit: ClaimedUnit) -> Vec<Row> {
    scan_at_most(store, unit, usize::MAX).await
}

/// The rows of a unit until the consumer has taken `limit` and asks the scan to stop.
pub async fn scan_at_most(store: &Arc<dyn Backend>, unit: ClaimedUnit, limit: usize) -> Vec<Row> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let mut rows = Vec::new();
        store
            .scan_unit(&unit, &mut |row| {
                assert!(
                    rows.len() < limit,
                    "the scan went on after the consumer said stop"
                );
                rows.push(Row::from(row));
                Ok(rows.len() < limit)
            })
            .expect("scan_unit");
        rows
    })
    .await
    .expect("the scan task panicked")
}

/// The JSON `meta` of a stored body.
pub fn meta(body: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).expect("the stored body is JSON");
    let meta = &value["meta"];
    (
        meta["versionId"]
            .as_str()
            .expect("meta.versionId")
            .to_owned(),
        meta["lastUpdated"]
            .as_str()
            .expect("meta.lastUpdated")
            .to_owned(),
    )
}

/// A top-level string field of a stored body.
pub fn field(body: &[u8], name: &str) -> serde_json::Value {
    let value: serde_json::Value = serde_json::from_slice(body).expect("the stored body is JSON");
    value[name].clone()
}
