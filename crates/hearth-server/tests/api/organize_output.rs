//! `organizeOutputBy=Patient` end to end, as a Bulk Data client sees it: files of resource
//! blocks (a `Parameters` header naming the patient, the Patient, then the rest of its
//! compartment), each block checked against an ordinary export of that one patient, files
//! rolling over between blocks, and blocks larger than a file continued in the next one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use hearth_fhir::instant::{Micros, format_instant, parse_instant};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// `Type/id`.
type Key = String;

/// One downloaded `output` file.
struct OutputFile {
    url: String,
    lines: Vec<String>,
    continues_in_file: Option<String>,
}

/// One block, put back together across continuation files.
#[derive(Debug)]
struct Block {
    patient: String,
    /// The lines after the header.
    lines: Vec<String>,
    /// Indexes into [`Organized::files`] of the files the block is in.
    files: Vec<usize>,
    /// The block's size written whole: its header and lines, each with a newline.
    bytes: u64,
}

impl Block {
    /// The block's resources by key, asserting none is repeated inside it.
    fn resources(&self) -> BTreeMap<Key, String> {
        let mut resources = BTreeMap::new();
        for line in &self.lines {
            let key = key_of(&parse(line));
            assert!(
                resources.insert(key.clone(), line.clone()).is_none(),
                "{key} is twice in the block of {}",
                self.patient
            );
        }
        resources
    }
}

/// A finished organized export with every file downloaded.
struct Organized {
    manifest: Value,
    files: Vec<OutputFile>,
    blocks: Vec<Block>,
    deleted: Vec<Value>,
    errors: Vec<Value>,
}

impl Organized {
    fn block(&self, patient: &str) -> &Block {
        self.blocks
            .iter()
            .find(|b| b.patient == patient)
            .unwrap_or_else(|| panic!("no block for Patient/{patient}"))
    }

    fn patients(&self) -> BTreeSet<String> {
        self.blocks.iter().map(|b| b.patient.clone()).collect()
    }

    /// Each patient's resource keys.
    fn key_sets(&self) -> BTreeMap<String, BTreeSet<Key>> {
        self.blocks
            .iter()
            .map(|b| (b.patient.clone(), b.resources().into_keys().collect()))
            .collect()
    }
}

fn key_of(resource: &Value) -> Key {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().expect("a resourceType"),
        id_of(resource)
    )
}

/// The patient a block header names, or `None` for a line that is not a header.
fn header_patient(line: &Value) -> Option<String> {
    if line["resourceType"] != "Parameters" {
        return None;
    }
    assert_eq!(line["parameter"][0]["name"], "header", "{line}");
    let reference = line["parameter"][0]["valueReference"]["reference"]
        .as_str()
        .unwrap_or_else(|| panic!("a header without a reference: {line}"));
    let id = reference
        .strip_prefix("Patient/")
        .unwrap_or_else(|| panic!("a header naming {reference}"));
    Some(id.to_owned())
}

async fn manifest_of(
    server: &TestServer,
    path: &str,
    body: Option<&Value>,
    lenient: bool,
) -> Value {
    let response = export_kick_off(server, path, body, lenient).await;
    let status_url = export_accepted(server, response).await;
    export_manifest(server, &status_url).await
}

/// The lines of every file of one manifest array, each file's lines as many as its `count`.
async fn lines_of(server: &TestServer, manifest: &Value, kind: &str) -> Vec<Vec<String>> {
    let mut files = Vec::new();
    for item in manifest[kind].as_array().into_iter().flatten() {
        let url = item["url"].as_str().expect("a url");
        let lines = export_file_lines(server, url).await;
        assert_eq!(
            lines.len() as u64,
            item["count"].as_u64().expect("a count"),
            "{url}: the count is not the number of lines"
        );
        files.push(lines);
    }
    files
}

