//! `allowPartialManifests` (Bulk Data STU3): while a job runs, its status URL may answer `202`
//! with a manifest of files already downloadable, and manifests come in pages linked by `next`.
//! What a client sees: pages that never change once shown, files that download while the job
//! runs, and pages that together hold exactly the export the same request makes without them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hearth_export::testing::Moto;
use hearth_server::ExportSettings;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

/// Types with enough resources for dozens of units at two rows a unit.
const TYPES: &str = "Patient,Encounter,Condition,Procedure";
const DEADLINE: Duration = Duration::from_secs(120);
/// Short, so a test sees pages while the job still runs.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A Synthea server whose exports have many small units, so jobs have many manifest pages.
async fn spawn_paging_server() -> TestServer {
    spawn_server_with_options(ServerOptions {
        synthea: true,
        export: ExportSettings {
            workers: 1,
            rows_per_unit: 2,
            ..ExportSettings::default()
        },
        ..ServerOptions::default()
    })
    .await
}

/// What one status request answered.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    expires: Option<String>,
    progress: Option<String>,
    /// The manifest, when the answer had a body.
    manifest: Option<Value>,
}

async fn status(server: &TestServer, url: &str) -> Answer {
    answer(
        server
            .client
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .expect("the status request is answered"),
    )
    .await
}

async fn answer(response: Response) -> Answer {
    let text_header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("a text header").to_owned())
    };
    let (content_type, expires, progress) = (
        text_header("content-type"),
        text_header("expires"),
        text_header("x-progress"),
    );
    let status = response.status();
    let text = response.text().await.expect("a readable body");
    assert!(
        status == StatusCode::OK || status == StatusCode::ACCEPTED,
        "a status request answered {status}: {text}"
    );
    let manifest = (!text.is_empty()).then(|| {
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the manifest is not JSON ({e}): {text}"))
    });
    Answer {
        status,
        content_type,
        expires,
        progress,
        manifest,
    }
}

