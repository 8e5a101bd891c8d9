//! The harness of the authorization tests: servers on loopback ports with authorization on,
//! client keys generated per test (RS384 and ES384), JWKS documents served over loopback, and
//! signed client assertions.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RSA_PKCS1_SHA384,
    RsaKeyPair,
};
use base64::Engine as _;
use hearth_export::ExportEngine;
use hearth_load::{BatchLimits, LoadObserver, Rejection, Target};
use hearth_server::{AuthSettings, Embedded, ExportSettings, ServeOptions, ServerConfig};
use hearth_store::SqliteStore;
use hearth_store::Store;
use hearth_store::clients::{ClientRecord, ClientStore};
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const FHIR_JSON: &str = "application/fhir+json";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Bounds every wait of these tests.
pub const DEADLINE: Duration = Duration::from_secs(30);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// Keys

enum KeyKind {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A signing key made for one test; only its public half ever leaves the test.
pub struct TestKey {
    pub kid: String,
    kind: KeyKind,
}

impl TestKey {
    pub fn rsa(kid: &str) -> Self {
        Self {
            kid: kid.to_owned(),
            kind: KeyKind::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).expect("an RSA key")),
        }
    }

    pub fn ec(kid: &str) -> Self {
        Self {
            kid: kid.to_owned(),
            kind: KeyKind::Ec(
                EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("a P-384 key"),
            ),
        }
    }

    /// The algorithm a SMART client signs with: RS384 or ES384.
    pub fn alg(&self) -> &'static str {
        match self.kind {
            KeyKind::Rsa(_) => "RS384",
            KeyKind::Ec(_) => "ES384",
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        match &self.kind {
            KeyKind::Rsa(pair) => {
                let public = pair.public_key();
                json!({
                    "kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS384",
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                })
            }
            KeyKind::Ec(pair) => {
                // Uncompressed point: 0x04 || x || y.
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "kid": self.kid, "crv": "P-384", "use": "sig", "alg": "ES384",
                    "x": b64(&point[1..49]), "y": b64(&point[49..97]),
                })
            }
        }
    }

    /// A JWS of `header` (merged over `alg`, `kid`, `typ`) and `claims`, signed with this key
    /// (RSA keys sign RS256 instead when `header.alg` says so).
    pub fn sign(&self, header: Value, claims: &Value) -> String {
        let mut full = json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"});
        for (key, value) in header.as_object().cloned().unwrap_or_default() {
            if value.is_null() {
                full.as_object_mut().unwrap().remove(&key);
            } else {
                full[key] = value;
            }
        }
        let input = format!(
            "{}.{}",
            b64(full.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let signature = match &self.kind {
            KeyKind::Rsa(pair) => {
                let padding = if full["alg"] == "RS256" {
                    &RSA_PKCS1_SHA256
                } else {
                    &RSA_PKCS1_SHA384
                };
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(padding, &rng, input.as_bytes(), &mut signature)
                    .expect("RSA signing");
                signature
            }
            KeyKind::Ec(pair) => pair
                .sign(&rng, input.as_bytes())
                .expect("ECDSA signing")
                .as_ref()
                .to_vec(),
        };
        format!("{input}.{}", b64(&signature))
    }
}

/// A JWKS of the public halves of `keys`.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

// ---------------------------------------------------------------------------------------------
// A JWKS endpoint on loopback

struct Published {
    body: String,
    cache_control: Option<String>,
    hits: usize,
}

/// Serves a JWKS document that a test can change, and counts how often it is fetched.
pub struct JwksServer {
    pub url: String,
    published: Arc<Mutex<Published>>,
    _stop: oneshot::Sender<()>,
}

impl JwksServer {
    pub async fn start(document: Value) -> Self {
        use axum::routing::get;
        let published = Arc::new(Mutex::new(Published {
            body: document.to_string(),
            cache_control: None,
            hits: 0,
        }));
        let shared = published.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            get(move || {
                let shared = shared.clone();
                async move {
                    let mut published = shared.lock().unwrap();
                    published.hits += 1;
                    let mut response =
                        axum::response::IntoResponse::into_response(published.body.clone());
                    let headers = response.headers_mut();
                    headers.insert("content-type", "application/json".parse().unwrap());
                    if let Some(cache) = &published.cache_control {
                        headers.insert("cache-control", cache.parse().unwrap());
                    }
                    response
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            url,
            published,
            _stop: stop,
        }
    }

    pub fn publish(&self, document: Value) {
        self.published.lock().unwrap().body = document.to_string();
    }

    pub fn set_cache_control(&self, value: &str) {
        self.published.lock().unwrap().cache_control = Some(value.to_owned());
    }

    pub fn hits(&self) -> usize {
        self.published.lock().unwrap().hits
    }
}

// ---------------------------------------------------------------------------------------------
// Audit log capture

/// Everything the servers of this test binary logged (JSON lines), for checks on audit events.
pub fn captured_log() -> String {
    let buffer = log_buffer().lock().unwrap();
    String::from_utf8_lossy(&buffer).into_owned()
}

fn log_buffer() -> &'static Mutex<Vec<u8>> {
    static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    BUFFER.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| Capture)
            .try_init();
    });
}

