//! [`JobStore`] and the export scan for SQLite.

use std::ops::Range;

use async_trait::async_trait;
use hearth_fhir::instant::Micros;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::SqliteStore;
use crate::error::StoreError;
use crate::jobs::{
    CancelOutcome, ClaimedUnit, FILE_COLUMNS, FileRecord, JOB_COLUMNS, JobRecord, JobStatus,
    JobStore, NewJob, PatientVersion, Route, ScanError, ScanRow, ScanSource, Snapshot, UnitCommit,
    UnitKind, UnitScope, block_order,
};
use crate::model::Seq;

fn job_record(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let status: String = row.get(2)?;
    Ok(JobRecord {
        id: row.get(0)?,
        client: row.get(1)?,
        status: JobStatus::parse(&status).unwrap_or(JobStatus::Failed),
        request: row.get(3)?,
        request_url: row.get(4)?,
        snapshot: Snapshot {
            seq: row.get(5)?,
            transaction_time: row.get(6)?,
        },
        created_at: row.get(7)?,
        started_at: row.get(8)?,
        completed_at: row.get(9)?,
        expires_at: row.get(10)?,
        polls: row.get::<_, i64>(11)? as u64,
        manifest_shown: row.get(12)?,
        estimated_resources: row.get::<_, i64>(13)? as u64,
        done_resources: row.get::<_, i64>(14)? as u64,
        units_total: row.get::<_, i64>(15)? as u64,
        units_done: row.get::<_, i64>(16)? as u64,
        manifest: row.get(17)?,
        error: row.get(18)?,
    })
}

fn file_record(row: &Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: row.get(0)?,
        job_id: row.get(1)?,
        unit_no: row.get(2)?,
        part: row.get(3)?,
        resource_type: row.get(4)?,
        kind: row.get(5)?,
        path: row.get(6)?,
        count: row.get::<_, i64>(7)? as u64,
        bytes: row.get::<_, i64>(8)? as u64,
        continues: row.get(9)?,
    })
}

fn load_job(conn: &Connection, id: &str) -> Result<Option<JobRecord>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM export_job j WHERE j.id = ?1"
        ))?
        .query_row([id], job_record)
        .optional()?)
}

/// The versions of type `?1` current (and not deleted) at seq `?2`.
const CURRENT_OF_TYPE: &str = "res_type = ?1 AND seq <= ?2
    AND (superseded_by IS NULL OR superseded_by > ?2) AND deleted = 0";

/// Streams a unit's rows (see [`ScanSource::scan_unit`]).
pub fn scan(
    conn: &Connection,
    unit: &ClaimedUnit,
    each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
) -> Result<(), ScanError> {
    use rusqlite::types::Value;
    let deleted = matches!(unit.kind, UnitKind::Deleted);
    let visible = "(rv.superseded_by IS NULL OR rv.superseded_by > ?4) AND rv.deleted = ?5";
    let mut values: Vec<Value> = vec![
        Value::Null,
        Value::Integer(unit.seq_after),
        Value::Integer(unit.seq_upto.min(unit.snapshot_seq)),
        Value::Integer(unit.snapshot_seq),
        Value::Integer(deleted.into()),
    ];
    let sql = match &unit.scope {
        UnitScope::All | UnitScope::Compartment | UnitScope::Outside => {
            values[0] = Value::Text(unit.resource_type.clone());
            let compartment = unit.scope.compartment_condition();
            format!(
                "SELECT rv.seq, rv.res_type, rv.res_id, rv.last_updated, rv.body, rv.compartment_size, 0
                 FROM resource_version rv
                 WHERE rv.res_type = ?1 AND rv.seq > ?2 AND rv.seq <= ?3 AND {visible}{compartment}
                 ORDER BY rv.seq"
            )
        }
        UnitScope::Patients(patients) => {
            return scan_patients(conn, unit, patients, false, each);
        }
        UnitScope::PatientBlocks(patients) => {
            return scan_patients(conn, unit, patients, true, each);
        }
    };
    let mut stmt = conn.prepare(&sql).map_err(StoreError::from)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(values))
        .map_err(StoreError::from)?;
    let field = |e: rusqlite::types::FromSqlError| StoreError::from(rusqlite::Error::from(e));
    while let Some(row) = rows.next().map_err(StoreError::from)? {
        let text = |i: usize| -> Result<&str, StoreError> {
            row.get_ref(i)
                .map_err(StoreError::from)?
                .as_str()
                .map_err(field)
        };
        let scanned = ScanRow {
            seq: row.get(0).map_err(StoreError::from)?,
            resource_type: text(1)?,
            id: text(2)?,
            last_updated: row.get(3).map_err(StoreError::from)?,
            body: row
                .get_ref(4)
                .map_err(StoreError::from)?
                .as_blob()
                .map_err(field)?,
            compartment_size: row.get(5).map_err(StoreError::from)?,
            via_patient: row.get(6).map_err(StoreError::from)?,
        };
        if !each(scanned)? {
            break;
        }
    }
    Ok(())
}

