//! An export survives its server being killed: real `hearth` processes on a loopback port. A
//! synthetic population is generated and loaded with the binary, a system export is started and
//! the server is SIGKILLed while the job is half done; a server restarted on the same data
//! directory finishes the job without redoing the units that were done, and the result is
//! exactly the population, the same as an export that was never interrupted.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{
    Poll, TIMEOUT, assert_no_deleted_or_error, free_port, hearth_command, hearth_ok, http_client,
    job_id, kick_off, load_summary, poll, wait_done,
};
use serde_json::Value;
use serde_json::value::RawValue;
use tempfile::TempDir;

/// `(resource type, id)`.
type Key = (String, String);

const PATIENTS: &str = "150";
const SEED: &str = "7";
const UNIT_ROWS: &str = "1000";
/// How often the status URL is polled while waiting for the job to be half done.
const FAST_POLL: Duration = Duration::from_millis(5);
/// The server is killed at the first poll that shows at least this much progress (and not
/// everything done), so several units are finished and others are not.
const KILL_AT_PERCENT: u64 = 25;
/// Kick-offs tried before giving up catching a job mid-way (it may finish between two polls).
const ATTEMPTS: usize = 3;

/// A `hearth serve` process; killed and reaped when dropped, also when the test fails.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(data: &Path, port: u16, log: PathBuf) -> Self {
        let stderr = File::create(&log).expect("a log file");
        let addr = format!("127.0.0.1:{port}");
        let child = hearth_command(&[
            "serve".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
            "--addr".as_ref(),
            addr.as_ref(),
            "--export-workers".as_ref(),
            "1".as_ref(),
            "--export-unit-rows".as_ref(),
            UNIT_ROWS.as_ref(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("hearth serve starts");
        Self { child, log }
    }

    /// Waits until `GET [base]/metadata` answers 200.
    async fn wait_ready(&mut self, client: &reqwest::Client, base: &str) {
        common::wait_ready(&mut self.child, client, base, "hearth serve", &self.log).await;
    }

    /// SIGKILL, then reap; returns the instant after which the process wrote nothing.
    fn kill(&mut self) -> SystemTime {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("the killed server is reaped");
        SystemTime::now()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `resourceType` and `id` of one NDJSON line, without building the whole tree.
fn key_of(line: &str) -> Key {
    let members: BTreeMap<&str, &RawValue> =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
    let text = |name: &str| -> String {
        let raw = members
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {line}"));
        serde_json::from_str(raw.get()).unwrap_or_else(|e| panic!("{name} is not text ({e})"))
    };
    (text("resourceType"), text("id"))
}

/// Every `(type, id)` in the NDJSON files `hearth synth` wrote.
fn population(dir: &Path) -> BTreeSet<Key> {
    let mut keys = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("the synth directory") {
        let path = entry.expect("an entry").path();
        let text = std::fs::read_to_string(&path).expect("a synth file");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let key = key_of(line);
            assert!(keys.insert(key.clone()), "{key:?} twice in the population");
        }
    }
    keys
}

/// `X-Progress` like `41% (77,512 of 189,111 resources)`: percent, done, total.
fn parse_progress(text: &str) -> (u64, u64, u64) {
    let parse = || -> Option<(u64, u64, u64)> {
        let (percent, rest) = text.split_once('%')?;
        let inside = rest.split_once('(')?.1.split_once(')')?.0;
        let (done, total) = inside.trim_end_matches(" resources").split_once(" of ")?;
        let number = |s: &str| s.trim().replace(',', "").parse::<u64>().ok();
        Some((percent.trim().parse().ok()?, number(done)?, number(total)?))
    };
    parse().unwrap_or_else(|| {
        panic!("X-Progress '{text}' is not like '41% (77,512 of 189,111 resources)'")
    })
}

/// Every file of a manifest, as downloaded.
struct Downloaded {
    /// The bodies of the files, as served.
    files: Vec<Vec<u8>>,
    /// Every line, with its `(type, id)`.
    lines: Vec<(Key, String)>,
}

impl Downloaded {
    fn counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for ((resource_type, _), _) in &self.lines {
            *counts.entry(resource_type.clone()).or_default() += 1;
        }
        counts
    }

    /// The ids, asserting none appears twice.
    fn keys(&self) -> BTreeSet<Key> {
        let mut keys = BTreeSet::new();
        let mut twice = Vec::new();
        for (key, _) in &self.lines {
            if !keys.insert(key.clone()) {
                twice.push(key.clone());
            }
        }
        assert!(
            twice.is_empty(),
            "{} resources are exported more than once, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(10)]
        );
        keys
    }

    fn sorted_lines(&self) -> Vec<&str> {
        let mut lines: Vec<&str> = self.lines.iter().map(|(_, l)| l.as_str()).collect();
        lines.sort_unstable();
        lines
    }
}

async fn download(client: &reqwest::Client, base: &str, manifest: &Value) -> Downloaded {
    assert_no_deleted_or_error(manifest);
    let mut downloaded = Downloaded {
        files: Vec::new(),
        lines: Vec::new(),
    };
    for item in manifest["output"].as_array().expect("an output array") {
        let resource_type = item["type"].as_str().expect("a type");
        let url = item["url"].as_str().expect("a url");
        assert!(
            url.starts_with(&format!("{base}/Binary/")),
            "{url} is not under {base}"
        );
        let body = common::download(client, url).await;
        let text = std::str::from_utf8(&body).expect("UTF-8 NDJSON");
        let mut count = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let key = key_of(line);
            assert_eq!(
                key.0, resource_type,
                "a line of the {resource_type} file {url}"
            );
            downloaded.lines.push((key, line.to_owned()));
            count += 1;
        }
        assert_eq!(
            Some(count),
            item["count"].as_u64(),
            "the count of {item} differs from its file"
        );
        downloaded.files.push(body);
    }
    downloaded
}

