//! `hearth export` as a user runs it, against a real Hearth on a loopback port: a full export
//! with a JSON summary, `--quiet`, plain progress lines without a terminal, incremental runs,
//! a refused kick-off, and Ctrl-C, which cancels the job on the server (or, with `--detach`,
//! leaves it to `--resume`). Against fake Bulk Data servers, for what Hearth does not do on
//! demand: a failed job, a short or missing file, and a bearer token checked on every request.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::hearth_command;
use hearth_client::testing::{FakeExport, FakeFile, leftover_parts, lines, patients};
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
            // Split on `\n` only, so a `\r` (a progress bar redrawing a line) stays visible.
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).into_owned();
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

    let reason = failing_run(
        &server.base,
        out.path(),
        &["--type", "Patient,NoSuchType", "--quiet"],
    )
    .await;

    assert!(
        reason.starts_with("error: kick-off refused (400)"),
        "{reason}"
    );
    assert!(reason.contains("NoSuchType"), "{reason}");
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

/// The one-line reason of a failed run: the only `error:` line, and the last line on stderr.
fn failure_reason(stderr: &[String]) -> &str {
    let errors: Vec<&String> = stderr.iter().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one reason: {stderr:?}");
    assert_eq!(
        stderr.last(),
        Some(errors[0]),
        "the reason ends the run: {stderr:?}"
    );
    errors[0]
}