/// The `(seq, patient key)` pairs of the patients' compartment rows in `(after, upto]`, and
/// the `(patient key, seq)` pairs of the patients' own Patient versions there: one query each
/// for the whole batch.
fn compartment_routes(
    conn: &Connection,
    keys: &[i64],
    types: &[&str],
    after: Seq,
    upto: Seq,
    own_versions: bool,
) -> Result<(Vec<Route>, Vec<PatientVersion>), StoreError> {
    use rusqlite::types::Value;
    let mut values = vec![Value::Integer(after), Value::Integer(upto)];
    let placeholders = |values: &mut Vec<Value>, items: Vec<Value>| {
        let mut list = String::new();
        for item in items {
            values.push(item);
            if !list.is_empty() {
                list.push(',');
            }
            list.push_str(&format!("?{}", values.len()));
        }
        list
    };
    let list = placeholders(
        &mut values,
        keys.iter().map(|key| Value::Integer(*key)).collect(),
    );
    let pairs = |sql: String, values: &[Value]| -> Result<Vec<(i64, i64)>, StoreError> {
        let mut stmt = conn.prepare(&sql)?;
        let found = stmt.query_map(rusqlite::params_from_iter(values.iter()), |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
        })?;
        Ok(found.collect::<Result<_, _>>()?)
    };
    // The patients' own versions need only the patient keys.
    let key_values = values.clone();
    // A unit of a few types (the Provenance step, a narrow `_type`) would otherwise read every
    // compartment row of its patients to learn its type: the type index answers that without
    // touching the table.
    let of_types = if types.len() <= 3 {
        let list = placeholders(
            &mut values,
            types.iter().map(|t| Value::Text((*t).to_owned())).collect(),
        );
        // Bulk loads leave each type in a narrow band of sequence numbers: bounding the routes
        // by the band spares most of the lookups.
        format!(
            " AND seq BETWEEN
                 (SELECT MIN(seq) FROM resource_version INDEXED BY resource_version_by_type WHERE res_type IN ({list}))
             AND (SELECT MAX(seq) FROM resource_version INDEXED BY resource_version_by_type WHERE res_type IN ({list}))
             AND EXISTS (SELECT 1 FROM resource_version INDEXED BY resource_version_by_type
               WHERE res_type IN ({list}) AND resource_version.seq = compartment_member.seq)"
        )
    } else {
        String::new()
    };
    let routes = pairs(
        format!(
            "SELECT seq, patient_key FROM compartment_member
             WHERE patient_key IN ({list}) AND seq > ?1 AND seq <= ?2{of_types}"
        ),
        &values,
    )?;
    // A Patient's key is its own id key: the id index finds its versions without the table.
    let own = if own_versions {
        pairs(
            format!(
                "SELECT id_key, seq FROM resource_version
                 WHERE id_key IN ({list}) AND seq > ?1 AND seq <= ?2"
            ),
            &key_values,
        )?
    } else {
        Vec::new()
    };
    Ok((routes, own))
}