/// The export files in a job's directory: name, modification time and content.
fn job_files(dir: &Path) -> Vec<(String, SystemTime, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.expect("an entry");
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .expect("a modification time");
        let content = std::fs::read(entry.path()).expect("a readable export file");
        files.push((
            entry.file_name().to_string_lossy().into_owned(),
            modified,
            content,
        ));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

fn line_count(content: &[u8]) -> u64 {
    content
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64
}

/// What was seen when the server was killed.
struct Interrupted {
    status_url: String,
    job_id: String,
    progress: String,
    percent: u64,
    done: u64,
    killed_at: SystemTime,
}

/// Kicks off exports until one is caught with some but not all resources done, and kills the
/// server right then.
async fn kill_mid_export(server: &mut Server, client: &reqwest::Client, base: &str) -> Interrupted {
    for attempt in 1..=ATTEMPTS {
        let status_url = kick_off(client, base).await;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match poll(client, &status_url).await {
                Poll::Running { progress } => {
                    let (percent, done, total) = parse_progress(&progress);
                    if percent >= KILL_AT_PERCENT && done < total {
                        let killed_at = server.kill();
                        let job_id = job_id(&status_url);
                        return Interrupted {
                            status_url,
                            job_id,
                            progress,
                            percent,
                            done,
                            killed_at,
                        };
                    }
                }
                Poll::Done(_) => {
                    eprintln!("attempt {attempt}: the export completed between two polls");
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{status_url} made no progress within {TIMEOUT:?}"
            );
            tokio::time::sleep(FAST_POLL).await;
        }
    }
    panic!("no export of {ATTEMPTS} was caught mid-way with polls every {FAST_POLL:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_interrupted_by_sigkill_completes_after_restart_without_redoing_units() {
    let started = Instant::now();
    let tmp = TempDir::new().expect("temp dir");
    let synth = tmp.path().join("synth");
    let data = tmp.path().join("data");

    // The population, generated and loaded with the binary.
    hearth_ok(&[
        "synth".as_ref(),
        "--patients".as_ref(),
        PATIENTS.as_ref(),
        "--out".as_ref(),
        synth.as_os_str(),
        "--seed".as_ref(),
        SEED.as_ref(),
    ]);
    let population = population(&synth);
    let loaded = hearth_ok(&[
        "load".as_ref(),
        synth.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
    ]);
    let expected = load_summary(&String::from_utf8_lossy(&loaded.stdout));
    let total: u64 = expected.values().sum();
    assert!(
        total > 10_000 && expected.len() > 5,
        "the load summary: {expected:?}"
    );
    assert_eq!(total, population.len() as u64);
    eprintln!(
        "{total} resources of {} types generated and loaded in {:.2?}",
        expected.len(),
        started.elapsed()
    );

    // A server, and an export killed half way.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let mut first = Server::start(&data, port, tmp.path().join("serve-1.log"));
    let client = http_client();
    first.wait_ready(&client, &base).await;
    for (resource_type, count) in &expected {
        let url = format!("{base}/{resource_type}?_summary=count");
        let bundle: Value = client
            .get(&url)
            .send()
            .await
            .expect("a count")
            .json()
            .await
            .expect("a JSON Bundle");
        assert_eq!(bundle["total"].as_u64(), Some(*count), "GET {url}");
    }
    let interrupted = kill_mid_export(&mut first, &client, &base).await;
    drop(first);
    eprintln!(
        "killed at {} ({:.2?} into the test)",
        interrupted.progress,
        started.elapsed()
    );
    assert!(
        (1..=99).contains(&interrupted.percent),
        "the job was not interrupted mid-way: {}",
        interrupted.progress
    );
    let job_dir = data.join("exports").join(&interrupted.job_id);
    let at_kill = job_files(&job_dir);

    // The same data directory, the same port, the same status URL.
    let mut second = Server::start(&data, port, tmp.path().join("serve-2.log"));
    let client = http_client();
    second.wait_ready(&client, &base).await;
    let manifest = wait_done(&client, &interrupted.status_url).await;
    let resumed = download(&client, &base, &manifest).await;

    // Exactly the population: per-type counts, no id twice, every id.
    assert_eq!(
        resumed.counts(),
        expected,
        "per-type counts after the restart"
    );
    assert_eq!(
        resumed.keys(),
        population,
        "the ids exported after the restart"
    );

    // Units done before the kill were kept, not redone: their files are still there, unchanged
    // and served as part of the output; later units were written by the restarted server.
    let served: HashSet<&[u8]> = resumed.files.iter().map(Vec::as_slice).collect();
    let after = job_files(&job_dir);
    let mut kept = 0;
    let mut kept_resources = 0;
    let mut written_after_restart = 0;
    for (name, modified, content) in &after {
        assert!(
            served.contains(content.as_slice()),
            "{name} in {} is not one of the files the manifest lists",
            job_dir.display()
        );
        if *modified < interrupted.killed_at {
            kept += 1;
            kept_resources += line_count(content);
            assert!(
                at_kill
                    .iter()
                    .any(|(n, m, c)| n == name && m == modified && c == content),
                "{name} changed after the kill"
            );
        } else {
            written_after_restart += 1;
        }
    }
    assert_eq!(
        after.len(),
        resumed.files.len(),
        "files on disk vs files in the manifest: {:?}",
        after.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(
        kept >= 1,
        "no export file from before the kill was kept; on disk at the kill: {:?}",
        at_kill.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(
        kept_resources >= interrupted.done,
        "{} resources were done at the kill ({}), but only {kept_resources} of them are in \
         files kept from before it: finished units were redone",
        interrupted.done,
        interrupted.progress
    );
    assert!(
        written_after_restart >= 1,
        "no file was written after the restart: the job was not interrupted"
    );
    let partial: Vec<&String> = at_kill
        .iter()
        .filter(|(name, _, _)| !after.iter().any(|(n, _, _)| n == name))
        .map(|(name, _, _)| name)
        .collect();
    eprintln!(
        "{} files on disk at the kill; {kept} of them ({kept_resources} resources) kept, \
         {partial:?} (a unit in progress) replaced; {written_after_restart} files written \
         after the restart ({:.2?} into the test)",
        at_kill.len(),
        started.elapsed()
    );

    // An export that nobody interrupts gives the same.
    let status_url = kick_off(&client, &base).await;
    let manifest = wait_done(&client, &status_url).await;
    let whole = download(&client, &base, &manifest).await;
    assert_eq!(whole.counts(), resumed.counts());
    assert_eq!(whole.keys(), resumed.keys());
    assert!(
        whole.sorted_lines() == resumed.sorted_lines(),
        "the uninterrupted export differs from the resumed one"
    );
    drop(second);
    eprintln!("took {:.2?}", started.elapsed());
}
