//! Several Hearth processes sharing the work: real `hearth serve` processes on loopback ports,
//! one fresh PostgreSQL database and one S3-compatible bucket (`moto_server`) between them, and
//! a data directory of its own for each (they share no local disk). Any instance answers for any
//! job; a SIGKILLed instance's units are taken over by the other once their leases run out, with
//! output identical to an undisturbed export; a cancel made through one instance stops the
//! workers of every instance within about a second.
//!
//! Without PostgreSQL or moto_server the tests say "skipped" on stderr and pass, unless
//! `HEARTH_REQUIRE_POSTGRES=1` / `HEARTH_REQUIRE_S3=1` (as CI sets them).

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    TIMEOUT, assert_no_deleted_or_error, download, free_port, hearth_command, hearth_ok,
    http_client, job_id, kick_off, kick_off_with, load_summary, wait_done, wait_ready,
};
use hearth_export::testing::{self, Moto, objects};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;
use tempfile::TempDir;

const BUCKET: &str = "hearth-scale-out";
const PREFIX: &str = "exports";
/// The instances' export lease: after a SIGKILL, the other instance may take the dead one's
/// units over this long after their last renewal (30 s by default would dominate the test).
const LEASE_SECS: &str = "3";
/// How soon after a cancel every unit of the job must have stopped, on every instance: the
/// promise. Workers re-read the job row every 400 ms, so they stop within about half of it.
const CANCEL_REACHES_WORKERS: Duration = Duration::from_secs(1);

/// Each test runs two servers, moto and PostgreSQL on a two-core machine: run alone, their
/// timings measure Hearth, not the other tests. A tokio mutex, as the guard is held across
/// awaits (and each test has a runtime of its own, which this mutex does not mind).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A line on the process's stderr (skips, timings): libtest swallows `eprintln!` of a passing
/// test.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// One `hearth serve` process of the cluster; killed and reaped when dropped, also when the
/// test fails.
struct Instance {
    name: &'static str,
    child: Child,
    /// `http://127.0.0.1:<port>/fhir`.
    base: String,
    /// Its own data directory: export files are staged under `exports/<job>/` here.
    data: PathBuf,
    log: PathBuf,
    /// The export engine's id: the leases this process holds are named `<id>-<worker>`.
    id: String,
}

impl Instance {
    /// Whether this process holds the lease `owner`.
    fn owns(&self, owner: &str) -> bool {
        owner
            .strip_prefix(self.id.as_str())
            .is_some_and(|worker| worker.starts_with('-'))
    }

