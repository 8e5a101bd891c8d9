//! Hearth as its own SMART Backend Services authorization server: discovery
//! (`.well-known/smart-configuration`) and the token endpoint (`client_credentials` with a
//! `private_key_jwt` client assertion, RS384 or ES384).
//!
//! Every failure of the client assertion is `invalid_client` (401), as RFC 7523 §3.2 and SMART
//! require of client authentication: unknown client, unusable key, bad signature, `iss`/`sub`,
//! `aud`, expiry, lifetime over five minutes, a replayed `jti`. Malformed requests are
//! `invalid_request`, other grant types `unsupported_grant_type`, scopes `invalid_scope`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::json;

use super::jwks::{parse_jwks, select_key};
use super::scopes::grant;
use super::tokens::{MAX_LIFETIME_SECS, unix_now};
use super::{AuthMode, Authorizer, audit_failure, short};
use crate::AppState;
use crate::error::ApiError;

pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Token requests are a handful of form fields and one JWT.
const MAX_TOKEN_REQUEST_BYTES: usize = 64 * 1024;
/// Clock skew allowed between a client and Hearth when checking `exp`.
const ASSERTION_LEEWAY_SECS: u64 = 10;

/// A token endpoint error, answered as OAuth JSON (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidClient(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidScope(String),
    /// Hearth could not answer (the store failed); details go to the log only.
    #[error("{0}")]
    Server(String),
}

impl OAuthError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidClient(_) => "invalid_client",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::InvalidScope(_) => "invalid_scope",
            Self::Server(_) => "server_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidClient(_) => StatusCode::UNAUTHORIZED,
            Self::Server(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let description = match &self {
            Self::Server(detail) => {
                tracing::error!(error = %detail, "the token endpoint failed");
                "internal server error".to_owned()
            }
            other => other.to_string(),
        };
        let body = json!({"error": self.code(), "error_description": description});
        oauth_json(self.status(), body.to_string())
    }
}

