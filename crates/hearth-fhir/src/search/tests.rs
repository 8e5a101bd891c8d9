//! Unit tests: each type, modifier and prefix on hand-built resources, and the parse errors.
//! Every match is also decided from the bytes, and the two answers must agree.

use serde_json::{Value, json};

use super::generated::SEARCH_PARAMETERS;
use super::table::parse_paths;
use super::*;

fn filter(resource_type: &str, query: &str) -> Filter {
    let (t, f) = Filter::parse_type_filter(&format!("{resource_type}?{query}"))
        .unwrap_or_else(|e| panic!("{resource_type}?{query}: {e}"));
    assert_eq!(t, resource_type);
    assert_eq!(f.resource_type(), resource_type);
    f
}

/// Whether `resource` matches `query`, checking that the bytes path agrees (compact and
/// pretty-printed).
fn hit(query: &str, resource: &Value) -> bool {
    let resource_type = resource["resourceType"].as_str().unwrap();
    let f = filter(resource_type, query);
    let by_value = f.matches(resource);
    let compact = serde_json::to_vec(resource).unwrap();
    assert_eq!(
        f.matches_bytes(&compact),
        by_value,
        "bytes disagree: {query}"
    );
    let pretty = serde_json::to_vec_pretty(resource).unwrap();
    assert_eq!(
        f.matches_bytes(&pretty),
        by_value,
        "pretty bytes disagree: {query}"
    );
    by_value
}

fn err(resource_type: &str, query: &str) -> SearchError {
    match Filter::parse_type_filter(&format!("{resource_type}?{query}")) {
        Ok(_) => panic!("{resource_type}?{query} was accepted"),
        Err(e) => e,
    }
}

fn observation() -> Value {
    json!({
        "resourceType": "Observation",
        "id": "o1",
        "meta": {
            "lastUpdated": "2024-05-01T12:00:00.000000Z",
            "profile": ["http://example.org/StructureDefinition/vitals"],
            "source": "http://example.org/source#a",
            "tag": [{"system": "https://smarthealthit.org/tags", "code": "synthea-5-2019"}],
        },
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "8302-2", "display": "Body Height"},
                {"code": "local-1", "display": "Height (local)"},
            ],
            "text": "Body height measured",
        },
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "http://other.example/fhir/Practitioner/dr-1/_history/3"}, {"display": "no reference"}],
        "effectiveDateTime": "2020-03-05T10:00:00Z",
        "valueQuantity": {"value": 176.5, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 120, "unit": "mm[Hg]"}},
        ],
    })
}

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "active": true,
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-22-1962"},
            {"type": {"text": "Medical Record Number"}, "system": "http://hospital.example", "value": "a,b|c"},
        ],
        "name": [
            {"use": "official", "family": "Smith", "given": ["Adán", "José"], "prefix": ["Mr."]},
            {"text": "Jo Smythe"},
        ],
        "telecom": [
            {"system": "phone", "value": "555-978-4581", "use": "home"},
            {"system": "email", "value": "adan@example.org"},
        ],
        "gender": "male",
        "birthDate": "1956-08-03",
        "address": [{"line": ["313 Lockman Row"], "city": "Peabody", "state": "Massachusetts", "postalCode": "01940"}],
        "generalPractitioner": [{"reference": "Practitioner/dr-1"}],
    })
}

#[test]
fn token_codings_and_systems() {
    let o = observation();
    assert!(hit("code=8302-2", &o));
    assert!(hit("code=http://loinc.org|8302-2", &o));
    assert!(hit("code=http%3A%2F%2Floinc.org%7C8302-2", &o));
    assert!(!hit("code=http://snomed.info/sct|8302-2", &o));
    assert!(!hit("code=|8302-2", &o), "the LOINC coding has a system");
    assert!(hit("code=|local-1", &o), "the local coding has none");
    assert!(hit("code=http://loinc.org|", &o));
    assert!(!hit("code=http://snomed.info/sct|", &o));
    assert!(hit("code=1234-5,8302-2", &o), "comma is OR");
    assert!(!hit("code=8302-2&code=1234-5", &o), "repeats are AND");
    assert!(hit("code=8302-2&status=final", &o));
    assert!(!hit("code=8302", &o), "codes compare whole");
    assert!(!hit("code=8302-2x", &o));
    assert!(hit("category=vital-signs", &o));
    assert!(hit("component-code=http://loinc.org|8480-6", &o));
    assert!(hit(
        "_tag=https://smarthealthit.org/tags|synthea-5-2019",
        &o
    ));
    assert!(hit("_id=o1", &o));
    assert!(!hit("_id=o2", &o));
}

