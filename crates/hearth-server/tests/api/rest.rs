//! The instance and type interactions: create, read, vread, update, delete, history, and the
//! errors a client gets for bad requests.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

/// `Last-Modified` must be `meta.lastUpdated`, to the second.
fn assert_last_modified_matches(last_modified: &str, last_updated: &str) {
    let header = httpdate::parse_http_date(last_modified).expect("an HTTP date");
    let header_secs = header
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let micros = hearth_fhir::instant::parse_instant(last_updated)
        .expect("meta.lastUpdated is a FHIR instant");
    assert_eq!(
        header_secs,
        micros.div_euclid(1_000_000),
        "Last-Modified {last_modified} vs meta.lastUpdated {last_updated}"
    );
}

// ---------------------------------------------------------------------------------------------
// create

#[tokio::test]
async fn create_returns_201_with_location_etag_last_modified_and_meta() {
    let server = spawn_server().await;
    let response = server.post_json("/Patient", &patient("Chalmers")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = header(&response, "location");
    let etag = header(&response, "etag");
    let last_modified = header(&response, "last-modified");
    let body = expect_json(response, StatusCode::CREATED).await;

    let id = id_of(&body);
    assert!(!id.is_empty());
    assert_eq!(location, format!("{}/Patient/{id}/_history/1", server.base));
    assert_eq!(etag, "W/\"1\"");
    assert_eq!(body["resourceType"], "Patient");
    assert_eq!(body["name"][0]["family"], "Chalmers");
    assert_eq!(body["meta"]["versionId"], "1");
    let last_updated = body["meta"]["lastUpdated"]
        .as_str()
        .expect("meta.lastUpdated is set");
    assert_last_modified_matches(&last_modified, last_updated);

    // The Location resolves to what was created.
    let read = expect_json(server.get(&location).await, StatusCode::OK).await;
    assert_eq!(read, body);
}

#[tokio::test]
async fn create_keeps_decimals_and_key_order_byte_for_byte() {
    let server = spawn_server().await;
    let sent = r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":1.50,"unit":"kg","system":"http://unitsofmeasure.org","code":"kg"},"code":{"text":"Body weight"},"component":[{"valueQuantity":{"value":0.000100}},{"valueQuantity":{"value":1e3}}],"effectiveDateTime":"2024-01-02","note":[{"text":"  two  spaces \u00e9 \"quoted\" "}]}"#;
    let created = server.send_text(Method::POST, "/Observation", sent).await;
    let created_text = expect_text(created, StatusCode::CREATED).await;
    assert_eq!(without_server_fields(&created_text), sent);

    let id = id_of(&serde_json::from_str(&created_text).unwrap());
    let stored = expect_text(
        server.get(&format!("/Observation/{id}")).await,
        StatusCode::OK,
    )
    .await;
    assert!(stored.contains(r#""value":1.50,"#), "{stored}");
    assert_eq!(without_server_fields(&stored), sent);
    assert_eq!(stored, created_text, "read returns what create returned");

    // What the store holds is the same text.
    use hearth_store::Store;
    let in_store = server
        .store
        .read("Observation", &id)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(String::from_utf8(in_store.body).unwrap(), stored);
}

#[tokio::test]
async fn create_replaces_a_client_supplied_id() {
    let server = spawn_server().await;
    let mut resource = patient("Own");
    resource["id"] = json!("client-chosen");
    let body = server.create(&resource).await;
    let id = id_of(&body);
    assert_ne!(id, "client-chosen");

    let read = server.get(&format!("/Patient/{id}")).await;
    expect_json(read, StatusCode::OK).await;
    let not_there = server.get("/Patient/client-chosen").await;
    assert_outcome(not_there, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn create_sets_meta_version_and_keeps_the_rest_of_meta() {
    let server = spawn_server().await;
    let sent = json!({
        "resourceType": "Patient",
        "meta": {
            "versionId": "7",
            "lastUpdated": "2001-01-01T00:00:00Z",
            "profile": ["http://example.org/StructureDefinition/p"]
        }
    });
    let body = server.create(&sent).await;
    assert_eq!(body["meta"]["versionId"], "1");
    assert_ne!(body["meta"]["lastUpdated"], "2001-01-01T00:00:00Z");
    assert_eq!(
        body["meta"]["profile"],
        json!(["http://example.org/StructureDefinition/p"])
    );
}

/// Hearth does not do conditional create; a request that asks for it must be refused, as
/// the same request in a Bundle entry is, not turned into a plain create.
#[tokio::test]
async fn conditional_create_is_refused_not_ignored() {
    let server = spawn_server().await;
    let mut wrong = Vec::new();
    for attempt in 0..2 {
        let response = server
            .request(Method::POST, "/Patient")
            .header("content-type", FHIR_JSON)
            .header("if-none-exist", "identifier=http://example.org|42")
            .body(patient("Conditional").to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        if status == StatusCode::CREATED {
            wrong.push(format!(
                "POST /Patient with If-None-Exist (attempt {attempt}) answered 201 Created"
            ));
        } else {
            assert_outcome(response, status).await;
        }
    }
    let search = expect_json(server.get("/Patient").await, StatusCode::OK).await;
    if search["total"] != 0 {
        wrong.push(format!(
            "{} Patients exist after two conditional creates",
            search["total"]
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test]
async fn pretty_printed_body_is_stored_compact() {
    let server = spawn_server().await;
    let pretty = "{\n  \"resourceType\" : \"Patient\",\n  \"active\" : true,\n  \"name\" : [ {\n    \"family\" : \"Van  Dyke\",\n    \"given\" : [ \"A\", \"B\" ]\n  } ],\n  \"birthDate\" : \"1970-01-01\"\n}\n";
    let compact = r#"{"resourceType":"Patient","active":true,"name":[{"family":"Van  Dyke","given":["A","B"]}],"birthDate":"1970-01-01"}"#;
    let created = server.send_text(Method::POST, "/Patient", pretty).await;
    let created: Value = expect_json(created, StatusCode::CREATED).await;
    let id = id_of(&created);

    let stored = expect_text(server.get(&format!("/Patient/{id}")).await, StatusCode::OK).await;
    assert!(!stored.contains('\n'), "stored with newlines: {stored}");
    assert!(!stored.contains(": "), "stored with spaces: {stored}");
    assert_eq!(without_server_fields(&stored), compact);
}

// ---------------------------------------------------------------------------------------------
// read

#[tokio::test]
async fn read_returns_200_with_etag_and_if_none_match_gives_304() {
    let server = spawn_server().await;
    let created = server.create(&patient("Reader")).await;
    let id = id_of(&created);

    let response = server.get(&format!("/Patient/{id}")).await;
    assert_eq!(header(&response, "etag"), "W/\"1\"");
    let last_modified = header(&response, "last-modified");
    let body = expect_json(response, StatusCode::OK).await;
    assert_eq!(body, created);
    assert_last_modified_matches(
        &last_modified,
        body["meta"]["lastUpdated"].as_str().unwrap(),
    );

    let not_modified = server
        .request(Method::GET, &format!("/Patient/{id}"))
        .header("if-none-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&not_modified, "etag"), "W/\"1\"");
    assert!(not_modified.bytes().await.unwrap().is_empty());

    // A different ETag is not a match: the resource comes back.
    let stale = server
        .request(Method::GET, &format!("/Patient/{id}"))
        .header("if-none-match", "W/\"7\"")
        .send()
        .await
        .unwrap();
    assert_eq!(expect_json(stale, StatusCode::OK).await, created);
}

// ---------------------------------------------------------------------------------------------
// update

#[tokio::test]
async fn put_creates_then_updates_with_a_new_version() {
    let server = spawn_server().await;
    let mut resource = json!({"resourceType": "Patient", "id": "put-1", "gender": "female"});

    let first = server.put_json("/Patient/put-1", &resource).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(
        header(&first, "location"),
        format!("{}/Patient/put-1/_history/1", server.base)
    );
    assert_eq!(header(&first, "etag"), "W/\"1\"");
    let first = expect_json(first, StatusCode::CREATED).await;
    assert_eq!(first["id"], "put-1");
    assert_eq!(first["meta"]["versionId"], "1");

    resource["gender"] = json!("male");
    let second = server.put_json("/Patient/put-1", &resource).await;
    assert_eq!(header(&second, "etag"), "W/\"2\"");
    let second = expect_json(second, StatusCode::OK).await;
    assert_eq!(second["meta"]["versionId"], "2");
    assert_eq!(second["gender"], "male");
    assert!(
        second["meta"]["lastUpdated"].as_str() > first["meta"]["lastUpdated"].as_str(),
        "lastUpdated moves forward"
    );

    let read = expect_json(server.get("/Patient/put-1").await, StatusCode::OK).await;
    assert_eq!(read, second);
}

#[tokio::test]
async fn put_with_identical_content_does_not_make_a_version() {
    let server = spawn_server().await;
    let resource = json!({"resourceType": "Patient", "id": "same", "active": true});
    let first = server.put_json("/Patient/same", &resource).await;
    let first = expect_json(first, StatusCode::CREATED).await;

    let again = server.put_json("/Patient/same", &resource).await;
    assert_eq!(header(&again, "etag"), "W/\"1\"");
    let again = expect_json(again, StatusCode::OK).await;
    assert_eq!(again["meta"]["versionId"], "1");
    assert_eq!(again["meta"]["lastUpdated"], first["meta"]["lastUpdated"]);

    // Sending back exactly what a read returned (meta included) is no change either.
    let read = expect_text(server.get("/Patient/same").await, StatusCode::OK).await;
    let round_trip = server.send_text(Method::PUT, "/Patient/same", &read).await;
    let round_trip = expect_json(round_trip, StatusCode::OK).await;
    assert_eq!(round_trip["meta"]["versionId"], "1");

    let history = expect_json(server.get("/Patient/same/_history").await, StatusCode::OK).await;
    assert_eq!(entries(&history).len(), 1, "{history}");
}

#[tokio::test]
async fn vread_of_version_1_after_update_returns_the_old_content() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "v", "gender": "female"}))
        .await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "v", "gender": "other"}))
        .await;

    let v1 = server.get("/Patient/v/_history/1").await;
    assert_eq!(header(&v1, "etag"), "W/\"1\"");
    let v1 = expect_json(v1, StatusCode::OK).await;
    assert_eq!(v1["gender"], "female");
    assert_eq!(v1["meta"]["versionId"], "1");

    let v2 = expect_json(server.get("/Patient/v/_history/2").await, StatusCode::OK).await;
    assert_eq!(v2["gender"], "other");

    let v3 = server.get("/Patient/v/_history/3").await;
    assert_outcome(v3, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn instance_history_is_newest_first_and_pages_through_next() {
    let server = spawn_server().await;
    for n in 1..=5 {
        server
            .upsert(&json!({"resourceType": "Patient", "id": "h", "birthDate": format!("200{n}-01-01")}))
            .await;
    }

    let all = expect_json(server.get("/Patient/h/_history").await, StatusCode::OK).await;
    assert_eq!(all["resourceType"], "Bundle");
    assert_eq!(all["type"], "history");
    let versions: Vec<String> = entries(&all)
        .iter()
        .map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(versions, ["5", "4", "3", "2", "1"]);
    assert_eq!(entries(&all)[0]["resource"]["birthDate"], "2005-01-01");
    assert_eq!(entries(&all)[4]["request"]["method"], "POST");
    assert_eq!(entries(&all)[0]["request"]["method"], "PUT");

    let mut paged = Vec::new();
    let mut url = server.url("/Patient/h/_history?_count=2");
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 5, "history paging does not end");
        let page = expect_json(server.get(&url).await, StatusCode::OK).await;
        assert_eq!(page["type"], "history");
        let page_entries = entries(&page);
        assert!(page_entries.len() <= 2, "page larger than _count: {page}");
        paged.extend(page_entries.iter().map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
        match link(&page, "next") {
            Some(next) => url = next,
            None => break,
        }
    }
    assert_eq!(paged, versions);
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn if_match_with_a_stale_version_is_412_and_with_the_current_one_200() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "m", "active": true}))
        .await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "m", "active": false}))
        .await;

    let changed = json!({"resourceType": "Patient", "id": "m", "gender": "unknown"});
    let stale = server
        .request(Method::PUT, "/Patient/m")
        .header("content-type", FHIR_JSON)
        .header("if-match", "W/\"1\"")
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(stale, StatusCode::PRECONDITION_FAILED).await;
    let unchanged = expect_json(server.get("/Patient/m").await, StatusCode::OK).await;
    assert_eq!(unchanged["meta"]["versionId"], "2");
    assert_eq!(unchanged["active"], false);

    let current = server
        .request(Method::PUT, "/Patient/m")
        .header("content-type", FHIR_JSON)
        .header("if-match", "W/\"2\"")
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    let updated = expect_json(current, StatusCode::OK).await;
    assert_eq!(updated["meta"]["versionId"], "3");
    assert_eq!(updated["gender"], "unknown");

    let stale_delete = server
        .request(Method::DELETE, "/Patient/m")
        .header("if-match", "W/\"2\"")
        .send()
        .await
        .unwrap();
    assert_outcome(stale_delete, StatusCode::PRECONDITION_FAILED).await;
    expect_json(server.get("/Patient/m").await, StatusCode::OK).await;
}

