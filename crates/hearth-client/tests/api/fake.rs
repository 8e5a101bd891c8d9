//! Against small fake servers, for what Hearth does not do on demand and for exact wire forms:
//! `429` and `5xx` answers, the Parameters body of a Group kick-off with `patient`,
//! `_typeFilter` and `_elements`, a server that takes only POST, a failed job, a short file,
//! a file the manifest lists but the server does not have.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use hearth_client::export;
use hearth_client::testing::{FakeExport, FakeFile, ndjson, outcome, patients, with_header};
use hearth_client::{BulkClient, Error, ExportJob, ExportRequest, Level, Silent};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::*;

/// A request as the fake server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn record(&self, method: &str, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> usize {
        let mut seen = self.0.lock().unwrap();
        seen.push(Seen {
            method: method.to_owned(),
            uri: uri.clone(),
            headers: headers.clone(),
            body: body.clone(),
            at: Instant::now(),
        });
        // How many requests for this path so far, this one included.
        seen.iter().filter(|s| s.uri.path() == uri.path()).count()
    }

    fn to(&self, path: &str) -> Vec<Seen> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri.path() == path)
            .cloned()
            .collect()
    }
}

fn job(out: &std::path::Path, request: ExportRequest) -> ExportJob {
    ExportJob {
        request,
        out_dir: out.to_owned(),
        incremental: false,
        resume: None,
        release: false,
    }
}

/// Every step answers `429` (or `503`) first: kick-off, status, file.
#[tokio::test]
async fn a_server_that_answers_429_then_200_is_waited_for() {
    let log = Log::default();
    let origin: Arc<Mutex<String>> = Arc::default();
    let router = {
        let (log1, log2, log3, origin2, origin3) = (
            log.clone(),
            log.clone(),
            log.clone(),
            origin.clone(),
            origin.clone(),
        );
        Router::new()
            .route(
                "/fhir/$export",
                get(move |uri: Uri, headers: HeaderMap| async move {
                    let n = log1.record("GET", &uri, &headers, &Bytes::new());
                    if n == 1 {
                        let busy = outcome(
                            StatusCode::TOO_MANY_REQUESTS,
                            "throttled",
                            "one export at a time",
                        );
                        return with_header(busy, "retry-after", "1");
                    }
                    let location = format!(
                        "{}/fhir/$export-poll-status?_jobId=j1",
                        origin2.lock().unwrap()
                    );
                    with_header(StatusCode::ACCEPTED.into_response(), "content-location", &location)
                }),
            )
            .route(
                "/fhir/$export-poll-status",
                get(move |uri: Uri, headers: HeaderMap| async move {
                    let n = log2.record("GET", &uri, &headers, &Bytes::new());
                    let origin = origin3.lock().unwrap().clone();
                    match n {
                        1 => {
                            let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
                            with_header(
                                StatusCode::TOO_MANY_REQUESTS.into_response(),
                                "retry-after",
                                &at,
                            )
                        }
                        2 => (StatusCode::SERVICE_UNAVAILABLE, "<html>down for a moment</html>")
                            .into_response(),
                        3 => with_header(
                            StatusCode::ACCEPTED.into_response(),
                            "x-progress",
                            "50% done",
                        ),
                        _ => {
                            let manifest = json!({
                                "transactionTime": "2024-05-01T10:00:00Z",
                                "request": format!("{origin}/fhir/$export"),
                                "requiresAccessToken": false,
                                "output": [{"type": "Patient", "url": format!("{origin}/fhir/files/patients"), "count": 3}],
                                "deleted": [{"type": "Bundle", "url": format!("{origin}/fhir/files/deleted")}],
                                "error": [{"type": "OperationOutcome", "url": format!("{origin}/fhir/files/errors")}]
                            });
                            (
                                StatusCode::OK,
                                [("content-type", "application/json")],
                                manifest.to_string(),
                            )
                                .into_response()
                        }
                    }
                }),
            )
            .route(
                "/fhir/files/{name}",
                get(move |uri: Uri, headers: HeaderMap| async move {
                    let n = log3.record("GET", &uri, &headers, &Bytes::new());
                    match uri.path() {
                        "/fhir/files/patients" if n == 1 => with_header(
                            StatusCode::TOO_MANY_REQUESTS.into_response(),
                            "retry-after",
                            "1",
                        ),
                        "/fhir/files/patients" => ndjson(patients(3)),
                        "/fhir/files/deleted" => ndjson(
                            "{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[{\"request\":{\"method\":\"DELETE\",\"url\":\"Patient/z\"}}]}\n",
                        ),
                        _ => ndjson(
                            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"warning\",\"code\":\"informational\"}]}\n",
                        ),
                    }
                }),
            )
    };
    let base_origin = serve_fake(router).await;
    *origin.lock().unwrap() = base_origin.clone();
    let out = TempDir::new().unwrap();
    let client = BulkClient::new(&format!("{base_origin}/fhir"), fast_options()).unwrap();
    let recorder = Recorder::new();

    let summary = bounded(export::run(
        &client,
        &job(out.path(), ExportRequest::new(Level::System)),
        recorder.clone(),
    ))
    .await
    .expect("the export succeeds after the refusals");

    // Each Retry-After was honoured: about a second between the refusal and the next try.
    let kick_offs = log.to("/fhir/$export");
    assert_eq!(kick_offs.len(), 2);
    assert!(kick_offs[1].at - kick_offs[0].at >= Duration::from_millis(900));
    let polls = log.to("/fhir/$export-poll-status");
    assert_eq!(polls.len(), 4);
    assert!(
        polls[1].at - polls[0].at >= Duration::from_millis(900),
        "HTTP-date Retry-After"
    );
    assert!(
        polls[2].at - polls[1].at >= Duration::from_millis(90),
        "backoff after the 503"
    );
    for poll in &polls {
        assert_eq!(poll.headers["accept"], "application/json");
    }
    let files = log.to("/fhir/files/patients");
    assert_eq!(files.len(), 2);
    assert!(files[1].at - files[0].at >= Duration::from_millis(900));
    assert_eq!(files[0].headers["accept-encoding"], "gzip");

    let events = recorder.events();
    let retries = events
        .iter()
        .filter(|e| matches!(e, Event::Retrying(_)))
        .count();
    assert_eq!(retries, 4, "{events:?}");
    assert!(events.contains(&Event::Polled(Some("50% done".into()))));

    // output, deleted and error files are all saved.
    assert_eq!(summary.resources, 3);
    assert_eq!(lines(&out.path().join("Patient.1.ndjson")).len(), 3);
    assert_eq!(lines(&out.path().join("deleted/Bundle.1.ndjson")).len(), 1);
    assert_eq!(
        lines(&out.path().join("error/OperationOutcome.1.ndjson")).len(),
        1
    );
}

