//! Access tokens: a fixed bearer token, or SMART Backend Services (a signed JWT assertion
//! exchanged for a short-lived token at the server's token endpoint, found through
//! `.well-known/smart-configuration` when not given). Tokens are renewed shortly before they
//! expire and whenever a server answers `401`, so a long poll or download outlives them.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Url;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::Error;
use crate::error::describe_body;

/// How requests are authorized.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No `Authorization` header.
    #[default]
    None,
    /// A token obtained some other way, sent as `Authorization: Bearer <token>`.
    Bearer(String),
    /// SMART Backend Services.
    BackendServices(BackendServices),
}

impl std::fmt::Debug for Credentials {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Bearer(_) => f.write_str("Bearer(..)"),
            Self::BackendServices(b) => write!(f, "BackendServices({})", b.client_id),
        }
    }
}

/// A registered backend client.
#[derive(Clone)]
pub struct BackendServices {
    pub client_id: String,
    pub key: SigningKey,
    /// The token endpoint; discovered from `[base]/.well-known/smart-configuration` if `None`.
    pub token_url: Option<String>,
    /// Space-separated scopes, e.g. `system/*.read`.
    pub scope: String,
}

/// The client's private key, with the algorithm and key id its JWT assertions carry.
#[derive(Clone)]
pub struct SigningKey {
    key: EncodingKey,
    algorithm: Algorithm,
    kid: String,
}

type KeyLoader = fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>;

impl SigningKey {
    /// Reads a PEM private key: an RSA key (PKCS#8 or PKCS#1) signs with RS384, an EC P-384
    /// key (PKCS#8) with ES384 — the two algorithms SMART requires clients to support. The key
    /// id is `kid` when given, else the key's RFC 7638 thumbprint (what many registration
    /// tools use as `kid` in the JWKS).
    pub fn from_pem(pem: &[u8], kid: Option<String>) -> Result<Self, Error> {
        let candidates: [(Algorithm, KeyLoader); 2] = [
            (Algorithm::ES384, EncodingKey::from_ec_pem),
            (Algorithm::RS384, EncodingKey::from_rsa_pem),
        ];
        for (algorithm, load) in candidates {
            let Ok(key) = load(pem) else { continue };
            // Deriving the public key checks that the key fits the algorithm (an EC key on
            // another curve than P-384 fails here, not at the first token request).
            let Ok(public) = Jwk::from_encoding_key(&key, algorithm) else {
                continue;
            };
            let kid = match kid {
                Some(kid) => kid,
                None => public
                    .thumbprint(ThumbprintHash::SHA256)
                    .map_err(|e| Error::Auth(format!("cannot derive a key id: {e}")))?,
            };
            return Ok(Self {
                key,
                algorithm,
                kid,
            });
        }
        Err(Error::Auth(
            "the private key is not a PEM RSA key (RS384) or EC P-384 key (ES384)".into(),
        ))
    }

    /// Reads [`SigningKey::from_pem`] from a file.
    pub fn from_file(path: &Path, kid: Option<String>) -> Result<Self, Error> {
        let pem = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_pem(&pem, kid)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A client assertion for `token_url`: `iss` = `sub` = client id, `aud` = the token URL,
    /// a unique `jti`, and an expiry within the five minutes SMART allows.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, Error> {
        #[derive(Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            sub: &'a str,
            aud: &'a str,
            exp: u64,
            jti: String,
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims = Claims {
            iss: client_id,
            sub: client_id,
            aud: token_url,
            exp: now + 240,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| Error::Auth(format!("cannot sign the client assertion: {e}")))
    }
}

struct Token {
    header: HeaderValue,
    /// When to stop using it: its expiry less a safety margin.
    renew_at: Instant,
}

/// Hands out the `Authorization` header for requests, fetching and renewing tokens.
pub(crate) struct Authorizer {
    credentials: Credentials,
    base: Url,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
    token_url: Mutex<Option<String>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<f64>,
}

#[derive(Deserialize)]
struct SmartConfiguration {
    token_endpoint: Option<String>,
}

impl Authorizer {
    pub(crate) fn new(credentials: Credentials, base: Url, http: reqwest::Client) -> Self {
        let token_url = match &credentials {
            Credentials::BackendServices(b) => b.token_url.clone(),
            _ => None,
        };
        Self {
            credentials,
            base,
            http,
            token: Mutex::new(None),
            token_url: Mutex::new(token_url),
        }
    }