/// Runs an organized export and puts its blocks together, asserting the block structure:
/// every file starts with a header, every other line belongs to the block of the header
/// before it, a block goes on in another file only through `continuesInFile` (whose file
/// starts with the same header again), and no patient has two blocks.
async fn run_organized(server: &TestServer, path: &str, body: Option<&Value>) -> Organized {
    let manifest = manifest_of(server, path, body, false).await;
    assert_eq!(manifest["outputOrganizedBy"], "Patient", "{manifest}");
    let items = manifest["output"].as_array().cloned().unwrap_or_default();
    let contents = lines_of(server, &manifest, "output").await;
    let files: Vec<OutputFile> = items
        .iter()
        .zip(contents)
        .map(|(item, lines)| OutputFile {
            url: item["url"].as_str().expect("a url").to_owned(),
            lines,
            continues_in_file: item["continuesInFile"].as_str().map(str::to_owned),
        })
        .collect();
    let by_url: HashMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.url.as_str(), i))
        .collect();
    let continued: BTreeSet<usize> = files
        .iter()
        .filter_map(|f| f.continues_in_file.as_deref())
        .map(|url| {
            *by_url
                .get(url)
                .unwrap_or_else(|| panic!("continuesInFile {url} is no output file"))
        })
        .collect();
    let mut blocks: Vec<Block> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut visited = 0;
    // Files in reading order: each chain of continuations from its first file.
    for first in (0..files.len()).filter(|i| !continued.contains(i)) {
        let mut at = Some(first);
        let mut continuing = false;
        while let Some(index) = at {
            let file = &files[index];
            visited += 1;
            assert!(!file.lines.is_empty(), "{} is empty", file.url);
            for (n, line) in file.lines.iter().enumerate() {
                match header_patient(&parse(line)) {
                    Some(patient) if n == 0 && continuing => {
                        let block = blocks.last_mut().expect("the block continued");
                        assert_eq!(
                            patient, block.patient,
                            "{} continues a block but starts with another header",
                            file.url
                        );
                        block.files.push(index);
                    }
                    Some(patient) => {
                        assert!(
                            seen.insert(patient.clone()),
                            "Patient/{patient} has two blocks"
                        );
                        blocks.push(Block {
                            patient,
                            lines: Vec::new(),
                            files: vec![index],
                            bytes: line.len() as u64 + 1,
                        });
                    }
                    None => {
                        assert!(n > 0, "{} does not start with a block header", file.url);
                        let block = blocks.last_mut().expect("a line after a header");
                        block.bytes += line.len() as u64 + 1;
                        block.lines.push(line.clone());
                    }
                }
            }
            continuing = file.continues_in_file.is_some();
            at = file
                .continues_in_file
                .as_deref()
                .and_then(|url| by_url.get(url).copied());
        }
    }
    assert_eq!(visited, files.len(), "continuesInFile links go round");
    for kind in ["deleted", "error"] {
        for item in manifest[kind].as_array().into_iter().flatten() {
            assert!(item["type"].is_string(), "a {kind} item has a type: {item}");
        }
    }
    let flatten = |files: Vec<Vec<String>>| -> Vec<Value> {
        files.into_iter().flatten().map(|l| parse(&l)).collect()
    };
    let deleted = flatten(lines_of(server, &manifest, "deleted").await);
    let errors = flatten(lines_of(server, &manifest, "error").await);
    Organized {
        manifest,
        files,
        blocks,
        deleted,
        errors,
    }
}

/// An ordinary (by type) export's resources by key, asserting none is repeated.
async fn run_by_type(
    server: &TestServer,
    path: &str,
    body: Option<&Value>,
) -> BTreeMap<Key, String> {
    let manifest = manifest_of(server, path, body, false).await;
    assert!(manifest.get("outputOrganizedBy").is_none(), "{manifest}");
    let mut resources = BTreeMap::new();
    for lines in lines_of(server, &manifest, "output").await {
        for line in lines {
            let key = key_of(&parse(&line));
            assert!(
                resources.insert(key.clone(), line).is_none(),
                "{key} is exported twice"
            );
        }
    }
    resources
}

/// What an ordinary `Patient/$export` of only `patient` (with `extra` parameters) exports.
async fn compartment_export(
    server: &TestServer,
    patient: &str,
    extra: &[(&str, &str)],
) -> BTreeMap<Key, String> {
    let reference = patient_ref(patient);
    let mut entries = vec![("patient", reference.as_str())];
    entries.extend_from_slice(extra);
    run_by_type(server, "/Patient/$export", Some(&parameters(&entries))).await
}

