//! SMART Backend Services against a fake authorization server: keys generated here, the token
//! URL discovered, the assertion verified as a server must, tokens that expire during the
//! export (renewed before they lapse) and a token refused with `401` (renewed and retried).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hearth_client::auth::{BackendServices, Credentials, SigningKey};
use hearth_client::export;
use hearth_client::{BulkClient, ClientOptions, ExportJob, ExportRequest, Level};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::*;

const CLIENT_ID: &str = "bulk-client-1";
/// Short enough that polling outlives a token.
const TOKEN_SECONDS: u64 = 2;

/// A generated key pair: the PEM the client reads, and what the server verifies with.
pub struct TestKey {
    pub pem: String,
    algorithm: Algorithm,
    decoding: DecodingKey,
    /// The RFC 7638 thumbprint, computed here independently of the client.
    pub thumbprint: String,
    /// The public key as a JWK with the thumbprint as `kid`, for registering the client.
    pub jwk: Value,
}

fn pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

fn sha256_b64(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        text.as_bytes(),
    ))
}

pub fn ec_key() -> TestKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
    let pkcs8 = pair.to_pkcs8v1().unwrap();
    let point = pair.public_key().as_ref();
    let (x, y) = point[1..].split_at(48);
    let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
    let thumbprint = sha256_b64(&format!(
        r#"{{"crv":"P-384","kty":"EC","x":"{x}","y":"{y}"}}"#
    ));
    TestKey {
        pem: pem(pkcs8.as_ref()),
        algorithm: Algorithm::ES384,
        decoding: DecodingKey::from_ec_components(&x, &y).unwrap(),
        thumbprint: thumbprint.clone(),
        jwk: json!({"kty": "EC", "crv": "P-384", "alg": "ES384", "use": "sig",
            "kid": thumbprint, "x": x, "y": y}),
    }
}

fn rsa_key() -> TestKey {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().unwrap();
    let public = aws_lc_rs::signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    let (n, e) = (
        URL_SAFE_NO_PAD.encode(&public.n),
        URL_SAFE_NO_PAD.encode(&public.e),
    );
    let thumbprint = sha256_b64(&format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#));
    TestKey {
        pem: pem(der.as_ref()),
        algorithm: Algorithm::RS384,
        decoding: DecodingKey::from_rsa_components(&n, &e).unwrap(),
        thumbprint: thumbprint.clone(),
        jwk: json!({"kty": "RSA", "alg": "RS384", "use": "sig", "kid": thumbprint, "n": n, "e": e}),
    }
}

/// The fake server's memory.
#[derive(Default)]
struct AuthState {
    origin: String,
    /// token → when it was issued.
    tokens: HashMap<String, Instant>,
    /// Assertion ids seen (a replay is refused).
    jtis: HashSet<String>,
    issued: u32,
    /// Refuse the next file request with 401 even with a valid token (a revoked token).
    revoke_next_file: bool,
    refused: u32,
    polls: u32,
    /// Requests that arrived with a missing or expired token.
    unauthorized: Vec<String>,
    /// The Authorization headers of the file requests.
    file_authorizations: Vec<Option<String>>,
}

type Shared = Arc<Mutex<AuthState>>;

fn oauth_error(error: &str, description: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// The token endpoint, checking what SMART Backend Services requires.
fn token(state: &Shared, key: &TestKey, body: &[u8]) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error("unsupported_grant_type", format!("{form:?}"));
    }
    if form.get("client_assertion_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return oauth_error("invalid_request", "client_assertion_type".into());
    }
    if form.get("scope").map(String::as_str) != Some("system/*.read") {
        return oauth_error("invalid_scope", format!("{:?}", form.get("scope")));
    }
    let Some(assertion) = form.get("client_assertion") else {
        return oauth_error("invalid_request", "no client_assertion".into());
    };
    let header = jsonwebtoken::decode_header(assertion).unwrap();
    if header.alg != key.algorithm
        || header.kid.as_deref() != Some(key.thumbprint.as_str())
        || header.typ.as_deref() != Some("JWT")
    {
        return oauth_error("invalid_client", format!("header {header:?}"));
    }
    let token_url = format!("{}/auth/token", state.lock().unwrap().origin);
    let mut validation = Validation::new(key.algorithm);
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.sub = Some(CLIENT_ID.into());
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let claims = match jsonwebtoken::decode::<Value>(assertion, &key.decoding, &validation) {
        Ok(data) => data.claims,
        Err(e) => return oauth_error("invalid_client", e.to_string()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if claims["exp"].as_u64().unwrap_or(0) > now + 300 {
        return oauth_error("invalid_client", "exp more than 5 minutes ahead".into());
    }
    let mut state = state.lock().unwrap();
    let jti = claims["jti"].as_str().unwrap_or("").to_owned();
    if jti.is_empty() || !state.jtis.insert(jti) {
        return oauth_error("invalid_client", "jti missing or replayed".into());
    }
    state.issued += 1;
    let token = format!("token-{}", state.issued);
    state.tokens.insert(token.clone(), Instant::now());
    axum::Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": TOKEN_SECONDS,
        "scope": "system/*.read"
    }))
    .into_response()
}