// ---------------------------------------------------------------------------------------------
// Servers

/// How a test server is set up.
pub struct Options {
    pub auth: AuthSettings,
    pub serve: ServeOptions,
    pub throttle_polls: bool,
    pub max_active_exports: u64,
}

impl Default for Options {
    fn default() -> Self {
        let mut auth = AuthSettings::smart();
        // Tests rotate keys and expect the next request to see them.
        auth.jwks_min_refetch = Duration::ZERO;
        Self {
            auth,
            serve: ServeOptions::default(),
            throttle_polls: false,
            max_active_exports: 16,
        }
    }
}

/// A running server with a small data set: 2 Patients, 3 Observations, 1 Condition.
pub struct TestServer {
    pub base: String,
    pub origin: String,
    pub client: reqwest::Client,
    pub store: Arc<SqliteStore>,
    engine: ExportEngine,
    shutdown: Option<oneshot::Sender<()>>,
    #[allow(dead_code)]
    dir: TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let engine = self.engine.clone();
        let store = self.store.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    engine.shutdown().await;
                    let _ = store.close().await;
                });
            }
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(Duration::from_secs(10));
    }
}

struct NoRejections;

impl LoadObserver for NoRejections {
    fn rejected(&mut self, rejection: &Rejection) {
        panic!(
            "test data rejected: {}: {}",
            rejection.origin, rejection.reason
        );
    }
}

const DATA: &[(&str, &str)] = &[
    (
        "Patient.ndjson",
        r#"{"resourceType":"Patient","id":"p1","name":[{"family":"One"}]}
{"resourceType":"Patient","id":"p2","name":[{"family":"Two"}]}
"#,
    ),
    (
        "Observation.ndjson",
        r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"a"},"subject":{"reference":"Patient/p1"}}
{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"b"},"subject":{"reference":"Patient/p1"}}
{"resourceType":"Observation","id":"o3","status":"final","code":{"text":"c"},"subject":{"reference":"Patient/p2"}}
"#,
    ),
    (
        "Condition.ndjson",
        r#"{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/p2"}}
"#,
    ),
];

pub async fn spawn(options: Options) -> TestServer {
    capture_logs();
    let dir = TempDir::new().expect("temp dir");
    let store = Arc::new(SqliteStore::open(&dir.path().join("data")).expect("the store opens"));
    let input = dir.path().join("input");
    std::fs::create_dir_all(&input).unwrap();
    for (name, text) in DATA {
        std::fs::write(input.join(name), text).unwrap();
    }
    let files = hearth_load::expand_paths(&[input]).unwrap();
    hearth_load::load(
        files,
        Target::Store(store.clone()),
        BatchLimits::default(),
        &mut NoRejections,
    )
    .await
    .expect("the test data loads");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let tls = options.serve.tls.is_some();
    // The test certificate is made out to localhost.
    let origin = if tls {
        format!("https://localhost:{port}")
    } else {
        format!("http://127.0.0.1:{port}")
    };
    let base = format!("{origin}/fhir");
    let Embedded { state, engine, .. } = Embedded::start_secured(
        store.clone(),
        dir.path(),
        ServerConfig {
            base_url: base.clone(),
            max_body_bytes: 1024 * 1024,
            lenient_headers: false,
        },
        ExportSettings {
            workers: 1,
            max_active_exports: options.max_active_exports,
            ..ExportSettings::default()
        },
        &options.auth,
    )
    .await
    .expect("the embedded stack starts");
    let state = state.with_poll_throttle(options.throttle_polls);
    let (shutdown, stopped) = oneshot::channel::<()>();
    let serve = options.serve;
    tokio::spawn(async move {
        let _ = hearth_server::serve_with(listener, state, serve, async move {
            let _ = stopped.await;
        })
        .await;
    });
    TestServer {
        base,
        origin,
        client: reqwest::Client::builder()
            .timeout(DEADLINE)
            .build()
            .unwrap(),
        store,
        engine,
        shutdown: Some(shutdown),
        dir,
    }
}

