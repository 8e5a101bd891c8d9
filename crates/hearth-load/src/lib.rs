//! The bulk loader behind `hearth load`.
//!
//! One thread reads and checks resources (NDJSON lines, gzip NDJSON, Bundle entries) and fills
//! batches bounded by bytes; the caller's async task hands each batch to the target: straight
//! into a [`Store`] (one transaction per batch on the store's writer thread), or to a running
//! server as `batch` Bundles of `PUT`s. Reading and writing overlap; memory is bounded by the
//! batch size times the channel depth. A resource that cannot be loaded is reported with its
//! `file:line` and skipped; every valid one is still loaded. Loads are upserts by id and
//! unchanged content writes nothing, so loading the same file twice leaves the same data.

pub mod source;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use hearth_fhir::envelope::{IdPolicy, prepare};
use hearth_store::{Store, WriteError, WriteKind, WriteOp, Written};
use serde::Deserialize;
use tokio::sync::mpsc;

pub use source::{Origin, expand_paths};

/// The code a server puts in a batch entry's outcome when an update changed nothing (HAPI
/// FHIR's storage response code; Hearth uses it too).
const UNCHANGED_CODE: &str = "SUCCESSFUL_UPDATE_NO_CHANGE";

/// Why a load stopped (as opposed to a single resource being rejected).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not a .ndjson, .ndjson.gz, .json or .json.gz file")]
    UnknownFileKind(String),
    #[error(transparent)]
    Store(#[from] hearth_store::StoreError),
    #[error("the server refused a batch: {0}")]
    Server(String),
    #[error("the reading thread failed: {0}")]
    Reader(String),
}

/// Where loaded resources go.
#[derive(Clone)]
pub enum Target {
    Store(Arc<dyn Store>),
    Server {
        /// FHIR base URL, e.g. `http://127.0.0.1:8080/fhir`.
        base_url: String,
        client: reqwest::Client,
    },
}

/// Batch limits: whichever is reached first closes a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub resources: usize,
    pub bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            resources: 2_000,
            bytes: 8 * 1024 * 1024,
        }
    }
}

/// Per-type outcome counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeCounts {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub by_type: BTreeMap<String, TypeCounts>,
    /// Resources accepted by the target.
    pub loaded: u64,
    /// Resources (or unreadable items) reported and skipped.
    pub rejected: u64,
    /// Bytes of accepted resources as read.
    pub bytes: u64,
    pub files: usize,
}

/// One skipped item.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub origin: Origin,
    pub reason: String,
}

/// Told about progress and rejections while loading.
pub trait LoadObserver: Send {
    fn progress(&mut self, _report: &LoadReport) {}
    fn rejected(&mut self, rejection: &Rejection);
}

struct Batch {
    ops: Vec<WriteOp>,
    /// For the server target: the original bytes and where they came from.
    originals: Vec<(Origin, Vec<u8>)>,
    bytes: u64,
}

enum Message {
    Batch(Batch),
    Rejected(Rejection),
}

/// Loads every resource of `files` into `target`.
pub async fn load(
    files: Vec<PathBuf>,
    target: Target,
    limits: BatchLimits,
    observer: &mut dyn LoadObserver,
) -> Result<LoadReport, LoadError> {
    // Two prepared batches ahead of the store are enough to keep its writer busy; each more
    // costs about 16 MB (a batch's bytes and their prepared copy).
    let (sender, mut receiver) = mpsc::channel::<Message>(2);
    let keep_originals = matches!(target, Target::Server { .. });
    let file_count = files.len();
    let reader = std::thread::Builder::new()
        .name("hearth-load-reader".into())
        .spawn(move || read_all(files, sender, limits, keep_originals))
        .map_err(|e| LoadError::Reader(e.to_string()))?;

    let mut report = LoadReport {
        files: file_count,
        ..LoadReport::default()
    };
    // A store takes the next batch while earlier ones wait for their commit, so it can fold
    // them into one; results are counted in batch order as commits come back.
    let mut committing = FuturesOrdered::new();
    while let Some(message) = receiver.recv().await {
        match message {
            Message::Rejected(rejection) => {
                report.rejected += 1;
                observer.rejected(&rejection);
            }
            Message::Batch(batch) => match &target {
                Target::Store(store) => {
                    let pending = store.write_queued(batch.ops).await?;
                    let bytes = batch.bytes;
                    committing.push_back(async move {
                        pending
                            .committed()
                            .await
                            .map(|results| StoreWritten { results, bytes })
                    });
                    while let Some(Some(written)) = committing.next().now_or_never() {
                        count_written(written?, &mut report);
                        observer.progress(&report);
                    }
                }
                Target::Server { base_url, client } => {
                    send_to_server(client, base_url, batch, &mut report, observer).await?;
                    observer.progress(&report);
                }
            },
        }
    }
    while let Some(written) = committing.next().await {
        count_written(written?, &mut report);
        observer.progress(&report);
    }
    reader
        .join()
        .map_err(|_| LoadError::Reader("the reading thread panicked".into()))??;
    if let Target::Store(store) = &target {
        store.settle_after_load().await?;
    }
    Ok(report)
}

