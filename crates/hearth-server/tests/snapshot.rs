//! Snapshot consistency of FHIR Bulk Data export, end to end: a real server on a loopback port
//! over the 10-patient Synthea set, written to through HTTP while exports run.
//!
//! An export reads everything committed up to its kick-off (`transactionTime`) and nothing
//! later; an export with `_since=<transactionTime of the previous one>` then holds exactly the
//! changes made after it. The server runs with one worker and 50-resource units, so a job is
//! split into ~60 units and is still running while the writes land.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hearth_load::{BatchLimits, LoadObserver, Rejection, Target};
use hearth_server::{Embedded, ExportSettings, ServerConfig};
use hearth_store::{SqliteStore, Store};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// `(resource type, id)`.
type Key = (String, String);

const FHIR_JSON: &str = "application/fhir+json";
/// Resources in the 10-patient Synthea set.
const SYNTHEA_RESOURCES: usize = 2523;
/// Planned resources per export unit: many small units, so a job takes a while.
const UNIT_ROWS: u64 = 50;
/// Longest wait for one export to complete.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

fn synthea_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/synthea-r4-10p"
    ))
}

/// Every resource of the Synthea set as it is in the files, by `(type, id)`.
fn synthea_resources() -> BTreeMap<Key, Value> {
    let mut resources = BTreeMap::new();
    for entry in std::fs::read_dir(synthea_dir()).expect("the test data directory") {
        let path = entry.expect("a directory entry").path();
        if !path.to_string_lossy().ends_with(".ndjson.gz") {
            continue;
        }
        let file = std::fs::File::open(&path).expect("a test data file");
        let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
        for line in reader.lines() {
            let line = line.expect("a readable line");
            if line.trim().is_empty() {
                continue;
            }
            let resource: Value = serde_json::from_str(&line).expect("a JSON line");
            let key = key_of(&resource);
            assert!(
                resources.insert(key.clone(), resource).is_none(),
                "{key:?} twice in the test data"
            );
        }
    }
    resources
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

/// Loads the Synthea set into a fresh data directory with `hearth_load`; returns the number of
/// resources created per type.
async fn load_synthea(data: &Path) -> BTreeMap<String, u64> {
    let dir = data.to_owned();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
        .await
        .expect("the open task")
        .expect("the store opens");
    let store = Arc::new(store);
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
    assert_eq!(report.loaded, SYNTHEA_RESOURCES as u64);
    store.close().await.expect("the store closes");
    report
        .by_type
        .iter()
        .map(|(resource_type, counts)| (resource_type.clone(), counts.created))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// A server started with `Embedded::open` on a data directory. `stop` shuts it down in order;
/// dropping it (a failed test) stops it as well as it can.
struct Server {
    base: String,
    client: reqwest::Client,
    embedded: Option<Embedded>,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Removed last.
    _dir: TempDir,
}

impl Server {
    async fn start(dir: TempDir, data: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}/fhir", listener.local_addr().expect("local addr"));
        let embedded = Embedded::open(
            data,
            ServerConfig {
                base_url: base.clone(),
                max_body_bytes: 16 * 1024 * 1024,
                lenient_headers: false,
            },
            ExportSettings {
                workers: 1,
                rows_per_unit: UNIT_ROWS,
                ..ExportSettings::default()
            },
        )
        .await
        .expect("the server starts on the loaded data directory");
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(hearth_server::serve(
            listener,
            embedded.state.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Self {
            base,
            client,
            embedded: Some(embedded),
            stop: Some(stop),
            serving: Some(serving),
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            serving
                .await
                .expect("the server task")
                .expect("the server ran");
        }
        if let Some(embedded) = self.embedded.take() {
            embedded.shutdown().await.expect("the server shuts down");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Stop the export workers (threads of their own) before the data directory goes, on a
        // small runtime of its own: the test's runtime is busy unwinding.
        if let Some(embedded) = self.embedded.take() {
            let engine = embedded.engine.clone();
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    runtime.block_on(engine.shutdown());
                }
                let _ = done.send(());
            });
            let _ = finished.recv_timeout(Duration::from_secs(10));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a client sees
// ---------------------------------------------------------------------------------------------

fn key_of(resource: &Value) -> Key {
    (
        resource["resourceType"]
            .as_str()
            .unwrap_or_else(|| panic!("no resourceType in {resource}"))
            .to_owned(),
        resource["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {resource}"))
            .to_owned(),
    )
}

fn version_of(resource: &Value) -> String {
    resource["meta"]["versionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no meta.versionId in {resource}"))
        .to_owned()
}

fn enc(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// One export as downloaded.
struct Export {
    transaction_time: String,
    /// `output`: the resources, by `(type, id)`.
    output: BTreeMap<Key, Value>,
    /// `deleted`: the `Type/id` of each DELETE entry.
    deleted: BTreeSet<Key>,
}

impl Export {
    fn versions(&self) -> BTreeMap<Key, String> {
        self.output
            .iter()
            .map(|(key, resource)| (key.clone(), version_of(resource)))
            .collect()
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        count_types(self.output.keys())
    }
}

fn count_types<'a>(keys: impl Iterator<Item = &'a Key>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for (resource_type, _) in keys {
        *counts.entry(resource_type.clone()).or_default() += 1;
    }
    counts
}

/// At most `n` items of a list, for failure messages.
fn first<T: std::fmt::Debug>(items: &[T], n: usize) -> String {
    if items.len() <= n {
        format!("{items:?}")
    } else {
        format!("{:?} and {} more", &items[..n], items.len() - n)
    }
}

/// Asserts that `actual` holds exactly the keys of `expected`, each at the expected version.
fn assert_same_versions(
    what: &str,
    expected: &BTreeMap<Key, String>,
    actual: &BTreeMap<Key, String>,
) {
    let missing: Vec<&Key> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let unexpected: Vec<(&Key, &String)> = actual
        .iter()
        .filter(|(k, _)| !expected.contains_key(*k))
        .collect();
    let wrong: Vec<(&Key, &String, &String)> = expected
        .iter()
        .filter_map(|(k, v)| actual.get(k).filter(|a| *a != v).map(|a| (k, v, a)))
        .collect();
    assert!(
        missing.is_empty() && unexpected.is_empty() && wrong.is_empty(),
        "{what}: {} expected resources are missing: {}; {} are there but should not be \
         (key, versionId): {}; {} have the wrong version (key, expected, actual): {}",
        missing.len(),
        first(&missing, 10),
        unexpected.len(),
        first(&unexpected, 10),
        wrong.len(),
        first(&wrong, 10),
    );
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, method: Method, url: &str, body: Option<&Value>) -> (StatusCode, String) {
        let mut request = self.client.request(method.clone(), url);
        if let Some(body) = body {
            request = request
                .header("content-type", FHIR_JSON)
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url} is not answered: {e}"));
        let status = response.status();
        let text = response.text().await.expect("a readable body");
        (status, text)
    }

    /// PUTs `resource` at its id; returns the status and the stored resource.
    async fn put(&self, resource: &Value) -> (StatusCode, Value) {
        let (resource_type, id) = key_of(resource);
        let url = self.url(&format!("/{resource_type}/{id}"));
        let (status, text) = self.send(Method::PUT, &url, Some(resource)).await;
        assert!(
            status == StatusCode::OK || status == StatusCode::CREATED,
            "PUT {url} answered {status}: {text}"
        );
        (status, serde_json::from_str(&text).expect("a JSON body"))
    }

    /// POSTs `resource` to its type; returns the created resource.
    async fn post(&self, resource: &Value) -> Value {
        let resource_type = resource["resourceType"].as_str().expect("a type");
        let url = self.url(&format!("/{resource_type}"));
        let (status, text) = self.send(Method::POST, &url, Some(resource)).await;
        assert_eq!(status, StatusCode::CREATED, "POST {url}: {text}");
        serde_json::from_str(&text).expect("a JSON body")
    }

    async fn delete(&self, key: &Key) {
        let url = self.url(&format!("/{}/{}", key.0, key.1));
        let (status, text) = self.send(Method::DELETE, &url, None).await;
        assert_eq!(status, StatusCode::OK, "DELETE {url}: {text}");
    }

    /// Kicks off a system export; returns the status URL.
    async fn kick_off(&self, since: Option<&str>) -> String {
        let url = match since {
            Some(since) => self.url(&format!("/$export?_since={}", enc(since))),
            None => self.url("/$export"),
        };
        let response = self
            .client
            .get(&url)
            .header("accept", FHIR_JSON)
            .header("prefer", "respond-async")
            .send()
            .await
            .expect("the kick-off is answered");
        let status = response.status();
        let location = response
            .headers()
            .get("content-location")
            .map(|v| v.to_str().expect("a text header").to_owned());
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::ACCEPTED, "GET {url}: {text}");
        location.unwrap_or_else(|| panic!("the kick-off {url} has no Content-Location"))
    }

    /// Polls a status URL until the manifest comes; returns it and the `X-Progress` of the
    /// first poll.
    async fn wait(&self, status_url: &str) -> (Value, String) {
        let deadline = Instant::now() + EXPORT_TIMEOUT;
        let mut first_progress = None;
        loop {
            let response = self
                .client
                .get(status_url)
                .send()
                .await
                .expect("the status request is answered");
            let status = response.status();
            let progress = response
                .headers()
                .get("x-progress")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = response.text().await.expect("a readable body");
            if first_progress.is_none() {
                assert_eq!(
                    status,
                    StatusCode::ACCEPTED,
                    "the first poll of {status_url} must answer 202: {text}"
                );
                first_progress = Some(progress.clone().unwrap_or_default());
            }
            match status {
                StatusCode::ACCEPTED => {
                    assert!(
                        progress.is_some(),
                        "a 202 from {status_url} without X-Progress"
                    );
                }
                StatusCode::OK => {
                    let manifest: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("the manifest is not JSON ({e}): {text}"));
                    return (manifest, first_progress.unwrap_or_default());
                }
                other => panic!("{status_url} answered {other}: {text}"),
            }
            assert!(
                Instant::now() < deadline,
                "the export at {status_url} did not complete within {EXPORT_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The lines of one NDJSON file of a manifest.
    async fn ndjson(&self, url: &str) -> Vec<Value> {
        let response = self
            .client
            .get(url)
            .send()
            .await
            .expect("the download is answered");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().await.expect("a readable body");
        assert_eq!(status, StatusCode::OK, "GET {url}: {text}");
        assert!(
            content_type.starts_with("application/fhir+ndjson"),
            "GET {url}: content-type {content_type}"
        );
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{url}: a line is not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// Downloads every file of a manifest, checking what holds for every export: counts match
    /// the files, nothing is listed twice, nothing is both output and deleted, no errors.
    async fn download(&self, manifest: &Value) -> Export {
        let transaction_time = manifest["transactionTime"]
            .as_str()
            .unwrap_or_else(|| panic!("no transactionTime in {manifest}"))
            .to_owned();
        let items = |name: &str| -> Vec<Value> {
            manifest[name]
                .as_array()
                .unwrap_or_else(|| panic!("the manifest has no '{name}' array: {manifest}"))
                .clone()
        };
        assert!(
            items("error").is_empty(),
            "the export reported errors: {manifest}"
        );
        let mut output = BTreeMap::new();
        let mut twice = Vec::new();
        for item in items("output") {
            let resource_type = item["type"].as_str().expect("an output type");
            let url = item["url"].as_str().expect("an output url");
            let lines = self.ndjson(url).await;
            assert_eq!(
                Some(lines.len() as u64),
                item["count"].as_u64(),
                "the count of {item} differs from its file"
            );
            for resource in lines {
                assert_eq!(
                    resource["resourceType"], resource_type,
                    "a resource in the {resource_type} file {url}"
                );
                let key = key_of(&resource);
                if output.insert(key.clone(), resource).is_some() {
                    twice.push(key);
                }
            }
        }
        assert!(
            twice.is_empty(),
            "the export at {transaction_time} has {} resources in output more than once: {}",
            twice.len(),
            first(&twice, 10)
        );
        let mut deleted = BTreeSet::new();
        for item in items("deleted") {
            assert_eq!(item["type"], "Bundle", "a deleted item: {item}");
            let url = item["url"].as_str().expect("a deleted url");
            let lines = self.ndjson(url).await;
            assert_eq!(
                Some(lines.len() as u64),
                item["count"].as_u64(),
                "the count of {item} differs from its file"
            );
            for bundle in lines {
                assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
                assert_eq!(bundle["type"], "transaction", "{bundle}");
                let entries = bundle["entry"].as_array().expect("entries");
                assert_eq!(entries.len(), 1, "one DELETE entry per line: {bundle}");
                assert_eq!(entries[0]["request"]["method"], "DELETE", "{bundle}");
                let target = entries[0]["request"]["url"].as_str().expect("a url");
                let (resource_type, id) = target
                    .split_once('/')
                    .unwrap_or_else(|| panic!("'{target}' is not Type/id"));
                let key = (resource_type.to_owned(), id.to_owned());
                if !deleted.insert(key.clone()) {
                    twice.push(key);
                }
            }
        }
        assert!(
            twice.is_empty(),
            "the export at {transaction_time} has {} resources in deleted more than once: {}",
            twice.len(),
            first(&twice, 10)
        );
        let both: Vec<&Key> = deleted.iter().filter(|k| output.contains_key(*k)).collect();
        assert!(
            both.is_empty(),
            "the export at {transaction_time} has {} resources in both output and deleted: {}",
            both.len(),
            first(&both, 10)
        );
        Export {
            transaction_time,
            output,
            deleted,
        }
    }

    /// Kick-off, completion and download in one.
    async fn export(&self, since: Option<&str>) -> Export {
        let status_url = self.kick_off(since).await;
        let (manifest, _) = self.wait(&status_url).await;
        self.download(&manifest).await
    }

    /// Every current resource of one type through search, by `(type, id)`.
    async fn search_all(&self, resource_type: &str) -> BTreeMap<Key, Value> {
        let mut found = BTreeMap::new();
        let mut url = self.url(&format!("/{resource_type}?_count=1000"));
        for _ in 0..100 {
            let (status, text) = self.send(Method::GET, &url, None).await;
            assert_eq!(status, StatusCode::OK, "GET {url}: {text}");
            let bundle: Value = serde_json::from_str(&text).expect("a JSON Bundle");
            for entry in bundle["entry"].as_array().into_iter().flatten() {
                if entry["search"]["mode"] != "match" {
                    continue;
                }
                let resource = entry["resource"].clone();
                let key = key_of(&resource);
                assert!(
                    found.insert(key.clone(), resource).is_none(),
                    "search returned {key:?} twice"
                );
            }
            let next = bundle["link"].as_array().and_then(|links| {
                links
                    .iter()
                    .find(|l| l["relation"] == "next")
                    .and_then(|l| l["url"].as_str())
                    .map(str::to_owned)
            });
            match next {
                Some(next) => url = next,
                None => return found,
            }
        }
        panic!("the search of {resource_type} did not end after 100 pages");
    }
}

// ---------------------------------------------------------------------------------------------
// Test 1a: rounds of writes during an export, then the `_since` chain
// ---------------------------------------------------------------------------------------------

/// Per round: how many resources of each type are updated, deleted and created.
const UPDATES: &[(&str, usize)] = &[
    ("Patient", 2),
    ("Observation", 6),
    ("Condition", 4),
    ("Encounter", 4),
    ("Procedure", 2),
    ("MedicationRequest", 2),
];
const DELETES: &[(&str, usize)] = &[
    ("Observation", 3),
    ("Claim", 2),
    ("ExplanationOfBenefit", 2),
    ("Immunization", 2),
    ("DiagnosticReport", 1),
];

/// One write of a round, prepared before the kick-off so the writes themselves are quick.
enum Write {
    Update(Value),
    Delete(Key),
    /// POST: the server picks the id.
    CreatePost(Value),
    /// PUT at a new id.
    CreatePut(Value),
}

/// What a round's writes did, as the server answered.
#[derive(Default)]
struct Changes {
    updated: BTreeMap<Key, String>,
    deleted: BTreeSet<Key>,
    created: BTreeMap<Key, String>,
}

/// The marker an update of `round` writes into `implicitRules`.
fn marker(round: usize, key: &Key) -> String {
    format!("urn:hearth-test:round-{round}:{}/{}", key.0, key.1)
}

/// The writes of one round: resources not touched by an earlier round, in a fixed order.
fn plan_round(
    round: usize,
    originals: &BTreeMap<Key, Value>,
    touched: &mut BTreeSet<Key>,
) -> Vec<Write> {
    let mut pick = |resource_type: &str, n: usize| -> Vec<Key> {
        let keys: Vec<Key> = originals
            .keys()
            .filter(|k| k.0 == resource_type && !touched.contains(*k))
            .take(n)
            .cloned()
            .collect();
        assert_eq!(keys.len(), n, "not enough {resource_type} left to change");
        touched.extend(keys.iter().cloned());
        keys
    };
    let mut updates = Vec::new();
    for (resource_type, n) in UPDATES {
        for key in pick(resource_type, *n) {
            let mut resource = originals[&key].clone();
            resource["implicitRules"] = Value::from(marker(round, &key));
            updates.push(Write::Update(resource));
        }
    }
    let mut deletes = Vec::new();
    for (resource_type, n) in DELETES {
        deletes.extend(pick(resource_type, *n).into_iter().map(Write::Delete));
    }
    let text = |i: usize| format!("created in round {round} ({i})");
    let creates = vec![
        Write::CreatePost(json!({
            "resourceType": "Observation", "status": "final", "code": {"text": text(0)}
        })),
        Write::CreatePut(json!({
            "resourceType": "Patient", "id": format!("snap-r{round}-p1"),
            "name": [{"family": text(1)}]
        })),
        Write::CreatePost(json!({
            "resourceType": "Condition", "code": {"text": text(2)},
            "subject": {"reference": "Patient/snap"}
        })),
        Write::CreatePut(json!({
            "resourceType": "Organization", "id": format!("snap-r{round}-o1"), "name": text(3)
        })),
        Write::CreatePost(json!({
            "resourceType": "Observation", "status": "final", "code": {"text": text(4)}
        })),
        Write::CreatePut(json!({
            "resourceType": "Patient", "id": format!("snap-r{round}-p2"),
            "name": [{"family": text(5)}]
        })),
        Write::CreatePost(json!({
            "resourceType": "Condition", "code": {"text": text(6)},
            "subject": {"reference": "Patient/snap"}
        })),
        Write::CreatePut(json!({
            "resourceType": "Organization", "id": format!("snap-r{round}-o2"), "name": text(7)
        })),
        Write::CreatePost(json!({
            "resourceType": "Observation", "status": "final", "code": {"text": text(8)}
        })),
        // A type the loaded data does not have.
        Write::CreatePost(json!({"resourceType": "Location", "name": text(9)})),
    ];
    // Interleave the kinds of writes, so each lands at every stage of the export.
    let mut writes = Vec::new();
    let (mut updates, mut deletes, mut creates) = (
        updates.into_iter(),
        deletes.into_iter(),
        creates.into_iter(),
    );
    loop {
        let mut any = false;
        for next in [
            updates.next(),
            updates.next(),
            deletes.next(),
            creates.next(),
        ]
        .into_iter()
        .flatten()
        {
            writes.push(next);
            any = true;
        }
        if !any {
            return writes;
        }
    }
}

impl Server {
    /// Performs a round's writes one after the other.
    async fn apply(&self, writes: &[Write], versions_before: &BTreeMap<Key, String>) -> Changes {
        let mut changes = Changes::default();
        for write in writes {
            match write {
                Write::Update(resource) => {
                    let key = key_of(resource);
                    let (status, stored) = self.put(resource).await;
                    assert_eq!(status, StatusCode::OK, "an update of {key:?}");
                    let version = version_of(&stored);
                    assert_ne!(
                        Some(&version),
                        versions_before.get(&key),
                        "an update of {key:?} must make a new version"
                    );
                    changes.updated.insert(key, version);
                }
                Write::Delete(key) => {
                    self.delete(key).await;
                    changes.deleted.insert(key.clone());
                }
                Write::CreatePost(resource) => {
                    let stored = self.post(resource).await;
                    changes.created.insert(key_of(&stored), version_of(&stored));
                }
                Write::CreatePut(resource) => {
                    let (status, stored) = self.put(resource).await;
                    assert_eq!(status, StatusCode::CREATED, "a create by PUT: {resource}");
                    changes.created.insert(key_of(&stored), version_of(&stored));
                }
            }
        }
        changes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_read_their_kick_off_snapshot_and_since_chains_hold_exactly_the_changes() {
    let started = Instant::now();
    let dir = TempDir::new().expect("temp dir");
    let data = dir.path().join("data");
    let loaded = load_synthea(&data).await;
    let originals = synthea_resources();
    assert_eq!(originals.len(), SYNTHEA_RESOURCES);
    assert_eq!(count_types(originals.keys()), loaded);
    let server = Server::start(dir, &data).await;

    // What the server holds: (type, id) -> versionId.
    let mut current: BTreeMap<Key, String> = originals
        .keys()
        .map(|k| (k.clone(), "1".to_owned()))
        .collect();
    let mut touched = BTreeSet::new();
    let mut empty_exports = Vec::new();
    for round in 1..=3 {
        let writes = plan_round(round, &originals, &mut touched);
        let at_kick_off = current.clone();

        let status_url = server.kick_off(None).await;
        let changes = server.apply(&writes, &at_kick_off).await;
        let (manifest, progress) = server.wait(&status_url).await;
        eprintln!(
            "round {round}: {} writes done while the export was at {progress}",
            writes.len()
        );
        let full = server.download(&manifest).await;

        // The full export is the state at kick-off: each resource once, at its version then.
        assert_eq!(changes.updated.len(), 20);
        assert_eq!(changes.deleted.len(), 10);
        assert_eq!(changes.created.len(), 10);
        assert!(
            full.deleted.is_empty(),
            "an export without _since has no deleted"
        );
        assert_same_versions(
            &format!("round {round}: the full export"),
            &at_kick_off,
            &full.versions(),
        );
        let counts = full.counts();
        assert_eq!(counts, count_types(at_kick_off.keys()), "round {round}");
        if round == 1 {
            assert_eq!(counts, loaded, "the first export has every loaded resource");
            assert!(full.versions().values().all(|v| v == "1"));
        }
        assert!(counts.values().all(|&n| n > 0));
        assert_eq!(full.output.len(), at_kick_off.len());
        for key in changes.deleted.iter() {
            assert!(
                full.output.contains_key(key),
                "round {round}: {key:?}, deleted after the kick-off, is missing"
            );
        }
        for key in changes.created.keys() {
            assert!(
                !full.output.contains_key(key),
                "round {round}: {key:?}, created after the kick-off, is in the export"
            );
        }
        for key in changes.updated.keys() {
            assert_eq!(
                full.output[key].get("implicitRules"),
                originals[key].get("implicitRules"),
                "round {round}: {key:?} is exported with an update made after the kick-off"
            );
        }

        // Apply the round's changes to the model of the server.
        for (key, version) in changes.updated.iter().chain(&changes.created) {
            current.insert(key.clone(), version.clone());
        }
        for key in &changes.deleted {
            current.remove(key);
        }

        // `_since` the full export: exactly the round's changes.
        let since = server.export(Some(&full.transaction_time)).await;
        let expected: BTreeMap<Key, String> = changes
            .updated
            .iter()
            .chain(&changes.created)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_same_versions(
            &format!(
                "round {round}: output of the export _since={}",
                full.transaction_time
            ),
            &expected,
            &since.versions(),
        );
        for key in changes.updated.keys() {
            assert_eq!(
                since.output[key]["implicitRules"],
                marker(round, key),
                "round {round}: {key:?} is not exported with its update"
            );
        }
        assert_eq!(
            since.deleted, changes.deleted,
            "round {round}: deleted of the export _since={}",
            full.transaction_time
        );

        // Nothing is written between this kick-off and the previous one: an empty export. It is
        // collected after the last round (later writes are after its snapshot anyway), so a slow
        // completion of an export with no units (engines that finalize those only at their
        // 30 s sweep) is paid once, not per round.
        let status_url = server.kick_off(Some(&since.transaction_time)).await;
        empty_exports.push((round, since.transaction_time.clone(), status_url));
    }

    for (round, since, status_url) in empty_exports {
        let waited = Instant::now();
        let (manifest, _) = server.wait(&status_url).await;
        eprintln!(
            "round {round}: the empty export completed after {:.2?} more",
            waited.elapsed()
        );
        let empty = server.download(&manifest).await;
        assert!(
            empty.output.is_empty() && empty.deleted.is_empty(),
            "round {round}: the export _since={since} should be empty, it has {} output and {} \
             deleted: {:?} {:?}",
            empty.output.len(),
            empty.deleted.len(),
            empty.output.keys().take(10).collect::<Vec<_>>(),
            empty.deleted.iter().take(10).collect::<Vec<_>>()
        );
    }

    // The server's own view agrees with the model the test kept.
    let mut searched = BTreeMap::new();
    let types: BTreeSet<String> = current.keys().map(|k| k.0.clone()).collect();
    for resource_type in &types {
        for (key, resource) in server.search_all(resource_type).await {
            searched.insert(key, version_of(&resource));
        }
    }
    assert_same_versions("search after the last round", &current, &searched);
    server.stop().await;
    eprintln!("rounds test took {:.2?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Test 1b: random writes while a `_since` chain of exports runs
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Counts of what the random writer did.
#[derive(Debug, Default)]
struct WriterStats {
    updates: usize,
    deletes: usize,
    creates: usize,
    recreates: usize,
}

/// Writes until at least `min_ops` writes are done and `exports_done` has reached
/// `min_exports` (or 30 s have passed): updates, deletes, creates and re-creations of deleted
/// resources, chosen by `seed`.
async fn random_writes(
    server: Arc<Server>,
    mut resources: BTreeMap<Key, Value>,
    seed: u64,
    min_ops: usize,
    exports_done: Arc<AtomicUsize>,
    min_exports: usize,
) -> WriterStats {
    let mut rng = XorShift(seed);
    let mut live: Vec<Key> = resources.keys().cloned().collect();
    let mut gone: Vec<Key> = Vec::new();
    let mut stats = WriterStats::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut op = 0usize;
    while (op < min_ops || exports_done.load(Ordering::SeqCst) < min_exports)
        && Instant::now() < deadline
    {
        op += 1;
        let roll = rng.below(100);
        if roll < 20 && !live.is_empty() {
            let key = live.swap_remove(rng.below(live.len()));
            server.delete(&key).await;
            gone.push(key);
            stats.deletes += 1;
        } else if roll < 35 {
            let resource_type = ["Observation", "Condition", "Patient", "Encounter"][rng.below(4)];
            let mut resource = json!({
                "resourceType": resource_type,
                "status": "final",
                "code": {"text": format!("random create {op}")}
            });
            if resource_type == "Patient" {
                resource = json!({"resourceType": "Patient", "name": [{"family": format!("random {op}")}]});
            }
            let stored = if rng.below(2) == 0 {
                server.post(&resource).await
            } else {
                resource["id"] = Value::from(format!("rnd-{seed}-{op}"));
                let (status, stored) = server.put(&resource).await;
                assert_eq!(status, StatusCode::CREATED, "a create by PUT");
                stored
            };
            let key = key_of(&stored);
            let mut body = stored;
            body.as_object_mut().expect("an object").remove("meta");
            resources.insert(key.clone(), body);
            live.push(key);
            stats.creates += 1;
        } else if roll < 42 && !gone.is_empty() {
            let key = gone.swap_remove(rng.below(gone.len()));
            let mut resource = resources[&key].clone();
            resource["implicitRules"] = Value::from(format!("urn:hearth-test:op-{op}"));
            server.put(&resource).await;
            live.push(key);
            stats.recreates += 1;
        } else if !live.is_empty() {
            let key = live[rng.below(live.len())].clone();
            let mut resource = resources[&key].clone();
            resource["implicitRules"] = Value::from(format!("urn:hearth-test:op-{op}"));
            let (status, _) = server.put(&resource).await;
            assert_eq!(status, StatusCode::OK, "an update of {key:?}");
            stats.updates += 1;
        }
        let pause = rng.below(3) as u64;
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_a_since_chain_taken_during_random_writes_gives_the_final_state() {
    const SEED: u64 = 0x9E37_79B9_7F4A_7C15;
    const MIN_OPS: usize = 300;
    /// Exports that must complete while the writer is still writing.
    const MIN_EXPORTS_DURING_WRITES: usize = 4;
    let started = Instant::now();
    let dir = TempDir::new().expect("temp dir");
    let data = dir.path().join("data");
    load_synthea(&data).await;
    let originals = synthea_resources();
    let server = Arc::new(Server::start(dir, &data).await);

    let exports_done = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(random_writes(
        server.clone(),
        originals.clone(),
        SEED,
        MIN_OPS,
        exports_done.clone(),
        MIN_EXPORTS_DURING_WRITES,
    ));
    let mut chain: Vec<Export> = Vec::new();
    let mut during_writes = 0;
    loop {
        // The last export starts after the last write. It gets one write of its own, so it is
        // never an export with no units (which some engines finalize only at a 30 s sweep).
        let writer_done = writer.is_finished();
        if writer_done {
            let (status, _) = server
                .put(&json!({"resourceType": "Patient", "id": "rnd-last", "active": true}))
                .await;
            assert_eq!(status, StatusCode::CREATED);
        }
        let since = chain.last().map(|e| e.transaction_time.clone());
        let timer = Instant::now();
        let export = server.export(since.as_deref()).await;
        eprintln!(
            "export {} (_since={since:?}): {} output, {} deleted in {:.2?}",
            chain.len() + 1,
            export.output.len(),
            export.deleted.len(),
            timer.elapsed()
        );
        if since.is_none() {
            assert!(export.deleted.is_empty(), "the first export has no deleted");
        }
        exports_done.fetch_add(1, Ordering::SeqCst);
        chain.push(export);
        if writer_done {
            break;
        }
        during_writes += 1;
        assert!(chain.len() < 500, "the writer never stops");
    }
    let stats = writer.await.expect("the writer finished");
    eprintln!(
        "{stats:?}; {} exports, {during_writes} of them while writing",
        chain.len()
    );
    assert!(stats.updates > 0 && stats.deletes > 0 && stats.creates > 0 && stats.recreates > 0);
    assert!(
        during_writes >= MIN_EXPORTS_DURING_WRITES,
        "only {during_writes} exports ran while the writer wrote"
    );

    // Replay: the first export, then each `_since` export (output as upserts, deleted as
    // removals).
    let mut replayed: BTreeMap<Key, Value> = BTreeMap::new();
    let mut changes_seen = 0;
    for export in &chain {
        for key in &export.deleted {
            replayed.remove(key);
        }
        for (key, resource) in &export.output {
            replayed.insert(key.clone(), resource.clone());
        }
        changes_seen += export.deleted.len() + export.output.len();
    }
    assert!(changes_seen > SYNTHEA_RESOURCES);

    let mut types: BTreeSet<String> = originals.keys().map(|k| k.0.clone()).collect();
    types.extend(replayed.keys().map(|k| k.0.clone()));
    let mut searched = BTreeMap::new();
    for resource_type in &types {
        searched.extend(server.search_all(resource_type).await);
    }
    assert!(searched.len() > 2000);
    let versions = |resources: &BTreeMap<Key, Value>| -> BTreeMap<Key, String> {
        resources
            .iter()
            .map(|(k, r)| (k.clone(), version_of(r)))
            .collect()
    };
    assert_same_versions(
        "the replayed export chain against search",
        &versions(&searched),
        &versions(&replayed),
    );
    let differing: Vec<&Key> = searched
        .iter()
        .filter(|(k, r)| replayed.get(*k) != Some(*r))
        .map(|(k, _)| k)
        .collect();
    assert!(
        differing.is_empty(),
        "{} resources differ between the replayed chain and search: {}",
        differing.len(),
        first(&differing, 10)
    );
    match Arc::try_unwrap(server) {
        Ok(server) => server.stop().await,
        Err(_) => panic!("the writer still holds the server"),
    }
    eprintln!("random test took {:.2?}", started.elapsed());
}
