//! Patient- and Group-level Bulk Data export end to end (issue 4), as a Bulk Data client sees
//! it: `[base]/Patient/$export` and `[base]/Group/[id]/$export` over GET and POST, the
//! `patient` parameter, `_typeFilter` / `_typePostFetchFilterUrl` (checked against REST search
//! with the same parameters), `_elements`, `includeAssociatedData`, `_since` with deletions,
//! and their discovery in `/metadata`.
//!
//! Expected compartments are computed here, independently of the server, by walking each
//! resource's JSON along the links that the R4 Patient CompartmentDefinition lists for its
//! type ([`COMPARTMENT_LINKS`], written out by hand).

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::time::Duration;

use futures::StreamExt;
use hearth_fhir::instant::{format_instant, parse_instant};
use reqwest::{Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::helpers::*;

/// The Synthea set's only female patient (Tremblay).
const FEMALE: &str = "dbf9798e-4b52-4cd9-a9eb-ec36149c859a";

/// Marquardt's compartment in the Synthea set, counted by hand (a Python walk of the NDJSON
/// files along [`COMPARTMENT_LINKS`]): 242 resources. Every Synthea resource reaches its patient
/// through its type's main link only (`subject` or `patient`); ExplanationOfBenefit also has
/// references to the patient inside `contained`, which are not compartment links.
const PATIENT_SYNTHEA_COUNTS: &[(&str, usize)] = &[
    ("AllergyIntolerance", 1),
    ("CarePlan", 5),
    ("Claim", 29),
    ("Condition", 7),
    ("DiagnosticReport", 5),
    ("Encounter", 22),
    ("ExplanationOfBenefit", 22),
    ("Immunization", 13),
    ("MedicationRequest", 7),
    ("Observation", 106),
    ("Patient", 1),
    ("Procedure", 24),
];

/// The links of the R4 Patient CompartmentDefinition (4.0.1) for every type these tests store,
/// each search parameter's FHIRPath reduced by hand to element paths:
/// - AllergyIntolerance: `patient`, `recorder`, `asserter`
/// - CarePlan: `patient` (subject), `performer` (activity.detail.performer)
/// - Claim, ExplanationOfBenefit: `patient`, `payee` (payee.party)
/// - Condition: `patient` (subject), `asserter`
/// - Coverage: `policy-holder`, `subscriber`, `beneficiary`, `payor`
/// - DiagnosticReport, MedicationRequest: `subject`
/// - DocumentReference: `subject`, `author`
/// - Encounter: `patient` (subject); `participant` is not a Patient-compartment link
/// - Goal, ImagingStudy: `patient` (subject)
/// - Group: `member` (member.entity)
/// - Immunization: `patient`
/// - Observation: `subject`, `performer`; `focus` is not a link
/// - Patient: `link` (link.other), and every Patient is in its own compartment
/// - Procedure: `patient` (subject), `performer` (performer.actor)
/// - Provenance: `patient` (target, where it is a Patient)
///
/// Organization and Practitioner ([`OUTSIDE_COMPARTMENT`]) are in no Patient compartment.
const COMPARTMENT_LINKS: &[(&str, &[&[&str]])] = &[
    (
        "AllergyIntolerance",
        &[&["patient"], &["recorder"], &["asserter"]],
    ),
    (
        "CarePlan",
        &[&["subject"], &["activity", "detail", "performer"]],
    ),
    ("Claim", &[&["patient"], &["payee", "party"]]),
    ("Condition", &[&["subject"], &["asserter"]]),
    (
        "Coverage",
        &[
            &["policyHolder"],
            &["subscriber"],
            &["beneficiary"],
            &["payor"],
        ],
    ),
    ("DiagnosticReport", &[&["subject"]]),
    ("DocumentReference", &[&["subject"], &["author"]]),
    ("Encounter", &[&["subject"]]),
    ("ExplanationOfBenefit", &[&["patient"], &["payee", "party"]]),
    ("Goal", &[&["subject"]]),
    ("Group", &[&["member", "entity"]]),
    ("ImagingStudy", &[&["subject"]]),
    ("Immunization", &[&["patient"]]),
    ("MedicationRequest", &[&["subject"]]),
    ("Observation", &[&["subject"], &["performer"]]),
    ("Patient", &[&["link", "other"]]),
    ("Procedure", &[&["subject"], &["performer", "actor"]]),
    ("Provenance", &[&["target"]]),
];

const OUTSIDE_COMPARTMENT: &[&str] = &["Organization", "Practitioner"];

const BODY_WEIGHT: &str = "http://loinc.org|29463-7";
const BODY_HEIGHT: &str = "http://loinc.org|8302-2";
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

// ---------------------------------------------------------------------------------------------
// helpers

/// Resource lines per type.
type Lines = BTreeMap<String, Vec<String>>;
/// Resource ids per type.
type Ids = BTreeMap<String, BTreeSet<String>>;

/// A finished export with every file downloaded.
struct Finished {
    manifest: Value,
    output: Lines,
    /// The `deleted` lines (transaction Bundles), parsed.
    deleted: Vec<Value>,
    /// The OperationOutcomes of the `error` files.
    errors: Vec<Value>,
}

impl Finished {
    /// Output ids per type, asserting no resource is exported twice.
    fn ids(&self) -> Ids {
        ids_by_type(&self.output)
    }

    fn ids_of(&self, resource_type: &str) -> BTreeSet<String> {
        self.ids().remove(resource_type).unwrap_or_default()
    }

    /// The error OperationOutcomes whose first issue points at `parameter`.
    fn errors_naming(&self, parameter: &str) -> Vec<&Value> {
        self.errors
            .iter()
            .filter(|o| o["issue"][0]["expression"][0] == parameter)
            .collect()
    }
}

/// Kicks off (strict), waits and downloads everything.
async fn run(server: &TestServer, path: &str, body: Option<&Value>) -> Finished {
    finish(server, export_kick_off(server, path, body, false).await).await
}

/// As [`run`], with `Prefer: handling=lenient`.
async fn run_lenient(server: &TestServer, path: &str, body: Option<&Value>) -> Finished {
    finish(server, export_kick_off(server, path, body, true).await).await
}

async fn finish(server: &TestServer, response: Response) -> Finished {
    let request_url = response.url().to_string();
    let status_url = export_accepted(server, response).await;
    let manifest = export_manifest(server, &status_url).await;
    assert_eq!(
        manifest["request"], request_url,
        "the manifest's request is the kick-off URL (without a POST body)"
    );
    let output = download_kind(server, &manifest, "output").await;
    let deleted = download_kind(server, &manifest, "deleted").await;
    for resource_type in deleted.keys() {
        assert_eq!(resource_type, "Bundle", "{manifest}");
    }
    let errors = download_kind(server, &manifest, "error").await;
    for resource_type in errors.keys() {
        assert_eq!(resource_type, "OperationOutcome", "{manifest}");
    }
    let parse_all =
        |lines: Lines| -> Vec<Value> { lines.into_values().flatten().map(|l| parse(&l)).collect() };
    let errors = parse_all(errors);
    for outcome in &errors {
        assert_outcome_value(outcome);
    }
    Finished {
        manifest,
        output,
        deleted: parse_all(deleted),
        errors,
    }
}

/// Downloads every item of one manifest array: every line a resource of the item's type, as
/// many lines as its `count`.
async fn download_kind(server: &TestServer, manifest: &Value, kind: &str) -> Lines {
    let mut lines = Lines::new();
    for item in manifest[kind].as_array().into_iter().flatten() {
        let resource_type = item["type"].as_str().expect("a type");
        let url = item["url"].as_str().expect("a url");
        let file_lines = export_file_lines(server, url).await;
        assert_eq!(
            file_lines.len() as u64,
            item["count"].as_u64().expect("a count"),
            "{url}: the count is not the number of lines"
        );
        for line in &file_lines {
            assert_eq!(
                parse(line)["resourceType"],
                resource_type,
                "a line of a {resource_type} file: {line}"
            );
        }
        lines
            .entry(resource_type.to_owned())
            .or_default()
            .extend(file_lines);
    }
    lines
}

/// Ids per type, asserting none is repeated.
fn ids_by_type(lines: &Lines) -> Ids {
    let mut ids = Ids::new();
    for (resource_type, lines) in lines {
        let set = ids.entry(resource_type.clone()).or_default();
        for line in lines {
            let id = id_of(&parse(line));
            assert!(
                set.insert(id.clone()),
                "{resource_type}/{id} is exported more than once"
            );
        }
    }
    ids
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

/// Every line is byte for byte what `GET [base]/<type>/<id>` answers.
async fn assert_lines_are_reads(server: &TestServer, resource_type: &str, lines: &[String]) {
    let mismatches: Vec<String> = futures::stream::iter(lines.iter())
        .map(|line| async move {
            let id = id_of(&parse(line));
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

/// `GET [base]/<type>/<id>`, parsed.
async fn read(server: &TestServer, resource_type: &str, id: &str) -> Value {
    expect_json(
        server.get(&format!("/{resource_type}/{id}")).await,
        StatusCode::OK,
    )
    .await
}

/// The ids a REST search selects (every page), asserting none is repeated.
async fn search(server: &TestServer, path: &str) -> BTreeSet<String> {
    let separator = if path.contains('?') { '&' } else { '?' };
    let ids = server
        .search_ids(&format!("{path}{separator}_count=1000"))
        .await;
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(set.len(), ids.len(), "{path} returned duplicates");
    set
}

/// Every resource of the Synthea set, as in its files.
fn synthea_resources() -> Vec<Value> {
    let mut resources = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(synthea_dir())
        .expect("the test data directory")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".ndjson.gz"))
        .collect();
    files.sort();
    for path in files {
        let file = std::fs::File::open(&path).expect("a test data file");
        let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
        for line in reader.lines() {
            let line = line.expect("a readable line");
            if !line.trim().is_empty() {
                resources.push(parse(&line));
            }
        }
    }
    assert_eq!(resources.len(), 2523);
    resources
}

/// The Synthea set's ids per type.
fn synthea_ids_by_type(resources: &[Value]) -> Ids {
    let mut ids = Ids::new();
    for resource in resources {
        ids.entry(resource_type(resource).to_owned())
            .or_default()
            .insert(id_of(resource));
    }
    ids
}

fn resource_type(resource: &Value) -> &str {
    resource["resourceType"].as_str().expect("a resourceType")
}

/// The `reference`s found by following `path` from `node`, fanning out over arrays.
fn references_at<'a>(node: &'a Value, path: &[&str], out: &mut Vec<&'a str>) {
    match node {
        Value::Array(items) => {
            for item in items {
                references_at(item, path, out);
            }
        }
        Value::Object(object) => match path.split_first() {
            None => {
                if let Some(reference) = object.get("reference").and_then(Value::as_str) {
                    out.push(reference);
                }
            }
            Some((step, rest)) => {
                if let Some(child) = object.get(*step) {
                    references_at(child, rest, out);
                }
            }
        },
        _ => {}
    }
}

/// Whether `resource` is in the compartment of `Patient/<patient>` by [`COMPARTMENT_LINKS`].
fn in_compartment(resource: &Value, patient: &str) -> bool {
    let resource_type = resource_type(resource);
    if OUTSIDE_COMPARTMENT.contains(&resource_type) {
        return false;
    }
    if resource_type == "Patient" && resource["id"] == patient {
        return true;
    }
    let links = COMPARTMENT_LINKS
        .iter()
        .find(|(t, _)| *t == resource_type)
        .unwrap_or_else(|| panic!("no hand-listed compartment links for {resource_type}"))
        .1;
    let wanted = patient_ref(patient);
    links.iter().any(|path| {
        let mut references = Vec::new();
        references_at(resource, path, &mut references);
        references.contains(&wanted.as_str())
    })
}

/// The ids per type of the resources in the compartment of any of `patients`.
fn compartments(resources: &[Value], patients: &[&str]) -> Ids {
    let mut ids = Ids::new();
    for resource in resources {
        if patients.iter().any(|p| in_compartment(resource, p)) {
            ids.entry(resource_type(resource).to_owned())
                .or_default()
                .insert(id_of(resource));
        }
    }
    ids
}

fn counts(ids: &Ids) -> BTreeMap<String, usize> {
    ids.iter().map(|(t, set)| (t.clone(), set.len())).collect()
}

/// Stores resources with PUT at their ids.
async fn store_all(server: &TestServer, resources: &[Value]) {
    for resource in resources {
        server.upsert(resource).await;
    }
}

/// The ids of the Synthea patients, sorted.
fn synthea_patients() -> Vec<String> {
    synthea_ids("Patient").into_iter().collect()
}

/// A Group of `members` (each a ready `Group.member` entry).
fn group(id: &str, members: Vec<Value>) -> Value {
    json!({
        "resourceType": "Group",
        "id": id,
        "type": "person",
        "actual": true,
        "member": members
    })
}

fn member(reference: &str) -> Value {
    json!({"entity": {"reference": reference}})
}

/// An Observation of `patient` coded `code` (`system|code`).
fn observation(id: &str, patient: &str, code: &str) -> Value {
    let (system, code) = code.split_once('|').expect("system|code");
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": patient_ref(patient)}
    })
}

