//! The generated population checked against Hearth's own FHIR R4 tables:
//! what the server will accept, and which patient exports include what.

use hearth_fhir::compartment::patient_compartment_members;
use hearth_fhir::resource_type::{is_resource_type, mandatory_elements};
use hearth_synth::{SynthConfig, generate};
use serde_json::Value;

#[test]
fn resources_have_mandatory_elements_and_belong_to_their_patient() {
    let mut current_patient = String::new();
    let mut checked = 0u64;
    generate(
        &SynthConfig {
            patients: 15,
            seed: 21,
        },
        &mut |rt, json| {
            let v: Value = serde_json::from_slice(json).map_err(std::io::Error::other)?;
            assert!(is_resource_type(rt), "{rt} is an R4 type");
            for element in mandatory_elements(rt).unwrap_or_default() {
                let present = match element.strip_suffix("[x]") {
                    Some(prefix) => v
                        .as_object()
                        .is_some_and(|o| o.keys().any(|k| k.starts_with(prefix))),
                    None => v.get(*element).is_some(),
                };
                assert!(present, "{rt} lacks mandatory {element}");
            }
            let members = patient_compartment_members(rt, &v);
            match rt {
                "Patient" => {
                    current_patient = v["id"].as_str().unwrap_or_default().to_owned();
                    assert_eq!(members, [current_patient.clone()]);
                }
                "Organization" | "Practitioner" => assert!(members.is_empty(), "{rt} is shared"),
                "Group" => assert!(!members.is_empty()),
                // Every clinical resource, Provenance included, lands in exactly
                // its own patient's compartment, so Patient/$export finds it.
                _ => assert_eq!(members, [current_patient.clone()], "{rt}"),
            }
            checked += 1;
            Ok(())
        },
    )
    .expect("generation succeeds");
    assert!(checked > 1000);
}
