//! `hearth export` as a user runs it, against a real Hearth on a loopback port: a full export
//! with a JSON summary, a refused kick-off, and Ctrl-C, which cancels the job on the server
//! (or, with `--detach`, leaves it to `--resume`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::hearth_command;
use hearth_load::{BatchLimits, LoadObserver, Rejection, Target};
use hearth_server::{Embedded, ExportSettings, ServerConfig};
use hearth_store::SqliteStore;
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The most a `hearth export` run may take here.
const RUN_LIMIT: Duration = Duration::from_secs(60);

struct Server {
    base: String,
    embedded: Option<Embedded>,
    shutdown: Option<oneshot::Sender<()>>,
    _dir: TempDir,
}

impl Server {
    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(embedded) = self.embedded.take() {
            let _ = embedded.shutdown().await;
        }
    }
}

struct Quiet;

impl LoadObserver for Quiet {
    fn rejected(&mut self, rejection: &Rejection) {
        panic!("{}: {}", rejection.origin, rejection.reason);
    }
}

/// Hearth over the 10-patient Synthea set, in this process.
async fn start_server() -> Server {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("data")).unwrap());
    let synthea = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-10p");
    let files = hearth_load::expand_paths(&[synthea]).unwrap();
    hearth_load::load(
        files,
        Target::Store(store.clone()),
        BatchLimits::default(),
        &mut Quiet,
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let embedded = Embedded::start(
        store,
        dir.path(),
        ServerConfig {
            base_url: base.clone(),
            max_body_bytes: 16 * 1024 * 1024,
            lenient_headers: false,
        },
        ExportSettings {
            workers: 1,
            ..ExportSettings::default()
        },
    )
    .await
    .unwrap();
    let state = embedded.state.clone();
    let (shutdown, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = hearth_server::serve(listener, state, async move {
            let _ = stopped.await;
        })
        .await;
    });
    Server {
        base,
        embedded: Some(embedded),
        shutdown: Some(shutdown),
        _dir: dir,
    }
}

/// A running `hearth export`, its stderr read line by line as it comes. Killed if dropped.
struct Export {
    child: Child,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Export {
    fn start(args: &[&str]) -> Self {
        let mut child = hearth_command(&["export"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hearth starts");
        let stderr = child.stderr.take().expect("stderr");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stderr: receiver,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `text` and returns it.
    async fn line_with(&mut self, text: &str) -> String {
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            while let Ok(line) = self.stderr.try_recv() {
                self.seen.push(line.clone());
                if line.contains(text) {
                    return line;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no stderr line with '{text}' in time; seen: {:?}",
                self.seen
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the process to end: its exit code, stdout and every stderr line.
    async fn finish(mut self) -> (Option<i32>, String, Vec<String>) {
        let deadline = Instant::now() + RUN_LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("the child") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "hearth export did not finish in time; stderr: {:?}",
                self.seen
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut stdout = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            use std::io::Read;
            let _ = out.read_to_string(&mut stdout);
        }
        // The reader thread ends with the process's stderr.
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        (status.code(), stdout, std::mem::take(&mut self.seen))
    }

    fn interrupt(&self) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number has no memory
        // effects in this process.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(result, 0, "SIGINT delivered");
    }
}

async fn status_code(url: &str) -> u16 {
    reqwest::get(url).await.expect("answered").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_saves_the_files_and_prints_a_json_summary() {
    let server = start_server().await;
    let out = TempDir::new().unwrap();
    let dir = out.path().to_str().unwrap();

    let (code, stdout, stderr) =
        Export::start(&[&server.base, "--out", dir, "--json", "--parallel", "3"])
            .finish()
            .await;

    assert_eq!(code, Some(0), "stderr: {stderr:?}");
    let summary: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(summary["status"], "complete");
    assert_eq!(summary["resources"], 2523);
    let files = summary["files"].as_array().unwrap();
    assert_eq!(files.len(), 16);
    for file in files {
        let path = Path::new(file["path"].as_str().unwrap());
        let lines = std::fs::read_to_string(path).unwrap().lines().count();
        assert_eq!(lines as u64, file["resources"].as_u64().unwrap());
    }
    assert!(out.path().join("manifest.json").exists());
    // Not a terminal: plain progress lines instead of bars.
    assert!(
        stderr.iter().any(|l| l.contains("status URL")),
        "{stderr:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_export_exits_non_zero_with_the_servers_reason_on_one_line() {
    let server = start_server().await;
    let out = TempDir::new().unwrap();

    let (code, stdout, stderr) = Export::start(&[
        &server.base,
        "--out",
        out.path().to_str().unwrap(),
        "--type",
        "Patient,NoSuchType",
        "--quiet",
    ])
    .finish()
    .await;

    assert_eq!(code, Some(1));
    assert!(stdout.is_empty());
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(
        stderr[0].starts_with("error: kick-off refused (400)"),
        "{stderr:?}"
    );
    assert!(stderr[0].contains("NoSuchType"), "{stderr:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_export_on_the_server() {
    let server = start_server().await;
    let out = TempDir::new().unwrap();
    let mut export = Export::start(&[&server.base, "--out", out.path().to_str().unwrap()]);
    // The first status answer is always 202 with Retry-After: the client is waiting when
    // the interrupt comes.
    let line = export.line_with("status URL ").await;
    let status_url = line.rsplit(' ').next().unwrap().to_owned();

    export.interrupt();
    let (code, _, stderr) = export.finish().await;

    assert_eq!(code, Some(130), "{stderr:?}");
    assert!(
        stderr.iter().any(|l| l.contains("cancelled on the server")),
        "{stderr:?}"
    );
    assert_eq!(status_code(&status_url).await, 404, "the job is gone");
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing saved: {left:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_with_detach_leaves_the_job_to_resume() {
    let server = start_server().await;
    let out = TempDir::new().unwrap();
    let dir = out.path().to_str().unwrap();
    let mut export = Export::start(&[&server.base, "--out", dir, "--detach"]);
    let line = export.line_with("status URL ").await;
    let status_url = line.rsplit(' ').next().unwrap().to_owned();

    export.interrupt();
    let (code, _, stderr) = export.finish().await;

    assert_eq!(code, Some(130), "{stderr:?}");
    assert!(
        stderr
            .iter()
            .any(|l| l.contains(&format!("--resume {status_url}"))),
        "{stderr:?}"
    );
    let status = status_code(&status_url).await;
    assert!(status == 200 || status == 202, "the job lives on: {status}");

    // --resume picks the job up and finishes it.
    let (code, stdout, stderr) = Export::start(&[
        &server.base,
        "--out",
        dir,
        "--resume",
        &status_url,
        "--json",
    ])
    .finish()
    .await;
    assert_eq!(code, Some(0), "{stderr:?}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["statusUrl"], status_url.as_str());
    assert_eq!(summary["resources"], 2523);
    server.stop().await;
}
