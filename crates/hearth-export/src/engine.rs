//! The export engine: kick-off, status, cancel, files, and the worker pool that does the work.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hearth_fhir::instant::{Micros, now_micros};
use hearth_fhir::outcome::{Issue, Severity, operation_outcome};
use hearth_store::jobs::{
    CancelOutcome, ClaimedUnit, FileRecord, JOB_LEVEL_UNIT, JobRecord, JobStatus, NewJob, Snapshot,
    UnitCommit, UnitKind, UnitScope,
};
use hearth_store::{Backend, StoreError, resource_key};
use tokio::runtime::Handle;

use crate::files::RollingWriter;
use crate::manifest;
use crate::output::{Output, OutputError, RemoteFile};
use crate::planner::{PlanError, plan};
use crate::planner::{compartment_provenance_exported, provenance_by_target};
use crate::request::{ExportRequest, Level, ManifestSettings, ParameterError};
use crate::unit::{RowPolicy, UnitFiles, block_header, deletion_bundle, keys_file_name};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Export files live under this directory, one sub-directory per job (with object storage
    /// output, only while a unit is being written).
    pub export_dir: PathBuf,
    /// Where finished files are kept.
    pub output: Output,
    /// The FHIR base URL that file URLs in manifests start with.
    pub base_url: String,
    /// Worker threads of this process.
    pub workers: usize,
    /// Files roll over before they exceed this size.
    pub max_file_bytes: u64,
    /// How long files and job records live after completion.
    pub ttl: Duration,
    /// Unfinished jobs one client may have before kick-offs answer `429`.
    pub max_active_exports: u64,
    /// Whether downloads need a bearer token (the manifest says so).
    pub requires_access_token: bool,
    /// Planned size of a work unit, in resources.
    pub rows_per_unit: u64,
    /// How long a claimed unit stays claimed without a renewal. Another process takes over the
    /// units of a process that died once their leases run out, so this bounds how long a
    /// crash holds up a job.
    pub lease: Duration,
    /// How export workers share the CPU with request handling.
    pub worker_priority: WorkerPriority,
}

/// How export workers share the CPU with the threads that answer requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WorkerPriority {
    /// Workers run only on CPU time that request threads leave free, and a waking request
    /// thread preempts them at once: the lowest request latency while exports run, but a
    /// server whose CPU is saturated by requests makes no export progress until load drops.
    #[default]
    Idle,
    /// Workers run at nice 10: they keep a small share of a saturated CPU, and request
    /// threads may wait for a worker's time slice to end.
    Low,
}