fn read_all(
    files: Vec<PathBuf>,
    sender: mpsc::Sender<Message>,
    limits: BatchLimits,
    keep_originals: bool,
) -> Result<(), LoadError> {
    let new_batch = || Batch {
        ops: Vec::with_capacity(limits.resources),
        originals: Vec::new(),
        bytes: 0,
    };
    let mut batch = new_batch();
    let mut closed = false;
    for file in files {
        source::read_file(&file, &mut |origin, item| {
            if closed {
                return;
            }
            let outcome = item.and_then(|bytes| {
                prepare(bytes, None, IdPolicy::FromBody)
                    .map(|resource| (resource, bytes))
                    .map_err(|e| e.to_string())
            });
            match outcome {
                Err(reason) => {
                    closed |= sender
                        .blocking_send(Message::Rejected(Rejection { origin, reason }))
                        .is_err();
                }
                Ok((resource, bytes)) => {
                    batch.bytes += bytes.len() as u64;
                    if keep_originals {
                        batch.originals.push((origin, bytes.to_vec()));
                    }
                    batch.ops.push(WriteOp::Put {
                        resource,
                        if_match: None,
                    });
                    if batch.ops.len() >= limits.resources || batch.bytes >= limits.bytes as u64 {
                        let full = std::mem::replace(&mut batch, new_batch());
                        closed |= sender.blocking_send(Message::Batch(full)).is_err();
                    }
                }
            }
        })?;
    }
    if !batch.ops.is_empty() {
        let _ = sender.blocking_send(Message::Batch(batch));
    }
    Ok(())
}

fn count(report: &mut LoadReport, resource_type: &str, kind: WriteKind) {
    let counts = report.by_type.entry(resource_type.to_owned()).or_default();
    match kind {
        WriteKind::Created => counts.created += 1,
        WriteKind::Updated => counts.updated += 1,
        WriteKind::Unchanged => counts.unchanged += 1,
        WriteKind::Deleted | WriteKind::NotPresent => counts.deleted += 1,
    }
    report.loaded += 1;
}

/// What one batch written to a store did.
struct StoreWritten {
    results: Vec<Result<Written, WriteError>>,
    bytes: u64,
}

fn count_written(written: StoreWritten, report: &mut LoadReport) {
    for written in written.results.into_iter().flatten() {
        count(report, written.resource_type, written.kind);
    }
    report.bytes += written.bytes;
}

#[derive(Deserialize)]
struct BatchResponse {
    #[serde(default)]
    entry: Vec<ResponseEntry>,
}

#[derive(Deserialize)]
struct ResponseEntry {
    response: Option<EntryResponse>,
}

#[derive(Deserialize)]
struct EntryResponse {
    status: String,
    outcome: Option<serde_json::Value>,
}

async fn send_to_server(
    client: &reqwest::Client,
    base_url: &str,
    batch: Batch,
    report: &mut LoadReport,
    observer: &mut dyn LoadObserver,
) -> Result<(), LoadError> {
    let mut body = Vec::with_capacity(batch.bytes as usize + batch.ops.len() * 80 + 64);
    body.extend_from_slice(br#"{"resourceType":"Bundle","type":"batch","entry":["#);
    let mut types = Vec::with_capacity(batch.ops.len());
    for (i, (op, (_, original))) in batch.ops.iter().zip(&batch.originals).enumerate() {
        let WriteOp::Put { resource, .. } = op else {
            continue;
        };
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"resource\":");
        body.extend_from_slice(original);
        body.extend_from_slice(b",\"request\":{\"method\":\"PUT\",\"url\":");
        let url = format!("{}/{}", resource.resource_type, resource.id);
        body.extend_from_slice(serde_json::to_string(&url).unwrap_or_default().as_bytes());
        body.extend_from_slice(b"}}");
        types.push(resource.resource_type);
    }
    body.extend_from_slice(b"]}");
    let response = client
        .post(base_url.trim_end_matches('/'))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(body)
        .send()
        .await
        .map_err(|e| LoadError::Server(e.to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| LoadError::Server(e.to_string()))?;
    if !status.is_success() {
        return Err(LoadError::Server(format!("HTTP {status}: {text}")));
    }
    let parsed: BatchResponse = serde_json::from_str(&text)
        .map_err(|e| LoadError::Server(format!("unreadable batch-response: {e}")))?;
    for ((entry, resource_type), (origin, _)) in parsed.entry.iter().zip(types).zip(batch.originals)
    {
        let status = entry
            .response
            .as_ref()
            .map(|r| r.status.as_str())
            .unwrap_or("");
        let unchanged = entry
            .response
            .as_ref()
            .and_then(|r| r.outcome.as_ref())
            .and_then(|o| o.pointer("/issue/0/details/coding/0/code"))
            .and_then(|c| c.as_str())
            == Some(UNCHANGED_CODE);
        match status.split(' ').next() {
            Some("201") => count(report, resource_type, WriteKind::Created),
            Some("200") if unchanged => count(report, resource_type, WriteKind::Unchanged),
            Some("200") => count(report, resource_type, WriteKind::Updated),
            _ => {
                report.rejected += 1;
                let reason = entry
                    .response
                    .as_ref()
                    .and_then(|r| r.outcome.as_ref())
                    .and_then(|o| o.pointer("/issue/0/diagnostics"))
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("the server answered {status}"));
                observer.rejected(&Rejection { origin, reason });
            }
        }
    }
    report.bytes += batch.bytes;
    Ok(())
}
