//! The harness: a real server on a loopback port over a fresh SQLite store, and small helpers
//! that say what a client sees.

use std::collections::BTreeSet;
use std::fmt;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hearth_export::ExportEngine;
use hearth_load::{BatchLimits, LoadObserver, Rejection, Target};
use hearth_server::{Embedded, ExportSettings, ServerConfig};
use hearth_store::{SqliteStore, Store};
use reqwest::{Method, Response, StatusCode};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const FHIR_JSON: &str = "application/fhir+json";

/// The default body limit of the test servers: large enough for every test but the 413 one.
const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;

/// A running server. Dropping it stops the server; the data directory goes with it.
pub struct TestServer {
    /// The FHIR base, e.g. `http://127.0.0.1:41234/fhir`.
    pub base: String,
    /// `http://127.0.0.1:41234`, for requests outside the FHIR base.
    pub origin: String,
    pub client: reqwest::Client,
    pub store: Arc<SqliteStore>,
    engine: ExportEngine,
    shutdown: Option<oneshot::Sender<()>>,
    /// The data directory, removed when the server is dropped.
    #[allow(dead_code)]
    pub dir: TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Stop the export workers (threads of their own) and close the store before the data
        // directory goes. Both are async and the test's runtime is busy dropping us, so they
        // run on a small runtime of their own, bounded in time.
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

pub async fn spawn_server() -> TestServer {
    spawn_server_with_limit(DEFAULT_MAX_BODY).await
}

/// A server that refuses request bodies larger than `max_body_bytes`.
pub async fn spawn_server_with_limit(max_body_bytes: usize) -> TestServer {
    spawn_server_with_options(ServerOptions {
        max_body_bytes,
        ..ServerOptions::default()
    })
    .await
}

/// A server over the 10-patient Synthea set, loaded through `hearth_load` before it starts.
pub async fn spawn_server_with_synthea() -> TestServer {
    spawn_server_with_options(ServerOptions {
        synthea: true,
        ..ServerOptions::default()
    })
    .await
}

fn open_store(dir: &TempDir) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(&dir.path().join("data")).expect("store opens"))
}

/// Where the 10-patient Synthea set lives.
pub fn synthea_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-10p")
}

/// The ids in one of the Synthea set's gzip NDJSON files.
pub fn synthea_ids(resource_type: &str) -> BTreeSet<String> {
    let path = synthea_dir().join(format!("{resource_type}.ndjson.gz"));
    let file = std::fs::File::open(&path).expect("test data file");
    let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
    reader
        .lines()
        .map(|line| line.expect("readable line"))
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(&line).expect("a JSON line");
            value["id"].as_str().expect("an id").to_owned()
        })
        .collect()
}

struct NoRejections;

impl LoadObserver for NoRejections {
    fn rejected(&mut self, rejection: &Rejection) {
        panic!(
            "the test data should load cleanly: {}: {}",
            rejection.origin, rejection.reason
        );
    }
}

/// Encodes one query parameter value.
pub fn enc(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

impl TestServer {
    /// Runs the export engine's retention sweep now instead of at its next 30-second tick.
    pub async fn sweep_exports(&self) {
        self.engine.sweep().await;
    }

    /// An absolute URL under the FHIR base; `path` starts with `/` (or `?`), or is already
    /// absolute.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path)
            .send()
            .await
            .expect("GET is answered")
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.request(Method::DELETE, path)
            .send()
            .await
            .expect("DELETE is answered")
    }

    /// Sends `body` as it is, with `Content-Type: application/fhir+json`.
    pub async fn send_text(&self, method: Method, path: &str, body: &str) -> Response {
        self.request(method, path)
            .header("content-type", FHIR_JSON)
            .body(body.to_owned())
            .send()
            .await
            .expect("the request is answered")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.send_text(Method::POST, path, &body.to_string()).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Response {
        self.send_text(Method::PUT, path, &body.to_string()).await
    }

    /// POSTs a resource to its type and returns the created resource (asserting `201`).
    pub async fn create(&self, resource: &Value) -> Value {
        let resource_type = resource["resourceType"].as_str().expect("a resourceType");
        let response = self.post_json(&format!("/{resource_type}"), resource).await;
        expect_json(response, StatusCode::CREATED).await
    }

    /// PUTs a resource at its id and returns the response body (`200` or `201`).
    pub async fn upsert(&self, resource: &Value) -> Value {
        let resource_type = resource["resourceType"].as_str().expect("a resourceType");
        let id = resource["id"].as_str().expect("an id");
        let response = self
            .put_json(&format!("/{resource_type}/{id}"), resource)
            .await;
        let status = response.status();
        assert!(
            status == StatusCode::OK || status == StatusCode::CREATED,
            "PUT {resource_type}/{id} answered {status}"
        );
        expect_json(response, status).await
    }

    /// A search, with every page followed through its `next` link; returns the ids in order.
    pub async fn search_ids(&self, path: &str) -> Vec<String> {
        let mut ids = Vec::new();
        let mut url = self.url(path);
        for _ in 0..100 {
            let response = self.get(&url).await;
            let bundle = expect_json(response, StatusCode::OK).await;
            assert_eq!(bundle["type"], "searchset", "{bundle}");
            ids.extend(match_ids(&bundle));
            match link(&bundle, "next") {
                Some(next) => url = next,
                None => return ids,
            }
        }
        panic!("the search {path} did not end after 100 pages");
    }
}

/// The ids of the `match` entries of a searchset.
pub fn match_ids(bundle: &Value) -> Vec<String> {
    entries(bundle)
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| {
            e["resource"]["id"]
                .as_str()
                .expect("a matched resource has an id")
                .to_owned()
        })
        .collect()
}

