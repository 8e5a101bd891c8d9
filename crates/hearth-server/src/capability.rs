//! `GET [base]/metadata`: a CapabilityStatement that says exactly what is implemented.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use hearth_fhir::resource_type::resource_types;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiResult;
use crate::http_util::{fhir_json, parse_query, require_json_response};

fn resource_entry(resource_type: &str) -> Value {
    let mut entry = plain_resource_entry(resource_type);
    // Both the STU2 names (checked by bdt) and the STU3 name `export` (checked by Inferno).
    let (old_name, canonical) = match resource_type {
        "Patient" => (
            "patient-export",
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
        ),
        "Group" => (
            "group-export",
            "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
        ),
        _ => return entry,
    };
    entry["operation"] = json!([
        {"name": "export", "definition": canonical},
        {"name": old_name, "definition": canonical}
    ]);
    entry
}

fn plain_resource_entry(resource_type: &str) -> Value {
    json!({
        "type": resource_type,
        "interaction": [
            {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "delete"},
            {"code": "history-instance"}, {"code": "create"}, {"code": "search-type"}
        ],
        "versioning": "versioned",
        "readHistory": true,
        "updateCreate": true,
        "conditionalCreate": false,
        "conditionalUpdate": false,
        "conditionalDelete": "not-supported",
        "searchParam": search_params(resource_type)
    })
}

/// Every search parameter the engine evaluates for the type: usable in REST search and in
/// `_typeFilter` alike.
fn search_params(resource_type: &str) -> Vec<Value> {
    let mut params = vec![
        json!({"name": "_id", "type": "token", "documentation": "Logical id; comma-separated ids are OR-ed."}),
        json!({"name": "_lastUpdated", "type": "date", "documentation": "Prefixes eq, gt, ge, lt, le, sa, eb."}),
    ];
    for (name, kind) in hearth_fhir::search::supported_parameters(resource_type) {
        if name != "_id" && name != "_lastUpdated" {
            params.push(json!({"name": name, "type": kind}));
        }
    }
    params
}

/// The statement for a server at `base_url`, built once at start-up.
pub fn capability_statement(base_url: &str, started: &str) -> Vec<u8> {
    let resources: Vec<Value> = resource_types().iter().map(|t| resource_entry(t)).collect();
    let statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": started,
        "publisher": "Hearth",
        "kind": "instance",
        "software": {"name": "Hearth", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Hearth FHIR R4 server", "url": base_url},
        "fhirVersion": "4.0.1",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Search supports the R4 search parameters listed per resource (token, string, reference, date, uri, quantity, number; modifiers :missing, :exact, :contains, :not, :text), plus _count, _summary=count and _total. Chained parameters, _has, _include and _sort are refused by name unless Prefer: handling=lenient is sent.",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [
                {
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                    "documentation": "Bulk Data system export (GET or POST). Parameters: _outputFormat (application/fhir+ndjson, application/ndjson, ndjson), _type, _since, _until, _typeFilter (and _typePostFetchFilterUrl; any search parameter listed on the resource), _elements (top-level elements; trimmed resources are tagged SUBSETTED), includeAssociatedData=RelevantProvenanceResources or LatestProvenanceResources (the most recent Provenance, by recorded, of each exported resource, and no other Provenance; not with organizeOutputBy), _exportId, organizeOutputBy=Patient (at every level). allowPartialManifests=true: while the job runs, a status request may answer 202 with a manifest of files already downloadable; manifests come in pages of a fixed run of work units, linked by link next (_page=N on the status URL), error files on the last page. organizeOutputBy values other than Patient are refused by name, or ignored and reported in the manifest's error files with Prefer: handling=lenient. One resource type per NDJSON file; files roll over by size. With organizeOutputBy=Patient the files hold resource blocks instead: a Parameters header line referencing Patient/<id>, then that Patient, then the rest of its R4 Patient compartment (a resource in several compartments is in each of their blocks; Provenance is the Provenance in the compartment, whose target is the patient, which includeAssociatedData=RelevantProvenanceResources adds when _type leaves it out); _type, _typeFilter, _since, _until, _elements and the patient parameter select what is in the blocks, and a patient with nothing selected has no block. Output items then carry no type, the manifest carries outputOrganizedBy, and count is the number of lines of the file, block headers included. Files roll over between blocks; only a block larger than a file is split, its header repeated at the top of the next file, which the earlier item names in continuesInFile. A system export organized by Patient writes the blocks of every Patient and leaves out resources outside every Patient compartment (one information OperationOutcome in error says so; _type naming such a type is refused). Deleted resources (with _since) are listed as transaction Bundles in 'deleted', by type. System exports include all Provenance unless _type leaves it out; Patient and Group exports cover the full R4 Patient compartment (Provenance whose target is the patient included) and add no resources outside it. A Group export honours member.inactive and member.period at transactionTime and skips members that are not Patients; with _since it exports the current state of resources changed since, including for patients who joined later."
                },
                {
                    "name": "export-poll-status",
                    "definition": "http://ehealth.sundhed.dk/fhir/OperationDefinition/-s-export-poll-status",
                    "documentation": "GET: 202 with X-Progress while running, 200 with the manifest when done. DELETE: cancels (202), or 404 once the manifest was delivered."
                }
            ]
        }]
    });
    serde_json::to_vec(&statement).unwrap_or_default()
}

pub async fn metadata(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    require_json_response(&headers, &parse_query(query.as_deref()))?;
    Ok(fhir_json(StatusCode::OK, app.capability.as_ref().clone()))
}

/// The OperationDefinitions Hearth implements, served at `OperationDefinition/<id>`.
const DEFINITIONS: &[(&str, &[u8])] = &[
    (
        "-s-export-poll-status",
        include_bytes!("../definitions/OperationDefinition--s-export-poll-status.json"),
    ),
    (
        "-s-export",
        include_bytes!("../definitions/OperationDefinition--s-export.json"),
    ),
    (
        "export",
        include_bytes!("../definitions/OperationDefinition-export.json"),
    ),
];

pub async fn operation_definition(
    state: State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    raw_query: RawQuery,
    headers: HeaderMap,
    grants: Option<axum::Extension<crate::auth::Grants>>,
) -> ApiResult<Response> {
    match DEFINITIONS.iter().find(|(name, _)| *name == id) {
        Some((_, definition)) => {
            require_json_response(&headers, &parse_query(raw_query.0.as_deref()))?;
            Ok(fhir_json(StatusCode::OK, *definition))
        }
        None => {
            crate::rest::read(
                state,
                axum::extract::Path(("OperationDefinition".to_owned(), id)),
                raw_query,
                headers,
                grants,
            )
            .await
        }
    }
}