    /// The JSON log lines written so far.
    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The files a job has staged in this instance's data directory right now.
    fn staged_files(&self, job: &str) -> Vec<String> {
        let dir = self.data.join("exports").join(job);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// SIGKILL, then reap: no chance to release a lease or finish a unit.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("the killed server is reaped");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One database, one bucket, and the instances serving them.
struct Cluster {
    /// Declared first, so dropped first: the servers go before the bucket and the directories
    /// they use.
    instances: Vec<Instance>,
    moto: Moto,
    database: String,
    pool: PgPool,
    client: reqwest::Client,
    tmp: TempDir,
}

impl Cluster {
    /// A fresh database and bucket; `None` (after saying "skipped") when PostgreSQL or
    /// moto_server is missing and not required.
    async fn start(test: &str) -> Option<Self> {
        let Some(database) = hearth_store::postgres::testing::fresh_database_url().await else {
            say(&format!(
                "{test}: skipped: PostgreSQL is not reachable (HEARTH_TEST_POSTGRES); set HEARTH_REQUIRE_POSTGRES=1 to make this a failure"
            ));
            return None;
        };
        let moto = Moto::start(test, BUCKET).await?;
        let pool = PgPool::connect(&database)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"));
        let client = http_client();
        Some(Self {
            instances: Vec::new(),
            moto,
            database,
            pool,
            client,
            tmp: TempDir::new().expect("temp dir"),
        })
    }

    /// `hearth synth` into a directory of the test.
    fn synthesize(&self, patients: u64) -> PathBuf {
        let out = self.tmp.path().join("synth");
        hearth_ok(&[
            "synth".as_ref(),
            "--patients".as_ref(),
            patients.to_string().as_ref(),
            "--seed".as_ref(),
            "7".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        out
    }

    /// `hearth load --database` (the schema is created by whoever connects first); returns the
    /// per-type counts it reports.
    fn load(&self, dir: &Path) -> BTreeMap<String, u64> {
        let output = hearth_ok(&[
            "load".as_ref(),
            dir.as_os_str(),
            "--database".as_ref(),
            self.database.as_ref(),
        ]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let counts = load_summary(&stdout);
        assert!(
            !counts.is_empty(),
            "no counts in the load summary: {stdout}"
        );
        counts
    }

    /// Starts `hearth serve` on the shared database and bucket, waits until it answers, and
    /// returns its index in `instances`.
    async fn add(&mut self, name: &'static str, extra: &[&str]) -> usize {
        let port = free_port();
        let data = self.tmp.path().join(format!("data-{name}"));
        let log = self.tmp.path().join(format!("serve-{name}.log"));
        let addr = format!("127.0.0.1:{port}");
        let output = format!("s3://{BUCKET}/{PREFIX}");
        let fixed = [
            "serve",
            "--addr",
            &addr,
            "--database",
            &self.database,
            "--output",
            &output,
            "--s3-endpoint",
            &self.moto.endpoint,
            "--s3-allow-http",
            "--log-format",
            "json",
        ];
        let mut args: Vec<&OsStr> = fixed.iter().map(OsStr::new).collect();
        args.extend(["--data".as_ref(), data.as_os_str()]);
        args.extend(extra.iter().map(OsStr::new));
        let child = hearth_command(&args)
            .env("AWS_ACCESS_KEY_ID", testing::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", testing::SECRET_KEY)
            .env("AWS_REGION", testing::REGION)
            // Workers log each unit they finish (debug) or give up (info): the cancel test reads
            // the latter, and both tell what happened when a test fails.
            .env("RUST_LOG", "info,hearth_export=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log).expect("a log file")))
            .spawn()
            .expect("hearth serve starts");
        let mut instance = Instance {
            name,
            child,
            base: format!("http://{addr}/fhir"),
            data,
            log,
            id: String::new(),
        };
        wait_ready(
            &mut instance.child,
            &self.client,
            &instance.base,
            &format!("hearth serve {name}"),
            &instance.log,
        )
        .await;
        // The engine logs its id before the server listens.
        instance.id = instance
            .events()
            .iter()
            .find(|e| e["fields"]["message"] == "export workers started")
            .and_then(|e| e["fields"]["instance"].as_str())
            .unwrap_or_else(|| {
                panic!(
                    "{name} did not log its instance id: {}",
                    instance.log_text()
                )
            })
            .to_owned();
        self.instances.push(instance);
        self.instances.len() - 1
    }

    /// The export objects of `job` in the bucket.
    async fn objects_of(&self, job: &str) -> Vec<String> {
        objects(&self.moto.store(BUCKET), &format!("{PREFIX}/{job}"))
            .await
            .into_iter()
            .map(|o| o.location.to_string())
            .collect()
    }
}

/// One row of `export_unit`, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unit {
    unit_no: i64,
    status: String,
    owner: Option<String>,
    attempt: i64,
}

/// The work units of `job`, read straight from the shared database: who holds what, where no
/// HTTP answer says.
async fn units(pool: &PgPool, job: &str) -> Vec<Unit> {
    let rows: Vec<(i64, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT unit_no, status, lease_owner, attempt FROM export_unit WHERE job_id = $1
         ORDER BY unit_no",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .expect("the export units of the job");
    rows.into_iter()
        .map(|(unit_no, status, owner, attempt)| Unit {
            unit_no,
            status,
            owner,
            attempt,
        })
        .collect()
}

/// The same path on another instance: `http://a/fhir/x` → `<base>/x`.
fn on(base: &str, url: &str) -> String {
    let (_, path) = url
        .split_once("/fhir/")
        .unwrap_or_else(|| panic!("{url} is not under a /fhir base"));
    format!("{base}/{path}")
}

/// The status code and body of a GET or DELETE.
async fn request(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
) -> (StatusCode, String) {
    let response = client
        .request(method.clone(), url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url} is not answered: {e}"));
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

/// The non-empty lines of an NDJSON file, checked to be `resource_type` resources and as many
/// as the manifest's `count`.
fn ndjson_lines(body: &[u8], item: &Value) -> Vec<String> {
    let resource_type = item["type"].as_str().expect("a type");
    let text = std::str::from_utf8(body).expect("UTF-8 NDJSON");
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    for line in &lines {
        let resource: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a line of {item} is not JSON ({e}): {line}"));
        assert_eq!(resource["resourceType"], resource_type, "a line of {item}");
    }
    assert_eq!(
        Some(lines.len() as u64),
        item["count"].as_u64(),
        "the count of {item} differs from its file"
    );
    lines
}

/// Every `output` line of a manifest downloaded through `base`, sorted, by resource type.
async fn output_lines(
    client: &reqwest::Client,
    base: &str,
    manifest: &Value,
) -> BTreeMap<String, Vec<String>> {
    assert_no_deleted_or_error(manifest);
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in manifest["output"].as_array().expect("an output array") {
        let url = on(base, item["url"].as_str().expect("a url"));
        let body = download(client, &url).await;
        by_type
            .entry(item["type"].as_str().expect("a type").to_owned())
            .or_default()
            .extend(ndjson_lines(&body, item));
    }
    for lines in by_type.values_mut() {
        lines.sort_unstable();
    }
    by_type
}

fn counts(lines: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, u64> {
    lines
        .iter()
        .map(|(t, l)| (t.clone(), l.len() as u64))
        .collect()
}

/// Asserts two exports hold the same lines per type, naming the first difference rather than
/// printing tens of megabytes.
fn assert_same_lines(
    actual: &BTreeMap<String, Vec<String>>,
    expected: &BTreeMap<String, Vec<String>>,
    what: &str,
) {
    assert_eq!(counts(actual), counts(expected), "{what}: lines per type");
    for (resource_type, lines) in expected {
        let other = &actual[resource_type];
        if let Some(at) = (0..lines.len()).find(|&i| lines[i] != other[i]) {
            panic!(
                "{what}: the sorted {resource_type} lines differ first at line {at}:\n  {}\nwhere the undisturbed export has\n  {}",
                &other[at][..other[at].len().min(300)],
                &lines[at][..lines[at].len().min(300)]
            );
        }
    }
}

/// The small Synthea set in the repository, and its per-type counts.
fn synthea_10p() -> (PathBuf, BTreeMap<String, u64>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-10p");
    let counts_file = dir.with_extension("counts.json");
    let counts: Value = serde_json::from_str(
        &std::fs::read_to_string(&counts_file)
            .unwrap_or_else(|e| panic!("{}: {e}", counts_file.display())),
    )
    .expect("counts JSON");
    let by_type = counts["by_type"]
        .as_object()
        .expect("by_type")
        .iter()
        .map(|(t, n)| (t.clone(), n.as_u64().expect("a count")))
        .collect();
    (dir, by_type)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_instance_serves_any_job() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let Some(mut cluster) = Cluster::start("any_instance_serves_any_job").await else {
        return;
    };
    let (dir, expected) = synthea_10p();
    assert_eq!(cluster.load(&dir), expected, "what hearth load reports");
    let a = cluster.add("A", &["--export-workers", "1"]).await;
    let b = cluster.add("B", &["--export-workers", "1"]).await;
    let (a, b) = (&cluster.instances[a], &cluster.instances[b]);
    let client = &cluster.client;

    // Kicked off on A, polled on B.
    let status_on_a = kick_off(client, &a.base).await;
    assert!(status_on_a.starts_with(&a.base), "{status_on_a}");
    let status_on_b = on(&b.base, &status_on_a);
    let manifest_b = wait_done(client, &status_on_b).await;
    let manifest_a = wait_done(client, &status_on_a).await;

    // Each instance's manifest lists download URLs on that instance, whichever of them built
    // it: a client keeps talking to the instance it knows, which can serve every file.
    for (instance, manifest) in [(a, &manifest_a), (b, &manifest_b)] {
        let urls: Vec<&str> = ["output", "deleted", "error"]
            .iter()
            .flat_map(|kind| manifest[kind].as_array().into_iter().flatten())
            .map(|item| item["url"].as_str().expect("a url"))
            .collect();
        assert!(!urls.is_empty(), "{manifest}");
        for url in urls {
            assert!(
                url.starts_with(&format!("{}/Binary/", instance.base)),
                "the manifest {} answers lists {url}",
                instance.name
            );
        }
    }
    let file_ids = |manifest: &Value| -> Vec<(String, String, u64)> {
        manifest["output"]
            .as_array()
            .expect("output")
            .iter()
            .map(|item| {
                let url = item["url"].as_str().expect("a url");
                (
                    item["type"].as_str().expect("a type").to_owned(),
                    url.rsplit('/').next().expect("a file id").to_owned(),
                    item["count"].as_u64().expect("a count"),
                )
            })
            .collect()
    };
    assert_eq!(
        file_ids(&manifest_a),
        file_ids(&manifest_b),
        "the same files"
    );
    assert_eq!(manifest_a["transactionTime"], manifest_b["transactionTime"]);

    // Every file through both instances: the same bytes, as many lines as the manifest says,
    // and all of the data.
    let mut exported: BTreeMap<String, u64> = BTreeMap::new();
    for item in manifest_b["output"].as_array().expect("output") {
        let url = item["url"].as_str().expect("a url");
        let through_b = download(client, url).await;
        let through_a = download(client, &on(&a.base, url)).await;
        assert!(
            through_a == through_b,
            "{url}: A and B serve different bytes"
        );
        *exported
            .entry(item["type"].as_str().expect("a type").to_owned())
            .or_default() += ndjson_lines(&through_b, item).len() as u64;
    }
    assert_eq!(exported, expected, "resources exported per type");

    // Kicked off on A, cancelled on B: gone for both.
    let status_on_a = kick_off(client, &a.base).await;
    let status_on_b = on(&b.base, &status_on_a);
    let (cancelled, text) = request(client, reqwest::Method::DELETE, &status_on_b).await;
    assert_eq!(
        cancelled,
        StatusCode::ACCEPTED,
        "DELETE {status_on_b}: {text}"
    );
    for url in [&status_on_a, &status_on_b] {
        let (status, text) = request(client, reqwest::Method::GET, url).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "GET {url} after the cancel: {text}"
        );
    }
    let (again, text) = request(client, reqwest::Method::DELETE, &status_on_a).await;
    assert_eq!(
        again,
        StatusCode::NOT_FOUND,
        "a second DELETE, on A: {text}"
    );
    say(&format!(
        "any_instance_serves_any_job: {:.1?}",
        started.elapsed()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_its_units_to_the_other() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let Some(mut cluster) = Cluster::start("a_killed_instance_leaves_its_units_to_the_other").await
    else {
        return;
    };
    let synth = cluster.synthesize(150);
    let expected = cluster.load(&synth);
    let total: u64 = expected.values().sum();
    assert!(total > 40_000, "{expected:?}");
    // Small units, so the job is many units spread over both instances' workers.
    let options = [
        "--export-workers",
        "2",
        "--export-unit-rows",
        "2000",
        "--export-lease-secs",
        LEASE_SECS,
    ];
    cluster.add("A", &options).await;
    cluster.add("B", &options).await;
    say(&format!(
        "{total} resources loaded, two instances up in {:.1?}",
        started.elapsed()
    ));

    // Watch the leases; kill the instance that holds the most once some units are done and
    // some are not (a job that finishes before that is tried again).
    let mut caught = None;
    for attempt in 1..=3 {
        let status_url = kick_off(&cluster.client, &cluster.instances[0].base).await;
        let job = job_id(&status_url);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let rows = units(&cluster.pool, &job).await;
            let done = rows.iter().filter(|u| u.status == "done").count();
            if done == rows.len() {
                say(&format!(
                    "attempt {attempt}: the job was done before a kill"
                ));
                break;
            }
            let held = |instance: &Instance| -> Vec<Unit> {
                rows.iter()
                    .filter(|u| u.status == "running")
                    .filter(|u| u.owner.as_deref().is_some_and(|o| instance.owns(o)))
                    .cloned()
                    .collect()
            };
            let (first, second) = (held(&cluster.instances[0]), held(&cluster.instances[1]));
            let (victim, leases) = if first.len() >= second.len() {
                (0, first)
            } else {
                (1, second)
            };
            // A quarter done: both instances have been at work for a while.
            if done * 4 >= rows.len() && !leases.is_empty() {
                cluster.instances[victim].kill();
                // What the dead process held when it died: a unit it committed between the
                // read above and the kill is no longer its to hand over.
                let rows = units(&cluster.pool, &job).await;
                let leases: Vec<Unit> = rows
                    .iter()
                    .filter(|u| u.status == "running")
                    .filter(|u| {
                        u.owner
                            .as_deref()
                            .is_some_and(|o| cluster.instances[victim].owns(o))
                    })
                    .cloned()
                    .collect();
                if leases.is_empty() {
                    // Rare: its last unit committed in the moment before the kill. The survivor
                    // must still finish the job with the same output (checked below).
                    say("the killed instance had just committed its last unit");
                }
                say(&format!(
                    "killed {} holding units {:?}, {done} of {} units done",
                    cluster.instances[victim].name,
                    leases.iter().map(|u| u.unit_no).collect::<Vec<_>>(),
                    rows.len()
                ));
                caught = Some((status_url, job, victim, leases));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no unit of {job} was done within {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if caught.is_some() {
            break;
        }
    }
    let (status_url, job, victim, leases) =
        caught.expect("a job caught with units done and units leased");
    let survivor = &cluster.instances[1 - victim];
    let client = &cluster.client;

    let killed_at = Instant::now();
    let manifest = wait_done(client, &on(&survivor.base, &status_url)).await;
    say(&format!(
        "{} completed the job {:.1?} after the kill",
        survivor.name,
        killed_at.elapsed()
    ));
    // The dead instance's units were claimed again (a later attempt) and finished.
    let after = units(&cluster.pool, &job).await;
    for held in &leases {
        let now = after
            .iter()
            .find(|u| u.unit_no == held.unit_no)
            .expect("the unit is still there");
        assert!(
            now.status == "done" && now.attempt > held.attempt,
            "unit {} was held by the killed instance ({held:?}) and is now {now:?}",
            held.unit_no
        );
    }
    let resumed = output_lines(client, &survivor.base, &manifest).await;
    assert_eq!(counts(&resumed), expected, "per-type counts after the kill");

    // The same data exported by nobody's death: the same lines. Nothing was written in
    // between, so both exports read the same resources (their snapshots differ only in time).
    let undisturbed_status = kick_off(client, &survivor.base).await;
    let undisturbed_manifest = wait_done(client, &undisturbed_status).await;
    let undisturbed = output_lines(client, &survivor.base, &undisturbed_manifest).await;
    assert_same_lines(
        &resumed,
        &undisturbed,
        "the export whose instance was killed",
    );
    say(&format!(
        "a_killed_instance_leaves_its_units_to_the_other: {:.1?}",
        started.elapsed()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_workers_on_every_instance_within_a_second() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let test = "a_cancel_reaches_workers_on_every_instance_within_a_second";
    let Some(mut cluster) = Cluster::start(test).await else {
        return;
    };
    let synth = cluster.synthesize(400);
    let loaded = cluster.load(&synth);
    // One unit per type: the largest (Observation, about 62,000 resources) takes about three
    // seconds here to scan and upload, so a worker that does not notice the cancel runs past
    // the deadline. The default lease (renewed every 10 s) leaves noticing it to the workers'
    // job-row checks.
    let options = ["--export-workers", "2", "--export-unit-rows", "100000"];
    let a = cluster.add("A", &options).await;
    let b = cluster.add("B", &options).await;
    let client = &cluster.client;
    let (a, b) = (&cluster.instances[a], &cluster.instances[b]);

    let status_url = kick_off(client, &a.base).await;
    let job = job_id(&status_url);
    // A's workers wake at once and take the largest units. B's would find the rest within a
    // second, half-way through A's; a kick-off on B wakes them now, and they take the older
    // job's units first.
    let wake_b = kick_off_with(client, &b.base, "?_type=Patient").await;
    // Units run on both instances before the cancel.
    let deadline = Instant::now() + TIMEOUT;
    let before = loop {
        let rows = units(&cluster.pool, &job).await;
        let holds = |instance: &Instance| {
            rows.iter().any(|u| {
                u.status == "running" && u.owner.as_deref().is_some_and(|o| instance.owns(o))
            })
        };
        if holds(a) && holds(b) {
            break rows;
        }
        assert!(
            rows.iter().any(|u| u.status != "done"),
            "the job finished before units ran on both instances"
        );
        assert!(
            Instant::now() < deadline,
            "units of {job} did not run on both instances within {TIMEOUT:?}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    let (cancelled, text) =
        request(client, reqwest::Method::DELETE, &on(&b.base, &status_url)).await;
    let cancelled_at = Instant::now();
    assert_eq!(cancelled, StatusCode::ACCEPTED, "DELETE on B: {text}");

    // Units claimed and not committed when the cancel landed: no commit succeeds after it, and
    // nothing of the job is claimed any more.
    let in_flight: Vec<Unit> = units(&cluster.pool, &job)
        .await
        .into_iter()
        .filter(|u| u.status == "running")
        .collect();
    let owner_of = |unit: &Unit| -> &Instance {
        [a, b]
            .into_iter()
            .find(|i| unit.owner.as_deref().is_some_and(|o| i.owns(o)))
            .unwrap_or_else(|| panic!("{unit:?} is held by neither instance"))
    };
    for instance in [a, b] {
        assert!(
            in_flight.iter().any(|u| owner_of(u).name == instance.name),
            "no unit was running on {} at the cancel: {in_flight:?}; before it: {before:?}",
            instance.name
        );
    }
    // Each worker logs the unit it gives up; wait for every one of them.
    let mut stopped: BTreeMap<i64, (Duration, String)> = BTreeMap::new();
    // Waiting longer than the promise tells a late worker from one that never stops.
    while stopped.len() < in_flight.len() && cancelled_at.elapsed() < CANCEL_REACHES_WORKERS * 5 {
        for unit in &in_flight {
            if stopped.contains_key(&unit.unit_no) {
                continue;
            }
            let owner = owner_of(unit);
            let given_up = owner.events().into_iter().find(|e| {
                let fields = &e["fields"];
                fields["message"] == "unit abandoned"
                    && fields["job"] == job.as_str()
                    && fields["unit"] == unit.unit_no
            });
            if let Some(event) = given_up {
                let reason = event["fields"]["reason"].as_str().unwrap_or("?").to_owned();
                stopped.insert(
                    unit.unit_no,
                    (cancelled_at.elapsed(), format!("{} {reason}", owner.name)),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    say(&format!(
        "units running at the cancel: {:?}; stopped (unit: after, where, why): {stopped:?}",
        in_flight.iter().map(|u| u.unit_no).collect::<Vec<_>>()
    ));
    for unit in &in_flight {
        let owner = owner_of(unit);
        assert!(
            stopped.contains_key(&unit.unit_no),
            "unit {} on {} did not stop within {:?} of the cancel: {}",
            unit.unit_no,
            owner.name,
            CANCEL_REACHES_WORKERS * 5,
            owner.log_text()
        );
    }
    for unit in &in_flight {
        let owner = owner_of(unit);
        let (after, _) = &stopped[&unit.unit_no];
        assert!(
            *after <= CANCEL_REACHES_WORKERS,
            "unit {} on {} stopped {after:?} after the cancel",
            unit.unit_no,
            owner.name
        );
    }
    // Nothing of the job is written any more: no staged file on either instance, no object in
    // the bucket, now or a while later.
    tokio::time::sleep(CANCEL_REACHES_WORKERS.saturating_sub(cancelled_at.elapsed())).await;
    for round in ["when the workers stopped", "a second later"] {
        for instance in [a, b] {
            assert_eq!(
                instance.staged_files(&job),
                Vec::<String>::new(),
                "{round}: files of the cancelled job staged on {}",
                instance.name
            );
        }
        assert_eq!(
            cluster.objects_of(&job).await,
            Vec::<String>::new(),
            "{round}: objects of the cancelled job in the bucket"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for instance in [a, b] {
        let url = on(&instance.base, &status_url);
        let (status, text) = request(client, reqwest::Method::GET, &url).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "GET {url}: {text}");
    }
    // The other job goes on: the cancel stopped one job, not the workers.
    let manifest = wait_done(client, &wake_b).await;
    assert_eq!(
        manifest["output"][0]["count"].as_u64(),
        loaded.get("Patient").copied(),
        "{manifest}"
    );
    say(&format!("{test}: {:.1?}", started.elapsed()));
}
