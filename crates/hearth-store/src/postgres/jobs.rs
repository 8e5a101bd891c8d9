//! [`JobStore`] and the export scan for PostgreSQL. Several Hearth processes share these rows:
//! units are claimed with `FOR UPDATE SKIP LOCKED`, and every write of a unit's results names
//! the claim (owner and attempt) it was made under.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use hearth_fhir::instant::{Micros, now_micros};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::PgStore;
use super::write::Clock;
use crate::error::StoreError;
use crate::jobs::{
    CancelOutcome, ClaimedUnit, FILE_COLUMNS, FileRecord, JOB_COLUMNS, JobRecord, JobStatus,
    JobStore, NewJob, PatientVersion, Route, ScanError, ScanRow, ScanSource, Snapshot, UnitCommit,
    UnitKind, UnitScope, block_order,
};
use crate::model::Seq;
use crate::patient_keys;

fn job_record(row: &PgRow) -> Result<JobRecord, sqlx::Error> {
    let status: &str = row.try_get(2)?;
    Ok(JobRecord {
        id: row.try_get(0)?,
        client: row.try_get(1)?,
        status: JobStatus::parse(status).unwrap_or(JobStatus::Failed),
        request: row.try_get(3)?,
        request_url: row.try_get(4)?,
        snapshot: Snapshot {
            seq: row.try_get(5)?,
            transaction_time: row.try_get(6)?,
        },
        created_at: row.try_get(7)?,
        started_at: row.try_get(8)?,
        completed_at: row.try_get(9)?,
        expires_at: row.try_get(10)?,
        polls: row.try_get::<i64, _>(11)? as u64,
        manifest_shown: row.try_get(12)?,
        estimated_resources: row.try_get::<i64, _>(13)? as u64,
        done_resources: row.try_get::<i64, _>(14)? as u64,
        units_total: row.try_get::<i64, _>(15)? as u64,
        units_done: row.try_get::<i64, _>(16)? as u64,
        manifest: row.try_get(17)?,
        error: row.try_get(18)?,
    })
}

fn file_record(row: &PgRow) -> Result<FileRecord, sqlx::Error> {
    Ok(FileRecord {
        id: row.try_get(0)?,
        job_id: row.try_get(1)?,
        unit_no: row.try_get(2)?,
        part: row.try_get(3)?,
        resource_type: row.try_get(4)?,
        kind: row.try_get(5)?,
        path: row.try_get(6)?,
        count: row.try_get::<i64, _>(7)? as u64,
        bytes: row.try_get::<i64, _>(8)? as u64,
        continues: row.try_get(9)?,
    })
}

async fn load_job(conn: &mut PgConnection, id: &str) -> Result<Option<JobRecord>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM export_job j WHERE j.id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(row.as_ref().map(job_record).transpose()?)
}

