//! The scale-out backend: PostgreSQL, shared by any number of Hearth processes.
//!
//! The tables and queries mirror the SQLite backend's. What differs is concurrency: there is no
//! single writer thread, so writers serialise on the clock row (sequence numbers stay in commit
//! order), and export units are claimed with `FOR UPDATE SKIP LOCKED` leases.

mod clients;
mod copy;
mod jobs;
mod nodelay;
mod read;
mod schema;
pub mod testing;
mod write;

use std::str::FromStr;

use async_trait::async_trait;
use hearth_fhir::instant::Micros;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::runtime::Handle;

use crate::Store;
use crate::error::{StoreError, WriteError};
use crate::model::{BatchMode, SearchPage, SearchQuery, Seq, StoredVersion, WriteOp, Written};

pub use schema::SCHEMA_VERSION;

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// PostgreSQL-backed [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Export scans are called from plain worker threads and run their queries here.
    runtime: Handle,
}

impl PgStore {
    /// Connects to `url` and brings the schema up to date. Must be called inside a tokio
    /// runtime.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("hearth");
        let pool = PgPoolOptions::new()
            // Each export worker holds one connection while it scans and takes another for its
            // lease and cancel checks; HTTP requests need the rest.
            .max_connections(32)
            .min_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // NULL over a Unix socket, where Nagle's algorithm does not apply.
                    let port: Option<i32> = sqlx::query_scalar("SELECT inet_client_port()")
                        .fetch_one(conn)
                        .await?;
                    if let Some(port) = port.and_then(|p| u16::try_from(p).ok()) {
                        nodelay::set_on_local_port(port);
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        schema::migrate(&pool).await?;
        Ok(Self {
            pool,
            runtime: Handle::current(),
        })
    }
}

#[async_trait]
impl Store for PgStore {
    async fn write(
        &self,
        ops: Vec<WriteOp>,
        mode: BatchMode,
    ) -> Result<Vec<Result<Written, WriteError>>, StoreError> {
        write::apply(&self.pool, ops, mode).await
    }

    /// Statistics for the planner, and the visibility map, without which counting a type's rows
    /// (export planning) reads every heap page and the first export rewrites every page to set
    /// hint bits.
    async fn settle_after_load(&self) -> Result<(), StoreError> {
        sqlx::query("VACUUM (ANALYZE) resource_version, compartment_member")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredVersion>, StoreError> {
        read::current(&self.pool, resource_type, id).await
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>, StoreError> {
        read::version(&self.pool, resource_type, id, version).await
    }

    async fn history(
        &self,
        resource_type: &str,
        id: &str,
        before_version: Option<u64>,
        count: usize,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        read::history(&self.pool, resource_type, id, before_version, count).await
    }

    async fn search(&self, query: SearchQuery) -> Result<SearchPage, StoreError> {
        read::search(&self.pool, &query).await
    }

    async fn seq_at(&self, instant: Micros) -> Result<Seq, StoreError> {
        read::seq_at(&self.pool, instant).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.pool.close().await;
        Ok(())
    }
}
