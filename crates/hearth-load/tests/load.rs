//! The bulk loader end to end: real files into a real SQLite store (and through a real
//! server), checked by what the report, the observer and the store say afterwards.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_load::{BatchLimits, LoadObserver, LoadReport, Rejection, Target, TypeCounts};
use hearth_store::{SqliteStore, Store};
use serde_json::Value;
use tempfile::TempDir;

const SYNTHEA_RESOURCES: u64 = 2523;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn synthea_files() -> Vec<PathBuf> {
    hearth_load::expand_paths(&[testdata().join("synthea-r4-10p")]).expect("the test data")
}

/// `by_type` of `testdata/synthea-r4-10p.counts.json`.
fn expected_counts() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(testdata().join("synthea-r4-10p.counts.json"))
        .expect("the counts file");
    let counts: Value = serde_json::from_str(&text).expect("counts JSON");
    assert_eq!(counts["resources"], SYNTHEA_RESOURCES);
    counts["by_type"]
        .as_object()
        .expect("by_type")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
        .collect()
}

/// `(type, id)` of every resource in one of the gzip NDJSON files.
fn ids_in(file: &str) -> Vec<(String, String)> {
    let path = testdata().join("synthea-r4-10p").join(file);
    let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
        std::fs::File::open(path).expect("data file"),
    ));
    reader
        .lines()
        .map(|line| serde_json::from_str::<Value>(&line.expect("line")).expect("JSON line"))
        .map(|v| {
            (
                v["resourceType"].as_str().unwrap().to_owned(),
                v["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[derive(Default)]
struct Collect {
    /// `(origin as printed, reason)`.
    rejected: Vec<(String, String)>,
    progress_calls: usize,
}

impl LoadObserver for Collect {
    fn progress(&mut self, _report: &LoadReport) {
        self.progress_calls += 1;
    }

    fn rejected(&mut self, rejection: &Rejection) {
        self.rejected
            .push((rejection.origin.to_string(), rejection.reason.clone()));
    }
}

fn open_store(dir: &TempDir) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(&dir.path().join("data")).expect("store opens"))
}

async fn load_into(
    files: Vec<PathBuf>,
    store: &Arc<SqliteStore>,
    limits: BatchLimits,
) -> (LoadReport, Collect) {
    let mut observer = Collect::default();
    let report = hearth_load::load(files, Target::Store(store.clone()), limits, &mut observer)
        .await
        .expect("the load runs");
    (report, observer)
}

fn totals(report: &LoadReport) -> TypeCounts {
    report
        .by_type
        .values()
        .fold(TypeCounts::default(), |acc, c| TypeCounts {
            created: acc.created + c.created,
            updated: acc.updated + c.updated,
            unchanged: acc.unchanged + c.unchanged,
            deleted: acc.deleted + c.deleted,
        })
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path
}

#[tokio::test]
async fn loading_the_10_patient_set_creates_every_resource() {
    let dir = TempDir::new().unwrap();
    let store = open_store(&dir);
    let files = synthea_files();
    assert_eq!(files.len(), 16);
    let (report, observer) = load_into(files, &store, BatchLimits::default()).await;

    assert!(observer.rejected.is_empty(), "{:?}", observer.rejected);
    assert_eq!(report.rejected, 0);
    assert_eq!(report.loaded, SYNTHEA_RESOURCES);
    assert_eq!(report.files, 16);
    assert!(report.bytes > 0);
    assert!(observer.progress_calls > 0);
    let created: BTreeMap<String, u64> = report
        .by_type
        .iter()
        .map(|(t, c)| (t.clone(), c.created))
        .collect();
    assert_eq!(created, expected_counts());
    let all = totals(&report);
    assert_eq!(all.created, SYNTHEA_RESOURCES);
    assert_eq!((all.updated, all.unchanged, all.deleted), (0, 0, 0));

    for (resource_type, id) in ids_in("Patient.ndjson.gz") {
        let stored = store
            .read(&resource_type, &id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{resource_type}/{id} was not loaded"));
        assert_eq!(stored.version, 1);
        assert!(!stored.deleted);
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn loading_the_same_set_again_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let store = open_store(&dir);
    let (first, _) = load_into(synthea_files(), &store, BatchLimits::default()).await;
    assert_eq!(totals(&first).created, SYNTHEA_RESOURCES);

    let mut sample = ids_in("Patient.ndjson.gz");
    sample.extend(ids_in("Organization.ndjson.gz"));
    sample.extend(ids_in("AllergyIntolerance.ndjson.gz"));
    let mut before = Vec::new();
    for (resource_type, id) in &sample {
        before.push(
            store
                .read(resource_type, id)
                .await
                .unwrap()
                .expect("loaded"),
        );
    }
    let last_change = store.seq_at(i64::MAX).await.unwrap();

    let (second, observer) = load_into(
        synthea_files(),
        &store,
        BatchLimits {
            resources: 100,
            ..BatchLimits::default()
        },
    )
    .await;
    assert!(observer.rejected.is_empty());
    assert_eq!(second.rejected, 0);
    assert_eq!(second.loaded, SYNTHEA_RESOURCES);
    let all = totals(&second);
    assert_eq!(all.created, 0);
    assert_eq!(all.updated, 0);
    assert_eq!(all.unchanged, SYNTHEA_RESOURCES);
    let unchanged: BTreeMap<String, u64> = second
        .by_type
        .iter()
        .map(|(t, c)| (t.clone(), c.unchanged))
        .collect();
    assert_eq!(unchanged, expected_counts());

    assert_eq!(
        store.seq_at(i64::MAX).await.unwrap(),
        last_change,
        "the second load wrote something"
    );
    for ((resource_type, id), earlier) in sample.iter().zip(before) {
        let now = store
            .read(resource_type, id)
            .await
            .unwrap()
            .expect("loaded");
        assert_eq!(now.version, 1, "{resource_type}/{id}");
        assert_eq!(now, earlier, "{resource_type}/{id} changed");
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn bad_lines_are_reported_with_file_and_line_and_every_good_line_loads() {
    let dir = TempDir::new().unwrap();
    let input = TempDir::new().unwrap();
    let lines = [
        r#"{"resourceType":"Patient","id":"ok-1"}"#,
        r#"{"resourceType":"Patient","id":"broken""#,
        r#"{"resourceType":"Observation","id":"ok-2","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/ok-1"}}"#,
        r#"["resourceType","Patient"]"#,
        r#"{"resourceType":"Patient","active":true}"#,
        r#"{"resourceType":"Starship","id":"ncc-1701"}"#,
        r#"{"resourceType":"Patient","id":"ok-3"}"#,
        r#"{"resourceType":"Patient","id":"not valid"}"#,
        r#"{"resourceType":"Encounter","id":"ok-4","status":"finished","class":{"code":"AMB"}}"#,
    ];
    let file = write_file(input.path(), "mixed.ndjson", &(lines.join("\n") + "\n"));
    let store = open_store(&dir);
    // Small batches, so rejections fall between and inside batches.
    let limits = BatchLimits {
        resources: 2,
        ..BatchLimits::default()
    };
    let (report, observer) = load_into(vec![file.clone()], &store, limits).await;

    let name = file.display().to_string();
    let origins: Vec<&str> = observer.rejected.iter().map(|(o, _)| o.as_str()).collect();
    let expected: Vec<String> = [2, 4, 5, 6, 8]
        .iter()
        .map(|n| format!("{name}:{n}"))
        .collect();
    assert_eq!(origins, expected, "{:?}", observer.rejected);
    assert_eq!(report.rejected, 5);
    assert_eq!(report.loaded, 4);
    for (_, reason) in &observer.rejected {
        assert!(!reason.trim().is_empty());
    }
    assert!(
        observer.rejected[3].1.contains("Starship"),
        "{:?}",
        observer.rejected[3]
    );

    for (resource_type, id) in [
        ("Patient", "ok-1"),
        ("Observation", "ok-2"),
        ("Patient", "ok-3"),
        ("Encounter", "ok-4"),
    ] {
        let stored = store.read(resource_type, id).await.unwrap();
        assert!(stored.is_some(), "{resource_type}/{id} was not loaded");
    }
    assert!(store.read("Patient", "broken").await.unwrap().is_none());
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_bundle_json_file_loads_its_entries() {
    let dir = TempDir::new().unwrap();
    let input = TempDir::new().unwrap();
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "b-1", "gender": "female"}},
            {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Patient", "gender": "male"}},
            {"resource": {"resourceType": "Organization", "id": "b-org", "name": "Clinic"}},
            {"fullUrl": "urn:uuid:4"}
        ]
    });
    let file = write_file(
        input.path(),
        "bundle.json",
        &serde_json::to_string_pretty(&bundle).unwrap(),
    );
    let store = open_store(&dir);
    let (report, observer) = load_into(vec![file.clone()], &store, BatchLimits::default()).await;

    assert_eq!(report.loaded, 2);
    assert_eq!(report.rejected, 2);
    let name = file.display().to_string();
    let origins: Vec<&str> = observer.rejected.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(
        origins,
        [format!("{name}:entry 2"), format!("{name}:entry 4")],
        "{:?}",
        observer.rejected
    );
    let patient = store.read("Patient", "b-1").await.unwrap().expect("b-1");
    let patient: Value = serde_json::from_slice(&patient.body).unwrap();
    assert_eq!(patient["gender"], "female");
    assert!(store.read("Organization", "b-org").await.unwrap().is_some());
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_gzip_ndjson_file_loads() {
    let dir = TempDir::new().unwrap();
    let input = TempDir::new().unwrap();
    let path = input.path().join("Patient.ndjson.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    for n in 0..50 {
        writeln!(
            encoder,
            r#"{{"resourceType":"Patient","id":"gz-{n}","birthDate":"1990-01-01"}}"#
        )
        .unwrap();
    }
    encoder.finish().unwrap();

    let store = open_store(&dir);
    let files = hearth_load::expand_paths(&[input.path().to_path_buf()]).unwrap();
    assert_eq!(files, [path]);
    let (report, observer) = load_into(files, &store, BatchLimits::default()).await;
    assert!(observer.rejected.is_empty(), "{:?}", observer.rejected);
    assert_eq!(report.loaded, 50);
    assert_eq!(report.by_type["Patient"].created, 50);
    for n in [0, 25, 49] {
        let stored = store.read("Patient", &format!("gz-{n}")).await.unwrap();
        assert!(stored.is_some(), "gz-{n} was not loaded");
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn expand_paths_takes_known_files_in_order_and_skips_the_rest() {
    let input = TempDir::new().unwrap();
    for name in [
        "b.ndjson",
        "a.json",
        ".hidden.ndjson",
        "notes.txt",
        "c.ndjson.gz",
    ] {
        write_file(input.path(), name, "");
    }
    std::fs::create_dir(input.path().join("sub")).unwrap();
    write_file(&input.path().join("sub"), "d.jsonl", "");

    let files = hearth_load::expand_paths(&[input.path().to_path_buf()]).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(input.path()).unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["a.json", "b.ndjson", "c.ndjson.gz", "sub/d.jsonl"]);

    let unknown = hearth_load::expand_paths(&[input.path().join("notes.txt")]);
    assert!(unknown.is_err());
    let missing = hearth_load::expand_paths(&[input.path().join("nope.ndjson")]);
    assert!(missing.is_err());
}

/// Through a running server: the same counts as straight into a store, and a second load of
/// the same data reports it as unchanged, not updated.
#[tokio::test]
async fn loading_through_a_server_reports_created_then_unchanged() {
    let dir = TempDir::new().unwrap();
    let store = open_store(&dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/fhir", listener.local_addr().unwrap());
    let embedded = hearth_server::Embedded::start(
        store.clone(),
        dir.path(),
        hearth_server::ServerConfig {
            base_url: base_url.clone(),
            max_body_bytes: 64 * 1024 * 1024,
            lenient_headers: false,
        },
        hearth_server::ExportSettings {
            workers: 1,
            ..hearth_server::ExportSettings::default()
        },
    )
    .await
    .expect("the embedded stack starts");
    let state = embedded.state.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hearth_server::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let target = Target::Server {
        base_url: base_url.clone(),
        client,
    };
    let limits = BatchLimits {
        resources: 500,
        ..BatchLimits::default()
    };

    let mut observer = Collect::default();
    let first = hearth_load::load(synthea_files(), target.clone(), limits, &mut observer)
        .await
        .expect("the first load runs");
    assert!(observer.rejected.is_empty(), "{:?}", observer.rejected);
    let created: BTreeMap<String, u64> = first
        .by_type
        .iter()
        .map(|(t, c)| (t.clone(), c.created))
        .collect();
    assert_eq!(created, expected_counts());
    let last_change = store.seq_at(i64::MAX).await.unwrap();

    let mut observer = Collect::default();
    let second = hearth_load::load(synthea_files(), target, limits, &mut observer)
        .await
        .expect("the second load runs");
    assert!(observer.rejected.is_empty(), "{:?}", observer.rejected);
    assert_eq!(second.loaded, SYNTHEA_RESOURCES);
    assert_eq!(store.seq_at(i64::MAX).await.unwrap(), last_change);
    let all = totals(&second);
    assert_eq!(
        (all.created, all.updated, all.unchanged),
        (0, 0, SYNTHEA_RESOURCES),
        "a reload of identical data through the server"
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    embedded.shutdown().await.unwrap();
}