#[test]
fn token_codes_booleans_identifiers_contact_points() {
    let p = patient();
    assert!(hit("gender=male", &p));
    assert!(!hit("gender=Male", &p), "codes are case-sensitive");
    assert!(
        hit("gender=http://hl7.org/fhir/administrative-gender|male", &p),
        "a code's implicit system is not checked"
    );
    assert!(
        hit("gender=http://hl7.org/fhir/administrative-gender|", &p),
        "a system alone matches any plain code"
    );
    assert!(hit("active=true", &p));
    assert!(!hit("active=false", &p));
    assert!(hit(
        "identifier=http://hl7.org/fhir/sid/us-ssn|999-22-1962",
        &p
    ));
    assert!(hit("identifier=999-22-1962", &p));
    assert!(!hit("identifier=http://hospital.example|999-22-1962", &p));
    assert!(hit(r"identifier=a\,b\|c", &p), "escaped comma and bar");
    assert!(!hit("identifier=a,b", &p));
    assert!(hit("telecom=555-978-4581", &p));
    assert!(hit("telecom=phone|555-978-4581", &p));
    assert!(hit("phone=555-978-4581", &p));
    assert!(
        !hit("email=555-978-4581", &p),
        "where(system='email') filters"
    );
    assert!(hit("email=adan@example.org", &p));
}

#[test]
fn token_not_and_text() {
    let p = patient();
    assert!(!hit("gender:not=male", &p));
    assert!(hit("gender:not=female", &p));
    assert!(!hit("gender:not=female,male", &p));
    let mut no_gender = p.clone();
    no_gender.as_object_mut().unwrap().remove("gender");
    assert!(
        hit("gender:not=male", &no_gender),
        ":not includes resources without the element"
    );

    let o = observation();
    assert!(hit("code:text=height", &o), "a word of a display");
    assert!(
        hit("code:text=BODY", &o),
        "case-insensitive, from CodeableConcept.text"
    );
    assert!(hit("code:text=meas", &o), "word prefix");
    assert!(!hit("code:text=eight", &o), "not inside a word");
    assert!(hit("identifier:text=medical", &p), "Identifier.type.text");
    let condition = json!({"resourceType": "Condition", "code": {"text": "Prédiabetes"}});
    assert!(hit("code:text=prediabetes", &condition), "accents ignored");
    assert!(!hit("code:text=diabetes", &condition));
}

#[test]
fn strings() {
    let p = patient();
    assert!(hit("name=smi", &p), "family prefix");
    assert!(hit("name=SMITH", &p));
    assert!(hit("name=adan", &p), "accent-insensitive given");
    assert!(hit("name=jo", &p), "text and given");
    assert!(hit("name=mr", &p), "prefix part");
    assert!(!hit("name=mith", &p), "prefix, not substring");
    assert!(hit("name:contains=mith", &p));
    assert!(hit("name:contains=SMYT", &p));
    assert!(hit("name:exact=Smith", &p));
    assert!(!hit("name:exact=smith", &p));
    assert!(hit("name:exact=Adán", &p));
    assert!(!hit("name:exact=Adan", &p));
    assert!(hit("given=jose", &p));
    assert!(!hit("family=jose", &p));
    assert!(hit("address=peab", &p));
    assert!(hit("address=313", &p), "address line");
    assert!(hit("address-city=PEABODY", &p));
    assert!(hit("address-postalcode=019", &p));
    assert!(hit("name=zzz,smi", &p));
    assert!(!hit("name=smi&name=zzz", &p));
}

