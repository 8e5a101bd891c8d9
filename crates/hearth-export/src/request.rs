//! The kick-off request: every parameter is understood here, or refused by name.

use hearth_fhir::instant::{Micros, format_instant, parse_instant};
use hearth_fhir::resource_type::canonical_resource_type;
use hearth_fhir::search::Filter;
use serde::{Deserialize, Serialize};

/// Which population an export covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// `[base]/$export`: everything.
    System,
    /// `[base]/Patient/$export`: the compartments of all patients.
    Patient,
    /// `[base]/Group/[id]/$export`: the compartments of the Group's members.
    Group(String),
}

/// One `_elements` entry: `Type.element`, or `element` for every type that has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElementSpec {
    pub resource_type: Option<String>,
    pub element: String,
}

/// A parameter the server ignored under `Prefer: handling=lenient`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoredParameter {
    pub name: String,
    pub reason: String,
}

/// A validated export request, stored with the job so any worker can carry it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRequest {
    pub level: Level,
    /// `_type`; empty means every type.
    pub types: Vec<String>,
    pub since: Option<Micros>,
    pub until: Option<Micros>,
    /// `_exportId`, echoed in the manifest.
    pub export_id: Option<String>,
    /// `_elements`; empty means whole resources.
    #[serde(default)]
    pub elements: Vec<ElementSpec>,
    /// `patient` (POST, Patient and Group levels): ids of the patients to restrict to.
    #[serde(default)]
    pub patients: Vec<String>,
    /// `includeAssociatedData=RelevantProvenanceResources`.
    #[serde(default)]
    pub relevant_provenance: bool,
    /// `includeAssociatedData=LatestProvenanceResources` without `RelevantProvenanceResources`
    /// (which, less restrictive, wins when both are asked for).
    #[serde(default)]
    pub latest_provenance: bool,
    /// `_typeFilter` (and eHealth's `_typePostFetchFilterUrl`) queries, `Type?params`, each
    /// checked by the search engine at kick-off.
    #[serde(default)]
    pub type_filters: Vec<String>,
    /// Queries in the same `Type?params` form that the client's access token restricts types
    /// to (SMART v2 granular scopes): a resource of a type named here is exported only if it
    /// matches one of them, whatever `_typeFilter` says.
    #[serde(default)]
    pub scope_filters: Vec<String>,
    /// The patients a Group or `patient` export covers, resolved at kick-off.
    #[serde(default)]
    pub resolved_patients: Vec<String>,
    /// `organizeOutputBy`: the type whose resource blocks the files hold (only `Patient`).
    #[serde(default)]
    pub organize_output_by: Option<String>,
    /// `allowPartialManifests=true`: status requests may answer with a manifest of the files
    /// written so far, and manifests come in pages linked by `next`.
    #[serde(default)]
    pub allow_partial_manifests: bool,
    pub ignored: Vec<IgnoredParameter>,
    /// The kick-off URL as the client sent it (without a POST body).
    pub request_url: String,
}

/// A parameter that cannot be accepted: the kick-off answers `400` naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParameterError {
    pub parameter: String,
    pub message: String,
}

fn refuse(parameter: &str, message: impl Into<String>) -> ParameterError {
    ParameterError {
        parameter: parameter.to_owned(),
        message: message.into(),
    }
}

/// The values of `_outputFormat` that mean NDJSON.
pub const NDJSON_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// The `organizeOutputBy` values this server implements.
const ORGANIZING_TYPES: &[&str] = &["Patient"];

/// `includeAssociatedData` values (CodeSystem
/// `http://hl7.org/fhir/uv/bulkdata/CodeSystem/include-associated-data`).
const LATEST_PROVENANCE: &str = "LatestProvenanceResources";
const RELEVANT_PROVENANCE: &str = "RelevantProvenanceResources";

/// `Patient/<id>` (also absolute, or with `_history`) as the patient id.
fn patient_reference(value: &str) -> Option<&str> {
    hearth_fhir::compartment::patient_id_from_reference(value)
}

