//! `POST [base]` with a `transaction` (all or nothing) or `batch` (each entry alone) Bundle.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use hearth_fhir::envelope::{IdPolicy, PreparedResource, prepare, replace_string_values};
use hearth_fhir::instant::format_instant;
use hearth_fhir::outcome::{Issue, operation_outcome};
use hearth_store::{BatchMode, StoreError, StoredVersion, WriteError, WriteKind, WriteOp, Written};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::AppState;
use crate::error::{ApiError, ApiResult, write_error_status};
use crate::http_util::{
    fhir_json, parse_etag, parse_query, read_body, require_json_body, require_json_response,
};
use crate::rest::{EntryResponse, known_type, valid_id};

#[derive(Deserialize)]
struct BundleIn<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    entry: Vec<EntryIn<'a>>,
}

#[derive(Deserialize)]
struct EntryIn<'a> {
    #[serde(rename = "fullUrl", borrow)]
    full_url: Option<Cow<'a, str>>,
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    #[serde(borrow)]
    request: Option<RequestIn<'a>>,
}

#[derive(Deserialize)]
struct RequestIn<'a> {
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow)]
    url: Cow<'a, str>,
    #[serde(rename = "ifMatch", borrow)]
    if_match: Option<Cow<'a, str>>,
    #[serde(rename = "ifNoneMatch", borrow)]
    if_none_match: Option<Cow<'a, str>>,
    #[serde(rename = "ifNoneExist", borrow)]
    if_none_exist: Option<Cow<'a, str>>,
    #[serde(rename = "ifModifiedSince", borrow)]
    if_modified_since: Option<Cow<'a, str>>,
}

/// What one entry asks for, once understood.
enum Action {
    Write(WriteOp),
    Read {
        resource_type: &'static str,
        id: String,
        version: Option<u64>,
    },
}

#[derive(Serialize)]
struct ResponseBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    entry: Vec<ResponseEntry<'a>>,
}

#[derive(Serialize)]
struct ResponseEntry<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a RawValue>,
    response: EntryResponse,
}

fn entry_error(index: usize, message: impl std::fmt::Display) -> ApiError {
    ApiError::Invalid {
        diagnostics: format!("Bundle.entry[{index}]: {message}"),
        expression: Some(format!("Bundle.entry[{index}]")),
    }
}

/// `Type/id` or `Type/id/_history/v` relative to the base, also when given absolute.
fn split_url<'u>(app: &AppState, url: &'u str) -> &'u str {
    let base = app.config.base_url.trim_end_matches('/');
    url.strip_prefix(base)
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or(url)
}

