//! `POST [base]` with transaction and batch Bundles.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

async fn post_bundle(server: &TestServer, bundle: &Value) -> reqwest::Response {
    server
        .client
        .post(&server.base)
        .header("content-type", FHIR_JSON)
        .body(bundle.to_string())
        .send()
        .await
        .expect("the bundle is answered")
}

/// `Type/id` out of a `Location` like `Patient/abc/_history/1` (relative or absolute).
fn id_from_location(location: &str, resource_type: &str) -> String {
    let marker = format!("{resource_type}/");
    let at = location
        .find(&marker)
        .unwrap_or_else(|| panic!("'{location}' does not name a {resource_type}"));
    let rest = &location[at + marker.len()..];
    let id = rest.split('/').next().unwrap().to_owned();
    assert!(
        rest.ends_with("/_history/1"),
        "location '{location}' is not a version URL"
    );
    id
}

fn status_code(entry: &Value) -> String {
    entry["response"]["status"]
        .as_str()
        .unwrap_or_else(|| panic!("entry without response.status: {entry}"))
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

async fn patient_total(server: &TestServer) -> u64 {
    let bundle = expect_json(server.get("/Patient").await, StatusCode::OK).await;
    bundle["total"].as_u64().expect("a total")
}

#[tokio::test]
async fn transaction_creates_entries_and_resolves_urn_uuid_references() {
    let server = spawn_server().await;
    let patient_urn = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a";
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {"resourceType": "Patient", "name": [{"family": "Transact"}]},
                "request": {"method": "POST", "url": "Patient"}
            },
            {
                "fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "heart rate"},
                    "subject": {"reference": patient_urn}
                },
                "request": {"method": "POST", "url": "Observation"}
            }
        ]
    });
    let response = expect_json(post_bundle(&server, &bundle).await, StatusCode::OK).await;
    assert_eq!(response["resourceType"], "Bundle");
    assert_eq!(response["type"], "transaction-response");
    let results = entries(&response);
    assert_eq!(results.len(), 2, "{response}");
    for entry in &results {
        assert_eq!(entry["response"]["status"], "201 Created", "{entry}");
    }
    let patient_id = id_from_location(
        results[0]["response"]["location"]
            .as_str()
            .expect("location"),
        "Patient",
    );
    let observation_id = id_from_location(
        results[1]["response"]["location"]
            .as_str()
            .expect("location"),
        "Observation",
    );

    let patient = server.get(&format!("/Patient/{patient_id}")).await;
    let patient = expect_json(patient, StatusCode::OK).await;
    assert_eq!(patient["name"][0]["family"], "Transact");
    let observation = server.get(&format!("/Observation/{observation_id}")).await;
    let observation = expect_json(observation, StatusCode::OK).await;
    assert_eq!(
        observation["subject"]["reference"],
        format!("Patient/{patient_id}")
    );
}

#[tokio::test]
async fn transaction_with_an_invalid_entry_writes_nothing() {
    let server = spawn_server().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "id": "tx-a", "active": true},
                "request": {"method": "PUT", "url": "Patient/tx-a"}
            },
            {
                "fullUrl": "urn:uuid:0b4c2f0e-7b1b-4a57-9d4e-3f1c1f2d9a10",
                "resource": {"resourceType": "Patient", "active": false},
                "request": {"method": "POST", "url": "Patient"}
            },
            {
                "resource": {"resourceType": "Patient", "id": "not-tx-b"},
                "request": {"method": "PUT", "url": "Patient/tx-b"}
            }
        ]
    });
    let outcome =
        assert_outcome(post_bundle(&server, &bundle).await, StatusCode::BAD_REQUEST).await;
    assert!(
        outcome_text(&outcome).contains("Bundle.entry[2]"),
        "the outcome does not name Bundle.entry[2]: {outcome}"
    );

    for id in ["tx-a", "tx-b", "not-tx-b"] {
        let read = server.get(&format!("/Patient/{id}")).await;
        assert_outcome(read, StatusCode::NOT_FOUND).await;
    }
    assert_eq!(patient_total(&server).await, 0);
}

