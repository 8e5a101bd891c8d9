//! Type-level search and the CapabilityStatement.

use std::collections::BTreeSet;

use hearth_fhir::instant::{format_instant, now_micros, parse_instant};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

async fn search_set(server: &TestServer, path: &str) -> BTreeSet<String> {
    let ids = server.search_ids(path).await;
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "{path} returned duplicates: {ids:?}"
    );
    unique
}

fn last_updated(resource: &Value) -> String {
    resource["meta"]["lastUpdated"]
        .as_str()
        .expect("meta.lastUpdated")
        .to_owned()
}

#[tokio::test]
async fn searching_all_patients_of_the_loaded_set_gives_total_10() {
    let server = spawn_server_with_synthea().await;
    let response = server.get("/Patient").await;
    let bundle = expect_json(response, StatusCode::OK).await;
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 10);
    let ids: BTreeSet<String> = match_ids(&bundle).into_iter().collect();
    assert_eq!(ids, synthea_ids("Patient"));
    for entry in entries(&bundle) {
        let id = entry["resource"]["id"].as_str().unwrap();
        assert_eq!(entry["fullUrl"], format!("{}/Patient/{id}", server.base));
        assert_eq!(entry["search"]["mode"], "match");
    }
    assert!(link(&bundle, "self").is_some());
    assert!(link(&bundle, "next").is_none());

    let observations = expect_json(server.get("/Observation?_count=1").await, StatusCode::OK).await;
    assert_eq!(observations["total"], 1257);
}

#[tokio::test]
async fn paging_with_count_3_visits_every_patient_exactly_once() {
    let server = spawn_server_with_synthea().await;
    let mut url = server.url("/Patient?_count=3");
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 10, "paging does not end");
        let page = expect_json(server.get(&url).await, StatusCode::OK).await;
        assert_eq!(page["total"], 10, "every page tells the total");
        let page_ids = match_ids(&page);
        assert!(page_ids.len() <= 3, "a page larger than _count: {page}");
        ids.extend(page_ids);
        match link(&page, "next") {
            Some(next) => {
                assert!(next.starts_with(&server.base), "next link {next}");
                url = next;
            }
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(ids.len(), 10, "{ids:?}");
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), 10, "duplicates across pages: {ids:?}");
    assert_eq!(unique, synthea_ids("Patient"));
}

#[tokio::test]
async fn paging_is_stable_when_a_resource_is_updated_between_pages() {
    let server = spawn_server().await;
    for n in 0..6 {
        server
            .upsert(&json!({"resourceType": "Patient", "id": format!("p{n}")}))
            .await;
    }
    let first = expect_json(server.get("/Patient?_count=2").await, StatusCode::OK).await;
    let mut ids = match_ids(&first);
    // An update moves p0 (already seen) to the end of the change order.
    server
        .upsert(&json!({"resourceType": "Patient", "id": "p0", "active": true}))
        .await;
    let mut next = link(&first, "next");
    while let Some(url) = next {
        assert!(ids.len() < 20, "paging does not end");
        let page = expect_json(server.get(&url).await, StatusCode::OK).await;
        ids.extend(match_ids(&page));
        next = link(&page, "next");
    }
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        unique,
        set(&["p0", "p1", "p2", "p3", "p4", "p5"]),
        "{ids:?}"
    );
}

#[tokio::test]
async fn search_by_id_list() {
    let server = spawn_server().await;
    for id in ["a", "b", "c"] {
        server
            .upsert(&json!({"resourceType": "Patient", "id": id}))
            .await;
    }
    assert_eq!(
        search_set(&server, "/Patient?_id=a,b").await,
        set(&["a", "b"])
    );
    assert_eq!(search_set(&server, "/Patient?_id=c").await, set(&["c"]));
    assert_eq!(search_set(&server, "/Patient?_id=zzz").await, set(&[]));
    let bundle = expect_json(server.get("/Patient?_id=a,b").await, StatusCode::OK).await;
    assert_eq!(bundle["total"], 2);
}

#[tokio::test]
async fn last_updated_with_an_instant_between_two_writes() {
    let server = spawn_server().await;
    let first = server.create(&patient("First")).await;
    let between = format_instant(now_micros());
    let second = server.create(&patient("Second")).await;
    let third = server.create(&patient("Third")).await;
    let (p1, p2, p3) = (id_of(&first), id_of(&second), id_of(&third));
    let t1 = parse_instant(&last_updated(&first)).unwrap();
    let tb = parse_instant(&between).unwrap();
    let t2 = parse_instant(&last_updated(&second)).unwrap();
    assert!(t1 < tb && tb < t2, "the instant is between the writes");

    let later = set(&[&p2, &p3]);
    let earlier = set(&[&p1]);
    let q = |prefix: &str| {
        format!(
            "/Patient?_lastUpdated={}",
            enc(&format!("{prefix}{between}"))
        )
    };
    assert_eq!(search_set(&server, &q("gt")).await, later);
    assert_eq!(search_set(&server, &q("ge")).await, later);
    assert_eq!(search_set(&server, &q("lt")).await, earlier);
    assert_eq!(search_set(&server, &q("le")).await, earlier);
}

