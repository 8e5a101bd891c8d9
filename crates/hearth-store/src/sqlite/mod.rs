//! The embedded backend: SQLite in WAL mode under a data directory.
//!
//! One writer thread owns the only writing connection, so change sequence numbers and
//! `lastUpdated` values are handed out in commit order without locks. Readers take a connection
//! from a small pool on tokio's blocking threads; SQLite work never runs on the async workers.

mod clients;
mod jobs;
mod read;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use hearth_fhir::instant::Micros;
use rusqlite::{Connection, OpenFlags};

use crate::Store;
use crate::error::{StoreError, WriteError};
use crate::model::{
    BatchMode, PendingWrite, SearchPage, SearchQuery, Seq, StoredVersion, WriteOp, Written,
};

pub use crate::resource_key;
pub use jobs::scan;
pub use schema::SCHEMA_VERSION;
use writer::{Writer, WriterHandle};

/// The file name of the database inside the data directory.
pub const DATABASE_FILE: &str = "hearth.db";

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: WriterHandle,
    readers: Mutex<Vec<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let mut conn = Connection::open(&path)?;
        schema::migrate(&mut conn)?;
        let writer = Writer::spawn(conn)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer,
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `work` with a reader connection on a blocking thread.
    async fn with_reader<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = inner.take_reader()?;
            let result = work(&conn);
            inner.return_reader(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Internal(format!("reader task failed: {e}")))?
    }

    /// A reader connection for long scans on the caller's own (blocking) thread.
    pub fn open_reader(&self) -> Result<Connection, StoreError> {
        self.inner.open_reader()
    }
}

impl Inner {
    fn open_reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        schema::configure(&conn, schema::READER_CACHE_KIB)?;
        Ok(conn)
    }

    fn take_reader(&self) -> Result<Connection, StoreError> {
        let pooled = self.readers.lock().ok().and_then(|mut pool| pool.pop());
        match pooled {
            Some(conn) => Ok(conn),
            None => self.open_reader(),
        }
    }

    fn return_reader(&self, conn: Connection) {
        // Idle connections beyond what concurrent requests used are simply closed.
        if let Ok(mut pool) = self.readers.lock()
            && pool.len() < 16
        {
            pool.push(conn);
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(
        &self,
        ops: Vec<WriteOp>,
        mode: BatchMode,
    ) -> Result<Vec<Result<Written, WriteError>>, StoreError> {
        self.inner.writer.write(ops, mode).await
    }

    async fn write_queued(&self, ops: Vec<WriteOp>) -> Result<PendingWrite, StoreError> {
        self.inner.writer.write_queued(ops).await
    }

    async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredVersion>, StoreError> {
        let (resource_type, id) = (resource_type.to_owned(), id.to_owned());
        self.with_reader(move |conn| read::current(conn, &resource_type, &id))
            .await
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>, StoreError> {
        let (resource_type, id) = (resource_type.to_owned(), id.to_owned());
        self.with_reader(move |conn| read::version(conn, &resource_type, &id, version))
            .await
    }

    async fn history(
        &self,
        resource_type: &str,
        id: &str,
        before_version: Option<u64>,
        count: usize,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        let (resource_type, id) = (resource_type.to_owned(), id.to_owned());
        self.with_reader(move |conn| {
            read::history(conn, &resource_type, &id, before_version, count)
        })
        .await
    }

    async fn search(&self, query: SearchQuery) -> Result<SearchPage, StoreError> {
        self.with_reader(move |conn| read::search(conn, &query))
            .await
    }

    async fn seq_at(&self, instant: Micros) -> Result<Seq, StoreError> {
        self.with_reader(move |conn| read::seq_at(conn, instant))
            .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.writer.close().await?;
        if let Ok(mut pool) = self.inner.readers.lock() {
            pool.clear();
        }
        Ok(())
    }
}