fn oauth_json(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // RFC 6749 §5.1: token responses must not be cached.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// `GET [base]/.well-known/smart-configuration`.
pub async fn discovery(State(app): State<AppState>) -> Response {
    let Some(auth) = app.auth.as_ref() else {
        return not_enabled();
    };
    let AuthMode::Smart { token_url, .. } = &auth.mode else {
        return not_enabled();
    };
    let body = json!({
        "issuer": auth.base_url,
        "token_endpoint": token_url,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": ["system/*.read", "system/*.rs"],
        "response_types_supported": ["token"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"]
    });
    let mut response = (StatusCode::OK, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn not_enabled() -> Response {
    ApiError::NotFound(
        "this server does not run its own SMART authorization server (see `hearth serve --auth smart`)"
            .into(),
    )
    .into_response()
}

/// `POST [base]/auth/token`.
pub async fn token(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let Some(auth) = app.auth.clone() else {
        return not_enabled();
    };
    if !matches!(auth.mode, AuthMode::Smart { .. }) {
        return not_enabled();
    }
    match auth.token_request(&headers, body).await {
        Ok(response) => response,
        Err(error) => {
            audit_failure("token", None, error.code(), &error.to_string());
            error.into_response()
        }
    }
}

/// The claims of a client assertion that Hearth reads.
#[derive(Debug, Deserialize)]
struct AssertionClaims {
    iss: Option<String>,
    sub: Option<String>,
    exp: Option<u64>,
    jti: Option<String>,
}

impl Authorizer {
    async fn token_request(&self, headers: &HeaderMap, body: Body) -> Result<Response, OAuthError> {
        let AuthMode::Smart {
            signer,
            token_url,
            lifetime,
        } = &self.mode
        else {
            return Err(OAuthError::InvalidRequest("no token endpoint here".into()));
        };
        let form = read_form(headers, body).await?;
        let field = |name: &str| {
            form.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        if form
            .iter()
            .filter(|(key, _)| key == "client_assertion")
            .count()
            > 1
        {
            return Err(OAuthError::InvalidRequest(
                "client_assertion is given more than once".into(),
            ));
        }
        match field("grant_type") {
            None => {
                return Err(OAuthError::InvalidRequest("grant_type is missing".into()));
            }
            Some("client_credentials") => {}
            Some(other) => {
                return Err(OAuthError::UnsupportedGrantType(format!(
                    "grant_type '{}' is not supported; use client_credentials",
                    short(other)
                )));
            }
        }
        match field("client_assertion_type") {
            None => {
                return Err(OAuthError::InvalidRequest(
                    "client_assertion_type is missing".into(),
                ));
            }
            Some(CLIENT_ASSERTION_TYPE) => {}
            Some(other) => {
                return Err(OAuthError::InvalidClient(format!(
                    "client_assertion_type '{}' is not supported; use {CLIENT_ASSERTION_TYPE}",
                    short(other)
                )));
            }
        }
        let assertion = field("client_assertion")
            .filter(|a| !a.is_empty())
            .ok_or_else(|| OAuthError::InvalidRequest("client_assertion is missing".into()))?;
        let requested =
            field("scope").ok_or_else(|| OAuthError::InvalidRequest("scope is missing".into()))?;

        let now = unix_now();
        let client = self.authenticate(assertion, token_url, now).await?;
        let scope = grant(requested, client.allowed_scope.as_deref())
            .map_err(|e| OAuthError::InvalidScope(e.to_string()))?;
        // Only a request that would succeed uses up its assertion.
        let fresh = self
            .store
            .record_jti(
                &client.id,
                &client.jti,
                (client.exp + ASSERTION_LEEWAY_SECS) as i64 * 1_000_000,
                now as i64 * 1_000_000,
            )
            .await
            .map_err(|e| OAuthError::Server(e.to_string()))?;
        if !fresh {
            return Err(OAuthError::InvalidClient(
                "the client_assertion's jti was already used".into(),
            ));
        }
        let lifetime = lifetime.as_secs().clamp(1, MAX_LIFETIME_SECS);
        let access_token = signer
            .issue(&client.id, &scope, now, lifetime)
            .map_err(|e| OAuthError::Server(e.to_string()))?;
        tracing::info!(target: "audit", event = "auth.token_issued", client = %client.id, scope = %scope,
            expires_in = lifetime, "access token issued");
        let body = json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": lifetime,
            "scope": scope,
        });
        Ok(oauth_json(StatusCode::OK, body.to_string()))
    }

    /// Checks a client assertion: its client, key, signature and claims.
    async fn authenticate(
        &self,
        assertion: &str,
        token_url: &str,
        now: u64,
    ) -> Result<AuthenticatedClient, OAuthError> {
        let invalid = |message: String| OAuthError::InvalidClient(message);
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|e| invalid(format!("the client_assertion is not a signed JWT: {e}")))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(invalid(format!(
                "the client_assertion is signed with {:?}; use RS384 or ES384",
                header.alg
            )));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| invalid("the client_assertion's header has no kid".into()))?;
        // Unverified, only to find whose keys to verify with.
        let claimed: AssertionClaims = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
            .map_err(|e| {
            invalid(format!("the client_assertion's claims cannot be read: {e}"))
        })?;
        let (Some(iss), Some(sub)) = (claimed.iss.as_deref(), claimed.sub.as_deref()) else {
            return Err(invalid("the client_assertion needs iss and sub".into()));
        };
        if iss != sub {
            return Err(invalid(
                "the client_assertion's iss and sub must both be the client id".into(),
            ));
        }
        let client = self
            .store
            .client(iss)
            .await
            .map_err(|e| OAuthError::Server(e.to_string()))?
            .ok_or_else(|| invalid(format!("client '{}' is not registered", short(iss))))?;
        let key = match (&header.jku, &client.jwks_url, &client.jwks) {
            (Some(jku), registered, _) if registered.as_deref() != Some(jku.as_str()) => {
                return Err(invalid(
                    "the client_assertion's jku is not the client's registered JWKS URL".into(),
                ));
            }
            (_, Some(url), _) => self.jwks.key(url, Some(kid), header.alg).await,
            (_, None, Some(jwks)) => parse_jwks(jwks.as_bytes())
                .and_then(|keys| select_key(&keys, Some(kid), header.alg)),
            (_, None, None) => {
                return Err(invalid(format!(
                    "client '{}' has no registered keys",
                    client.id
                )));
            }
        }
        .map_err(|e| invalid(e.to_string()))?;

        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&client.id]);
        validation.sub = Some(client.id.clone());
        validation.set_audience(&[token_url]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.leeway = ASSERTION_LEEWAY_SECS;
        let verified: AssertionClaims = jsonwebtoken::decode(assertion, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                invalid(match e.kind() {
                    ErrorKind::InvalidSignature => {
                        "the client_assertion's signature does not verify".into()
                    }
                    ErrorKind::ExpiredSignature => "the client_assertion has expired".into(),
                    ErrorKind::InvalidAudience => {
                        format!("the client_assertion's aud must be the token endpoint {token_url}")
                    }
                    _ => format!("the client_assertion is not valid: {e}"),
                })
            })?
            .claims;
        let exp = verified.exp.unwrap_or(0);
        if exp > now + MAX_LIFETIME_SECS + ASSERTION_LEEWAY_SECS {
            return Err(invalid(
                "the client_assertion's exp is more than five minutes ahead".into(),
            ));
        }
        let jti = verified
            .jti
            .filter(|j| !j.is_empty())
            .ok_or_else(|| invalid("the client_assertion has no jti".into()))?;
        if jti.len() > 256 {
            return Err(invalid("the client_assertion's jti is too long".into()));
        }
        Ok(AuthenticatedClient {
            id: client.id,
            allowed_scope: client.scope,
            jti,
            exp,
        })
    }
}

struct AuthenticatedClient {
    id: String,
    allowed_scope: Option<String>,
    jti: String,
    exp: u64,
}

/// The form fields of a token request (`application/x-www-form-urlencoded` only).
async fn read_form(headers: &HeaderMap, body: Body) -> Result<Vec<(String, String)>, OAuthError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(OAuthError::InvalidRequest(format!(
            "the token request must be application/x-www-form-urlencoded, not '{}'",
            short(essence)
        )));
    }
    let body = crate::http_util::read_body(headers, body, MAX_TOKEN_REQUEST_BYTES)
        .await
        .map_err(|e| OAuthError::InvalidRequest(e.to_string()))?;
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}