#[test]
fn references() {
    let o = observation();
    assert!(hit("subject=Patient/p1", &o));
    assert!(hit("subject=p1", &o));
    assert!(hit("subject:Patient=p1", &o));
    assert!(!hit("subject:Group=p1", &o));
    assert!(hit("subject=http://example.org/fhir/Patient/p1", &o));
    assert!(!hit("subject=Patient/p2", &o));
    assert!(hit("patient=p1", &o));
    assert!(
        hit("performer=Practitioner/dr-1", &o),
        "absolute stored, history ignored"
    );
    assert!(hit(
        "performer=http://other.example/fhir/Practitioner/dr-1/_history/3",
        &o
    ));
    assert!(hit("performer=dr-1", &o));

    let mut group_subject = o.clone();
    group_subject["subject"] = json!({"reference": "Group/p1"});
    assert!(hit("subject=p1", &group_subject));
    assert!(
        !hit("patient=p1", &group_subject),
        "where(resolve() is Patient) keeps Patient references only"
    );
    assert!(hit("patient:missing=true", &group_subject));
    assert!(hit("subject:missing=false", &group_subject));

    let contained = json!({"resourceType": "Observation", "subject": {"reference": "#p1"}});
    assert!(!hit("subject=p1", &contained));
    assert!(hit("subject=%23p1", &contained), "exact value");
    let urn =
        json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:0b3d1a1e-6a4f"}});
    assert!(hit("subject=urn:uuid:0b3d1a1e-6a4f", &urn));

    let response = json!({
        "resourceType": "QuestionnaireResponse",
        "questionnaire": "http://example.org/Questionnaire/q1|2.0",
    });
    assert!(hit(
        "questionnaire=http://example.org/Questionnaire/q1",
        &response
    ));
    assert!(hit(
        "questionnaire=http://example.org/Questionnaire/q1|2.0",
        &response
    ));
    assert!(!hit(
        "questionnaire=http://example.org/Questionnaire/q1|1.0",
        &response
    ));

    let library = json!({
        "resourceType": "Library",
        "relatedArtifact": [
            {"type": "depends-on", "resource": "http://example.org/Library/a"},
            {"type": "composed-of", "resource": "http://example.org/Library/b"},
        ],
    });
    assert!(hit("composed-of=http://example.org/Library/b", &library));
    assert!(!hit("composed-of=http://example.org/Library/a", &library));
    assert!(hit("depends-on=http://example.org/Library/a", &library));
}