/// Asserts that every block is, byte for byte, what an ordinary export of its patient alone
/// exports with the same `extra` parameters, and that a block with the Patient starts with it.
async fn assert_blocks_are_compartments(
    server: &TestServer,
    organized: &Organized,
    extra: &[(&str, &str)],
) {
    for block in &organized.blocks {
        let expected = compartment_export(server, &block.patient, extra).await;
        assert_eq!(
            block.resources(),
            expected,
            "the block of Patient/{} is not its compartment",
            block.patient
        );
        let own = format!("Patient/{}", block.patient);
        if expected.contains_key(&own) {
            assert_eq!(
                key_of(&parse(&block.lines[0])),
                own,
                "the block does not start with its Patient"
            );
        }
    }
}

fn group(id: &str, members: &[&str]) -> Value {
    let member: Vec<Value> = members
        .iter()
        .map(|m| json!({"entity": {"reference": patient_ref(m)}}))
        .collect();
    json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": member})
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn patient_export_writes_one_block_per_patient_holding_its_compartment() {
    let server = spawn_server_with_synthea().await;
    // In two compartments, so in two blocks; and Provenance whose target is a patient.
    server
        .upsert(
            &json!({"resourceType": "Observation", "id": "shared", "status": "final",
            "code": {"text": "seen by both"},
            "subject": {"reference": patient_ref(PATIENT)},
            "performer": [{"reference": patient_ref(OTHER)}]}),
        )
        .await;
    server
        .upsert(&json!({"resourceType": "Provenance", "id": "prov-patient",
            "target": [{"reference": patient_ref(PATIENT)}],
            "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": {"display": "a test"}}]}))
        .await;
    let organized = run_organized(&server, "/Patient/$export?organizeOutputBy=Patient", None).await;
    assert_eq!(organized.patients(), synthea_ids("Patient"));
    assert!(organized.errors.is_empty(), "{:?}", organized.errors);
    assert_blocks_are_compartments(&server, &organized, &[]).await;
    for patient in [PATIENT, OTHER] {
        assert!(
            organized
                .block(patient)
                .resources()
                .contains_key("Observation/shared"),
            "Observation/shared is not in the block of {patient}"
        );
    }
    assert!(
        organized
            .block(PATIENT)
            .resources()
            .contains_key("Provenance/prov-patient")
    );
    // The default file size holds everything in one file.
    assert_eq!(organized.files.len(), 1);
    assert!(organized.files[0].continues_in_file.is_none());
}

#[tokio::test]
async fn group_export_writes_the_members_blocks_and_type_applies_inside_them() {
    let server = spawn_server_with_synthea().await;
    server.upsert(&group("g", &[PATIENT, OTHER])).await;
    let organized = run_organized(&server, "/Group/g/$export?organizeOutputBy=Patient", None).await;
    assert_eq!(
        organized.patients(),
        BTreeSet::from([PATIENT.to_owned(), OTHER.to_owned()])
    );
    assert_blocks_are_compartments(&server, &organized, &[]).await;

    // Without Patient in _type, a block is the header and the compartment's other resources.
    let types = "Observation,Condition";
    let typed = run_organized(
        &server,
        &format!("/Group/g/$export?organizeOutputBy=Patient&_type={types}"),
        None,
    )
    .await;
    assert_eq!(typed.patients(), organized.patients());
    for block in &typed.blocks {
        assert!(
            block
                .resources()
                .keys()
                .all(|k| k.starts_with("Observation/") || k.starts_with("Condition/")),
            "{block:?}"
        );
    }
    assert_blocks_are_compartments(&server, &typed, &[("_type", types)]).await;

    // A patient with nothing selected has no block.
    let only_one = run_organized(
        &server,
        "/Group/g/$export?organizeOutputBy=Patient&_type=AllergyIntolerance",
        None,
    )
    .await;
    assert_eq!(only_one.patients(), BTreeSet::from([PATIENT.to_owned()]));
}