async fn insert_files(conn: &mut PgConnection, files: &[FileRecord]) -> Result<(), StoreError> {
    for f in files {
        sqlx::query(
            "INSERT INTO export_file (id, job_id, unit_no, part, res_type, kind, path, count, bytes, continues)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&f.id)
        .bind(&f.job_id)
        .bind(f.unit_no)
        .bind(f.part)
        .bind(&f.resource_type)
        .bind(&f.kind)
        .bind(&f.path)
        .bind(f.count as i64)
        .bind(f.bytes as i64)
        .bind(f.continues)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Rows per export page: each page is one short query, so no connection, snapshot or vacuum
/// horizon is held for a whole unit.
const SCAN_PAGE_ROWS: i64 = 20_000;

/// Bytes of rows read ahead of the worker that writes them: the query runs on while the worker
/// writes, but a slow disk holds back the reading, not the memory.
const SCAN_READ_AHEAD_BYTES: usize = 8 * 1024 * 1024;

/// A row on its way from the query to the worker. Columns 0–5 are seq, res_type, res_id,
/// last_updated, body, compartment_size.
struct ScannedRow {
    row: PgRow,
    /// The unit's patients the row was found through (`[0]` outside [`UnitScope::Patients`]).
    via_patients: Vec<i64>,
    /// For a tombstone found through several patients: the body of the version it ended.
    ended_body: Option<Vec<u8>>,
}

/// Rows travel in batches: one thread wake-up per batch rather than per row (per-row hand-offs
/// spent a fifth of the export's CPU in the scheduler).
struct ScannedBatch {
    rows: Vec<ScannedRow>,
    _budget: OwnedSemaphorePermit,
}

const BATCH_ROWS: usize = 256;
const BATCH_BYTES: usize = 1024 * 1024;

type BatchSender = mpsc::Sender<Result<ScannedBatch, StoreError>>;

/// Collects rows into batches and hands them to the worker within the read-ahead budget.
struct RowForwarder {
    sender: BatchSender,
    budget: Arc<Semaphore>,
    rows: Vec<ScannedRow>,
    bytes: usize,
}

impl RowForwarder {
    fn new(sender: BatchSender) -> Self {
        Self {
            sender,
            budget: Arc::new(Semaphore::new(SCAN_READ_AHEAD_BYTES)),
            rows: Vec::with_capacity(BATCH_ROWS),
            bytes: 0,
        }
    }

    /// False once the worker has stopped listening.
    async fn push(
        &mut self,
        row: PgRow,
        via_patients: Vec<i64>,
        ended_body: Option<Vec<u8>>,
    ) -> bool {
        self.bytes += row.try_get::<&[u8], _>(4).map_or(0, <[u8]>::len)
            + ended_body.as_ref().map_or(0, Vec::len);
        self.rows.push(ScannedRow {
            row,
            via_patients,
            ended_body,
        });
        if self.rows.len() >= BATCH_ROWS || self.bytes >= BATCH_BYTES {
            return self.flush().await;
        }
        true
    }

    async fn flush(&mut self) -> bool {
        if self.rows.is_empty() {
            return true;
        }
        let permits = self.bytes.clamp(1, SCAN_READ_AHEAD_BYTES) as u32;
        let Ok(permit) = Arc::clone(&self.budget).acquire_many_owned(permits).await else {
            return false;
        };
        self.bytes = 0;
        let rows = std::mem::replace(&mut self.rows, Vec::with_capacity(BATCH_ROWS));
        self.sender
            .send(Ok(ScannedBatch {
                rows,
                _budget: permit,
            }))
            .await
            .is_ok()
    }
}

/// The versions of type `$1` current (and not deleted) at seq `$2`.
const CURRENT_OF_TYPE: &str = "res_type = $1 AND seq <= $2
    AND (superseded_by IS NULL OR superseded_by > $2) AND NOT deleted";

impl PgStore {
    async fn produce(self, unit: ClaimedUnit, sender: BatchSender) {
        let mut forwarder = RowForwarder::new(sender.clone());
        let result = match &unit.scope {
            UnitScope::Patients(patients) => {
                self.produce_patients(&unit, patients, &mut forwarder).await
            }
            UnitScope::PatientBlocks(patients) => {
                self.produce_blocks(&unit, patients, &mut forwarder).await
            }
            UnitScope::All | UnitScope::Compartment | UnitScope::Outside => {
                self.produce_range(&unit, &mut forwarder).await
            }
        };
        match result {
            Ok(()) => {
                forwarder.flush().await;
            }
            Err(e) => {
                let _ = sender.send(Err(e)).await;
            }
        }
    }

    async fn produce_range(
        &self,
        unit: &ClaimedUnit,
        forwarder: &mut RowForwarder,
    ) -> Result<(), StoreError> {
        let deleted = matches!(unit.kind, UnitKind::Deleted);
        let upto = unit.seq_upto.min(unit.snapshot_seq);
        let compartment = unit.scope.compartment_condition();
        let sql = format!(
            "SELECT seq, res_type, res_id, last_updated, body, compartment_size FROM resource_version
             WHERE res_type = $1 AND seq > $2 AND seq <= $3
               AND (superseded_by IS NULL OR superseded_by > $4) AND deleted = $5{compartment}
             ORDER BY seq LIMIT $6"
        );
        let mut after = unit.seq_after;
        loop {
            let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(&unit.resource_type)
                .bind(after)
                .bind(upto)
                .bind(unit.snapshot_seq)
                .bind(deleted)
                .bind(SCAN_PAGE_ROWS)
                .fetch(&self.pool);
            let mut in_page = 0;
            while let Some(row) = rows.try_next().await? {
                in_page += 1;
                after = row.try_get(0)?;
                if !forwarder.push(row, vec![0], None).await {
                    return Ok(());
                }
            }
            if in_page < SCAN_PAGE_ROWS {
                return Ok(());
            }
        }
    }

    /// Which of these patients' compartments hold which rows in `(after, upto]`, by sequence.
    async fn compartment_routes(
        &self,
        keys: &[i64],
        after: Seq,
        upto: Seq,
    ) -> Result<Vec<Route>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT seq, patient_key FROM compartment_member
             WHERE patient_key = ANY($1) AND seq > $2 AND seq <= $3 ORDER BY seq, patient_key",
        )
        .bind(keys)
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The rows of a batch of patients' compartments, in change-sequence order, each with the
    /// unit's patients it was found through.
    async fn produce_patients(
        &self,
        unit: &ClaimedUnit,
        patients: &[String],
        forwarder: &mut RowForwarder,
    ) -> Result<(), StoreError> {
        let upto = unit.seq_upto.min(unit.snapshot_seq);
        let keys = patient_keys(patients);
        let routes = self.compartment_routes(&keys, unit.seq_after, upto).await?;
        let types: Vec<&str> = unit.resource_type.split(',').collect();
        let deleted = matches!(unit.kind, UnitKind::Deleted);
        let by_seq: Vec<&[(Seq, i64)]> = routes.chunk_by(|a, b| a.0 == b.0).collect();
        for chunk in by_seq.chunks(2_000) {
            let seqs: Vec<Seq> = chunk.iter().map(|same_seq| same_seq[0].0).collect();
            // Rows of other types stay in the database rather than crossing the wire.
            let mut rows = sqlx::query(
                "SELECT seq, res_type, res_id, last_updated, body, compartment_size, version
                 FROM resource_version
                 WHERE seq = ANY($1) AND (superseded_by IS NULL OR superseded_by > $2) AND deleted = $3
                   AND res_type = ANY($4)
                 ORDER BY seq",
            )
            .bind(&seqs)
            .bind(unit.snapshot_seq)
            .bind(deleted)
            .bind(&types)
            .fetch(&self.pool);
            let mut pending = chunk.iter();
            while let Some(row) = rows.try_next().await? {
                let seq: Seq = row.try_get(0)?;
                let Some(same_seq) = pending.by_ref().find(|r| r[0].0 == seq) else {
                    break;
                };
                let resource_type: &str = row.try_get(1)?;
                if !types.contains(&resource_type) {
                    continue;
                }
                let ended_body = self.ended_body(&row, deleted).await?;
                let via = same_seq.iter().map(|&(_, patient)| patient).collect();
                if !forwarder.push(row, via, ended_body).await {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A tombstone found through several patients is told apart by the compartment of the
    /// version it ended, whose body the worker reads in place of the empty one. `row` has the
    /// columns of a patients scan (version seventh).
    async fn ended_body(&self, row: &PgRow, deleted: bool) -> Result<Option<Vec<u8>>, StoreError> {
        let compartment_size: i32 = row.try_get(5)?;
        if !deleted || compartment_size <= 1 {
            return Ok(None);
        }
        let resource_type: &str = row.try_get(1)?;
        let id: &str = row.try_get(2)?;
        let version: i64 = row.try_get(6)?;
        Ok(Some(
            super::read::version(&self.pool, resource_type, id, (version - 1) as u64)
                .await?
                .map(|v| v.body)
                .unwrap_or_default(),
        ))
    }

    /// The rows of a batch of patients' compartments in block order (see
    /// [`ScanSource::scan_unit`]): each route (row and patient) on its own, so a row shared by
    /// several of the patients comes once in each of their blocks.
    async fn produce_blocks(
        &self,
        unit: &ClaimedUnit,
        patients: &[String],
        forwarder: &mut RowForwarder,
    ) -> Result<(), StoreError> {
        let upto = unit.seq_upto.min(unit.snapshot_seq);
        let keys = patient_keys(patients);
        let mut routes = self.compartment_routes(&keys, unit.seq_after, upto).await?;
        // A Patient's key is its own id key: the id index finds its versions.
        let own: Vec<PatientVersion> = sqlx::query_as(
            "SELECT id_key, seq FROM resource_version
             WHERE id_key = ANY($1) AND seq > $2 AND seq <= $3",
        )
        .bind(&keys)
        .bind(unit.seq_after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        block_order(&mut routes, &keys, &own);
        let types: Vec<&str> = unit.resource_type.split(',').collect();
        let deleted = matches!(unit.kind, UnitKind::Deleted);
        for chunk in routes.chunks(2_000) {
            let seqs: Vec<Seq> = chunk.iter().map(|&(seq, _)| seq).collect();
            // The rows in the order asked for: a join along the array's ordinality.
            let mut rows = sqlx::query(
                "SELECT rv.seq, rv.res_type, rv.res_id, rv.last_updated, rv.body,
                        rv.compartment_size, rv.version
                 FROM UNNEST($1::BIGINT[]) WITH ORDINALITY AS r(seq, ord)
                 JOIN resource_version rv ON rv.seq = r.seq
                 WHERE (rv.superseded_by IS NULL OR rv.superseded_by > $2) AND rv.deleted = $3
                 ORDER BY r.ord",
            )
            .bind(&seqs)
            .bind(unit.snapshot_seq)
            .bind(deleted)
            .fetch(&self.pool);
            let mut pending = chunk.iter();
            while let Some(row) = rows.try_next().await? {
                let seq: Seq = row.try_get(0)?;
                let Some(&(_, patient)) = pending.by_ref().find(|r| r.0 == seq) else {
                    break;
                };
                let resource_type: &str = row.try_get(1)?;
                if !types.contains(&resource_type) {
                    continue;
                }
                let ended_body = self.ended_body(&row, deleted).await?;
                if !forwarder.push(row, vec![patient], ended_body).await {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn consume(
    scanned: &ScannedRow,
    each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
) -> Result<bool, ScanError> {
    let row = &scanned.row;
    for &via_patient in &scanned.via_patients {
        let body = match &scanned.ended_body {
            Some(body) => body.as_slice(),
            None => row.try_get(4).map_err(StoreError::from)?,
        };
        let keep_going = each(ScanRow {
            seq: row.try_get(0).map_err(StoreError::from)?,
            resource_type: row.try_get(1).map_err(StoreError::from)?,
            id: row.try_get(2).map_err(StoreError::from)?,
            last_updated: row.try_get(3).map_err(StoreError::from)?,
            body,
            compartment_size: row.try_get::<i32, _>(5).map_err(StoreError::from)?.into(),
            via_patient,
        })?;
        if !keep_going {
            return Ok(false);
        }
    }
    Ok(true)
}

impl ScanSource for PgStore {
    fn scan_unit(
        &self,
        unit: &ClaimedUnit,
        each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
    ) -> Result<(), ScanError> {
        // The query runs on the runtime and `each` on this (worker) thread, which may itself
        // call into the runtime between rows (lease renewal, cancel checks).
        let (sender, mut receiver) = mpsc::channel(64);
        let producer = self
            .runtime
            .spawn(self.clone().produce(unit.clone(), sender));
        let mut result = Ok(());
        'batches: while let Some(item) = receiver.blocking_recv() {
            let batch = match item {
                Ok(batch) => batch,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            for row in &batch.rows {
                match consume(row, each) {
                    Ok(true) => {}
                    Ok(false) => break 'batches,
                    Err(e) => {
                        result = Err(e);
                        break 'batches;
                    }
                }
            }
        }
        // Closing the channel stops the producer at its next row.
        drop(receiver);
        producer.abort();
        result
    }
}

#[async_trait]
impl JobStore for PgStore {
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // Taking the clock row waits for a writer in flight to commit: everything up to the
        // returned seq is visible, and the next write is stamped later.
        let mut tx = self.pool.begin().await?;
        let mut clock = Clock::lock(&mut tx).await?;
        clock.last_updated = now_micros().max(clock.last_updated);
        clock.store(&mut tx).await?;
        tx.commit().await?;
        Ok(Snapshot {
            seq: clock.next_seq - 1,
            transaction_time: clock.last_updated,
        })
    }

    async fn type_range(
        &self,
        resource_type: &str,
        after: Seq,
        upto: Seq,
    ) -> Result<(u64, Seq, Seq), StoreError> {
        let (count, first, last): (i64, Seq, Seq) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM resource_version
             WHERE res_type = $1 AND seq > $2 AND seq <= $3",
        )
        .bind(resource_type)
        .bind(after)
        .bind(upto)
        .fetch_one(&self.pool)
        .await?;
        Ok((count as u64, first, last))
    }

    async fn compartment_rows(
        &self,
        patients: &[String],
        after: Seq,
        upto: Seq,
    ) -> Result<u64, StoreError> {
        let keys = patient_keys(patients);
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM compartment_member WHERE patient_key = ANY($1) AND seq > $2 AND seq <= $3",
        )
        .bind(&keys)
        .bind(after)
        .bind(upto)
        .fetch_one(&self.pool)
        .await?;
        Ok(count as u64)
    }

    async fn current_ids(&self, resource_type: &str, upto: Seq) -> Result<Vec<String>, StoreError> {
        let ids = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT res_id FROM resource_version WHERE {CURRENT_OF_TYPE} ORDER BY seq"
        )))
        .bind(resource_type)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    async fn current_keys(&self, resource_type: &str, upto: Seq) -> Result<Vec<i64>, StoreError> {
        let keys = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id_key FROM resource_version WHERE {CURRENT_OF_TYPE} ORDER BY id_key"
        )))
        .bind(resource_type)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        Ok(keys)
    }

    async fn types_present(&self, after: Seq, upto: Seq) -> Result<Vec<String>, StoreError> {
        // A skip scan over the (res_type, seq) index: one probe per distinct type.
        let types = sqlx::query_scalar(
            "WITH RECURSIVE present(res_type) AS (
                 (SELECT res_type FROM resource_version ORDER BY res_type LIMIT 1)
                 UNION ALL
                 SELECT (SELECT r.res_type FROM resource_version r WHERE r.res_type > p.res_type
                         ORDER BY r.res_type LIMIT 1)
                 FROM present p WHERE p.res_type IS NOT NULL)
             SELECT p.res_type FROM present p
             WHERE p.res_type IS NOT NULL AND EXISTS (
                 SELECT 1 FROM resource_version r WHERE r.res_type = p.res_type AND r.seq > $1 AND r.seq <= $2)
             ORDER BY p.res_type",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        Ok(types)
    }

    async fn insert_job(&self, job: NewJob) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO export_job (id, client, status, request, request_url, snapshot_seq,
                transaction_time, created_at, estimated_resources)
             VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8)",
        )
        .bind(&job.id)
        .bind(&job.client)
        .bind(&job.request)
        .bind(&job.request_url)
        .bind(job.snapshot.seq)
        .bind(job.snapshot.transaction_time)
        .bind(job.created_at)
        .bind(job.estimated_resources as i64)
        .execute(&mut *tx)
        .await?;
        let mut columns: (
            Vec<i64>,
            Vec<String>,
            Vec<&str>,
            Vec<Seq>,
            Vec<Seq>,
            Vec<&str>,
        ) = Default::default();
        let mut patients: Vec<Option<String>> = Vec::new();
        for (unit_no, unit) in job.units.iter().enumerate() {
            columns.0.push(unit_no as i64);
            columns.1.push(unit.resource_type.clone());
            columns.2.push(unit.kind.as_str());
            columns.3.push(unit.seq_after);
            columns.4.push(unit.seq_upto);
            columns.5.push(unit.scope.as_str());
            patients.push(unit.scope.stored_patients()?);
        }
        sqlx::query(
            "INSERT INTO export_unit (job_id, unit_no, res_type, kind, seq_after, seq_upto, scope, patients)
             SELECT $1, * FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[],
                                      $7::TEXT[], $8::TEXT[])",
        )
        .bind(&job.id)
        .bind(&columns.0)
        .bind(&columns.1)
        .bind(&columns.2)
        .bind(&columns.3)
        .bind(&columns.4)
        .bind(&columns.5)
        .bind(&patients)
        .execute(&mut *tx)
        .await?;
        insert_files(&mut tx, &job.files).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        load_job(&mut conn, id).await
    }

    async fn record_poll(&self, id: &str, manifest_shown: bool) -> Result<u64, StoreError> {
        let after: Option<i64> = sqlx::query_scalar(
            "UPDATE export_job SET polls = polls + 1, manifest_shown = manifest_shown OR $2
             WHERE id = $1 RETURNING polls",
        )
        .bind(id)
        .bind(manifest_shown)
        .fetch_optional(&self.pool)
        .await?;
        Ok(after.map_or(0, |polls| polls as u64 - 1))
    }

    async fn active_jobs(&self, client: &str) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM export_job WHERE client = $1 AND status IN ('queued', 'running')",
        )
        .bind(client)
        .fetch_one(&self.pool)
        .await?;
        Ok(count as u64)
    }

    async fn cancel_job(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, bool)> = sqlx::query_as(
            "SELECT status, manifest_shown FROM export_job WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match found {
            None => CancelOutcome::NotFound,
            Some((status, _)) if status == JobStatus::Cancelled.as_str() => CancelOutcome::NotFound,
            Some((_, true)) => {
                sqlx::query("DELETE FROM export_job WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                CancelOutcome::AlreadyFinished
            }
            Some(_) => {
                sqlx::query(
                    "UPDATE export_job SET status = 'cancelled', manifest = NULL WHERE id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM export_file WHERE job_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                CancelOutcome::Cancelled
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn claim_unit(
        &self,
        owner: &str,
        lease_until: Micros,
        now: Micros,
    ) -> Result<Option<ClaimedUnit>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: instances claiming at the same moment take different units instead of
        // queueing behind one another.
        let row = sqlx::query(
            "WITH candidate AS (
                 SELECT u.job_id, u.unit_no FROM export_unit u JOIN export_job j ON j.id = u.job_id
                 WHERE u.status <> 'done' AND j.status IN ('queued', 'running')
                   AND (u.status = 'pending' OR u.lease_until < $1)
                   AND (u.kind <> 'provenance' OR NOT EXISTS (
                        SELECT 1 FROM export_unit o
                        WHERE o.job_id = u.job_id AND o.kind <> 'provenance' AND o.status <> 'done'))
                 ORDER BY j.created_at, u.unit_no
                 LIMIT 1
                 FOR UPDATE OF u SKIP LOCKED)
             UPDATE export_unit u SET status = 'running', lease_owner = $2, lease_until = $3,
                    attempt = u.attempt + 1
             FROM candidate c, export_job j
             WHERE u.job_id = c.job_id AND u.unit_no = c.unit_no AND j.id = u.job_id
             RETURNING u.job_id, u.unit_no, u.res_type, u.kind, u.seq_after, u.seq_upto,
                       j.snapshot_seq, j.request, u.attempt, u.scope, u.patients",
        )
        .bind(now)
        .bind(owner)
        .bind(lease_until)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: &str = row.try_get(3)?;
        let scope: &str = row.try_get(9)?;
        let patients: Option<String> = row.try_get(10)?;
        let scope = UnitScope::from_stored(scope, patients.as_deref());
        let unit = ClaimedUnit {
            job_id: row.try_get(0)?,
            unit_no: row.try_get(1)?,
            resource_type: row.try_get(2)?,
            kind: UnitKind::parse(kind).unwrap_or(UnitKind::Output),
            scope,
            seq_after: row.try_get(4)?,
            seq_upto: row.try_get(5)?,
            snapshot_seq: row.try_get(6)?,
            request: row.try_get(7)?,
            attempt: row.try_get(8)?,
            owner: owner.to_owned(),
        };
        sqlx::query(
            "UPDATE export_job SET status = 'running', started_at = $2 WHERE id = $1 AND status = 'queued'",
        )
        .bind(&unit.job_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(unit))
    }

    async fn renew_lease(
        &self,
        unit: &ClaimedUnit,
        lease_until: Micros,
    ) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "UPDATE export_unit SET lease_until = $5
             WHERE job_id = $1 AND unit_no = $2 AND lease_owner = $3 AND attempt = $4 AND status = 'running'
               AND EXISTS (SELECT 1 FROM export_job WHERE id = $1 AND status = 'running')",
        )
        .bind(&unit.job_id)
        .bind(unit.unit_no)
        .bind(&unit.owner)
        .bind(unit.attempt)
        .bind(lease_until)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    async fn commit_unit(
        &self,
        unit: &ClaimedUnit,
        files: Vec<FileRecord>,
        resources: u64,
    ) -> Result<UnitCommit, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Locking the job row orders commits of one job's units, so exactly one of them sees
        // that it was the last.
        let running: Option<String> =
            sqlx::query_scalar("SELECT status FROM export_job WHERE id = $1 FOR UPDATE")
                .bind(&unit.job_id)
                .fetch_optional(&mut *tx)
                .await?;
        if running.as_deref() != Some(JobStatus::Running.as_str()) {
            return Ok(UnitCommit::Fenced);
        }
        let fenced = sqlx::query(
            "UPDATE export_unit SET status = 'done', resources = $5, lease_owner = NULL
             WHERE job_id = $1 AND unit_no = $2 AND lease_owner = $3 AND attempt = $4 AND status = 'running'",
        )
        .bind(&unit.job_id)
        .bind(unit.unit_no)
        .bind(&unit.owner)
        .bind(unit.attempt)
        .bind(resources as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 0;
        if fenced {
            return Ok(UnitCommit::Fenced);
        }
        insert_files(&mut tx, &files).await?;
        sqlx::query("UPDATE export_job SET done_resources = done_resources + $2 WHERE id = $1")
            .bind(&unit.job_id)
            .bind(resources as i64)
            .execute(&mut *tx)
            .await?;
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM export_unit WHERE job_id = $1 AND status <> 'done'",
        )
        .bind(&unit.job_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if open == 0 {
            UnitCommit::JobReady
        } else {
            UnitCommit::Committed
        })
    }

    async fn complete_job(
        &self,
        id: &str,
        manifest: String,
        completed_at: Micros,
        expires_at: Micros,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE export_job SET status = 'completed', manifest = $2, completed_at = $3, expires_at = $4
             WHERE id = $1 AND status IN ('queued', 'running')",
        )
        .bind(id)
        .bind(manifest)
        .bind(completed_at)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn fail_job(&self, id: &str, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE export_job SET status = 'failed', error = $2 WHERE id = $1 AND status IN ('queued', 'running')",
        )
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn job_files(&self, id: &str) -> Result<Vec<FileRecord>, StoreError> {
        self.unit_files(id, i64::MIN..i64::MAX).await
    }

    async fn committed_units(&self, id: &str, units: Range<i64>) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT unit_no FROM export_unit
             WHERE job_id = $1 AND unit_no >= $2 AND unit_no < $3 AND status = 'done'
             ORDER BY unit_no",
        )
        .bind(id)
        .bind(units.start)
        .bind(units.end)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn unit_files(&self, id: &str, units: Range<i64>) -> Result<Vec<FileRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {FILE_COLUMNS} FROM export_file f
             WHERE f.job_id = $1 AND f.unit_no >= $2 AND f.unit_no < $3
             ORDER BY f.kind, f.res_type, f.unit_no, f.part"
        )))
        .bind(id)
        .bind(units.start)
        .bind(units.end)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(file_record).collect::<Result<_, _>>()?)
    }

    async fn add_job_files(&self, files: Vec<FileRecord>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_files(&mut tx, &files).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn file(&self, id: &str) -> Result<Option<(FileRecord, JobRecord)>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {FILE_COLUMNS} FROM export_file f WHERE f.id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(file) = row.as_ref().map(file_record).transpose()? else {
            return Ok(None);
        };
        Ok(load_job(&mut conn, &file.job_id)
            .await?
            .map(|job| (file, job)))
    }

    async fn expired_jobs(&self, now: Micros, ttl: Micros) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM export_job WHERE (expires_at IS NOT NULL AND expires_at < $1)
                OR (status IN ('cancelled', 'failed') AND created_at < $2)",
        )
        .bind(now)
        .bind(now - ttl)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn ready_jobs(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM export_job j WHERE status IN ('queued', 'running')
               AND NOT EXISTS (SELECT 1 FROM export_unit u WHERE u.job_id = j.id AND u.status <> 'done')",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM export_job WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_all_leases(&self) -> Result<u64, StoreError> {
        // Other processes may hold live leases on this database: leases of a dead process
        // simply expire and are claimed again.
        Ok(0)
    }
}
