//! Writers for recurring FHIR datatypes.

use crate::Rt;
use crate::codes::Code;
use crate::json::{Id, JsonBuf};

/// Marks every resource as synthetic test data (HL7's standard security tag
/// for it), so nobody mistakes a demo export for real patient data.
const META_TAG: &[u8] = br#""tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActReason","code":"HTEST","display":"test health data"}]}"#;

pub(crate) const XHTML_OPEN: &[u8] = br#"<div xmlns=\"http://www.w3.org/1999/xhtml\">"#;

/// `{"resourceType":..,"id":..,"meta":{..}` — the caller continues with
/// `,"field":..` and closes with `}`.
pub(crate) fn begin(b: &mut Vec<u8>, rt: Rt, id: &[u8], profile: &str) {
    b.raw(b"{\"resourceType\":\"");
    b.raw(rt.name().as_bytes());
    b.raw(b"\",\"id\":\"");
    b.raw(id);
    b.raw(b"\",\"meta\":{\"profile\":[\"");
    b.raw(profile.as_bytes());
    b.raw(b"\"],");
    b.raw(META_TAG);
}

/// `,"text":{"status":"generated","div":"<div ...>` — the caller writes the
/// (JSON-escaped) XHTML body and then calls [`end_narrative`].
pub(crate) fn begin_narrative(b: &mut Vec<u8>) {
    b.raw(b",\"text\":{\"status\":\"generated\",\"div\":\"");
    b.raw(XHTML_OPEN);
}

pub(crate) fn end_narrative(b: &mut Vec<u8>) {
    b.raw(b"</div>\"}");
}

/// `{"system":..,"code":..,"display":..}`
pub(crate) fn coding(b: &mut Vec<u8>, system: &str, code: &str, display: &str) {
    b.raw(b"{\"system\":");
    b.str(system);
    b.raw(b",\"code\":");
    b.str(code);
    b.raw(b",\"display\":");
    b.str(display);
    b.push(b'}');
}

/// `{"coding":[{..}],"text":display}`
pub(crate) fn concept(b: &mut Vec<u8>, system: &str, code: &Code) {
    b.raw(b"{\"coding\":[");
    coding(b, system, code.code, code.display);
    b.raw(b"],\"text\":");
    b.str(code.display);
    b.push(b'}');
}

/// `{"coding":[{..}]}` for fixed terminology-bound elements.
pub(crate) fn concept_no_text(b: &mut Vec<u8>, system: &str, code: &str, display: &str) {
    b.raw(b"{\"coding\":[");
    coding(b, system, code, display);
    b.raw(b"]}");
}

/// `{"start":..,"end":..}`
pub(crate) fn period(b: &mut Vec<u8>, start: i64, end: i64) {
    b.raw(b"{\"start\":");
    b.datetime(start);
    b.raw(b",\"end\":");
    b.datetime(end);
    b.push(b'}');
}

/// A UCUM quantity.
pub(crate) fn quantity(b: &mut Vec<u8>, value: i64, scale: u32, unit: &str) {
    b.raw(b"{\"value\":");
    b.decimal(value, scale);
    b.raw(b",\"unit\":");
    b.str(unit);
    b.raw(b",\"system\":\"http://unitsofmeasure.org\",\"code\":");
    b.str(unit);
    b.push(b'}');
}

/// A reference to a resource of this population, with a display when known.
pub(crate) fn reference(b: &mut Vec<u8>, rt: Rt, id: &Id, display: Option<&str>) {
    match display {
        Some(d) => b.reference_display(rt.name(), id, d),
        None => b.reference(rt.name(), id),
    }
}
