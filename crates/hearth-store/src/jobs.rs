//! Durable export jobs: the rows that let any worker (of any Hearth process) pick up work, and
//! let a restarted server finish what a killed one started.
//!
//! A job is planned into **units** (one resource type × one change-sequence range, for output or
//! for deletions). Workers claim units with a lease, stream them into files, and commit the
//! files and counts with a fenced write: a commit only counts if the claim (owner and attempt)
//! is still the current one, so a paused or dead worker can never overwrite a newer attempt.

use std::ops::Range;

use async_trait::async_trait;
use hearth_fhir::instant::Micros;

use crate::error::StoreError;

/// The columns of a [`JobRecord`] from `export_job j`, in its field order (both backends).
pub(crate) const JOB_COLUMNS: &str =
    "j.id, j.client, j.status, j.request, j.request_url, j.snapshot_seq,
    j.transaction_time, j.created_at, j.started_at, j.completed_at, j.expires_at, j.polls,
    j.manifest_shown, j.estimated_resources, j.done_resources,
    (SELECT COUNT(*) FROM export_unit u WHERE u.job_id = j.id),
    (SELECT COUNT(*) FROM export_unit u WHERE u.job_id = j.id AND u.status = 'done'),
    j.manifest, j.error";

/// The columns of a [`FileRecord`] from `export_file f`, in its field order (both backends).
pub(crate) const FILE_COLUMNS: &str =
    "f.id, f.job_id, f.unit_no, f.part, f.res_type, f.kind, f.path, f.count, f.bytes, f.continues";
use crate::model::Seq;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Planned; no unit has started yet.
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// Work may still happen.
    pub fn is_unfinished(self) -> bool {
        matches!(self, Self::Queued | Self::Running)
    }
}

/// The moment an export reads: everything up to `seq`, stamped `transaction_time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: Seq,
    /// Later than the `lastUpdated` of every version up to `seq`, and earlier than that of
    /// every later version (the writer's clock is moved past it).
    pub transaction_time: Micros,
}

/// What a unit produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// Current resources.
    Output,
    /// Resources deleted in the window, as transaction Bundles of DELETE entries.
    Deleted,
    /// The Provenance of the exported resources: runs once every other unit of its job is
    /// done, over the Provenance resources of its range.
    Provenance,
}

impl UnitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::Deleted => "deleted",
            Self::Provenance => "provenance",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "output" => Some(Self::Output),
            "deleted" => Some(Self::Deleted),
            "provenance" => Some(Self::Provenance),
            _ => None,
        }
    }
}

/// Which resources of a unit's range are in the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitScope {
    /// Every resource of the type (system export).
    All,
    /// Those in some patient's compartment (`Patient/$export`).
    Compartment,
    /// Those in the compartment of one of these patients (Group export, `patient`); the unit's
    /// `resource_type` is then a comma-separated list of types.
    Patients(Vec<String>),
    /// As [`UnitScope::Patients`], scanned patient by patient for output organized in blocks
    /// (`organizeOutputBy=Patient`): see [`ScanSource::scan_unit`] for the order.
    PatientBlocks(Vec<String>),
    /// Those in no patient's compartment.
    Outside,
}

impl UnitScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Compartment => "compartment",
            Self::Patients(_) => "patients",
            Self::PatientBlocks(_) => "patient-blocks",
            Self::Outside => "outside",
        }
    }

    /// The patients of a [`UnitScope::Patients`] or [`UnitScope::PatientBlocks`] unit.
    pub fn patients(&self) -> Option<&[String]> {
        match self {
            Self::Patients(ids) | Self::PatientBlocks(ids) => Some(ids),
            Self::All | Self::Compartment | Self::Outside => None,
        }
    }

    /// Rebuilds a scope from its stored name and patient list (JSON); unknown names read as
    /// [`UnitScope::All`].
    pub(crate) fn from_stored(name: &str, patients: Option<&str>) -> Self {
        let ids = || {
            patients
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or_default()
        };
        match name {
            "compartment" => Self::Compartment,
            "outside" => Self::Outside,
            "patients" => Self::Patients(ids()),
            "patient-blocks" => Self::PatientBlocks(ids()),
            _ => Self::All,
        }
    }

    /// The SQL condition on `compartment_size` of a range scope (empty for none).
    pub(crate) fn compartment_condition(&self) -> &'static str {
        match self {
            Self::Compartment => " AND compartment_size > 0",
            Self::Outside => " AND compartment_size = 0",
            Self::All | Self::Patients(_) | Self::PatientBlocks(_) => "",
        }
    }

    /// The patient list as stored beside the scope's name.
    pub(crate) fn stored_patients(&self) -> Result<Option<String>, StoreError> {
        self.patients()
            .map(|ids| serde_json::to_string(ids).map_err(|e| StoreError::Internal(e.to_string())))
            .transpose()
    }
}

