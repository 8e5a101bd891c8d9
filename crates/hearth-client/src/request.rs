//! The kick-off request: which endpoint, which parameters, and how they travel (query string
//! for GET, a `Parameters` resource for POST).

use std::fmt;
use std::str::FromStr;

use reqwest::Url;
use serde_json::{Value, json};

use crate::Error;

/// Which population is exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    /// `[base]/$export`
    System,
    /// `[base]/Patient/$export`
    Patient,
    /// `[base]/Group/<id>/$export`
    Group(String),
}

impl FromStr for Level {
    type Err = Error;

    /// `system`, `patient` or `group:<id>`.
    fn from_str(text: &str) -> Result<Self, Error> {
        match text {
            "system" => Ok(Self::System),
            "patient" => Ok(Self::Patient),
            _ => match text.strip_prefix("group:") {
                Some(id) if valid_id(id) => Ok(Self::Group(id.to_owned())),
                Some(id) => Err(Error::Invalid(format!(
                    "'{id}' is not a FHIR id (1-64 of A-Z a-z 0-9 - .)"
                ))),
                None => Err(Error::Invalid(format!(
                    "level '{text}': use system, patient or group:<id>"
                ))),
            },
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::System => f.write_str("system"),
            Self::Patient => f.write_str("patient"),
            Self::Group(id) => write!(f, "group:{id}"),
        }
    }
}

/// The FHIR `id` datatype: `[A-Za-z0-9\-\.]{1,64}`. Checked because the id becomes a URL path
/// segment.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// What to export. Empty lists mean "not sent"; the server's defaults apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub level: Level,
    /// `_type`: resource types.
    pub types: Vec<String>,
    /// `_since`: a FHIR instant.
    pub since: Option<String>,
    /// `_typeFilter`: one `Type?search` query per entry.
    pub type_filters: Vec<String>,
    /// `_elements`: `element` or `Type.element`.
    pub elements: Vec<String>,
    /// `patient`: `Patient/<id>` references (or bare ids). Only valid for Patient and Group
    /// exports, and only in a POST kick-off.
    pub patients: Vec<String>,
    /// `_outputFormat`.
    pub output_format: Option<String>,
}

impl ExportRequest {
    pub fn new(level: Level) -> Self {
        Self {
            level,
            types: Vec::new(),
            since: None,
            type_filters: Vec::new(),
            elements: Vec::new(),
            patients: Vec::new(),
            output_format: None,
        }
    }

