//! The harness the `hearth` binary's integration tests share: running the binary as a user
//! would, and talking to the servers it starts over HTTP.
//!
//! Each file under `tests/` is a test binary of its own that says `mod common;`, so this module
//! is compiled once per binary, and most binaries use only part of it: hence the
//! `allow(dead_code)` below, rather than an `allow` on each item some binary leaves unused.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Debug;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

/// Longest wait for a server to answer, or for an export to complete.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The most a `hearth` run to completion ([`hearth`], [`hearth_ok`]) may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A `hearth` command with its environment cleared of `HEARTH_*` settings, so that a
/// developer's shell (or CI's `HEARTH_REQUIRE_*`) cannot change what a test runs: every setting
/// a test wants is on its command line. Stdin is closed; stdout and stderr are the caller's.
pub fn hearth_command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hearth"));
    command.args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HEARTH_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `hearth` with `args` to completion, whatever its exit status, and returns its output.
/// A run that takes more than a minute is killed and fails the test (with its stderr), so that
/// a hung command fails one test instead of hanging the suite.
pub fn hearth<S: AsRef<OsStr> + Debug>(args: &[S]) -> Output {
    let mut child = hearth_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hearth starts");
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        if child.try_wait().expect("waiting for hearth").is_some() {
            return child.wait_with_output().expect("hearth's output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("hearth's output");
            panic!(
                "hearth {args:?} did not finish within a minute; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`hearth`] for a step a test builds on (`synth`, `load`): asserts it succeeded, naming its
/// status and stderr when it did not.
pub fn hearth_ok<S: AsRef<OsStr> + Debug>(args: &[S]) -> Output {
    let output = hearth(args);
    assert!(
        output.status.success(),
        "hearth {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A loopback port nobody listens on right now, for a `hearth serve` process to bind (it is
/// released just before the server binds it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Per-type `created` counts from the summary `hearth load` prints: the rows of five columns
/// whose second is a number (the header row names its columns).
pub fn load_summary(stdout: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() == 5
            && fields[1] != "created"
            && let Ok(created) = fields[1].parse::<u64>()
        {
            counts.insert(fields[0].to_owned(), created);
        }
    }
    counts
}

/// An HTTP client whose every request gives up after [`TIMEOUT`], so that a server that stops
/// answering fails the test instead of hanging it.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .expect("client")
}

/// Waits until the `hearth serve` process `child` answers `GET [base]/metadata` with 200.
/// Fails the test, with the server's log, if the process exits first or does not answer within
/// [`TIMEOUT`]; `what` names the server in those messages.
pub async fn wait_ready(
    child: &mut Child,
    client: &reqwest::Client,
    base: &str,
    what: &str,
    log: &Path,
) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("the server process") {
            panic!("{what} exited ({status}): {}", log_text());
        }
        let answered = client
            .get(format!("{base}/metadata"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if answered.is_ok_and(|r| r.status() == StatusCode::OK) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not answer within {TIMEOUT:?}: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A system export kicked off at `base`; asserts it was accepted (202) and returns the status
/// URL from `Content-Location`.
pub async fn kick_off(client: &reqwest::Client, base: &str) -> String {
    kick_off_with(client, base, "").await
}

/// [`kick_off`] with a query string (`?_type=Patient`).
pub async fn kick_off_with(client: &reqwest::Client, base: &str, query: &str) -> String {
    let url = format!("{base}/$export{query}");
    let response = client
        .get(&url)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("the kick-off is answered");
    let status = response.status();
    let location = response
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::ACCEPTED, "GET {url}: {text}");
    location.unwrap_or_else(|| panic!("the kick-off has no Content-Location"))
}

/// The job id in a status URL (`…?_jobId=<id>`).
pub fn job_id(status_url: &str) -> String {
    status_url
        .split_once("_jobId=")
        .map(|(_, id)| id.to_owned())
        .unwrap_or_else(|| panic!("no _jobId in {status_url}"))
}

/// One poll of a status URL.
pub enum Poll {
    /// 202, with its `X-Progress`.
    Running { progress: String },
    /// 200, with the manifest.
    Done(Value),
}

/// Polls `status_url` once. Fails the test on any answer but 202 (which must carry
/// `X-Progress`) or 200 (whose body must be the JSON manifest).
pub async fn poll(client: &reqwest::Client, status_url: &str) -> Poll {
    let response = client
        .get(status_url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {status_url} is not answered: {e}"));
    let status = response.status();
    let progress = response
        .headers()
        .get("x-progress")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("a readable body");
    match status {
        StatusCode::ACCEPTED => Poll::Running {
            progress: progress
                .unwrap_or_else(|| panic!("a 202 from {status_url} without X-Progress")),
        },
        StatusCode::OK => Poll::Done(
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the manifest is not JSON ({e}): {text}")),
        ),
        other => panic!("GET {status_url} answered {other}: {text}"),
    }
}

/// [`poll`]s `status_url` until the manifest comes, within [`TIMEOUT`], and returns it.
pub async fn wait_done(client: &reqwest::Client, status_url: &str) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Poll::Done(manifest) = poll(client, status_url).await {
            return manifest;
        }
        assert!(
            Instant::now() < deadline,
            "{status_url} did not complete within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts a manifest lists no `deleted` and no `error` files, as a full export of data that
/// nothing deleted must not.
pub fn assert_no_deleted_or_error(manifest: &Value) {
    for name in ["deleted", "error"] {
        assert_eq!(
            manifest[name].as_array().map(Vec::len),
            Some(0),
            "a full export has no {name}: {manifest}"
        );
    }
}

/// The body of one export file, asserting it is served (200).
pub async fn download(client: &reqwest::Client, url: &str) -> Vec<u8> {
    let response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url} is not answered: {e}"));
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    response.bytes().await.expect("a body").to_vec()
}
