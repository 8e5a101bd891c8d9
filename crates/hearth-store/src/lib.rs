//! Persistence for Hearth behind one [`Store`] trait.
//!
//! # Layout
//! - [`model`]: what goes in and comes out (write operations, stored versions, search pages).
//! - [`error`]: the store's error types.
//! - [`jobs`]: durable export jobs, work units with leases, and their files.
//! - [`clients`]: registered SMART clients, assertion replay cache, the token secret.
//! - [`sqlite`]: the embedded backend (one writer thread, a pool of readers, WAL mode).
//! - [`postgres`]: the scale-out backend (several Hearth processes on one database).
//!
//! Every write gets a **change sequence** number (`seq`) and a strictly increasing
//! `lastUpdated` from the single writer, in the same transaction as the data. Every version is
//! kept; a delete is a tombstone version. Because `lastUpdated` grows with `seq`, any instant
//! maps to a sequence number, and time windows (`_since`, `_lastUpdated`) become `seq` ranges
//! over one index.

pub mod clients;
pub mod error;
pub mod jobs;
pub mod model;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use hearth_fhir::instant::Micros;

pub use error::{StoreError, WriteError};
pub use model::{
    BatchMode, PendingWrite, SearchPage, SearchQuery, Seq, StoredVersion, WriteKind, WriteOp,
    Written,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// The 64-bit key of a resource, `xxh3("type/id")`, that the id and compartment indexes use.
/// Stable across versions of Hearth: it is stored.
pub fn resource_key(resource_type: &str, id: &str) -> i64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(resource_type.as_bytes());
    hasher.update(b"/");
    hasher.update(id.as_bytes());
    hasher.digest() as i64
}

/// The keys of these Patients, as the compartment index holds them.
pub(crate) fn patient_keys(patients: &[String]) -> Vec<i64> {
    patients
        .iter()
        .map(|p| resource_key("Patient", p))
        .collect()
}

/// Opens the store a command points at: the PostgreSQL database `database` names
/// (`postgres://…`), or else the embedded SQLite store in `data_dir`. Must be called inside a
/// tokio runtime.
pub async fn open(
    database: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Backend>, StoreError> {
    match database {
        Some(url) if postgres::is_postgres_url(url) => {
            Ok(std::sync::Arc::new(PgStore::connect(url).await?))
        }
        Some(other) => Err(StoreError::UnsupportedDatabase(other.to_owned())),
        None => {
            let dir = data_dir.to_owned();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))??;
            Ok(std::sync::Arc::new(store))
        }
    }
}

/// Everything a Hearth server needs from its storage.
pub trait Backend: Store + jobs::JobStore + jobs::ScanSource + clients::ClientStore {}
impl<T: Store + jobs::JobStore + jobs::ScanSource + clients::ClientStore> Backend for T {}

/// What every storage backend offers. Methods never block the async runtime.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies write operations. In [`BatchMode::Atomic`] the first failing operation rolls
    /// everything back and is reported as [`StoreError::Entry`]; in [`BatchMode::Independent`]
    /// each operation succeeds or fails on its own.
    async fn write(
        &self,
        ops: Vec<WriteOp>,
        mode: BatchMode,
    ) -> Result<Vec<Result<Written, WriteError>>, StoreError>;

    /// For bulk loads: applies `ops` as [`BatchMode::Independent`], returning once the store has
    /// taken them (their memory is free to reuse), with a handle that resolves at the commit.
    /// A store may then fold the batches that keep arriving into one commit.
    async fn write_queued(&self, ops: Vec<WriteOp>) -> Result<PendingWrite, StoreError> {
        Ok(PendingWrite::done(
            self.write(ops, BatchMode::Independent).await,
        ))
    }

    /// Called once a bulk load has finished, for whatever makes the loaded data fast to read.
    async fn settle_after_load(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The newest version of a resource, which may be a tombstone.
    async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredVersion>, StoreError>;

    /// One version of a resource.
    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>, StoreError>;

    /// Versions of one resource, newest first, older than `before_version` when given.
    async fn history(
        &self,
        resource_type: &str,
        id: &str,
        before_version: Option<u64>,
        count: usize,
    ) -> Result<Vec<StoredVersion>, StoreError>;

    /// Current, non-deleted resources of one type, in change-sequence order.
    async fn search(&self, query: SearchQuery) -> Result<SearchPage, StoreError>;

    /// The last change sequence number whose `lastUpdated` is at or before `instant`.
    async fn seq_at(&self, instant: Micros) -> Result<Seq, StoreError>;

    /// Flushes and closes; later calls fail.
    async fn close(&self) -> Result<(), StoreError>;
}