#[test]
fn dates() {
    let o = observation(); // effective 2020-03-05T10:00:00Z, a one-second range
    for (query, want) in [
        ("date=2020", true),
        ("date=2020-03", true),
        ("date=2020-03-05", true),
        ("date=2020-03-05T10:00:00Z", true),
        ("date=2020-03-05T11:00:00%2B01:00", true),
        ("date=2020-03-05T11:00:00+01:00", true), // '+' read as space, restored
        ("date=2020-03-05T10:00", true),
        ("date=2021", false),
        ("date=eq2020-03-06", false),
        ("date=ne2020-03-06", true),
        ("date=ne2020", false),
        ("date=gt2020-03-04", true),
        ("date=gt2020-03-05", false),
        ("date=gt2020-03-05T09:59:59Z", true),
        ("date=lt2020-03-06", true),
        ("date=lt2020-03-05", false),
        ("date=ge2020-03-05", true),
        ("date=ge2020-03-06", false),
        ("date=le2020-03-05", true),
        ("date=le2020-03-04", false),
        ("date=sa2020-03-04", true),
        ("date=sa2020-03-05", false),
        ("date=eb2020-03-06", true),
        ("date=eb2020-03-05", false),
        ("date=ap2020-03-04", true),
        ("date=ap2010", false),
        ("date=ge2020-01-01&date=lt2020-04-01", true),
        ("date=ge2020-04-01&date=lt2020-05-01", false),
        ("date=2019,2020", true),
        ("_lastUpdated=ge2024-05-01", true),
        ("_lastUpdated=gt2024-05-01T12:00:00Z", false),
        ("_lastUpdated=lt2025", true),
    ] {
        assert_eq!(hit(query, &o), want, "{query}");
    }

    let encounter = json!({
        "resourceType": "Encounter",
        "period": {"start": "2015-06-07T23:37:54+00:00", "end": "2015-06-08T01:00:00+00:00"},
    });
    assert!(hit("date=2015-06", &encounter));
    assert!(
        !hit("date=2015-06-07", &encounter),
        "spills into the next day"
    );
    assert!(hit("date=ge2015-06-07", &encounter));
    assert!(hit("date=le2015-06-08", &encounter));
    assert!(hit("date=gt2015-06-07", &encounter), "ends after the 7th");
    assert!(
        hit("date=lt2015-06-08", &encounter),
        "starts before the 8th"
    );
    let open = json!({"resourceType": "Encounter", "period": {"start": "2015-06-07"}});
    assert!(hit("date=gt2030", &open), "an open period runs on");
    assert!(!hit("date=lt2015", &open));
    assert!(
        !hit("date=2015", &open),
        "an open period is not within a year"
    );
    let no_start = json!({"resourceType": "Encounter", "period": {"end": "2015-06-07"}});
    assert!(hit("date=lt1900", &no_start));

    let timing = json!({
        "resourceType": "Observation",
        "effectiveTiming": {"event": ["2001-01-01", "2003-05-05T10:00:00Z"]},
    });
    assert!(hit("date=2003-05", &timing));
    assert!(!hit("date=2002", &timing));
    let p = patient();
    assert!(hit("birthdate=lt1970", &p));
    assert!(hit("birthdate=1956", &p));
    assert!(!hit("birthdate=ge1957", &p));
    let bad = json!({"resourceType": "Patient", "birthDate": "not a date"});
    assert!(!hit("birthdate=lt1970", &bad));
    assert!(
        !hit("birthdate=ne1970", &bad),
        "an unreadable value is no value"
    );
}

#[test]
fn quantities_and_numbers() {
    let o = observation(); // 176.5 cm
    for (query, want) in [
        ("value-quantity=gt100", true),
        ("value-quantity=lt100", false),
        ("value-quantity=176.5", true),
        ("value-quantity=176", false),
        ("value-quantity=177", true), // [176.5, 177.5)
        ("value-quantity=eq1.8e2", true),
        ("value-quantity=ne177", false),
        ("value-quantity=ge176.5", true),
        ("value-quantity=le176.4", false),
        ("value-quantity=sa170", true),
        ("value-quantity=eb170", false),
        ("value-quantity=ap170", true),
        ("value-quantity=ap150", false),
        ("value-quantity=176.5|http://unitsofmeasure.org|cm", true),
        ("value-quantity=176.5|http://unitsofmeasure.org|mm", false),
        ("value-quantity=176.5||cm", true),
        ("value-quantity=gt1||m", false),
        ("value-quantity=gt1|http://other|cm", false),
        ("component-value-quantity=120", true),
    ] {
        assert_eq!(hit(query, &o), want, "{query}");
    }
    let unit_only =
        json!({"resourceType": "Observation", "valueQuantity": {"value": 5.4, "unit": "mg"}});
    assert!(
        hit("value-quantity=5.4||mg", &unit_only),
        "||code matches the unit too"
    );

    let condition = json!({
        "resourceType": "Condition",
        "onsetRange": {"low": {"value": 10, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}, "high": {"value": 20, "code": "a"}},
    });
    assert!(hit("onset-age=gt15", &condition));
    assert!(hit("onset-age=lt15||a", &condition));
    assert!(!hit("onset-age=gt25", &condition));
    assert!(
        hit("onset-age=ap1e1", &condition),
        "1e1 spans [5, 15), within 10 %, overlapping"
    );

    let invoice =
        json!({"resourceType": "Invoice", "totalNet": {"value": 99.95, "currency": "EUR"}});
    assert!(hit("totalnet=gt50", &invoice));
    assert!(hit("totalnet=99.95|urn:iso:std:iso:4217|EUR", &invoice));
    assert!(!hit("totalnet=99.95|urn:iso:std:iso:4217|USD", &invoice));

    let risk = json!({
        "resourceType": "RiskAssessment",
        "prediction": [{"probabilityDecimal": 0.25}, {"probabilityRange": {"low": {"value": 0.6}}}],
    });
    assert!(hit("probability=gt0.5", &risk), "an open range reaches up");
    assert!(hit("probability=0.25", &risk));
    assert!(!hit("probability=0.4", &risk));
    assert!(hit("probability=0.3", &risk), "0.3 stands for [0.25, 0.35)");
    assert!(hit("probability=lt0.3", &risk));
}