/// The rows of a batch of patients' compartments. The compartment index gives their change
/// sequence numbers; reading the rows in that order visits each table page once, where
/// following the index patient by patient would read a page per row. Blocks need the rows
/// patient by patient all the same (see [`ScanSource::scan_unit`]).
fn scan_patients(
    conn: &Connection,
    unit: &ClaimedUnit,
    patients: &[String],
    blocks: bool,
    each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
) -> Result<(), ScanError> {
    let upto = unit.seq_upto.min(unit.snapshot_seq);
    let keys = crate::patient_keys(patients);
    let types: Vec<&str> = unit.resource_type.split(',').collect();
    let (mut routes, own) = compartment_routes(conn, &keys, &types, unit.seq_after, upto, blocks)?;
    if blocks {
        block_order(&mut routes, &keys, &own);
    } else {
        routes.sort_unstable();
    }
    let deleted = matches!(unit.kind, UnitKind::Deleted);
    let mut row_at = conn
        .prepare_cached(
            "SELECT res_type, res_id, last_updated, body, compartment_size, version FROM resource_version
             WHERE seq = ?1 AND (superseded_by IS NULL OR superseded_by > ?2) AND deleted = ?3",
        )
        .map_err(StoreError::from)?;
    let field = |e: rusqlite::types::FromSqlError| StoreError::from(rusqlite::Error::from(e));
    for (seq, via_patient) in routes {
        let mut rows = row_at
            .query(params![seq, unit.snapshot_seq, deleted])
            .map_err(StoreError::from)?;
        let Some(row) = rows.next().map_err(StoreError::from)? else {
            continue;
        };
        let text = |i: usize| -> Result<&str, StoreError> {
            row.get_ref(i)
                .map_err(StoreError::from)?
                .as_str()
                .map_err(field)
        };
        let resource_type = text(0)?;
        if !types.contains(&resource_type) {
            continue;
        }
        let id = text(1)?;
        let compartment_size: i64 = row.get(4).map_err(StoreError::from)?;
        // A tombstone found through several patients is told apart by the compartment of the
        // version it ended, whose body the worker reads in place of the empty one.
        let ended;
        let body = if deleted && compartment_size > 1 {
            let version: i64 = row.get(5).map_err(StoreError::from)?;
            ended = super::read::version(conn, resource_type, id, (version - 1) as u64)?
                .map(|v| v.body)
                .unwrap_or_default();
            ended.as_slice()
        } else {
            row.get_ref(3)
                .map_err(StoreError::from)?
                .as_blob()
                .map_err(field)?
        };
        let scanned = ScanRow {
            seq,
            resource_type,
            id,
            last_updated: row.get(2).map_err(StoreError::from)?,
            body,
            compartment_size,
            via_patient,
        };
        if !each(scanned)? {
            break;
        }
    }
    Ok(())
}

impl ScanSource for SqliteStore {
    fn scan_unit(
        &self,
        unit: &ClaimedUnit,
        each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
    ) -> Result<(), ScanError> {
        let conn = self.inner.take_reader()?;
        let result = scan(&conn, unit, each);
        self.inner.return_reader(conn);
        result
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.inner
            .writer
            .run(|state| {
                let (seq, transaction_time) = state.clock.snapshot();
                Ok(Snapshot {
                    seq,
                    transaction_time,
                })
            })
            .await
    }

