//! Fake Bulk Data servers on loopback ports, for this crate's tests and for the tests of the
//! crates built on it (`hearth export`): what Hearth does not do on demand (a failed job, a
//! file that is short or missing, a token checked on every request) and a record of what the
//! client sent. Behind the `testing` feature, so the library itself does not carry a server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;

/// Serves `router` on a loopback port; returns the origin (`http://127.0.0.1:port`).
pub async fn serve_fake(router: Router) -> String {
    let (listener, origin) = bind().await;
    spawn(listener, router);
    origin
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local addr");
    (listener, format!("http://{addr}"))
}

fn spawn(listener: TcpListener, router: Router) {
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
}

/// An OperationOutcome answer with one issue.
pub fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    let body = json!({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": diagnostics}]});
    (
        status,
        [("content-type", "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

pub fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    response
        .headers_mut()
        .insert(name, HeaderValue::from_str(value).expect("a header value"));
    response
}

/// A `200` NDJSON file.
pub fn ndjson(text: impl IntoResponse) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/fhir+ndjson")],
        text,
    )
        .into_response()
}

/// `n` Patient resources as NDJSON, ids `p0`, `p1`, ….
pub fn patients(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"p{i}\"}}\n"))
        .collect()
}

/// One file of a [`FakeExport`]'s manifest.
#[derive(Debug, Clone)]
pub struct FakeFile {
    /// The manifest array it is listed in: `output`, `deleted` or `error`.
    pub list: &'static str,
    pub resource_type: String,
    /// What the file's URL serves; `None` answers `404` with an OperationOutcome.
    pub body: Option<String>,
    /// The manifest's `count`, when it gives one.
    pub count: Option<u64>,
}

impl FakeFile {
    /// An `output` file whose `count` is its real number of lines.
    pub fn output(resource_type: &str, body: String) -> Self {
        let count = body.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        Self {
            list: "output",
            resource_type: resource_type.to_owned(),
            body: Some(body),
            count: Some(count),
        }
    }

    /// An `output` file listed in the manifest whose URL answers `404`.
    pub fn missing(resource_type: &str) -> Self {
        Self {
            list: "output",
            resource_type: resource_type.to_owned(),
            body: None,
            count: Some(1),
        }
    }

    /// The same file with the manifest announcing `count` resources.
    pub fn announcing(self, count: u64) -> Self {
        Self {
            count: Some(count),
            ..self
        }
    }
}

/// One export job, scripted: the kick-off is accepted, the first poll answers `202`, the next
/// one the manifest of `files` (or `failure`), and each file URL what its [`FakeFile`] says.
#[derive(Debug, Clone, Default)]
pub struct FakeExport {
    pub files: Vec<FakeFile>,
    /// The job fails: the status answer instead of the manifest (its HTTP status and the
    /// OperationOutcome's diagnostics).
    pub failure: Option<(u16, String)>,
    /// Every request must carry `Authorization: Bearer <token>` (else `401`), and the
    /// manifest says `requiresAccessToken`.
    pub token: Option<String>,
}

/// A request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub authorization: Option<String>,
}

/// A running [`FakeExport`].
pub struct FakeServer {
    /// The FHIR base to give the client.
    pub base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeServer {
    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("the request log").clone()
    }

    /// The URL the manifest gives file `index` of [`FakeExport::files`].
    pub fn file_url(&self, index: usize) -> String {
        file_url(&self.base, index)
    }
}

fn file_url(base: &str, index: usize) -> String {
    format!("{base}/files/{index}")
}

struct Script {
    export: FakeExport,
    base: String,
    polls: Mutex<u32>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

const STATUS_PATH: &str = "/fhir/$export-poll-status";

impl FakeExport {
    pub async fn start(self) -> FakeServer {
        let (listener, origin) = bind().await;
        let base = format!("{origin}/fhir");
        let seen = Arc::<Mutex<Vec<Seen>>>::default();
        let script = Arc::new(Script {
            export: self,
            base: base.clone(),
            polls: Mutex::new(0),
            seen: seen.clone(),
        });
        spawn(listener, Router::new().fallback(answer).with_state(script));
        FakeServer { base, seen }
    }
}

async fn answer(State(script): State<Arc<Script>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let authorization = header(request.headers(), "authorization");
    script.seen.lock().expect("the request log").push(Seen {
        method: method.to_string(),
        target: request
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), ToString::to_string),
        authorization: authorization.clone(),
    });
    if let Some(token) = &script.export.token
        && authorization.as_deref() != Some(format!("Bearer {token}").as_str())
    {
        return with_header(
            outcome(
                StatusCode::UNAUTHORIZED,
                "login",
                "a valid bearer token is required",
            ),
            "www-authenticate",
            "Bearer",
        );
    }
    match (method, path.as_str()) {
        (Method::GET | Method::POST, "/fhir/$export") => with_header(
            StatusCode::ACCEPTED.into_response(),
            "content-location",
            &format!("{}/$export-poll-status?_jobId=fake", script.base),
        ),
        (Method::DELETE, STATUS_PATH) => StatusCode::ACCEPTED.into_response(),
        (Method::GET, STATUS_PATH) => status(&script),
        (Method::GET, file) => match file
            .strip_prefix("/fhir/files/")
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| script.export.files.get(i))
        {
            Some(FakeFile {
                body: Some(body), ..
            }) => ndjson(body.clone()),
            _ => outcome(StatusCode::NOT_FOUND, "not-found", "no such file"),
        },
        _ => outcome(
            StatusCode::NOT_FOUND,
            "not-supported",
            "not part of the fake",
        ),
    }
}

fn status(script: &Script) -> Response {
    let polls = {
        let mut polls = script.polls.lock().expect("the poll count");
        *polls += 1;
        *polls
    };
    // A job is never done at the first look, so every client goes through a wait and a poll.
    if polls == 1 {
        let running = with_header(StatusCode::ACCEPTED.into_response(), "retry-after", "0");
        return with_header(running, "x-progress", "in progress");
    }
    if let Some((status, diagnostics)) = &script.export.failure {
        let status = StatusCode::from_u16(*status).expect("an HTTP status");
        return outcome(status, "exception", diagnostics);
    }
    let mut manifest = json!({
        "transactionTime": "2024-05-01T10:00:00Z",
        "request": format!("{}/$export", script.base),
        "requiresAccessToken": script.export.token.is_some(),
        "output": [], "deleted": [], "error": [],
    });
    for (index, file) in script.export.files.iter().enumerate() {
        let mut item = json!({"type": file.resource_type, "url": file_url(&script.base, index)});
        if let Some(count) = file.count {
            item["count"] = count.into();
        }
        if let Some(list) = manifest[file.list].as_array_mut() {
            list.push(item);
        }
    }
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        manifest.to_string(),
    )
        .into_response()
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The non-empty lines of a saved file.
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every file under `dir` whose name ends with `.part` (a download's temporary name): none may
/// be left behind, whether the export succeeded or failed.
pub fn leftover_parts(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".part") {
                found.push(path);
            }
        }
    }
    found
}
