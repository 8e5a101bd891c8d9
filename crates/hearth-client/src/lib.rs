//! A FHIR Bulk Data client that follows the HL7 Bulk Data Access IG (STU2, with STU3
//! additions) and works with the Danish eHealth `$export-poll-status?_jobId=` servers: it
//! knows nothing of Hearth's internals and talks to any conforming server.
//!
//! # Brief overview
//! - [`BulkClient`]: one server. [`BulkClient::kick_off`] starts an export (GET, or POST with
//!   a `Parameters` body when `patient` is given), [`BulkClient::wait`] polls the status URL
//!   honouring `Retry-After` (seconds or HTTP-date) and backing off exponentially without it
//!   or on `429`/`5xx`, [`BulkClient::download`] fetches the files in parallel and
//!   [`BulkClient::cancel`] sends the `DELETE`.
//! - [`export::run`]: all of it for a user: saves the files and the manifest, and for
//!   incremental runs the `transactionTime` to use as the next `_since`.
//! - [`Progress`]: callbacks for progress bars (the server's `X-Progress`, bytes and lines).
//!
//! # Downloads
//! Files are asked for with `Accept-Encoding: gzip` and decoded here, each on a writer
//! thread of its own, streamed to a temporary file beside the final one and renamed once
//! complete and verified against the manifest's `count`. Nothing holds a whole file in memory.
//! A dropped connection continues with `Range` on the identity representation from the
//! decoded length, whatever encoding the broken response had; a server that ignores the range
//! gets the file restarted.
//!
//! # Layout
//! - [`request`]: levels, parameters, GET query and POST `Parameters`.
//! - [`client`]: kick-off, polling, cancel, downloads.
//! - [`manifest`]: the complete-status body and the local file plan.
//! - [`auth`]: bearer tokens and SMART Backend Services.
//! - [`retry`]: `Retry-After` and backoff.
//! - [`state`]: the incremental-export state file.
//! - `sink`: the writer side of a download (decode, count, write, commit).
//! - `testing` (feature `testing`): fake Bulk Data servers for tests.

pub mod auth;
pub mod client;
pub mod error;
pub mod export;
mod lines;
pub mod manifest;
pub mod progress;
pub mod request;
pub mod retry;
mod sink;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::{BackendServices, Credentials, SigningKey};
pub use client::{BulkClient, Cancelled, ClientOptions, Completed};
pub use error::Error;
pub use export::{ExportJob, ExportSummary};
pub use manifest::{FileKind, Manifest, ManifestItem, PlannedFile, SavedFile};
pub use progress::{PollUpdate, Progress, Silent};
pub use request::{ExportRequest, Level};
pub use retry::RetryPolicy;
