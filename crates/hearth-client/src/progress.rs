//! What the client reports while it works. Every method has an empty default, so an observer
//! implements only what it shows. Calls come from several threads at once (one per download),
//! hence `Send + Sync`; they must be cheap, as `file_progress` runs once per received chunk.

use std::time::Duration;

use crate::manifest::{Manifest, PlannedFile, SavedFile};

/// One answer of the status endpoint while the job runs.
#[derive(Debug, Clone)]
pub struct PollUpdate {
    /// The server's `X-Progress` text, if any.
    pub progress: Option<String>,
    /// Time since polling started.
    pub elapsed: Duration,
    /// How long the client waits before the next status request.
    pub next_poll: Duration,
}

pub trait Progress: Send + Sync {
    /// The kick-off was accepted (or `--resume` named the job): this URL is the job.
    fn kicked_off(&self, _status_url: &str) {}
    /// The job is still running.
    fn polled(&self, _update: &PollUpdate) {}
    /// A request failed in a way worth retrying; the client waits `wait` and tries again.
    fn retrying(&self, _what: &str, _reason: &str, _wait: Duration) {}
    /// The job is complete; `files` will be downloaded.
    fn manifest(&self, _manifest: &Manifest, _files: &[PlannedFile]) {}
    /// A download started.
    fn file_started(&self, _file: &PlannedFile) {}
    /// More of a file was saved: `bytes` uncompressed bytes holding `lines` complete lines,
    /// counted since the previous call for this file.
    fn file_progress(&self, _file: &PlannedFile, _bytes: u64, _lines: u64) {}
    /// A download was interrupted and continues from byte `offset` of the file.
    fn file_resumed(&self, _file: &PlannedFile, _offset: u64, _reason: &str) {}
    /// A download starts over: the `bytes` and `lines` reported so far for it are void.
    fn file_restarted(&self, _file: &PlannedFile, _bytes: u64, _lines: u64) {}
    /// A file is saved and verified.
    fn file_finished(&self, _file: &PlannedFile, _saved: &SavedFile) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
