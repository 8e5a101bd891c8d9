//! FHIR R4 knowledge for Hearth, without I/O.
//!
//! - [`generated`]: tables generated from the official R4 definitions by
//!   `tools/gen_r4_tables.py` (resource types, Patient compartment, mandatory elements).
//! - [`resource_type`]: is a name an R4 resource type; which elements are mandatory.
//! - [`compartment`]: which patients a resource belongs to (Patient compartment membership).
//! - [`envelope`]: checking a resource body and splitting it around the server-set meta fields.
//! - [`instant`]: FHIR instants and partial dates as microseconds since the epoch.
//! - [`outcome`]: `OperationOutcome`, how errors are told to a FHIR client.
//! - [`search`]: FHIR search parameters (REST search and `_typeFilter`): parse and match.

pub mod compartment;
pub mod envelope;
pub mod generated;
pub mod instant;
pub mod outcome;
pub mod resource_type;
pub mod search;