/// A server with `--auth smart` and the default limits.
pub async fn spawn_smart() -> TestServer {
    spawn(Options::default()).await
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// Stops the export workers: jobs kicked off from now on stay queued.
    pub async fn pause_exports(&self) {
        self.engine.shutdown().await;
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base)
    }

    /// Registers a client directly in the store (as `hearth clients add` does).
    pub async fn register(
        &self,
        id: &str,
        jwks_url: Option<&str>,
        jwks: Option<&Value>,
        scope: Option<&str>,
    ) {
        self.store
            .put_client(ClientRecord {
                id: id.to_owned(),
                jwks_url: jwks_url.map(str::to_owned),
                jwks: jwks.map(Value::to_string),
                scope: scope.map(str::to_owned),
                created_at: 0,
            })
            .await
            .expect("the client is registered");
    }

    /// Claims of a valid client assertion for `client`.
    pub fn claims(&self, client: &str) -> Value {
        json!({
            "iss": client,
            "sub": client,
            "aud": self.token_url(),
            "exp": unix_now() + 60,
            "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    /// A valid assertion of `client` signed with `key`.
    pub fn assertion(&self, key: &TestKey, client: &str) -> String {
        key.sign(json!({}), &self.claims(client))
    }

    /// Posts a token request with these form fields; returns the status and the JSON body.
    pub async fn token_request(&self, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let response = self
            .client
            .post(self.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("the token endpoint answers");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "token responses are JSON, not '{content_type}'"
        );
        let body: Value = response.json().await.expect("a JSON body");
        (status, body)
    }

    /// A token request with `assertion` and `scope`.
    pub async fn request_token(&self, assertion: &str, scope: &str) -> (StatusCode, Value) {
        self.token_request(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("scope", scope),
        ])
        .await
    }

    /// An access token for `client` (signed with `key`) with `scope`, asserting success.
    pub async fn token(&self, key: &TestKey, client: &str, scope: &str) -> String {
        let (status, body) = self
            .request_token(&self.assertion(key, client), scope)
            .await;
        assert_eq!(status, StatusCode::OK, "token request failed: {body}");
        body["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned()
    }

    /// Registers `client` with an inline JWKS of a new RSA key and returns a token for `scope`.
    pub async fn client_with_token(&self, client: &str, scope: &str) -> (TestKey, String) {
        let key = TestKey::rsa(&format!("{client}-key"));
        self.register(client, None, Some(&jwks(&[&key])), None)
            .await;
        let token = self.token(&key, client, scope).await;
        (key, token)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("GET is answered")
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.delete(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("DELETE is answered")
    }

    /// `GET [base]/$export{query}` as a Bulk Data client sends it.
    pub async fn kick_off(&self, query: &str, token: Option<&str>) -> Response {
        let mut request = self
            .client
            .get(self.url(&format!("/$export{query}")))
            .header("accept", FHIR_JSON)
            .header("prefer", "respond-async");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the kick-off is answered")
    }

    /// A kick-off that must be accepted; returns the status URL.
    pub async fn start_export(&self, query: &str, token: &str) -> String {
        let response = self.kick_off(query, Some(token)).await;
        let status = response.status();
        let location = response
            .headers()
            .get("content-location")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.text().await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "kick-off {query}: {body}");
        location.expect("Content-Location")
    }

    /// Polls `status_url` with `token` until the manifest.
    pub async fn manifest(&self, status_url: &str, token: &str) -> Value {
        let started = Instant::now();
        loop {
            let response = self.get(status_url, Some(token)).await;
            match response.status() {
                StatusCode::ACCEPTED => {}
                StatusCode::OK => return response.json().await.expect("a JSON manifest"),
                status => panic!(
                    "polling {status_url} answered {status}: {}",
                    response.text().await.unwrap_or_default()
                ),
            }
            assert!(started.elapsed() < DEADLINE, "the export did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `output` items of a manifest as (type, url).
pub fn outputs(manifest: &Value) -> Vec<(String, String)> {
    manifest["output"]
        .as_array()
        .expect("output is an array")
        .iter()
        .map(|item| {
            (
                item["type"].as_str().unwrap().to_owned(),
                item["url"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Asserts an OperationOutcome answer with `status` and returns it.
pub async fn assert_outcome(response: Response, status: StatusCode) -> Value {
    let actual = response.status();
    let url = response.url().to_string();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "{url}: {text}");
    assert!(
        content_type.starts_with(FHIR_JSON),
        "{url}: content-type '{content_type}'"
    );
    let outcome: Value = serde_json::from_str(&text).expect("a JSON body");
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    assert!(outcome["issue"][0]["code"].is_string(), "{outcome}");
    outcome
}

/// Asserts a `401` with an OperationOutcome and a Bearer challenge.
pub async fn assert_unauthorized(response: Response) -> Value {
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .expect("a 401 carries WWW-Authenticate");
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert_outcome(response, StatusCode::UNAUTHORIZED).await
}

/// Asserts an OAuth error answer: the status and the `error` code.
pub fn assert_oauth_error(answer: &(StatusCode, Value), status: StatusCode, error: &str) {
    let (actual, body) = answer;
    assert_eq!(*actual, status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert!(body["error_description"].is_string(), "{body}");
}