#[test]
fn uris_and_missing() {
    let o = observation();
    assert!(hit(
        "_profile=http://example.org/StructureDefinition/vitals",
        &o
    ));
    assert!(!hit("_profile=http://example.org/StructureDefinition", &o));
    assert!(hit("_source=http://example.org/source%23a", &o));
    assert!(hit("value-quantity:missing=false", &o));
    assert!(hit("value-concept:missing=true", &o));
    assert!(!hit("value-concept:missing=false", &o));
    assert!(hit("_profile:missing=false", &o));
    let bare = json!({"resourceType": "Observation", "code": null, "category": []});
    assert!(hit("code:missing=true", &bare), "null is no value");
    assert!(
        hit("category:missing=true", &bare),
        "an empty array is no value"
    );
    assert!(hit("date:missing=true", &bare));
}

#[test]
fn empty_filter_matches_everything() {
    let (t, f) = Filter::parse_type_filter("Observation?").unwrap();
    assert_eq!(t, "Observation");
    assert!(f.matches(&observation()));
    assert!(f.matches_bytes(b"{}"));
    let f = Filter::parse("Patient", &[]).unwrap();
    assert!(f.matches(&patient()));
}

#[test]
fn bytes_that_are_not_objects_never_match() {
    let f = filter("Observation", "code:missing=true");
    for body in [
        &b""[..],
        b"[]",
        b"null",
        b"{",
        b"{\"code\":",
        b"\xff\xfe",
        b"{\"code\":[}",
    ] {
        assert!(!f.matches_bytes(body), "{body:?}");
    }
}

