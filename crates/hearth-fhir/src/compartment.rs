//! Patient compartment membership: which patients a resource belongs to.
//!
//! The links come from the R4 Patient CompartmentDefinition and the FHIRPath expressions of its
//! search parameters, reduced by `tools/gen_r4_tables.py` to plain element paths. Only literal
//! references count: a server can decide membership from the resource alone, without resolving
//! anything, and the same resource always lands in the same compartments.

use serde_json::Value;

use crate::generated::{CompartmentParam, PATIENT_COMPARTMENT};

/// The search parameters linking `resource_type` to the Patient compartment, or `None` if
/// resources of that type never belong to one.
pub fn compartment_params(resource_type: &str) -> Option<&'static [CompartmentParam]> {
    PATIENT_COMPARTMENT
        .binary_search_by(|(name, _)| (*name).cmp(resource_type))
        .ok()
        .map(|i| PATIENT_COMPARTMENT[i].1)
}

/// Whether resources of `resource_type` can belong to a Patient compartment (a Patient always
/// belongs to its own).
pub fn is_patient_compartment_type(resource_type: &str) -> bool {
    resource_type == "Patient" || compartment_params(resource_type).is_some()
}

/// The ids of every patient whose compartment `resource` belongs to, sorted and deduplicated.
///
/// `resource_type` is trusted rather than read from `resource`, so callers that have already
/// validated the type do not pay for it twice. Input of any shape is accepted: whatever does
/// not look like a FHIR reference to a Patient is ignored.
pub fn patient_compartment_members(resource_type: &str, resource: &Value) -> Vec<String> {
    let mut ids: Vec<&str> = Vec::new();
    if resource_type == "Patient"
        && let Some(id) = resource.get("id").and_then(Value::as_str)
        && is_valid_id(id)
    {
        ids.push(id);
    }
    for param in compartment_params(resource_type).unwrap_or_default() {
        for path in param.paths {
            collect_patient_ids(resource, path, &mut ids);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter().map(str::to_owned).collect()
}

/// Follows `path` from `node`, fanning out over arrays, and keeps the ids of Patient references
/// found at its end.
fn collect_patient_ids<'a>(node: &'a Value, path: &[&str], out: &mut Vec<&'a str>) {
    let Value::Object(object) = node else {
        return;
    };
    let Some((step, rest)) = path.split_first() else {
        if let Some(id) = object
            .get("reference")
            .and_then(Value::as_str)
            .and_then(patient_id_from_reference)
        {
            out.push(id);
        }
        return;
    };
    match object.get(*step) {
        // Only one level: FHIR JSON has no arrays of arrays, and descending into them would let
        // hostile input choose the recursion depth.
        Some(Value::Array(items)) => {
            for item in items {
                collect_patient_ids(item, rest, out);
            }
        }
        Some(child) => collect_patient_ids(child, rest, out),
        None => {}
    }
}

/// The patient id named by a literal reference: `Patient/<id>`, `Patient/<id>/_history/<v>`,
/// or an absolute URL ending in either. Contained (`#x`), `urn:uuid:`, conditional and other
/// types' references give `None`.
pub fn patient_id_from_reference(reference: &str) -> Option<&str> {
    let (path, absolute) = match reference.split_once("://") {
        Some((scheme, rest)) if is_url_scheme(scheme) => (rest.split_once('/')?.1, true),
        Some(_) => return None,
        None => (reference, false),
    };
    let mut segments = path.rsplit('/');
    let last = segments.next()?;
    let id = match segments.next()? {
        "Patient" => last,
        "_history" if is_valid_id(last) => {
            let id = segments.next()?;
            if segments.next()? != "Patient" {
                return None;
            }
            id
        }
        _ => return None,
    };
    // A relative reference is exactly the typed path; a prefix would make it something other
    // than a reference to this server's Patient (only absolute URLs carry a service base).
    if !absolute && segments.next().is_some() {
        return None;
    }
    is_valid_id(id).then_some(id)
}

/// FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// RFC 3986 `scheme`: a letter, then letters, digits, `+`, `-` or `.`.
fn is_url_scheme(scheme: &str) -> bool {
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fs::File;
    use std::io::{BufRead, BufReader};
    use std::path::Path;

    use flate2::read::MultiGzDecoder;
    use serde_json::json;

    use super::*;
    use crate::resource_type::is_resource_type;

    const SYNTHEA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/synthea-r4-10p");

    #[test]
    fn table_is_sorted_and_well_formed() {
        assert!(PATIENT_COMPARTMENT.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(PATIENT_COMPARTMENT.len(), 67);
        for (resource_type, params) in PATIENT_COMPARTMENT {
            assert!(is_resource_type(resource_type), "{resource_type}");
            assert!(!params.is_empty(), "{resource_type}");
            for param in *params {
                assert!(!param.paths.is_empty(), "{resource_type}.{}", param.param);
                assert!(param.paths.iter().all(|p| !p.is_empty()));
            }
        }
    }

    #[test]
    fn compartment_types() {
        for t in [
            "Patient",
            "Observation",
            "Encounter",
            "Claim",
            "AuditEvent",
            "Group",
        ] {
            assert!(is_patient_compartment_type(t), "{t}");
        }
        for t in [
            "Organization",
            "Practitioner",
            "Medication",
            "Bundle",
            "Nope",
            "",
        ] {
            assert!(!is_patient_compartment_type(t), "{t}");
        }
        let observation: Vec<_> = compartment_params("Observation")
            .unwrap_or_default()
            .iter()
            .map(|p| (p.param, p.paths))
            .collect();
        assert_eq!(
            observation,
            [
                ("performer", &[&["performer"][..]][..]),
                ("subject", &[&["subject"][..]][..]),
            ]
        );
        let patient = compartment_params("Patient").unwrap_or_default();
        assert_eq!(patient.len(), 1);
        assert_eq!(patient[0].paths, &[&["link", "other"][..]]);
        assert_eq!(compartment_params("Organization"), None);
    }

    #[test]
    fn reference_forms() {
        let accepted = [
            ("Patient/p1", "p1"),
            ("Patient/p1/_history/3", "p1"),
            ("http://example.org/fhir/Patient/p1", "p1"),
            ("https://example.org/Patient/p1/_history/v-2.1", "p1"),
            ("http://example.org/a/b/c/Patient/p1", "p1"),
            (
                "Patient/018f428e-34f6-4707-8009-5ad742f901e7",
                "018f428e-34f6-4707-8009-5ad742f901e7",
            ),
        ];
        for (reference, id) in accepted {
            assert_eq!(
                patient_id_from_reference(reference),
                Some(id),
                "{reference}"
            );
        }
        let long = format!("Patient/{}", "a".repeat(65));
        let rejected = [
            "#p1",
            "urn:uuid:018f428e-34f6-4707-8009-5ad742f901e7",
            "Practitioner/p1",
            "patient/p1",
            "Patient",
            "Patient/",
            "/Patient/p1",
            "base/Patient/p1",
            "Patient/p1/",
            "Patient/p1/extra",
            "Patient/p1/_history",
            "Patient/p1/_history/",
            "Patient/p1/_history/2/x",
            "Patient/_history/2",
            "Patient?identifier=x|1",
            "Patient/p1?x=y",
            "Patient/p_1",
            "Patient/p 1",
            long.as_str(),
            "http://Patient/p1",
            "http://example.org/Practitioner/p1",
            "http://example.org/Patient/p1#frag",
            "1http://example.org/Patient/p1",
            "://example.org/Patient/p1",
            "",
            "/",
            "//",
        ];
        for reference in rejected {
            assert_eq!(patient_id_from_reference(reference), None, "{reference}");
        }
    }

    #[test]
    fn observation_subject_and_performers() {
        let observation = json!({
            "resourceType": "Observation",
            "id": "o1",
            "subject": {"reference": "Patient/p1"},
            "performer": [
                {"reference": "Practitioner/dr1"},
                {"reference": "Patient/p2/_history/7"},
                {"reference": "http://example.org/fhir/Patient/p3"},
                {"reference": "#contained"},
                {"reference": "urn:uuid:0b3d1a1e-6a4f-4e0e-9b0e-2f6a1c1d9e11"},
                {"display": "no reference at all"},
                {"reference": "Patient/p1"},
            ],
            // Not a compartment link for Observation.
            "focus": [{"reference": "Patient/p9"}],
        });
        assert_eq!(
            patient_compartment_members("Observation", &observation),
            ["p1", "p2", "p3"]
        );
    }

    #[test]
    fn only_practitioner_refs_give_nothing() {
        let observation = json!({
            "resourceType": "Observation",
            "subject": {"reference": "Group/g1"},
            "performer": [{"reference": "Practitioner/dr1"}],
        });
        assert!(patient_compartment_members("Observation", &observation).is_empty());
    }

    #[test]
    fn patient_includes_itself_and_links() {
        let patient = json!({
            "resourceType": "Patient",
            "id": "p1",
            "link": [
                {"other": {"reference": "Patient/p0"}, "type": "replaces"},
                {"other": {"reference": "RelatedPerson/r1"}, "type": "seealso"},
                {"other": {"reference": "Patient/p1"}, "type": "refer"},
            ],
        });
        assert_eq!(
            patient_compartment_members("Patient", &patient),
            ["p0", "p1"]
        );
        // An id that cannot be a FHIR id is not trusted as a compartment.
        let bad_id = json!({"resourceType": "Patient", "id": "a/b"});
        assert!(patient_compartment_members("Patient", &bad_id).is_empty());
        let numeric_id = json!({"resourceType": "Patient", "id": 7});
        assert!(patient_compartment_members("Patient", &numeric_id).is_empty());
    }

    #[test]
    fn multiple_paths_and_nested_arrays() {
        let audit = json!({
            "resourceType": "AuditEvent",
            "agent": [
                {"who": {"reference": "Patient/a"}},
                {"who": {"reference": "Device/d"}},
                {"who": [{"reference": "Patient/b"}]},
            ],
            "entity": [{"what": {"reference": "Patient/c"}}, {"what": null}],
        });
        assert_eq!(
            patient_compartment_members("AuditEvent", &audit),
            ["a", "b", "c"]
        );

        let care_plan = json!({
            "resourceType": "CarePlan",
            "subject": {"reference": "Patient/s"},
            "activity": [
                {"detail": {"performer": [{"reference": "Patient/d1"}, {"reference": "Patient/d2"}]}},
                {"reference": {"reference": "Patient/not-a-detail"}},
            ],
        });
        assert_eq!(
            patient_compartment_members("CarePlan", &care_plan),
            ["d1", "d2", "s"]
        );
    }

    #[test]
    fn junk_never_panics() {
        let junk = [
            json!(null),
            json!(true),
            json!(3.5),
            json!("Patient/p1"),
            json!([{"subject": {"reference": "Patient/p1"}}]),
            json!({"subject": "Patient/p1"}),
            json!({"subject": ["Patient/p1", 1, null, [], {}]}),
            json!({"subject": [[{"reference": "Patient/p1"}]]}),
            json!({"subject": {"reference": 42}}),
            json!({"subject": {"reference": ["Patient/p1"]}}),
            json!({"subject": {"reference": {"reference": "Patient/p1"}}}),
            json!({"subject": {"reference": "Patient/\u{0}"}}),
            json!({"subject": {"reference": "Patient/é"}}),
            json!({"id": {"id": "p1"}, "link": {"other": "x"}}),
            json!({"link": [null, 1, "a", {"other": [{"reference": "Patient/ok"}]}]}),
        ];
        for value in &junk {
            for resource_type in ["Observation", "Patient", "Organization", "", "\u{0}"] {
                let members = patient_compartment_members(resource_type, value);
                assert!(members.iter().all(|id| is_valid_id(id)), "{value}");
            }
        }
        // Nested arrays are not FHIR and are skipped, not searched.
        assert!(patient_compartment_members("Observation", &junk[7]).is_empty());
        assert_eq!(patient_compartment_members("Patient", &junk[14]), ["ok"]);
        // Walking never goes deeper than the path, however deep the document.
        let mut deep = json!({"reference": "Patient/p1"});
        for _ in 0..1_000 {
            deep = json!({"subject": [deep]});
        }
        assert!(patient_compartment_members("Observation", &deep).is_empty());
    }

    fn read_ndjson_gz(path: &Path) -> Vec<Value> {
        let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        BufReader::new(MultiGzDecoder::new(file))
            .lines()
            .map(|line| line.unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            })
            .collect()
    }

    #[test]
    fn synthea_resources_belong_to_their_patients() {
        let dir = Path::new(SYNTHEA_DIR);
        let mut resources = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.to_string_lossy().ends_with(".ndjson.gz"))
            .collect();
        files.sort();
        for path in &files {
            resources.extend(read_ndjson_gz(path));
        }

        let counts: Value = serde_json::from_slice(
            &std::fs::read(dir.with_extension("counts.json")).expect("counts.json"),
        )
        .expect("counts.json is JSON");
        assert_eq!(Some(resources.len() as u64), counts["resources"].as_u64());

        let patient_ids: BTreeSet<String> = resources
            .iter()
            .filter(|r| r["resourceType"] == "Patient")
            .flat_map(|r| patient_compartment_members("Patient", r))
            .collect();
        assert_eq!(patient_ids.len(), 10);

        let mut members_by_type: BTreeMap<&str, usize> = BTreeMap::new();
        for resource in &resources {
            let resource_type = resource["resourceType"].as_str().expect("resourceType");
            assert!(is_resource_type(resource_type), "{resource_type}");
            let members = patient_compartment_members(resource_type, resource);
            let id = &resource["id"];
            match resource_type {
                "Patient" => assert_eq!(members, [id.as_str().expect("id")]),
                _ if is_patient_compartment_type(resource_type) => {
                    assert!(!members.is_empty(), "{resource_type}/{id} has no patient");
                    for member in &members {
                        assert!(
                            patient_ids.contains(member),
                            "{resource_type}/{id} names unknown patient {member}"
                        );
                    }
                }
                _ => assert!(members.is_empty(), "{resource_type}/{id}: {members:?}"),
            }
            *members_by_type.entry(resource_type).or_default() += 1;
        }
        assert_eq!(members_by_type.get("Organization"), Some(&16));
        assert_eq!(members_by_type.get("Practitioner"), Some(&16));
        assert!(!is_patient_compartment_type("Organization"));
        assert!(!is_patient_compartment_type("Practitioner"));
    }
}
