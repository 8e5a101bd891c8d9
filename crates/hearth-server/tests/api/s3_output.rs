//! Export files in S3-compatible object storage (`moto_server` on loopback): the same bytes as
//! the local default, downloads proxied with Range and gzip, presigned URLs, removal on cancel
//! and expiry, multipart uploads.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hearth_export::testing::{MIN_PART_SIZE, Moto, objects};
use hearth_server::ExportSettings;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

const PREFIX: &str = "hearth/exports";

/// A Synthea server whose export files go to `bucket` on `moto`.
async fn s3_server(
    moto: &Moto,
    bucket: &str,
    configure: impl FnOnce(&mut ServerSettings),
) -> TestServer {
    let mut settings = ServerSettings {
        output: moto.output(bucket, PREFIX),
        export: ServerOptions::default().export,
    };
    configure(&mut settings);
    let output = settings
        .output
        .build()
        .expect("the output settings are valid");
    output.check().await.expect("the test bucket answers");
    spawn_server_with_options(ServerOptions {
        synthea: true,
        export: ExportSettings {
            output,
            ..settings.export
        },
        ..ServerOptions::default()
    })
    .await
}

struct ServerSettings {
    output: hearth_export::OutputSettings,
    export: ExportSettings,
}

/// Kicks off `path` and returns the job id and the status URL.
async fn start_export(server: &TestServer, path: &str) -> (String, String) {
    let response = export_kick_off(server, path, None, false).await;
    let status_url = export_accepted(server, response).await;
    let job = status_url
        .rsplit("_jobId=")
        .next()
        .expect("a job id")
        .to_owned();
    (job, status_url)
}