/// Polls `url` until it answers a manifest (`202` partial or `200` complete).
async fn poll_page(server: &TestServer, url: &str) -> Answer {
    let started = Instant::now();
    loop {
        let answer = status(server, url).await;
        if answer.manifest.is_some() || answer.status == StatusCode::OK {
            return answer;
        }
        assert!(answer.progress.is_some(), "an empty 202 without X-Progress");
        assert!(
            started.elapsed() < DEADLINE,
            "{url} answered no manifest within {DEADLINE:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts what every manifest answer has, and returns the manifest.
fn checked_manifest(server: &TestServer, answer: &Answer, request_url: &str) -> Value {
    let manifest = answer.manifest.clone().expect("a manifest");
    assert_eq!(
        answer
            .content_type
            .as_deref()
            .and_then(|t| t.split(';').next()),
        Some("application/json"),
        "{manifest}"
    );
    if answer.status == StatusCode::OK {
        assert!(answer.expires.is_some(), "a 200 manifest without Expires");
    }
    assert!(manifest["transactionTime"].is_string(), "{manifest}");
    assert_eq!(manifest["request"], request_url, "{manifest}");
    assert_eq!(manifest["requiresAccessToken"], false, "{manifest}");
    for kind in ["output", "deleted", "error"] {
        for item in manifest[kind]
            .as_array()
            .unwrap_or_else(|| panic!("'{kind}' is not an array in {manifest}"))
        {
            let url = item["url"].as_str().expect("an item has a url");
            assert!(
                url.starts_with(&format!("{}/Binary/", server.base)),
                "{url}"
            );
            assert!(item["count"].as_u64().is_some_and(|c| c > 0), "{item}");
        }
    }
    if let Some(links) = manifest.get("link") {
        let links = links.as_array().expect("link is an array");
        assert_eq!(links.len(), 1, "{manifest}");
        assert_eq!(links[0]["relation"], "next", "{manifest}");
    }
    manifest
}

/// What a page lists: its file items, without `link`.
fn listed(manifest: &Value) -> Value {
    json!({
        "transactionTime": manifest["transactionTime"],
        "output": manifest["output"],
        "deleted": manifest["deleted"],
        "error": manifest["error"],
    })
}

/// Downloads every item of `kind`, checking each file's line count against the item's count.
/// Returns the lines per type, sorted.
async fn lines_of(
    server: &TestServer,
    manifests: &[Value],
    kind: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for manifest in manifests {
        for item in manifest[kind].as_array().expect("an array") {
            let url = item["url"].as_str().expect("a url");
            let lines = export_file_lines(server, url).await;
            assert_eq!(
                lines.len() as u64,
                item["count"].as_u64().expect("a count"),
                "{url}"
            );
            by_type
                .entry(item["type"].as_str().expect("a type").to_owned())
                .or_default()
                .extend(lines);
        }
    }
    for lines in by_type.values_mut() {
        lines.sort();
    }
    by_type
}

/// Kicks off `query` (GET `/$export`, strict) and returns the status URL and the request URL.
async fn kick_off(server: &TestServer, query: &str) -> (String, String) {
    let response = export_kick_off(server, &format!("/$export{query}"), None, false).await;
    let request_url = response.url().to_string();
    (export_accepted(server, response).await, request_url)
}

/// Follows a job's pages from its status URL to the last, returning each page's URL and
/// manifest as first shown, and whether any page was shown while the job ran. Every page is
/// fetched twice: once shown, it must not change.
async fn walk_pages(
    server: &TestServer,
    status_url: &str,
    request_url: &str,
) -> (Vec<(String, Value)>, bool) {
    let mut pages = Vec::new();
    let mut saw_partial = false;
    let mut url = status_url.to_owned();
    loop {
        let shown = poll_page(server, &url).await;
        let manifest = checked_manifest(server, &shown, request_url);
        if shown.status == StatusCode::ACCEPTED {
            saw_partial = true;
            assert!(
                link(&manifest, "next").is_some(),
                "a partial manifest is never the last page: {manifest}"
            );
            // Listed while the job runs: downloadable now.
            lines_of(server, std::slice::from_ref(&manifest), "output").await;
            lines_of(server, std::slice::from_ref(&manifest), "deleted").await;
        }
        let again = status(server, &url).await;
        let again = checked_manifest(server, &again, request_url);
        assert_eq!(listed(&again), listed(&manifest), "{url} changed");
        assert_eq!(link(&again, "next"), link(&manifest, "next"), "{url}");
        let next = link(&manifest, "next");
        if let Some(next) = &next {
            assert!(
                next.starts_with(&format!("{status_url}&_page=")),
                "the next link {next}"
            );
        }
        pages.push((url, manifest));
        match next {
            Some(next) => url = next,
            None => {
                assert_eq!(shown.status, StatusCode::OK, "the last page is complete");
                return (pages, saw_partial);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_manifests_page_through_exactly_the_files_of_the_same_export() {
    let server = spawn_paging_server().await;
    let (status_url, request_url) = kick_off(
        &server,
        &format!("?_type={TYPES}&allowPartialManifests=true"),
    )
    .await;
    let first = status(&server, &status_url).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "the first poll is 202");
    assert!(first.manifest.is_none(), "the first poll has no manifest");

    let (pages, saw_partial) = walk_pages(&server, &status_url, &request_url).await;
    assert!(
        saw_partial,
        "no page was shown while the job ran ({} pages)",
        pages.len()
    );
    assert!(pages.len() > 2, "{} pages", pages.len());

    // Complete now: every page answers 200 with what it listed before, plus Expires.
    for (url, manifest) in &pages {
        let answer = status(&server, url).await;
        assert_eq!(answer.status, StatusCode::OK, "{url}");
        let now = checked_manifest(&server, &answer, &request_url);
        assert_eq!(listed(&now), listed(manifest), "{url} changed");
        assert_eq!(link(&now, "next"), link(manifest, "next"), "{url}");
        assert_eq!(now["error"], json!([]), "{url}");
    }

    // No file is listed twice, and together the pages hold the export made without them.
    let manifests: Vec<Value> = pages.into_iter().map(|(_, m)| m).collect();
    let urls: Vec<&str> = manifests
        .iter()
        .flat_map(|m| m["output"].as_array().expect("output").iter())
        .map(|item| item["url"].as_str().expect("a url"))
        .collect();
    assert_eq!(
        urls.len(),
        urls.iter().collect::<BTreeSet<_>>().len(),
        "a file is listed on two pages"
    );
    let paged = lines_of(&server, &manifests, "output").await;
    let (whole_url, _) = kick_off(&server, &format!("?_type={TYPES}")).await;
    let whole = export_manifest(&server, &whole_url).await;
    assert!(whole.get("link").is_none(), "{whole}");
    let expected = lines_of(&server, std::slice::from_ref(&whole), "output").await;
    assert_eq!(
        paged.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (resource_type, lines) in &expected {
        assert_eq!(paged[resource_type].len(), lines.len(), "{resource_type}");
        assert!(paged[resource_type] == *lines, "{resource_type} differs");
        assert_eq!(
            lines.len(),
            synthea_ids(resource_type).len(),
            "{resource_type}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_files_of_a_paged_job_are_on_its_last_page() {
    let server = spawn_paging_server().await;
    let response = export_kick_off(
        &server,
        "/$export?_type=Patient,Condition&allowPartialManifests=true&unknownThing=1",
        None,
        true,
    )
    .await;
    let request_url = response.url().to_string();
    let status_url = export_accepted(&server, response).await;
    let (pages, _) = walk_pages(&server, &status_url, &request_url).await;
    assert!(pages.len() > 1, "{} pages", pages.len());
    let (last, others) = pages.split_last().expect("pages");
    for (url, manifest) in others {
        assert_eq!(manifest["error"], json!([]), "{url}");
    }
    let errors = lines_of(&server, std::slice::from_ref(&last.1), "error").await;
    assert_eq!(errors["OperationOutcome"].len(), 1, "{}", last.1);
    assert!(errors["OperationOutcome"][0].contains("unknownThing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_kick_off_takes_allow_partial_manifests_as_a_boolean() {
    let server = spawn_paging_server().await;
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Condition"},
        {"name": "allowPartialManifests", "valueBoolean": true},
    ]});
    let response = export_kick_off(&server, "/$export", Some(&body), false).await;
    let status_url = export_accepted(&server, response).await;
    let (pages, _) = walk_pages(&server, &status_url, &format!("{}/$export", server.base)).await;
    assert!(pages.len() > 1, "{} pages", pages.len());

    // `false` is the default: one manifest, as without the parameter.
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Condition"},
        {"name": "allowPartialManifests", "valueBoolean": false},
    ]});
    let response = export_kick_off(&server, "/$export", Some(&body), false).await;
    let status_url = export_accepted(&server, response).await;
    let manifest = export_manifest(&server, &status_url).await;
    assert!(manifest.get("link").is_none(), "{manifest}");
    let outcome = assert_outcome(
        server
            .client
            .get(format!("{status_url}&_page=2"))
            .send()
            .await
            .expect("answered"),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(outcome_text(&outcome).contains("page 2"), "{outcome}");
}

#[tokio::test]
async fn a_value_other_than_true_or_false_is_refused_by_name_or_ignored_when_lenient() {
    let server = spawn_server().await;
    server.create(&patient("Partial")).await;
    for value in ["yes", "1", "TRUE", ""] {
        let response = export_kick_off(
            &server,
            &format!("/$export?allowPartialManifests={}", enc(value)),
            None,
            false,
        )
        .await;
        let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            outcome["issue"][0]["expression"][0], "allowPartialManifests",
            "{outcome}"
        );
    }
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "allowPartialManifests", "valueString": "maybe"},
    ]});
    let response = export_kick_off(&server, "/$export", Some(&body), false).await;
    assert_outcome(response, StatusCode::BAD_REQUEST).await;

    // Lenient: ignored (no pages) and reported in the error files.
    let response = export_kick_off(
        &server,
        "/$export?_type=Patient&allowPartialManifests=maybe",
        None,
        true,
    )
    .await;
    let status_url = export_accepted(&server, response).await;
    let manifest = export_manifest(&server, &status_url).await;
    assert!(manifest.get("link").is_none(), "{manifest}");
    let errors = lines_of(&server, std::slice::from_ref(&manifest), "error").await;
    assert!(
        errors["OperationOutcome"]
            .iter()
            .any(|line| line.contains("allowPartialManifests")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn page_numbers_are_checked_and_delete_ignores_them() {
    let server = spawn_server().await;
    server.create(&patient("Pages")).await;
    let (status_url, _) = kick_off(&server, "?allowPartialManifests=true").await;
    let manifest = export_manifest(&server, &status_url).await;
    assert!(manifest.get("link").is_none(), "one page: {manifest}");
    let get = |url: String| {
        let server = &server;
        async move { server.client.get(url).send().await.expect("answered") }
    };
    assert_eq!(
        get(format!("{status_url}&_page=1")).await.status(),
        StatusCode::OK
    );
    for bad in ["0", "-1", "two", "1.5", ""] {
        let outcome = assert_outcome(
            get(format!("{status_url}&_page={}", enc(bad))).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(outcome["issue"][0]["expression"][0], "_page", "{outcome}");
    }
    let outcome = assert_outcome(
        get(format!("{status_url}&_page=2")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert!(outcome_text(&outcome).contains("page 2"), "{outcome}");

    // A DELETE addresses the job, whatever page.
    let response = server
        .client
        .request(Method::DELETE, format!("{status_url}&_page=nonsense"))
        .send()
        .await
        .expect("answered");
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "already shown: finished"
    );
    assert_outcome(get(status_url.clone()).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_shown_only_partial_manifests_is_not_finished_and_can_be_cancelled() {
    let server = spawn_paging_server().await;
    let (status_url, _) = kick_off(
        &server,
        &format!("?_type={TYPES}&allowPartialManifests=true"),
    )
    .await;
    status(&server, &status_url).await;
    let shown = poll_page(&server, &status_url).await;
    assert_eq!(
        shown.status,
        StatusCode::ACCEPTED,
        "the first page was complete before it was shown partial"
    );
    let response = server.delete(&status_url).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_outcome(
        server
            .client
            .get(&status_url)
            .send()
            .await
            .expect("answered"),
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_of_partial_pages_fetch_from_the_bucket() {
    let bucket = "partial";
    let Some(moto) = Moto::start(
        "presigned_urls_of_partial_pages_fetch_from_the_bucket",
        bucket,
    )
    .await
    else {
        return;
    };
    let mut settings = moto.output(bucket, "hearth/exports");
    settings.presigned_urls = true;
    let output = settings.build().expect("valid output settings");
    let server = spawn_server_with_options(ServerOptions {
        synthea: true,
        export: ExportSettings {
            workers: 1,
            rows_per_unit: 20,
            output,
            ..ExportSettings::default()
        },
        ..ServerOptions::default()
    })
    .await;
    let (status_url, _) = kick_off(
        &server,
        "?_type=Patient,Condition&allowPartialManifests=true",
    )
    .await;
    let plain = reqwest::Client::new();
    let mut url = status_url.clone();
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    loop {
        let answer = poll_page(&server, &url).await;
        let manifest = answer.manifest.expect("a manifest");
        assert_eq!(manifest["requiresAccessToken"], false, "{manifest}");
        for item in manifest["output"].as_array().expect("output") {
            let file = item["url"].as_str().expect("a url");
            assert!(
                file.starts_with(&format!("{}/{bucket}/", moto.endpoint)),
                "{file}"
            );
            assert!(file.contains("X-Amz-Signature="), "{file}");
            let text = plain
                .get(file)
                .send()
                .await
                .expect("the bucket answers")
                .text()
                .await
                .expect("a body");
            let resource_type = item["type"].as_str().expect("a type").to_owned();
            for line in text.lines() {
                let value: Value = serde_json::from_str(line).expect("a JSON line");
                ids.entry(resource_type.clone())
                    .or_default()
                    .insert(value["id"].as_str().expect("an id").to_owned());
            }
        }
        match link(&manifest, "next") {
            Some(next) => url = next,
            None => break,
        }
    }
    for resource_type in ["Patient", "Condition"] {
        assert_eq!(ids[resource_type], synthea_ids(resource_type));
    }
}