#[tokio::test]
async fn transaction_with_a_stale_if_match_rolls_everything_back() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "keep", "gender": "female"}))
        .await;
    server
        .upsert(&json!({"resourceType": "Observation", "id": "obs", "status": "final", "code": {"text": "x"}}))
        .await;

    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "id": "tx-new"},
                "request": {"method": "PUT", "url": "Patient/tx-new"}
            },
            {
                "resource": {"resourceType": "Patient", "id": "keep", "gender": "male"},
                "request": {"method": "PUT", "url": "Patient/keep"}
            },
            {
                "request": {"method": "DELETE", "url": "Observation/obs", "ifMatch": "W/\"3\""}
            }
        ]
    });
    let response = post_bundle(&server, &bundle).await;
    let status = response.status();
    assert!(
        status.is_client_error(),
        "a failed transaction answered {status}"
    );
    let outcome = assert_outcome(response, status).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert!(
        outcome_text(&outcome).contains("Bundle.entry[2]"),
        "the outcome does not name Bundle.entry[2]: {outcome}"
    );

    assert_outcome(server.get("/Patient/tx-new").await, StatusCode::NOT_FOUND).await;
    let keep = expect_json(server.get("/Patient/keep").await, StatusCode::OK).await;
    assert_eq!(keep["gender"], "female");
    assert_eq!(keep["meta"]["versionId"], "1");
    let obs = expect_json(server.get("/Observation/obs").await, StatusCode::OK).await;
    assert_eq!(obs["meta"]["versionId"], "1");
    assert_eq!(patient_total(&server).await, 1);
}

/// A transaction is all or nothing: when a read entry fails, the whole transaction fails,
/// its writes included.
#[tokio::test]
async fn transaction_with_a_failing_read_entry_writes_nothing() {
    let server = spawn_server().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "id": "tx-w", "active": true},
                "request": {"method": "PUT", "url": "Patient/tx-w"}
            },
            {"request": {"method": "GET", "url": "Patient/missing"}}
        ]
    });
    let response = post_bundle(&server, &bundle).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    let written = server.get("/Patient/tx-w").await.status();

    let mut wrong = Vec::new();
    if !status.is_client_error() {
        wrong.push(format!("the transaction answered {status}: {body}"));
    } else if !body.contains("Bundle.entry[1]") {
        wrong.push(format!(
            "the {status} outcome does not name Bundle.entry[1]: {body}"
        ));
    }
    if written != StatusCode::NOT_FOUND {
        wrong.push(format!(
            "Patient/tx-w of the failed transaction was written (GET answers {written})"
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test]
async fn batch_reports_each_entry_and_keeps_the_good_ones() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "locked", "active": true}))
        .await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "name": [{"family": "Batched"}]},
                "request": {"method": "POST", "url": "Patient"}
            },
            {
                "resource": {"resourceType": "Patient", "id": "b-put", "active": true},
                "request": {"method": "PUT", "url": "Patient/b-put"}
            },
            {
                "resource": {"resourceType": "Patient", "id": "something-else"},
                "request": {"method": "PUT", "url": "Patient/b-bad"}
            },
            {
                "resource": {"resourceType": "Patient", "id": "locked", "active": false},
                "request": {"method": "PUT", "url": "Patient/locked", "ifMatch": "W/\"9\""}
            },
            {
                "resource": {"resourceType": "Patient", "id": "locked", "active": true},
                "request": {"method": "PUT", "url": "Patient/locked"}
            }
        ]
    });
    let response = expect_json(post_bundle(&server, &bundle).await, StatusCode::OK).await;
    assert_eq!(response["type"], "batch-response");
    let results = entries(&response);
    assert_eq!(results.len(), 5, "{response}");
    let statuses: Vec<String> = results.iter().map(status_code).collect();
    assert_eq!(statuses, ["201", "201", "400", "412", "200"], "{response}");

    for bad in [&results[2], &results[3]] {
        assert_outcome_value(&bad["response"]["outcome"]);
    }
    let created_id = id_from_location(
        results[0]["response"]["location"]
            .as_str()
            .expect("location"),
        "Patient",
    );
    let created = server.get(&format!("/Patient/{created_id}")).await;
    let created = expect_json(created, StatusCode::OK).await;
    assert_eq!(created["name"][0]["family"], "Batched");
    expect_json(server.get("/Patient/b-put").await, StatusCode::OK).await;
    assert_outcome(server.get("/Patient/b-bad").await, StatusCode::NOT_FOUND).await;
    assert_outcome(
        server.get("/Patient/something-else").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let locked = expect_json(server.get("/Patient/locked").await, StatusCode::OK).await;
    assert_eq!(locked["active"], true);
    assert_eq!(locked["meta"]["versionId"], "1");
}

