//! `_typeFilter` values and the search they compile to (`hearth_fhir::search`): any value
//! parses or is refused, and a parsed filter evaluates any resource body without panicking,
//! on the raw bytes and on a parsed `Value` alike.
//!
//! Input: the `_typeFilter` value, a newline, then a resource body.

#![no_main]

use hearth_fhir::search::Filter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (value, body) = text.split_once('\n').unwrap_or((text, ""));
    let Ok((resource_type, filter)) = Filter::parse_type_filter(value) else {
        return;
    };
    assert_eq!(filter.resource_type(), resource_type);
    let _ = filter.matches_bytes(body.as_bytes());
    if let Ok(resource) = serde_json::from_str::<serde_json::Value>(body) {
        let _ = filter.matches(&resource);
    }
});