/// Whether a request carries a live token; records it when not.
fn authorized(state: &Shared, headers: &HeaderMap, what: &str) -> bool {
    let mut state = state.lock().unwrap();
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let live = token
        .as_ref()
        .and_then(|t| state.tokens.get(t))
        .is_some_and(|issued| issued.elapsed() < Duration::from_secs(TOKEN_SECONDS));
    if !live {
        state.unauthorized.push(format!("{what} with {token:?}"));
    }
    live
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("content-type", "application/fhir+json")],
        json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "login", "diagnostics": "token expired or missing"}]})
        .to_string(),
    )
        .into_response()
}

fn fake_smart_server(state: Shared, key: Arc<TestKey>) -> Router {
    let discovery = {
        let state = state.clone();
        move || async move {
            let origin = state.lock().unwrap().origin.clone();
            axum::Json(json!({
                "token_endpoint": format!("{origin}/auth/token"),
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            }))
        }
    };
    let token_endpoint = {
        let state = state.clone();
        move |body: Bytes| async move { token(&state, &key, &body) }
    };
    let kick_off = {
        let state = state.clone();
        move |headers: HeaderMap| async move {
            if !authorized(&state, &headers, "kick-off") {
                return unauthorized();
            }
            let mut response = StatusCode::ACCEPTED.into_response();
            let location = format!("{}/fhir/jobs/42", state.lock().unwrap().origin);
            response.headers_mut().insert(
                "content-location",
                HeaderValue::from_str(&location).unwrap(),
            );
            response
        }
    };
    let status = {
        let state = state.clone();
        move |headers: HeaderMap| async move {
            if !authorized(&state, &headers, "status") {
                return unauthorized();
            }
            let mut guard = state.lock().unwrap();
            guard.polls += 1;
            // Four polls a second apart: the first token expires meanwhile.
            if guard.polls < 5 {
                let mut response = StatusCode::ACCEPTED.into_response();
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
                return response;
            }
            guard.revoke_next_file = true;
            let origin = guard.origin.clone();
            axum::Json(json!({
                "transactionTime": "2024-05-01T10:00:00Z",
                "request": format!("{origin}/fhir/$export"),
                "requiresAccessToken": true,
                "output": [{"type": "Patient", "url": format!("{origin}/fhir/files/p"), "count": 1}],
                "error": []
            }))
            .into_response()
        }
    };
    let file = {
        let state = state.clone();
        move |headers: HeaderMap, _uri: Uri| async move {
            {
                let mut guard = state.lock().unwrap();
                guard.file_authorizations.push(
                    headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                );
                if guard.revoke_next_file {
                    guard.revoke_next_file = false;
                    guard.refused += 1;
                    return unauthorized();
                }
            }
            if !authorized(&state, &headers, "file") {
                return unauthorized();
            }
            (
                StatusCode::OK,
                [("content-type", "application/fhir+ndjson")],
                "{\"resourceType\":\"Patient\",\"id\":\"p\"}\n",
            )
                .into_response()
        }
    };
    Router::new()
        .route("/fhir/.well-known/smart-configuration", get(discovery))
        .route("/auth/token", post(token_endpoint))
        .route("/fhir/$export", get(kick_off))
        .route("/fhir/jobs/{id}", get(status))
        .route("/fhir/files/p", get(file))
}