#[tokio::test]
async fn files_roll_over_between_blocks_and_a_larger_block_continues_in_the_next_file() {
    // The blocks' sizes, written whole.
    let measured = {
        let server = spawn_server_with_synthea().await;
        run_organized(&server, "/Patient/$export?organizeOutputBy=Patient", None).await
    };
    let mut sizes: Vec<u64> = measured.blocks.iter().map(|b| b.bytes).collect();
    sizes.sort_unstable();
    // Smaller than the larger half of the blocks, larger than the two smallest together.
    let max_file_bytes = sizes[sizes.len() / 2];
    assert!(
        sizes[0] + sizes[1] < max_file_bytes,
        "the test data's blocks are too alike: {sizes:?}"
    );

    let server = spawn_server_with_options(ServerOptions {
        synthea: true,
        export: hearth_server::ExportSettings {
            workers: 1,
            max_file_bytes,
            ..ServerOptions::default().export
        },
        ..ServerOptions::default()
    })
    .await;
    let organized = run_organized(&server, "/Patient/$export?organizeOutputBy=Patient", None).await;
    // The same blocks as without the small files.
    assert_eq!(organized.key_sets(), measured.key_sets());
    let mut continued = 0;
    for block in &organized.blocks {
        let size = block.bytes;
        if size <= max_file_bytes {
            assert_eq!(
                block.files.len(),
                1,
                "a block of {size} bytes (files of {max_file_bytes}) was split"
            );
        } else {
            assert!(block.files.len() > 1, "a block of {size} bytes in one file");
            continued += 1;
        }
    }
    assert!(continued > 0);
    for file in &organized.files {
        let bytes: u64 = file.lines.iter().map(|l| l.len() as u64 + 1).sum();
        let single_line_over = file
            .lines
            .iter()
            .any(|l| l.len() as u64 + 1 > max_file_bytes);
        assert!(
            bytes <= max_file_bytes || single_line_over,
            "{} has {bytes} bytes (at most {max_file_bytes})",
            file.url
        );
    }
    // Some file holds more than one block: files roll over between blocks, not per block.
    let blocks_in = |index: usize| {
        organized
            .blocks
            .iter()
            .filter(|b| b.files.contains(&index))
            .count()
    };
    assert!(
        (0..organized.files.len()).any(|i| blocks_in(i) > 1),
        "every file holds one block"
    );
    let with_continuation = organized
        .files
        .iter()
        .filter(|f| f.continues_in_file.is_some())
        .count();
    assert!(with_continuation > 0 && with_continuation < organized.files.len());
}

#[tokio::test]
async fn system_export_writes_every_patients_block_and_reports_what_it_leaves_out() {
    let server = spawn_server_with_synthea().await;
    let system = run_organized(&server, "/$export?organizeOutputBy=Patient", None).await;
    let patient_level =
        run_organized(&server, "/Patient/$export?organizeOutputBy=Patient", None).await;
    assert_eq!(system.key_sets(), patient_level.key_sets());
    for block in &system.blocks {
        for key in block.resources().keys() {
            assert!(
                !key.starts_with("Organization/") && !key.starts_with("Practitioner/"),
                "{key} is outside every compartment"
            );
        }
    }
    assert_eq!(system.errors.len(), 1, "{:?}", system.errors);
    let issue = &system.errors[0]["issue"][0];
    assert_eq!(issue["severity"], "information", "{issue}");
    assert_eq!(issue["expression"][0], "organizeOutputBy", "{issue}");
    assert!(
        patient_level.errors.is_empty(),
        "{:?}",
        patient_level.errors
    );

    // A type no block can hold is refused by name.
    let refused = export_kick_off(
        &server,
        "/$export?organizeOutputBy=Patient&_type=Organization",
        None,
        false,
    )
    .await;
    let outcome = assert_outcome(refused, StatusCode::BAD_REQUEST).await;
    assert_eq!(outcome["issue"][0]["expression"][0], "_type", "{outcome}");
}