    /// Whether a `401` can be cured by asking for a new token.
    pub(crate) fn renewable(&self) -> bool {
        matches!(self.credentials, Credentials::BackendServices(_))
    }

    /// The `Authorization` header value for the next request, if any.
    pub(crate) async fn header(&self) -> Result<Option<HeaderValue>, Error> {
        match &self.credentials {
            Credentials::None => Ok(None),
            Credentials::Bearer(token) => HeaderValue::from_str(&format!("Bearer {token}"))
                .map(Some)
                .map_err(|_| {
                    Error::Auth("the bearer token has characters a header cannot carry".into())
                }),
            Credentials::BackendServices(backend) => {
                let mut slot = self.token.lock().await;
                if let Some(token) = slot.as_ref()
                    && Instant::now() < token.renew_at
                {
                    return Ok(Some(token.header.clone()));
                }
                let token = self.request_token(backend).await?;
                let header = token.header.clone();
                *slot = Some(token);
                Ok(Some(header))
            }
        }
    }

    /// Forgets `used` after a `401`, so the next request gets a fresh token. A token already
    /// replaced by another task is left alone.
    pub(crate) async fn rejected(&self, used: Option<&HeaderValue>) {
        let mut slot = self.token.lock().await;
        if slot.as_ref().map(|t| &t.header) == used {
            *slot = None;
        }
    }

    async fn token_url(&self) -> Result<String, Error> {
        let mut slot = self.token_url.lock().await;
        if let Some(url) = slot.as_ref() {
            return Ok(url.clone());
        }
        let discovery = crate::request::join(&self.base, ".well-known/smart-configuration")?;
        let response = self
            .http
            .get(discovery.clone())
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| Error::Auth(format!("{discovery}: {e}")))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::Auth(format!("{discovery}: {e}")))?;
        if !status.is_success() {
            return Err(Error::Auth(format!(
                "{discovery} answered {status} (give --token-url): {}",
                describe_body(&body)
            )));
        }
        let config: SmartConfiguration = serde_json::from_slice(&body)
            .map_err(|e| Error::Auth(format!("{discovery}: not a SMART configuration: {e}")))?;
        let url = config.token_endpoint.ok_or_else(|| {
            Error::Auth(format!(
                "{discovery} names no token_endpoint (give --token-url)"
            ))
        })?;
        *slot = Some(url.clone());
        Ok(url)
    }

    async fn request_token(&self, backend: &BackendServices) -> Result<Token, Error> {
        let token_url = self.token_url().await?;
        let assertion = backend.key.assertion(&backend.client_id, &token_url)?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )
            .append_pair("client_assertion", &assertion)
            .append_pair("scope", &backend.scope)
            .finish();
        let requested = Instant::now();
        let response = self
            .http
            .post(&token_url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| Error::Auth(format!("{token_url}: {e}")))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::Auth(format!("{token_url}: {e}")))?;
        if !status.is_success() {
            return Err(Error::Auth(format!(
                "the token endpoint answered {status}: {}",
                oauth_error(&body)
            )));
        }
        let token: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::Auth(format!("the token response is not valid: {e}")))?;
        if let Some(kind) = &token.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(Error::Auth(format!(
                "the token endpoint issued a '{kind}' token, not a bearer token"
            )));
        }
        // SMART tokens live at most five minutes; without expires_in assume that. Renew a
        // tenth of the lifetime (at most 30 s) early, so no request leaves with a token that
        // expires on the way.
        let lifetime = token
            .expires_in
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::from_secs(300), Duration::from_secs_f64);
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let header =
            HeaderValue::from_str(&format!("Bearer {}", token.access_token)).map_err(|_| {
                Error::Auth("the access token has characters a header cannot carry".into())
            })?;
        Ok(Token {
            header,
            renew_at: requested + lifetime - margin,
        })
    }
}

/// `error: error_description` of an OAuth error body.
fn oauth_error(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct OAuthError {
        error: String,
        error_description: Option<String>,
    }
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(e) => match e.error_description {
            Some(d) => format!("{}: {d}", e.error),
            None => e.error,
        },
        Err(_) => describe_body(body),
    }
}