fn provenance(id: &str, targets: &[&str]) -> Value {
    let target: Vec<Value> = targets.iter().map(|t| json!({"reference": t})).collect();
    json!({
        "resourceType": "Provenance",
        "id": id,
        "target": target,
        "recorded": "2020-01-01T00:00:00Z",
        "agent": [{"who": {"display": "a test"}}]
    })
}

/// Resources added to the Synthea set for the compartment test. `in_patient` are in
/// [`PATIENT`]'s compartment only through links other than a type's main one (most belong to
/// [`OTHER`] by their main link); `outside` reference [`PATIENT`] through elements that are not
/// compartment links.
fn compartment_extras(patient_observation: &str) -> (Vec<Value>, Vec<Value>) {
    let p = json!({"reference": patient_ref(PATIENT)});
    let q = json!({"reference": patient_ref(OTHER)});
    let in_patient = vec![
        json!({"resourceType": "Observation", "id": "x-observation-performer", "status": "final",
            "code": {"text": "performed by the patient"}, "subject": q, "performer": [p]}),
        json!({"resourceType": "Procedure", "id": "x-procedure-performer", "status": "completed",
            "subject": q, "performer": [{"actor": p}]}),
        json!({"resourceType": "Claim", "id": "x-claim-payee", "status": "active",
            "type": {"text": "x"}, "use": "claim", "patient": q, "created": "2020-01-01",
            "provider": {"display": "x"}, "priority": {"text": "normal"},
            "payee": {"type": {"text": "subscriber"}, "party": p}}),
        json!({"resourceType": "ExplanationOfBenefit", "id": "x-eob-payee", "status": "active",
            "type": {"text": "x"}, "use": "claim", "patient": q, "created": "2020-01-01",
            "insurer": {"display": "x"}, "provider": {"display": "x"}, "outcome": "complete",
            "insurance": [{"focal": true, "coverage": {"display": "x"}}],
            "payee": {"party": p}}),
        json!({"resourceType": "CarePlan", "id": "x-careplan-performer", "status": "active",
            "intent": "plan", "subject": q,
            "activity": [{"detail": {"status": "completed", "performer": [p]}}]}),
        json!({"resourceType": "Condition", "id": "x-condition-asserter", "subject": q,
            "asserter": p}),
        json!({"resourceType": "AllergyIntolerance", "id": "x-allergy-recorder", "patient": q,
            "recorder": p}),
        json!({"resourceType": "AllergyIntolerance", "id": "x-allergy-asserter", "patient": q,
            "asserter": p}),
        json!({"resourceType": "Coverage", "id": "x-coverage-policy-holder", "status": "active",
            "beneficiary": q, "policyHolder": p, "payor": [{"display": "x"}]}),
        json!({"resourceType": "DocumentReference", "id": "x-document-author",
            "status": "current", "subject": q, "author": [p],
            "content": [{"attachment": {"contentType": "text/plain", "data": "aGk="}}]}),
        provenance("x-provenance-patient", &[&patient_ref(PATIENT)]),
        group("x-group", vec![member(&patient_ref(PATIENT))]),
        json!({"resourceType": "Patient", "id": "x-patient-link",
            "link": [{"other": p, "type": "seealso"}]}),
    ];
    let outside = vec![
        json!({"resourceType": "Observation", "id": "x-observation-focus", "status": "final",
            "code": {"text": "about the patient"}, "subject": q, "focus": [p]}),
        json!({"resourceType": "MedicationRequest", "id": "x-medication-requester",
            "status": "active", "intent": "order", "medicationCodeableConcept": {"text": "x"},
            "subject": q, "requester": p}),
        provenance(
            "x-provenance-observation",
            &[&format!("Observation/{patient_observation}")],
        ),
        json!({"resourceType": "Encounter", "id": "x-encounter-participant",
            "status": "finished", "class": {"code": "AMB"}, "subject": q,
            "participant": [{"individual": p}]}),
    ];
    (in_patient, outside)
}

/// The ids of `PATIENT`'s Synthea Observations, sorted.
fn patient_observations(resources: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = resources
        .iter()
        .filter(|r| {
            resource_type(r) == "Observation"
                && r["subject"]["reference"] == patient_ref(PATIENT).as_str()
        })
        .map(id_of)
        .collect();
    ids.sort();
    ids
}

/// `_typeFilter` value `Type?name=value` with the search value URL-encoded, as the IG asks.
fn type_filter(resource_type: &str, name: &str, value: &str) -> String {
    format!("{resource_type}?{name}={}", enc(value))
}