async fn round_trip(key: TestKey) {
    let key = Arc::new(key);
    let state: Shared = Arc::default();
    let origin = serve_fake(fake_smart_server(state.clone(), key.clone())).await;
    state.lock().unwrap().origin = origin.clone();
    let keys = TempDir::new().unwrap();
    let key_file = keys.path().join("client.pem");
    std::fs::write(&key_file, &key.pem).unwrap();

    let signing = SigningKey::from_file(&key_file, None).expect("the key loads");
    assert_eq!(signing.algorithm(), key.algorithm);
    assert_eq!(signing.kid(), key.thumbprint);
    let options = ClientOptions {
        credentials: Credentials::BackendServices(BackendServices {
            client_id: CLIENT_ID.into(),
            key: signing,
            token_url: None,
            scope: "system/*.read".into(),
        }),
        ..fast_options()
    };
    let client = BulkClient::new(&format!("{origin}/fhir"), options).unwrap();
    let out = TempDir::new().unwrap();
    let job = ExportJob {
        request: ExportRequest::new(Level::System),
        out_dir: out.path().to_owned(),
        incremental: false,
        resume: None,
        release: false,
    };

    let summary = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect("the authorized export succeeds");

    assert_eq!(summary.resources, 1);
    let state = state.lock().unwrap();
    // No request went out with an expired token: renewals came before expiry ...
    assert!(state.unauthorized.is_empty(), "{:?}", state.unauthorized);
    // ... several tokens over the polls, and one more after the revoked one.
    assert!(state.issued >= 3, "tokens issued: {}", state.issued);
    assert_eq!(state.refused, 1);
    let authorizations = &state.file_authorizations;
    assert_eq!(authorizations.len(), 2);
    assert!(authorizations.iter().all(Option::is_some));
    assert_ne!(
        authorizations[0], authorizations[1],
        "a new token after the 401"
    );
}

#[tokio::test]
async fn backend_services_with_an_es384_key() {
    round_trip(ec_key()).await;
}

#[tokio::test]
async fn backend_services_with_an_rs384_key() {
    round_trip(rsa_key()).await;
}

/// Which request (by name) carried which `Authorization` header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A bearer token is sent to the FHIR endpoints, but not with files the manifest says need
/// no token (capability URLs).
#[tokio::test]
async fn a_bearer_token_is_not_sent_where_no_token_is_required() {
    let seen: Seen = Arc::default();
    let origin: Arc<Mutex<String>> = Arc::default();
    let record = |seen: &Seen, what: &str, headers: &HeaderMap| {
        seen.lock().unwrap().push((
            what.to_owned(),
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ));
    };
    let router = {
        let (s1, s2, s3, o1) = (seen.clone(), seen.clone(), seen.clone(), origin.clone());
        Router::new()
            .route(
                "/fhir/$export",
                get(move |headers: HeaderMap| async move {
                    record(&s1, "kick-off", &headers);
                    let mut response = StatusCode::ACCEPTED.into_response();
                    response
                        .headers_mut()
                        .insert("content-location", HeaderValue::from_static("/fhir/jobs/1"));
                    response
                }),
            )
            .route(
                "/fhir/jobs/1",
                get(move |headers: HeaderMap| async move {
                    record(&s2, "status", &headers);
                    let origin = o1.lock().unwrap().clone();
                    axum::Json(json!({
                        "transactionTime": "2024-05-01T10:00:00Z",
                        "requiresAccessToken": false,
                        "output": [{"type": "Patient", "url": format!("{origin}/signed/p?sig=abc")}],
                        "error": []
                    }))
                }),
            )
            .route(
                "/signed/p",
                get(move |headers: HeaderMap| async move {
                    record(&s3, "file", &headers);
                    "{\"resourceType\":\"Patient\",\"id\":\"p\"}\n"
                }),
            )
    };
    let base = serve_fake(router).await;
    *origin.lock().unwrap() = base.clone();
    let options = ClientOptions {
        credentials: Credentials::Bearer("secret-token".into()),
        ..fast_options()
    };
    let client = BulkClient::new(&format!("{base}/fhir"), options).unwrap();
    let out = TempDir::new().unwrap();
    let job = ExportJob {
        request: ExportRequest::new(Level::System),
        out_dir: out.path().to_owned(),
        incremental: false,
        resume: None,
        release: false,
    };

    let summary = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect("the export succeeds");

    assert_eq!(summary.resources, 1);
    let seen = seen.lock().unwrap().clone();
    let bearer = Some("Bearer secret-token".to_owned());
    assert_eq!(
        seen,
        vec![
            ("kick-off".to_owned(), bearer.clone()),
            ("status".to_owned(), bearer),
            ("file".to_owned(), None),
        ]
    );
}
