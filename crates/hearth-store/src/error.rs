//! Errors of the store.

/// A failure of the storage itself, or of one entry of an atomic batch.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("PostgreSQL error: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("cannot use the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the data directory was written by a newer Hearth (schema {found}, this build knows {known})"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error(
        "unsupported database URL '{0}': use postgres://user@host:port/database, or no URL for the embedded store"
    )]
    UnsupportedDatabase(String),
    #[error("the store is closed")]
    Closed,
    #[error("entry {index} failed: {error}")]
    Entry { index: usize, error: WriteError },
    #[error("internal store error: {0}")]
    Internal(String),
}

/// Why one write operation was refused. Nothing of it was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("version conflict: If-Match asked for version {expected} but the current version is {}", current.map(|v| v.to_string()).unwrap_or_else(|| "none".into()))]
    VersionConflict { expected: u64, current: Option<u64> },
}