#[tokio::test]
async fn last_updated_prefixes_at_a_resource_s_own_instant() {
    let server = spawn_server().await;
    let first = server.create(&patient("First")).await;
    let second = server.create(&patient("Second")).await;
    let third = server.create(&patient("Third")).await;
    let (p1, p2, p3) = (id_of(&first), id_of(&second), id_of(&third));
    let t2 = last_updated(&second);
    let q = |value: String| format!("/Patient?_lastUpdated={}", enc(&value));

    assert_eq!(
        search_set(&server, &q(format!("gt{t2}"))).await,
        set(&[&p3])
    );
    assert_eq!(
        search_set(&server, &q(format!("ge{t2}"))).await,
        set(&[&p2, &p3])
    );
    assert_eq!(
        search_set(&server, &q(format!("lt{t2}"))).await,
        set(&[&p1])
    );
    assert_eq!(
        search_set(&server, &q(format!("le{t2}"))).await,
        set(&[&p1, &p2])
    );
    assert_eq!(search_set(&server, &q(t2.clone())).await, set(&[&p2]));
    assert_eq!(
        search_set(&server, &q(format!("eq{t2}"))).await,
        set(&[&p2])
    );

    // Two bounds narrow to what lies between them.
    let t1 = last_updated(&first);
    let t3 = last_updated(&third);
    let both = format!(
        "/Patient?_lastUpdated={}&_lastUpdated={}",
        enc(&format!("gt{t1}")),
        enc(&format!("lt{t3}"))
    );
    assert_eq!(search_set(&server, &both).await, set(&[&p2]));

    // From the start of the first write's day, and a year well in the past.
    let today = &t1[..10];
    assert_eq!(
        search_set(&server, &q(format!("ge{today}"))).await,
        set(&[&p1, &p2, &p3])
    );
    assert_eq!(search_set(&server, &q("lt2000".into())).await, set(&[]));
}