fn parse_action(
    app: &AppState,
    index: usize,
    entry: &EntryIn<'_>,
    body: Option<Cow<'_, [u8]>>,
    assigned_id: Option<&str>,
) -> ApiResult<Action> {
    let request = entry
        .request
        .as_ref()
        .ok_or_else(|| entry_error(index, "the entry has no request"))?;
    for (name, value) in [
        ("ifNoneExist", &request.if_none_exist),
        ("ifNoneMatch", &request.if_none_match),
        ("ifModifiedSince", &request.if_modified_since),
    ] {
        if value.is_some() {
            return Err(ApiError::NotSupported(format!(
                "Bundle.entry[{index}]: request.{name} (conditional interactions) is not supported"
            )));
        }
    }
    let if_match = match &request.if_match {
        Some(text) => Some(parse_etag(text).ok_or_else(|| {
            entry_error(index, format!("ifMatch '{text}' is not a version ETag"))
        })?),
        None => None,
    };
    let url = split_url(app, &request.url);
    if url.contains('?') {
        return Err(ApiError::NotSupported(format!(
            "Bundle.entry[{index}]: request.url '{url}' has a query; conditional and search entries are not supported"
        )));
    }
    let parts: Vec<&str> = url.split('/').collect();
    let prepare_body =
        |expected_type: &'static str, policy: IdPolicy<'_>| -> ApiResult<PreparedResource> {
            let body = body
                .as_deref()
                .ok_or_else(|| entry_error(index, "the entry has no resource"))?;
            prepare(body, Some(expected_type), policy).map_err(|e| entry_error(index, e))
        };
    let typed = |name: &str| known_type(name).map_err(|e| entry_error(index, e));
    let id_of = |id: &str| {
        valid_id(id)
            .map(str::to_owned)
            .map_err(|e| entry_error(index, e))
    };
    match (request.method.as_ref(), parts.as_slice()) {
        ("POST", [type_name]) => {
            let resource_type = typed(type_name)?;
            let id = assigned_id.ok_or_else(|| entry_error(index, "no id was assigned"))?;
            Ok(Action::Write(WriteOp::Put {
                resource: prepare_body(resource_type, IdPolicy::Assign(id))?,
                if_match,
            }))
        }
        ("PUT", [type_name, id]) => {
            let resource_type = typed(type_name)?;
            let id = id_of(id)?;
            Ok(Action::Write(WriteOp::Put {
                resource: prepare_body(resource_type, IdPolicy::Expect(&id))?,
                if_match,
            }))
        }
        ("DELETE", [type_name, id]) => Ok(Action::Write(WriteOp::Delete {
            resource_type: typed(type_name)?,
            id: id_of(id)?,
            if_match,
        })),
        ("GET", [type_name, id]) => Ok(Action::Read {
            resource_type: typed(type_name)?,
            id: id_of(id)?,
            version: None,
        }),
        ("GET", [type_name, id, "_history", version]) => Ok(Action::Read {
            resource_type: typed(type_name)?,
            id: id_of(id)?,
            version: Some(
                version
                    .parse()
                    .map_err(|_| entry_error(index, format!("'{version}' is not a version")))?,
            ),
        }),
        (method, _) => Err(ApiError::NotSupported(format!(
            "Bundle.entry[{index}]: {method} {url} is not a supported bundle interaction (POST Type, PUT/DELETE/GET Type/id)"
        ))),
    }
}

fn written_response(written: &Written) -> EntryResponse {
    let (status, location) = match written.kind {
        WriteKind::Created => (
            "201 Created",
            Some(format!(
                "{}/{}/_history/{}",
                written.resource_type, written.id, written.version
            )),
        ),
        WriteKind::Updated | WriteKind::Unchanged => ("200 OK", None),
        WriteKind::Deleted | WriteKind::NotPresent => ("204 No Content", None),
    };
    let exists = written.version > 0 && written.kind != WriteKind::NotPresent;
    EntryResponse {
        status: status.to_owned(),
        location,
        etag: exists.then(|| format!("W/\"{}\"", written.version)),
        last_modified: exists.then(|| format_instant(written.last_updated)),
        outcome: (written.kind == WriteKind::Unchanged)
            .then(unchanged_outcome)
            .flatten(),
    }
}

/// Where a batch entry's update changed nothing, say so the way HAPI FHIR does, so loaders
/// can tell a no-op from an update.
pub const STORAGE_RESPONSE_SYSTEM: &str =
    "https://hapifhir.io/fhir/CodeSystem/hapi-fhir-storage-response-code";
pub const UNCHANGED_CODE: &str = "SUCCESSFUL_UPDATE_NO_CHANGE";

fn unchanged_outcome() -> Option<Box<RawValue>> {
    let outcome = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "information",
            "code": "informational",
            "details": {"coding": [{"system": STORAGE_RESPONSE_SYSTEM, "code": UNCHANGED_CODE}]},
            "diagnostics": "the content equals the current version; no new version was written"
        }]
    });
    RawValue::from_string(outcome.to_string()).ok()
}

fn failed_response(status: StatusCode, message: &str) -> EntryResponse {
    let outcome = operation_outcome(&[Issue::error(
        if status == StatusCode::PRECONDITION_FAILED {
            "conflict"
        } else {
            "invalid"
        },
        message,
    )]);
    EntryResponse {
        status: format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ),
        location: None,
        etag: None,
        last_modified: None,
        outcome: RawValue::from_string(String::from_utf8_lossy(&outcome).into_owned()).ok(),
    }
}

