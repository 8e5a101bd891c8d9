//! Authorization: off by default (the embedded demo is open), SMART Backend Services with
//! Hearth as its own authorization server (`--auth smart`), or bearer tokens of a trusted
//! OpenID Connect provider (`--auth oidc`).
//!
//! # Layout
//! - [`scopes`]: SMART v1/v2 scopes, down-graded to read and search.
//! - [`grants`]: what a verified token allows (scopes or eHealth roles).
//! - [`jwks`]: key sets, key selection, the JWKS URL cache.
//! - [`tokens`]: Hearth's own access tokens.
//! - [`smart`]: discovery and the token endpoint.
//! - [`oidc`]: tokens of an external provider.
//! - [`middleware`]: every request's token check and the per-interaction permission rules.
//!
//! The export handlers ask this module three things: which types a kick-off may export
//! ([`restrict_export`]), whether a job is the caller's ([`owns_job`], [`owns_file`]), and
//! whether a file's type is covered ([`check_file`]). Audit events go to the `audit` tracing
//! target with client id, job id and outcome; never a token, an assertion or resource content.

pub mod grants;
pub mod jwks;
pub mod middleware;
pub mod oidc;
pub mod scopes;
pub mod smart;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use hearth_export::{DownloadableFile, ExportRequest, Level};
use hearth_store::{Backend, StoreError};
use serde_json::{Value, json};

pub use grants::{Grants, Reach};
pub use oidc::OidcSettings;
use scopes::Access;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use jwks::JwksCache;
use tokens::{TokenError, TokenSigner};

/// The `oauth-uris` extension of `CapabilityStatement.rest.security`.
pub const OAUTH_URIS: &str =
    "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// Which authorization a server runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthKind {
    /// Every request is allowed; every job belongs to one anonymous client.
    #[default]
    Off,
    /// Hearth's own SMART Backend Services authorization server.
    Smart,
    /// Tokens of a trusted OpenID Connect provider.
    Oidc(OidcSettings),
}

/// Authorization settings of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    pub kind: AuthKind,
    /// How long Hearth's access tokens live (at most 300 s).
    pub token_lifetime: Duration,
    /// A JWKS URL is fetched again for an unknown `kid` at most this often.
    pub jwks_min_refetch: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            kind: AuthKind::Off,
            token_lifetime: Duration::from_secs(tokens::MAX_LIFETIME_SECS),
            jwks_min_refetch: Duration::from_secs(5),
        }
    }
}

impl AuthSettings {
    pub fn smart() -> Self {
        Self {
            kind: AuthKind::Smart,
            ..Self::default()
        }
    }

    pub fn oidc(settings: OidcSettings) -> Self {
        Self {
            kind: AuthKind::Oidc(settings),
            ..Self::default()
        }
    }

    pub fn is_on(&self) -> bool {
        self.kind != AuthKind::Off
    }
}

pub(crate) enum AuthMode {
    Smart {
        signer: Box<TokenSigner>,
        token_url: String,
        lifetime: Duration,
    },
    Oidc(OidcSettings),
}

/// The running authorization of a server (absent when it is off).
pub struct Authorizer {
    pub(crate) mode: AuthMode,
    pub(crate) store: Arc<dyn Backend>,
    pub(crate) jwks: JwksCache,
    pub(crate) base_url: String,
}

/// Why a request's bearer token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("this request needs an access token (Authorization: Bearer …)")]
    Missing,
    #[error("the Authorization header is not 'Bearer <token>'")]
    Malformed,
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl BearerError {
    /// The `WWW-Authenticate` challenge (RFC 6750 §3).
    pub fn challenge(&self) -> String {
        match self {
            Self::Missing => r#"Bearer realm="hearth""#.to_owned(),
            Self::Malformed => {
                r#"Bearer realm="hearth", error="invalid_request", error_description="expected Authorization: Bearer <token>""#
                    .to_owned()
            }
            Self::Token(e) => {
                // Quotes and backslashes would end the quoted string early.
                let description: String = e
                    .to_string()
                    .chars()
                    .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
                    .collect();
                format!(
                    r#"Bearer realm="hearth", error="invalid_token", error_description="{description}""#
                )
            }
        }
    }
}