#[test]
fn parse_errors_name_the_parameter() {
    let cases: Vec<(&str, &str, SearchError)> = vec![
        (
            "Observation",
            "banana=1",
            SearchError::UnknownParameter {
                resource_type: "Observation".into(),
                name: "banana".into(),
            },
        ),
        (
            "Observation",
            "code-value-quantity=x$1",
            SearchError::UnsupportedParameter {
                resource_type: "Observation".into(),
                name: "code-value-quantity".into(),
            },
        ),
        (
            "Patient",
            "deceased=true",
            SearchError::UnsupportedParameter {
                resource_type: "Patient".into(),
                name: "deceased".into(),
            },
        ),
        (
            "Observation",
            "subject.name=smith",
            SearchError::UnsupportedParameter {
                resource_type: "Observation".into(),
                name: "subject.name".into(),
            },
        ),
        (
            "Observation",
            "subject:Patient.name=smith",
            SearchError::UnsupportedParameter {
                resource_type: "Observation".into(),
                name: "subject:Patient.name".into(),
            },
        ),
        (
            "Observation",
            "nope.name=smith",
            SearchError::UnknownParameter {
                resource_type: "Observation".into(),
                name: "nope".into(),
            },
        ),
        (
            "Patient",
            "_has:Observation:patient:code=1234-5",
            SearchError::UnsupportedParameter {
                resource_type: "Patient".into(),
                name: "_has".into(),
            },
        ),
        (
            "Patient",
            "_text=x",
            SearchError::UnsupportedParameter {
                resource_type: "Patient".into(),
                name: "_text".into(),
            },
        ),
        (
            "Observation",
            "code:below=x",
            SearchError::UnsupportedModifier {
                name: "code".into(),
                modifier: "below".into(),
            },
        ),
        (
            "Patient",
            "name:text=x",
            SearchError::UnsupportedModifier {
                name: "name".into(),
                modifier: "text".into(),
            },
        ),
        (
            "Observation",
            "date:exact=2020",
            SearchError::UnsupportedModifier {
                name: "date".into(),
                modifier: "exact".into(),
            },
        ),
        (
            "Observation",
            "subject:Banana=1",
            SearchError::UnsupportedModifier {
                name: "subject".into(),
                modifier: "Banana".into(),
            },
        ),
        (
            "Observation",
            "subject:identifier=x|1",
            SearchError::UnsupportedModifier {
                name: "subject".into(),
                modifier: "identifier".into(),
            },
        ),
        (
            "Observation",
            "date=xx2020",
            SearchError::UnsupportedPrefix {
                name: "date".into(),
                prefix: "xx".into(),
            },
        ),
        (
            "Observation",
            "value-quantity=on5",
            SearchError::UnsupportedPrefix {
                name: "value-quantity".into(),
                prefix: "on".into(),
            },
        ),
        (
            "Observation",
            "_count=10",
            SearchError::ResultParameter {
                name: "_count".into(),
            },
        ),
        (
            "Observation",
            "_sort=date",
            SearchError::ResultParameter {
                name: "_sort".into(),
            },
        ),
        (
            "Observation",
            "_include=Observation:subject",
            SearchError::ResultParameter {
                name: "_include".into(),
            },
        ),
        (
            "Observation",
            "_elements=id",
            SearchError::ResultParameter {
                name: "_elements".into(),
            },
        ),
    ];
    for (resource_type, query, want) in cases {
        let got = err(resource_type, query);
        assert_eq!(got, want, "{resource_type}?{query}");
        assert_eq!(got.parameter(), want.parameter());
    }

    // Invalid values: the parameter is named, the exact reason is free text.
    for (resource_type, query, name) in [
        ("Observation", "date=2020-13", "date"),
        ("Observation", "date=yesterday", "date"),
        ("Observation", "date=ge", "date"),
        ("Observation", "value-quantity=abc", "value-quantity"),
        (
            "Observation",
            "value-quantity=5|http://unitsofmeasure.org",
            "value-quantity",
        ),
        (
            "Observation",
            "value-quantity=5|http://unitsofmeasure.org|",
            "value-quantity",
        ),
        ("RiskAssessment", "probability=0.5.1", "probability"),
        ("Patient", "gender=", "gender"),
        ("Patient", "gender=male,", "gender"),
        ("Patient", "gender:missing=maybe", "gender"),
        ("Patient", "gender=gt2", "gender"),
        ("Observation", "status=ge2020", "status"),
        ("Observation", "_profile=eq2020", "_profile"),
        ("Observation", "subject=Banana/1", "subject"),
        ("Observation", "subject=Patient/a/b", "subject"),
        ("Observation", "subject:Patient=Group/1", "subject"),
        ("Observation", "code=%ZZ", "code"),
        ("Observation", "code=%C3%28", "code"),
        ("Observation", "code=%+1", "code"),
        ("Observation", "code=%2", "code"),
    ] {
        let got = err(resource_type, query);
        assert!(
            matches!(got, SearchError::InvalidValue { .. }),
            "{resource_type}?{query}: {got:?}"
        );
        assert_eq!(got.parameter(), name, "{resource_type}?{query}");
    }

    // Prefix-like values stay legal where values are free text or ids.
    filter("Patient", "identifier=gt100");
    filter("Observation", "_id=eb2020");
    filter("Patient", "name=ap1");
    filter("Observation", "subject=eb123");

    for bad in [
        "Observation",
        "Banana?code=1",
        "?code=1",
        "",
        "MedicationRequest?status=active,MedicationRequest?status=completed",
    ] {
        let got = Filter::parse_type_filter(bad).unwrap_err();
        assert_eq!(got.parameter(), "_typeFilter", "{bad}");
    }
    let got = Filter::parse("Banana", &[]).unwrap_err();
    assert_eq!(got.parameter(), "_type");
}

#[test]
fn filters_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    send_sync::<Filter>();
    send_sync::<SearchError>();
}