/// STU2 joined several `_typeFilter` queries with commas; commas also separate OR-ed values
/// inside one query. A comma starts a new query only where a resource type and `?` follow.
fn split_type_filters(value: &str) -> Vec<&str> {
    let mut filters = Vec::new();
    let mut start = 0;
    for (at, _) in value.match_indices(',') {
        let rest = &value[at + 1..];
        let starts_query = rest
            .split_once('?')
            .is_some_and(|(head, _)| canonical_resource_type(head.trim()).is_some());
        if starts_query {
            filters.push(value[start..at].trim());
            start = at + 1;
        }
    }
    filters.push(value[start..].trim());
    filters.retain(|f| !f.is_empty());
    filters
}

fn is_element_name(name: &str) -> bool {
    let name = name.strip_suffix("[x]").unwrap_or(name);
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
}

impl ExportRequest {
    /// Validates kick-off parameters (query parameters of a GET, or the `Parameters` of a POST
    /// flattened to name/value pairs). Repeated and comma-separated values are merged.
    pub fn parse(
        level: Level,
        params: &[(String, String)],
        lenient: bool,
        request_url: String,
        now: Micros,
    ) -> Result<Self, ParameterError> {
        let mut request = ExportRequest {
            level,
            types: Vec::new(),
            since: None,
            until: None,
            export_id: None,
            elements: Vec::new(),
            patients: Vec::new(),
            relevant_provenance: false,
            latest_provenance: false,
            resolved_patients: Vec::new(),
            organize_output_by: None,
            type_filters: Vec::new(),
            scope_filters: Vec::new(),
            allow_partial_manifests: false,
            ignored: Vec::new(),
            request_url,
        };
        let mut latest_provenance_asked = false;
        let mut seen_output_format = false;
        let mut seen_partial_manifests = false;
        for (name, value) in params {
            let value = value.trim();
            match name.as_str() {
                "_outputFormat" => {
                    if seen_output_format {
                        return Err(refuse(name, "_outputFormat may be given only once"));
                    }
                    seen_output_format = true;
                    if !NDJSON_FORMATS.contains(&value) {
                        return Err(refuse(
                            name,
                            format!(
                                "_outputFormat '{value}' is not supported; use application/fhir+ndjson"
                            ),
                        ));
                    }
                }
                "_type" => {
                    for type_name in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        match canonical_resource_type(type_name) {
                            Some(known) => {
                                if !request.types.iter().any(|t| t == known) {
                                    request.types.push(known.to_owned());
                                }
                            }
                            None if lenient => request.ignored.push(IgnoredParameter {
                                name: "_type".into(),
                                reason: format!(
                                    "'{type_name}' is not an R4 resource type; it was left out"
                                ),
                            }),
                            None => {
                                return Err(refuse(
                                    name,
                                    format!("_type '{type_name}' is not an R4 resource type"),
                                ));
                            }
                        }
                    }
                }
                "_since" | "_until" => {
                    let instant =
                        parse_instant(value).map_err(|e| refuse(name, format!("{name}: {e}")))?;
                    let slot = if name == "_since" {
                        &mut request.since
                    } else {
                        &mut request.until
                    };
                    if slot.is_some() {
                        return Err(refuse(name, format!("{name} may be given only once")));
                    }
                    if name == "_since" && instant > now {
                        return Err(refuse(
                            name,
                            format!(
                                "_since {value} is in the future (server time {})",
                                format_instant(now)
                            ),
                        ));
                    }
                    *slot = Some(instant);
                }
                "_exportId" => request.export_id = Some(value.to_owned()),
                "patient" => {
                    if request.level == Level::System {
                        return Err(refuse(
                            name,
                            "the patient parameter applies to Patient and Group exports only",
                        ));
                    }
                    for reference in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        let id = patient_reference(reference).ok_or_else(|| {
                            refuse(name, format!("patient '{reference}' is not a reference to a Patient (Patient/<id>)"))
                        })?;
                        if !request.patients.iter().any(|p| p == id) {
                            request.patients.push(id.to_owned());
                        }
                    }
                }
                "_elements" => {
                    for entry in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        // `Type.element` starts with a type (capitalised); `a.b` is a path
                        // below the top level, which `_elements` cannot select.
                        let (resource_type, element) = match entry.split_once('.') {
                            Some((first, element))
                                if first.starts_with(|c: char| c.is_ascii_uppercase()) =>
                            {
                                (Some(first), element)
                            }
                            _ => (None, entry),
                        };
                        let known_type = resource_type.map(canonical_resource_type);
                        let problem = if known_type == Some(None) {
                            Some(format!(
                                "_elements '{entry}': '{}' is not an R4 resource type",
                                resource_type.unwrap_or("")
                            ))
                        } else if !is_element_name(element) {
                            Some(format!(
                                "_elements '{entry}': only top-level elements (Type.element or element) can be selected"
                            ))
                        } else {
                            None
                        };
                        match problem {
                            Some(reason) if lenient => request.ignored.push(IgnoredParameter {
                                name: "_elements".into(),
                                reason,
                            }),
                            Some(reason) => return Err(refuse(name, reason)),
                            None => request.elements.push(ElementSpec {
                                resource_type: known_type.flatten().map(str::to_owned),
                                element: element.to_owned(),
                            }),
                        }
                    }
                }
                "_typeFilter" | "_typePostFetchFilterUrl" => {
                    for filter in split_type_filters(value) {
                        match Filter::parse_type_filter(filter) {
                            Ok(_) => request.type_filters.push(filter.to_owned()),
                            Err(e) => {
                                let reason = format!("{name} '{filter}': {e}");
                                if lenient {
                                    request.ignored.push(IgnoredParameter {
                                        name: name.clone(),
                                        reason,
                                    });
                                } else {
                                    return Err(refuse(name, reason));
                                }
                            }
                        }
                    }
                }
                "includeAssociatedData" => {
                    for code in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        match code {
                            RELEVANT_PROVENANCE => request.relevant_provenance = true,
                            LATEST_PROVENANCE => latest_provenance_asked = true,
                            other => {
                                let reason = format!(
                                    "includeAssociatedData '{other}' is not supported (LatestProvenanceResources and RelevantProvenanceResources are)"
                                );
                                if lenient {
                                    request.ignored.push(IgnoredParameter {
                                        name: name.clone(),
                                        reason,
                                    });
                                } else {
                                    return Err(refuse(name, reason));
                                }
                            }
                        }
                    }
                }
                "organizeOutputBy" => {
                    if request.organize_output_by.is_some() {
                        return Err(refuse(name, "organizeOutputBy may be given only once"));
                    }
                    match ORGANIZING_TYPES.iter().find(|t| **t == value) {
                        Some(organizing) => {
                            request.organize_output_by = Some((*organizing).to_owned())
                        }
                        None if lenient => request.ignored.push(IgnoredParameter {
                            name: name.clone(),
                            reason: format!(
                                "organizeOutputBy '{value}' is not supported (Patient is); the output is organized by type"
                            ),
                        }),
                        None => {
                            return Err(refuse(
                                name,
                                format!(
                                    "organizeOutputBy '{value}' is not supported; only Patient is"
                                ),
                            ));
                        }
                    }
                }
                "allowPartialManifests" => {
                    if seen_partial_manifests {
                        return Err(refuse(name, "allowPartialManifests may be given only once"));
                    }
                    seen_partial_manifests = true;
                    match value {
                        "true" => request.allow_partial_manifests = true,
                        "false" => {}
                        other => {
                            let reason = format!(
                                "allowPartialManifests must be true or false, not '{other}'"
                            );
                            if lenient {
                                request.ignored.push(IgnoredParameter {
                                    name: name.clone(),
                                    reason: format!(
                                        "{reason}; it was ignored (manifests are not partial)"
                                    ),
                                });
                            } else {
                                return Err(refuse(name, reason));
                            }
                        }
                    }
                }
                // Asks for the JSON OperationOutcome format that Hearth uses anyway.
                "_format"
                    if matches!(value, "json" | "application/json" | "application/fhir+json") => {}
                other => {
                    if lenient {
                        request.ignored.push(IgnoredParameter {
                            name: other.to_owned(),
                            reason: format!(
                                "'{other}' is not a parameter of $export; it was ignored"
                            ),
                        });
                    } else {
                        return Err(refuse(
                            other,
                            format!("'{other}' is not a parameter of $export"),
                        ));
                    }
                }
            }
        }
        // With several values the least restrictive applies: Relevant covers Latest.
        request.latest_provenance = latest_provenance_asked && !request.relevant_provenance;
        if request.latest_provenance && request.organize_output_by.is_some() {
            // Blocks hold a compartment's Provenance as it is; picking the latest would need
            // the whole export first.
            let reason = "includeAssociatedData=LatestProvenanceResources cannot be combined with organizeOutputBy".to_owned();
            if lenient {
                request.latest_provenance = false;
                request.ignored.push(IgnoredParameter {
                    name: "includeAssociatedData".into(),
                    reason: format!("{reason}; it was ignored"),
                });
            } else {
                return Err(refuse("includeAssociatedData", reason));
            }
        }
        // Blocks hold patient compartments, whatever the level.
        if request.level != Level::System || request.organize_output_by.is_some() {
            let mut kept = Vec::new();
            for resource_type in std::mem::take(&mut request.types) {
                if hearth_fhir::compartment::is_patient_compartment_type(&resource_type) {
                    kept.push(resource_type);
                } else if lenient {
                    request.ignored.push(IgnoredParameter {
                        name: "_type".into(),
                        reason: format!(
                            "{resource_type} is not in the Patient compartment; it was left out"
                        ),
                    });
                } else {
                    let covered_by = if request.level == Level::System {
                        "output organized by Patient"
                    } else {
                        "Patient and Group exports"
                    };
                    return Err(refuse(
                        "_type",
                        format!(
                            "_type {resource_type} is not in the Patient compartment, which {covered_by} cover"
                        ),
                    ));
                }
            }
            request.types = kept;
        }
        if let (Some(since), Some(until)) = (request.since, request.until)
            && until <= since
        {
            return Err(refuse("_until", "_until must be later than _since"));
        }
        Ok(request)
    }
}