impl From<BearerError> for ApiError {
    fn from(error: BearerError) -> Self {
        ApiError::Unauthorized {
            message: error.to_string(),
            challenge: error.challenge(),
        }
    }
}

impl Authorizer {
    /// Starts authorization as `settings` say; `None` when it is off. With `--auth smart` the
    /// token secret is read from the store (or created there on first start).
    pub async fn start(
        settings: &AuthSettings,
        store: Arc<dyn Backend>,
        base_url: &str,
    ) -> Result<Option<Arc<Self>>, StoreError> {
        let mode = match &settings.kind {
            AuthKind::Off => return Ok(None),
            AuthKind::Smart => {
                let mut fresh = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut fresh)
                    .map_err(|_| StoreError::Internal("no system randomness".into()))?;
                let secret = store.signing_secret(fresh).await?;
                AuthMode::Smart {
                    signer: Box::new(TokenSigner::new(base_url, &secret)),
                    token_url: token_url(base_url),
                    lifetime: settings
                        .token_lifetime
                        .min(Duration::from_secs(tokens::MAX_LIFETIME_SECS)),
                }
            }
            AuthKind::Oidc(oidc) => AuthMode::Oidc(oidc.clone()),
        };
        Ok(Some(Arc::new(Self {
            mode,
            store,
            jwks: JwksCache::new(settings.jwks_min_refetch),
            base_url: base_url.to_owned(),
        })))
    }

    /// Checks the request's bearer token.
    pub async fn bearer(&self, headers: &HeaderMap) -> Result<Grants, BearerError> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values.next().ok_or(BearerError::Missing)?;
        if values.next().is_some() {
            return Err(BearerError::Malformed);
        }
        let value = value.to_str().map_err(|_| BearerError::Malformed)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(BearerError::Malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(BearerError::Malformed);
        }
        match &self.mode {
            AuthMode::Smart { signer, .. } => {
                let claims = signer.verify(token)?;
                Ok(Grants::from_scopes(claims.sub, &claims.scope))
            }
            AuthMode::Oidc(settings) => Ok(oidc::verify(settings, &self.jwks, token).await?),
        }
    }

    /// `CapabilityStatement.rest.security`.
    fn security(&self) -> Value {
        match &self.mode {
            AuthMode::Smart { token_url, .. } => json!({
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }]}],
                "extension": [{
                    "url": OAUTH_URIS,
                    "extension": [{"url": "token", "valueUri": token_url}]
                }],
                "description": "SMART Backend Services: client_credentials with a private_key_jwt assertion (RS384 or ES384) at the token endpoint; system/ scopes v1 or v2, read and search only. Every interaction but metadata and discovery needs a bearer token; export jobs and files belong to the client that started them."
            }),
            AuthMode::Oidc(settings) => json!({
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "OAuth"
                }]}],
                "description": format!(
                    "Bearer tokens of the OpenID Connect provider {} with audience {}: SMART system/ scopes in 'scope', or roles ($bulk-export, <Type>.search, <Type>.read, Binary.read) in realm_access.roles. Export jobs and files belong to the token's subject.",
                    settings.issuer, settings.audience
                )
            }),
        }
    }
}

/// The token endpoint of a server at `base_url`.
pub fn token_url(base_url: &str) -> String {
    format!("{}/auth/token", base_url.trim_end_matches('/'))
}

impl AppState {
    /// Turns authorization on for this state (and says so in the CapabilityStatement).
    pub fn with_auth(mut self, auth: Option<Arc<Authorizer>>) -> Self {
        if let Some(auth) = &auth
            && let Ok(mut statement) = serde_json::from_slice::<Value>(&self.capability)
        {
            if let Some(rest) = statement
                .get_mut("rest")
                .and_then(|rest| rest.get_mut(0))
                .and_then(Value::as_object_mut)
            {
                rest.insert("security".into(), auth.security());
            }
            if let Ok(bytes) = serde_json::to_vec(&statement) {
                self.capability = Arc::new(Bytes::from(bytes));
            }
        }
        self.auth = auth;
        self
    }
}

