//! A whole export as a user asks for it: kick-off (or an existing job), wait, download, save
//! the manifest, remember the position for the next incremental run, release the job.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Url;
use serde::Serialize;

use crate::Error;
use crate::client::{BulkClient, Cancelled};
use crate::manifest::SavedFile;
use crate::progress::Progress;
use crate::request::ExportRequest;
use crate::state::{Checkpoint, IncrementalState, run_directory, state_key, write_atomically};

/// The manifest's name beside the files.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What to run.
#[derive(Debug, Clone)]
pub struct ExportJob {
    pub request: ExportRequest,
    /// Where files go. Incremental runs each get a subdirectory named after their
    /// `transactionTime`, so the runs can be applied in order.
    pub out_dir: PathBuf,
    /// Send the last run's `transactionTime` as `_since` and record this run's.
    pub incremental: bool,
    /// Continue the job at this status URL instead of starting one.
    pub resume: Option<String>,
    /// `DELETE` the job once every file is saved, so the server can drop its copies.
    pub release: bool,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportSummary {
    pub status_url: String,
    pub transaction_time: String,
    /// The `_since` sent (the previous run's position, for incremental runs).
    pub since: Option<String>,
    pub directory: PathBuf,
    pub manifest: PathBuf,
    pub files: Vec<SavedFile>,
    pub resources: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
    /// Kick-off until the manifest.
    pub wait_seconds: f64,
    /// Manifest until the last file was saved.
    pub download_seconds: f64,
}

/// Runs `job` to the end. `progress.kicked_off` names the status URL as soon as there is one,
/// so a caller that is interrupted can cancel the job.
pub async fn run(
    client: &BulkClient,
    job: &ExportJob,
    progress: Arc<dyn Progress>,
) -> Result<ExportSummary, Error> {
    create_dir(&job.out_dir)?;
    let mut request = job.request.clone();
    let key = state_key(client.base().as_str(), &request.identity());
    let mut state = None;
    if job.incremental {
        let loaded = IncrementalState::load(&job.out_dir)?;
        if let Some(checkpoint) = loaded.exports.get(&key) {
            request.since = Some(checkpoint.transaction_time.clone());
        }
        state = Some(loaded);
    }
    let started = Instant::now();
    let status_url = match &job.resume {
        Some(url) => Url::parse(url)
            .map_err(|e| Error::Invalid(format!("--resume '{url}' is not a URL: {e}")))?,
        None => client.kick_off(&request, &*progress).await?,
    };
    progress.kicked_off(status_url.as_str());
    let completed = client.wait(&status_url, &*progress).await?;
    let waited = started.elapsed();
    let manifest = &completed.manifest;
    let directory = if job.incremental {
        job.out_dir.join(run_directory(&manifest.transaction_time))
    } else {
        job.out_dir.clone()
    };
    create_dir(&directory)?;
    let plan = manifest.plan(&status_url, &directory)?;
    progress.manifest(manifest, &plan);
    let downloading = Instant::now();
    let files = client.download(plan, progress.clone()).await?;
    let downloaded = downloading.elapsed();
    let manifest_path = directory.join(MANIFEST_FILE);
    write_atomically(
        &directory.join(format!(".{MANIFEST_FILE}.part")),
        &manifest_path,
        &completed.body,
    )?;
    if let Some(mut state) = state {
        state.exports.insert(
            key,
            Checkpoint {
                transaction_time: manifest.transaction_time.clone(),
                directory: run_directory(&manifest.transaction_time),
            },
        );
        state.save(&job.out_dir)?;
    }
    if job.release {
        // Best effort: the files are saved, and a server that already dropped the job (or
        // answers 404 for finished jobs, as eHealth does) is no failure.
        match client.cancel(&status_url).await {
            Ok(Cancelled::Accepted | Cancelled::NotFound(_)) => {}
            Err(e) => tracing::debug!(error = %e, "releasing the finished job failed"),
        }
    }
    Ok(ExportSummary {
        status_url: status_url.to_string(),
        transaction_time: manifest.transaction_time.clone(),
        since: request.since.clone(),
        directory,
        manifest: manifest_path,
        resources: files
            .iter()
            .filter(|f| f.kind == crate::FileKind::Output)
            .map(|f| f.resources)
            .sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        wire_bytes: files.iter().map(|f| f.wire_bytes).sum(),
        files,
        wait_seconds: seconds(waited),
        download_seconds: seconds(downloaded),
    })
}

fn seconds(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0).round() / 1000.0
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}