/// Asserts `line` is `stored` (a read) trimmed to `resourceType`, `id`, `meta` and the
/// top-level elements `kept` names (a choice element `value` keeps `valueQuantity`...), with
/// `meta.tag` ending in exactly the SUBSETTED coding.
fn assert_subsetted(line: &str, stored: &Value, kept: &[&str]) {
    let got = parse(line);
    let keeps = |key: &str| {
        matches!(key, "resourceType" | "id" | "meta")
            || kept.iter().any(|k| {
                key == *k
                    || key
                        .strip_prefix(k)
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
            })
    };
    let mut expected = Map::new();
    for (key, value) in stored.as_object().expect("an object") {
        if keeps(key) {
            expected.insert(key.clone(), value.clone());
        }
    }
    let mut meta = stored["meta"].clone();
    let tags = meta
        .as_object_mut()
        .expect("a stored resource has meta")
        .entry("tag")
        .or_insert_with(|| json!([]));
    tags.as_array_mut()
        .expect("meta.tag is an array")
        .push(json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
    expected.insert("meta".into(), meta);
    assert_eq!(
        got,
        Value::Object(expected),
        "a trimmed {} is not its stored version cut to {kept:?} and tagged SUBSETTED",
        resource_type(stored)
    );
    let last_tag = got["meta"]["tag"]
        .as_array()
        .and_then(|tags| tags.last())
        .expect("a SUBSETTED tag");
    assert_eq!(
        last_tag.as_object().map(Map::len),
        Some(2),
        "the SUBSETTED tag has exactly system and code: {last_tag}"
    );
}

/// Asserts every line of `lines` is its read trimmed to `kept`.
async fn assert_all_subsetted(server: &TestServer, lines: &[String], kept: &[&str]) {
    assert!(!lines.is_empty());
    for line in lines {
        let value = parse(line);
        let stored = read(server, resource_type(&value), &id_of(&value)).await;
        assert_subsetted(line, &stored, kept);
    }
}

// ---------------------------------------------------------------------------------------------
// Patient level

#[tokio::test]
async fn patient_export_get_and_post_cover_every_compartment_resource_once_as_stored() {
    let server = spawn_server_with_synthea().await;
    let mut expected = synthea_ids_by_type(&synthea_resources());
    for outside in OUTSIDE_COMPARTMENT {
        assert!(expected.remove(*outside).is_some());
    }

    let get = run(&server, "/Patient/$export", None).await;
    assert_eq!(get.ids(), expected, "GET Patient/$export");
    assert!(
        get.errors.is_empty() && get.deleted.is_empty(),
        "{}",
        get.manifest
    );
    for (resource_type, lines) in &get.output {
        assert_lines_are_reads(&server, resource_type, lines).await;
    }

    let post = run(&server, "/Patient/$export", Some(&parameters(&[]))).await;
    assert_eq!(
        post.manifest["request"],
        format!("{}/Patient/$export", server.base)
    );
    assert_eq!(post.ids(), expected, "POST Patient/$export");
}

#[tokio::test]
async fn the_patient_restricted_export_is_exactly_the_hand_checked_compartment() {
    let server = spawn_server_with_synthea().await;
    let synthea = synthea_resources();

    // The walk agrees with the hand count on the Synthea set alone.
    let synthea_compartment = compartments(&synthea, &[PATIENT]);
    let hand: BTreeMap<String, usize> = PATIENT_SYNTHEA_COUNTS
        .iter()
        .map(|(t, n)| ((*t).to_owned(), *n))
        .collect();
    assert_eq!(counts(&synthea_compartment), hand);

    // Resources linked to the patient through every other kind of compartment link, and some
    // that mention the patient outside any compartment link.
    let observations = patient_observations(&synthea);
    let (in_patient, outside) = compartment_extras(&observations[0]);
    store_all(&server, &in_patient).await;
    store_all(&server, &outside).await;
    let mut all = synthea.clone();
    all.extend(in_patient.iter().cloned());
    all.extend(outside.iter().cloned());
    let expected = compartments(&all, &[PATIENT]);
    for extra in &in_patient {
        assert!(expected[resource_type(extra)].contains(&id_of(extra)));
    }
    for extra in &outside {
        assert!(
            !expected
                .get(resource_type(extra))
                .is_some_and(|ids| ids.contains(&id_of(extra)))
        );
    }
    assert_eq!(
        counts(&expected).values().sum::<usize>(),
        242 + in_patient.len()
    );
    // The Bulk Data IG adds to the strict compartment: a Patient-level export SHALL include
    // the Provenance whose target is in the compartment (here one of the patient's
    // Observations), not only those that target the Patient.
    let mut expected = expected;
    expected
        .entry("Provenance".to_owned())
        .or_default()
        .insert("x-provenance-observation".to_owned());

    let body = parameters(&[("patient", &patient_ref(PATIENT))]);
    let export = run(&server, "/Patient/$export", Some(&body)).await;
    assert_eq!(
        export.ids(),
        expected,
        "Patient/$export with patient=Patient/{PATIENT}"
    );
    assert!(export.errors.is_empty(), "{:?}", export.errors);
    for (resource_type, lines) in &export.output {
        assert_lines_are_reads(&server, resource_type, lines).await;
    }
}

#[tokio::test]
async fn types_outside_the_patient_compartment_are_refused_or_left_out_and_reported() {
    let server = spawn_server_with_synthea().await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    for level in ["/Patient/$export", "/Group/g/$export"] {
        for types in [
            "Organization",
            "Patient,Organization",
            "Practitioner,Observation",
        ] {
            let path = format!("{level}?_type={types}");
            expect_refused(export_kick_off(&server, &path, None, false).await, "_type").await;
        }
        let lenient = run_lenient(
            &server,
            &format!("{level}?_type=Patient,Organization"),
            None,
        )
        .await;
        let expected_patients: BTreeSet<String> = if level.starts_with("/Group") {
            BTreeSet::from([PATIENT.to_owned()])
        } else {
            synthea_ids("Patient")
        };
        assert_eq!(
            lenient.ids(),
            Ids::from([("Patient".to_owned(), expected_patients)]),
            "{level}"
        );
        let reported = lenient.errors_naming("_type");
        assert_eq!(reported.len(), 1, "{level}: {:?}", lenient.errors);
        assert!(outcome_text(reported[0]).contains("Organization"));
    }
}

// ---------------------------------------------------------------------------------------------
// Group level

#[tokio::test]
async fn group_export_covers_active_patient_members_at_transaction_time_only() {
    let server = spawn_server_with_synthea().await;
    let synthea = synthea_resources();
    let patients = synthea_patients();
    let [
        active,
        inactive,
        ended,
        future,
        current,
        not_member,
        absolute,
    ] = [0, 1, 2, 3, 4, 5, 6].map(|i| patients[i].as_str());
    let practitioner = synthea_ids("Practitioner")
        .into_iter()
        .next()
        .expect("a Practitioner");
    let g1 = group(
        "g1",
        vec![
            member(&patient_ref(active)),
            json!({"entity": {"reference": patient_ref(inactive)}, "inactive": true}),
            json!({"entity": {"reference": patient_ref(ended)},
                "period": {"start": "1990-01-01", "end": "2001-01-01"}}),
            json!({"entity": {"reference": patient_ref(future)},
                "period": {"start": "2090-01-01T00:00:00Z"}}),
            json!({"entity": {"reference": patient_ref(current)},
                "period": {"start": "2000-01-01", "end": "2090-01-01"}}),
            member(&format!("Practitioner/{practitioner}")),
            // An absolute reference to this server's Patient, and a member listed twice.
            member(&format!("{}/Patient/{absolute}", server.base)),
            member(&patient_ref(active)),
        ],
    );
    server.upsert(&g1).await;
    let mut all = synthea.clone();
    all.push(g1);
    let expected = compartments(&all, &[active, current, absolute]);
    assert_eq!(expected["Group"], BTreeSet::from(["g1".to_owned()]));
    assert_eq!(
        expected["Patient"],
        BTreeSet::from([active.to_owned(), current.to_owned(), absolute.to_owned()])
    );

    let get = run(&server, "/Group/g1/$export", None).await;
    assert_eq!(get.ids(), expected, "GET Group/g1/$export");
    assert!(get.errors.is_empty(), "{:?}", get.errors);
    for (resource_type, lines) in &get.output {
        assert_lines_are_reads(&server, resource_type, lines).await;
    }
    for left_out in [inactive, ended, future, not_member] {
        assert!(!get.ids_of("Patient").contains(left_out));
    }
    assert!(get.ids_of("Practitioner").is_empty());

    let post = run(&server, "/Group/g1/$export", Some(&parameters(&[]))).await;
    assert_eq!(
        post.manifest["request"],
        format!("{}/Group/g1/$export", server.base)
    );
    assert_eq!(post.ids(), expected, "POST Group/g1/$export");
}

#[tokio::test]
async fn a_resource_in_the_compartments_of_two_members_is_exported_once() {
    let server = spawn_server_with_synthea().await;
    let mut all = synthea_resources();
    let shared = json!({"resourceType": "Observation", "id": "shared", "status": "final",
        "code": {"text": "seen by both"},
        "subject": {"reference": patient_ref(PATIENT)},
        "performer": [{"reference": patient_ref(OTHER)}]});
    let g2 = group(
        "g2",
        vec![member(&patient_ref(PATIENT)), member(&patient_ref(OTHER))],
    );
    store_all(&server, &[shared.clone(), g2.clone()]).await;
    all.push(shared);
    all.push(g2);
    let expected = compartments(&all, &[PATIENT, OTHER]);
    assert!(expected["Observation"].contains("shared"));
    assert_eq!(expected["Group"], BTreeSet::from(["g2".to_owned()]));

    // `ids()` fails on any resource exported twice.
    let by_group = run(&server, "/Group/g2/$export", None).await;
    assert_eq!(by_group.ids(), expected, "Group/g2/$export");

    let body = parameters(&[
        ("patient", &patient_ref(PATIENT)),
        ("patient", &patient_ref(OTHER)),
    ]);
    let by_patients = run(&server, "/Patient/$export", Some(&body)).await;
    assert_eq!(
        by_patients.ids(),
        expected,
        "Patient/$export, patient= both"
    );

    let everyone = run(&server, "/Patient/$export?_type=Observation,Group", None).await;
    assert!(everyone.ids_of("Observation").contains("shared"));
    assert_eq!(everyone.ids_of("Group"), BTreeSet::from(["g2".to_owned()]));
}

#[tokio::test]
async fn an_unknown_or_deleted_group_is_404_with_an_operation_outcome() {
    let server = spawn_server_with_synthea().await;
    let get = export_kick_off(&server, "/Group/no-such-group/$export", None, false).await;
    assert_outcome(get, StatusCode::NOT_FOUND).await;
    let post = export_kick_off(
        &server,
        "/Group/no-such-group/$export",
        Some(&parameters(&[])),
        false,
    )
    .await;
    assert_outcome(post, StatusCode::NOT_FOUND).await;

    server
        .upsert(&group("gone", vec![member(&patient_ref(PATIENT))]))
        .await;
    let deleted = server.delete("/Group/gone").await;
    assert!(deleted.status().is_success(), "{}", deleted.status());
    let after = export_kick_off(&server, "/Group/gone/$export", None, false).await;
    assert_outcome(after, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn a_group_without_active_patient_members_exports_an_empty_manifest() {
    let server = spawn_server_with_synthea().await;
    let practitioner = synthea_ids("Practitioner")
        .into_iter()
        .next()
        .expect("a Practitioner");
    server.upsert(&group("empty", vec![])).await;
    server
        .upsert(&json!({"resourceType": "Group", "id": "bare", "type": "person", "actual": true}))
        .await;
    server
        .upsert(&group(
            "nobody-active",
            vec![
                json!({"entity": {"reference": patient_ref(PATIENT)}, "inactive": true}),
                json!({"entity": {"reference": patient_ref(OTHER)},
                    "period": {"end": "2001-01-01"}}),
                member(&format!("Practitioner/{practitioner}")),
            ],
        ))
        .await;
    for id in ["empty", "bare", "nobody-active"] {
        let export = run(&server, &format!("/Group/{id}/$export"), None).await;
        assert_eq!(export.manifest["output"], json!([]), "Group/{id}");
        assert_eq!(export.manifest["error"], json!([]), "Group/{id}");
    }
}

// ---------------------------------------------------------------------------------------------
// `patient`

#[tokio::test]
async fn unknown_and_non_member_patients_are_reported_in_error_and_the_kick_off_is_202() {
    let server = spawn_server_with_synthea().await;
    let mut all = synthea_resources();
    let patients = synthea_patients();
    let (member_id, inactive, outsider) = (
        patients[0].as_str(),
        patients[1].as_str(),
        patients[2].as_str(),
    );
    let g3 = group(
        "g3",
        vec![
            member(&patient_ref(member_id)),
            json!({"entity": {"reference": patient_ref(inactive)}, "inactive": true}),
        ],
    );
    server.upsert(&g3).await;
    all.push(g3);

    // Patient level: one known, one unknown and one deleted patient.
    let deleted = patients[3].as_str();
    assert!(![PATIENT, member_id, inactive, outsider].contains(&deleted));
    let response = server.delete(&format!("/Patient/{deleted}")).await;
    assert!(response.status().is_success(), "{}", response.status());
    let body = parameters(&[
        ("patient", &patient_ref(PATIENT)),
        ("patient", "Patient/does-not-exist"),
        ("patient", &patient_ref(deleted)),
    ]);
    let export = run(&server, "/Patient/$export", Some(&body)).await;
    assert_eq!(export.ids(), compartments(&all, &[PATIENT]));
    assert_eq!(export.errors.len(), 2, "{:?}", export.errors);
    let reported = export.errors_naming("patient");
    assert_eq!(reported.len(), 2, "{:?}", export.errors);
    let text: String = reported.iter().map(|o| outcome_text(o)).collect();
    assert!(
        text.contains("does-not-exist") && text.contains(deleted),
        "{text}"
    );

    // Group level: a member, an inactive member and a patient not in the Group.
    let body = parameters(&[
        ("patient", &patient_ref(member_id)),
        ("patient", &patient_ref(inactive)),
        ("patient", &patient_ref(outsider)),
    ]);
    let export = run(&server, "/Group/g3/$export", Some(&body)).await;
    assert_eq!(export.ids(), compartments(&all, &[member_id]));
    let reported = export.errors_naming("patient");
    assert_eq!(reported.len(), 2, "{:?}", export.errors);
    let text: String = reported.iter().map(|o| outcome_text(o)).collect();
    assert!(text.contains(inactive) && text.contains(outsider), "{text}");
    assert!(!text.contains(member_id), "{text}");
}

#[tokio::test]
async fn bdt_patient_references_to_123_and_456_succeed_at_patient_and_group_level() {
    let server = spawn_server_with_synthea().await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    let body = parameters(&[("patient", "Patient/123"), ("patient", "Patient/456")]);
    for level in ["/Patient/$export", "/Group/g/$export"] {
        let export = run(&server, level, Some(&body)).await;
        assert_eq!(export.manifest["output"], json!([]), "{level}");
        let reported = export.errors_naming("patient");
        assert_eq!(reported.len(), 2, "{level}: {:?}", export.errors);
    }
}

#[tokio::test]
async fn bdt_first_exported_patient_restricts_a_type_patient_export_to_one_line() {
    let server = spawn_server_with_synthea().await;
    let everyone: Vec<String> = synthea_patients().iter().map(|p| patient_ref(p)).collect();
    let members: Vec<Value> = everyone.iter().map(|r| member(r)).collect();
    server.upsert(&group("all", members)).await;
    for level in ["/Patient/$export", "/Group/all/$export"] {
        let first_export = run(&server, &format!("{level}?_type=Patient"), None).await;
        let first_line = &first_export.output["Patient"][0];
        let first = id_of(&parse(first_line));
        let body = parameters(&[("patient", &patient_ref(&first)), ("_type", "Patient")]);
        let export = run(&server, level, Some(&body)).await;
        let lines = &export.output["Patient"];
        assert_eq!(lines.len(), 1, "{level}: {lines:?}");
        assert_eq!(id_of(&parse(&lines[0])), first);
        assert_eq!(
            export.output.len(),
            1,
            "{level}: only Patient: {}",
            export.manifest
        );
    }
}

#[tokio::test]
async fn patient_in_a_get_kick_off_or_on_a_system_export_is_400() {
    let server = spawn_server_with_synthea().await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    let query = format!("?patient={}", enc(&patient_ref(PATIENT)));
    for level in ["/Patient/$export", "/Group/g/$export", "/$export"] {
        for lenient in [false, true] {
            let response =
                export_kick_off(&server, &format!("{level}{query}"), None, lenient).await;
            expect_refused(response, "patient").await;
        }
    }
    let body = parameters(&[("patient", &patient_ref(PATIENT))]);
    for lenient in [false, true] {
        let response = export_kick_off(&server, "/$export", Some(&body), lenient).await;
        expect_refused(response, "patient").await;
    }
    // A reference to something other than a Patient.
    let body = parameters(&[("patient", "Group/g")]);
    for level in ["/Patient/$export", "/Group/g/$export"] {
        let response = export_kick_off(&server, level, Some(&body), false).await;
        expect_refused(response, "patient").await;
    }
}

// ---------------------------------------------------------------------------------------------
// `_typeFilter` and `_typePostFetchFilterUrl`

/// What the filters of the `_typeFilter` tests select, by REST search with the same parameters.
struct FilterOracle {
    observations: BTreeSet<String>,
    female_patients: BTreeSet<String>,
    conditions: BTreeSet<String>,
}

async fn filter_oracle(server: &TestServer) -> FilterOracle {
    let weight = search(server, &format!("/Observation?code={}", enc(BODY_WEIGHT))).await;
    let height = search(server, &format!("/Observation?code={}", enc(BODY_HEIGHT))).await;
    assert!(!weight.is_empty() && !height.is_empty());
    let observations: BTreeSet<String> = weight.union(&height).cloned().collect();
    assert_eq!(observations.len(), weight.len() + height.len());
    assert!(observations.len() < 1257);
    let female_patients = search(server, "/Patient?gender=female").await;
    assert_eq!(female_patients, BTreeSet::from([FEMALE.to_owned()]));
    let conditions = search(server, "/Condition").await;
    assert_eq!(conditions.len(), 71);
    FilterOracle {
        observations,
        female_patients,
        conditions,
    }
}

fn assert_filtered(export: &Finished, oracle: &FilterOracle, context: &str) {
    assert_eq!(
        export.ids_of("Observation"),
        oracle.observations,
        "{context}: Observations are those of either code filter"
    );
    assert_eq!(
        export.ids_of("Patient"),
        oracle.female_patients,
        "{context}: Patients are those of the gender filter"
    );
    assert_eq!(
        export.ids_of("Condition"),
        oracle.conditions,
        "{context}: Conditions, unfiltered, are exported whole"
    );
    assert_eq!(
        export.output.keys().collect::<Vec<_>>(),
        ["Condition", "Observation", "Patient"],
        "{context}"
    );
    assert!(export.errors.is_empty(), "{context}: {:?}", export.errors);
}

#[tokio::test]
async fn type_filter_at_system_and_patient_level_selects_what_rest_search_selects() {
    let server = spawn_server_with_synthea().await;
    let oracle = filter_oracle(&server).await;
    // Filtering Patient does not filter the other types: male patients' observations stay.
    let male_body_weights = search(
        &server,
        &format!(
            "/Observation?code={}&subject={}",
            enc(BODY_WEIGHT),
            enc(&patient_ref(PATIENT))
        ),
    )
    .await;
    assert!(!male_body_weights.is_empty());

    let filters = [
        type_filter("Observation", "code", BODY_WEIGHT),
        type_filter("Observation", "code", BODY_HEIGHT),
        type_filter("Patient", "gender", "female"),
    ];
    let mut query = "?_type=Observation,Patient,Condition".to_owned();
    for filter in &filters {
        query.push_str(&format!("&_typeFilter={}", enc(filter)));
    }
    for level in ["/$export", "/Patient/$export"] {
        let export = run(&server, &format!("{level}{query}"), None).await;
        assert_filtered(&export, &oracle, level);
        assert!(export.ids_of("Observation").is_superset(&male_body_weights));
    }

    // Without `_type`: every compartment type, only Observation filtered.
    let path = format!(
        "/Patient/$export?_typeFilter={}&_typeFilter={}",
        enc(&filters[0]),
        enc(&filters[1])
    );
    let export = run(&server, &path, None).await;
    let mut expected = synthea_ids_by_type(&synthea_resources());
    for outside in OUTSIDE_COMPARTMENT {
        expected.remove(*outside);
    }
    expected.insert("Observation".to_owned(), oracle.observations.clone());
    assert_eq!(export.ids(), expected, "{path}");

    // POST, restricted to one patient: the same filters within its compartment.
    let mut entries = vec![("_type", "Observation,Patient,Condition")];
    entries.extend(filters.iter().map(|f| ("_typeFilter", f.as_str())));
    let patient = patient_ref(PATIENT);
    entries.push(("patient", &patient));
    let export = run(&server, "/Patient/$export", Some(&parameters(&entries))).await;
    let subject = format!("&subject={}", enc(&patient));
    let observations = search(
        &server,
        &format!(
            "/Observation?code={}{subject}",
            enc(&format!("{BODY_WEIGHT},{BODY_HEIGHT}"))
        ),
    )
    .await;
    assert!(!observations.is_empty());
    assert_eq!(export.ids_of("Observation"), observations);
    assert_eq!(
        export.ids_of("Patient"),
        BTreeSet::new(),
        "the patient is male"
    );
    assert_eq!(
        export.ids_of("Condition"),
        search(&server, &format!("/Condition?{}", &subject[1..])).await
    );
}

#[tokio::test]
async fn type_filter_and_post_fetch_filter_url_at_group_level_select_what_rest_search_selects() {
    let server = spawn_server_with_synthea().await;
    let members = [PATIENT, OTHER, FEMALE];
    server
        .upsert(&group(
            "g",
            members.iter().map(|p| member(&patient_ref(p))).collect(),
        ))
        .await;
    let subjects: Vec<String> = members.iter().map(|p| patient_ref(p)).collect();
    let subjects = enc(&subjects.join(","));
    let observations = search(
        &server,
        &format!(
            "/Observation?code={}&subject={subjects}",
            enc(&format!("{BODY_WEIGHT},{BODY_HEIGHT}"))
        ),
    )
    .await;
    let conditions = search(&server, &format!("/Condition?subject={subjects}")).await;
    assert!(!observations.is_empty() && !conditions.is_empty());

    for name in ["_typeFilter", "_typePostFetchFilterUrl"] {
        let mut query = "?_type=Observation,Patient,Condition".to_owned();
        for filter in [
            type_filter("Observation", "code", BODY_WEIGHT),
            type_filter("Observation", "code", BODY_HEIGHT),
            type_filter("Patient", "gender", "female"),
        ] {
            query.push_str(&format!("&{name}={}", enc(&filter)));
        }
        let export = run(&server, &format!("/Group/g/$export{query}"), None).await;
        assert_eq!(export.ids_of("Observation"), observations, "{name}");
        assert_eq!(
            export.ids_of("Patient"),
            BTreeSet::from([FEMALE.to_owned()]),
            "{name}"
        );
        assert_eq!(export.ids_of("Condition"), conditions, "{name}");
        assert!(export.errors.is_empty(), "{name}: {:?}", export.errors);
    }
}

#[tokio::test]
async fn stu2_comma_joined_type_filters_mean_the_same_as_repeated_ones() {
    let server = spawn_server_with_synthea().await;
    let oracle = filter_oracle(&server).await;
    // One value: three queries joined by commas, each query's own values URL-encoded.
    let joined = [
        type_filter("Observation", "code", BODY_WEIGHT),
        type_filter("Patient", "gender", "female"),
        type_filter("Observation", "code", BODY_HEIGHT),
    ]
    .join(",");
    // One value: a query whose code OR-s two values with a bare comma, then another query.
    let or_inside = format!(
        "Observation?code={BODY_WEIGHT},{BODY_HEIGHT},{}",
        type_filter("Patient", "gender", "female")
    );
    for value in [&joined, &or_inside] {
        for level in ["/$export", "/Patient/$export"] {
            let path = format!(
                "{level}?_type=Observation,Patient,Condition&_typeFilter={}",
                enc(value)
            );
            let export = run(&server, &path, None).await;
            assert_filtered(&export, &oracle, &format!("{level} _typeFilter={value}"));
        }
        // And in a POST Parameters valueString.
        let body = parameters(&[
            ("_type", "Observation,Patient,Condition"),
            ("_typeFilter", value),
        ]);
        let export = run(&server, "/Patient/$export", Some(&body)).await;
        assert_filtered(&export, &oracle, &format!("POST _typeFilter={value}"));
    }
}

#[tokio::test]
async fn an_unsupported_type_filter_is_400_by_name_or_ignored_and_reported_when_lenient() {
    let server = spawn_server_with_synthea().await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    let unsupported = [
        // `status` is not a Patient search parameter in R4 (bdt's probe).
        "Patient?status=active".to_owned(),
        type_filter("Observation", "code:below", BODY_WEIGHT),
        "Observation?subject.name=Smith".to_owned(),
        "Observation?_sort=date".to_owned(),
        "Observation?_has:Condition:subject:code=x".to_owned(),
        "NotAType?code=x".to_owned(),
    ];
    for level in ["/$export", "/Patient/$export", "/Group/g/$export"] {
        for filter in &unsupported {
            for name in ["_typeFilter", "_typePostFetchFilterUrl"] {
                let path = format!("{level}?{name}={}", enc(filter));
                let response = export_kick_off(&server, &path, None, false).await;
                expect_refused(response, name).await;
            }
        }
        let body = parameters(&[("_typeFilter", "Patient?status=active")]);
        expect_refused(
            export_kick_off(&server, level, Some(&body), false).await,
            "_typeFilter",
        )
        .await;
    }

    // Lenient: the bad filter is ignored and reported by name; a good one still applies.
    let weight = search(&server, &format!("/Observation?code={}", enc(BODY_WEIGHT))).await;
    let path = format!(
        "/Patient/$export?_type=Patient,Observation&_typeFilter={}&_typeFilter={}&_typeFilter={}",
        enc("Patient?status=active"),
        enc(&type_filter("Observation", "code", BODY_WEIGHT)),
        enc("Observation?foo=bar"),
    );
    let export = run_lenient(&server, &path, None).await;
    assert_eq!(export.ids_of("Patient"), synthea_ids("Patient"));
    assert_eq!(export.ids_of("Observation"), weight);
    let reported = export.errors_naming("_typeFilter");
    assert_eq!(reported.len(), 2, "{:?}", export.errors);
    let text: String = reported.iter().map(|o| outcome_text(o)).collect();
    assert!(text.contains("status") && text.contains("foo"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// `_elements`

#[tokio::test]
async fn typed_elements_trim_named_types_keep_mandatory_ones_and_leave_others_as_stored() {
    let server = spawn_server_with_synthea().await;
    let patient = patient_ref(PATIENT);
    // Comma-separated in one entry, and repeated entries: the same request.
    let bodies = [
        parameters(&[
            ("patient", &patient),
            ("_type", "Observation,Patient,Condition"),
            ("_elements", "Observation.value,Patient.gender"),
        ]),
        parameters(&[
            ("patient", &patient),
            ("_type", "Observation,Patient,Condition"),
            ("_elements", "Observation.value"),
            ("_elements", "Patient.gender"),
        ]),
    ];
    for body in &bodies {
        let export = run(&server, "/Patient/$export", Some(body)).await;
        assert_eq!(export.output["Observation"].len(), 106);
        // Observation's mandatory elements are status and code.
        assert_all_subsetted(
            &server,
            &export.output["Observation"],
            &["value", "status", "code"],
        )
        .await;
        assert_all_subsetted(&server, &export.output["Patient"], &["gender"]).await;
        // Not named: exactly the stored bytes, untagged.
        assert_eq!(export.output["Condition"].len(), 7);
        assert_lines_are_reads(&server, "Condition", &export.output["Condition"]).await;
    }

    // GET, comma-separated and repeated.
    let path = "/Patient/$export?_type=Patient,Condition&_elements=Patient.gender,Patient.birthDate&_elements=Patient.name";
    let export = run(&server, path, None).await;
    assert_eq!(export.output["Patient"].len(), 10);
    assert_all_subsetted(
        &server,
        &export.output["Patient"],
        &["gender", "birthDate", "name"],
    )
    .await;
    assert_lines_are_reads(&server, "Condition", &export.output["Condition"]).await;
}

#[tokio::test]
async fn untyped_elements_apply_to_every_type_at_group_level() {
    let server = spawn_server_with_synthea().await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    let export = run(
        &server,
        "/Group/g/$export?_type=Observation,Encounter&_elements=status",
        None,
    )
    .await;
    assert_eq!(export.output["Observation"].len(), 106);
    assert_eq!(export.output["Encounter"].len(), 22);
    // Mandatory: Observation status and code; Encounter status and class.
    assert_all_subsetted(&server, &export.output["Observation"], &["status", "code"]).await;
    assert_all_subsetted(&server, &export.output["Encounter"], &["status", "class"]).await;

    // Filters read the whole stored resource, before trimming.
    let path = format!(
        "/Group/g/$export?_type=Encounter&_elements=status&_typeFilter={}",
        enc("Encounter?class=AMB")
    );
    let export = run(&server, &path, None).await;
    let expected = search(
        &server,
        &format!(
            "/Encounter?class=AMB&subject={}",
            enc(&patient_ref(PATIENT))
        ),
    )
    .await;
    assert!(!expected.is_empty());
    assert_eq!(export.ids_of("Encounter"), expected);
    assert_all_subsetted(&server, &export.output["Encounter"], &["status", "class"]).await;
}

#[tokio::test]
async fn bdt_elements_id_and_type_meta_give_lines_with_id_meta_and_the_subsetted_tag() {
    let server = spawn_server_with_synthea().await;
    for path in [
        "/Patient/$export?_type=Patient&_elements=id,Patient.meta",
        "/Patient/$export?_type=Patient&_elements=id&_elements=Patient.meta",
    ] {
        let export = run(&server, path, None).await;
        let lines = &export.output["Patient"];
        assert_eq!(lines.len(), 10, "{path}");
        assert_all_subsetted(&server, lines, &[]).await;
        for line in lines {
            let value = parse(line);
            assert!(
                value["id"].is_string() && value["meta"].is_object(),
                "{line}"
            );
            assert!(
                value["meta"]["tag"]
                    .as_array()
                    .expect("meta.tag")
                    .contains(&json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"})),
                "{line}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Provenance and `includeAssociatedData`

/// Stores three Provenance: of [`PATIENT`], of one of its Observations, and of an Organization.
/// Returns the Observation's id.
async fn store_provenance(server: &TestServer) -> String {
    let observation = patient_observations(&synthea_resources())[0].clone();
    let organization = synthea_ids("Organization")
        .into_iter()
        .next()
        .expect("an Organization");
    store_all(
        server,
        &[
            provenance("prov-patient", &[&patient_ref(PATIENT)]),
            provenance("prov-observation", &[&format!("Observation/{observation}")]),
            provenance(
                "prov-organization",
                &[&format!("Organization/{organization}")],
            ),
        ],
    )
    .await;
    observation
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn system_exports_include_provenance_by_default_and_relevant_provenance_on_request() {
    let server = spawn_server_with_synthea().await;
    store_provenance(&server).await;
    let all = set(&["prov-patient", "prov-observation", "prov-organization"]);

    let everything = run(&server, "/$export", None).await;
    assert_eq!(
        everything.ids_of("Provenance"),
        all,
        "no _type: all Provenance"
    );
    let with_type = run(&server, "/$export?_type=Observation,Provenance", None).await;
    assert_eq!(with_type.ids_of("Provenance"), all);
    let without = run(&server, "/$export?_type=Observation", None).await;
    assert_eq!(
        without.output.keys().collect::<Vec<_>>(),
        ["Observation"],
        "_type without Provenance leaves it out"
    );

    for query in [
        "?_type=Observation&includeAssociatedData=RelevantProvenanceResources",
        "?_type=Observation&includeAssociatedData=LatestProvenanceResources,RelevantProvenanceResources",
        "?_type=Observation&includeAssociatedData=LatestProvenanceResources&includeAssociatedData=RelevantProvenanceResources",
    ] {
        let export = run(&server, &format!("/$export{query}"), None).await;
        assert_eq!(export.ids_of("Observation").len(), 1257, "{query}");
        assert_eq!(
            export.ids_of("Provenance"),
            set(&["prov-observation"]),
            "{query}: the Provenance of exported Observations"
        );
        assert!(export.errors.is_empty(), "{query}: {:?}", export.errors);
    }
    let body = parameters(&[
        ("_type", "Observation"),
        ("includeAssociatedData", "RelevantProvenanceResources"),
    ]);
    let export = run(&server, "/$export", Some(&body)).await;
    assert_eq!(export.ids_of("Provenance"), set(&["prov-observation"]));
}

#[tokio::test]
async fn an_unknown_include_associated_data_value_is_400_or_reported_when_lenient() {
    let server = spawn_server_with_synthea().await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    for level in ["/$export", "/Patient/$export", "/Group/g/$export"] {
        for value in ["_unknownCustomValue", "Bogus"] {
            let path = format!("{level}?_type=Patient&includeAssociatedData={value}");
            expect_refused(
                export_kick_off(&server, &path, None, false).await,
                "includeAssociatedData",
            )
            .await;
            let export = run_lenient(&server, &path, None).await;
            assert!(!export.ids_of("Patient").is_empty(), "{path}");
            let reported = export.errors_naming("includeAssociatedData");
            assert_eq!(reported.len(), 1, "{path}: {:?}", export.errors);
        }
    }
}

#[tokio::test]
async fn patient_and_group_exports_include_the_provenance_of_the_compartment() {
    let server = spawn_server_with_synthea().await;
    store_provenance(&server).await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    let body = parameters(&[("patient", &patient_ref(PATIENT))]);
    // The IG default: the Provenance whose target is in the exported compartments (the
    // patient itself or one of its resources), not the Organization's.
    let compartment_provenance = set(&["prov-patient", "prov-observation"]);
    let by_patient = run(&server, "/Patient/$export", Some(&body)).await;
    assert_eq!(by_patient.ids_of("Provenance"), compartment_provenance);
    let by_group = run(&server, "/Group/g/$export", None).await;
    assert_eq!(by_group.ids_of("Provenance"), compartment_provenance);
    // In the compartment of a patient that does not exist, so the target of nothing exported.
    store_all(
        &server,
        &[provenance("prov-dangling", &["Patient/no-such-patient"])],
    )
    .await;
    let everyone = run(&server, "/Patient/$export", None).await;
    assert_eq!(everyone.ids_of("Provenance"), compartment_provenance);
    // A Patient left out by a filter takes the Provenance that only targets it along.
    let others = run(
        &server,
        &format!("/Patient/$export?_typeFilter=Patient%3F_id%3D{OTHER}"),
        None,
    )
    .await;
    assert_eq!(others.ids_of("Patient"), set(&[OTHER]));
    assert_eq!(others.ids_of("Provenance"), set(&["prov-observation"]));
    let observations_only = run(&server, "/Group/g/$export?_type=Observation", None).await;
    assert_eq!(
        observations_only.output.keys().collect::<Vec<_>>(),
        ["Observation"]
    );
}

#[tokio::test]
async fn relevant_provenance_at_patient_level_includes_the_provenance_of_exported_resources() {
    let server = spawn_server_with_synthea().await;
    store_provenance(&server).await;
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    let relevant = "includeAssociatedData=RelevantProvenanceResources";
    let observations_only = parameters(&[
        ("patient", &patient_ref(PATIENT)),
        ("_type", "Observation"),
        ("includeAssociatedData", "RelevantProvenanceResources"),
    ]);
    let every_type = parameters(&[
        ("patient", &patient_ref(PATIENT)),
        ("includeAssociatedData", "RelevantProvenanceResources"),
    ]);
    let group_path = format!("/Group/g/$export?_type=Observation&{relevant}");
    let patient_path = format!("/Patient/$export?_type=Observation&{relevant}");
    // (what, path, body, Provenance that must be there)
    let cases: [(&str, &str, Option<&Value>, &[&str]); 4] = [
        (
            "POST Patient/$export patient=P _type=Observation",
            "/Patient/$export",
            Some(&observations_only),
            &["prov-observation"],
        ),
        (
            "GET Group/g/$export _type=Observation",
            &group_path,
            None,
            &["prov-observation"],
        ),
        (
            "GET Patient/$export _type=Observation",
            &patient_path,
            None,
            &["prov-observation"],
        ),
        (
            "POST Patient/$export patient=P (every type)",
            "/Patient/$export",
            Some(&every_type),
            &["prov-observation", "prov-patient"],
        ),
    ];
    // Every case is tried before the verdict, so a failure names all that go wrong.
    let mut wrong = Vec::new();
    for (what, path, body, wanted) in cases {
        let export = run(&server, path, body).await;
        assert!(export.errors.is_empty(), "{what}: {:?}", export.errors);
        let provenance = export.ids_of("Provenance");
        if !wanted.iter().all(|w| provenance.contains(*w))
            || provenance.contains("prov-organization")
        {
            wrong.push(format!(
                "{what}: Provenance {provenance:?}, expected {wanted:?} (and never prov-organization)"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "RelevantProvenanceResources must add the Provenance whose target is an exported resource (prov-observation targets one of the patient's Observations):\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn relevant_provenance_follows_the_resources_a_type_filter_exports() {
    let server = spawn_server_with_synthea().await;
    store_all(
        &server,
        &[
            observation("obs-height", PATIENT, BODY_HEIGHT),
            observation("obs-weight", PATIENT, BODY_WEIGHT),
            provenance("prov-height", &["Observation/obs-height"]),
            provenance("prov-weight", &["Observation/obs-weight"]),
        ],
    )
    .await;
    let heights = search(&server, &format!("/Observation?code={}", enc(BODY_HEIGHT))).await;
    let path = format!(
        "/$export?_type=Observation&_typeFilter={}&includeAssociatedData=RelevantProvenanceResources",
        enc(&type_filter("Observation", "code", BODY_HEIGHT))
    );
    let export = run(&server, &path, None).await;
    assert_eq!(export.ids_of("Observation"), heights);
    assert!(heights.contains("obs-height") && !heights.contains("obs-weight"));
    assert_eq!(
        export.ids_of("Provenance"),
        set(&["prov-height"]),
        "only the Provenance of exported Observations (obs-weight is filtered out)"
    );
}

// ---------------------------------------------------------------------------------------------
// `_since`

#[tokio::test]
async fn since_on_a_group_export_gives_changed_compartment_resources_and_deletions() {
    let server = spawn_server_with_synthea().await;
    let synthea = synthea_resources();
    let first_of = |resource_type: &str, patient: &str| -> Value {
        let wanted = patient_ref(patient);
        synthea
            .iter()
            .filter(|r| resource_type == self::resource_type(r))
            .filter(|r| {
                r["subject"]["reference"] == wanted.as_str()
                    || r["patient"]["reference"] == wanted.as_str()
            })
            .min_by_key(|r| id_of(r))
            .cloned()
            .unwrap_or_else(|| panic!("a {resource_type} of {patient}"))
    };
    let created = server
        .upsert(&group(
            "g",
            vec![member(&patient_ref(PATIENT)), member(&patient_ref(OTHER))],
        ))
        .await;
    let group_updated = parse_instant(
        created["meta"]["lastUpdated"]
            .as_str()
            .expect("lastUpdated"),
    )
    .expect("an instant");
    let since = format_instant(group_updated + 1_000);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Members: an updated Observation, a new one, an updated Patient, a deleted Condition.
    let mut updated = first_of("Observation", PATIENT);
    updated["status"] = json!("amended");
    server.upsert(&updated).await;
    server
        .upsert(&observation("new-since", PATIENT, BODY_WEIGHT))
        .await;
    let mut other = read(&server, "Patient", OTHER).await;
    other["active"] = json!(true);
    server.upsert(&other).await;
    let deleted = first_of("Condition", OTHER);
    let deleted_id = id_of(&deleted);
    assert!(
        server
            .delete(&format!("/Condition/{deleted_id}"))
            .await
            .status()
            .is_success()
    );
    // A patient outside the Group: none of this may show.
    let outsider = FEMALE;
    let mut outside = first_of("Observation", outsider);
    outside["status"] = json!("amended");
    server.upsert(&outside).await;
    let outside_deleted = id_of(&first_of("Condition", outsider));
    assert!(
        server
            .delete(&format!("/Condition/{outside_deleted}"))
            .await
            .status()
            .is_success()
    );
    // A deleted patient outside the Group (Atencio).
    let deleted_patient = "4e8ed886-fd5f-40bb-8feb-f339b04d853a";
    assert!(
        server
            .delete(&format!("/Patient/{deleted_patient}"))
            .await
            .status()
            .is_success()
    );

    let path = format!("/Group/g/$export?_since={}", enc(&since));
    let export = run(&server, &path, None).await;
    assert_eq!(
        export.ids(),
        Ids::from([
            (
                "Observation".to_owned(),
                set(&[&id_of(&updated), "new-since"])
            ),
            ("Patient".to_owned(), set(&[OTHER])),
        ]),
        "only what changed since {since}"
    );
    for (resource_type, lines) in &export.output {
        assert_lines_are_reads(&server, resource_type, lines).await;
    }
    assert_eq!(export.deleted.len(), 1, "{:?}", export.deleted);
    let bundle = &export.deleted[0];
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "transaction");
    let entries = bundle["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{bundle}");
    assert_eq!(entries[0]["request"]["method"], "DELETE");
    assert_eq!(
        entries[0]["request"]["url"],
        format!("Condition/{deleted_id}")
    );

    // `_type` restricts `deleted` too.
    let observations = run(
        &server,
        &format!("/Group/g/$export?_type=Observation&_since={}", enc(&since)),
        None,
    )
    .await;
    assert_eq!(
        observations.ids(),
        Ids::from([(
            "Observation".to_owned(),
            set(&[&id_of(&updated), "new-since"])
        )])
    );
    assert!(
        observations.deleted.is_empty(),
        "a deleted Condition listed for _type=Observation: {:?}",
        observations.deleted
    );

    // At Patient level the outsider's changes are in too.
    let everyone = run(
        &server,
        &format!("/Patient/$export?_since={}", enc(&since)),
        None,
    )
    .await;
    assert_eq!(
        everyone.ids(),
        Ids::from([
            (
                "Observation".to_owned(),
                set(&[&id_of(&updated), "new-since", &id_of(&outside)])
            ),
            ("Patient".to_owned(), set(&[OTHER])),
        ]),
        "Patient/$export: only what changed since {since}"
    );
    let deleted_urls: BTreeSet<String> = everyone
        .deleted
        .iter()
        .flat_map(|b| b["entry"].as_array().cloned().unwrap_or_default())
        .map(|e| e["request"]["url"].as_str().expect("a url").to_owned())
        .collect();
    assert_eq!(
        deleted_urls,
        set(&[
            &format!("Condition/{deleted_id}"),
            &format!("Condition/{outside_deleted}"),
            &format!("Patient/{deleted_patient}"),
        ])
    );
}

#[tokio::test]
async fn a_deleted_resource_in_the_compartments_of_two_members_is_listed_once() {
    let server = spawn_server_with_synthea().await;
    let shared = json!({"resourceType": "Observation", "id": "shared", "status": "final",
        "code": {"text": "seen by both"},
        "subject": {"reference": patient_ref(PATIENT)},
        "performer": [{"reference": patient_ref(OTHER)}]});
    let created = server.upsert(&shared).await;
    server
        .upsert(&group(
            "g",
            vec![member(&patient_ref(PATIENT)), member(&patient_ref(OTHER))],
        ))
        .await;
    let stamp = parse_instant(
        created["meta"]["lastUpdated"]
            .as_str()
            .expect("lastUpdated"),
    )
    .expect("an instant");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = format_instant(stamp + 20_000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        server
            .delete("/Observation/shared")
            .await
            .status()
            .is_success()
    );

    let body = parameters(&[
        ("patient", &patient_ref(PATIENT)),
        ("patient", &patient_ref(OTHER)),
        ("_since", &since),
    ]);
    // Every level is tried before the verdict, so a failure names all that go wrong.
    let mut wrong = Vec::new();
    for (level, body, described) in [
        ("/Group/g/$export", None, "Group/g/$export?_since"),
        ("/Patient/$export", None, "Patient/$export?_since"),
        (
            "/Patient/$export",
            Some(&body),
            "POST Patient/$export with _since and patient= both",
        ),
    ] {
        let path = match body {
            Some(_) => level.to_owned(),
            None => format!("{level}?_since={}", enc(&since)),
        };
        let export = run(&server, &path, body).await;
        assert!(export.output.is_empty(), "{described}: {}", export.manifest);
        let urls: Vec<String> = export
            .deleted
            .iter()
            .flat_map(|b| b["entry"].as_array().cloned().unwrap_or_default())
            .map(|e| e["request"]["url"].as_str().expect("a url").to_owned())
            .collect();
        if urls != ["Observation/shared"] {
            wrong.push(format!("{described}: deleted lists {urls:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "Observation/shared must be listed once in 'deleted':\n{}",
        wrong.join("\n")
    );
}

/// Filters of every parameter type and modifier, each compared with REST search.
#[tokio::test]
async fn type_filters_of_every_parameter_kind_select_what_rest_search_selects() {
    let server = spawn_server_with_synthea().await;
    // At most one filter per type in an export, so each type's output is that filter's.
    let encounters: Vec<String> = synthea_ids("Encounter").into_iter().take(3).collect();
    let exports: [&[(&str, String)]; 4] = [
        &[
            ("Observation", format!("code:not={}", enc(BODY_HEIGHT))),
            ("Patient", "name=Mar".to_owned()),
            ("Condition", "clinical-status=active".to_owned()),
            ("MedicationRequest", "status:not=stopped".to_owned()),
            ("Encounter", "class=AMB".to_owned()),
            ("Immunization", "date=ge2015-01-01".to_owned()),
        ],
        &[
            ("Observation", "value-quantity=gt100".to_owned()),
            ("Patient", "birthdate=lt1980".to_owned()),
            ("Condition", "onset-date=le2000".to_owned()),
            ("Procedure", "date=ge2015-01-01&status=completed".to_owned()),
            ("Claim", format!("patient={}", enc(&patient_ref(PATIENT)))),
            ("CarePlan", "status=active,completed".to_owned()),
        ],
        &[
            ("Observation", "code:text=height".to_owned()),
            ("Patient", "family:exact=Marquardt".to_owned()),
            ("Condition", "code:text=sinusitis".to_owned()),
            ("Encounter", "date=lt2010&class=AMB".to_owned()),
            ("DiagnosticReport", "issued=ge2015-01-01".to_owned()),
            ("Goal", "lifecycle-status=accepted".to_owned()),
        ],
        &[
            ("Patient", "name:contains=art".to_owned()),
            ("Observation", "value-quantity=ap70".to_owned()),
            ("Encounter", format!("_id={}", encounters.join(","))),
            ("Condition", "abatement-date:missing=true".to_owned()),
        ],
    ];
    for filters in exports {
        let types: Vec<&str> = filters.iter().map(|(t, _)| *t).collect();
        let mut query = format!("?_type={}", types.join(","));
        for (resource_type, params) in filters {
            query.push_str(&format!(
                "&_typeFilter={}",
                enc(&format!("{resource_type}?{params}"))
            ));
        }
        for level in ["/$export", "/Patient/$export"] {
            let export = run(&server, &format!("{level}{query}"), None).await;
            assert!(
                export.errors.is_empty(),
                "{level}{query}: {:?}",
                export.errors
            );
            for (resource_type, params) in filters {
                let expected = search(&server, &format!("/{resource_type}?{params}")).await;
                assert!(
                    !expected.is_empty(),
                    "{resource_type}?{params} selects nothing"
                );
                assert_eq!(
                    export.ids_of(resource_type),
                    expected,
                    "{level}: _typeFilter={resource_type}?{params} differs from the search"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// discovery

#[tokio::test]
async fn metadata_lists_patient_and_group_export_under_both_names_and_the_search_parameters() {
    let server = spawn_server().await;
    let statement = expect_json(server.get("/metadata").await, StatusCode::OK).await;
    let resources = statement["rest"][0]["resource"]
        .as_array()
        .expect("rest[0].resource");
    let resource = |name: &str| {
        resources
            .iter()
            .find(|r| r["type"] == name)
            .unwrap_or_else(|| panic!("no {name} in rest[0].resource"))
            .clone()
    };
    for (resource_type, old_name, canonical) in [
        (
            "Patient",
            "patient-export",
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
        ),
        (
            "Group",
            "group-export",
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
        ),
    ] {
        let operations = resource(resource_type)["operation"]
            .as_array()
            .unwrap_or_else(|| panic!("{resource_type} lists no operation"))
            .clone();
        for name in ["export", old_name] {
            let operation = operations
                .iter()
                .find(|op| op["name"] == name)
                .unwrap_or_else(|| panic!("{resource_type} has no operation '{name}'"));
            assert_eq!(operation["definition"], canonical, "{resource_type} {name}");
        }
    }
    // The parameters listed are the ones search and `_typeFilter` evaluate.
    for (resource_type, expected) in [
        (
            "Observation",
            &["code", "subject", "patient", "date", "status"][..],
        ),
        (
            "Patient",
            &["gender", "birthdate", "name", "identifier"][..],
        ),
        ("Group", &["member", "identifier"][..]),
    ] {
        let params = resource(resource_type)["searchParam"]
            .as_array()
            .expect("searchParam")
            .clone();
        let names: Vec<&str> = params.iter().filter_map(|p| p["name"].as_str()).collect();
        for name in expected {
            assert!(
                names.contains(name),
                "{resource_type} lacks {name}: {names:?}"
            );
        }
        for param in &params {
            assert!(param["type"].is_string(), "{param}");
            let name = param["name"].as_str().expect("a name");
            let response = server
                .get(&format!("/{resource_type}?{name}:missing=true"))
                .await;
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "{resource_type}?{name}:missing=true, a listed parameter, is refused"
            );
            let filter = enc(&format!("{resource_type}?{name}:missing=false"));
            let kick_off = export_kick_off(
                &server,
                &format!("/$export?_type={resource_type}&_typeFilter={filter}"),
                None,
                false,
            )
            .await;
            let status_url = export_accepted(&server, kick_off).await;
            let cancelled = server.delete(&status_url).await;
            assert_eq!(cancelled.status(), StatusCode::ACCEPTED, "{status_url}");
        }
    }
}

/// Provenance chosen by target is split into several units like any type; each must read only
/// the key files of the units that exported the targets (a Provenance unit leaves none).
#[tokio::test]
async fn provenance_by_target_spread_over_several_units_is_exported_once() {
    let server = spawn_server_with_options(ServerOptions {
        synthea: true,
        export: hearth_server::ExportSettings {
            workers: 2,
            rows_per_unit: 2,
            ..ServerOptions::default().export
        },
        ..ServerOptions::default()
    })
    .await;
    let observation = store_provenance(&server).await;
    for extra in 0..6 {
        server
            .upsert(&provenance(
                &format!("prov-extra-{extra}"),
                &[&format!("Observation/{observation}")],
            ))
            .await;
    }
    let export = run(&server, "/Patient/$export", None).await;
    let mut expected = set(&["prov-patient", "prov-observation"]);
    expected.extend((0..6).map(|extra| format!("prov-extra-{extra}")));
    assert_eq!(export.ids_of("Provenance"), expected);
    assert!(export.errors.is_empty(), "{:?}", export.errors);
}

#[tokio::test]
async fn latest_provenance_keeps_only_the_most_recent_provenance_of_each_exported_resource() {
    let server = spawn_server_with_synthea().await;
    let observations = patient_observations(&synthea_resources());
    let (first, second) = (&observations[0], &observations[1]);
    server
        .upsert(&group("g", vec![member(&patient_ref(PATIENT))]))
        .await;
    let recorded = |id: &str, targets: &[&str], at: &str| {
        let mut resource = provenance(id, targets);
        resource["recorded"] = json!(at);
        resource
    };
    store_all(
        &server,
        &[
            // Two of the first Observation: the later one wins, whatever the store order.
            recorded(
                "prov-late",
                &[&format!("Observation/{first}")],
                "2024-05-01T00:00:00Z",
            ),
            recorded(
                "prov-early",
                &[&format!("Observation/{first}")],
                "2021-05-01T00:00:00Z",
            ),
            // The only one of the second Observation, older than both: still its latest.
            recorded(
                "prov-only",
                &[&format!("Observation/{second}")],
                "2019-01-01T00:00:00Z",
            ),
            // The patient's: the latest of the Patient resource.
            recorded(
                "prov-patient-old",
                &[&patient_ref(PATIENT)],
                "2018-01-01T00:00:00Z",
            ),
            recorded(
                "prov-patient-new",
                &[&patient_ref(PATIENT)],
                "2023-01-01T00:00:00Z",
            ),
        ],
    )
    .await;
    let latest = "includeAssociatedData=LatestProvenanceResources";

    // System level, Observations only: the latest Provenance of each exported Observation.
    let export = run(
        &server,
        &format!("/$export?_type=Observation&{latest}"),
        None,
    )
    .await;
    assert!(export.errors.is_empty(), "{:?}", export.errors);
    assert_eq!(
        export.ids_of("Provenance"),
        set(&["prov-late", "prov-only"])
    );

    // Without _type the system export would hold every Provenance; Latest leaves out the
    // older ones.
    let everything = run(&server, &format!("/$export?{latest}"), None).await;
    assert_eq!(
        everything.ids_of("Provenance"),
        set(&["prov-late", "prov-only", "prov-patient-new"])
    );

    // Group and Patient level: the same choice within the compartment.
    for path in [
        format!("/Group/g/$export?{latest}"),
        format!("/Patient/$export?{latest}"),
    ] {
        let export = run(&server, &path, None).await;
        assert!(export.errors.is_empty(), "{path}: {:?}", export.errors);
        assert_eq!(
            export.ids_of("Provenance"),
            set(&["prov-late", "prov-only", "prov-patient-new"]),
            "{path}"
        );
    }
    // Without the parameter the Group export keeps all of them.
    let all = run(&server, "/Group/g/$export", None).await;
    assert_eq!(
        all.ids_of("Provenance"),
        set(&[
            "prov-late",
            "prov-early",
            "prov-only",
            "prov-patient-old",
            "prov-patient-new"
        ])
    );
    // With RelevantProvenanceResources too, the least restrictive applies.
    let both = run(
        &server,
        &format!("/$export?_type=Observation&{latest},RelevantProvenanceResources"),
        None,
    )
    .await;
    assert_eq!(
        both.ids_of("Provenance"),
        set(&["prov-late", "prov-early", "prov-only"])
    );
    // Blocks cannot pick the latest: refused by name.
    expect_refused(
        export_kick_off(
            &server,
            &format!("/Patient/$export?organizeOutputBy=Patient&{latest}"),
            None,
            false,
        )
        .await,
        "includeAssociatedData",
    )
    .await;
}
