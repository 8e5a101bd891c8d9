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
        "searchParam": [
            {"name": "_id", "type": "token", "documentation": "Logical id; comma-separated ids are OR-ed."},
            {"name": "_lastUpdated", "type": "date", "documentation": "Prefixes eq, gt, ge, lt, le, sa, eb."}
        ]
    })
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
            "documentation": "Search supports _id, _lastUpdated, _count, _summary=count and _total; other parameters are refused by name unless Prefer: handling=lenient is sent.",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [
                {
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                    "documentation": "Bulk Data system export (GET or POST). Parameters: _outputFormat (application/fhir+ndjson, application/ndjson, ndjson), _type, _since, _until, _exportId. Other IG parameters are refused by name, or ignored and reported in the manifest's error files with Prefer: handling=lenient. One resource type per NDJSON file; files roll over by size. Deleted resources (with _since) are listed as transaction Bundles in 'deleted'."
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
            )
            .await
        }
    }
}