/// `Bundle.entry`, or nothing.
pub fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"].as_array().cloned().unwrap_or_default()
}

/// The URL of a Bundle link by relation.
pub fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)
        .map(|l| l["url"].as_str().expect("a link has a url").to_owned())
}

/// A header's value as text, or a failure naming the missing header.
pub fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("the response has no {name} header"))
        .to_str()
        .expect("a text header")
        .to_owned()
}

/// Asserts the status and the FHIR JSON media type and returns the raw body.
pub async fn expect_text(response: Response, status: StatusCode) -> String {
    let actual = response.status();
    let url = response.url().to_string();
    let headers = response.headers().clone();
    let text = response.text().await.expect("a readable body");
    assert_eq!(actual, status, "{url} answered {actual}: {text}");
    let content_type = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    assert!(
        content_type.starts_with(FHIR_JSON),
        "{url}: content-type is '{content_type}', not {FHIR_JSON}"
    );
    text
}

/// Asserts the status and the FHIR JSON media type and returns the parsed body.
pub async fn expect_json(response: Response, status: StatusCode) -> Value {
    let text = expect_text(response, status).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("the body is not JSON ({e}): {text}"))
}

/// Asserts an error answer: the status, the FHIR JSON media type, and an `OperationOutcome`
/// with at least one issue carrying a severity and a code. Returns the outcome.
pub async fn assert_outcome(response: Response, status: StatusCode) -> Value {
    let outcome = expect_json(response, status).await;
    assert_outcome_value(&outcome);
    outcome
}

/// Asserts that a JSON value is an `OperationOutcome` with at least one complete issue.
pub fn assert_outcome_value(outcome: &Value) {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    let issues = outcome["issue"].as_array().expect("issue is an array");
    assert!(!issues.is_empty(), "the outcome has no issue: {outcome}");
    for issue in issues {
        assert!(issue["severity"].is_string(), "issue without severity");
        assert!(issue["code"].is_string(), "issue without code");
    }
}

/// All `diagnostics` and `expression`s of an outcome, in one string for `contains` checks.
pub fn outcome_text(outcome: &Value) -> String {
    let mut text = String::new();
    for issue in outcome["issue"].as_array().into_iter().flatten() {
        if let Some(d) = issue["diagnostics"].as_str() {
            text.push_str(d);
            text.push('\n');
        }
        for e in issue["expression"].as_array().into_iter().flatten() {
            text.push_str(e.as_str().unwrap_or(""));
            text.push('\n');
        }
    }
    text
}

/// The top-level members of a JSON object in document order, each value as its exact text.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// The text of a JSON object without its top-level `id` and `meta`, every other byte kept:
/// what the client sent and the server must not change.
pub fn without_server_fields(json: &str) -> String {
    let Members(members) = serde_json::from_str(json).expect("a JSON object");
    let kept: Vec<String> = members
        .iter()
        .filter(|(key, _)| key != "id" && key != "meta")
        .map(|(key, raw)| format!("{}:{}", Value::from(key.as_str()), raw.get()))
        .collect();
    format!("{{{}}}", kept.join(","))
}

/// The id a server gave a resource.
pub fn id_of(resource: &Value) -> String {
    resource["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {resource}"))
        .to_owned()
}

/// A minimal Patient with a family name, without id.
pub fn patient(family: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "name": [{"family": family}]
    })
}

// ---------------------------------------------------------------------------------------------
// Servers configured unlike the default one, and requests reqwest cannot send.