/// Text from a request, cut short for a log line or an error message.
pub(crate) fn short(text: &str) -> String {
    let mut cut: String = text.chars().take(64).filter(|c| !c.is_control()).collect();
    if text.chars().count() > 64 {
        cut.push('…');
    }
    cut
}

/// An audit event for an authorization failure (warn level: worth a look).
pub(crate) fn audit_failure(event: &str, client: Option<&str>, outcome: &str, reason: &str) {
    tracing::warn!(target: "audit", event = %format_args!("auth.{event}"), client = client.unwrap_or("-"),
        outcome, reason, "authorization failed");
}

/// An audit event of the export flow.
pub fn audit(event: &str, grants: Option<&Grants>, job: &str, outcome: &str) {
    let client = grants.map_or("anonymous", |g| g.client.as_str());
    tracing::info!(target: "audit", event, client, job, outcome, "bulk data");
}

/// Limits a kick-off to what the token covers: `403` for a `_type` outside it, and without
/// `_type` only the covered types (Patient and Group exports: the covered compartment types).
/// A Group export also needs read access to Group, and Provenance asked for through
/// `includeAssociatedData` must be covered too.
pub fn restrict_export(grants: Option<&Grants>, request: &mut ExportRequest) -> ApiResult<()> {
    let Some(grants) = grants else {
        return Ok(());
    };
    let forbid = |message: String| {
        audit_failure("export_forbidden", Some(&grants.client), "403", &message);
        Err(ApiError::Forbidden(message))
    };
    if !grants.may_export() {
        return forbid(
            "the access token does not allow starting exports (it needs a system/ scope, or the $bulk-export role)"
                .into(),
        );
    }
    if let Level::Group(_) = request.level
        && !grants.covers("Group")
    {
        return forbid("a Group export needs read access to Group (system/Group.rs)".into());
    }
    if request.relevant_provenance && !grants.covers("Provenance") {
        return forbid(
            "includeAssociatedData exports Provenance, which the access token does not cover"
                .into(),
        );
    }
    if !request.types.is_empty() {
        let outside: Vec<&str> = request
            .types
            .iter()
            .filter(|t| !grants.covers(t))
            .map(String::as_str)
            .collect();
        if !outside.is_empty() {
            return forbid(format!(
                "the access token does not cover _type {}",
                outside.join(", ")
            ));
        }
    } else if let Some(mut covered) = grants.covered_types() {
        if request.level != Level::System {
            covered.retain(|t| hearth_fhir::compartment::is_patient_compartment_type(t));
        }
        if covered.is_empty() {
            return forbid(
                "the access token covers no resource type this export could contain".into(),
            );
        }
        request.types = covered;
    }
    narrow_to_granular_scopes(grants, request);
    Ok(())
}

/// Types the token reaches only through granular scopes are exported as far as those scopes'
/// filters select (Provenance too, which an export may add by target without naming it).
fn narrow_to_granular_scopes(grants: &Grants, request: &mut ExportRequest) {
    let exported: Vec<&'static str> = if request.types.is_empty() {
        hearth_fhir::resource_type::resource_types().to_vec()
    } else {
        request
            .types
            .iter()
            .filter_map(|t| hearth_fhir::resource_type::canonical_resource_type(t))
            .chain(["Provenance"])
            .collect()
    };
    for resource_type in exported {
        if let Reach::Filtered(queries) = grants.reach(resource_type, Access::any) {
            request.scope_filters.extend(
                queries
                    .into_iter()
                    .map(|query| format!("{resource_type}?{query}")),
            );
        }
    }
}