pub async fn process(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    require_json_response(&headers, &parse_query(query.as_deref()))?;
    require_json_body(&headers)?;
    let body = read_body(&headers, body, app.config.max_body_bytes).await?;
    let bundle: BundleIn<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not a valid Bundle: {e}")))?;
    if bundle.resource_type.as_deref() != Some("Bundle") {
        return Err(ApiError::invalid(
            "POST to the base needs a Bundle resource",
        ));
    }
    let mode = match bundle.kind.as_deref() {
        Some("transaction") => BatchMode::Atomic,
        Some("batch") => BatchMode::Independent,
        other => {
            return Err(ApiError::invalid(format!(
                "Bundle.type must be transaction or batch, not {}",
                other.unwrap_or("missing")
            )));
        }
    };

    // Ids for created resources, and the urn:uuid: references that point to them.
    let mut assigned: Vec<Option<String>> = Vec::with_capacity(bundle.entry.len());
    let mut rewrites: HashMap<String, String> = HashMap::new();
    for entry in &bundle.entry {
        let request = entry.request.as_ref();
        let creates = request.is_some_and(|r| r.method == "POST");
        if !creates {
            assigned.push(None);
            continue;
        }
        let id = uuid::Uuid::new_v4().to_string();
        if mode == BatchMode::Atomic
            && let (Some(full_url), Some(request)) = (&entry.full_url, request)
            && (full_url.starts_with("urn:uuid:") || full_url.starts_with("urn:oid:"))
        {
            let type_name = split_url(&app, &request.url).to_owned();
            rewrites.insert(full_url.to_string(), format!("{type_name}/{id}"));
        }
        assigned.push(Some(id));
    }
    let rewrite = |text: &str| rewrites.get(text).cloned();

    let mut actions: Vec<ApiResult<Action>> = Vec::with_capacity(bundle.entry.len());
    for (index, entry) in bundle.entry.iter().enumerate() {
        let body = entry.resource.map(|raw| {
            let bytes = raw.get().as_bytes();
            if rewrites.is_empty() {
                Cow::Borrowed(bytes)
            } else {
                replace_string_values(bytes, &rewrite)
            }
        });
        let action = parse_action(&app, index, entry, body, assigned[index].as_deref());
        if mode == BatchMode::Atomic {
            actions.push(Ok(action?));
        } else {
            actions.push(action);
        }
    }

    if mode == BatchMode::Atomic {
        let mut seen = HashSet::new();
        for (index, action) in actions.iter().enumerate() {
            let key = match action {
                Ok(Action::Write(WriteOp::Put { resource, .. })) => {
                    (resource.resource_type, resource.id.clone())
                }
                Ok(Action::Write(WriteOp::Delete {
                    resource_type, id, ..
                })) => (*resource_type, id.clone()),
                _ => continue,
            };
            if !seen.insert(key.clone()) {
                return Err(entry_error(
                    index,
                    format!("{}/{} appears in more than one entry", key.0, key.1),
                ));
            }
        }
    }

    // A transaction fails as a whole: its reads must succeed before anything is written (the
    // duplicate check above guarantees the writes cannot change what they read).
    if mode == BatchMode::Atomic {
        for (index, action) in actions.iter().enumerate() {
            if let Ok(Action::Read {
                resource_type,
                id,
                version,
            }) = action
            {
                read_entry(&app, resource_type, id, *version)
                    .await?
                    .map_err(|e| in_entry(index, e))?;
            }
        }
    }

    // All writes go to the store in one call: atomically for a transaction.
    let mut write_slots = Vec::new();
    let mut ops = Vec::new();
    for (index, action) in actions.iter_mut().enumerate() {
        if let Ok(Action::Write(_)) = action
            && let Ok(Action::Write(op)) =
                std::mem::replace(action, Err(ApiError::Internal(String::new())))
        {
            write_slots.push(index);
            ops.push(op);
        }
    }
    let mut write_results: HashMap<usize, Result<Written, WriteError>> = HashMap::new();
    if !ops.is_empty() {
        match app.store.write(ops, mode).await {
            Ok(results) => {
                write_results.extend(write_slots.iter().copied().zip(results));
            }
            Err(StoreError::Entry { index, error }) => {
                let entry = write_slots.get(index).copied().unwrap_or(index);
                return Err(ApiError::Store(StoreError::Entry {
                    index: entry,
                    error,
                }));
            }
            Err(e) => return Err(e.into()),
        }
    }

    let mut reads: HashMap<usize, ApiResult<StoredVersion>> = HashMap::new();
    for (index, action) in actions.iter().enumerate() {
        if let Ok(Action::Read {
            resource_type,
            id,
            version,
        }) = action
        {
            let found = match version {
                Some(v) => app.store.read_version(resource_type, id, *v).await?,
                None => app.store.read(resource_type, id).await?,
            };
            let result = match found {
                Some(stored) if !stored.deleted => Ok(stored),
                Some(_) => Err(ApiError::Gone(format!("{resource_type}/{id} was deleted"))),
                None => Err(ApiError::NotFound(format!(
                    "{resource_type}/{id} does not exist"
                ))),
            };
            if mode == BatchMode::Atomic {
                reads.insert(index, Ok(result?));
            } else {
                reads.insert(index, result);
            }
        }
    }

    let read_raw: HashMap<usize, &RawValue> = reads
        .iter()
        .filter_map(|(index, r)| {
            r.as_ref()
                .ok()
                .and_then(|stored| serde_json::from_slice::<&RawValue>(&stored.body).ok())
                .map(|raw| (*index, raw))
        })
        .collect();
    let mut entries = Vec::with_capacity(actions.len());
    for (index, action) in actions.iter().enumerate() {
        let entry = if let Some(result) = write_results.get(&index) {
            match result {
                Ok(written) => ResponseEntry {
                    resource: None,
                    response: written_response(written),
                },
                Err(conflict) => ResponseEntry {
                    resource: None,
                    response: failed_response(write_error_status(conflict), &conflict.to_string()),
                },
            }
        } else if let Some(result) = reads.get(&index) {
            match result {
                Ok(stored) => ResponseEntry {
                    resource: read_raw.get(&index).copied(),
                    response: EntryResponse {
                        status: "200 OK".into(),
                        location: None,
                        etag: Some(format!("W/\"{}\"", stored.version)),
                        last_modified: Some(format_instant(stored.last_updated)),
                        outcome: None,
                    },
                },
                Err(e) => ResponseEntry {
                    resource: None,
                    response: failed_response(error_status(e), &e.to_string()),
                },
            }
        } else {
            let message = match action {
                Err(e) => e.to_string(),
                Ok(_) => "not processed".to_owned(),
            };
            let status = match action {
                Err(e) => error_status(e),
                Ok(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ResponseEntry {
                resource: None,
                response: failed_response(status, &message),
            }
        };
        entries.push(entry);
    }
    let response = ResponseBundle {
        resource_type: "Bundle",
        kind: if mode == BatchMode::Atomic {
            "transaction-response"
        } else {
            "batch-response"
        },
        entry: entries,
    };
    let body = serde_json::to_vec(&response).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(fhir_json(StatusCode::OK, body))
}

/// A GET entry: the outer error is the store's, the inner one the entry's own answer.
async fn read_entry(
    app: &AppState,
    resource_type: &str,
    id: &str,
    version: Option<u64>,
) -> ApiResult<ApiResult<StoredVersion>> {
    let found = match version {
        Some(v) => app.store.read_version(resource_type, id, v).await?,
        None => app.store.read(resource_type, id).await?,
    };
    Ok(match found {
        Some(stored) if !stored.deleted => Ok(stored),
        Some(_) => Err(ApiError::Gone(format!("{resource_type}/{id} was deleted"))),
        None => Err(ApiError::NotFound(format!(
            "{resource_type}/{id} does not exist"
        ))),
    })
}

/// Names the entry in an error that fails a whole transaction.
fn in_entry(index: usize, error: ApiError) -> ApiError {
    let message = format!("Bundle.entry[{index}]: {error}");
    match error {
        ApiError::NotFound(_) => ApiError::NotFound(message),
        ApiError::Gone(_) => ApiError::Gone(message),
        _ => entry_error(index, error),
    }
}

fn error_status(error: &ApiError) -> StatusCode {
    error.status()
}
