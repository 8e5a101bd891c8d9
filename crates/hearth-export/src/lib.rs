//! Hearth's Bulk Data export engine.
//!
//! # Layout
//! - [`request`]: the kick-off parameters, validated (or refused by name).
//! - [`planner`]: a job split into units of resource type × change-sequence range, or of
//!   patient batches × compartment types.
//! - [`engine`]: kick-off, status, cancel, downloads, and the worker pool.
//! - [`unit`]: what a worker does with each row (de-duplication, `_elements`, routing).
//! - [`files`]: NDJSON files that roll over by size, and files of resource blocks
//!   (`organizeOutputBy`) that roll over between blocks.
//! - [`manifest`]: the completion manifest.
//! - [`output`]: where finished files live: the local export directory or object storage.
//! - `testing` (feature `testing`): an S3-compatible test server for other crates' tests.
//!
//! An export reads the store as of one change sequence number (its snapshot): a unit streams
//! the versions that were newest at that point, so writes during the export are left to the
//! next `_since` export, exactly once.

pub mod engine;
pub mod files;
pub mod manifest;
pub mod output;
pub mod planner;
pub mod request;
#[cfg(feature = "testing")]
pub mod testing;
pub mod unit;

pub use engine::{
    DEFAULT_LEASE, DownloadableFile, EngineConfig, ExportEngine, FileSource, JobView, KickOffError,
    WorkerPriority,
};
pub use output::{Output, OutputError, OutputSettings};
pub use request::{ElementSpec, ExportRequest, IgnoredParameter, Level, ParameterError};