#[tokio::test]
async fn batch_get_entries_read_current_and_old_versions() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "g1", "gender": "female"}))
        .await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "g1", "gender": "male"}))
        .await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "g-del"}))
        .await;
    assert_outcome(server.delete("/Patient/g-del").await, StatusCode::OK).await;

    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/g1"}},
            {"request": {"method": "GET", "url": "Patient/g1/_history/1"}},
            {"request": {"method": "GET", "url": format!("{}/Patient/g1", server.base)}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"request": {"method": "GET", "url": "Patient/g-del"}}
        ]
    });
    let response = expect_json(post_bundle(&server, &bundle).await, StatusCode::OK).await;
    assert_eq!(response["type"], "batch-response");
    let results = entries(&response);
    let statuses: Vec<String> = results.iter().map(status_code).collect();
    assert_eq!(statuses, ["200", "200", "200", "404", "410"], "{response}");

    assert_eq!(results[0]["resource"]["gender"], "male");
    assert_eq!(results[0]["response"]["etag"], "W/\"2\"");
    assert_eq!(results[1]["resource"]["gender"], "female");
    assert_eq!(results[1]["resource"]["meta"]["versionId"], "1");
    assert_eq!(results[2]["resource"]["gender"], "male");
    assert_outcome_value(&results[3]["response"]["outcome"]);
    assert_outcome_value(&results[4]["response"]["outcome"]);
}

#[tokio::test]
async fn collection_bundle_is_400() {
    let server = spawn_server().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "id": "coll"},
                "request": {"method": "PUT", "url": "Patient/coll"}
            }
        ]
    });
    assert_outcome(post_bundle(&server, &bundle).await, StatusCode::BAD_REQUEST).await;
    assert_outcome(server.get("/Patient/coll").await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn posting_something_other_than_a_bundle_to_the_base_is_400() {
    let server = spawn_server().await;
    let not_a_bundle = json!({"resourceType": "Patient", "id": "nb", "type": "transaction"});
    assert_outcome(
        post_bundle(&server, &not_a_bundle).await,
        StatusCode::BAD_REQUEST,
    )
    .await;

    let invalid = server
        .client
        .post(&server.base)
        .header("content-type", FHIR_JSON)
        .body("{\"resourceType\":\"Bundle\",")
        .send()
        .await
        .unwrap();
    assert_outcome(invalid, StatusCode::BAD_REQUEST).await;

    let array = server
        .client
        .post(&server.base)
        .header("content-type", FHIR_JSON)
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_outcome(array, StatusCode::BAD_REQUEST).await;
    assert_eq!(patient_total(&server).await, 0);
}

#[tokio::test]
async fn bundle_with_the_wrong_content_type_is_415() {
    let server = spawn_server().await;
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": []});
    let response = server
        .request(Method::POST, "")
        .header("content-type", "text/plain")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
}