// ---------------------------------------------------------------------------------------------
// delete

#[tokio::test]
async fn delete_answers_an_outcome_and_the_resource_is_then_gone() {
    let server = spawn_server().await;
    let id = id_of(&server.create(&patient("Doomed")).await);

    let deleted = server.delete(&format!("/Patient/{id}")).await;
    let outcome = assert_outcome(deleted, StatusCode::OK).await;
    assert_ne!(outcome["issue"][0]["severity"], "error", "{outcome}");

    let read = server.get(&format!("/Patient/{id}")).await;
    assert_outcome(read, StatusCode::GONE).await;

    // Deleting again is still fine for the client.
    let again = server.delete(&format!("/Patient/{id}")).await;
    assert_outcome(again, StatusCode::OK).await;
}

#[tokio::test]
async fn history_shows_the_delete_and_the_tombstone_version_is_gone() {
    let server = spawn_server().await;
    let id = id_of(&server.create(&patient("Tomb")).await);
    let deleted = server.delete(&format!("/Patient/{id}")).await;
    assert_outcome(deleted, StatusCode::OK).await;

    let history = server.get(&format!("/Patient/{id}/_history")).await;
    let history = expect_json(history, StatusCode::OK).await;
    let history_entries = entries(&history);
    assert_eq!(history_entries.len(), 2, "{history}");
    assert_eq!(history_entries[0]["request"]["method"], "DELETE");
    assert!(history_entries[0].get("resource").is_none());
    assert_eq!(history_entries[0]["response"]["etag"], "W/\"2\"");
    assert_eq!(history_entries[1]["resource"]["name"][0]["family"], "Tomb");

    let tombstone = server.get(&format!("/Patient/{id}/_history/2")).await;
    assert_outcome(tombstone, StatusCode::GONE).await;
    let before = server.get(&format!("/Patient/{id}/_history/1")).await;
    let before = expect_json(before, StatusCode::OK).await;
    assert_eq!(before["name"][0]["family"], "Tomb");
}