/// How a test server differs from the one `spawn_server` starts.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `ServerConfig::lenient_headers`: accept an export kick-off without `Accept`.
    pub lenient_headers: bool,
    pub export: ExportSettings,
    /// Load the 10-patient Synthea set before the server starts.
    pub synthea: bool,
    /// `ServerConfig::max_body_bytes`.
    pub max_body_bytes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            lenient_headers: false,
            export: ExportSettings {
                workers: 1,
                ..ExportSettings::default()
            },
            synthea: false,
            max_body_bytes: DEFAULT_MAX_BODY,
        }
    }
}

/// A server started with `options`.
pub async fn spawn_server_with_options(options: ServerOptions) -> TestServer {
    let dir = TempDir::new().expect("temp dir");
    let store = open_store(&dir);
    if options.synthea {
        let files = hearth_load::expand_paths(&[synthea_dir()]).expect("the test data is there");
        let report = hearth_load::load(
            files,
            Target::Store(store.clone()),
            BatchLimits::default(),
            &mut NoRejections,
        )
        .await
        .expect("the test data loads");
        assert_eq!(report.rejected, 0);
        assert_eq!(report.loaded, 2523);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let origin = format!("http://{addr}");
    let base = format!("{origin}/fhir");
    let Embedded { state, engine, .. } = Embedded::start(
        store.clone(),
        dir.path(),
        ServerConfig {
            base_url: base.clone(),
            max_body_bytes: options.max_body_bytes,
            lenient_headers: options.lenient_headers,
        },
        options.export,
    )
    .await
    .expect("the embedded stack starts");
    let (shutdown, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = hearth_server::serve(listener, state, async move {
            let _ = stopped.await;
        })
        .await;
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    TestServer {
        base,
        origin,
        client,
        store,
        engine,
        shutdown: Some(shutdown),
        dir,
    }
}

/// A response read off the wire by [`TestServer::raw`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body with any chunked transfer coding removed.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl TestServer {
    /// Sends one HTTP/1.1 request with exactly `headers` (plus `Host`, `Connection: close` and,
    /// with a body, `Content-Length`) over a fresh loopback connection: for requests without an
    /// `Accept` header, which reqwest always adds.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = self.url(path);
        let target = url
            .strip_prefix(&self.origin)
            .unwrap_or_else(|| panic!("{url} is not on this server"));
        let host = self.origin.trim_start_matches("http://");
        let mut head =
            format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(host).await?;
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body).await?;
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await?;
            Ok::<_, std::io::Error>(received)
        };
        let received = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("the raw request is answered within 30 s")
            .expect("the raw exchange works");
        parse_raw_response(&received)
    }
}