/// The default [`EngineConfig::lease`].
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Why a kick-off was refused.
#[derive(Debug, thiserror::Error)]
pub enum KickOffError {
    #[error(transparent)]
    Parameter(#[from] ParameterError),
    /// The Group does not exist (at the snapshot).
    #[error("{0}")]
    NotFound(String),
    #[error("{active} exports of this client are still running (limit {limit})")]
    TooMany { active: u64, limit: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the job's files: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot store the job's files: {0}")]
    Output(#[from] OutputError),
}

/// What a status request answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobView {
    InProgress {
        progress: String,
        retry_after: u64,
    },
    /// Still running, and the asked manifest page lists only files that are done.
    Partial {
        manifest: String,
        progress: String,
    },
    Completed {
        manifest: String,
        expires_at: Micros,
    },
    Failed {
        message: String,
    },
    NotFound,
    /// The job exists but has no manifest page of that number.
    NoSuchPage {
        pages: u64,
    },
}

/// What a download may serve.
#[derive(Debug, Clone)]
pub struct DownloadableFile {
    pub source: FileSource,
    pub record: FileRecord,
    pub job: JobRecord,
}

/// Where a file's bytes are read from.
#[derive(Debug, Clone)]
pub enum FileSource {
    Local(PathBuf),
    Remote(RemoteFile),
}

/// Rows between checks for cancellation, shutdown and lease renewal: about a millisecond.
const CHECK_EVERY_ROWS: u64 = 1024;
/// How often a unit re-reads its job row, so that a cancel made through any process stops it
/// within a second.
const CANCEL_CHECK_EVERY: Duration = Duration::from_millis(400);

/// Shared by the HTTP handlers and the workers.
#[derive(Clone)]
pub struct ExportEngine {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    config: EngineConfig,
    runtime: Handle,
    instance: String,
    /// Jobs cancelled through this process: workers stop within one check interval.
    cancelled: Mutex<HashSet<String>>,
    shutdown: AtomicBool,
    wake: (Mutex<u64>, Condvar),
    /// Recently read job rows, by id.
    job_cache: Mutex<HashMap<String, CachedJob>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Sweeps so far.
    sweeps: AtomicU64,
}

fn micros(duration: Duration) -> Micros {
    duration.as_micros() as Micros
}

impl ExportEngine {
    /// Starts the workers and the retention sweeper. Must be called inside a tokio runtime.
    pub async fn start(
        backend: Arc<dyn Backend>,
        config: EngineConfig,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.export_dir).map_err(|source| StoreError::DataDir {
            path: config.export_dir.display().to_string(),
            source,
        })?;
        // One process owns an embedded store: leases of an earlier life are void.
        let released = backend.release_all_leases().await?;
        if released > 0 {
            tracing::info!(
                units = released,
                "resuming export units left by a previous run"
            );
        }
        let engine = Self {
            inner: Arc::new(Inner {
                backend,
                config,
                runtime: Handle::current(),
                instance: uuid::Uuid::new_v4().to_string(),
                cancelled: Mutex::new(HashSet::new()),
                shutdown: AtomicBool::new(false),
                wake: (Mutex::new(0), Condvar::new()),
                job_cache: Mutex::new(HashMap::new()),
                workers: Mutex::new(Vec::new()),
                sweeps: AtomicU64::new(0),
            }),
        };
        if let Output::Object(_) = &engine.inner.config.output {
            tracing::info!(output = %engine.inner.config.output.describe(),
                presigned_urls = engine.inner.config.output.presigned_urls(),
                "export files go to object storage");
        }
        engine.sweep().await;
        let mut workers = Vec::new();
        for number in 0..engine.inner.config.workers.max(1) {
            let inner = Arc::clone(&engine.inner);
            let worker = std::thread::Builder::new()
                .name(format!("hearth-export-{number}"))
                .spawn(move || inner.work(number))
                .map_err(|e| StoreError::Internal(format!("cannot start an export worker: {e}")))?;
            workers.push(worker);
        }
        if let Ok(mut slot) = engine.inner.workers.lock() {
            *slot = workers;
        }
        // Leases in the store name this id: the line tells which process holds a unit.
        tracing::info!(instance = %engine.inner.instance, workers = engine.inner.config.workers.max(1),
            lease_secs = engine.inner.config.lease.as_secs_f64(), "export workers started");
        let sweeper = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            while !sweeper.inner.shutdown.load(Ordering::Relaxed) {
                tick.tick().await;
                sweeper.sweep().await;
            }
        });
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Stops the workers; units in progress are left to the next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.wake.1.notify_all();
        let workers = self
            .inner
            .workers
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        let _ = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
    }

    /// Records a job for `request` and returns its id.
    pub async fn kick_off(
        &self,
        request: ExportRequest,
        client: &str,
    ) -> Result<String, KickOffError> {
        let inner = &self.inner;
        let limit = inner.config.max_active_exports;
        let active = inner.backend.active_jobs(client).await?;
        if active >= limit {
            return Err(KickOffError::TooMany { active, limit });
        }
        let id = uuid::Uuid::new_v4().to_string();
        let snapshot = inner.backend.snapshot().await?;
        let mut request = request;
        let planned = plan(
            inner.backend.as_ref(),
            &request,
            snapshot,
            inner.config.rows_per_unit,
        )
        .await
        .map_err(|e| match e {
            PlanError::GroupNotFound(message) => KickOffError::NotFound(message),
            PlanError::Store(e) => KickOffError::Store(e),
        })?;
        request.resolved_patients = planned.patients.clone();
        request.ignored.extend(planned.problems.iter().cloned());
        let files = self.write_ignored_report(&id, &request)?;
        if let Output::Object(object) = &inner.config.output
            && !files.is_empty()
        {
            let names: Vec<String> = files
                .iter()
                .map(|f| file_name(&f.path).to_owned())
                .collect();
            let dir = inner.config.export_dir.join(&id);
            // Nobody can cancel a job before its kick-off has answered.
            object
                .upload_files(&dir, &id, &names, &AtomicBool::new(false))
                .await?;
        }
        let nothing_to_do = planned.units.is_empty();
        inner
            .backend
            .insert_job(NewJob {
                id: id.clone(),
                client: client.to_owned(),
                request: serde_json::to_string(&request)
                    .map_err(|e| StoreError::Internal(e.to_string()))?,
                request_url: request.request_url.clone(),
                // With `_until`, units read as of that instant; transactionTime stays the
                // kick-off's.
                snapshot: Snapshot {
                    seq: planned.visible_seq,
                    ..snapshot
                },
                created_at: now_micros(),
                estimated_resources: planned.estimated_resources,
                units: planned.units,
                files,
            })
            .await?;
        tracing::info!(job = %id, client, resources = planned.estimated_resources, "export job queued");
        if nothing_to_do {
            inner.finalize(&id).await;
            return Ok(id);
        }
        if let Ok(mut generation) = inner.wake.0.lock() {
            *generation += 1;
        }
        inner.wake.1.notify_all();
        Ok(id)
    }

    /// The report known at kick-off: one OperationOutcome per ignored parameter (lenient
    /// mode), and what a system export organized by Patient leaves out.
    fn write_ignored_report(
        &self,
        job_id: &str,
        request: &ExportRequest,
    ) -> std::io::Result<Vec<FileRecord>> {
        let mut issues: Vec<Issue> = request
            .ignored
            .iter()
            .map(|ignored| {
                Issue::new(
                    Severity::Warning,
                    if ignored.name == "patient" {
                        "not-found"
                    } else {
                        "not-supported"
                    },
                    ignored.reason.clone(),
                )
                .at(ignored.name.clone())
            })
            .collect();
        // The IG lets organized output drop resources that no block references.
        if request.level == Level::System
            && let Some(organizing_type) = &request.organize_output_by
        {
            issues.push(
                Issue::information(format!(
                    "the output is organized by {organizing_type}: resources outside every Patient compartment are not part of it"
                ))
                .at("organizeOutputBy"),
            );
        }
        if issues.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.inner.config.export_dir.join(job_id);
        std::fs::create_dir_all(&dir)?;
        let mut writer = RollingWriter::new(&dir, "errors", u64::MAX);
        for issue in issues {
            writer.write_line(&operation_outcome(&[issue]))?;
        }
        Ok(writer
            .finish()?
            .into_iter()
            .map(|file| FileRecord {
                id: uuid::Uuid::new_v4().to_string(),
                job_id: job_id.to_owned(),
                unit_no: JOB_LEVEL_UNIT,
                part: file.part,
                resource_type: "OperationOutcome".into(),
                kind: "error".into(),
                path: format!("{job_id}/{}", file.name),
                count: file.count,
                bytes: file.bytes,
                continues: false,
            })
            .collect())
    }

    /// What the status URL answers now for manifest page `page` (1 is the first). Reads stored
    /// state; writes only to count the first poll and to remember that the manifest was shown.
    pub async fn status(&self, id: &str, page: u64) -> Result<JobView, StoreError> {
        let backend = &self.inner.backend;
        let job = match self.inner.cached_job(id) {
            Some(job) => job,
            None => {
                let Some(job) = backend.job(id).await? else {
                    return Ok(JobView::NotFound);
                };
                // Polls of a job already seen are answered from a copy of its row at most 20 ms old:
                // clients polling hard cost the store nothing.
                if job.polls > 0 && (job.status != JobStatus::Completed || job.manifest_shown) {
                    self.inner.cache_job(&job);
                } else {
                    // Nor may the copy that went stale answer for it any more.
                    self.inner.forget_job(id);
                }
                job
            }
        };
        let now = now_micros();
        if job.status == JobStatus::Cancelled || job.expires_at.is_some_and(|e| e < now) {
            return Ok(JobView::NotFound);
        }
        let settings = manifest_settings(&job)?;
        let pages = if settings.allow_partial_manifests {
            manifest::page_count(job.units_total)
        } else {
            1
        };
        if page == 0 || page > pages {
            return Ok(JobView::NoSuchPage { pages });
        }
        // Clients always see the running state once, however fast the job was.
        if job.polls == 0 {
            backend.record_poll(id, false).await?;
            return Ok(in_progress(&job, now));
        }
        match job.status {
            JobStatus::Completed => {
                if !job.manifest_shown {
                    backend.record_poll(id, true).await?;
                }
                let expires_at = job.expires_at.unwrap_or(now);
                let manifest = if settings.allow_partial_manifests {
                    self.manifest_page(&job, &settings, page, pages, expires_at - now)
                        .await?
                } else {
                    let manifest = job.manifest.unwrap_or_default();
                    match &self.inner.config.output {
                        Output::Object(object) if self.inner.config.output.presigned_urls() => {
                            let files = backend.job_files(&job.id).await?;
                            self.presign(object, &files, &manifest, expires_at - now)
                                .await?
                        }
                        _ => self.with_own_urls(manifest)?,
                    }
                };
                Ok(JobView::Completed {
                    manifest,
                    expires_at,
                })
            }
            JobStatus::Failed => Ok(JobView::Failed {
                message: job.error.unwrap_or_else(|| "the export failed".into()),
            }),
            // The last page lists the job's error reports, which are final only at completion,
            // so it is never shown before.
            _ if settings.allow_partial_manifests && page < pages => {
                let units = manifest::page_units(page, pages);
                let committed = backend.committed_units(id, units.clone()).await?;
                if committed.len() as i64 != units.end - units.start {
                    return Ok(in_progress(&job, now));
                }
                let manifest = self
                    .manifest_page(&job, &settings, page, pages, micros(self.inner.config.ttl))
                    .await?;
                Ok(JobView::Partial {
                    manifest,
                    progress: progress(&job),
                })
            }
            _ => Ok(in_progress(&job, now)),
        }
    }

    /// Page `page` of a job with partial manifests, built from its files on this process.
    /// `lifetime` bounds presigned URLs.
    async fn manifest_page(
        &self,
        job: &JobRecord,
        settings: &ManifestSettings,
        page: u64,
        pages: u64,
        lifetime: Micros,
    ) -> Result<String, StoreError> {
        let backend = &self.inner.backend;
        let config = &self.inner.config;
        let mut files = backend
            .unit_files(&job.id, manifest::page_units(page, pages))
            .await?;
        if page == pages {
            files.extend(
                backend
                    .unit_files(&job.id, manifest::JOB_LEVEL_FILES)
                    .await?,
            );
        }
        let next =
            (page < pages).then(|| manifest::status_url(&config.base_url, &job.id, page + 1));
        let built = manifest::build(
            job,
            settings,
            &files,
            &config.base_url,
            config.requires_access_token,
            next,
        );
        match &config.output {
            Output::Object(object) if config.output.presigned_urls() => {
                self.presign(object, &files, &built, lifetime).await
            }
            _ => Ok(built),
        }
    }

    /// A manifest with presigned URLs for `files` that expire with the job: signed anew on
    /// every status request, so whichever process answers, the URLs are fresh.
    async fn presign(
        &self,
        object: &crate::output::ObjectOutput,
        files: &[FileRecord],
        manifest: &str,
        remaining: Micros,
    ) -> Result<String, StoreError> {
        let paths: HashMap<&str, &str> = files
            .iter()
            .map(|f| (f.id.as_str(), f.path.as_str()))
            .collect();
        let lifetime = Duration::from_micros(remaining.max(0) as u64);
        let mut signed = HashMap::new();
        for (id, path) in paths {
            let url = object
                .signed_url(path, lifetime)
                .await
                .map_err(|e| StoreError::Internal(format!("cannot sign a download URL: {e}")))?;
            if let Some(url) = url {
                signed.insert(id, url);
            }
        }
        // By file id: the process that stored the manifest may know the base URL by another
        // name than this one.
        manifest::with_urls(manifest, false, |url| {
            let (_, id) = url.rsplit_once("/Binary/")?;
            signed.get(id).cloned()
        })
        .map_err(|e| StoreError::Internal(format!("a stored manifest does not parse: {e}")))
    }

    /// The stored manifest with download URLs on this process. The process that finished the
    /// job stored them under its own base URL; processes without a shared `--base-url` would
    /// otherwise send clients to that one, which may be gone, although every process serves
    /// every file.
    fn with_own_urls(&self, manifest: String) -> Result<String, StoreError> {
        let base = &self.inner.config.base_url;
        // One process built the whole manifest: one URL on this base means all are.
        if manifest.contains(&format!("\"url\":\"{base}/Binary/")) {
            return Ok(manifest);
        }
        manifest::with_urls(&manifest, self.inner.config.requires_access_token, |url| {
            let (_, id) = url.rsplit_once("/Binary/")?;
            Some(manifest::file_url(base, id))
        })
        .map_err(|e| StoreError::Internal(format!("a stored manifest does not parse: {e}")))
    }

    /// DELETE on the status URL.
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        // An expired job is gone for the client (polls answer 404) even before the sweeper
        // removes it; a DELETE must not bring it back as a cancellation.
        if let Some(job) = self.inner.backend.job(id).await?
            && job.expires_at.is_some_and(|e| e < now_micros())
        {
            self.inner.forget_job(id);
            self.inner.remove_job_files(id).await;
            self.inner.backend.delete_job(id).await?;
            return Ok(CancelOutcome::NotFound);
        }
        let outcome = self.inner.backend.cancel_job(id).await?;
        self.inner.forget_job(id);
        if outcome != CancelOutcome::NotFound {
            if let Ok(mut cancelled) = self.inner.cancelled.lock() {
                cancelled.insert(id.to_owned());
            }
            self.inner.remove_job_files(id).await;
            tracing::info!(job = %id, ?outcome, "export job cancelled or removed");
        }
        Ok(outcome)
    }

    /// A file that may be downloaded now.
    pub async fn file(&self, file_id: &str) -> Result<Option<DownloadableFile>, StoreError> {
        let Some((record, job)) = self.inner.backend.file(file_id).await? else {
            return Ok(None);
        };
        let expired = job.expires_at.is_some_and(|e| e < now_micros());
        // A running job has files only of committed units, which partial manifests may list.
        let downloadable = match job.status {
            JobStatus::Completed => true,
            JobStatus::Queued | JobStatus::Running => {
                manifest_settings(&job)?.allow_partial_manifests
            }
            JobStatus::Failed | JobStatus::Cancelled => false,
        };
        if !downloadable || expired {
            return Ok(None);
        }
        let source = match &self.inner.config.output {
            Output::Local => {
                let path = self.inner.config.export_dir.join(&record.path);
                if !path.starts_with(&self.inner.config.export_dir) {
                    return Ok(None);
                }
                FileSource::Local(path)
            }
            Output::Object(object) => {
                FileSource::Remote(object.remote_file(&record.path, record.bytes))
            }
        };
        Ok(Some(DownloadableFile {
            source,
            record,
            job,
        }))
    }

    /// Removes expired jobs and their files, completes jobs whose units are all done, and
    /// removes files left by jobs that no longer exist. Runs every 30 seconds by itself.
    pub async fn sweep(&self) {
        let inner = &self.inner;
        let now = now_micros();
        match inner
            .backend
            .expired_jobs(now, micros(inner.config.ttl))
            .await
        {
            Ok(ids) => {
                for id in ids {
                    inner.remove_job_files(&id).await;
                    if let Err(e) = inner.backend.delete_job(&id).await {
                        tracing::warn!(job = %id, error = %e, "cannot remove an expired job");
                    } else {
                        tracing::info!(job = %id, "expired export job removed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list expired jobs"),
        }
        match inner.backend.ready_jobs().await {
            Ok(ids) => {
                for id in ids {
                    inner.finalize(&id).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list finished jobs"),
        }
        // Directories of jobs that no longer exist (cancelled while a worker was writing).
        let export_dir = inner.config.export_dir.clone();
        let old_dirs = tokio::task::spawn_blocking(move || {
            directories_older_than(&export_dir, Duration::from_secs(60))
        })
        .await
        .unwrap_or_default();
        for name in old_dirs {
            // With object storage a job's staging directory is only needed while it runs.
            let gone = match inner.backend.job(&name).await {
                Ok(None) => true,
                Ok(Some(job)) => {
                    matches!(inner.config.output, Output::Object(_)) && !job.status.is_unfinished()
                }
                Err(_) => false,
            };
            if gone {
                remove_dir_off_runtime(inner.config.export_dir.join(name)).await;
            }
        }
        if let Output::Object(object) = &inner.config.output {
            // Objects of jobs that no longer exist: a process died between uploading and
            // committing, or after the job was cancelled elsewhere. Listing the bucket is not
            // free, so only every tenth sweep.
            let round = inner.sweeps.fetch_add(1, Ordering::Relaxed);
            if round.is_multiple_of(10) {
                inner.remove_orphaned_objects(object).await;
            }
        }
    }
}

/// Unlinking gigabytes of export files takes the file system tens to hundreds of milliseconds;
/// on a runtime thread that would stall every request queued behind it.
async fn remove_dir_off_runtime(dir: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
}

/// Names of the entries of `dir` last modified longer than `age` ago.
fn directories_older_than(dir: &Path, age: Duration) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|elapsed| elapsed > age)
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The file name of a path relative to the export directory (`<job>/<name>`).
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn manifest_settings(job: &JobRecord) -> Result<ManifestSettings, StoreError> {
    ManifestSettings::of_stored(&job.request)
        .map_err(|e| StoreError::Internal(format!("a stored export request does not parse: {e}")))
}

/// The `X-Progress` text: under the IG's 100 characters.
fn progress(job: &JobRecord) -> String {
    let total = job.estimated_resources.max(job.done_resources);
    let percent = if job.status == JobStatus::Completed || total == 0 {
        if job.status == JobStatus::Completed {
            100
        } else {
            0
        }
    } else {
        (job.done_resources * 100 / total).min(99)
    };
    let state = if job.status == JobStatus::Queued {
        ", queued"
    } else {
        ""
    };
    format!(
        "{percent}% ({} of {} resources){state}",
        group_thousands(job.done_resources),
        group_thousands(total)
    )
}

fn in_progress(job: &JobRecord, now: Micros) -> JobView {
    let total = job.estimated_resources.max(job.done_resources);
    // Expected remaining time from the rate so far, between 1 and 120 seconds.
    let retry_after = match job.started_at {
        Some(started) if job.done_resources > 0 && now > started => {
            let rate = job.done_resources as f64 / ((now - started) as f64 / 1e6);
            let remaining = total.saturating_sub(job.done_resources) as f64 / rate;
            remaining.ceil().clamp(1.0, 120.0) as u64
        }
        _ => 1,
    };
    JobView::InProgress {
        progress: progress(job),
        retry_after,
    }
}

/// Why a unit did not commit.
#[derive(Debug)]
enum Abandon {
    Cancelled,
    Shutdown,
    LeaseLost,
}

/// How long a polled job's row is served from memory: progress lags by at most this much.
const JOB_CACHE_TTL: Duration = Duration::from_millis(20);
/// While one poll reads a job's row again, the others are answered from the copy that just
/// went stale, up to this age, rather than all reading the store at once (a client polling
/// over many connections would otherwise queue on the store every `JOB_CACHE_TTL`).
const JOB_CACHE_STALE_WHILE_READING: Duration = Duration::from_millis(250);

struct CachedJob {
    read_at: Instant,
    job: JobRecord,
    /// A poll is reading the row again.
    refreshing: bool,
}

impl Inner {
    /// The cached row of job `id`, or `None` when the caller must read it (and then
    /// [`Inner::cache_job`] it).
    fn cached_job(&self, id: &str) -> Option<JobRecord> {
        let mut cache = self.job_cache.lock().ok()?;
        let cached = cache.get_mut(id)?;
        let age = cached.read_at.elapsed();
        if age < JOB_CACHE_TTL || cached.refreshing && age < JOB_CACHE_STALE_WHILE_READING {
            return Some(cached.job.clone());
        }
        cached.refreshing = true;
        None
    }

    fn forget_job(&self, id: &str) {
        if let Ok(mut cache) = self.job_cache.lock() {
            cache.remove(id);
        }
    }

    fn cache_job(&self, job: &JobRecord) {
        if let Ok(mut cache) = self.job_cache.lock() {
            if cache.len() >= 1024 {
                cache.retain(|_, cached| cached.read_at.elapsed() < JOB_CACHE_STALE_WHILE_READING);
            }
            cache.insert(
                job.id.clone(),
                CachedJob {
                    read_at: Instant::now(),
                    job: job.clone(),
                    refreshing: false,
                },
            );
        }
    }

    /// Removes a job's files wherever they are.
    async fn remove_job_files(&self, id: &str) {
        if uuid::Uuid::parse_str(id).is_ok() {
            remove_dir_off_runtime(self.config.export_dir.join(id)).await;
        }
        if let Output::Object(object) = &self.config.output
            && uuid::Uuid::parse_str(id).is_ok()
        {
            match object.remove_job(id).await {
                Ok(removed) => {
                    tracing::debug!(job = %id, objects = removed, "export objects removed")
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "cannot remove a job's export objects")
                }
            }
        }
    }

    async fn remove_orphaned_objects(&self, object: &crate::output::ObjectOutput) {
        let ids = match object.job_ids().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the export objects");
                return;
            }
        };
        for id in ids {
            if uuid::Uuid::parse_str(&id).is_err()
                || !matches!(self.backend.job(&id).await, Ok(None))
            {
                continue;
            }
            // A unit uploads before it commits: objects younger than a lease may belong to a
            // job whose row a concurrent kick-off is about to insert.
            match object.remove_job_older_than(&id, DEFAULT_LEASE * 2).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(job = %id, objects = removed, "orphaned export objects removed")
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "cannot remove orphaned export objects")
                }
            }
        }
    }

    fn is_cancelled(&self, job_id: &str) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.contains(job_id))
            .unwrap_or(false)
    }

    fn work(self: Arc<Self>, number: usize) {
        lower_thread_priority(self.config.worker_priority);
        let owner = format!("{}-{number}", self.instance);
        while !self.shutdown.load(Ordering::SeqCst) {
            let generation = self.wake.0.lock().map(|g| *g).unwrap_or(0);
            let now = now_micros();
            match self.runtime.block_on(self.backend.claim_unit(
                &owner,
                now + micros(self.config.lease),
                now,
            )) {
                Ok(Some(unit)) => self.run_unit(unit),
                Ok(None) => {
                    // Sleep until a kick-off (or a second passes: other processes, restarts).
                    if let Ok(guard) = self.wake.0.lock()
                        && *guard == generation
                        && !self.shutdown.load(Ordering::SeqCst)
                    {
                        let _ = self.wake.1.wait_timeout(guard, Duration::from_secs(1));
                    }
                }
                Err(StoreError::Closed) => return,
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim an export unit");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn run_unit(self: &Arc<Self>, unit: ClaimedUnit) {
        let started = Instant::now();
        match self.write_unit(&unit) {
            Ok(Ok(written)) => {
                tracing::debug!(job = %unit.job_id, unit = unit.unit_no, resource_type = %unit.resource_type,
                    resources = written, elapsed_ms = started.elapsed().as_millis() as u64, "unit done");
            }
            Ok(Err(reason)) => {
                tracing::info!(job = %unit.job_id, unit = unit.unit_no, ?reason, "unit abandoned");
            }
            // A cancel through this process removes the job's directory under its running
            // units, whose next file then cannot be created: the cancel taking effect, not a
            // failed export.
            Err(_) if self.is_cancelled(&unit.job_id) => {
                tracing::info!(job = %unit.job_id, unit = unit.unit_no, reason = ?Abandon::Cancelled,
                    "unit abandoned");
            }
            Err(e) => {
                tracing::error!(job = %unit.job_id, unit = unit.unit_no, error = %e, "export unit failed");
                let message = format!("exporting {} failed: {e}", unit.resource_type);
                let _ = self
                    .runtime
                    .block_on(self.backend.fail_job(&unit.job_id, &message));
            }
        }
    }

    /// Gives a Provenance unit the keys of every resource its job exported, from the key files
    /// the output units left (fetched from object storage when they live there).
    fn load_exported_keys(
        self: &Arc<Self>,
        unit: &ClaimedUnit,
        dir: &Path,
        policy: &mut RowPolicy<'_>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let files = self
            .runtime
            .block_on(self.backend.job_files(&unit.job_id))?;
        // One key file per committed unit attempt, named after its output files.
        let mut key_names: Vec<String> = files
            .iter()
            // Provenance units write the only Provenance of such a job, and no key files.
            .filter(|f| f.kind == "output" && f.resource_type != "Provenance")
            .filter_map(|f| {
                let mut parts = file_name(&f.path).split('-');
                let (unit_no, attempt) = (parts.next()?, parts.next()?);
                Some(keys_file_name(
                    unit_no.strip_prefix('u')?.parse().ok()?,
                    attempt.strip_prefix('a')?.parse().ok()?,
                ))
            })
            .collect();
        key_names.sort();
        key_names.dedup();
        match &self.config.output {
            Output::Local => {
                let key_files: Vec<PathBuf> = key_names.iter().map(|n| dir.join(n)).collect();
                policy.load_exported(&key_files)?;
            }
            Output::Object(object) => {
                // The units that wrote them may have run in other processes.
                let fetched = dir.join(format!("keys-u{}-a{}", unit.unit_no, unit.attempt));
                std::fs::create_dir_all(&fetched)?;
                let loaded = (|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                    let mut key_files = Vec::with_capacity(key_names.len());
                    for name in &key_names {
                        let local = fetched.join(name);
                        self.runtime
                            .block_on(object.fetch(&format!("{}/{name}", unit.job_id), &local))?;
                        key_files.push(local);
                    }
                    policy.load_exported(&key_files)?;
                    Ok(())
                })();
                let _ = std::fs::remove_dir_all(&fetched);
                loaded?;
            }
        }
        Ok(())
    }

    /// Streams one unit into files and commits them. The outer error fails the job; the
    /// inner one means the unit was given up (its files removed) without failing anything.
    fn write_unit(
        self: &Arc<Self>,
        unit: &ClaimedUnit,
    ) -> Result<Result<u64, Abandon>, Box<dyn std::error::Error + Send + Sync>> {
        let dir = self.config.export_dir.join(&unit.job_id);
        std::fs::create_dir_all(&dir)?;
        remove_earlier_attempts(&dir, unit.unit_no);
        let heartbeat = self.start_heartbeat(unit);
        let request: ExportRequest = serde_json::from_str(&unit.request)?;
        let mut policy = RowPolicy::new(&request);
        // Loaded at the first row: a unit with nothing to choose from does not read them.
        let mut keys_pending = unit.kind == UnitKind::Provenance;
        if unit.kind == UnitKind::Output
            && unit.resource_type == "Provenance"
            && compartment_provenance_exported(&request)
        {
            let patients = self
                .runtime
                .block_on(self.backend.current_keys("Patient", unit.snapshot_seq))?;
            policy.set_existing_patients(patients);
        }
        if unit.kind == UnitKind::Provenance && request.latest_provenance {
            self.load_exported_keys(unit, &dir, &mut policy)?;
            keys_pending = false;
            let noted = self.backend.scan_unit(unit, &mut |row| {
                policy.note_latest_provenance(unit, &row);
                Ok(!self.shutdown.load(Ordering::Relaxed)
                    && !heartbeat.cancelled.load(Ordering::Relaxed))
            });
            noted?;
            policy.settle_latest_provenance();
        }
        let record_keys = unit.kind == UnitKind::Output && provenance_by_target(&request);
        let mut files = UnitFiles::new(&dir, unit, self.config.max_file_bytes, record_keys)?;
        // Organized output: the unit's patients by key, to name the block each row opens.
        let blocks: Option<(&str, HashMap<i64, &str>)> = match &unit.scope {
            UnitScope::PatientBlocks(patients) if unit.kind == UnitKind::Output => Some((
                request.organize_output_by.as_deref().unwrap_or("Patient"),
                patients
                    .iter()
                    .map(|id| (resource_key("Patient", id), id.as_str()))
                    .collect(),
            )),
            _ => None,
        };
        let mut block_of = None;
        let mut rows = 0u64;
        let mut written_rows = 0u64;
        let mut abandon = None;
        let mut line = Vec::new();
        let scanned = self.backend.scan_unit(unit, &mut |row| {
            if keys_pending {
                self.load_exported_keys(unit, &dir, &mut policy)
                    .map_err(std::io::Error::other)?;
                keys_pending = false;
            }
            if policy.keep(unit, &row) {
                match unit.kind {
                    UnitKind::Output | UnitKind::Provenance => {
                        let shaped = policy.shape(row.resource_type, row.body);
                        files.record(row.resource_type, row.id)?;
                        match &blocks {
                            Some((organizing_type, patients)) => {
                                // A block opens with the first row kept for its patient, so a
                                // patient with nothing selected gets none.
                                if block_of != Some(row.via_patient) {
                                    let id = patients.get(&row.via_patient).ok_or_else(|| {
                                        std::io::Error::other(
                                            "the store returned a row of a patient outside the unit",
                                        )
                                    })?;
                                    block_header(organizing_type, id, &mut line);
                                    files.start_block(organizing_type, &line)?;
                                    block_of = Some(row.via_patient);
                                }
                                files.write_in_block(&shaped)?;
                            }
                            None => files.write(row.resource_type, &shaped)?,
                        }
                    }
                    UnitKind::Deleted => {
                        deletion_bundle(row.resource_type, row.id, row.last_updated, &mut line);
                        files.write("Bundle", &line)?;
                    }
                }
                written_rows += 1;
            }
            rows += 1;
            if rows.is_multiple_of(CHECK_EVERY_ROWS) {
                if self.shutdown.load(Ordering::Relaxed) {
                    abandon = Some(Abandon::Shutdown);
                } else if heartbeat.cancelled.load(Ordering::Relaxed)
                    || self.is_cancelled(&unit.job_id)
                {
                    abandon = Some(Abandon::Cancelled);
                } else if heartbeat.lease_lost.load(Ordering::Relaxed) {
                    abandon = Some(Abandon::LeaseLost);
                }
            }
            Ok(abandon.is_none())
        });
        if let Some(reason) = abandon {
            files.discard();
            return Ok(Err(reason));
        }
        if let Err(e) = scanned {
            files.discard();
            return Err(Box::new(e));
        }
        let written = files.finish()?;
        // With object storage a unit's files (and its key file) are in the bucket before the
        // unit commits, so every process can serve them as soon as the job says so.
        let mut uploaded = Vec::new();
        if let Output::Object(object) = &self.config.output {
            let mut names: Vec<String> = written.iter().map(|(_, f)| f.name.clone()).collect();
            if record_keys {
                names.push(keys_file_name(unit.unit_no, unit.attempt));
            }
            let stop = AtomicBool::new(false);
            let upload = self.runtime.block_on(async {
                let upload = object.upload_files(&dir, &unit.job_id, &names, &stop);
                tokio::pin!(upload);
                tokio::select! {
                    uploaded = &mut upload => uploaded,
                    () = heartbeat.until_cancelled() => {
                        // The upload stops at its next chunk and removes what it stored.
                        stop.store(true, Ordering::Relaxed);
                        upload.await
                    }
                }
            });
            if let Err(e) = upload {
                for name in &names {
                    let _ = std::fs::remove_file(dir.join(name));
                }
                if matches!(e, OutputError::Stopped) {
                    return Ok(Err(Abandon::Cancelled));
                }
                return Err(Box::new(e));
            }
            uploaded = names
                .iter()
                .map(|name| format!("{}/{name}", unit.job_id))
                .collect();
        }
        let kind = match unit.kind {
            UnitKind::Output | UnitKind::Provenance => "output",
            UnitKind::Deleted => "deleted",
        };
        let records: Vec<FileRecord> = written
            .iter()
            .map(|(group, file)| FileRecord {
                id: uuid::Uuid::new_v4().to_string(),
                job_id: unit.job_id.clone(),
                unit_no: unit.unit_no,
                part: file.part,
                resource_type: group.clone(),
                kind: kind.to_owned(),
                path: format!("{}/{}", unit.job_id, file.name),
                count: file.count,
                bytes: file.bytes,
                continues: file.continues,
            })
            .collect();
        let rows = written_rows;
        match self
            .runtime
            .block_on(self.backend.commit_unit(unit, records, rows))?
        {
            UnitCommit::Committed => Ok(Ok(rows)),
            UnitCommit::JobReady => {
                self.runtime.block_on(self.finalize(&unit.job_id));
                Ok(Ok(rows))
            }
            UnitCommit::Fenced => {
                for (_, file) in &written {
                    let _ = std::fs::remove_file(dir.join(&file.name));
                }
                if let Output::Object(object) = &self.config.output {
                    self.runtime.block_on(object.delete(&uploaded));
                }
                Ok(Err(if self.is_cancelled(&unit.job_id) {
                    Abandon::Cancelled
                } else {
                    Abandon::LeaseLost
                }))
            }
        }
    }

    /// Starts the task that keeps `unit`'s lease and watches its job while a worker writes it.
    /// It runs beside the work, so a slow disk, a long upload or a large row cannot make the
    /// lease lapse, and the worker only reads two flags between rows.
    fn start_heartbeat(self: &Arc<Self>, unit: &ClaimedUnit) -> Heartbeat {
        let cancelled = Arc::new(AtomicBool::new(false));
        let lease_lost = Arc::new(AtomicBool::new(false));
        let task = {
            let (engine, unit) = (Arc::clone(self), unit.clone());
            let (cancelled, lease_lost) = (Arc::clone(&cancelled), Arc::clone(&lease_lost));
            self.runtime.spawn(async move {
                let mut last_renewal = Instant::now();
                loop {
                    tokio::time::sleep(CANCEL_CHECK_EVERY).await;
                    // A DELETE answered by another process reaches this one only through the
                    // job row. A store error leaves the decision to the fenced commit.
                    let gone = engine.is_cancelled(&unit.job_id)
                        || matches!(engine.backend.job(&unit.job_id).await,
                            Ok(job) if job.as_ref().is_none_or(|job| job.status != JobStatus::Running));
                    if gone {
                        cancelled.store(true, Ordering::Relaxed);
                        return;
                    }
                    // At a third of the lease (10 s of the default 30 s): a renewal held up by
                    // a slow store still lands before another process may take over.
                    if last_renewal.elapsed() > engine.config.lease / 3 {
                        let until = now_micros() + micros(engine.config.lease);
                        match engine.backend.renew_lease(&unit, until).await {
                            Ok(true) => last_renewal = Instant::now(),
                            Ok(false) => {
                                lease_lost.store(true, Ordering::Relaxed);
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(job = %unit.job_id, unit = unit.unit_no, error = %e, "cannot renew a lease; retrying");
                            }
                        }
                    }
                }
            })
        };
        Heartbeat {
            cancelled,
            lease_lost,
            task,
        }
    }

    /// Builds and stores the manifest of a job whose units are all done.
    async fn finalize(&self, job_id: &str) {
        let result: Result<(), StoreError> = async {
            let Some(job) = self.backend.job(job_id).await? else {
                return Ok(());
            };
            let settings = manifest_settings(&job)?;
            let files = self.backend.job_files(job_id).await?;
            let manifest = manifest::build(&job, &settings, &files,
                &self.config.base_url, self.config.requires_access_token, None);
            let now = now_micros();
            self.backend
                .complete_job(job_id, manifest, now, now + micros(self.config.ttl))
                .await?;
            tracing::info!(job = %job_id, resources = job.done_resources, files = files.len(), "export job completed");
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::error!(job = %job_id, error = %e, "cannot complete an export job");
        }
    }
}

