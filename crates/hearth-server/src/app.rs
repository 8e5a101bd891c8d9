//! Wiring the embedded default: SQLite store, export engine and HTTP state from one data
//! directory. The CLI and the tests start servers the same way.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hearth_export::{EngineConfig, ExportEngine};
use hearth_store::{Backend, SqliteStore, StoreError};

use crate::auth::{AuthSettings, Authorizer};
use crate::{AppState, ServerConfig};

/// Export settings of a server.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub workers: usize,
    pub max_file_bytes: u64,
    pub ttl: Duration,
    pub max_active_exports: u64,
    pub rows_per_unit: u64,
    /// How long a claimed export unit stays claimed without a renewal.
    pub lease: Duration,
    /// How export workers share the CPU with request handling.
    pub worker_priority: hearth_export::WorkerPriority,
    /// Where finished export files are kept (default: the data directory).
    pub output: hearth_export::Output,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_file_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(24 * 3600),
            max_active_exports: 16,
            rows_per_unit: 100_000,
            lease: hearth_export::DEFAULT_LEASE,
            worker_priority: hearth_export::WorkerPriority::default(),
            output: hearth_export::Output::Local,
        }
    }
}

/// A running embedded stack.
pub struct Embedded {
    pub state: AppState,
    pub store: Arc<dyn Backend>,
    pub engine: ExportEngine,
}

impl Embedded {
    /// Starts the export engine over an open store (export files under `<data_dir>/exports`).
    pub async fn start(
        store: Arc<dyn Backend>,
        data_dir: &Path,
        config: ServerConfig,
        export: ExportSettings,
    ) -> Result<Self, StoreError> {
        Self::start_secured(store, data_dir, config, export, &AuthSettings::default()).await
    }

    /// [`Embedded::start`] with authorization: manifests then say `requiresAccessToken`, and
    /// every request needs a token.
    pub async fn start_secured(
        store: Arc<dyn Backend>,
        data_dir: &Path,
        config: ServerConfig,
        export: ExportSettings,
        auth: &AuthSettings,
    ) -> Result<Self, StoreError> {
        let base_url = config.base_url.clone();
        let engine = ExportEngine::start(
            store.clone(),
            EngineConfig {
                export_dir: data_dir.join("exports"),
                output: export.output.clone(),
                base_url: config.base_url.clone(),
                workers: export.workers,
                max_file_bytes: export.max_file_bytes,
                ttl: export.ttl,
                max_active_exports: export.max_active_exports,
                requires_access_token: auth.is_on(),
                rows_per_unit: export.rows_per_unit,
                lease: export.lease,
                worker_priority: export.worker_priority,
            },
        )
        .await?;
        let authorizer = Authorizer::start(auth, store.clone(), &base_url).await?;
        let state = AppState::new(store.clone(), engine.clone(), config).with_auth(authorizer);
        Ok(Self {
            state,
            store,
            engine,
        })
    }

    /// Opens the store in `data_dir` and starts everything.
    pub async fn open(
        data_dir: &Path,
        config: ServerConfig,
        export: ExportSettings,
    ) -> Result<Self, StoreError> {
        let dir = data_dir.to_owned();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))??;
        Self::start(Arc::new(store), data_dir, config, export).await
    }

    /// Stops the workers, then flushes and closes the store.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.engine.shutdown().await;
        self.store.close().await
    }
}
