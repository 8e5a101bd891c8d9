//! Hearth's HTTP edge: routing, content negotiation, the FHIR REST interactions and the
//! CapabilityStatement. Errors from the lower crates become `OperationOutcome`s here and only
//! here ([`error::ApiError`]).
//!
//! # Layout
//! - [`app`]: wiring the embedded store, export engine and state from a data directory.
//! - [`rest`]: create, read, vread, update, delete, history.
//! - [`search`]: type-level search with keyset paging.
//! - [`bundle`]: transaction and batch Bundles.
//! - [`capability`]: `GET /metadata` and the OperationDefinitions Hearth serves.
//! - [`export`]: the Bulk Data endpoints (kick-off, status, cancel, downloads).
//! - [`http_util`]: negotiation, bodies and headers shared by the handlers.
//! - [`auth`]: authorization (SMART Backend Services, external OpenID Connect providers).
//! - [`limits`]: request deadlines and the poll rate per export job.
//! - [`transport`]: the accept loop: HTTPS, header limits, stalled clients, connection limits.

pub mod app;
pub mod auth;
pub mod bundle;
pub mod capability;
pub mod error;
pub mod export;
pub mod http_util;
pub mod limits;
pub mod rest;
pub mod search;
pub mod transport;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hearth_export::ExportEngine;
use hearth_store::Backend;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;

/// Where FHIR lives on the server.
pub const FHIR_PATH: &str = "/fhir";

pub use app::{Embedded, ExportSettings};
pub use auth::AuthSettings;
pub use transport::{ServeOptions, load_tls, serve_with};

/// What the HTTP edge needs to know.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The public FHIR base URL, used in every absolute URL the server hands out.
    pub base_url: String,
    /// Larger request bodies are refused with `413`.
    pub max_body_bytes: usize,
    /// Accept an export kick-off without an `Accept` header.
    pub lenient_headers: bool,
}

/// Shared by every request.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Backend>,
    pub engine: ExportEngine,
    pub config: Arc<ServerConfig>,
    capability: Arc<Bytes>,
    /// Present when authorization is on ([`AppState::with_auth`]).
    pub auth: Option<Arc<auth::Authorizer>>,
    /// Paces status polls per job ([`AppState::with_poll_throttle`]); off by default.
    pub polls: Arc<limits::PollThrottle>,
}

impl AppState {
    pub fn new(store: Arc<dyn Backend>, engine: ExportEngine, config: ServerConfig) -> Self {
        let started = hearth_fhir::instant::format_instant(hearth_fhir::instant::now_micros());
        let capability = capability::capability_statement(&config.base_url, &started);
        Self {
            store,
            engine,
            config: Arc::new(config),
            capability: Arc::new(Bytes::from(capability)),
            auth: None,
            polls: Arc::new(limits::PollThrottle::new(false)),
        }
    }

    /// Answers `429` to status polls that come sooner than the last `Retry-After` asked.
    pub fn with_poll_throttle(mut self, enabled: bool) -> Self {
        self.polls = Arc::new(limits::PollThrottle::new(enabled));
        self
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no FHIR interaction at {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("the request handler panicked".into()).into_response()
}

/// All routes, with the layers every request passes.
pub fn router(state: AppState) -> Router {
    let fhir = Router::new()
        .route("/", post(bundle::process))
        .route("/metadata", get(capability::metadata))
        .route(
            "/.well-known/smart-configuration",
            get(auth::smart::discovery),
        )
        .route("/auth/token", post(auth::smart::token))
        .route("/$export", get(export::kick_off).post(export::kick_off))
        .route(
            "/Patient/$export",
            get(export::kick_off_patient).post(export::kick_off_patient),
        )
        .route(
            "/Group/{id}/$export",
            get(export::kick_off_group).post(export::kick_off_group),
        )
        .route(
            "/$export-poll-status",
            get(export::poll_status)
                .post(export::poll_status)
                .delete(export::poll_status),
        )
        .route(
            "/Binary/{id}",
            get(export::binary)
                .put(rest::update_binary)
                .delete(rest::delete_binary),
        )
        .route(
            "/OperationDefinition/{id}",
            get(capability::operation_definition)
                .put(rest::update_operation_definition)
                .delete(rest::delete_operation_definition),
        )
        .route("/{type}", get(search::search).post(rest::create))
        .route(
            "/{type}/{id}",
            get(rest::read).put(rest::update).delete(rest::delete),
        )
        .route("/{type}/{id}/_history", get(rest::history))
        .route("/{type}/{id}/_history/{version}", get(rest::vread))
        .method_not_allowed_fallback(method_not_allowed);
    let app = Router::new().nest(FHIR_PATH, fhir).fallback(not_found);
    // Only with authorization on: otherwise every request goes exactly as before.
    let app = if state.auth.is_some() {
        app.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::middleware::enforce,
        ))
    } else {
        app
    };
    app.with_state(state)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
}

/// Serves plain HTTP with the default limits until `shutdown` resolves, then lets in-flight
/// requests finish ([`serve_with`] for HTTPS and other limits).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, ServeOptions::default(), shutdown).await
}