    /// Checks what a server would refuse anyway, so the user hears it before a job exists.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(since) = &self.since {
            hearth_fhir::instant::parse_instant(since).map_err(|e| {
                Error::Invalid(format!("--since: {e} (for example 2024-01-31T00:00:00Z)"))
            })?;
        }
        if !self.patients.is_empty() && self.level == Level::System {
            return Err(Error::Invalid(
                "patient is not allowed in a system-level export: use --level patient or group:<id>"
                    .into(),
            ));
        }
        for patient in &self.patients {
            let id = patient.strip_prefix("Patient/").unwrap_or(patient);
            if !valid_id(id) {
                return Err(Error::Invalid(format!(
                    "patient '{patient}' is not Patient/<id> or an id"
                )));
            }
        }
        for filter in &self.type_filters {
            if !filter.contains('?') {
                return Err(Error::Invalid(format!(
                    "type filter '{filter}' is not a search like Observation?status=final"
                )));
            }
        }
        Ok(())
    }

    /// The kick-off endpoint under `base`.
    pub fn endpoint(&self, base: &Url) -> Result<Url, Error> {
        let path = match &self.level {
            Level::System => "$export".to_owned(),
            Level::Patient => "Patient/$export".to_owned(),
            Level::Group(id) => format!("Group/{id}/$export"),
        };
        join(base, &path)
    }

    /// Whether the kick-off must be a POST: `patient` travels only in a Parameters body.
    pub fn needs_post(&self) -> bool {
        !self.patients.is_empty()
    }

    /// The query parameters of a GET kick-off. Lists whose items cannot contain a comma are
    /// comma-joined (HAPI and the Danish eHealth servers take `_type` once); `_typeFilter`
    /// values are searches that may contain commas, so each is its own parameter.
    pub fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if let Some(format) = &self.output_format {
            pairs.push(("_outputFormat", format.clone()));
        }
        if let Some(since) = &self.since {
            pairs.push(("_since", since.clone()));
        }
        if !self.types.is_empty() {
            pairs.push(("_type", self.types.join(",")));
        }
        if !self.elements.is_empty() {
            pairs.push(("_elements", self.elements.join(",")));
        }
        for filter in &self.type_filters {
            pairs.push(("_typeFilter", filter.clone()));
        }
        pairs
    }

    /// The `Parameters` body of a POST kick-off, one entry per value (what STU2 allows and
    /// the coming STU4 requires).
    pub fn parameters(&self) -> Value {
        let mut parameter = Vec::new();
        if let Some(format) = &self.output_format {
            parameter.push(json!({"name": "_outputFormat", "valueString": format}));
        }
        if let Some(since) = &self.since {
            parameter.push(json!({"name": "_since", "valueInstant": since}));
        }
        for resource_type in &self.types {
            parameter.push(json!({"name": "_type", "valueString": resource_type}));
        }
        for element in &self.elements {
            parameter.push(json!({"name": "_elements", "valueString": element}));
        }
        for filter in &self.type_filters {
            parameter.push(json!({"name": "_typeFilter", "valueString": filter}));
        }
        for patient in &self.patients {
            let reference = if patient.starts_with("Patient/") {
                patient.clone()
            } else {
                format!("Patient/{patient}")
            };
            parameter.push(json!({"name": "patient", "valueReference": {"reference": reference}}));
        }
        json!({"resourceType": "Parameters", "parameter": parameter})
    }

    /// What identifies "the same export" for incremental runs: everything but `_since`.
    pub fn identity(&self) -> String {
        let mut types = self.types.clone();
        types.sort();
        let mut elements = self.elements.clone();
        elements.sort();
        let mut filters = self.type_filters.clone();
        filters.sort();
        let mut patients = self.patients.clone();
        patients.sort();
        let mut text = format!("level={}", self.level);
        for (name, values) in [
            ("_type", types),
            ("_elements", elements),
            ("_typeFilter", filters),
            ("patient", patients),
        ] {
            if !values.is_empty() {
                text.push_str(&format!("&{name}={}", values.join(",")));
            }
        }
        if let Some(format) = &self.output_format {
            text.push_str(&format!("&_outputFormat={format}"));
        }
        text
    }
}

/// Parses a FHIR base URL, keeping its path (`http://host/fhir` and `http://host/fhir/` are
/// the same base).
pub fn parse_base(text: &str) -> Result<Url, Error> {
    let url = Url::parse(text.trim())
        .map_err(|e| Error::Invalid(format!("'{text}' is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::Invalid(format!("'{text}' is not an http(s) URL")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Error::Invalid(format!(
            "the base URL '{text}' must not have a query or fragment"
        )));
    }
    Ok(url)
}