#[test]
fn error_messages_read_well() {
    assert_eq!(
        err("Observation", "banana=1").to_string(),
        "'banana' is not a search parameter of Observation"
    );
    assert_eq!(
        err("Observation", "code:below=1").to_string(),
        "the modifier ':below' is not supported on the search parameter 'code'"
    );
}

#[test]
fn parse_takes_decoded_pairs() {
    let params = vec![
        ("code".to_owned(), "http://loinc.org|8302-2".to_owned()),
        ("date".to_owned(), "ge2020-03-05T11:00:00+01:00".to_owned()),
    ];
    let f = Filter::parse("Observation", &params).unwrap();
    assert!(f.matches(&observation()));
    // A literal '+' in a decoded value stays a '+' (it is not form-decoded again).
    let params = vec![("name".to_owned(), "a+b".to_owned())];
    let f = Filter::parse("Patient", &params).unwrap();
    assert!(f.matches(&json!({"resourceType": "Patient", "name": [{"family": "A+B"}]})));
}

#[test]
fn table_is_sorted_and_every_row_reads() {
    assert!(
        SEARCH_PARAMETERS
            .windows(2)
            .all(|w| (w[0].resource_type, w[0].code) < (w[1].resource_type, w[1].code))
    );
    let mut supported = 0;
    for def in SEARCH_PARAMETERS {
        assert!(
            is_resource_type(def.resource_type)
                || ["Resource", "DomainResource"].contains(&def.resource_type),
            "{}",
            def.resource_type
        );
        if def.is_supported() {
            supported += 1;
            let paths = parse_paths(def).unwrap_or_else(|| panic!("{def:?}"));
            assert!(!paths.is_empty());
        } else {
            assert!(def.paths.is_empty(), "{def:?}");
            assert!(matches!(
                Filter::parse(
                    if is_resource_type(def.resource_type) {
                        def.resource_type
                    } else {
                        "Patient"
                    },
                    &[(def.code.to_owned(), "x".to_owned())]
                ),
                Err(SearchError::UnsupportedParameter { .. })
            ));
        }
    }
    assert_eq!(SEARCH_PARAMETERS.len(), 1708);
    assert_eq!(supported, 1629);
}

#[test]
fn supported_parameters_for_the_capability_statement() {
    let observation = supported_parameters("Observation");
    for want in [
        ("code", "token"),
        ("date", "date"),
        ("subject", "reference"),
        ("value-quantity", "quantity"),
        ("value-string", "string"),
        ("_id", "token"),
        ("_lastUpdated", "date"),
        ("_profile", "uri"),
        ("_tag", "token"),
        ("_security", "token"),
        ("_source", "uri"),
    ] {
        assert!(observation.contains(&want), "{want:?}");
    }
    assert!(
        !observation
            .iter()
            .any(|(code, _)| *code == "code-value-quantity")
    );
    assert!(!observation.iter().any(|(code, _)| *code == "_text"));
    assert!(supported_parameters("Banana").is_empty());
    // Every supported parameter parses with some value of its type.
    for t in crate::resource_type::resource_types() {
        for (code, kind) in supported_parameters(t) {
            let value = match kind {
                "date" => "ge2020",
                "number" | "quantity" => "gt1",
                _ => "x",
            };
            let f = Filter::parse(t, &[(code.to_owned(), value.to_owned())])
                .unwrap_or_else(|e| panic!("{t}.{code}: {e}"));
            assert!(!f.matches(&json!({"resourceType": t})), "{t}.{code}");
        }
    }
}