/// Polls until the manifest (`200`), whatever its URLs look like.
async fn poll_manifest(server: &TestServer, status_url: &str) -> Value {
    let started = Instant::now();
    loop {
        let response = server
            .client
            .get(status_url)
            .send()
            .await
            .expect("the status request is answered");
        match response.status() {
            StatusCode::ACCEPTED => {}
            StatusCode::OK => return response.json().await.expect("a JSON manifest"),
            status => panic!(
                "{status_url} answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the export at {status_url} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A line without `meta.lastUpdated`, which differs between two servers that loaded the same
/// data at different moments.
fn comparable(line: &str) -> String {
    let mut value: Value = serde_json::from_str(line).expect("a JSON line");
    if let Some(meta) = value.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("lastUpdated");
    }
    value.to_string()
}

/// Asserts that two exports hold the same resources (without a screenful of NDJSON when not).
fn assert_same_export(
    actual: &BTreeMap<String, Vec<String>>,
    expected: &BTreeMap<String, Vec<String>>,
    what: &str,
) {
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "{what}: types"
    );
    for (resource_type, lines) in expected {
        let actual = &actual[resource_type];
        assert_eq!(actual.len(), lines.len(), "{what}: {resource_type} count");
        if let Some((a, e)) = actual.iter().zip(lines).find(|(a, e)| a != e) {
            panic!("{what}: {resource_type} differs:\n  {a}\nexpected\n  {e}");
        }
    }
}

/// Every line of one kind of file (`output`, `deleted`, `error`), by type, sorted and without
/// `meta.lastUpdated`: what an export holds, whatever files it was cut into.
async fn lines_by_type(
    server: &TestServer,
    manifest: &Value,
    kind: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in manifest[kind].as_array().expect("an array") {
        let url = item["url"].as_str().expect("a url");
        let lines = export_file_lines(server, url).await;
        assert_eq!(lines.len() as u64, item["count"].as_u64().expect("a count"));
        by_type
            .entry(item["type"].as_str().expect("a type").to_owned())
            .or_default()
            .extend(lines.iter().map(|line| comparable(line)));
    }
    for lines in by_type.values_mut() {
        lines.sort();
    }
    by_type
}

/// The export files staged locally for a job (none once its units are uploaded).
fn staged_files(server: &TestServer, job: &str) -> Vec<String> {
    let dir = server.dir.path().join("exports").join(job);
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Provenance that targets resources of the Synthea set, so a Patient export picks it by
/// target (through the key files its output units leave).
async fn add_provenance(server: &TestServer) {
    let patients = synthea_ids("Patient");
    let patient = patients.iter().next().expect("a patient");
    for (id, target) in [
        ("prov-patient", format!("Patient/{patient}")),
        ("prov-nothing", "Patient/not-exported".to_owned()),
    ] {
        server
            .upsert(&json!({
                "resourceType": "Provenance",
                "id": id,
                "target": [{"reference": target}],
                "recorded": "2020-01-01T00:00:00Z",
                "agent": [{"who": {"display": "a test"}}]
            }))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_output_holds_the_same_export_as_local_output() {
    let bucket = "same-export";
    let Some(moto) = Moto::start("s3_output_holds_the_same_export_as_local_output", bucket).await
    else {
        return;
    };
    let local = spawn_server_with_synthea().await;
    let s3 = s3_server(&moto, bucket, |_| {}).await;
    add_provenance(&local).await;
    add_provenance(&s3).await;
    let store = moto.store(bucket);
    for path in ["/$export", "/Patient/$export"] {
        let (_, local_status) = start_export(&local, path).await;
        let local_manifest = export_manifest(&local, &local_status).await;
        let (job, s3_status) = start_export(&s3, path).await;
        let s3_manifest = export_manifest(&s3, &s3_status).await;
        assert_eq!(s3_manifest["requiresAccessToken"], false);
        let expected = lines_by_type(&local, &local_manifest, "output").await;
        assert!(expected.len() > 5, "{path}: {expected:?}");
        assert_same_export(
            &lines_by_type(&s3, &s3_manifest, "output").await,
            &expected,
            path,
        );
        if path == "/Patient/$export" {
            let provenance = &expected["Provenance"];
            assert_eq!(provenance.len(), 1, "{provenance:?}");
            assert!(provenance[0].contains("prov-patient"));
        }
        // The files are in the bucket, under the prefix, and no longer on the local disk.
        let stored = objects(&store, &format!("{PREFIX}/{job}")).await;
        let ndjson = stored
            .iter()
            .filter(|o| o.location.as_ref().ends_with(".ndjson"))
            .count();
        assert_eq!(
            ndjson,
            s3_manifest["output"].as_array().map_or(0, Vec::len),
            "{path}: {stored:?}"
        );
        assert_eq!(staged_files(&s3, &job), Vec::<String>::new(), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_downloads_are_proxied_with_range_gzip_and_binary() {
    let bucket = "proxied";
    let Some(moto) = Moto::start(
        "s3_downloads_are_proxied_with_range_gzip_and_binary",
        bucket,
    )
    .await
    else {
        return;
    };
    let server = s3_server(&moto, bucket, |_| {}).await;
    let (_, status_url) = start_export(&server, "/$export?_type=Patient").await;
    let manifest = export_manifest(&server, &status_url).await;
    let url = manifest["output"][0]["url"]
        .as_str()
        .expect("a file url")
        .to_owned();
    let get = |headers: &[(&str, &str)]| {
        let mut request = server.client.get(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };

    let whole = get(&[]).await.expect("a download");
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(header(&whole, "accept-ranges"), "bytes");
    let whole = whole.bytes().await.expect("the body").to_vec();
    let len = whole.len();
    assert!(len > 1000, "{len} bytes");
    let ids: std::collections::BTreeSet<String> = whole
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice::<Value>(l).expect("a JSON line")["id"]
                .as_str()
                .expect("an id")
                .to_owned()
        })
        .collect();
    assert_eq!(ids, synthea_ids("Patient"));

    for (range, start, end) in [
        ("bytes=100-199".to_owned(), 100, 199),
        ("bytes=-50".to_owned(), len - 50, len - 1),
        (format!("bytes={}-", len - 10), len - 10, len - 1),
    ] {
        let response = get(&[("range", &range)]).await.expect("a ranged download");
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&response, "content-range"),
            format!("bytes {start}-{end}/{len}")
        );
        let body = response.bytes().await.expect("the body");
        assert_eq!(&body[..], &whole[start..=end], "{range}");
    }
    let beyond = get(&[("range", &format!("bytes={len}-"))])
        .await
        .expect("answered");
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    let gzipped = get(&[("accept-encoding", "gzip")])
        .await
        .expect("a gzip download");
    assert_eq!(header(&gzipped, "content-encoding"), "gzip");
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&gzipped.bytes().await.expect("the body")[..])
        .read_to_end(&mut unzipped)
        .expect("valid gzip");
    assert_eq!(unzipped, whole);

    let binary = get(&[("accept", FHIR_JSON)])
        .await
        .expect("a Binary download");
    let binary: Value = binary.json().await.expect("a Binary resource");
    assert_eq!(binary["resourceType"], "Binary");
    let data = base64::engine::general_purpose::STANDARD
        .decode(binary["data"].as_str().expect("data"))
        .expect("base64");
    assert_eq!(data, whole);
}

/// A query parameter of a URL.
fn query_value(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_presigned_manifests_list_urls_that_fetch_from_the_bucket() {
    let bucket = "presigned";
    let Some(moto) = Moto::start(
        "s3_presigned_manifests_list_urls_that_fetch_from_the_bucket",
        bucket,
    )
    .await
    else {
        return;
    };
    let ttl = Duration::from_secs(3600);
    let server = s3_server(&moto, bucket, |settings| {
        settings.output.presigned_urls = true;
        settings.export.ttl = ttl;
    })
    .await;
    let (_, status_url) = start_export(&server, "/$export?_type=Patient,Encounter").await;
    let manifest = poll_manifest(&server, &status_url).await;
    assert_eq!(manifest["requiresAccessToken"], false, "{manifest}");
    let outputs = manifest["output"].as_array().expect("output").clone();
    assert_eq!(outputs.len(), 2, "{manifest}");
    // Straight from the bucket, without Hearth and without a token.
    let plain = reqwest::Client::new();
    for item in &outputs {
        let url = item["url"].as_str().expect("a url");
        assert!(
            url.starts_with(&format!("{}/{bucket}/{PREFIX}/", moto.endpoint)),
            "{url}"
        );
        assert!(query_value(url, "X-Amz-Signature").is_some(), "{url}");
        let expires: u64 = query_value(url, "X-Amz-Expires")
            .and_then(|v| v.parse().ok())
            .expect("X-Amz-Expires");
        assert!(
            expires <= ttl.as_secs() && expires > ttl.as_secs() - 60,
            "{expires}"
        );
        let response = plain.get(url).send().await.expect("the bucket answers");
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let text = response.text().await.expect("the body");
        let resource_type = item["type"].as_str().expect("a type");
        let ids: std::collections::BTreeSet<String> = text
            .lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line).expect("a JSON line");
                assert_eq!(value["resourceType"], resource_type);
                value["id"].as_str().expect("an id").to_owned()
            })
            .collect();
        assert_eq!(ids, synthea_ids(resource_type));
    }
    // Each status request signs anew (SigV4 dates have whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = poll_manifest(&server, &status_url).await;
    assert_eq!(again["requiresAccessToken"], false);
    let first = outputs[0]["url"].as_str().expect("a url");
    let second = again["output"][0]["url"].as_str().expect("a url");
    assert_ne!(first, second);
    assert_eq!(
        first.split_once('?').map(|p| p.0),
        second.split_once('?').map(|p| p.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_cancel_and_expiry_remove_the_objects() {
    let bucket = "removal";
    let Some(moto) = Moto::start("s3_cancel_and_expiry_remove_the_objects", bucket).await else {
        return;
    };
    let server = s3_server(&moto, bucket, |settings| {
        settings.export.ttl = Duration::from_secs(2);
        settings.export.rows_per_unit = 50;
    })
    .await;
    let store = moto.store(bucket);

    // Expiry: the sweep removes the job's objects.
    let (expiring, status_url) = start_export(&server, "/$export?_type=Patient,Encounter").await;
    export_manifest(&server, &status_url).await;
    assert!(
        !objects(&store, &format!("{PREFIX}/{expiring}"))
            .await
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    server.sweep_exports().await;
    assert!(
        objects(&store, &format!("{PREFIX}/{expiring}"))
            .await
            .is_empty()
    );
    assert_eq!(
        server.get(&status_url).await.status(),
        StatusCode::NOT_FOUND
    );

    // DELETE of a delivered job.
    let (delivered, status_url) = start_export(&server, "/$export?_type=Patient").await;
    export_manifest(&server, &status_url).await;
    assert!(
        !objects(&store, &format!("{PREFIX}/{delivered}"))
            .await
            .is_empty()
    );
    assert_eq!(
        server.delete(&status_url).await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(
        objects(&store, &format!("{PREFIX}/{delivered}"))
            .await
            .is_empty()
    );

    // DELETE of a running job: units that upload after it are fenced and remove their objects.
    let (running, status_url) = start_export(&server, "/$export").await;
    assert_eq!(
        server.delete(&status_url).await.status(),
        StatusCode::ACCEPTED
    );
    let started = Instant::now();
    loop {
        let left = objects(&store, &format!("{PREFIX}/{running}")).await;
        if left.is_empty() && started.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "objects of a cancelled job are left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Units still running at the cancel have finished by now, and left nothing either.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = objects(&store, &format!("{PREFIX}/{running}")).await;
    assert!(
        left.is_empty(),
        "objects of a cancelled job are left: {left:?}"
    );
    assert_eq!(staged_files(&server, &running), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_files_larger_than_a_part_upload_in_parts() {
    let bucket = "multipart";
    let Some(moto) = Moto::start("s3_files_larger_than_a_part_upload_in_parts", bucket).await
    else {
        return;
    };
    let part_size = 4 * MIN_PART_SIZE;
    let server = s3_server(&moto, bucket, |settings| {
        settings.output.part_size = part_size;
    })
    .await;
    let local = spawn_server_with_synthea().await;
    let (job, status_url) = start_export(&server, "/$export?_type=Observation").await;
    let manifest = export_manifest(&server, &status_url).await;
    let (_, local_status) = start_export(&local, "/$export?_type=Observation").await;
    let local_manifest = export_manifest(&local, &local_status).await;

    let stored = objects(&moto.store(bucket), &format!("{PREFIX}/{job}")).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let object = &stored[0];
    let parts = (object.size as usize).div_ceil(part_size);
    assert!(parts >= 3, "{} bytes is only {parts} parts", object.size);
    // S3 (and moto) give multipart objects an ETag of `<digest>-<number of parts>`.
    let e_tag = object.e_tag.as_deref().unwrap_or_default();
    assert!(
        e_tag.trim_matches('"').ends_with(&format!("-{parts}")),
        "{e_tag}"
    );
    assert_same_export(
        &lines_by_type(&server, &manifest, "output").await,
        &lines_by_type(&local, &local_manifest, "output").await,
        "Observation",
    );
}

/// A cancel must not wait for a large file's upload: told to stop, an upload ends at its next
/// chunk with `Stopped` and aborts its multipart upload, so the bucket keeps neither the object
/// nor its parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_an_upload_told_to_stop_leaves_nothing_behind() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let bucket = "stopped";
    let test = "s3_an_upload_told_to_stop_leaves_nothing_behind";
    let Some(moto) = Moto::start(test, bucket).await else {
        return;
    };
    let mut settings = moto.output(bucket, PREFIX);
    settings.part_size = MIN_PART_SIZE;
    let hearth_export::Output::Object(object) = settings.build().expect("valid settings") else {
        panic!("object storage output");
    };
    let dir = tempfile::tempdir().expect("temp dir");
    // About 1,000 parts of 16 KiB: moto takes seconds for them; the flag comes after 200 ms.
    let line = format!(
        "{{\"resourceType\":\"Basic\",\"id\":\"{}\"}}\n",
        "x".repeat(1000)
    );
    std::fs::write(dir.path().join("big.ndjson"), line.repeat(16 * 1024)).expect("a file");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        flag.store(true, Ordering::Relaxed);
    });
    let started = Instant::now();
    let uploaded = object
        .upload_files(dir.path(), "job", &["big.ndjson".to_owned()], &stop)
        .await;
    stopper.await.expect("the stopper");
    assert!(
        matches!(uploaded, Err(hearth_export::OutputError::Stopped)),
        "{uploaded:?} after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the upload took {:?} to stop",
        started.elapsed()
    );
    let left = objects(&moto.store(bucket), PREFIX).await;
    assert!(left.is_empty(), "{left:?}");
    // ListMultipartUploads: an upload begun and never completed or aborted is listed.
    let uploads = reqwest::get(format!("{}/{bucket}?uploads", moto.endpoint))
        .await
        .expect("moto answers")
        .text()
        .await
        .expect("a listing");
    assert!(!uploads.contains("<UploadId>"), "{uploads}");
    assert!(
        dir.path().join("big.ndjson").exists(),
        "the staged file is the caller's to remove"
    );
}
