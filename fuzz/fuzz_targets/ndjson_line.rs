//! One line of an NDJSON file as the loader hands it to the store (`envelope::prepare` with the
//! id from the body): refused with a reason, or prepared so that the stored body is valid JSON
//! that decodes strictly (Unicode strings), with the server's `id`, `meta.versionId` and
//! `meta.lastUpdated`, and storing that body again is recognised as the same content.

#![no_main]

use hearth_fhir::envelope::{IdPolicy, prepare};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(prepared) = prepare(data, None, IdPolicy::FromBody) else {
        return;
    };
    let stored = prepared.render(3, 1_700_000_000_123_456);
    let again = prepare(&stored, None, IdPolicy::FromBody).expect("a stored body prepares again");
    assert_eq!(again.id, prepared.id);
    assert_eq!(
        again.content_hash, prepared.content_hash,
        "an unchanged resource must be recognised as unchanged"
    );
    serde_json::from_slice::<&serde_json::value::RawValue>(&stored)
        .expect("a stored body is valid JSON");
    let value: serde_json::Value = match serde_json::from_slice(&stored) {
        Ok(value) => value,
        // Numbers are stored verbatim (decimal precision is kept); JSON allows magnitudes
        // beyond f64, which serde_json's Value cannot hold. Every other failure is a bug (an
        // unpaired surrogate escape once got through here).
        Err(e) if e.to_string().starts_with("number out of range") => return,
        Err(e) => panic!("a stored body must decode strictly: {e}"),
    };
    assert_eq!(value["resourceType"], prepared.resource_type);
    assert_eq!(value["id"], prepared.id.as_str());
    assert_eq!(value["meta"]["versionId"], "3");
    assert_eq!(value["meta"]["lastUpdated"], "2023-11-14T22:13:20.123456Z");
});