/// A small deterministic generator, so the test needs no extra dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn never_panics_on_odd_queries() {
    const PIECES: &[&str] = &[
        "",
        "=",
        "&",
        ",",
        "|",
        "\\",
        "\\,",
        "%",
        "%2",
        "%2C",
        "%E2%82",
        "+",
        ":",
        ":not",
        ":missing",
        ":exact",
        ":Patient",
        ".",
        "?",
        "ge",
        "ap",
        "eb",
        "xx",
        "2020",
        "-",
        "2020-02-30",
        "T",
        "Z",
        "1e",
        "1e400",
        "9999999999999999999999",
        ".5",
        "Patient/",
        "/_history/",
        "http://",
        "é",
        "\u{0}",
        "code",
        "date",
        "subject",
        "name",
        "value-quantity",
        "_id",
        "true",
        "_has",
    ];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let resources = [observation(), patient()];
    for _ in 0..20_000 {
        let mut query = String::new();
        for _ in 0..rng.below(8) {
            query.push_str(PIECES[rng.below(PIECES.len())]);
        }
        for t in ["Observation", "Patient"] {
            if let Ok((_, f)) = Filter::parse_type_filter(&format!("{t}?{query}")) {
                for r in &resources {
                    let _ = f.matches(r);
                    let _ = f.matches_bytes(&serde_json::to_vec(r).unwrap());
                }
            }
            let _ = Filter::parse(t, &[(query.clone(), query.clone())]);
        }
    }
}

#[test]
fn never_panics_on_mangled_bytes() {
    let filters = [
        filter("Observation", "code=8302-2&date=ge2000&value-quantity=gt1"),
        filter("Observation", "subject=Patient/p1"),
        filter("Observation", "code:missing=true&_tag:missing=false"),
    ];
    let body = serde_json::to_vec(&observation()).unwrap();
    let mut rng = XorShift(42);
    const BYTES: &[u8] = b"{}[]\",:\\ u0a\xff";
    for _ in 0..20_000 {
        let mut mangled = body.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(mangled.len());
            match rng.below(3) {
                0 => mangled[at] = BYTES[rng.below(BYTES.len())],
                1 => {
                    mangled.remove(at);
                }
                _ => mangled.truncate(at),
            }
            if mangled.is_empty() {
                break;
            }
        }
        for f in &filters {
            let by_bytes = f.matches_bytes(&mangled);
            // Where the mangled bytes still parse, the two paths must still agree.
            if let Ok(value) = serde_json::from_slice::<Value>(&mangled)
                && value.is_object()
                && !has_duplicate_top_level_keys(&mangled)
            {
                assert_eq!(
                    by_bytes,
                    f.matches(&value),
                    "{}",
                    String::from_utf8_lossy(&mangled)
                );
            }
        }
    }
}

fn has_duplicate_top_level_keys(body: &[u8]) -> bool {
    /// The object's keys, duplicates kept (a `Map` would silently keep the last).
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    match serde_json::from_slice::<Keys>(body) {
        Ok(Keys(mut keys)) => {
            let n = keys.len();
            keys.sort();
            keys.dedup();
            keys.len() != n
        }
        Err(_) => true,
    }
}

#[test]
fn a_filter_within_alternatives_needs_its_own_clauses_and_one_alternative() {
    let lab = json!({"resourceType":"Observation","status":"final","category":[{"coding":[{"code":"laboratory"}]}]});
    let vital_prelim = json!({"resourceType":"Observation","status":"preliminary","category":[{"coding":[{"code":"vital-signs"}]}]});
    let survey = json!({"resourceType":"Observation","status":"final","category":[{"coding":[{"code":"survey"}]}]});
    let granted = || {
        vec![
            filter("Observation", "category=laboratory"),
            filter("Observation", "category=vital-signs"),
        ]
    };
    let only_granted = filter("Observation", "").within_any(granted());
    let final_and_granted = filter("Observation", "status=final").within_any(granted());
    for (resource, only, both) in [
        (&lab, true, true),
        (&vital_prelim, true, false),
        (&survey, false, false),
    ] {
        let bytes = serde_json::to_vec(resource).unwrap();
        assert_eq!(only_granted.matches(resource), only, "{resource}");
        assert_eq!(only_granted.matches_bytes(&bytes), only, "{resource}");
        assert_eq!(final_and_granted.matches(resource), both, "{resource}");
        assert_eq!(final_and_granted.matches_bytes(&bytes), both, "{resource}");
    }
    // No alternative left: nothing matches.
    let none = filter("Observation", "").within_any(vec![filter("Patient", "active=true")]);
    assert!(!none.matches_bytes(&serde_json::to_vec(&lab).unwrap()));
}