/// Runs `hearth export` into `out`, expecting it to fail: exit status 1, nothing on stdout, one
/// reason ending stderr (and nothing else there with `--quiet`). Returns the reason.
async fn failing_run(base: &str, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![base, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = Export::start(&args).finish().await;
    assert_eq!(code, Some(1), "{stderr:?}");
    assert!(stdout.is_empty(), "{stdout}");
    if extra.contains(&"--quiet") {
        assert_eq!(stderr.len(), 1, "{stderr:?}");
    }
    failure_reason(&stderr).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_answering_404_exits_non_zero_naming_its_url_and_saves_no_partial_file() {
    const PATIENTS: usize = 100_000;
    let fake = FakeExport {
        // Large enough to be still downloading, in parallel, when the other file's 404 ends
        // the run.
        files: vec![
            FakeFile::output("Patient", patients(PATIENTS)),
            FakeFile::missing("Observation"),
        ],
        ..FakeExport::default()
    }
    .start()
    .await;
    let out = TempDir::new().unwrap();

    let reason = failing_run(&fake.base, out.path(), &["--quiet"]).await;
    assert!(reason.contains(&fake.file_url(1)), "{reason}");
    assert!(reason.contains("404"), "{reason}");
    assert!(!out.path().join("Observation.1.ndjson").exists());
    // The other file may have been saved before the run stopped, but only whole.
    let patient = out.path().join("Patient.1.ndjson");
    if patient.exists() {
        assert_eq!(lines(&patient).len(), PATIENTS);
    }
    assert!(leftover_parts(out.path()).is_empty());
    assert!(!out.path().join("manifest.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_exits_non_zero_with_the_servers_outcome_on_one_line() {
    let diagnostics = "the export ran out of disk on volume 7";
    let fake = FakeExport {
        failure: Some((500, diagnostics.into())),
        ..FakeExport::default()
    }
    .start()
    .await;
    let out = TempDir::new().unwrap();

    let reason = failing_run(&fake.base, out.path(), &[]).await;
    assert!(reason.contains(diagnostics), "{reason}");
    assert!(reason.contains("500"), "{reason}");
    assert!(!out.path().join("manifest.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_file_exits_non_zero_naming_it_and_both_counts() {
    let fake = FakeExport {
        files: vec![FakeFile::output("Patient", patients(3)).announcing(5)],
        ..FakeExport::default()
    }
    .start()
    .await;
    let out = TempDir::new().unwrap();

    let reason = failing_run(&fake.base, out.path(), &["--quiet"]).await;
    assert!(reason.contains("Patient.1.ndjson"), "{reason}");
    let words: Vec<&str> = reason.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    assert!(
        words.contains(&"5") && words.contains(&"3"),
        "both counts: {reason}"
    );
    assert!(!out.path().join("Patient.1.ndjson").exists());
    assert!(leftover_parts(out.path()).is_empty());
    assert!(!out.path().join("manifest.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_goes_with_the_kick_off_the_polls_and_the_downloads() {
    let token = "t0ken-from-elsewhere";
    let fake = FakeExport {
        files: vec![
            FakeFile::output("Patient", patients(3)),
            FakeFile::output("Patient", patients(2)),
        ],
        token: Some(token.into()),
        ..FakeExport::default()
    }
    .start()
    .await;
    let out = TempDir::new().unwrap();

    let (code, _, stderr) = Export::start(&[
        &fake.base,
        "--out",
        out.path().to_str().unwrap(),
        "--bearer",
        token,
    ])
    .finish()
    .await;

    assert_eq!(code, Some(0), "{stderr:?}");
    let seen = fake.seen();
    let gets = |path: &str| {
        seen.iter()
            .filter(|s| s.method == "GET" && s.target.split('?').next() == Some(path))
            .count()
    };
    assert_eq!(gets("/fhir/$export"), 1, "one kick-off: {seen:?}");
    assert!(gets("/fhir/$export-poll-status") >= 2, "polls: {seen:?}");
    assert_eq!(gets("/fhir/files/0") + gets("/fhir/files/1"), 2, "{seen:?}");
    let expected = format!("Bearer {token}");
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some(expected.as_str()),
            "{request:?}"
        );
    }
    assert_eq!(lines(&out.path().join("Patient.1.ndjson")).len(), 3);
    assert_eq!(lines(&out.path().join("Patient.2.ndjson")).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_prints_nothing_on_success_and_saves_the_files() {
    let server = start_server().await;
    let out = TempDir::new().unwrap();

    let (code, stdout, stderr) = Export::start(&[
        &server.base,
        "--out",
        out.path().to_str().unwrap(),
        "--quiet",
    ])
    .finish()
    .await;

    assert_eq!(code, Some(0), "{stderr:?}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.is_empty(), "{stderr:?}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    let output = manifest["output"].as_array().unwrap();
    assert!(!output.is_empty());
    let announced: u64 = output.iter().map(|f| f["count"].as_u64().unwrap()).sum();
    let saved: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    assert_eq!(saved.len(), output.len(), "{saved:?}");
    let resources: usize = saved.iter().map(|p| lines(p).len()).sum();
    assert_eq!(resources as u64, announced);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_progress_is_plain_lines_without_control_sequences() {
    let server = start_server().await;
    let out = TempDir::new().unwrap();

    let (code, _, stderr) = Export::start(&[&server.base, "--out", out.path().to_str().unwrap()])
        .finish()
        .await;

    assert_eq!(code, Some(0), "{stderr:?}");
    assert!(
        stderr.iter().any(|l| l.contains("saved ")),
        "progress is reported: {stderr:?}"
    );
    for line in &stderr {
        assert!(
            !line.contains('\r') && !line.contains('\x1b'),
            "a terminal control sequence in a log: {line:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_runs_ask_since_the_last_run_and_save_changes_and_deletions() {
    let server = start_server().await;
    let out = TempDir::new().unwrap();
    let dir = out.path().to_str().unwrap();
    let run = || async {
        let (code, stdout, stderr) =
            Export::start(&[&server.base, "--out", dir, "--incremental", "--json"])
                .finish()
                .await;
        assert_eq!(code, Some(0), "{stderr:?}");
        serde_json::from_str::<Value>(stdout.trim()).expect("one JSON summary")
    };

    let first = run().await;
    let first_time = first["transactionTime"].as_str().unwrap().to_owned();
    let first_dir = Path::new(first["directory"].as_str().unwrap()).to_owned();
    let id_in = |file: &str| {
        let line = lines(&first_dir.join(file)).swap_remove(0);
        serde_json::from_str::<Value>(&line).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (patient, encounter) = (id_in("Patient.1.ndjson"), id_in("Encounter.1.ndjson"));

    let http = common::http_client();
    let changed = http
        .put(format!("{}/Patient/{patient}", server.base))
        .header("content-type", "application/fhir+json")
        .body(
            serde_json::json!({"resourceType": "Patient", "id": patient, "active": false})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(changed.status().is_success(), "PUT: {}", changed.status());
    let deleted = http
        .delete(format!("{}/Encounter/{encounter}", server.base))
        .send()
        .await
        .unwrap();
    assert!(
        deleted.status().is_success(),
        "DELETE: {}",
        deleted.status()
    );

    let second = run().await;

    // What the server says it was asked, not only what the client says it sent.
    let second_dir = Path::new(second["directory"].as_str().unwrap()).to_owned();
    assert_ne!(second_dir, first_dir);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(second_dir.join("manifest.json")).unwrap()).unwrap();
    let request = reqwest::Url::parse(manifest["request"].as_str().unwrap()).unwrap();
    let since: Vec<String> = request
        .query_pairs()
        .filter(|(name, _)| name == "_since")
        .map(|(_, value)| value.into_owned())
        .collect();
    assert_eq!(since, vec![first_time.clone()], "{request}");
    assert_eq!(second["since"], first_time.as_str());

    assert_eq!(second["resources"], 1, "{second}");
    let saved = lines(&second_dir.join("Patient.1.ndjson"));
    assert_eq!(saved.len(), 1);
    let saved: Value = serde_json::from_str(&saved[0]).unwrap();
    assert_eq!(
        (&saved["id"], &saved["active"]),
        (&Value::from(patient), &Value::from(false))
    );
    let bundles = lines(&second_dir.join("deleted/Bundle.1.ndjson"));
    let deletions: Vec<(String, String)> = bundles
        .iter()
        .flat_map(|line| {
            let bundle: Value = serde_json::from_str(line).unwrap();
            bundle["entry"].as_array().cloned().unwrap_or_default()
        })
        .map(|entry| {
            let request = &entry["request"];
            (
                request["method"].as_str().unwrap_or_default().to_owned(),
                request["url"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        deletions,
        vec![("DELETE".to_owned(), format!("Encounter/{encounter}"))]
    );
    server.stop().await;
}