/// Whether job `id` may be seen by the caller. Another client's job is answered as if it did
/// not exist (the store is only asked when authorization is on).
pub async fn owns_job(app: &AppState, grants: Option<&Grants>, id: &str) -> ApiResult<bool> {
    let Some(grants) = grants else {
        return Ok(true);
    };
    let owner = app.store.job(id).await?.map(|job| job.client);
    let owned = owner.as_deref().is_none_or(|owner| owner == grants.client);
    if !owned {
        audit_failure(
            "foreign_job",
            Some(&grants.client),
            "404",
            "a job of another client",
        );
    }
    Ok(owned)
}

/// Whether an export file belongs to a job of the caller.
pub fn owns_file(grants: Option<&Grants>, file: &DownloadableFile) -> bool {
    let owned = grants.is_none_or(|g| g.client == file.job.client);
    if !owned && let Some(grants) = grants {
        audit_failure(
            "foreign_file",
            Some(&grants.client),
            "404",
            "a file of another client",
        );
    }
    owned
}

/// Whether the current token may download `file`: it must cover the file's resource type (a
/// renewed token of the same client works). Deletion files hold ids of every exported type,
/// so they need every one; error files only report on the request itself.
pub fn check_file(grants: Option<&Grants>, file: &DownloadableFile) -> ApiResult<()> {
    let Some(grants) = grants else {
        return Ok(());
    };
    let forbid = |message: String| {
        audit_failure("download_forbidden", Some(&grants.client), "403", &message);
        Err(ApiError::Forbidden(message))
    };
    if !grants.may_download() {
        return forbid("the access token does not allow downloads (Binary.read)".into());
    }
    match file.record.kind.as_str() {
        "error" => Ok(()),
        "deleted" => {
            let request: Option<ExportRequest> = serde_json::from_str(&file.job.request).ok();
            let covered = match request {
                Some(request) if !request.types.is_empty() => {
                    request.types.iter().all(|t| grants.covers(t))
                }
                _ => grants.covers_all(),
            };
            if covered {
                Ok(())
            } else {
                forbid(
                    "the access token does not cover every type of this export's deletions".into(),
                )
            }
        }
        _ if grants.covers(&file.record.resource_type) => Ok(()),
        _ => forbid(format!(
            "the access token does not cover {} files",
            file.record.resource_type
        )),
    }
}

/// Read access to one resource type (a `Binary` that is not an export file, for one).
/// Whether the token reaches this stored resource for reading: its type, and (with granular
/// scopes) the resource itself. Outside the token: `403`.
pub fn require_read_resource(
    grants: Option<&Grants>,
    resource_type: &'static str,
    id: &str,
    body: &[u8],
) -> ApiResult<()> {
    require_read(grants, resource_type)?;
    match grants {
        Some(grants) if !may_read_body(grants, resource_type, body) => {
            Err(outside_granular_scopes(grants, resource_type, id))
        }
        _ => Ok(()),
    }
}

/// The `403` for a resource of a type the token reaches only in part, and not this one.
pub fn outside_granular_scopes(grants: &Grants, resource_type: &str, id: &str) -> ApiError {
    let message =
        format!("{resource_type}/{id} is outside what the access token's granular scopes select");
    audit_failure("read_forbidden", Some(&grants.client), "403", &message);
    ApiError::Forbidden(message)
}

/// Whether a resource body is within what the token may read of its type.
pub fn may_read_body(grants: &Grants, resource_type: &'static str, body: &[u8]) -> bool {
    grants
        .narrowing(resource_type, |a| a.read)
        .is_none_or(|filter| filter.matches_bytes(body))
}

pub fn require_read(grants: Option<&Grants>, resource_type: &str) -> ApiResult<()> {
    match grants {
        Some(grants) if !grants.access(resource_type).read => {
            let message = format!("the access token does not allow reading {resource_type}");
            audit_failure("read_forbidden", Some(&grants.client), "403", &message);
            Err(ApiError::Forbidden(message))
        }
        _ => Ok(()),
    }
}