/// What a unit's heartbeat task found; the task ends when the unit's work does.
struct Heartbeat {
    cancelled: Arc<AtomicBool>,
    lease_lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    /// Returns once the job is cancelled (through any process).
    async fn until_cancelled(&self) {
        while !self.cancelled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Export workers are batch work: requests (status polls above all) should not wait behind
/// them. Under SCHED_IDLE any waking request thread preempts a worker at once, whereas a nice
/// level only shrinks the worker's share and still lets it finish its time slice (measured:
/// status p99 under wrk 3.5–3.8 ms against 4.5–5.7 ms at nice 10). Where SCHED_IDLE cannot be
/// set, nice 10 is the fallback.
fn lower_thread_priority(priority: WorkerPriority) {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid, sched_setscheduler and setpriority only read their arguments; a failure
    // leaves the priority as it was, which is harmless.
    unsafe {
        let thread = libc::gettid();
        let param = libc::sched_param { sched_priority: 0 };
        if priority == WorkerPriority::Low
            || libc::sched_setscheduler(thread, libc::SCHED_IDLE, &param) != 0
        {
            libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, 10);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

/// Files of a unit's earlier attempts (a crash, a lost lease) must not linger.
fn remove_earlier_attempts(dir: &Path, unit_no: i64) {
    let prefix = format!("u{unit_no}-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_short_and_grouped() {
        assert_eq!(group_thousands(189_111), "189,111");
        assert_eq!(group_thousands(12), "12");
        assert_eq!(group_thousands(1_000), "1,000");
    }

    fn running_job(estimated: u64, done: u64, started_at: Option<Micros>) -> JobRecord {
        JobRecord {
            id: "job".into(),
            client: "client".into(),
            status: JobStatus::Running,
            request: String::new(),
            request_url: String::new(),
            snapshot: hearth_store::jobs::Snapshot {
                seq: 0,
                transaction_time: 0,
            },
            created_at: 0,
            started_at,
            completed_at: None,
            expires_at: None,
            polls: 1,
            manifest_shown: false,
            estimated_resources: estimated,
            done_resources: done,
            units_total: 1,
            units_done: 0,
            manifest: None,
            error: None,
        }
    }

    fn retry_after(job: &JobRecord, now: Micros) -> u64 {
        match in_progress(job, now) {
            JobView::InProgress { retry_after, .. } => retry_after,
            other => panic!("not in progress: {other:?}"),
        }
    }

    #[test]
    fn retry_after_is_the_expected_remaining_time_within_one_and_120_seconds() {
        let second = 1_000_000;
        // 10,000 of 1,000,000 in 10 s: 990 s to go, told as the 120 s ceiling.
        assert_eq!(
            retry_after(&running_job(1_000_000, 10_000, Some(0)), 10 * second),
            120
        );
        // 400,000 of 1,000,000 in 10 s: 15 s to go.
        assert_eq!(
            retry_after(&running_job(1_000_000, 400_000, Some(0)), 10 * second),
            15
        );
        // Almost done: at least 1 s.
        assert_eq!(
            retry_after(&running_job(1_000_000, 999_999, Some(0)), 10 * second),
            1
        );
        // Not started, or nothing done yet: no rate to go by.
        assert_eq!(
            retry_after(&running_job(1_000_000, 0, None), 10 * second),
            1
        );
        assert_eq!(
            retry_after(&running_job(1_000_000, 0, Some(0)), 10 * second),
            1
        );
    }

    #[test]
    fn progress_names_real_counts_and_a_queued_job() {
        let mut job = running_job(189_111, 77_512, Some(0));
        assert_eq!(progress(&job), "40% (77,512 of 189,111 resources)");
        job.status = JobStatus::Queued;
        job.done_resources = 0;
        assert_eq!(progress(&job), "0% (0 of 189,111 resources), queued");
        // An estimate that fell short never shows more than 99 % before the job completes.
        job.status = JobStatus::Running;
        job.done_resources = 200_000;
        assert_eq!(progress(&job), "99% (200,000 of 200,000 resources)");
        job.status = JobStatus::Completed;
        assert_eq!(progress(&job), "100% (200,000 of 200,000 resources)");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn workers_take_the_cpu_share_their_priority_names() {
        let on_a_worker_thread = |priority| {
            std::thread::spawn(move || {
                lower_thread_priority(priority);
                // SAFETY: both calls only read the calling thread's scheduling state.
                unsafe {
                    (
                        libc::sched_getscheduler(0),
                        libc::getpriority(libc::PRIO_PROCESS, 0),
                    )
                }
            })
            .join()
            .unwrap()
        };
        let (policy, _) = on_a_worker_thread(WorkerPriority::Idle);
        assert_eq!(policy, libc::SCHED_IDLE);
        let (policy, nice) = on_a_worker_thread(WorkerPriority::Low);
        assert_eq!(policy, libc::SCHED_OTHER);
        assert_eq!(nice, 10);
    }
}