#[tokio::test]
async fn put_after_delete_recreates_the_resource() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "phoenix", "active": true}))
        .await;
    assert_outcome(server.delete("/Patient/phoenix").await, StatusCode::OK).await;

    let again = json!({"resourceType": "Patient", "id": "phoenix", "active": true});
    let recreated = server.put_json("/Patient/phoenix", &again).await;
    assert!(recreated.headers().get("location").is_some());
    let recreated = expect_json(recreated, StatusCode::CREATED).await;
    assert_eq!(recreated["meta"]["versionId"], "3");

    let read = expect_json(server.get("/Patient/phoenix").await, StatusCode::OK).await;
    assert_eq!(read["active"], true);
}

// ---------------------------------------------------------------------------------------------
// bad input: one case each, always an OperationOutcome

#[tokio::test]
async fn invalid_json_is_400() {
    let server = spawn_server().await;
    let response = server
        .send_text(Method::POST, "/Patient", r#"{"resourceType":"Patient","#)
        .await;
    assert_outcome(response, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn empty_body_is_400() {
    let server = spawn_server().await;
    let response = server.send_text(Method::POST, "/Patient", "").await;
    assert_outcome(response, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn duplicate_keys_are_400() {
    let server = spawn_server().await;
    let response = server
        .send_text(
            Method::PUT,
            "/Patient/dup",
            r#"{"resourceType":"Patient","id":"dup","gender":"male","gender":"female"}"#,
        )
        .await;
    let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
    assert!(outcome_text(&outcome).contains("gender"), "{outcome}");
    assert_outcome(server.get("/Patient/dup").await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn body_that_is_not_an_object_is_400() {
    let server = spawn_server().await;
    for body in [r#"["Patient"]"#, r#""Patient""#, "42"] {
        let response = server.send_text(Method::POST, "/Patient", body).await;
        assert_outcome(response, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn resource_type_not_matching_the_url_is_400() {
    let server = spawn_server().await;
    let response = server
        .post_json(
            "/Patient",
            &json!({"resourceType": "Observation", "status": "final"}),
        )
        .await;
    let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
    assert!(outcome_text(&outcome).contains("Observation"), "{outcome}");

    let put = server
        .put_json(
            "/Patient/x",
            &json!({"resourceType": "Observation", "id": "x"}),
        )
        .await;
    assert_outcome(put, StatusCode::BAD_REQUEST).await;
    assert_outcome(server.get("/Observation/x").await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn unknown_resource_type_in_the_body_is_400() {
    let server = spawn_server().await;
    let response = server
        .post_json("/Patient", &json!({"resourceType": "Spaceship"}))
        .await;
    let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
    assert!(outcome_text(&outcome).contains("Spaceship"), "{outcome}");

    let missing = server.post_json("/Patient", &json!({"active": true})).await;
    assert_outcome(missing, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn id_in_the_body_differing_from_the_url_is_400() {
    let server = spawn_server().await;
    let response = server
        .put_json(
            "/Patient/url-id",
            &json!({"resourceType": "Patient", "id": "body-id"}),
        )
        .await;
    assert_outcome(response, StatusCode::BAD_REQUEST).await;
    assert_outcome(server.get("/Patient/url-id").await, StatusCode::NOT_FOUND).await;
    assert_outcome(server.get("/Patient/body-id").await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn put_without_an_id_in_the_body_is_400() {
    let server = spawn_server().await;
    let response = server.put_json("/Patient/no-id", &patient("Nobody")).await;
    assert_outcome(response, StatusCode::BAD_REQUEST).await;
    assert_outcome(server.get("/Patient/no-id").await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn invalid_id_syntax_in_the_url_is_400() {
    let server = spawn_server().await;
    let too_long = "a".repeat(65);
    for id in ["a_b", too_long.as_str(), "a%20b"] {
        let read = server.get(&format!("/Patient/{id}")).await;
        assert_outcome(read, StatusCode::BAD_REQUEST).await;

        let body = json!({"resourceType": "Patient", "id": id});
        let put = server.put_json(&format!("/Patient/{id}"), &body).await;
        assert_outcome(put, StatusCode::BAD_REQUEST).await;

        let delete = server.delete(&format!("/Patient/{id}")).await;
        assert_outcome(delete, StatusCode::BAD_REQUEST).await;
    }
    // 64 characters is still an id.
    let longest = "b".repeat(64);
    let body = json!({"resourceType": "Patient", "id": longest});
    let put = server.put_json(&format!("/Patient/{longest}"), &body).await;
    expect_json(put, StatusCode::CREATED).await;
}

#[tokio::test]
async fn unknown_resource_type_in_the_url_is_404() {
    let server = spawn_server().await;
    assert_outcome(server.get("/Spaceship/1").await, StatusCode::NOT_FOUND).await;
    assert_outcome(server.get("/Spaceship").await, StatusCode::NOT_FOUND).await;
    let create = server
        .post_json("/Spaceship", &json!({"resourceType": "Spaceship"}))
        .await;
    assert_outcome(create, StatusCode::NOT_FOUND).await;
    // Resource type names are case-sensitive.
    assert_outcome(server.get("/patient/1").await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn unknown_id_is_404() {
    let server = spawn_server().await;
    assert_outcome(server.get("/Patient/nope").await, StatusCode::NOT_FOUND).await;
    assert_outcome(
        server.get("/Patient/nope/_history/1").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_outcome(
        server.get("/Patient/nope/_history").await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn reading_a_deleted_resource_is_410() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "gone"}))
        .await;
    assert_outcome(server.delete("/Patient/gone").await, StatusCode::OK).await;
    let outcome = assert_outcome(server.get("/Patient/gone").await, StatusCode::GONE).await;
    assert_eq!(outcome["issue"][0]["severity"], "error");
}

#[tokio::test]
async fn text_plain_content_type_is_415() {
    let server = spawn_server().await;
    let response = server
        .request(Method::POST, "/Patient")
        .header("content-type", "text/plain")
        .body(patient("Plain").to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    let put = server
        .request(Method::PUT, "/Patient/p")
        .header("content-type", "text/plain")
        .body(json!({"resourceType": "Patient", "id": "p"}).to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(put, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert_outcome(server.get("/Patient/p").await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn missing_content_type_is_415() {
    let server = spawn_server().await;
    let response = server
        .request(Method::POST, "/Patient")
        .body(patient("Untyped").to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
}

#[tokio::test]
async fn body_over_the_configured_limit_is_413() {
    let server = spawn_server_with_limit(1024).await;
    let big = json!({
        "resourceType": "Patient",
        "id": "big",
        "name": [{"family": "x".repeat(2000)}]
    });

    // With a Content-Length.
    let declared = server.put_json("/Patient/big", &big).await;
    assert_outcome(declared, StatusCode::PAYLOAD_TOO_LARGE).await;

    // Streamed without one.
    let chunks = vec![Ok::<_, std::io::Error>(big.to_string().into_bytes())];
    let streamed = server
        .request(Method::PUT, "/Patient/big")
        .header("content-type", FHIR_JSON)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_outcome(streamed, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_outcome(server.get("/Patient/big").await, StatusCode::NOT_FOUND).await;

    // A body under the limit is fine.
    let small = json!({"resourceType": "Patient", "id": "small"});
    expect_json(
        server.put_json("/Patient/small", &small).await,
        StatusCode::CREATED,
    )
    .await;
}

#[tokio::test]
async fn unknown_route_is_404_outcome() {
    let server = spawn_server().await;
    for url in [
        format!("{}/nowhere", server.origin),
        format!("{}/", server.origin),
        server.url("/Patient/x/_history/1/more"),
        server.url("/Patient/x/extra"),
    ] {
        let response = server.client.get(&url).send().await.unwrap();
        assert_outcome(response, StatusCode::NOT_FOUND).await;
    }
}

#[tokio::test]
async fn wrong_method_is_405_outcome() {
    let server = spawn_server().await;
    let patch = server
        .request(Method::PATCH, "/Patient/x")
        .header("content-type", "application/json-patch+json")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_outcome(patch, StatusCode::METHOD_NOT_ALLOWED).await;

    let delete_type = server
        .request(Method::DELETE, "/Patient")
        .send()
        .await
        .unwrap();
    assert_outcome(delete_type, StatusCode::METHOD_NOT_ALLOWED).await;

    let post_metadata = server.send_text(Method::POST, "/metadata", "{}").await;
    assert_outcome(post_metadata, StatusCode::METHOD_NOT_ALLOWED).await;
}

/// HTTP requires a `405` to say which methods the target does support.
#[tokio::test]
async fn method_not_allowed_lists_the_allowed_methods() {
    let server = spawn_server().await;
    let patch = server
        .request(Method::PATCH, "/Patient/x")
        .header("content-type", "application/json-patch+json")
        .body("[]")
        .send()
        .await
        .unwrap();
    let allow = header(&patch, "allow");
    assert_outcome(patch, StatusCode::METHOD_NOT_ALLOWED).await;
    for method in ["GET", "PUT", "DELETE"] {
        assert!(allow.contains(method), "Allow: {allow}");
    }
}

#[tokio::test]
async fn json_media_types_with_parameters_are_accepted() {
    let server = spawn_server().await;
    for (n, content_type) in [
        "application/fhir+json; fhirVersion=4.0",
        "application/fhir+json;charset=utf-8",
        "application/json",
        "APPLICATION/FHIR+JSON",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("ct{n}");
        let response = server
            .request(Method::PUT, &format!("/Patient/{id}"))
            .header("content-type", content_type)
            .header("accept", "application/fhir+json")
            .body(json!({"resourceType": "Patient", "id": id}).to_string())
            .send()
            .await
            .unwrap();
        let body = expect_json(response, StatusCode::CREATED).await;
        assert_eq!(body["id"], id, "{content_type}");
    }
}

#[tokio::test]
async fn format_xml_on_read_and_search_is_406() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "fmt"}))
        .await;
    for path in [
        "/Patient/fmt?_format=xml",
        "/Patient/fmt/_history/1?_format=xml",
        "/Patient/fmt/_history?_format=xml",
        "/Patient?_format=xml",
        "/metadata?_format=xml",
    ] {
        let response = server.get(path).await;
        assert_outcome(response, StatusCode::NOT_ACCEPTABLE).await;
    }
    // JSON is fine.
    expect_json(
        server.get("/Patient/fmt?_format=json").await,
        StatusCode::OK,
    )
    .await;
}

#[tokio::test]
async fn accept_xml_only_is_406() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "acc"}))
        .await;
    let response = server
        .request(Method::GET, "/Patient/acc")
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    assert_outcome(response, StatusCode::NOT_ACCEPTABLE).await;
}

/// `_format` is a parameter of every interaction, writes included: a client that asks for XML
/// back from a create or update must be refused rather than answered in JSON.
#[tokio::test]
async fn format_xml_on_create_and_update_is_406_and_writes_nothing() {
    let server = spawn_server().await;
    let create = server
        .post_json("/Patient?_format=xml", &patient("Xml"))
        .await;
    let update = server
        .put_json(
            "/Patient/xml-put?_format=xml",
            &json!({"resourceType": "Patient", "id": "xml-put"}),
        )
        .await;
    let mut wrong = Vec::new();
    for (request, response) in [
        ("POST /Patient?_format=xml", create),
        ("PUT /Patient/xml-put?_format=xml", update),
    ] {
        let status = response.status();
        if status != StatusCode::NOT_ACCEPTABLE {
            wrong.push(format!("{request} answered {status}, not 406"));
        } else {
            assert_outcome(response, StatusCode::NOT_ACCEPTABLE).await;
        }
    }
    let search = expect_json(server.get("/Patient").await, StatusCode::OK).await;
    if search["total"] != 0 {
        wrong.push(format!("{} Patient(s) were written", search["total"]));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
