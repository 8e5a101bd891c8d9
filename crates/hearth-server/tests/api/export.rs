//! The Bulk Data export endpoints end to end, as a Bulk Data client and the conformance suites
//! (Inferno, bdt) see them: the `$export` kick-off, `$export-poll-status` (GET, POST, DELETE),
//! file downloads at `Binary/<file id>`, and their discovery.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use futures::StreamExt;
use hearth_fhir::instant::{format_instant, now_micros, parse_instant};
use hearth_server::ExportSettings;
use hearth_store::jobs::{JobRecord, JobStatus, JobStore};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

const NDJSON: &str = "application/fhir+ndjson";
const BULK_DATA_CAPABILITY: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";
const EXPORT_ID_EXTENSION: &str = "https://hapifhir.org/NamingSystem/bulk-export-identifier";
const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];
/// IG parameters (or values) Hearth does not implement: refused by name, or ignored when
/// lenient. (`_elements` is implemented for top-level elements only, `organizeOutputBy` for
/// Patient only; `allowPartialManifests` is a boolean.)
const UNSUPPORTED: [(&str, &str); 6] = [
    ("_elements", "name.family"),
    ("_typeFilter", "Patient?status=active"),
    ("_typePostFetchFilterUrl", "Patient?status=active"),
    ("includeAssociatedData", "_customValue"),
    ("organizeOutputBy", "Encounter"),
    ("allowPartialManifests", "yes"),
];
/// How long any export of the test data may take.
const EXPORT_DEADLINE: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// helpers

/// A kick-off with the headers a conforming client sends; `query` starts with `?` or is empty.
fn kick_off_request(server: &TestServer, method: Method, query: &str) -> reqwest::RequestBuilder {
    kick_off_request_with(server, method, query, "respond-async", FHIR_JSON)
}

/// A kick-off with these `Prefer` and `Accept` headers (reqwest appends, never replaces, a
/// header: each is set once here).
fn kick_off_request_with(
    server: &TestServer,
    method: Method,
    query: &str,
    prefer: &str,
    accept: &str,
) -> reqwest::RequestBuilder {
    server
        .request(method, &format!("/$export{query}"))
        .header("prefer", prefer)
        .header("accept", accept)
}

/// A started export.
#[derive(Debug, Clone)]
struct Export {
    /// The absolute status URL from `Content-Location`.
    status_url: String,
    job_id: String,
    /// The kick-off URL as it went on the wire.
    request_url: String,
}

/// Asserts a successful kick-off: `202`, no body, and `Content-Location` the absolute
/// `<base>/$export-poll-status?_jobId=<uuid>`.
async fn expect_accepted(server: &TestServer, response: Response) -> Export {
    let request_url = response.url().to_string();
    let location = export_accepted(server, response).await;
    let prefix = format!("{}/$export-poll-status?_jobId=", server.base);
    let job_id = location
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("Content-Location {location} does not start with {prefix}"));
    uuid::Uuid::parse_str(job_id)
        .unwrap_or_else(|e| panic!("the job id '{job_id}' is not a UUID: {e}"));
    Export {
        job_id: job_id.to_owned(),
        status_url: location,
        request_url,
    }
}

/// `GET [base]/$export{query}`, asserting it is accepted.
async fn kick_off(server: &TestServer, query: &str) -> Export {
    let response = kick_off_request(server, Method::GET, query)
        .send()
        .await
        .expect("the kick-off is answered");
    expect_accepted(server, response).await
}

/// `GET [base]/$export{query}` with `Prefer: respond-async, handling=lenient`.
async fn kick_off_lenient(server: &TestServer, query: &str) -> Response {
    kick_off_request_with(
        server,
        Method::GET,
        query,
        "respond-async, handling=lenient",
        FHIR_JSON,
    )
    .send()
    .await
    .expect("the kick-off is answered")
}

/// `POST [base]/$export` with a `Parameters` (or any other) body.
async fn kick_off_post(server: &TestServer, body: &Value) -> Response {
    kick_off_request(server, Method::POST, "")
        .header("content-type", FHIR_JSON)
        .body(body.to_string())
        .send()
        .await
        .expect("the kick-off is answered")
}

/// Asserts a refused kick-off: `400` and an OperationOutcome whose first issue names
/// `parameter` in its `expression`.
async fn expect_refused(response: Response, parameter: &str) -> Value {
    let url = response.url().to_string();
    let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(
        outcome["issue"][0]["expression"][0], parameter,
        "{url}: the outcome does not name {parameter}: {outcome}"
    );
    outcome
}

/// Asserts an in-progress status answer: `X-Progress` under 100 characters, an integer
/// `Retry-After` between 1 and 120 seconds.
fn assert_in_progress(response: &Response) {
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let progress = header(response, "x-progress");
    assert!(
        !progress.is_empty() && progress.len() < 100,
        "X-Progress must be under 100 characters: '{progress}'"
    );
    let retry_after = header(response, "retry-after");
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After '{retry_after}' is not integer seconds"));
    assert!(
        (1..=120).contains(&seconds),
        "Retry-After {seconds} is not between 1 and 120"
    );
}

/// Asserts the `200` of a status request: `application/json`, an `Expires` in the future, and a
/// manifest; returns the manifest.
async fn expect_manifest(server: &TestServer, response: Response) -> Value {
    let url = response.url().to_string();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let expires = response
        .headers()
        .get("expires")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let text = response.text().await.expect("a readable body");
    assert_eq!(status, StatusCode::OK, "{url} answered {status}: {text}");
    assert_eq!(
        content_type.split(';').next().unwrap_or("").trim(),
        "application/json",
        "the manifest's Content-Type"
    );
    let expires = expires.expect("a completed status has Expires");
    let expires_at = httpdate::parse_http_date(&expires)
        .unwrap_or_else(|e| panic!("Expires '{expires}' is not an HTTP date: {e}"));
    assert!(
        expires_at > SystemTime::now(),
        "Expires {expires} is not in the future"
    );
    let manifest: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the manifest is not JSON ({e}): {text}"));
    assert_manifest_shape(server, &manifest);
    manifest
}

/// The fields every manifest has, and the shape of every item.
fn assert_manifest_shape(server: &TestServer, manifest: &Value) {
    let transaction_time = manifest["transactionTime"]
        .as_str()
        .unwrap_or_else(|| panic!("no transactionTime in {manifest}"));
    parse_instant(transaction_time).unwrap_or_else(|e| panic!("transactionTime: {e}"));
    assert!(manifest["request"].is_string(), "no request in {manifest}");
    assert_eq!(manifest["requiresAccessToken"], false, "{manifest}");
    let file_prefix = format!("{}/Binary/", server.base);
    for kind in ["output", "deleted", "error"] {
        let items = manifest[kind]
            .as_array()
            .unwrap_or_else(|| panic!("'{kind}' is not an array in {manifest}"));
        for item in items {
            assert!(item["type"].is_string(), "an item without type: {item}");
            let url = item["url"].as_str().expect("an item has a url");
            assert!(
                url.starts_with(&file_prefix) && url.len() > file_prefix.len(),
                "the item url {url} is not {file_prefix}<id>"
            );
            assert!(
                item["count"].as_u64().is_some_and(|c| c > 0),
                "an item without a positive count: {item}"
            );
        }
    }
    match kind_types(manifest, "deleted").as_slice() {
        [] => {}
        types => assert!(types.iter().all(|t| t == "Bundle"), "{manifest}"),
    }
    assert!(
        kind_types(manifest, "error")
            .iter()
            .all(|t| t == "OperationOutcome"),
        "{manifest}"
    );
}

