//! Enforcement with `--auth smart`: tokens on every interaction, exports limited to the
//! token's types, jobs and files owned by their client, downloads checked against the current
//! token, REST read and search by scope, no writes.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn every_interaction_needs_a_valid_token() {
    let server = spawn_smart().await;
    let (_, token) = server.client_with_token("c", "system/*.rs").await;
    let status_url = server.start_export("", &token).await;

    let protected = [
        "/$export".to_owned(),
        status_url.clone(),
        "/Patient/p1".to_owned(),
        "/Patient".to_owned(),
        "/Patient/p1/_history".to_owned(),
        "/Binary/anything".to_owned(),
        "/OperationDefinition/export".to_owned(),
    ];
    for path in &protected {
        // No token.
        let outcome = assert_unauthorized(server.get(path, None).await).await;
        assert_eq!(outcome["issue"][0]["code"], "login");
        // Garbage, a foreign token, the wrong scheme.
        for authorization in [
            "Bearer invalidToken".to_owned(),
            "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJjIn0.".to_owned(),
            format!("Basic {token}"),
            "Bearer".to_owned(),
        ] {
            let response = server
                .client
                .get(server.url(path))
                .header("authorization", authorization)
                .send()
                .await
                .unwrap();
            assert_unauthorized(response).await;
        }
    }
    // Kick-off, cancel and POST polls too.
    let response = server
        .client
        .post(server.url("/$export"))
        .header("accept", FHIR_JSON)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_unauthorized(response).await;
    assert_unauthorized(server.delete(&status_url, None).await).await;

    // The challenge says why a token was refused.
    let response = server.get("/Patient/p1", Some("invalidToken")).await;
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );

    // metadata and discovery stay open.
    assert_eq!(server.get("/metadata", None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let mut options = Options::default();
    options.auth.token_lifetime = std::time::Duration::from_secs(1);
    let server = spawn(options).await;
    let (_, token) = server.client_with_token("c", "system/*.rs").await;
    assert_eq!(
        server.get("/Patient/p1", Some(&token)).await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let response = server.get("/Patient/p1", Some(&token)).await;
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.contains("expired"), "{challenge}");
    assert_unauthorized(response).await;
}

#[tokio::test]
async fn manifests_require_access_tokens_and_files_need_one() {
    let server = spawn_smart().await;
    let (_, token) = server.client_with_token("c", "system/*.rs").await;
    let status_url = server.start_export("?_type=Patient", &token).await;
    let manifest = server.manifest(&status_url, &token).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let (_, url) = outputs(&manifest).remove(0);
    assert_unauthorized(server.get(&url, None).await).await;
    let response = server.get(&url, Some(&token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap().lines().count(), 2);
}

#[tokio::test]
async fn exports_contain_only_what_the_token_covers() {
    let server = spawn_smart().await;
    let (_, token) = server
        .client_with_token("c", "system/Patient.read system/Observation.rs")
        .await;

    // Asking for a type outside the token: 403, naming it.
    for query in ["?_type=Condition", "?_type=Patient,Condition"] {
        let outcome = assert_outcome(
            server.kick_off(query, Some(&token)).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("Condition"),
            "{outcome}"
        );
    }

    // Without _type: only the covered types, although the server holds Conditions too.
    let status_url = server.start_export("", &token).await;
    let manifest = server.manifest(&status_url, &token).await;
    let types: BTreeSet<String> = outputs(&manifest).into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        types,
        BTreeSet::from(["Observation".to_owned(), "Patient".to_owned()])
    );

    // Within the token: accepted.
    let status_url = server.start_export("?_type=Observation", &token).await;
    let manifest = server.manifest(&status_url, &token).await;
    assert_eq!(outputs(&manifest).len(), 1);

    // A token with scopes but none for any export type (Binary only) cannot export either.
    let (_, binary_only) = server.client_with_token("b", "system/Binary.read").await;
    let response = server.kick_off("?_type=Patient", Some(&binary_only)).await;
    assert_outcome(response, StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn group_exports_need_read_access_to_group() {
    let server = spawn_smart().await;
    let (_, token) = server.client_with_token("c", "system/Patient.rs").await;
    let response = server
        .client
        .get(server.url("/Group/g1/$export"))
        .header("accept", FHIR_JSON)
        .header("prefer", "respond-async")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_outcome(response, StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn jobs_belong_to_the_client_that_started_them() {
    let server = spawn_smart().await;
    let (owner_key, owner) = server.client_with_token("owner", "system/*.rs").await;
    let (_, other) = server.client_with_token("other", "system/*.rs").await;
    let status_url = server.start_export("?_type=Patient", &owner).await;

    // Another client may not see, poll or cancel it: 404 as for a job that never existed.
    let unknown = format!(
        "{}/$export-poll-status?_jobId={}",
        server.base,
        uuid::Uuid::new_v4()
    );
    let foreign = assert_outcome(
        server.get(&status_url, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let missing = assert_outcome(
        server.get(&unknown, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(foreign["issue"][0]["code"], missing["issue"][0]["code"]);
    assert_outcome(
        server.delete(&status_url, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // The owner's job is untouched; a renewed token of the same client works.
    let manifest = server.manifest(&status_url, &owner).await;
    let (_, file_url) = outputs(&manifest).remove(0);
    let renewed = server.token(&owner_key, "owner", "system/Patient.rs").await;
    assert_ne!(renewed, owner);
    assert_eq!(
        server.get(&file_url, Some(&renewed)).await.status(),
        StatusCode::OK
    );
    // The other client cannot download its files.
    assert_outcome(
        server.get(&file_url, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    // Nor delete it; the owner can.
    assert_outcome(
        server.delete(&status_url, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let response = server.delete(&status_url, Some(&owner)).await;
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "a delivered job: eHealth 404"
    );
    assert_outcome(
        server.get(&file_url, Some(&owner)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn a_running_job_is_cancelled_by_its_owner_only() {
    let server = spawn_smart().await;
    let (_, owner) = server.client_with_token("owner", "system/*.rs").await;
    let (_, other) = server.client_with_token("other", "system/*.rs").await;
    let status_url = server.start_export("", &owner).await;
    assert_outcome(
        server.delete(&status_url, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let response = server.delete(&status_url, Some(&owner)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_outcome(
        server.get(&status_url, Some(&owner)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn downloads_check_the_current_tokens_types() {
    let server = spawn_smart().await;
    let (key, token) = server.client_with_token("c", "system/*.rs").await;
    let status_url = server
        .start_export("?_type=Patient,Observation", &token)
        .await;
    let manifest = server.manifest(&status_url, &token).await;
    let files = outputs(&manifest);
    // bdt: re-authorize with only system/Observation.read, then download another type.
    let narrow = server.token(&key, "c", "system/Observation.read").await;
    for (resource_type, url) in files {
        let response = server.get(&url, Some(&narrow)).await;
        if resource_type == "Observation" {
            assert_eq!(response.status(), StatusCode::OK);
        } else {
            let outcome = assert_outcome(response, StatusCode::FORBIDDEN).await;
            assert!(
                outcome["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .contains(&resource_type)
            );
        }
    }
}

#[tokio::test]
async fn rest_follows_the_scopes_and_never_writes() {
    let server = spawn_smart().await;
    let (_, read_only) = server.client_with_token("r", "system/Patient.r").await;
    let (_, search_only) = server.client_with_token("s", "system/Observation.s").await;
    let (_, everything) = server.client_with_token("all", "system/*.cruds").await;

    assert_eq!(
        server.get("/Patient/p1", Some(&read_only)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        server
            .get("/Patient/p1/_history/1", Some(&read_only))
            .await
            .status(),
        StatusCode::OK
    );
    assert_outcome(
        server.get("/Patient", Some(&read_only)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_outcome(
        server.get("/Observation/o1", Some(&read_only)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    // Percent-escapes in the path do not get around the scopes.
    assert_outcome(
        server.get("/Observ%61tion/o1", Some(&read_only)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(
        server.get("/Pat%69ent/p1", Some(&read_only)).await.status(),
        StatusCode::OK
    );

    let response = server.get("/Observation", Some(&search_only)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_outcome(
        server.get("/Observation/o1", Some(&search_only)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_outcome(
        server
            .get(
                "/Observation?_include=Observation:subject",
                Some(&search_only),
            )
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;

    // Export files are not Binary resources: a stored Binary needs Binary read.
    assert_outcome(
        server.get("/Binary/nope", Some(&read_only)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_outcome(
        server.get("/Binary/nope", Some(&everything)).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Writes are refused whatever the token asked for (.cruds is granted as .rs).
    let patient = json!({"resourceType": "Patient", "id": "p9"});
    for (method, path) in [
        (reqwest::Method::POST, "/Patient"),
        (reqwest::Method::PUT, "/Patient/p9"),
        (reqwest::Method::DELETE, "/Patient/p1"),
        (reqwest::Method::POST, ""),
    ] {
        let response = server
            .client
            .request(method.clone(), server.url(path))
            .bearer_auth(&everything)
            .header("content-type", FHIR_JSON)
            .body(patient.to_string())
            .send()
            .await
            .unwrap();
        assert_outcome(response, StatusCode::FORBIDDEN).await;
    }
    let still: Value = server
        .get("/Patient/p1", Some(&everything))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(still["id"], "p1");
}

#[tokio::test]
async fn concurrent_exports_are_limited_per_client() {
    let server = spawn(Options {
        max_active_exports: 1,
        ..Options::default()
    })
    .await;
    let (_, first) = server.client_with_token("first", "system/*.rs").await;
    let (_, second) = server.client_with_token("second", "system/*.rs").await;
    // With the workers stopped, jobs stay queued: unfinished, so they count.
    server.pause_exports().await;
    assert_eq!(
        server.kick_off("", Some(&first)).await.status(),
        StatusCode::ACCEPTED
    );
    let refused = server.kick_off("", Some(&first)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let response = refused;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0);
    assert_outcome(response, StatusCode::TOO_MANY_REQUESTS).await;
    // The other client is not affected.
    assert_eq!(
        server.kick_off("", Some(&second)).await.status(),
        StatusCode::ACCEPTED
    );
}

/// The ids in an NDJSON body.
fn ndjson_ids(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(|line| {
            let resource: Value = serde_json::from_str(line).unwrap();
            resource["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn bundle_ids(response: reqwest::Response) -> BTreeSet<String> {
    assert_eq!(response.status(), StatusCode::OK);
    let bundle: Value = response.json().await.unwrap();
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn granular_scopes_narrow_exports_searches_and_reads() {
    let server = spawn_smart().await;
    let scope = "system/Observation.rs?subject=Patient/p1 system/Patient.rs";
    let (key, token) = server.client_with_token("g", scope).await;
    let (status, granted) = server
        .request_token(&server.assertion(&key, "g"), scope)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(granted["scope"], scope);
    let ids_of = |set: &[&str]| -> BTreeSet<String> { set.iter().map(|s| s.to_string()).collect() };

    // Export without _type: the Patients whole, the Observations the filter selects, nothing
    // else (the store holds p2's Observation o3 and a Condition too).
    let status_url = server.start_export("", &token).await;
    let manifest = server.manifest(&status_url, &token).await;
    let mut exported = std::collections::BTreeMap::new();
    for (resource_type, url) in outputs(&manifest) {
        let text = server.get(&url, Some(&token)).await.text().await.unwrap();
        exported
            .entry(resource_type)
            .or_insert_with(BTreeSet::new)
            .extend(ndjson_ids(&text));
    }
    assert_eq!(
        exported,
        std::collections::BTreeMap::from([
            ("Observation".to_owned(), ids_of(&["o1", "o2"])),
            ("Patient".to_owned(), ids_of(&["p1", "p2"])),
        ])
    );

    // _typeFilter narrows further; it cannot widen.
    let status_url = server
        .start_export(
            "?_type=Observation&_typeFilter=Observation%3Fcode%3Atext%3Dc,Observation%3Fcode%3Atext%3Db",
            &token,
        )
        .await;
    let manifest = server.manifest(&status_url, &token).await;
    let files = outputs(&manifest);
    assert_eq!(files.len(), 1, "{manifest}");
    let text = server
        .get(&files[0].1, Some(&token))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(ndjson_ids(&text), ids_of(&["o2"]));

    // Types outside every scope stay refused.
    assert_outcome(
        server.kick_off("?_type=Condition", Some(&token)).await,
        StatusCode::FORBIDDEN,
    )
    .await;

    // Search sees only the selected resources, with or without parameters of its own.
    assert_eq!(
        bundle_ids(server.get("/Observation", Some(&token)).await).await,
        ids_of(&["o1", "o2"])
    );
    assert_eq!(
        bundle_ids(server.get("/Observation?code:text=c", Some(&token)).await).await,
        BTreeSet::new()
    );
    let counted: Value = server
        .get("/Observation?_summary=count", Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(counted["total"], 2);

    // Reads: inside the filter 200, outside 403 (read, vread and history alike).
    for path in ["/Observation/o1", "/Observation/o1/_history/1"] {
        assert_eq!(
            server.get(path, Some(&token)).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    assert_eq!(
        bundle_ids(server.get("/Observation/o1/_history", Some(&token)).await).await,
        ids_of(&["o1"])
    );
    for path in [
        "/Observation/o3",
        "/Observation/o3/_history/1",
        "/Observation/o3/_history",
    ] {
        let outcome =
            assert_outcome(server.get(path, Some(&token)).await, StatusCode::FORBIDDEN).await;
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("granular"),
            "{path}: {outcome}"
        );
    }
}

#[tokio::test]
async fn granular_scopes_that_cannot_be_enforced_are_invalid_scope() {
    let server = spawn_smart().await;
    let key = TestKey::rsa("k");
    server.register("c", None, Some(&jwks(&[&key])), None).await;
    for scope in [
        "system/Observation.rs?nonsense=1",
        "system/Observation.rs?code:below=x",
        "system/*.rs?category=laboratory",
    ] {
        let answer = server
            .request_token(&server.assertion(&key, "c"), scope)
            .await;
        assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "invalid_scope");
    }
}