/// A search value stands for the whole period its precision covers: `2024-05-01T10:00:05Z`
/// is the whole second, so a resource updated at `10:00:05.5` is `eq`, `ge` and `le` that
/// value and is neither `gt` nor `lt` it.
#[tokio::test]
async fn last_updated_at_seconds_precision_covers_the_whole_second() {
    let server = spawn_server().await;
    let created = server.create(&patient("Second")).await;
    let id = id_of(&created);
    let instant = last_updated(&created);
    let mut micros = parse_instant(&instant).unwrap();
    if micros % 1_000_000 == 0 {
        // Exactly on the second: the case cannot tell a wrong range from a right one.
        let again = server
            .put_json(
                &format!("/Patient/{id}"),
                &json!({"resourceType": "Patient", "id": id, "active": true}),
            )
            .await;
        let again = expect_json(again, StatusCode::OK).await;
        micros = parse_instant(&last_updated(&again)).unwrap();
        assert_ne!(micros % 1_000_000, 0, "two writes on a whole second");
    }
    let second = format!("{}Z", &format_instant(micros)[..19]);

    let mut wrong = Vec::new();
    for (prefix, expect_match) in [
        ("eq", true),
        ("ge", true),
        ("le", true),
        ("gt", false),
        ("lt", false),
    ] {
        let path = format!(
            "/Patient?_lastUpdated={}",
            enc(&format!("{prefix}{second}"))
        );
        let found = search_set(&server, &path).await.contains(&id);
        if found != expect_match {
            wrong.push(format!(
                "_lastUpdated={prefix}{second} {} the resource updated at {}",
                if found { "matched" } else { "did not match" },
                format_instant(micros)
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test]
async fn summary_count_gives_the_total_and_no_entries() {
    let server = spawn_server().await;
    for n in 0..4 {
        server.create(&patient(&format!("Count{n}"))).await;
    }
    let bundle = expect_json(server.get("/Patient?_summary=count").await, StatusCode::OK).await;
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 4);
    assert!(entries(&bundle).is_empty(), "{bundle}");
    assert!(link(&bundle, "next").is_none());
}

#[tokio::test]
async fn an_unknown_search_parameter_is_400_naming_it() {
    let server = spawn_server().await;
    server.create(&patient("Known")).await;
    // `status` is not a Patient search parameter in R4 (bdt sends it anyway).
    let response = server.get("/Patient?status=active").await;
    let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
    assert!(outcome_text(&outcome).contains("status"), "{outcome}");
}

#[tokio::test]
async fn an_unknown_parameter_with_lenient_handling_is_reported_in_the_bundle() {
    let server = spawn_server().await;
    let id = id_of(&server.create(&patient("Lenient")).await);
    let response = server
        .request(reqwest::Method::GET, "/Patient?status=active")
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    let bundle = expect_json(response, StatusCode::OK).await;
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(match_ids(&bundle), [id]);
    let outcomes: Vec<Value> = entries(&bundle)
        .into_iter()
        .filter(|e| e["search"]["mode"] == "outcome")
        .collect();
    assert_eq!(outcomes.len(), 1, "{bundle}");
    let outcome = &outcomes[0]["resource"];
    assert_outcome_value(outcome);
    assert!(outcome_text(outcome).contains("status"), "{outcome}");
}

#[tokio::test]
async fn search_parameters_filter_and_page_by_keyset() {
    let server = spawn_server().await;
    let mut smiths = Vec::new();
    for i in 0..7 {
        smiths.push(id_of(&server.create(&patient("Smith")).await));
        server.create(&patient(&format!("Jones{i}"))).await;
    }
    // Prefix match, case-insensitive (FHIR string search), paged three at a time.
    let mut found = Vec::new();
    let mut url = "/Patient?family=smi&_count=3".to_owned();
    loop {
        let bundle = expect_json(server.get(&url).await, StatusCode::OK).await;
        assert_eq!(bundle["total"], 7, "{bundle}");
        found.extend(match_ids(&bundle));
        match link(&bundle, "next") {
            Some(next) => url = next.trim_start_matches(&server.base).to_owned(),
            None => break,
        }
    }
    assert_eq!(found, smiths);
    let none = expect_json(
        server.get("/Patient?family:exact=smi").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(none["total"], 0, "{none}");
}

#[tokio::test]
async fn a_bad_count_is_400() {
    let server = spawn_server().await;
    for bad in ["abc", "-1", "2.5"] {
        let response = server.get(&format!("/Patient?_count={}", enc(bad))).await;
        let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
        assert!(outcome_text(&outcome).contains("_count"), "{outcome}");
    }
}

#[tokio::test]
async fn a_bad_last_updated_is_400() {
    let server = spawn_server().await;
    for bad in [
        "yesterday",
        "gt2024-13-01",
        "xx2024-01-01",
        "2024-01-01T25:00:00Z",
        "",
    ] {
        let response = server
            .get(&format!("/Patient?_lastUpdated={}", enc(bad)))
            .await;
        let outcome = assert_outcome(response, StatusCode::BAD_REQUEST).await;
        assert!(
            outcome_text(&outcome).contains("_lastUpdated"),
            "{bad}: {outcome}"
        );
    }
}

#[tokio::test]
async fn deleted_resources_disappear_from_search() {
    let server = spawn_server().await;
    let keep = id_of(&server.create(&patient("Keep")).await);
    let drop = id_of(&server.create(&patient("Drop")).await);
    assert_eq!(search_set(&server, "/Patient").await, set(&[&keep, &drop]));

    assert_outcome(
        server.delete(&format!("/Patient/{drop}")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(search_set(&server, "/Patient").await, set(&[&keep]));
    let bundle = expect_json(server.get("/Patient").await, StatusCode::OK).await;
    assert_eq!(bundle["total"], 1);
    let by_id = format!("/Patient?_id={drop}");
    assert_eq!(search_set(&server, &by_id).await, set(&[]));
}

#[tokio::test]
async fn an_updated_resource_is_found_once_in_its_new_version() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "u", "gender": "female"}))
        .await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "u", "gender": "male"}))
        .await;
    let bundle = expect_json(server.get("/Patient").await, StatusCode::OK).await;
    assert_eq!(bundle["total"], 1);
    let found = entries(&bundle);
    assert_eq!(found.len(), 1, "{bundle}");
    assert_eq!(found[0]["resource"]["gender"], "male");
    assert_eq!(found[0]["resource"]["meta"]["versionId"], "2");
}

#[tokio::test]
async fn metadata_is_a_capability_statement_for_fhir_4_0_1() {
    let server = spawn_server().await;
    let statement = expect_json(server.get("/metadata").await, StatusCode::OK).await;
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    let resources = statement["rest"][0]["resource"]
        .as_array()
        .expect("rest[0].resource");
    let patient = resources
        .iter()
        .find(|r| r["type"] == "Patient")
        .expect("a Patient entry");
    let interactions: Vec<&str> = patient["interaction"]
        .as_array()
        .expect("interactions")
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    for code in ["read", "vread", "update", "delete", "create", "search-type"] {
        assert!(interactions.contains(&code), "Patient lacks {code}");
    }
}