fn kind_types(manifest: &Value, kind: &str) -> Vec<String> {
    manifest[kind]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| item["type"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Polls the status URL (GET) until the manifest, within `deadline`. The first answer must be
/// `202`, as bdt requires of every job; every `202` must carry progress and `Retry-After`.
async fn poll_within(server: &TestServer, status_url: &str, deadline: Duration) -> Value {
    let started = Instant::now();
    let mut polls = 0;
    loop {
        // As Inferno polls.
        let response = server
            .client
            .get(status_url)
            .header("accept", "application/json")
            .send()
            .await
            .expect("the status request is answered");
        polls += 1;
        if response.status() == StatusCode::ACCEPTED {
            assert_in_progress(&response);
            let body = response.bytes().await.expect("a readable body");
            assert!(body.is_empty(), "an in-progress status has a body");
        } else {
            if polls == 1 {
                panic!(
                    "the first poll of {status_url} must answer 202, not {}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            return expect_manifest(server, response).await;
        }
        assert!(
            started.elapsed() < deadline,
            "the export at {status_url} was not done within {deadline:?} ({polls} polls)"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn poll_to_completion(server: &TestServer, export: &Export) -> Value {
    poll_within(server, &export.status_url, EXPORT_DEADLINE).await
}

/// Kicks off `query` and returns the finished manifest.
async fn run_export(server: &TestServer, query: &str) -> Value {
    let export = kick_off(server, query).await;
    let manifest = poll_to_completion(server, &export).await;
    assert_eq!(
        manifest["request"], export.request_url,
        "the manifest's request is the kick-off URL"
    );
    manifest
}

/// Waits (reading the store, not the status URL) until the job's work is done.
async fn wait_until_done(server: &TestServer, job_id: &str) -> JobRecord {
    let started = Instant::now();
    loop {
        let job = server
            .store
            .job(job_id)
            .await
            .expect("the store answers")
            .expect("the job exists");
        if job.status == JobStatus::Completed {
            return job;
        }
        assert!(
            job.status.is_unfinished(),
            "job {job_id} ended {:?}",
            job.status
        );
        assert!(
            started.elapsed() < EXPORT_DEADLINE,
            "job {job_id} was not done within {EXPORT_DEADLINE:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One file of a manifest.
#[derive(Debug, Clone)]
struct Item {
    resource_type: String,
    url: String,
    count: u64,
}

fn items(manifest: &Value, kind: &str) -> Vec<Item> {
    manifest[kind]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| Item {
            resource_type: item["type"].as_str().expect("type").to_owned(),
            url: item["url"].as_str().expect("url").to_owned(),
            count: item["count"].as_u64().expect("count"),
        })
        .collect()
}

/// Per type, the sum of the item counts of one manifest array.
fn counts(manifest: &Value, kind: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for item in items(manifest, kind) {
        *counts.entry(item.resource_type).or_insert(0) += item.count;
    }
    counts
}

/// Downloads a file as raw NDJSON (`Accept: application/fhir+ndjson`).
async fn download(server: &TestServer, url: &str) -> Vec<u8> {
    let response = server
        .client
        .get(url)
        .header("accept", NDJSON)
        .send()
        .await
        .expect("the download is answered");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let body = response.bytes().await.expect("a readable body").to_vec();
    assert_eq!(
        status,
        StatusCode::OK,
        "{url} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        content_type.starts_with(NDJSON),
        "{url}: Content-Type '{content_type}'"
    );
    body
}

/// The lines of an NDJSON file, each as its text: newline-terminated, none blank.
fn ndjson_lines(raw: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(raw).expect("NDJSON is UTF-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the file does not end with a newline"
    );
    text.lines()
        .map(|line| {
            assert!(!line.trim().is_empty(), "a blank line in an NDJSON file");
            line.to_owned()
        })
        .collect()
}

fn parse_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("a line is not JSON ({e}): {line}"))
}

/// Downloads every item of one manifest array and checks it: every line a resource of the
/// item's type, as many lines as `count`. Returns the lines per type.
async fn download_kind(
    server: &TestServer,
    manifest: &Value,
    kind: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in items(manifest, kind) {
        let raw = download(server, &item.url).await;
        let file_lines = ndjson_lines(&raw);
        assert_eq!(
            file_lines.len() as u64,
            item.count,
            "{}: count {} but {} lines",
            item.url,
            item.count,
            file_lines.len()
        );
        for line in &file_lines {
            assert_eq!(
                parse_line(line)["resourceType"],
                item.resource_type.as_str(),
                "a line of a {} file: {line}",
                item.resource_type
            );
        }
        lines
            .entry(item.resource_type)
            .or_default()
            .extend(file_lines);
    }
    lines
}

/// The ids of resource lines, asserting none is repeated.
fn unique_ids(resource_type: &str, lines: &[String]) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for line in lines {
        let id = id_of(&parse_line(line));
        assert!(
            ids.insert(id.clone()),
            "{resource_type}/{id} is exported twice"
        );
    }
    ids
}

/// Every line is byte for byte what `GET [base]/<type>/<id>` answers.
async fn assert_lines_are_reads(server: &TestServer, resource_type: &str, lines: &[String]) {
    let mismatches: Vec<String> = futures::stream::iter(lines.iter())
        .map(|line| async move {
            let id = id_of(&parse_line(line));
            let read = expect_text(
                server.get(&format!("/{resource_type}/{id}")).await,
                StatusCode::OK,
            )
            .await;
            (read != *line)
                .then(|| format!("{resource_type}/{id}:\n  file: {line}\n  read: {read}"))
        })
        .buffer_unordered(8)
        .filter_map(|mismatch| async move { mismatch })
        .collect()
        .await;
    assert!(
        mismatches.is_empty(),
        "{} exported lines differ from reads, e.g. {}",
        mismatches.len(),
        mismatches[0]
    );
}

/// The resource types of the Synthea set and how many of each, from the committed counts.
fn synthea_counts() -> BTreeMap<String, u64> {
    let path = synthea_dir().join("../synthea-r4-10p.counts.json");
    let text = std::fs::read_to_string(&path).expect("the counts file");
    let counts: Value = serde_json::from_str(&text).expect("JSON counts");
    counts["by_type"]
        .as_object()
        .expect("by_type")
        .iter()
        .map(|(t, n)| (t.clone(), n.as_u64().expect("a count")))
        .collect()
}

/// A server whose exports stay unfinished for a while: every resource is a unit of its own.
async fn spawn_slow_export_server(max_active_exports: u64) -> TestServer {
    spawn_server_with_options(ServerOptions {
        synthea: true,
        export: ExportSettings {
            workers: 1,
            rows_per_unit: 1,
            max_active_exports,
            ..ExportSettings::default()
        },
        ..ServerOptions::default()
    })
    .await
}

/// A server with a few patients and nothing else.
async fn spawn_server_with_patients(families: &[&str]) -> (TestServer, Vec<String>) {
    let server = spawn_server().await;
    let mut ids = Vec::new();
    for family in families {
        ids.push(id_of(&server.create(&patient(family)).await));
    }
    (server, ids)
}

/// A finished `_type=Patient` export of the Synthea set: its one item and the raw file.
async fn patient_file(server: &TestServer) -> (Item, Vec<u8>) {
    let manifest = run_export(server, "?_type=Patient").await;
    let output = items(&manifest, "output");
    assert_eq!(output.len(), 1, "{manifest}");
    let item = output[0].clone();
    let raw = download(server, &item.url).await;
    assert_eq!(ndjson_lines(&raw).len() as u64, item.count);
    (item, raw)
}

fn parameters(parameters: Value) -> Value {
    json!({"resourceType": "Parameters", "parameter": parameters})
}

// ---------------------------------------------------------------------------------------------
// discovery

#[tokio::test]
async fn metadata_declares_bulk_data_and_both_export_operations() {
    let server = spawn_server().await;
    let statement = expect_json(server.get("/metadata").await, StatusCode::OK).await;
    let instantiates = statement["instantiates"]
        .as_array()
        .expect("instantiates is an array");
    assert!(
        instantiates.iter().any(|i| i == BULK_DATA_CAPABILITY),
        "{instantiates:?}"
    );
    let operations = statement["rest"][0]["operation"]
        .as_array()
        .expect("rest[0].operation is an array");
    let definition = |name: &str| {
        operations
            .iter()
            .find(|op| op["name"] == name)
            .unwrap_or_else(|| panic!("no operation '{name}' in {operations:?}"))["definition"]
            .clone()
    };
    assert_eq!(
        definition("export"),
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"
    );
    assert_eq!(
        definition("export-poll-status"),
        "http://ehealth.sundhed.dk/fhir/OperationDefinition/-s-export-poll-status"
    );
}

#[tokio::test]
async fn operation_definitions_are_served_as_committed() {
    let server = spawn_server().await;
    for (id, committed) in [
        (
            "-s-export-poll-status",
            include_str!("../../definitions/OperationDefinition--s-export-poll-status.json"),
        ),
        (
            "-s-export",
            include_str!("../../definitions/OperationDefinition--s-export.json"),
        ),
        (
            "export",
            include_str!("../../definitions/OperationDefinition-export.json"),
        ),
    ] {
        let served = expect_json(
            server.get(&format!("/OperationDefinition/{id}")).await,
            StatusCode::OK,
        )
        .await;
        let committed: Value = serde_json::from_str(committed).expect("committed JSON");
        assert_eq!(served, committed, "OperationDefinition/{id}");
        assert_eq!(served["resourceType"], "OperationDefinition");
    }
}

// ---------------------------------------------------------------------------------------------
// kick-off

#[tokio::test]
async fn kick_off_without_parameters_is_202_with_an_absolute_status_url_and_no_body() {
    let (server, _) = spawn_server_with_patients(&["Kickoff"]).await;
    let export = kick_off(&server, "").await;
    assert!(export.status_url.starts_with("http://127.0.0.1:"));
    // The Accept of the eHealth example kick-off.
    let response = kick_off_request_with(
        &server,
        Method::GET,
        "",
        "respond-async",
        "application/fhir+json;q=1.0, application/json+fhir;q=0.9",
    )
    .send()
    .await
    .expect("answered");
    expect_accepted(&server, response).await;
    // Each kick-off is a job of its own.
    let second = kick_off(&server, "").await;
    assert_ne!(export.job_id, second.job_id);
}

#[tokio::test]
async fn kick_off_without_prefer_respond_async_is_400() {
    let (server, _) = spawn_server_with_patients(&["Prefer"]).await;
    for prefer in [None, Some("return=minimal"), Some("handling=lenient")] {
        for method in [Method::GET, Method::POST] {
            let mut request = server
                .request(method.clone(), "/$export")
                .header("accept", FHIR_JSON);
            if let Some(prefer) = prefer {
                request = request.header("prefer", prefer);
            }
            if method == Method::POST {
                request = request
                    .header("content-type", FHIR_JSON)
                    .body(parameters(json!([])).to_string());
            }
            let response = request.send().await.expect("answered");
            let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
            assert!(
                outcome_text(&outcome).contains("respond-async"),
                "{method} with Prefer {prefer:?}: {outcome}"
            );
        }
    }
}

#[tokio::test]
async fn kick_off_without_accept_is_400() {
    let (server, _) = spawn_server_with_patients(&["Accept"]).await;
    let get = server
        .raw("GET", "/$export", &[("Prefer", "respond-async")], b"")
        .await;
    assert_eq!(get.status, 400, "{}", String::from_utf8_lossy(&get.body));
    assert!(
        get.header("content-type")
            .unwrap_or("")
            .starts_with(FHIR_JSON)
    );
    assert_outcome_value(&get.json());
    assert!(get.header("content-location").is_none());

    let body = parameters(json!([])).to_string();
    let post = server
        .raw(
            "POST",
            "/$export",
            &[("Prefer", "respond-async"), ("Content-Type", FHIR_JSON)],
            body.as_bytes(),
        )
        .await;
    assert_eq!(post.status, 400, "{}", String::from_utf8_lossy(&post.body));
    assert_outcome_value(&post.json());
}

#[tokio::test]
async fn a_server_with_lenient_headers_accepts_a_kick_off_without_accept() {
    let server = spawn_server_with_options(ServerOptions {
        lenient_headers: true,
        ..ServerOptions::default()
    })
    .await;
    server.create(&patient("Lenient")).await;
    let response = server
        .raw("GET", "/$export", &[("Prefer", "respond-async")], b"")
        .await;
    assert_eq!(
        response.status,
        202,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let location = response
        .header("content-location")
        .expect("Content-Location");
    assert!(
        location.starts_with(&format!("{}/$export-poll-status?_jobId=", server.base)),
        "{location}"
    );
    // Missing Prefer is still refused.
    let response = server.raw("GET", "/$export", &[], b"").await;
    assert_eq!(response.status, 400);
    assert_outcome_value(&response.json());
}

#[tokio::test]
async fn kick_off_with_a_non_fhir_accept_is_400() {
    let (server, _) = spawn_server_with_patients(&["Xml"]).await;
    for accept in ["application/fhir+xml", "text/html", "application/xml"] {
        let response = kick_off_request_with(&server, Method::GET, "", "respond-async", accept)
            .send()
            .await
            .expect("answered");
        let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
        assert!(outcome_text(&outcome).contains("Accept"), "{outcome}");
    }
}

#[tokio::test]
async fn kick_off_accepts_every_accept_that_fhir_json_answers() {
    // The eHealth examples send the old `application/json+fhir` with q-values; generic HTTP
    // clients send `*/*` or `application/json`: an OperationOutcome in FHIR JSON serves all.
    let (server, _) = spawn_server_with_patients(&["Json"]).await;
    for accept in [
        "application/fhir+json;q=1.0, application/json+fhir;q=0.9",
        "application/json+fhir",
        "application/json",
        "*/*",
        "text/html, application/fhir+json",
    ] {
        let response = kick_off_request_with(&server, Method::GET, "", "respond-async", accept)
            .send()
            .await
            .expect("answered");
        let export = expect_accepted(&server, response).await;
        assert_eq!(
            server.delete(&export.status_url).await.status(),
            StatusCode::ACCEPTED,
            "{accept}"
        );
    }
}

#[tokio::test]
async fn every_ndjson_output_format_alias_is_accepted_and_others_refused_by_name() {
    let (server, _) = spawn_server_with_patients(&["Format"]).await;
    for format in OUTPUT_FORMATS {
        kick_off(&server, &format!("?_outputFormat={}", enc(format))).await;
    }
    for format in [
        "application/xml",
        "text/html",
        "x-custom",
        "application/fhir+json",
    ] {
        let response = kick_off_request(
            &server,
            Method::GET,
            &format!("?_outputFormat={}", enc(format)),
        )
        .send()
        .await
        .expect("answered");
        expect_refused(response, "_outputFormat").await;
    }
}

#[tokio::test]
async fn an_unknown_type_is_refused_by_name() {
    let (server, _) = spawn_server_with_patients(&["Type"]).await;
    for (query, refused) in [
        ("?_type=MissingType", "MissingType"),
        ("?_type=Patient,MissingType", "MissingType"),
        ("?_type=Patient&_type=MissingType", "MissingType"),
        ("?_type=patient", "patient"),
    ] {
        let response = kick_off_request(&server, Method::GET, query)
            .send()
            .await
            .expect("answered");
        let outcome = expect_refused(response, "_type").await;
        assert!(outcome_text(&outcome).contains(refused), "{outcome}");
    }
}

#[tokio::test]
async fn malformed_or_future_since_and_malformed_until_are_refused_by_name() {
    let (server, _) = spawn_server_with_patients(&["Since"]).await;
    for (name, value) in [
        ("_since", "0000-60-01T30:70:80+05:00"),
        ("_since", "2057-01-01T00:00:00+05:00"),
        ("_since", "2024-01-01"),
        ("_since", "2024-01-01T10:00:00"),
        ("_since", "yesterday"),
        ("_until", "0000-60-01T30:70:80+05:00"),
        ("_until", "2024-13-01T00:00:00Z"),
    ] {
        let response = kick_off_request(&server, Method::GET, &format!("?{name}={}", enc(value)))
            .send()
            .await
            .expect("answered");
        expect_refused(response, name).await;
    }
    // A moment ago is fine, and so is an _until in the future.
    let recent = format_instant(now_micros() - 60_000_000);
    kick_off(&server, &format!("?_since={}", enc(&recent))).await;
    kick_off(
        &server,
        &format!("?_until={}", enc("2057-01-01T00:00:00+05:00")),
    )
    .await;
}

#[tokio::test]
async fn unsupported_ig_parameters_are_refused_by_name() {
    let (server, _) = spawn_server_with_patients(&["Strict"]).await;
    for (name, value) in UNSUPPORTED {
        let response = kick_off_request(&server, Method::GET, &format!("?{name}={}", enc(value)))
            .send()
            .await
            .expect("answered");
        let outcome = expect_refused(response, name).await;
        assert!(outcome_text(&outcome).contains(name), "{outcome}");
        // handling=strict is the default.
        let response = kick_off_request_with(
            &server,
            Method::GET,
            &format!("?{name}={}", enc(value)),
            "respond-async, handling=strict",
            FHIR_JSON,
        )
        .send()
        .await
        .expect("answered");
        expect_refused(response, name).await;
    }
}

#[tokio::test]
async fn lenient_handling_ignores_unsupported_parameters_and_reports_each_in_error_files() {
    let (server, ids) = spawn_server_with_patients(&["Lenient", "Handling"]).await;
    let mut query = "?_type=Patient".to_owned();
    for (name, value) in UNSUPPORTED {
        query.push_str(&format!("&{name}={}", enc(value)));
    }
    let export = expect_accepted(&server, kick_off_lenient(&server, &query).await).await;
    let manifest = poll_to_completion(&server, &export).await;
    assert_eq!(manifest["request"], export.request_url);

    // The export itself is unaffected.
    let output = download_kind(&server, &manifest, "output").await;
    assert_eq!(output.keys().collect::<Vec<_>>(), ["Patient"]);
    assert_eq!(
        unique_ids("Patient", &output["Patient"]),
        ids.iter().cloned().collect()
    );

    // One OperationOutcome per ignored parameter, each naming it.
    let errors = download_kind(&server, &manifest, "error").await;
    assert_eq!(
        errors.keys().collect::<Vec<_>>(),
        ["OperationOutcome"],
        "{manifest}"
    );
    let outcomes: Vec<Value> = errors["OperationOutcome"]
        .iter()
        .map(|line| parse_line(line))
        .collect();
    assert_eq!(outcomes.len(), UNSUPPORTED.len(), "{outcomes:?}");
    for (name, _) in UNSUPPORTED {
        let mentioning: Vec<&Value> = outcomes
            .iter()
            .filter(|o| outcome_text(o).contains(name))
            .collect();
        assert!(
            mentioning
                .iter()
                .any(|o| o["issue"][0]["expression"][0] == name),
            "no outcome names {name}: {outcomes:?}"
        );
    }
    for outcome in &outcomes {
        assert_outcome_value(outcome);
    }
}

#[tokio::test]
async fn lenient_handling_leaves_out_unknown_types_and_reports_them() {
    let (server, _) = spawn_server_with_patients(&["Types"]).await;
    let response = kick_off_lenient(&server, "?_type=Patient,MissingType").await;
    let export = expect_accepted(&server, response).await;
    let manifest = poll_to_completion(&server, &export).await;
    assert_eq!(
        counts(&manifest, "output"),
        BTreeMap::from([("Patient".to_owned(), 1)])
    );
    let errors = download_kind(&server, &manifest, "error").await;
    let outcomes = &errors["OperationOutcome"];
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert!(outcomes[0].contains("MissingType"), "{}", outcomes[0]);
}

#[tokio::test]
async fn patient_on_a_system_export_is_400_even_when_lenient() {
    let (server, ids) = spawn_server_with_patients(&["Patient"]).await;
    let query = format!("?patient={}", enc(&format!("Patient/{}", ids[0])));
    let strict = kick_off_request(&server, Method::GET, &query)
        .send()
        .await
        .expect("answered");
    expect_refused(strict, "patient").await;
    expect_refused(kick_off_lenient(&server, &query).await, "patient").await;
}

#[tokio::test]
async fn post_kick_off_with_an_empty_parameters_is_202() {
    let (server, _) = spawn_server_with_patients(&["Empty"]).await;
    let empty = expect_accepted(
        &server,
        kick_off_post(&server, &parameters(json!([]))).await,
    )
    .await;
    // The request is the URL without the body.
    assert_eq!(empty.request_url, format!("{}/$export", server.base));
    let bare = json!({"resourceType": "Parameters"});
    let export = expect_accepted(&server, kick_off_post(&server, &bare).await).await;
    let manifest = poll_to_completion(&server, &export).await;
    assert_eq!(manifest["request"], format!("{}/$export", server.base));
    assert_eq!(counts(&manifest, "output")["Patient"], 1);
}

#[tokio::test]
async fn post_kick_off_with_a_body_that_is_not_parameters_is_400() {
    let (server, _) = spawn_server_with_patients(&["NotParameters"]).await;
    for body in [
        r#"{"resourceType":"Patient"}"#,
        r#"{"parameter":[]}"#,
        "{not json",
        "[]",
        r#"["Parameters"]"#,
    ] {
        let response = kick_off_request(&server, Method::POST, "")
            .header("content-type", FHIR_JSON)
            .body(body)
            .send()
            .await
            .expect("answered");
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "POST $export with the body {body}"
        );
        assert_outcome(response, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn post_kick_off_parameters_are_validated_by_name() {
    let (server, ids) = spawn_server_with_patients(&["Validated"]).await;
    for (parameter, value) in [
        (
            "patient",
            json!({"name": "patient", "valueReference": {"reference": format!("Patient/{}", ids[0])}}),
        ),
        (
            "_outputFormat",
            json!({"name": "_outputFormat", "valueString": "text/html"}),
        ),
        (
            "_since",
            json!({"name": "_since", "valueInstant": "2057-01-01T00:00:00+05:00"}),
        ),
        (
            "_type",
            json!({"name": "_type", "valueString": "MissingType"}),
        ),
        (
            "_elements",
            json!({"name": "_elements", "valueString": "Nope.id"}),
        ),
    ] {
        let body = parameters(json!([value]));
        expect_refused(kick_off_post(&server, &body).await, parameter).await;
        if parameter == "patient" {
            let lenient = kick_off_request_with(
                &server,
                Method::POST,
                "",
                "respond-async, handling=lenient",
                FHIR_JSON,
            )
            .header("content-type", FHIR_JSON)
            .body(body.to_string())
            .send()
            .await
            .expect("answered");
            expect_refused(lenient, "patient").await;
        }
    }
}

#[tokio::test]
async fn post_kick_off_exports_what_its_parameters_ask_for() {
    let server = spawn_server_with_synthea().await;
    let body = parameters(json!([
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
        {"name": "_type", "valueString": "Patient"},
        {"name": "_type", "valueString": "AllergyIntolerance"},
        {"name": "_since", "valueInstant": "2000-01-01T00:00:00Z"},
        {"name": "_exportId", "valueString": "posted"}
    ]));
    let response = kick_off_post(&server, &body).await;
    let export = expect_accepted(&server, response).await;
    let manifest = poll_to_completion(&server, &export).await;
    assert_eq!(manifest["request"], format!("{}/$export", server.base));
    assert_eq!(
        counts(&manifest, "output"),
        BTreeMap::from([
            ("AllergyIntolerance".to_owned(), 1),
            ("Patient".to_owned(), 10)
        ])
    );
    assert_eq!(manifest["extension"][EXPORT_ID_EXTENSION], "posted");
}

#[tokio::test]
async fn a_kick_off_beyond_the_active_export_limit_is_429_with_retry_after() {
    let server = spawn_server_with_options(ServerOptions {
        export: ExportSettings {
            workers: 1,
            max_active_exports: 0,
            ..ExportSettings::default()
        },
        ..ServerOptions::default()
    })
    .await;
    server.create(&patient("Limit")).await;
    let response = kick_off_request(&server, Method::GET, "")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = header(&response, "retry-after");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s > 0),
        "Retry-After '{retry_after}'"
    );
    assert!(response.headers().get("content-location").is_none());
    assert_outcome(response, StatusCode::TOO_MANY_REQUESTS).await;
}

#[tokio::test]
async fn the_active_export_limit_counts_only_unfinished_jobs() {
    let server = spawn_slow_export_server(2).await;
    let first = kick_off(&server, "").await;
    let second = kick_off(&server, "").await;
    for export in [&first, &second] {
        let job = server.store.job(&export.job_id).await.unwrap().unwrap();
        assert!(
            job.status.is_unfinished(),
            "the export finished too fast for this test: {:?}",
            job.status
        );
    }
    let third = kick_off_request(&server, Method::GET, "")
        .send()
        .await
        .expect("answered");
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    header(&third, "retry-after")
        .parse::<u64>()
        .expect("integer Retry-After");
    assert_outcome(third, StatusCode::TOO_MANY_REQUESTS).await;

    // A cancelled job no longer counts.
    let cancelled = server.delete(&first.status_url).await;
    assert_outcome(cancelled, StatusCode::ACCEPTED).await;
    let fourth = kick_off(&server, "").await;
    for export in [&second, &fourth] {
        assert_outcome(
            server.delete(&export.status_url).await,
            StatusCode::ACCEPTED,
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// status

#[tokio::test]
async fn the_first_poll_is_202_with_progress_even_when_the_job_is_done() {
    let (server, _) = spawn_server_with_patients(&["First", "Poll"]).await;
    let export = kick_off(&server, "?_type=Patient").await;
    wait_until_done(&server, &export.job_id).await;
    let first = server.get(&export.status_url).await;
    assert_in_progress(&first);
    assert!(first.bytes().await.unwrap().is_empty());
    let second = server.get(&export.status_url).await;
    let manifest = expect_manifest(&server, second).await;
    assert_eq!(counts(&manifest, "output")["Patient"], 2);
    // The manifest is answered again, the same.
    let third = expect_manifest(&server, server.get(&export.status_url).await).await;
    assert_eq!(third, manifest);
}

#[tokio::test]
async fn a_completed_status_is_the_manifest() {
    let server = spawn_server_with_synthea().await;
    let before = now_micros();
    let query = format!(
        "?_outputFormat={}&_type=Patient,Organization&_exportId=abc",
        enc("application/fhir+ndjson")
    );
    let export = kick_off(&server, &query).await;
    let manifest = poll_to_completion(&server, &export).await;
    let after = now_micros();

    // Expires names the moment the job and its files expire (HTTP dates count whole seconds).
    let response = server.get(&export.status_url).await;
    let expires = httpdate::parse_http_date(&header(&response, "expires")).unwrap();
    let job = server.store.job(&export.job_id).await.unwrap().unwrap();
    let expires_at = SystemTime::UNIX_EPOCH
        + Duration::from_micros(job.expires_at.expect("a completed job expires") as u64);
    let apart = expires_at
        .duration_since(expires)
        .unwrap_or_else(|e| e.duration());
    assert!(
        apart < Duration::from_secs(1),
        "Expires {expires:?} vs the job's {expires_at:?}"
    );
    let ttl = expires_at
        .duration_since(SystemTime::UNIX_EPOCH + Duration::from_micros(after as u64))
        .expect("expiry after completion");
    assert!(ttl > Duration::from_secs(23 * 3600) && ttl <= Duration::from_secs(24 * 3600));

    let transaction_time = parse_instant(manifest["transactionTime"].as_str().unwrap()).unwrap();
    assert!(
        (before..=after).contains(&transaction_time),
        "transactionTime {} is not the time of the kick-off",
        manifest["transactionTime"]
    );
    assert_eq!(manifest["request"], export.request_url);
    assert!(
        export
            .request_url
            .ends_with(&format!("/fhir/$export{query}")),
        "{}",
        export.request_url
    );
    assert_eq!(manifest["requiresAccessToken"], false);
    assert_eq!(
        manifest["extension"][EXPORT_ID_EXTENSION], "abc",
        "{manifest}"
    );
    assert_eq!(
        counts(&manifest, "output"),
        BTreeMap::from([("Organization".to_owned(), 16), ("Patient".to_owned(), 10)])
    );
    assert_eq!(manifest["deleted"], json!([]));
    assert_eq!(manifest["error"], json!([]));
    // Every file URL is distinct.
    let urls: BTreeSet<String> = items(&manifest, "output")
        .into_iter()
        .map(|i| i.url)
        .collect();
    assert_eq!(urls.len(), items(&manifest, "output").len());

    // Without _exportId there is no such extension.
    let plain = run_export(&server, "?_type=Patient").await;
    assert!(plain["extension"][EXPORT_ID_EXTENSION].is_null(), "{plain}");
}

#[tokio::test]
async fn status_answers_post_with_a_parameters_job_id() {
    let (server, _) = spawn_server_with_patients(&["Post", "Status"]).await;
    let export = kick_off(&server, "?_type=Patient").await;
    let body = parameters(json!([{"name": "_jobId", "valueString": export.job_id}]));
    let started = Instant::now();
    let mut polls = 0;
    let manifest = loop {
        let response = server.post_json("/$export-poll-status", &body).await;
        polls += 1;
        match response.status() {
            StatusCode::ACCEPTED => assert_in_progress(&response),
            StatusCode::OK if polls > 1 => break expect_manifest(&server, response).await,
            status => panic!(
                "POST $export-poll-status (poll {polls}) answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
        assert!(started.elapsed() < EXPORT_DEADLINE, "not done in time");
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    assert_eq!(counts(&manifest, "output")["Patient"], 2);
    // GET answers the same manifest.
    let by_get = expect_manifest(&server, server.get(&export.status_url).await).await;
    assert_eq!(by_get, manifest);
}

#[tokio::test]
async fn status_of_an_unknown_job_is_404_and_without_a_job_id_400() {
    let server = spawn_server().await;
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/$export-poll-status?_jobId={unknown}"),
        "/$export-poll-status?_jobId=not-a-job".to_owned(),
    ] {
        assert_outcome(server.get(&path).await, StatusCode::NOT_FOUND).await;
        assert_outcome(server.delete(&path).await, StatusCode::NOT_FOUND).await;
    }
    for path in ["/$export-poll-status", "/$export-poll-status?_jobId="] {
        let outcome = assert_outcome(server.get(path).await, StatusCode::BAD_REQUEST).await;
        assert!(outcome_text(&outcome).contains("_jobId"), "{outcome}");
        assert_outcome(server.delete(path).await, StatusCode::BAD_REQUEST).await;
    }
    let empty = parameters(json!([]));
    assert_outcome(
        server.post_json("/$export-poll-status", &empty).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    // Last, as it depends on POST Parameters values being read at all.
    let body = parameters(json!([{"name": "_jobId", "valueString": unknown.to_string()}]));
    assert_outcome(
        server.post_json("/$export-poll-status", &body).await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// cancel and delete

/// Asserts the `202` of a cancel: an OperationOutcome with an information issue.
async fn expect_cancelled(server: &TestServer, export: &Export) {
    let outcome = assert_outcome(
        server.delete(&export.status_url).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(outcome["issue"][0]["severity"], "information", "{outcome}");
}

/// After a cancel or delete, the job is gone for every status request.
async fn assert_gone(server: &TestServer, export: &Export) {
    for _ in 0..2 {
        assert_outcome(server.get(&export.status_url).await, StatusCode::NOT_FOUND).await;
        assert_outcome(
            server.delete(&export.status_url).await,
            StatusCode::NOT_FOUND,
        )
        .await;
    }
}

async fn assert_file_gone(server: &TestServer, url: &str) {
    let response = server
        .client
        .get(url)
        .header("accept", NDJSON)
        .send()
        .await
        .expect("answered");
    assert_outcome(response, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn delete_cancels_a_running_job_and_then_it_is_gone() {
    let server = spawn_slow_export_server(16).await;
    let export = kick_off(&server, "").await;
    let first = server.get(&export.status_url).await;
    assert_in_progress(&first);
    // Let it run a little.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = server.store.job(&export.job_id).await.unwrap().unwrap();
    assert!(
        job.status.is_unfinished(),
        "the export finished too fast for this test"
    );
    expect_cancelled(&server, &export).await;
    assert_gone(&server, &export).await;
    // The worker gives the job up: no unit of it is claimed again, nothing completes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = server.store.job(&export.job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_gone(&server, &export).await;
}

#[tokio::test]
async fn a_cancelled_running_job_stops_at_once_and_leaves_no_files() {
    let server = spawn_slow_export_server(16).await;
    let export = kick_off(&server, "").await;
    assert_in_progress(&server.get(&export.status_url).await);
    let dir = server.dir.path().join("exports").join(&export.job_id);
    let started = Instant::now();
    while !dir.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no unit started writing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    expect_cancelled(&server, &export).await;
    // Within one second the worker has given the job up, and nothing it was writing remains.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let units_done = server
        .store
        .job(&export.job_id)
        .await
        .unwrap()
        .unwrap()
        .units_done;
    assert!(
        !dir.exists(),
        "files of a cancelled job remain in {}",
        dir.display()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!dir.exists(), "a worker wrote files after the cancel");
    let job = server.store.job(&export.job_id).await.unwrap().unwrap();
    assert_eq!(
        job.units_done, units_done,
        "units still commit after the cancel"
    );
    assert!(
        job.units_done < job.units_total,
        "the export finished too fast for this test"
    );
}

#[tokio::test]
async fn a_job_waiting_for_a_worker_says_queued() {
    // One worker, busy with a long export of one-resource units: the next job waits its turn.
    let server = spawn_slow_export_server(16).await;
    let busy = kick_off(&server, "").await;
    let waiting = kick_off(&server, "?_type=Patient").await;
    for _ in 0..2 {
        let response = server.get(&waiting.status_url).await;
        assert_in_progress(&response);
        let progress = header(&response, "x-progress");
        assert_eq!(progress, "0% (0 of 10 resources), queued");
    }
    let job = server.store.job(&busy.job_id).await.unwrap().unwrap();
    assert!(
        job.status.is_unfinished(),
        "the first export finished too fast for this test"
    );
    expect_cancelled(&server, &busy).await;
    poll_to_completion(&server, &waiting).await;
}

#[tokio::test]
async fn a_failed_job_answers_500_with_an_operation_outcome() {
    let server = spawn_slow_export_server(16).await;
    let export = kick_off(&server, "").await;
    // The job's directory turns into a file: the next unit cannot create its output there.
    let dir = server.dir.path().join("exports").join(&export.job_id);
    let started = Instant::now();
    loop {
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::write(&dir, b"in the way").is_ok() && dir.is_file() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "cannot put a file in the way"
        );
    }
    let started = Instant::now();
    let response = loop {
        let response = server.get(&export.status_url).await;
        if response.status() != StatusCode::ACCEPTED {
            break response;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the job never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outcome = assert_outcome(response, StatusCode::INTERNAL_SERVER_ERROR).await;
    assert_eq!(outcome["issue"][0]["severity"], "error", "{outcome}");
    assert!(outcome_text(&outcome).contains("failed"), "{outcome}");
    // A failed job stays failed for later polls.
    assert_outcome(
        server.get(&export.status_url).await,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
}

#[tokio::test]
async fn delete_cancels_a_done_job_whose_manifest_was_never_shown() {
    let server = spawn_server_with_synthea().await;
    let export = kick_off(&server, "?_type=Patient,Condition").await;
    let job = wait_until_done(&server, &export.job_id).await;
    let manifest: Value = serde_json::from_str(job.manifest.as_deref().expect("a manifest"))
        .expect("the stored manifest is JSON");
    let urls: Vec<String> = items(&manifest, "output")
        .into_iter()
        .map(|i| i.url)
        .collect();
    assert_eq!(urls.len(), 2, "{manifest}");
    // The files are there, downloadable even before the manifest is shown.
    download(&server, &urls[0]).await;

    expect_cancelled(&server, &export).await;
    assert_gone(&server, &export).await;
    for url in &urls {
        assert_file_gone(&server, url).await;
    }
    let job_dir = server.dir.path().join("exports").join(&export.job_id);
    assert!(!job_dir.exists(), "{} was not removed", job_dir.display());
}

#[tokio::test]
async fn delete_after_the_manifest_was_shown_is_404_and_removes_the_files() {
    let server = spawn_server_with_synthea().await;
    let export = kick_off(&server, "?_type=Patient,Condition").await;
    let manifest = poll_to_completion(&server, &export).await;
    let urls: Vec<String> = items(&manifest, "output")
        .into_iter()
        .map(|i| i.url)
        .collect();
    for url in &urls {
        download(&server, url).await;
    }
    assert_outcome(
        server.delete(&export.status_url).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    for url in &urls {
        assert_file_gone(&server, url).await;
    }
    assert_gone(&server, &export).await;
    let job_dir = server.dir.path().join("exports").join(&export.job_id);
    assert!(!job_dir.exists(), "{} was not removed", job_dir.display());
}

/// A server whose export jobs and files expire `ttl` after completion.
async fn spawn_server_with_ttl(ttl: Duration) -> TestServer {
    spawn_server_with_options(ServerOptions {
        export: ExportSettings {
            workers: 1,
            ttl,
            ..ExportSettings::default()
        },
        ..ServerOptions::default()
    })
    .await
}

#[tokio::test]
async fn after_expires_the_job_and_its_files_are_gone() {
    let server = spawn_server_with_ttl(Duration::from_secs(2)).await;
    server.create(&patient("Expiring")).await;
    let export = kick_off(&server, "?_type=Patient").await;
    let manifest = poll_to_completion(&server, &export).await;
    let url = items(&manifest, "output")[0].url.clone();
    download(&server, &url).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_outcome(server.get(&export.status_url).await, StatusCode::NOT_FOUND).await;
    assert_file_gone(&server, &url).await;
}

#[tokio::test]
async fn an_expired_job_whose_manifest_was_never_shown_answers_404_to_delete() {
    let server = spawn_server_with_ttl(Duration::from_secs(1)).await;
    server.create(&patient("Expiring")).await;
    let export = kick_off(&server, "?_type=Patient").await;
    assert_in_progress(&server.get(&export.status_url).await);
    wait_until_done(&server, &export.job_id).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Nobody saw its manifest, but it expired: it is gone, not cancellable.
    assert_outcome(
        server.delete(&export.status_url).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_gone(&server, &export).await;
    assert!(server.store.job(&export.job_id).await.unwrap().is_none());
}

#[tokio::test]
async fn the_sweeper_removes_expired_jobs_and_their_files() {
    let server = spawn_server_with_ttl(Duration::from_secs(2)).await;
    server.create(&patient("Swept")).await;
    let expiring = kick_off(&server, "?_type=Patient").await;
    poll_to_completion(&server, &expiring).await;
    let expiring_dir = server.dir.path().join("exports").join(&expiring.job_id);
    assert!(expiring_dir.is_dir());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A job finished just now is not touched.
    let fresh = kick_off(&server, "?_type=Patient").await;
    let manifest = poll_to_completion(&server, &fresh).await;
    let fresh_dir = server.dir.path().join("exports").join(&fresh.job_id);
    server.sweep_exports().await;
    assert!(!expiring_dir.exists(), "expired files remain");
    assert!(server.store.job(&expiring.job_id).await.unwrap().is_none());
    assert!(fresh_dir.is_dir());
    download(&server, &items(&manifest, "output")[0].url).await;
}

// ---------------------------------------------------------------------------------------------
// files
// ---------------------------------------------------------------------------------------------
// files

#[tokio::test]
async fn files_download_as_ndjson_for_no_accept_any_accept_and_ndjson() {
    let server = spawn_server_with_synthea().await;
    let (item, raw) = patient_file(&server).await;
    let lines = ndjson_lines(&raw);
    assert_eq!(lines.len(), 10);
    assert_eq!(unique_ids("Patient", &lines), synthea_ids("Patient"));
    assert_lines_are_reads(&server, "Patient", &lines).await;

    // No Accept at all.
    let bare = server.raw("GET", &item.url, &[], b"").await;
    assert_eq!(bare.status, 200);
    assert!(
        bare.header("content-type")
            .unwrap_or("")
            .starts_with(NDJSON),
        "{:?}",
        bare.headers
    );
    assert_eq!(bare.body, raw);
    // Accept: */* (what reqwest sends by default) and the NDJSON types.
    for accept in [
        "*/*",
        NDJSON,
        "application/fhir+ndjson; q=1.0",
        "application/ndjson",
    ] {
        let response = server
            .client
            .get(&item.url)
            .header("accept", accept)
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::OK, "Accept {accept}");
        assert!(
            header(&response, "content-type").starts_with(NDJSON),
            "Accept {accept}"
        );
        assert!(response.headers().get("content-encoding").is_none());
        assert_eq!(response.bytes().await.unwrap(), raw, "Accept {accept}");
    }
}

#[tokio::test]
async fn files_download_as_a_binary_resource_for_fhir_json() {
    let server = spawn_server_with_synthea().await;
    let (item, raw) = patient_file(&server).await;
    let response = server
        .client
        .get(&item.url)
        .header("accept", FHIR_JSON)
        .send()
        .await
        .expect("answered");
    let binary = expect_json(response, StatusCode::OK).await;
    assert_eq!(binary["resourceType"], "Binary");
    assert_eq!(binary["contentType"], NDJSON);
    let data = base64::engine::general_purpose::STANDARD
        .decode(binary["data"].as_str().expect("data"))
        .expect("data is padded base64");
    assert_eq!(data, raw);
}

#[tokio::test]
async fn files_download_gzip_compressed_on_request() {
    let server = spawn_server_with_synthea().await;
    let (item, raw) = patient_file(&server).await;
    for accept_encoding in ["gzip", "gzip, deflate, br", "br;q=1.0, gzip;q=0.8"] {
        let response = server
            .client
            .get(&item.url)
            .header("accept", NDJSON)
            .header("accept-encoding", accept_encoding)
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "content-encoding"), "gzip");
        assert!(header(&response, "content-type").starts_with(NDJSON));
        let compressed = response.bytes().await.unwrap();
        assert!(compressed.len() < raw.len(), "gzip did not compress");
        let mut decompressed = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut decompressed)
            .expect("valid gzip");
        assert_eq!(decompressed, raw, "Accept-Encoding {accept_encoding}");
    }
    // Identity when gzip is refused.
    let response = server
        .client
        .get(&item.url)
        .header("accept-encoding", "gzip;q=0, identity")
        .send()
        .await
        .expect("answered");
    assert!(response.headers().get("content-encoding").is_none());
    assert_eq!(response.bytes().await.unwrap(), raw);
}

#[tokio::test]
async fn files_serve_byte_ranges_for_resumed_downloads() {
    let server = spawn_server_with_synthea().await;
    let (item, raw) = patient_file(&server).await;
    let len = raw.len();
    assert!(len > 200);
    let ranged = |range: String| {
        server
            .client
            .get(&item.url)
            .header("accept", NDJSON)
            .header("range", range)
            .send()
    };

    let response = ranged("bytes=10-99".into()).await.expect("answered");
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&response, "content-range"),
        format!("bytes 10-99/{len}")
    );
    assert_eq!(response.bytes().await.unwrap(), raw[10..100]);

    let half = len / 2;
    let response = ranged(format!("bytes={half}-")).await.expect("answered");
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&response, "content-range"),
        format!("bytes {half}-{}/{len}", len - 1)
    );
    let tail = response.bytes().await.unwrap();
    assert_eq!(tail, raw[half..]);

    let response = ranged("bytes=-5".into()).await.expect("answered");
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(response.bytes().await.unwrap(), raw[len - 5..]);

    // A range at or past the end.
    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 10, len + 20),
    ] {
        let response = ranged(range.clone()).await.expect("answered");
        assert_eq!(
            response.status(),
            StatusCode::RANGE_NOT_SATISFIABLE,
            "Range {range}"
        );
    }
}

#[tokio::test]
async fn an_unknown_file_is_404() {
    let (server, _) = spawn_server_with_patients(&["NoFile"]).await;
    run_export(&server, "?_type=Patient").await;
    for id in [uuid::Uuid::new_v4().to_string(), "nope".to_owned()] {
        assert_file_gone(&server, &server.url(&format!("/Binary/{id}"))).await;
    }
}

#[tokio::test]
async fn a_file_id_never_reaches_outside_the_export_files() {
    let (server, _) = spawn_server_with_patients(&["Traversal"]).await;
    let export = kick_off(&server, "?_type=Patient").await;
    let manifest = poll_to_completion(&server, &export).await;
    let file_id = items(&manifest, "output")[0]
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    // What a file id would have to be to name a file by path: the store, or the job's own file
    // by its place on disk.
    let job_file = std::fs::read_dir(server.dir.path().join("exports").join(&export.job_id))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.ends_with(".ndjson"))
        .expect("the job's file is on disk");
    for id in [
        "..%2F..%2Fhearth.db".to_owned(),
        "%2E%2E%2F%2E%2E%2Fhearth.db".to_owned(),
        "..%5C..%5Chearth.db".to_owned(),
        format!("{}%2F{job_file}", export.job_id),
        format!("{file_id}%2F..%2F..%2F..%2Fhearth.db"),
    ] {
        let response = server
            .raw("GET", &server.url(&format!("/Binary/{id}")), &[], b"")
            .await;
        assert!(
            (400..500).contains(&response.status),
            "/Binary/{id} answered {}",
            response.status
        );
        assert_eq!(
            response.json()["resourceType"],
            "OperationOutcome",
            "/Binary/{id}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// what is exported

#[tokio::test]
async fn a_full_system_export_holds_every_resource_exactly_once() {
    let server = spawn_server_with_synthea().await;
    let manifest = run_export(&server, "").await;
    let expected = synthea_counts();
    assert_eq!(counts(&manifest, "output"), expected, "{manifest}");
    assert_eq!(manifest["deleted"], json!([]));
    assert_eq!(manifest["error"], json!([]));

    let lines = download_kind(&server, &manifest, "output").await;
    assert_eq!(
        lines.keys().cloned().collect::<BTreeSet<_>>(),
        expected.keys().cloned().collect::<BTreeSet<_>>()
    );
    let mut total = 0;
    for (resource_type, type_lines) in &lines {
        let ids = unique_ids(resource_type, type_lines);
        assert_eq!(ids, synthea_ids(resource_type), "{resource_type}");
        total += ids.len();
        assert_lines_are_reads(&server, resource_type, type_lines).await;
    }
    assert_eq!(total, 2523);
}

#[tokio::test]
async fn rolled_over_files_and_parallel_units_lose_and_repeat_nothing() {
    const MAX_FILE: u64 = 32 * 1024;
    let server = spawn_server_with_options(ServerOptions {
        synthea: true,
        export: ExportSettings {
            workers: 3,
            max_file_bytes: MAX_FILE,
            rows_per_unit: 100,
            ..ExportSettings::default()
        },
        ..ServerOptions::default()
    })
    .await;
    let manifest = run_export(&server, "").await;
    assert_eq!(counts(&manifest, "output"), synthea_counts());
    let observation_files = items(&manifest, "output")
        .iter()
        .filter(|i| i.resource_type == "Observation")
        .count();
    assert!(observation_files > 2, "{manifest}");
    for item in items(&manifest, "output") {
        let raw = download(&server, &item.url).await;
        assert!(
            raw.len() as u64 <= MAX_FILE || item.count == 1,
            "{} has {} bytes",
            item.url,
            raw.len()
        );
    }
    let lines = download_kind(&server, &manifest, "output").await;
    for (resource_type, type_lines) in &lines {
        assert_eq!(
            unique_ids(resource_type, type_lines),
            synthea_ids(resource_type),
            "{resource_type}"
        );
    }
}

#[tokio::test]
async fn type_limits_the_output_to_the_named_types() {
    let server = spawn_server_with_synthea().await;
    let manifest = run_export(&server, "?_type=Patient,Observation").await;
    assert_eq!(
        counts(&manifest, "output"),
        BTreeMap::from([("Observation".to_owned(), 1257), ("Patient".to_owned(), 10)])
    );

    // Repeated and comma-separated together; a type without resources gets no entry.
    let manifest = run_export(&server, "?_type=Patient,Medication&_type=Observation").await;
    assert_eq!(
        counts(&manifest, "output"),
        BTreeMap::from([("Observation".to_owned(), 1257), ("Patient".to_owned(), 10)])
    );
    let lines = download_kind(&server, &manifest, "output").await;
    assert_eq!(
        unique_ids("Patient", &lines["Patient"]),
        synthea_ids("Patient")
    );
    assert_eq!(
        unique_ids("Observation", &lines["Observation"]),
        synthea_ids("Observation")
    );
}

/// The `Type/id` of each line of `deleted` files, asserting each line is a transaction Bundle
/// with one `DELETE` entry.
fn deleted_urls(deleted: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    let mut urls = BTreeSet::new();
    for line in deleted.get("Bundle").into_iter().flatten() {
        let bundle = parse_line(line);
        assert_eq!(bundle["type"], "transaction", "{bundle}");
        let entries = bundle["entry"].as_array().expect("entries");
        assert_eq!(entries.len(), 1, "{bundle}");
        assert_eq!(entries[0]["request"]["method"], "DELETE", "{bundle}");
        let url = entries[0]["request"]["url"].as_str().expect("request.url");
        assert!(urls.insert(url.to_owned()), "{url} is listed twice");
    }
    urls
}

async fn delete_resource(server: &TestServer, path: &str) {
    let response = server.delete(path).await;
    assert!(
        response.status().is_success(),
        "DELETE {path}: {}",
        response.status()
    );
}

/// Reads a resource, changes it and PUTs it back.
async fn update(server: &TestServer, path: &str, change: impl FnOnce(&mut Value)) {
    let mut resource = expect_json(server.get(path).await, StatusCode::OK).await;
    change(&mut resource);
    server.upsert(&resource).await;
}

#[tokio::test]
async fn since_exports_only_what_changed_and_lists_deletions() {
    let server = spawn_server_with_synthea().await;
    // A client's next _since is the transactionTime of its last export.
    let baseline = run_export(&server, "?_type=Patient").await;
    let since = baseline["transactionTime"].as_str().unwrap().to_owned();

    let patient_id = synthea_ids("Patient").into_iter().next().unwrap();
    let mut observation_ids = synthea_ids("Observation").into_iter();
    let updated_observation = observation_ids.next().unwrap();
    let deleted_observation = observation_ids.next().unwrap();
    let mut condition_ids = synthea_ids("Condition").into_iter();
    let deleted_condition = condition_ids.next().unwrap();
    let updated_then_deleted = condition_ids.next().unwrap();

    update(&server, &format!("/Patient/{patient_id}"), |p| {
        p["gender"] = json!("other")
    })
    .await;
    update(
        &server,
        &format!("/Observation/{updated_observation}"),
        |o| o["status"] = json!("amended"),
    )
    .await;
    update(
        &server,
        &format!("/Condition/{updated_then_deleted}"),
        |c| c["clinicalStatus"]["text"] = json!("changed"),
    )
    .await;
    for path in [
        format!("/Observation/{deleted_observation}"),
        format!("/Condition/{deleted_condition}"),
        format!("/Condition/{updated_then_deleted}"),
    ] {
        delete_resource(&server, &path).await;
    }
    let created = id_of(&server.create(&patient("Newcomer")).await);

    let manifest = run_export(&server, &format!("?_since={}", enc(&since))).await;
    assert!(
        parse_instant(manifest["transactionTime"].as_str().unwrap()).unwrap()
            > parse_instant(&since).unwrap()
    );
    assert_eq!(
        counts(&manifest, "output"),
        BTreeMap::from([("Observation".to_owned(), 1), ("Patient".to_owned(), 2)]),
        "{manifest}"
    );
    let output = download_kind(&server, &manifest, "output").await;
    assert_eq!(
        unique_ids("Patient", &output["Patient"]),
        BTreeSet::from([patient_id.clone(), created])
    );
    assert_eq!(
        unique_ids("Observation", &output["Observation"]),
        BTreeSet::from([updated_observation.clone()])
    );
    for (resource_type, lines) in &output {
        assert_lines_are_reads(&server, resource_type, lines).await;
    }
    assert_eq!(
        counts(&manifest, "deleted"),
        BTreeMap::from([("Bundle".to_owned(), 3)]),
        "{manifest}"
    );
    let deleted = download_kind(&server, &manifest, "deleted").await;
    assert_eq!(
        deleted_urls(&deleted),
        BTreeSet::from([
            format!("Observation/{deleted_observation}"),
            format!("Condition/{deleted_condition}"),
            format!("Condition/{updated_then_deleted}"),
        ])
    );

    // With _type, changes and deletions of the other types stay out.
    let manifest = run_export(
        &server,
        &format!("?_since={}&_type=Observation", enc(&since)),
    )
    .await;
    let output = download_kind(&server, &manifest, "output").await;
    assert_eq!(output.keys().collect::<Vec<_>>(), ["Observation"]);
    assert_eq!(
        unique_ids("Observation", &output["Observation"]),
        BTreeSet::from([updated_observation])
    );
    let deleted = download_kind(&server, &manifest, "deleted").await;
    assert_eq!(
        deleted_urls(&deleted),
        BTreeSet::from([format!("Observation/{deleted_observation}")])
    );
}

#[tokio::test]
async fn until_exports_the_versions_current_at_that_instant() {
    let (server, ids) = spawn_server_with_patients(&["Before", "Unchanged", "DeletedLater"]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let until = format_instant(now_micros());
    tokio::time::sleep(Duration::from_millis(20)).await;
    update(&server, &format!("/Patient/{}", ids[0]), |p| {
        p["name"] = json!([{"family": "After"}])
    })
    .await;
    delete_resource(&server, &format!("/Patient/{}", ids[2])).await;
    server.create(&patient("Later")).await;

    let manifest = run_export(&server, &format!("?_until={}", enc(&until))).await;
    let output = download_kind(&server, &manifest, "output").await;
    let patients = output.get("Patient").cloned().unwrap_or_default();
    assert_eq!(
        unique_ids("Patient", &patients),
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "_until={until} should export the three patients as they were then \
         (one updated and one deleted after it); manifest: {manifest}"
    );
    let version_1 = expect_text(
        server.get(&format!("/Patient/{}/_history/1", ids[0])).await,
        StatusCode::OK,
    )
    .await;
    assert!(
        patients.contains(&version_1),
        "the export does not hold the version current at _until: {patients:?}"
    );
}

#[tokio::test]
async fn an_export_with_nothing_to_export_completes_promptly() {
    let server = spawn_server().await;
    let export = kick_off(&server, "").await;
    let manifest = poll_within(&server, &export.status_url, Duration::from_secs(10)).await;
    assert_eq!(manifest["output"], json!([]));
    assert_eq!(manifest["error"], json!([]));
}

#[tokio::test]
async fn a_type_without_resources_completes_promptly_with_no_entry() {
    let (server, _) = spawn_server_with_patients(&["Alone"]).await;
    let export = kick_off(&server, "?_type=Medication").await;
    let manifest = poll_within(&server, &export.status_url, Duration::from_secs(10)).await;
    assert_eq!(manifest["output"], json!([]), "{manifest}");
}

// ---------------------------------------------------------------------------------------------
// what the conformance suites do (digest section G)

#[tokio::test]
async fn kick_off_then_delete_at_once_is_202_then_404() {
    let server = spawn_server_with_synthea().await;
    let export = kick_off(&server, "").await;
    expect_cancelled(&server, &export).await;
    let outcome = assert_outcome(server.get(&export.status_url).await, StatusCode::NOT_FOUND).await;
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_outcome(
        server.delete(&export.status_url).await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn each_output_format_alias_kick_off_then_delete_is_202() {
    let server = spawn_server_with_synthea().await;
    for format in OUTPUT_FORMATS {
        let export = kick_off(&server, &format!("?_outputFormat={}", enc(format))).await;
        expect_cancelled(&server, &export).await;
    }
}

#[tokio::test]
async fn since_one_week_ago_kick_off_then_delete_is_202() {
    let server = spawn_server_with_synthea().await;
    let week_ago = format_instant(now_micros() - 7 * 24 * 3600 * 1_000_000);
    let export = kick_off(&server, &format!("?_since={}", enc(&week_ago))).await;
    expect_cancelled(&server, &export).await;

    // bdt: _type=<fastest> with _since=yesterday, polled at once, answers 202.
    let yesterday = format_instant(now_micros() - 24 * 3600 * 1_000_000);
    let export = kick_off(
        &server,
        &format!("?_type=Patient&_since={}", enc(&yesterday)),
    )
    .await;
    assert_in_progress(&server.get(&export.status_url).await);
    expect_cancelled(&server, &export).await;
}

#[tokio::test]
async fn thirty_kick_offs_each_followed_by_delete_are_never_throttled() {
    let server = spawn_server_with_synthea().await;
    for round in 0..30 {
        let response = kick_off_request(&server, Method::GET, "?_type=Patient")
            .send()
            .await
            .expect("answered");
        assert_ne!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "round {round} was throttled"
        );
        let export = expect_accepted(&server, response).await;
        expect_cancelled(&server, &export).await;
    }
}