/// A new job with its planned units.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub client: String,
    /// The engine's own description of the request (opaque to the store).
    pub request: String,
    pub request_url: String,
    pub snapshot: Snapshot,
    pub created_at: Micros,
    pub estimated_resources: u64,
    pub units: Vec<UnitPlan>,
    /// Files that belong to the job from the start (reports of ignored parameters).
    pub files: Vec<FileRecord>,
}

#[derive(Debug, Clone)]
pub struct UnitPlan {
    pub resource_type: String,
    pub kind: UnitKind,
    pub scope: UnitScope,
    /// Exclusive.
    pub seq_after: Seq,
    /// Inclusive.
    pub seq_upto: Seq,
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    pub client: String,
    pub status: JobStatus,
    pub request: String,
    pub request_url: String,
    pub snapshot: Snapshot,
    pub created_at: Micros,
    pub started_at: Option<Micros>,
    pub completed_at: Option<Micros>,
    pub expires_at: Option<Micros>,
    /// How many status requests have been answered.
    pub polls: u64,
    /// A status request has answered `200` with the manifest.
    pub manifest_shown: bool,
    pub estimated_resources: u64,
    pub done_resources: u64,
    pub units_total: u64,
    pub units_done: u64,
    pub manifest: Option<String>,
    pub error: Option<String>,
}

/// A unit a worker holds.
#[derive(Debug, Clone)]
pub struct ClaimedUnit {
    pub job_id: String,
    pub unit_no: i64,
    pub resource_type: String,
    pub kind: UnitKind,
    pub scope: UnitScope,
    pub seq_after: Seq,
    pub seq_upto: Seq,
    /// The job's snapshot sequence number.
    pub snapshot_seq: Seq,
    pub request: String,
    pub attempt: i64,
    pub owner: String,
}

/// The unit number of files that belong to a job as a whole rather than to one of its units.
pub const JOB_LEVEL_UNIT: i64 = -1;

/// A finished file of a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub id: String,
    pub job_id: String,
    pub unit_no: i64,
    pub part: i64,
    pub resource_type: String,
    /// `output`, `deleted` or `error`.
    pub kind: String,
    /// Relative to the export directory.
    pub path: String,
    pub count: u64,
    pub bytes: u64,
    /// The file ends inside a block that the unit's next part continues (organized output).
    pub continues: bool,
}

/// What committing a unit led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitCommit {
    /// Committed; other units are still open.
    Committed,
    /// Committed, and it was the job's last open unit.
    JobReady,
    /// The claim is no longer current (lease lost, job cancelled or gone): the worker must
    /// discard its files.
    Fenced,
}

/// The answer to a DELETE on a job's status URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued or running, or done but its manifest never shown: now cancelled.
    Cancelled,
    /// The client had already received the manifest: the job is removed.
    AlreadyFinished,
    /// No such job (or already cancelled, expired, removed).
    NotFound,
}

/// One row of an export scan.
pub struct ScanRow<'a> {
    pub seq: Seq,
    pub resource_type: &'a str,
    pub id: &'a str,
    /// How many patients' compartments hold the version.
    pub compartment_size: i64,
    /// For [`UnitScope::Patients`] and [`UnitScope::PatientBlocks`]: the key of the unit's
    /// patient this row was found through (a row in several of the unit's patients'
    /// compartments comes once per patient).
    pub via_patient: i64,
    pub last_updated: Micros,
    /// The stored resource (empty for a deletion).
    pub body: &'a [u8],
}

/// Why a scan stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The row consumer failed (writing the export file).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A row of a patients scan as the compartment index has it: `(seq, patient key)`.
pub(crate) type Route = (Seq, i64);

/// A version of a Patient resource: `(its key, seq)`.
pub(crate) type PatientVersion = (i64, Seq);

/// Puts a [`UnitScope::PatientBlocks`] unit's routes in block order: by the patient's place in
/// `keys`, that patient's own Patient versions (`own`) first, then by change sequence.
pub(crate) fn block_order(routes: &mut [Route], keys: &[i64], own: &[PatientVersion]) {
    let place: std::collections::HashMap<i64, usize> =
        keys.iter().enumerate().map(|(i, key)| (*key, i)).collect();
    let own: std::collections::HashSet<PatientVersion> = own.iter().copied().collect();
    routes.sort_unstable_by_key(|&(seq, key)| {
        (
            place.get(&key).copied().unwrap_or(usize::MAX),
            !own.contains(&(key, seq)),
            seq,
        )
    });
}

/// Streams a unit's rows on the calling (blocking) thread, never holding more than one row.
pub trait ScanSource: Send + Sync + 'static {
    /// Calls `each` with the versions of the unit's type in `(seq_after, seq_upto]` that are the
    /// newest as of the job's snapshot: current resources for [`UnitKind::Output`], tombstones
    /// for [`UnitKind::Deleted`]. `each` stops the scan by returning `Ok(false)`.
    ///
    /// Rows of a [`UnitScope::PatientBlocks`] unit come patient by patient, in the order of the
    /// unit's list: all rows found through one patient together, that patient's own Patient
    /// resource first, then the others in change-sequence order. A row in several of the
    /// patients' compartments comes in each of their blocks.
    fn scan_unit(
        &self,
        unit: &ClaimedUnit,
        each: &mut dyn FnMut(ScanRow<'_>) -> std::io::Result<bool>,
    ) -> Result<(), ScanError>;
}

