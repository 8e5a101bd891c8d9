//! The R4 resource type names, from the generated tables.

use crate::generated::{MANDATORY_ELEMENTS, RESOURCE_TYPES};

/// Every concrete R4 resource type, sorted by byte order.
pub fn resource_types() -> &'static [&'static str] {
    RESOURCE_TYPES
}

/// Whether `name` is a concrete R4 resource type (case-sensitive, as in FHIR).
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// The table's own copy of `name` if it is an R4 resource type, so callers can keep a
/// `&'static str` instead of the request's string.
pub fn canonical_resource_type(name: &str) -> Option<&'static str> {
    RESOURCE_TYPES
        .binary_search(&name)
        .ok()
        .map(|i| RESOURCE_TYPES[i])
}

/// The top-level elements of `resource_type` with minimum cardinality 1 (sorted; choice
/// elements as `value[x]`), which `_elements` must keep; `None` for an unknown type.
pub fn mandatory_elements(resource_type: &str) -> Option<&'static [&'static str]> {
    MANDATORY_ELEMENTS
        .binary_search_by(|(name, _)| (*name).cmp(resource_type))
        .ok()
        .map(|i| MANDATORY_ELEMENTS[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_strictly_sorted() {
        // Binary search silently misses entries if this ever breaks.
        assert!(RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        assert!(MANDATORY_ELEMENTS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn knows_the_r4_types() {
        assert!((145..=148).contains(&resource_types().len()));
        for name in [
            "Bundle",
            "Binary",
            "Parameters",
            "Patient",
            "Observation",
            "Account",
        ] {
            assert!(is_resource_type(name), "{name}");
        }
        for name in ["VisionPrescription", "ValueSet"] {
            assert!(is_resource_type(name), "{name}");
        }
    }

    #[test]
    fn canonical_names_are_static() {
        let requested = String::from("Observation");
        assert_eq!(canonical_resource_type(&requested), Some("Observation"));
        assert_eq!(canonical_resource_type("observation"), None);
        assert_eq!(canonical_resource_type("Resource"), None);
    }

    #[test]
    fn rejects_non_types() {
        // Abstract bases, an R4B-only type, wrong case and junk.
        for name in [
            "Resource",
            "DomainResource",
            "SubscriptionStatus",
            "patient",
            "PATIENT",
            "",
            "Patient ",
            "Reference",
        ] {
            assert!(!is_resource_type(name), "{name:?}");
        }
    }

    #[test]
    fn mandatory_elements_cover_every_type() {
        let names: Vec<&str> = MANDATORY_ELEMENTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, RESOURCE_TYPES);
        assert_eq!(
            mandatory_elements("Observation"),
            Some(&["code", "status"][..])
        );
        assert_eq!(mandatory_elements("Patient"), Some(&[][..]));
        assert_eq!(mandatory_elements("Bundle"), Some(&["type"][..]));
        assert!(
            mandatory_elements("MedicationRequest")
                .unwrap_or_default()
                .contains(&"medication[x]")
        );
        assert_eq!(mandatory_elements("Nope"), None);
    }
}