#[tokio::test]
async fn since_selects_block_contents_and_deletions_stay_transaction_bundles() {
    let server = spawn_server_with_synthea().await;
    let mut observation = run_by_type(
        &server,
        "/Patient/$export",
        Some(&parameters(&[
            ("patient", &patient_ref(PATIENT)),
            ("_type", "Observation"),
        ])),
    )
    .await
    .into_values()
    .map(|line| parse(&line))
    .next()
    .expect("an Observation of the patient");
    let condition = run_by_type(
        &server,
        "/Patient/$export",
        Some(&parameters(&[
            ("patient", &patient_ref(OTHER)),
            ("_type", "Condition"),
        ])),
    )
    .await
    .into_values()
    .map(|line| parse(&line))
    .next()
    .expect("a Condition of the other patient");
    let since = format_instant(now_after_load(&server).await + 1_000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    observation["status"] = json!("amended");
    server.upsert(&observation).await;
    let condition_id = id_of(&condition);
    assert!(
        server
            .delete(&format!("/Condition/{condition_id}"))
            .await
            .status()
            .is_success()
    );

    let organized = run_organized(
        &server,
        &format!(
            "/Patient/$export?organizeOutputBy=Patient&_since={}",
            enc(&since)
        ),
        None,
    )
    .await;
    // Only the changed Observation, in its patient's block, without the unchanged Patient.
    assert_eq!(organized.patients(), BTreeSet::from([PATIENT.to_owned()]));
    assert_eq!(
        organized
            .block(PATIENT)
            .resources()
            .into_keys()
            .collect::<Vec<_>>(),
        [key_of(&observation)]
    );
    let urls: Vec<&str> = organized
        .deleted
        .iter()
        .flat_map(|b| {
            assert_eq!(b["type"], "transaction", "{b}");
            b["entry"].as_array().into_iter().flatten()
        })
        .filter_map(|e| e["request"]["url"].as_str())
        .collect();
    assert_eq!(urls, [format!("Condition/{condition_id}")]);
    for item in organized.manifest["deleted"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert_eq!(item["type"], "Bundle");
    }
}

/// The server's clock after the load: the `lastUpdated` of a throwaway write.
async fn now_after_load(server: &TestServer) -> Micros {
    let written = server
        .upsert(&json!({"resourceType": "Organization", "id": "clock", "name": "clock"}))
        .await;
    parse_instant(
        written["meta"]["lastUpdated"]
            .as_str()
            .expect("lastUpdated"),
    )
    .expect("an instant")
}

#[tokio::test]
async fn unsupported_values_are_refused_by_name_or_ignored_when_lenient() {
    let server = spawn_server().await;
    server
        .upsert(&json!({"resourceType": "Patient", "id": "p1"}))
        .await;
    server.upsert(&group("g", &["p1"])).await;
    for level in ["/$export", "/Patient/$export", "/Group/g/$export"] {
        for value in ["Encounter", "patient"] {
            let refused = export_kick_off(
                &server,
                &format!("{level}?organizeOutputBy={value}"),
                None,
                false,
            )
            .await;
            let outcome = assert_outcome(refused, StatusCode::BAD_REQUEST).await;
            assert_eq!(
                outcome["issue"][0]["expression"][0], "organizeOutputBy",
                "{level}: {outcome}"
            );
        }
        let manifest = manifest_of(
            &server,
            &format!("{level}?organizeOutputBy=Encounter"),
            None,
            true,
        )
        .await;
        assert!(manifest.get("outputOrganizedBy").is_none(), "{manifest}");
        let output = manifest["output"].as_array().expect("output");
        assert!(
            !output.is_empty() && output.iter().all(|item| item["type"].is_string()),
            "{level}: not by type: {manifest}"
        );
        let errors: Vec<Value> = lines_of(&server, &manifest, "error")
            .await
            .into_iter()
            .flatten()
            .map(|l| parse(&l))
            .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0]["issue"][0]["expression"][0], "organizeOutputBy");
    }
    // POST Parameters carry it too.
    let body = parameters(&[("organizeOutputBy", "Patient")]);
    let manifest = manifest_of(&server, "/Patient/$export", Some(&body), false).await;
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
}