fn parse_raw_response(received: &[u8]) -> RawResponse {
    let end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = std::str::from_utf8(&received[..end]).expect("a text head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line with a code: {status_line}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut rest = &received[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
            let size_text = std::str::from_utf8(&rest[..line_end]).expect("a text chunk size");
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .expect("a hex chunk size");
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body
    } else {
        rest.to_vec()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

// ---------------------------------------------------------------------------------------------
// A Bulk Data client for test modules other than `export.rs`: the few lines of its kick-off,
// poll and download helpers they need, copied (not moved) so `export.rs` stays as it is.

/// A kick-off at `path` (`/$export...`, `/Patient/$export...`, `/Group/<id>/$export...`) with
/// `Accept: application/fhir+json` and `Prefer: respond-async` (plus `handling=lenient` when
/// asked): a GET, or with `body` a POST of that `Parameters`.
pub async fn export_kick_off(
    server: &TestServer,
    path: &str,
    body: Option<&Value>,
    lenient: bool,
) -> Response {
    let prefer = if lenient {
        "respond-async, handling=lenient"
    } else {
        "respond-async"
    };
    let method = if body.is_some() {
        Method::POST
    } else {
        Method::GET
    };
    let mut request = server
        .request(method, path)
        .header("prefer", prefer)
        .header("accept", FHIR_JSON);
    if let Some(body) = body {
        request = request
            .header("content-type", FHIR_JSON)
            .body(body.to_string());
    }
    request.send().await.expect("the kick-off is answered")
}

/// Asserts an accepted kick-off (`202`, no body, an absolute `Content-Location` under the
/// base) and returns the status URL.
pub async fn export_accepted(server: &TestServer, response: Response) -> String {
    let status = response.status();
    let url = response.url().to_string();
    let location = response
        .headers()
        .get("content-location")
        .map(|v| v.to_str().expect("a text header").to_owned());
    let body = response.text().await.expect("a readable body");
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "kick-off {url} answered {status}: {body}"
    );
    assert!(
        body.is_empty(),
        "the kick-off {url} answered a body: {body}"
    );
    let location = location.expect("a 202 kick-off has Content-Location");
    assert!(
        location.starts_with(&format!("{}/$export-poll-status?_jobId=", server.base)),
        "Content-Location {location}"
    );
    location
}

/// Polls a status URL (as Inferno does, `Accept: application/json`) until the manifest,
/// within 60 s. The first answer must be `202`; the manifest must be `200`
/// `application/json` with `transactionTime`, `request`, and `output`, `deleted` and `error`
/// arrays of items with a `type`, a `url` under `[base]/Binary/` and a positive `count`. With
/// `outputOrganizedBy`, `output` items have no `type`.
pub async fn export_manifest(server: &TestServer, status_url: &str) -> Value {
    let started = std::time::Instant::now();
    let mut polls = 0;
    loop {
        let response = server
            .client
            .get(status_url)
            .header("accept", "application/json")
            .send()
            .await
            .expect("the status request is answered");
        polls += 1;
        let status = response.status();
        if status != StatusCode::ACCEPTED {
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_owned())
                .unwrap_or_default();
            let text = response.text().await.expect("a readable body");
            assert!(
                polls > 1,
                "the first poll answered {status}, not 202: {text}"
            );
            assert_eq!(
                status,
                StatusCode::OK,
                "{status_url} answered {status}: {text}"
            );
            assert!(
                content_type.starts_with("application/json"),
                "the manifest's Content-Type is '{content_type}'"
            );
            let manifest: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the manifest is not JSON ({e}): {text}"));
            assert!(manifest["transactionTime"].is_string(), "{manifest}");
            assert!(manifest["request"].is_string(), "{manifest}");
            let file_prefix = format!("{}/Binary/", server.base);
            for kind in ["output", "deleted", "error"] {
                let items = manifest[kind]
                    .as_array()
                    .unwrap_or_else(|| panic!("'{kind}' is not an array in {manifest}"));
                let organized = kind == "output" && manifest.get("outputOrganizedBy").is_some();
                for item in items {
                    if organized {
                        assert!(item.get("type").is_none(), "a typed item: {item}");
                    } else {
                        assert!(item["type"].is_string(), "an item without type: {item}");
                    }
                    assert!(
                        item["url"]
                            .as_str()
                            .is_some_and(|u| u.starts_with(&file_prefix)),
                        "an item url not under {file_prefix}: {item}"
                    );
                    assert!(
                        item["count"].as_u64().is_some_and(|c| c > 0),
                        "an item without a positive count: {item}"
                    );
                }
            }
            return manifest;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the export at {status_url} was not done within 60 s ({polls} polls)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Downloads an export file (`Accept: application/fhir+ndjson`): `200`, that media type, and
/// newline-terminated lines, none blank. Returns the lines.
pub async fn export_file_lines(server: &TestServer, url: &str) -> Vec<String> {
    let response = server
        .client
        .get(url)
        .header("accept", "application/fhir+ndjson")
        .send()
        .await
        .expect("the download is answered");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let text = response.text().await.expect("a readable body");
    assert_eq!(status, StatusCode::OK, "{url} answered {status}: {text}");
    assert!(
        content_type.starts_with("application/fhir+ndjson"),
        "{url}: Content-Type '{content_type}'"
    );
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{url} does not end with a newline"
    );
    text.lines()
        .map(|line| {
            assert!(!line.trim().is_empty(), "a blank line in {url}");
            line.to_owned()
        })
        .collect()
}

/// A hand-checked patient of the 10-patient Synthea set (Marquardt; the one patient with an
/// AllergyIntolerance).
pub const PATIENT: &str = "63731047-b5a9-4b05-a14b-8cf6507efc98";
/// Another patient of the set (Fonseca, 84 resources).
pub const OTHER: &str = "27de96c6-6910-4f0f-8f10-00ce6090f447";

pub fn patient_ref(id: &str) -> String {
    format!("Patient/{id}")
}

/// One NDJSON line as JSON.
pub fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// `Parameters` with these entries: `patient` as a `valueReference`, the rest `valueString`.
pub fn parameters(entries: &[(&str, &str)]) -> Value {
    let parameter: Vec<Value> = entries
        .iter()
        .map(|(name, value)| {
            if *name == "patient" {
                json!({"name": name, "valueReference": {"reference": value}})
            } else {
                json!({"name": name, "valueString": value})
            }
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}
