//! The export kick-off parameters (`ExportRequest::parse`): whatever a client sends as a query
//! string, the parser answers with a request or a parameter error, never a panic, and what it
//! accepts is stored with the job and must read back unchanged.
//!
//! Input: one flags byte (bit 0: `Prefer: handling=lenient`; bits 1-2: the export level), then
//! the query string.

#![no_main]

use hearth_export::{ExportRequest, Level};
use libfuzzer_sys::fuzz_target;

/// A fixed "now", so `_since` in the future is decided the same way every run.
const NOW: i64 = 1_800_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, query)) = data.split_first() else {
        return;
    };
    let lenient = flags & 1 == 1;
    let level = match (flags >> 1) % 3 {
        0 => Level::System,
        1 => Level::Patient,
        _ => Level::Group("g1".to_owned()),
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(query).into_owned().collect();
    let Ok(request) = ExportRequest::parse(
        level,
        &params,
        lenient,
        "https://hearth.example/fhir/$export".to_owned(),
        NOW,
    ) else {
        return;
    };
    if let Some(since) = request.since {
        assert!(since <= NOW, "_since in the future was accepted");
    }
    if let (Some(since), Some(until)) = (request.since, request.until) {
        assert!(until > since, "_until not after _since was accepted");
    }
    let stored = serde_json::to_string(&request).expect("a request serialises");
    let read_back: ExportRequest =
        serde_json::from_str(&stored).expect("a stored request reads back");
    assert_eq!(read_back, request);
});
