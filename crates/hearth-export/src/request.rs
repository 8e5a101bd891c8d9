//! The kick-off request: every parameter is understood here, or refused by name.

use hearth_fhir::instant::{Micros, format_instant, parse_instant};
use hearth_fhir::resource_type::canonical_resource_type;
use serde::{Deserialize, Serialize};

/// Which population an export covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    System,
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

/// Parameters defined by the Bulk Data IG that a later version of this engine implements:
/// refused by name (or ignored and reported when lenient), never silently ignored.
const NOT_YET_SUPPORTED: &[&str] = &[
    "_elements",
    "_typeFilter",
    "_typePostFetchFilterUrl",
    "includeAssociatedData",
    "organizeOutputBy",
    "allowPartialManifests",
];

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
            ignored: Vec::new(),
            request_url,
        };
        let mut seen_output_format = false;
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
                    return Err(refuse(
                        name,
                        "the patient parameter applies to Patient and Group exports only",
                    ));
                }
                // Asks for the JSON OperationOutcome format that Hearth uses anyway.
                "_format"
                    if matches!(value, "json" | "application/json" | "application/fhir+json") => {}
                other if NOT_YET_SUPPORTED.contains(&other) => {
                    if lenient {
                        request.ignored.push(IgnoredParameter {
                            name: other.to_owned(),
                            reason: format!(
                                "{other} is not supported by this server; it was ignored"
                            ),
                        });
                    } else {
                        return Err(refuse(
                            other,
                            format!(
                                "{other} is not supported by this server (send Prefer: handling=lenient to ignore it)"
                            ),
                        ));
                    }
                }
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
        if let (Some(since), Some(until)) = (request.since, request.until)
            && until <= since
        {
            return Err(refuse("_until", "_until must be later than _since"));
        }
        Ok(request)
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
            (vec![("_elements", "id")], "_elements"),
            (vec![("patient", "Patient/1")], "patient"),
            (vec![("foo", "bar")], "foo"),
        ] {
            assert_eq!(parse(&params, false).unwrap_err().parameter, parameter);
        }
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