/// `base` + `/` + `path`, whether or not the base ends with a slash. `Url::join` would drop
/// the base's last segment (`/fhir`) otherwise; `$` stays literal as FHIR writes it.
pub(crate) fn join(base: &Url, path: &str) -> Result<Url, Error> {
    let text = format!("{}/{}", base.as_str().trim_end_matches('/'), path);
    Url::parse(&text).map_err(|e| Error::Invalid(format!("'{text}' is not a URL: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_print() {
        assert_eq!("system".parse::<Level>().unwrap(), Level::System);
        assert_eq!("patient".parse::<Level>().unwrap(), Level::Patient);
        assert_eq!(
            "group:g-1.2".parse::<Level>().unwrap(),
            Level::Group("g-1.2".into())
        );
        assert_eq!(Level::Group("x".into()).to_string(), "group:x");
        assert!("group:".parse::<Level>().is_err());
        assert!("group:a/b".parse::<Level>().is_err());
        assert!("everything".parse::<Level>().is_err());
    }

    #[test]
    fn endpoints_keep_the_base_path() {
        let base = parse_base("http://h:8080/fhir").unwrap();
        let slash = parse_base("http://h:8080/fhir/").unwrap();
        let mut request = ExportRequest::new(Level::System);
        assert_eq!(
            request.endpoint(&base).unwrap().as_str(),
            "http://h:8080/fhir/$export"
        );
        request.level = Level::Group("g1".into());
        assert_eq!(
            request.endpoint(&slash).unwrap().as_str(),
            "http://h:8080/fhir/Group/g1/$export"
        );
        request.level = Level::Patient;
        assert_eq!(
            request.endpoint(&base).unwrap().as_str(),
            "http://h:8080/fhir/Patient/$export"
        );
        assert!(parse_base("ftp://h/fhir").is_err());
        assert!(parse_base("http://h/fhir?x=1").is_err());
    }

    #[test]
    fn get_parameters_join_lists_but_not_type_filters() {
        let mut request = ExportRequest::new(Level::System);
        request.types = vec!["Patient".into(), "Observation".into()];
        request.elements = vec!["id".into(), "Patient.name".into()];
        request.type_filters = vec!["Observation?code=a,b".into(), "Patient?active=true".into()];
        request.since = Some("2024-01-01T00:00:00Z".into());
        let pairs = request.query_pairs();
        assert_eq!(
            pairs,
            vec![
                ("_since", "2024-01-01T00:00:00Z".to_owned()),
                ("_type", "Patient,Observation".to_owned()),
                ("_elements", "id,Patient.name".to_owned()),
                ("_typeFilter", "Observation?code=a,b".to_owned()),
                ("_typeFilter", "Patient?active=true".to_owned()),
            ]
        );
        assert!(!request.needs_post());
    }

    #[test]
    fn post_parameters_repeat_entries_and_reference_patients() {
        let mut request = ExportRequest::new(Level::Patient);
        request.types = vec!["Patient".into(), "Condition".into()];
        request.patients = vec!["p1".into(), "Patient/p2".into()];
        request.output_format = Some("application/fhir+ndjson".into());
        assert!(request.needs_post());
        request.validate().unwrap();
        assert_eq!(
            request.parameters(),
            json!({"resourceType": "Parameters", "parameter": [
                {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
                {"name": "_type", "valueString": "Patient"},
                {"name": "_type", "valueString": "Condition"},
                {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
                {"name": "patient", "valueReference": {"reference": "Patient/p2"}},
            ]})
        );
    }

    #[test]
    fn validation_catches_what_a_server_would_refuse() {
        let mut request = ExportRequest::new(Level::System);
        request.since = Some("yesterday".into());
        assert!(request.validate().is_err());
        request.since = Some("2024-01-01T00:00:00+01:00".into());
        request.validate().unwrap();
        request.patients = vec!["p1".into()];
        assert!(request.validate().is_err(), "patient at system level");
        request.level = Level::Patient;
        request.patients = vec!["Patient/../x".into()];
        assert!(request.validate().is_err());
        request.patients.clear();
        request.type_filters = vec!["status=final".into()];
        assert!(request.validate().is_err());
    }

    #[test]
    fn identity_ignores_since_and_order() {
        let mut a = ExportRequest::new(Level::System);
        a.types = vec!["A".into(), "B".into()];
        let mut b = a.clone();
        b.types = vec!["B".into(), "A".into()];
        b.since = Some("2024-01-01T00:00:00Z".into());
        assert_eq!(a.identity(), b.identity());
        b.level = Level::Patient;
        assert_ne!(a.identity(), b.identity());
    }
}
