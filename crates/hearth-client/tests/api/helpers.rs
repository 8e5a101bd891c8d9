//! The harness: a real Hearth on a loopback port (optionally advertising another base URL, so
//! a proxy can sit in front of it) and a progress observer that records what the client
//! reported. Fake servers, for what Hearth cannot answer, are `hearth_client::testing`'s.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use hearth_client::testing::{leftover_parts, lines, serve_fake};
use hearth_client::{ClientOptions, PlannedFile, PollUpdate, Progress, RetryPolicy, SavedFile};
use hearth_load::{BatchLimits, LoadObserver, Rejection, Target};
use hearth_server::{AuthSettings, Embedded, ExportSettings, ServerConfig};
use hearth_store::SqliteStore;
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The most any test waits for an export to finish.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Hearth. Dropping it stops the server; the data directory goes with it.
pub struct Hearth {
    /// The FHIR base the server advertises (its own address unless a proxy fronts it).
    pub base: String,
    /// Where the server really listens, e.g. `127.0.0.1:41234`.
    pub addr: std::net::SocketAddr,
    pub http: reqwest::Client,
    pub store: Arc<SqliteStore>,
    embedded: Arc<Embedded>,
    shutdown: Option<oneshot::Sender<()>>,
    _dir: TempDir,
}

impl Drop for Hearth {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // The export workers and the store close asynchronously, and the test's runtime is
        // busy dropping us: a small runtime of its own, bounded in time.
        let embedded = self.embedded.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    let _ = embedded.shutdown().await;
                });
            }
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(Duration::from_secs(10));
    }
}

/// Hearth over the 10-patient Synthea set.
pub async fn hearth_with_synthea() -> Hearth {
    start_hearth(None).await
}

/// Hearth over the Synthea set, handing out URLs under `advertised_base` (a proxy's).
pub async fn start_hearth(advertised_base: Option<String>) -> Hearth {
    start_hearth_with(advertised_base, AuthSettings::default()).await
}

/// Hearth over the Synthea set with authorization as `auth` says.
pub async fn start_hearth_with(advertised_base: Option<String>, auth: AuthSettings) -> Hearth {
    let dir = TempDir::new().expect("temp dir");
    let store = Arc::new(SqliteStore::open(&dir.path().join("data")).expect("store opens"));
    let files = hearth_load::expand_paths(&[synthea_dir()]).expect("the test data is there");
    let report = hearth_load::load(
        files,
        Target::Store(store.clone()),
        BatchLimits::default(),
        &mut NoRejections,
    )
    .await
    .expect("the test data loads");
    assert_eq!(report.loaded, SYNTHEA_RESOURCES);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let base = advertised_base.unwrap_or_else(|| format!("http://{addr}/fhir"));
    let embedded = Embedded::start_secured(
        store.clone(),
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
        &auth,
    )
    .await
    .expect("the embedded stack starts");
    let state = embedded.state.clone();
    let (shutdown, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = hearth_server::serve(listener, state, async move {
            let _ = stopped.await;
        })
        .await;
    });
    Hearth {
        base,
        addr,
        store,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        embedded: Arc::new(embedded),
        shutdown: Some(shutdown),
        _dir: dir,
    }
}

impl Hearth {
    /// The base URL on the server's own address (not the advertised one).
    pub fn direct_base(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    pub async fn put(&self, resource: &Value) {
        let url = format!(
            "{}/{}/{}",
            self.direct_base(),
            resource["resourceType"].as_str().expect("a type"),
            resource["id"].as_str().expect("an id")
        );
        let response = self
            .http
            .put(url)
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .await
            .expect("PUT is answered");
        assert!(response.status().is_success(), "PUT: {}", response.status());
    }

    pub async fn delete(&self, resource_type: &str, id: &str) {
        let url = format!("{}/{resource_type}/{id}", self.direct_base());
        let response = self
            .http
            .delete(url)
            .send()
            .await
            .expect("DELETE is answered");
        assert!(
            response.status().is_success(),
            "DELETE: {}",
            response.status()
        );
    }

    pub async fn status_of(&self, url: &str) -> u16 {
        self.http
            .get(url)
            .send()
            .await
            .expect("GET is answered")
            .status()
            .as_u16()
    }
}

pub const SYNTHEA_RESOURCES: u64 = 2523;

pub fn synthea_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-10p")
}

/// The ids in one of the Synthea set's gzip NDJSON files.
pub fn synthea_ids(resource_type: &str) -> BTreeSet<String> {
    synthea_lines(resource_type)
        .iter()
        .map(|line| id_of_line(line))
        .collect()
}

/// The resources of one of the Synthea set's gzip NDJSON files, one JSON text each.
pub fn synthea_lines(resource_type: &str) -> Vec<String> {
    let path = synthea_dir().join(format!("{resource_type}.ndjson.gz"));
    let file = std::fs::File::open(&path).expect("test data file");
    let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
    reader
        .lines()
        .map(|line| line.expect("a readable line"))
        .filter(|line| !line.trim().is_empty())
        .collect()
}

pub fn id_of_line(line: &str) -> String {
    let value: Value = serde_json::from_str(line).expect("a JSON line");
    value["id"].as_str().expect("an id").to_owned()
}

struct NoRejections;

impl LoadObserver for NoRejections {
    fn rejected(&mut self, rejection: &Rejection) {
        panic!(
            "the test data should load: {}: {}",
            rejection.origin, rejection.reason
        );
    }
}

/// Client options for tests: quick backoff so retries do not slow the suite down.
pub fn fast_options() -> ClientOptions {
    ClientOptions {
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            ..RetryPolicy::default()
        },
        read_timeout: Duration::from_secs(20),
        sync_files: false,
        ..ClientOptions::default()
    }
}

/// Everything the client reported, in order.
#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<Event>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    KickedOff(String),
    Polled(Option<String>),
    Retrying(String),
    Manifest(usize),
    Started(String),
    Resumed(String, u64),
    Restarted(String),
    Finished(String, u64),
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("events").clone()
    }

    fn push(&self, event: Event) {
        self.events.lock().expect("events").push(event);
    }
}

impl Progress for Recorder {
    fn kicked_off(&self, status_url: &str) {
        self.push(Event::KickedOff(status_url.to_owned()));
    }
    fn polled(&self, update: &PollUpdate) {
        self.push(Event::Polled(update.progress.clone()));
    }
    fn retrying(&self, what: &str, reason: &str, _wait: Duration) {
        self.push(Event::Retrying(format!("{what}: {reason}")));
    }
    fn manifest(&self, _manifest: &hearth_client::Manifest, files: &[PlannedFile]) {
        self.push(Event::Manifest(files.len()));
    }
    fn file_started(&self, file: &PlannedFile) {
        self.push(Event::Started(file.name()));
    }
    fn file_resumed(&self, file: &PlannedFile, offset: u64, _reason: &str) {
        self.push(Event::Resumed(file.name(), offset));
    }
    fn file_restarted(&self, file: &PlannedFile, _bytes: u64, _lines: u64) {
        self.push(Event::Restarted(file.name()));
    }
    fn file_finished(&self, file: &PlannedFile, saved: &SavedFile) {
        self.push(Event::Finished(file.name(), saved.resources));
    }
}

/// Runs `future` with the suite's time limit.
pub async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, future)
        .await
        .expect("the test finishes within its time limit")
}
