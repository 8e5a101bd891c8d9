//! End-to-end tests of the FHIR REST edge: a real server on a loopback port over a fresh
//! SQLite store, driven through HTTP the way a client sees it.

mod bundle;
mod export;
mod helpers;
mod organize_output;
mod partial_manifests;
mod patient_export;
mod rest;
mod s3_output;
mod search;
