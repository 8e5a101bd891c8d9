//! [`JobStore`] and the export scan for PostgreSQL. Several Hearth processes share these rows:
//! units are claimed with `FOR UPDATE SKIP LOCKED`, and every write of a unit's results names
//! the claim (owner and attempt) it was made under.

use async_trait::async_trait;
use futures::TryStreamExt;
use hearth_fhir::instant::{Micros, now_micros};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::PgStore;
use super::write::Clock;
use crate::error::StoreError;
use crate::jobs::{
    CancelOutcome, ClaimedUnit, FileRecord, JobRecord, JobStatus, JobStore, NewJob, ScanError,
    ScanRow, ScanSource, Snapshot, UnitCommit, UnitKind, UnitScope,
};
use crate::model::Seq;
use crate::resource_key;

const JOB_COLUMNS: &str = "j.id, j.client, j.status, j.request, j.request_url, j.snapshot_seq,
    j.transaction_time, j.created_at, j.started_at, j.completed_at, j.expires_at, j.polls,
    j.manifest_shown, j.estimated_resources, j.done_resources,
    (SELECT COUNT(*) FROM export_unit u WHERE u.job_id = j.id),
    (SELECT COUNT(*) FROM export_unit u WHERE u.job_id = j.id AND u.status = 'done'),
    j.manifest, j.error";

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

const FILE_COLUMNS: &str =
    "f.id, f.job_id, f.unit_no, f.part, f.res_type, f.kind, f.path, f.count, f.bytes";

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
            "INSERT INTO export_file (id, job_id, unit_no, part, res_type, kind, path, count, bytes)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Rows per export page: each page is one short query, so no connection, snapshot or vacuum
/// horizon is held for a whole unit.
const SCAN_PAGE_ROWS: i64 = 20_000;

impl PgStore {
    async fn scan(
        &self,
        unit: &ClaimedUnit,
        each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
    ) -> Result<(), ScanError> {
        let deleted = matches!(unit.kind, UnitKind::Deleted);
        let upto = unit.seq_upto.min(unit.snapshot_seq);
        let compartment = match &unit.scope {
            UnitScope::All => "",
            UnitScope::Compartment => " AND compartment_size > 0",
            UnitScope::Patients(patients) => return self.scan_patients(unit, patients, each).await,
        };
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
            while let Some(row) = rows.try_next().await.map_err(StoreError::from)? {
                in_page += 1;
                let scanned = ScanRow {
                    seq: row.try_get(0).map_err(StoreError::from)?,
                    resource_type: row.try_get(1).map_err(StoreError::from)?,
                    id: row.try_get(2).map_err(StoreError::from)?,
                    last_updated: row.try_get(3).map_err(StoreError::from)?,
                    body: row.try_get(4).map_err(StoreError::from)?,
                    compartment_size: row.try_get::<i32, _>(5).map_err(StoreError::from)?.into(),
                    via_patient: 0,
                };
                after = scanned.seq;
                if !each(scanned)? {
                    return Ok(());
                }
            }
            if in_page < SCAN_PAGE_ROWS {
                return Ok(());
            }
        }
    }

    /// The rows of a batch of patients' compartments, in change-sequence order; a row in
    /// several of the patients' compartments comes once per patient.
    async fn scan_patients(
        &self,
        unit: &ClaimedUnit,
        patients: &[String],
        each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
    ) -> Result<(), ScanError> {
        let upto = unit.seq_upto.min(unit.snapshot_seq);
        let keys: Vec<i64> = patients
            .iter()
            .map(|p| resource_key("Patient", p))
            .collect();
        let routes: Vec<(Seq, i64)> = sqlx::query_as(
            "SELECT seq, patient_key FROM compartment_member
             WHERE patient_key = ANY($1) AND seq > $2 AND seq <= $3 ORDER BY seq, patient_key",
        )
        .bind(&keys)
        .bind(unit.seq_after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        let types: Vec<&str> = unit.resource_type.split(',').collect();
        let deleted = matches!(unit.kind, UnitKind::Deleted);
        for chunk in routes
            .chunk_by(|a, b| a.0 == b.0)
            .collect::<Vec<_>>()
            .chunks(2_000)
        {
            let seqs: Vec<Seq> = chunk.iter().map(|same_seq| same_seq[0].0).collect();
            let mut rows = sqlx::query(
                "SELECT seq, res_type, res_id, last_updated, body, compartment_size, version
                 FROM resource_version
                 WHERE seq = ANY($1) AND (superseded_by IS NULL OR superseded_by > $2) AND deleted = $3
                 ORDER BY seq",
            )
            .bind(&seqs)
            .bind(unit.snapshot_seq)
            .bind(deleted)
            .fetch(&self.pool);
            let mut pending = chunk.iter();
            while let Some(row) = rows.try_next().await.map_err(StoreError::from)? {
                let seq: Seq = row.try_get(0).map_err(StoreError::from)?;
                let Some(same_seq) = pending.by_ref().find(|r| r[0].0 == seq) else {
                    break;
                };
                let resource_type: &str = row.try_get(1).map_err(StoreError::from)?;
                if !types.contains(&resource_type) {
                    continue;
                }
                let id: &str = row.try_get(2).map_err(StoreError::from)?;
                let compartment_size: i64 =
                    row.try_get::<i32, _>(5).map_err(StoreError::from)?.into();
                // A tombstone found through several patients is told apart by the compartment
                // of the version it ended, whose body the worker reads in place of the empty one.
                let ended;
                let body: &[u8] = if deleted && compartment_size > 1 {
                    let version: i64 = row.try_get(6).map_err(StoreError::from)?;
                    ended =
                        super::read::version(&self.pool, resource_type, id, (version - 1) as u64)
                            .await?
                            .map(|v| v.body)
                            .unwrap_or_default();
                    &ended
                } else {
                    row.try_get(4).map_err(StoreError::from)?
                };
                let last_updated: Micros = row.try_get(3).map_err(StoreError::from)?;
                for &(_, via_patient) in same_seq.iter() {
                    let scanned = ScanRow {
                        seq,
                        resource_type,
                        id,
                        last_updated,
                        body,
                        compartment_size,
                        via_patient,
                    };
                    if !each(scanned)? {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

impl ScanSource for PgStore {
    fn scan_unit(
        &self,
        unit: &ClaimedUnit,
        each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
    ) -> Result<(), ScanError> {
        // Export workers are plain threads: they drive the query on the store's runtime and
        // write files between rows.
        self.runtime.block_on(self.scan(unit, each))
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
        let keys: Vec<i64> = patients
            .iter()
            .map(|p| resource_key("Patient", p))
            .collect();
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
            patients.push(match &unit.scope {
                UnitScope::Patients(ids) => Some(
                    serde_json::to_string(ids).map_err(|e| StoreError::Internal(e.to_string()))?,
                ),
                _ => None,
            });
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
        let scope = match scope {
            "compartment" => UnitScope::Compartment,
            "patients" => UnitScope::Patients(
                patients
                    .and_then(|p| serde_json::from_str(&p).ok())
                    .unwrap_or_default(),
            ),
            _ => UnitScope::All,
        };
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {FILE_COLUMNS} FROM export_file f WHERE f.job_id = $1
             ORDER BY f.kind, f.res_type, f.unit_no, f.part"
        )))
        .bind(id)
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