    async fn type_range(
        &self,
        resource_type: &str,
        after: Seq,
        upto: Seq,
    ) -> Result<(u64, Seq, Seq), StoreError> {
        let resource_type = resource_type.to_owned();
        self.with_reader(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM resource_version
                     WHERE res_type = ?1 AND seq > ?2 AND seq <= ?3",
                )?
                .query_row(params![resource_type, after, upto], |row| {
                    Ok((row.get::<_, i64>(0)? as u64, row.get(1)?, row.get(2)?))
                })?)
        })
        .await
    }

    async fn compartment_rows(
        &self,
        patients: &[String],
        after: Seq,
        upto: Seq,
    ) -> Result<u64, StoreError> {
        let keys = crate::patient_keys(patients);
        self.with_reader(move |conn| {
            let mut count = conn.prepare_cached(
                "SELECT COUNT(*) FROM compartment_member WHERE patient_key = ?1 AND seq > ?2 AND seq <= ?3",
            )?;
            let mut total = 0u64;
            for key in keys {
                total += count.query_row(params![key, after, upto], |row| row.get::<_, i64>(0))? as u64;
            }
            Ok(total)
        })
        .await
    }

    async fn current_ids(&self, resource_type: &str, upto: Seq) -> Result<Vec<String>, StoreError> {
        let resource_type = resource_type.to_owned();
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT res_id FROM resource_version WHERE {CURRENT_OF_TYPE} ORDER BY seq"
            ))?;
            let ids = stmt
                .query_map(params![resource_type, upto], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    async fn current_keys(&self, resource_type: &str, upto: Seq) -> Result<Vec<i64>, StoreError> {
        let resource_type = resource_type.to_owned();
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT id_key FROM resource_version WHERE {CURRENT_OF_TYPE}"
            ))?;
            let mut keys: Vec<i64> = stmt
                .query_map(params![resource_type, upto], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            keys.sort_unstable();
            Ok(keys)
        })
        .await
    }

    async fn types_present(&self, after: Seq, upto: Seq) -> Result<Vec<String>, StoreError> {
        self.with_reader(move |conn| {
            // A skip scan over the (res_type, seq) index: one probe per distinct type.
            let mut types = Vec::new();
            let mut next = conn.prepare_cached(
                "SELECT res_type FROM resource_version WHERE res_type > ?1 ORDER BY res_type LIMIT 1",
            )?;
            let mut any_in_window = conn.prepare_cached(
                "SELECT 1 FROM resource_version WHERE res_type = ?1 AND seq > ?2 AND seq <= ?3 LIMIT 1",
            )?;
            let mut last = String::new();
            while let Some(resource_type) = next.query_row([&last], |row| row.get::<_, String>(0)).optional()? {
                if any_in_window.exists(params![resource_type, after, upto])? {
                    types.push(resource_type.clone());
                }
                last = resource_type;
            }
            Ok(types)
        })
        .await
    }

    async fn insert_job(&self, job: NewJob) -> Result<(), StoreError> {
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                tx.execute(
                    "INSERT INTO export_job (id, client, status, request, request_url, snapshot_seq,
                        transaction_time, created_at, estimated_resources)
                     VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        job.id,
                        job.client,
                        job.request,
                        job.request_url,
                        job.snapshot.seq,
                        job.snapshot.transaction_time,
                        job.created_at,
                        job.estimated_resources as i64
                    ],
                )?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO export_unit (job_id, unit_no, res_type, kind, seq_after, seq_upto, scope, patients)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for (unit_no, unit) in job.units.iter().enumerate() {
                    let patients = unit.scope.stored_patients()?;
                    insert.execute(params![
                        job.id,
                        unit_no as i64,
                        unit.resource_type,
                        unit.kind.as_str(),
                        unit.seq_after,
                        unit.seq_upto,
                        unit.scope.as_str(),
                        patients
                    ])?;
                }
                drop(insert);
                insert_files(&tx, &job.files)?;
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let id = id.to_owned();
        self.with_reader(move |conn| load_job(conn, &id)).await
    }

    async fn record_poll(&self, id: &str, manifest_shown: bool) -> Result<u64, StoreError> {
        let id = id.to_owned();
        self.inner
            .writer
            .run(move |state| {
                let before: Option<i64> = state
                    .conn
                    .query_row("SELECT polls FROM export_job WHERE id = ?1", [&id], |row| row.get(0))
                    .optional()?;
                state.conn.execute(
                    "UPDATE export_job SET polls = polls + 1, manifest_shown = manifest_shown OR ?2 WHERE id = ?1",
                    params![id, manifest_shown],
                )?;
                Ok(before.unwrap_or(0) as u64)
            })
            .await
    }

    async fn active_jobs(&self, client: &str) -> Result<u64, StoreError> {
        let client = client.to_owned();
        self.with_reader(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM export_job WHERE client = ?1 AND status IN ('queued', 'running')",
                )?
                .query_row([client], |row| row.get::<_, i64>(0))? as u64)
        })
        .await
    }

    async fn cancel_job(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        let id = id.to_owned();
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                let found: Option<(String, bool)> = tx
                    .query_row(
                        "SELECT status, manifest_shown FROM export_job WHERE id = ?1",
                        [&id],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?;
                let outcome = match found {
                    None => CancelOutcome::NotFound,
                    Some((status, _)) if status == JobStatus::Cancelled.as_str() => CancelOutcome::NotFound,
                    Some((_, true)) => {
                        tx.execute("DELETE FROM export_job WHERE id = ?1", [&id])?;
                        CancelOutcome::AlreadyFinished
                    }
                    Some(_) => {
                        tx.execute(
                            "UPDATE export_job SET status = 'cancelled', manifest = NULL WHERE id = ?1",
                            [&id],
                        )?;
                        tx.execute("DELETE FROM export_file WHERE job_id = ?1", [&id])?;
                        CancelOutcome::Cancelled
                    }
                };
                tx.commit()?;
                Ok(outcome)
            })
            .await
    }

    async fn claim_unit(
        &self,
        owner: &str,
        lease_until: Micros,
        now: Micros,
    ) -> Result<Option<ClaimedUnit>, StoreError> {
        let owner = owner.to_owned();
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                let found = tx
                    .prepare_cached(
                        "SELECT u.job_id, u.unit_no, u.res_type, u.kind, u.seq_after, u.seq_upto,
                                j.snapshot_seq, j.request, u.attempt, u.scope, u.patients
                         FROM export_unit u JOIN export_job j ON j.id = u.job_id
                         WHERE u.status <> 'done' AND j.status IN ('queued', 'running')
                           AND (u.status = 'pending' OR u.lease_until < ?1)
                           AND (u.kind <> 'provenance' OR NOT EXISTS (
                                SELECT 1 FROM export_unit o
                                WHERE o.job_id = u.job_id AND o.kind <> 'provenance' AND o.status <> 'done'))
                         ORDER BY j.created_at, u.unit_no LIMIT 1",
                    )?
                    .query_row([now], |row| {
                        let kind: String = row.get(3)?;
                        let scope: String = row.get(9)?;
                        let patients: Option<String> = row.get(10)?;
                        let scope = UnitScope::from_stored(&scope, patients.as_deref());
                        Ok(ClaimedUnit {
                            job_id: row.get(0)?,
                            unit_no: row.get(1)?,
                            resource_type: row.get(2)?,
                            kind: UnitKind::parse(&kind).unwrap_or(UnitKind::Output),
                            scope,
                            seq_after: row.get(4)?,
                            seq_upto: row.get(5)?,
                            snapshot_seq: row.get(6)?,
                            request: row.get(7)?,
                            attempt: row.get::<_, i64>(8)? + 1,
                            owner: String::new(),
                        })
                    })
                    .optional()?;
                let Some(mut unit) = found else {
                    return Ok(None);
                };
                unit.owner = owner;
                tx.execute(
                    "UPDATE export_unit SET status = 'running', lease_owner = ?3, lease_until = ?4, attempt = ?5
                     WHERE job_id = ?1 AND unit_no = ?2",
                    params![unit.job_id, unit.unit_no, unit.owner, lease_until, unit.attempt],
                )?;
                tx.execute(
                    "UPDATE export_job SET status = 'running', started_at = ?2 WHERE id = ?1 AND status = 'queued'",
                    params![unit.job_id, now],
                )?;
                tx.commit()?;
                Ok(Some(unit))
            })
            .await
    }

    async fn renew_lease(
        &self,
        unit: &ClaimedUnit,
        lease_until: Micros,
    ) -> Result<bool, StoreError> {
        let unit = unit.clone();
        self.inner
            .writer
            .run(move |state| {
                let changed = state.conn.execute(
                    "UPDATE export_unit SET lease_until = ?5
                     WHERE job_id = ?1 AND unit_no = ?2 AND lease_owner = ?3 AND attempt = ?4 AND status = 'running'
                       AND EXISTS (SELECT 1 FROM export_job WHERE id = ?1 AND status = 'running')",
                    params![unit.job_id, unit.unit_no, unit.owner, unit.attempt, lease_until],
                )?;
                Ok(changed == 1)
            })
            .await
    }

    async fn commit_unit(
        &self,
        unit: &ClaimedUnit,
        files: Vec<FileRecord>,
        resources: u64,
    ) -> Result<UnitCommit, StoreError> {
        let unit = unit.clone();
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                let fenced = tx.execute(
                    "UPDATE export_unit SET status = 'done', resources = ?5, lease_owner = NULL
                     WHERE job_id = ?1 AND unit_no = ?2 AND lease_owner = ?3 AND attempt = ?4 AND status = 'running'
                       AND EXISTS (SELECT 1 FROM export_job WHERE id = ?1 AND status = 'running')",
                    params![unit.job_id, unit.unit_no, unit.owner, unit.attempt, resources as i64],
                )? == 0;
                if fenced {
                    return Ok(UnitCommit::Fenced);
                }
                insert_files(&tx, &files)?;
                tx.execute(
                    "UPDATE export_job SET done_resources = done_resources + ?2 WHERE id = ?1",
                    params![unit.job_id, resources as i64],
                )?;
                let open: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM export_unit WHERE job_id = ?1 AND status <> 'done'",
                    [&unit.job_id],
                    |row| row.get(0),
                )?;
                tx.commit()?;
                Ok(if open == 0 { UnitCommit::JobReady } else { UnitCommit::Committed })
            })
            .await
    }

    async fn complete_job(
        &self,
        id: &str,
        manifest: String,
        completed_at: Micros,
        expires_at: Micros,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.inner
            .writer
            .run(move |state| {
                state.conn.execute(
                    "UPDATE export_job SET status = 'completed', manifest = ?2, completed_at = ?3, expires_at = ?4
                     WHERE id = ?1 AND status IN ('queued', 'running')",
                    params![id, manifest, completed_at, expires_at],
                )?;
                Ok(())
            })
            .await
    }

    async fn fail_job(&self, id: &str, error: &str) -> Result<(), StoreError> {
        let (id, error) = (id.to_owned(), error.to_owned());
        self.inner
            .writer
            .run(move |state| {
                state.conn.execute(
                    "UPDATE export_job SET status = 'failed', error = ?2 WHERE id = ?1 AND status IN ('queued', 'running')",
                    params![id, error],
                )?;
                Ok(())
            })
            .await
    }

    async fn job_files(&self, id: &str) -> Result<Vec<FileRecord>, StoreError> {
        self.unit_files(id, i64::MIN..i64::MAX).await
    }

    async fn committed_units(&self, id: &str, units: Range<i64>) -> Result<Vec<i64>, StoreError> {
        let id = id.to_owned();
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT unit_no FROM export_unit
                 WHERE job_id = ?1 AND unit_no >= ?2 AND unit_no < ?3 AND status = 'done'
                 ORDER BY unit_no",
            )?;
            let done = stmt
                .query_map(params![id, units.start, units.end], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(done)
        })
        .await
    }

    async fn unit_files(&self, id: &str, units: Range<i64>) -> Result<Vec<FileRecord>, StoreError> {
        let id = id.to_owned();
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {FILE_COLUMNS} FROM export_file f
                 WHERE f.job_id = ?1 AND f.unit_no >= ?2 AND f.unit_no < ?3
                 ORDER BY f.kind, f.res_type, f.unit_no, f.part"
            ))?;
            let files = stmt
                .query_map(params![id, units.start, units.end], file_record)?
                .collect::<Result<_, _>>()?;
            Ok(files)
        })
        .await
    }

    async fn add_job_files(&self, files: Vec<FileRecord>) -> Result<(), StoreError> {
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                insert_files(&tx, &files)?;
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn file(&self, id: &str) -> Result<Option<(FileRecord, JobRecord)>, StoreError> {
        let id = id.to_owned();
        self.with_reader(move |conn| {
            let file = conn
                .prepare_cached(&format!(
                    "SELECT {FILE_COLUMNS} FROM export_file f WHERE f.id = ?1"
                ))?
                .query_row([&id], file_record)
                .optional()?;
            let Some(file) = file else { return Ok(None) };
            Ok(load_job(conn, &file.job_id)?.map(|job| (file, job)))
        })
        .await
    }

    async fn expired_jobs(&self, now: Micros, ttl: Micros) -> Result<Vec<String>, StoreError> {
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM export_job WHERE (expires_at IS NOT NULL AND expires_at < ?1)
                    OR (status IN ('cancelled', 'failed') AND created_at < ?2)",
            )?;
            let ids = stmt
                .query_map(params![now, now - ttl], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    async fn ready_jobs(&self) -> Result<Vec<String>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM export_job j WHERE status IN ('queued', 'running')
                   AND NOT EXISTS (SELECT 1 FROM export_unit u WHERE u.job_id = j.id AND u.status <> 'done')",
            )?;
            let ids = stmt.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    async fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.inner
            .writer
            .run(move |state| {
                state
                    .conn
                    .execute("DELETE FROM export_job WHERE id = ?1", [id])?;
                Ok(())
            })
            .await
    }

    async fn release_all_leases(&self) -> Result<u64, StoreError> {
        self.inner
            .writer
            .run(|state| {
                let released = state.conn.execute(
                    "UPDATE export_unit SET status = 'pending', lease_owner = NULL, lease_until = NULL
                     WHERE status = 'running'",
                    [],
                )?;
                Ok(released as u64)
            })
            .await
    }
}

fn insert_files(tx: &rusqlite::Transaction<'_>, files: &[FileRecord]) -> Result<(), StoreError> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO export_file (id, job_id, unit_no, part, res_type, kind, path, count, bytes, continues)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for f in files {
        insert.execute(params![
            f.id,
            f.job_id,
            f.unit_no,
            f.part,
            f.resource_type,
            f.kind,
            f.path,
            f.count as i64,
            f.bytes as i64,
            f.continues
        ])?;
    }
    Ok(())
}