/// Patient and Group kick-offs with `patient`, `_typeFilter` and `_elements`: POST with a
/// `Parameters` body when `patient` is there, GET with a query otherwise, and POST again when
/// a server refuses GET.
#[tokio::test]
async fn kick_off_parameters_travel_as_the_ig_says() {
    let log = Log::default();
    let router = {
        let (log1, log2) = (log.clone(), log.clone());
        Router::new()
            .route(
                "/fhir/Group/{id}/$export",
                axum::routing::post(
                    move |uri: Uri, headers: HeaderMap, body: Bytes| async move {
                        log1.record("POST", &uri, &headers, &body);
                        outcome(
                            StatusCode::BAD_REQUEST,
                            "invalid",
                            "patient Patient/p2 is not a member of Group g1",
                        )
                    },
                ),
            )
            .route(
                "/fhir/Patient/$export",
                get({
                    let log = log2.clone();
                    move |uri: Uri, headers: HeaderMap| async move {
                        log.record("GET", &uri, &headers, &Bytes::new());
                        outcome(StatusCode::METHOD_NOT_ALLOWED, "not-supported", "use POST")
                    }
                })
                .post(
                    move |uri: Uri, headers: HeaderMap, body: Bytes| async move {
                        log2.record("POST", &uri, &headers, &body);
                        with_header(
                            StatusCode::ACCEPTED.into_response(),
                            "content-location",
                            "/fhir/jobs/7",
                        )
                    },
                ),
            )
    };
    let origin = serve_fake(router).await;
    let client = BulkClient::new(&format!("{origin}/fhir/"), fast_options()).unwrap();

    let mut request = ExportRequest::new(Level::Group("g1".into()));
    request.types = vec!["Patient".into(), "Observation".into()];
    request.since = Some("2024-01-01T00:00:00Z".into());
    request.type_filters = vec!["Observation?code=a,b".into(), "Patient?active=true".into()];
    request.elements = vec!["id".into(), "Patient.name".into()];
    request.patients = vec!["p1".into(), "Patient/p2".into()];
    request.output_format = Some("application/fhir+ndjson".into());

    let error = bounded(client.kick_off(&request, &Silent))
        .await
        .expect_err("the fake refuses");
    match &error {
        Error::KickOffRefused {
            status: 400,
            message,
        } => {
            assert!(message.contains("not a member of Group g1"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let expected_body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
        {"name": "_since", "valueInstant": "2024-01-01T00:00:00Z"},
        {"name": "_type", "valueString": "Patient"},
        {"name": "_type", "valueString": "Observation"},
        {"name": "_elements", "valueString": "id"},
        {"name": "_elements", "valueString": "Patient.name"},
        {"name": "_typeFilter", "valueString": "Observation?code=a,b"},
        {"name": "_typeFilter", "valueString": "Patient?active=true"},
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        {"name": "patient", "valueReference": {"reference": "Patient/p2"}},
    ]});
    let group = log.to("/fhir/Group/g1/$export");
    assert_eq!(group.len(), 1);
    assert_eq!(group[0].method, "POST");
    assert_eq!(group[0].headers["accept"], "application/fhir+json");
    assert_eq!(group[0].headers["prefer"], "respond-async");
    assert_eq!(group[0].headers["content-type"], "application/fhir+json");
    assert_eq!(
        serde_json::from_slice::<Value>(&group[0].body).unwrap(),
        expected_body
    );

    // Without patient: GET with the parameters in the query; on 405, the same as POST.
    request.level = Level::Patient;
    request.patients.clear();
    let status_url = bounded(client.kick_off(&request, &Silent))
        .await
        .expect("the POST is accepted");
    assert_eq!(status_url.as_str(), format!("{origin}/fhir/jobs/7"));
    let patient = log.to("/fhir/Patient/$export");
    assert_eq!(patient.len(), 2);
    assert_eq!(patient[0].method, "GET");
    let query: Vec<(String, String)> =
        form_urlencoded::parse(patient[0].uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let pair = |name: &str, value: &str| (name.to_owned(), value.to_owned());
    assert_eq!(
        query,
        vec![
            pair("_outputFormat", "application/fhir+ndjson"),
            pair("_since", "2024-01-01T00:00:00Z"),
            pair("_type", "Patient,Observation"),
            pair("_elements", "id,Patient.name"),
            pair("_typeFilter", "Observation?code=a,b"),
            pair("_typeFilter", "Patient?active=true"),
        ]
    );
    assert_eq!(patient[1].method, "POST");
    let posted: Value = serde_json::from_slice(&patient[1].body).unwrap();
    let names: Vec<&str> = posted["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "_outputFormat",
            "_since",
            "_type",
            "_type",
            "_elements",
            "_elements",
            "_typeFilter",
            "_typeFilter"
        ]
    );
}

/// A failed job and a short file end the run with the reason; no file is left half-written.
#[tokio::test]
async fn a_failed_job_and_a_short_file_are_errors_with_reasons() {
    let count = Arc::new(Mutex::new(0u32));
    let origin: Arc<Mutex<String>> = Arc::default();
    let router = {
        let origin2 = origin.clone();
        Router::new()
            .route(
                "/fhir/$export",
                get(|| async {
                    with_header(
                        StatusCode::ACCEPTED.into_response(),
                        "content-location",
                        "/fhir/status/1",
                    )
                }),
            )
            .route(
                "/fhir/status/{job}",
                get(move |uri: Uri| async move {
                    let origin = origin2.lock().unwrap().clone();
                    let mut count = count.lock().unwrap();
                    *count += 1;
                    if *count == 1 {
                        return outcome(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "exception",
                            "the export ran out of disk",
                        );
                    }
                    let _ = uri;
                    let manifest = json!({
                        "transactionTime": "2024-05-01T10:00:00Z",
                        "requiresAccessToken": false,
                        "output": [{"type": "Patient", "url": format!("{origin}/fhir/files/p"), "count": 5}],
                        "error": []
                    });
                    (StatusCode::OK, manifest.to_string()).into_response()
                }),
            )
            .route("/fhir/files/p", get(|| async { ndjson(patients(3)) }))
    };
    let base_origin = serve_fake(router).await;
    *origin.lock().unwrap() = base_origin.clone();
    let client = BulkClient::new(&format!("{base_origin}/fhir"), fast_options()).unwrap();
    let out = TempDir::new().unwrap();
    let system = job(out.path(), ExportRequest::new(Level::System));
    let run = || export::run(&client, &system, Recorder::new());

    let failed = bounded(run()).await.expect_err("the job failed");
    match &failed {
        Error::JobFailed {
            status: 500,
            message,
        } => {
            assert_eq!(message, "the export ran out of disk")
        }
        other => panic!("{other:?}"),
    }

    let short = bounded(run()).await.expect_err("the file is short");
    match &short {
        Error::CountMismatch {
            expected: 5,
            actual: 3,
            path,
        } => assert!(path.ends_with("Patient.1.ndjson")),
        other => panic!("{other:?}"),
    }
    assert!(!out.path().join("Patient.1.ndjson").exists());
    assert!(leftover_parts(out.path()).is_empty());
    assert!(!out.path().join("manifest.json").exists());
}

/// A manifest file whose URL answers `404`: the run fails naming that URL, and nothing is
/// saved under the missing file's name, half-written, or as a manifest that would claim the
/// export is complete.
#[tokio::test]
async fn a_listed_file_that_answers_404_fails_the_export_naming_its_url() {
    let fake = FakeExport {
        files: vec![
            FakeFile::output("Patient", patients(3)),
            FakeFile::missing("Observation"),
        ],
        ..FakeExport::default()
    }
    .start()
    .await;
    let client = BulkClient::new(&fake.base, fast_options()).unwrap();
    let out = TempDir::new().unwrap();

    let error = bounded(export::run(
        &client,
        &job(out.path(), ExportRequest::new(Level::System)),
        Recorder::new(),
    ))
    .await
    .expect_err("a listed file is missing");

    let missing = fake.file_url(1);
    match &error {
        Error::Download {
            url,
            status: Some(404),
            ..
        } => assert_eq!(url, &missing),
        other => panic!("{other:?}"),
    }
    let reason = error.to_string();
    assert!(reason.contains(&missing), "{reason}");
    assert!(!reason.contains('\n'), "{reason}");
    assert!(!out.path().join("Observation.1.ndjson").exists());
    assert!(leftover_parts(out.path()).is_empty());
    assert!(!out.path().join("manifest.json").exists());
}