/// Persistence for export jobs.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Takes a snapshot for a new export; later writes get a later `lastUpdated`.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// How many versions of `resource_type` lie in `(after, upto]`, and the first and last `seq`
    /// of them (counted on the index: superseded versions included, so an upper bound).
    async fn type_range(
        &self,
        resource_type: &str,
        after: Seq,
        upto: Seq,
    ) -> Result<(u64, Seq, Seq), StoreError>;

    /// How many compartment rows (versions) the patients have in `(after, upto]`: an upper
    /// bound on what a Group export of them writes.
    async fn compartment_rows(
        &self,
        patients: &[String],
        after: Seq,
        upto: Seq,
    ) -> Result<u64, StoreError>;

    /// The ids of the resources of `resource_type` current (and not deleted) at `upto`, in
    /// change-sequence order.
    async fn current_ids(&self, resource_type: &str, upto: Seq) -> Result<Vec<String>, StoreError>;

    /// The keys ([`crate::resource_key`]) of the resources of `resource_type` current (and not
    /// deleted) at `upto`, sorted: 8 bytes a resource where [`JobStore::current_ids`] needs
    /// the ids.
    async fn current_keys(&self, resource_type: &str, upto: Seq) -> Result<Vec<i64>, StoreError>;

    /// Resource types with at least one version in `(after, upto]`.
    async fn types_present(&self, after: Seq, upto: Seq) -> Result<Vec<String>, StoreError>;

    async fn insert_job(&self, job: NewJob) -> Result<(), StoreError>;

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// Counts a status request; returns the count before this one.
    async fn record_poll(&self, id: &str, manifest_shown: bool) -> Result<u64, StoreError>;

    /// Unfinished jobs of one client.
    async fn active_jobs(&self, client: &str) -> Result<u64, StoreError>;

    async fn cancel_job(&self, id: &str) -> Result<CancelOutcome, StoreError>;

    /// Claims the oldest open unit whose lease is free or expired.
    async fn claim_unit(
        &self,
        owner: &str,
        lease_until: Micros,
        now: Micros,
    ) -> Result<Option<ClaimedUnit>, StoreError>;

    /// Extends a held lease; false when the claim is no longer current.
    async fn renew_lease(
        &self,
        unit: &ClaimedUnit,
        lease_until: Micros,
    ) -> Result<bool, StoreError>;

    /// Records a unit's files and count, fenced by the claim.
    async fn commit_unit(
        &self,
        unit: &ClaimedUnit,
        files: Vec<FileRecord>,
        resources: u64,
    ) -> Result<UnitCommit, StoreError>;

    /// Marks a job completed with its manifest.
    async fn complete_job(
        &self,
        id: &str,
        manifest: String,
        completed_at: Micros,
        expires_at: Micros,
    ) -> Result<(), StoreError>;

    async fn fail_job(&self, id: &str, error: &str) -> Result<(), StoreError>;

    /// Every committed file of a job, in manifest order (type, unit, part).
    async fn job_files(&self, id: &str) -> Result<Vec<FileRecord>, StoreError>;

    /// The numbers of the job's committed units that lie in `units`, ascending. A unit's files
    /// are recorded in the same write that commits it, so once a unit is listed here its files
    /// are final.
    async fn committed_units(&self, id: &str, units: Range<i64>) -> Result<Vec<i64>, StoreError>;

    /// The job's files whose unit number lies in `units`, in manifest order. Files of the job
    /// as a whole (error reports) have unit number [`JOB_LEVEL_UNIT`].
    async fn unit_files(&self, id: &str, units: Range<i64>) -> Result<Vec<FileRecord>, StoreError>;

    /// Adds files that belong to the job as a whole (error reports).
    async fn add_job_files(&self, files: Vec<FileRecord>) -> Result<(), StoreError>;

    async fn file(&self, id: &str) -> Result<Option<(FileRecord, JobRecord)>, StoreError>;

    /// Jobs to remove: completed ones past their expiry, and cancelled or failed ones older
    /// than `ttl`.
    async fn expired_jobs(&self, now: Micros, ttl: Micros) -> Result<Vec<String>, StoreError>;

    /// Unfinished jobs with no open unit: their manifest is due (after a crash between the last
    /// commit and completion, or for an export with nothing to write).
    async fn ready_jobs(&self) -> Result<Vec<String>, StoreError>;

    /// Deletes a job's rows (its files are the caller's).
    async fn delete_job(&self, id: &str) -> Result<(), StoreError>;

    /// Frees every unit lease of this process's earlier life (single-process stores), so a
    /// restarted server resumes at once instead of waiting for leases to expire.
    async fn release_all_leases(&self) -> Result<u64, StoreError>;
}