/// What manifests need from a stored request ([`ExportRequest`] JSON), read without the rest of
/// it: a Group export's request lists every patient, and status requests read this often.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ManifestSettings {
    #[serde(default)]
    pub allow_partial_manifests: bool,
    #[serde(default)]
    pub export_id: Option<String>,
    #[serde(default)]
    pub organize_output_by: Option<String>,
}

impl ManifestSettings {
    pub fn of_stored(stored: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(params: &[(&str, &str)], lenient: bool) -> Result<ExportRequest, ParameterError> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let now = parse_instant("2026-01-01T00:00:00Z").unwrap();
        ExportRequest::parse(
            Level::System,
            &params,
            lenient,
            "http://x/$export".into(),
            now,
        )
    }

    #[test]
    fn merges_repeated_and_comma_separated_types() {
        let request = parse(
            &[
                ("_type", "Patient,Observation"),
                ("_type", "Patient"),
                ("_type", "Encounter"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(request.types, ["Patient", "Observation", "Encounter"]);
    }

    #[test]
    fn refuses_bad_values_by_name() {
        for (params, parameter) in [
            (vec![("_outputFormat", "application/xml")], "_outputFormat"),
            (vec![("_type", "MissingType")], "_type"),
            (vec![("_since", "0000-60-01T30:70:80+05:00")], "_since"),
            (vec![("_since", "2057-01-01T00:00:00+05:00")], "_since"),
            (vec![("_elements", "Nope.id")], "_elements"),
            (
                vec![("includeAssociatedData", "_custom")],
                "includeAssociatedData",
            ),
            (vec![("patient", "Patient/1")], "patient"),
            (vec![("foo", "bar")], "foo"),
        ] {
            assert_eq!(parse(&params, false).unwrap_err().parameter, parameter);
        }
    }

    #[test]
    fn organize_output_by_takes_patient_only() {
        let request = parse(&[("organizeOutputBy", "Patient")], false).unwrap();
        assert_eq!(request.organize_output_by.as_deref(), Some("Patient"));
        for value in ["Encounter", "patient", ""] {
            let refused = parse(&[("organizeOutputBy", value)], false).unwrap_err();
            assert_eq!(refused.parameter, "organizeOutputBy");
            let lenient = parse(&[("organizeOutputBy", value)], true).unwrap();
            assert_eq!(lenient.organize_output_by, None);
            assert_eq!(lenient.ignored[0].name, "organizeOutputBy");
        }
        // Resources outside every compartment have no block to go in.
        let refused = parse(
            &[
                ("_type", "Patient,Organization"),
                ("organizeOutputBy", "Patient"),
            ],
            false,
        )
        .unwrap_err();
        assert_eq!(refused.parameter, "_type");
        let lenient = parse(
            &[
                ("_type", "Patient,Organization"),
                ("organizeOutputBy", "Patient"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(lenient.types, ["Patient"]);
    }

    #[test]
    fn partial_manifests_take_a_boolean_once() {
        assert!(
            parse(&[("allowPartialManifests", "true")], false)
                .unwrap()
                .allow_partial_manifests
        );
        assert!(
            !parse(&[("allowPartialManifests", "false")], false)
                .unwrap()
                .allow_partial_manifests
        );
        for params in [
            vec![("allowPartialManifests", "yes")],
            vec![("allowPartialManifests", "TRUE")],
            vec![("allowPartialManifests", "")],
            vec![
                ("allowPartialManifests", "true"),
                ("allowPartialManifests", "true"),
            ],
        ] {
            assert_eq!(
                parse(&params, false).unwrap_err().parameter,
                "allowPartialManifests"
            );
        }
        let lenient = parse(&[("allowPartialManifests", "yes")], true).unwrap();
        assert!(!lenient.allow_partial_manifests);
        assert_eq!(lenient.ignored[0].name, "allowPartialManifests");
    }

    #[test]
    fn manifest_settings_are_read_back_from_the_stored_request() {
        let request = parse(
            &[
                ("allowPartialManifests", "true"),
                ("_exportId", "x-1"),
                ("organizeOutputBy", "Patient"),
            ],
            false,
        )
        .unwrap();
        let stored = serde_json::to_string(&request).unwrap();
        assert_eq!(
            ManifestSettings::of_stored(&stored).unwrap(),
            ManifestSettings {
                allow_partial_manifests: true,
                export_id: Some("x-1".into()),
                organize_output_by: Some("Patient".into()),
            }
        );
        let stored = serde_json::to_string(&parse(&[], false).unwrap()).unwrap();
        assert_eq!(
            ManifestSettings::of_stored(&stored).unwrap(),
            ManifestSettings::default()
        );
        // Jobs stored before the field existed.
        assert_eq!(
            ManifestSettings::of_stored(r#"{"level":"System"}"#).unwrap(),
            ManifestSettings::default()
        );
    }

    #[test]
    fn lenient_ignores_and_reports() {
        let request = parse(
            &[
                ("_typeFilter", "Patient?status=active"),
                ("_type", "Patient,Nope"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(request.types, ["Patient"]);
        let names: Vec<&str> = request.ignored.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["_typeFilter", "_type"]);
    }

    #[test]
    fn accepts_every_ndjson_alias_and_instants_with_offsets() {
        for format in NDJSON_FORMATS {
            assert!(parse(&[("_outputFormat", format)], false).is_ok());
        }
        let request = parse(&[("_since", "2025-01-01T00:00:00+00:00")], false).unwrap();
        assert_eq!(
            request.since,
            Some(parse_instant("2025-01-01T00:00:00Z").unwrap())
        );
    }
}

#[cfg(test)]
mod type_filter_tests {
    use super::*;

    #[test]
    fn splits_comma_joined_queries_but_not_or_values() {
        assert_eq!(
            split_type_filters(
                "MedicationRequest?status=active,completed,MedicationRequest?date=gt2018"
            ),
            [
                "MedicationRequest?status=active,completed",
                "MedicationRequest?date=gt2018"
            ]
        );
    }
}
