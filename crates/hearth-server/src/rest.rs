//! The instance and type interactions: create, read, vread, update, delete, history.

use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hearth_fhir::envelope::{IdPolicy, is_valid_id, prepare};
use hearth_fhir::outcome::{Issue, operation_outcome};
use hearth_fhir::resource_type::canonical_resource_type;
use hearth_store::{BatchMode, StoredVersion, WriteKind, WriteOp, Written};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::AppState;
use crate::auth::{self, Grants};
use crate::error::{ApiError, ApiResult, write_error_status};
use crate::http_util::{
    QueryParams, fhir_json, http_date, if_match, parse_etag, parse_query, prefer, read_body,
    require_json_body, require_json_response, resource_response,
};

fn grants_of(grants: &Option<Extension<Grants>>) -> Option<&Grants> {
    grants.as_ref().map(|Extension(grants)| grants)
}

/// The R4 type named in a URL, or `404`.
pub fn known_type(name: &str) -> ApiResult<&'static str> {
    canonical_resource_type(name).ok_or_else(|| {
        ApiError::NotFound(format!("'{name}' is not a resource type this server knows"))
    })
}

/// A resource id from a URL, or `400`.
pub fn valid_id(id: &str) -> ApiResult<&str> {
    if is_valid_id(id) {
        Ok(id)
    } else {
        Err(ApiError::invalid(format!(
            "'{id}' is not a valid resource id (1 to 64 of A-Z a-z 0-9 - .)"
        )))
    }
}

fn version_url(app: &AppState, resource_type: &str, id: &str, version: u64) -> String {
    format!(
        "{}/{resource_type}/{id}/_history/{version}",
        app.config.base_url
    )
}

fn gone(stored: &StoredVersion) -> ApiError {
    ApiError::Gone(format!(
        "{}/{} was deleted (version {})",
        stored.resource_type, stored.id, stored.version
    ))
}

pub async fn read(
    State(app): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    grants: Option<Extension<Grants>>,
) -> ApiResult<Response> {
    require_json_response(&headers, &parse_query(query.as_deref()))?;
    let resource_type = known_type(&resource_type)?;
    let id = valid_id(&id)?;
    let stored = app
        .store
        .read(resource_type, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{resource_type}/{id} does not exist")))?;
    if stored.deleted {
        return Err(gone(&stored));
    }
    auth::require_read_resource(grants_of(&grants), resource_type, id, &stored.body)?;
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_etag)
        == Some(stored.version);
    if not_modified {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response
            .headers_mut()
            .insert(header::ETAG, crate::http_util::etag(stored.version));
        return Ok(response);
    }
    Ok(resource_response(StatusCode::OK, stored, None))
}

pub async fn vread(
    State(app): State<AppState>,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    grants: Option<Extension<Grants>>,
) -> ApiResult<Response> {
    require_json_response(&headers, &parse_query(query.as_deref()))?;
    let resource_type = known_type(&resource_type)?;
    let id = valid_id(&id)?;
    let version: u64 = version
        .parse()
        .map_err(|_| ApiError::invalid(format!("'{version}' is not a version number")))?;
    let stored = app
        .store
        .read_version(resource_type, id, version)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("{resource_type}/{id} has no version {version}"))
        })?;
    if stored.deleted {
        return Err(gone(&stored));
    }
    auth::require_read_resource(grants_of(&grants), resource_type, id, &stored.body)?;
    Ok(resource_response(StatusCode::OK, stored, None))
}

/// Conditional interactions are not implemented: refuse them rather than ignore them.
fn refuse_conditional_headers(headers: &HeaderMap) -> ApiResult<()> {
    for name in ["if-none-exist", "if-none-match"] {
        if headers.contains_key(name) {
            return Err(ApiError::NotSupported(format!(
                "conditional interactions ({name}) are not supported"
            )));
        }
    }
    Ok(())
}

pub async fn create(
    State(app): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    require_json_response(&headers, &parse_query(query.as_deref()))?;
    let resource_type = known_type(&resource_type)?;
    refuse_conditional_headers(&headers)?;
    require_json_body(&headers)?;
    let body = read_body(&headers, body, app.config.max_body_bytes).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let resource = prepare(&body, Some(resource_type), IdPolicy::Assign(&id))?;
    let written = write_one(
        &app,
        WriteOp::Put {
            resource: resource.clone(),
            if_match: None,
        },
    )
    .await?;
    let body = resource.render(written.version, written.last_updated);
    Ok(written_response(&app, &headers, written, body))
}

pub async fn update(
    State(app): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    require_json_response(&headers, &parse_query(query.as_deref()))?;
    let resource_type = known_type(&resource_type)?;
    let id = valid_id(&id)?.to_owned();
    refuse_conditional_headers(&headers)?;
    require_json_body(&headers)?;
    let if_match = if_match(&headers)?;
    let body = read_body(&headers, body, app.config.max_body_bytes).await?;
    let resource = prepare(&body, Some(resource_type), IdPolicy::Expect(&id))?;
    let written = write_one(
        &app,
        WriteOp::Put {
            resource: resource.clone(),
            if_match,
        },
    )
    .await?;
    let body = resource.render(written.version, written.last_updated);
    Ok(written_response(&app, &headers, written, body))
}

pub async fn delete(
    State(app): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    require_json_response(&headers, &parse_query(query.as_deref()))?;
    let resource_type = known_type(&resource_type)?;
    let id = valid_id(&id)?.to_owned();
    let if_match = if_match(&headers)?;
    let written = write_one(
        &app,
        WriteOp::Delete {
            resource_type,
            id,
            if_match,
        },
    )
    .await?;
    let message = match written.kind {
        WriteKind::Deleted => format!("deleted {resource_type}/{}", written.id),
        _ => format!(
            "{resource_type}/{} did not exist or was already deleted",
            written.id
        ),
    };
    let mut response = fhir_json(
        StatusCode::OK,
        operation_outcome(&[Issue::information(message)]),
    );
    if written.kind == WriteKind::Deleted {
        response
            .headers_mut()
            .insert(header::ETAG, crate::http_util::etag(written.version));
    }
    Ok(response)
}

async fn write_one(app: &AppState, op: WriteOp) -> ApiResult<Written> {
    let mut results = app.store.write(vec![op], BatchMode::Independent).await?;
    match results.pop() {
        Some(Ok(written)) => Ok(written),
        Some(Err(conflict)) => {
            debug_assert_eq!(
                write_error_status(&conflict),
                StatusCode::PRECONDITION_FAILED
            );
            Err(ApiError::PreconditionFailed(conflict.to_string()))
        }
        None => Err(ApiError::Internal("the store returned no result".into())),
    }
}

/// `201` with `Location` for a creation, `200` otherwise; the body unless `return=minimal`.
fn written_response(
    app: &AppState,
    headers: &HeaderMap,
    written: Written,
    body: Vec<u8>,
) -> Response {
    let status = if written.kind == WriteKind::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = (written.kind == WriteKind::Created)
        .then(|| version_url(app, written.resource_type, &written.id, written.version));
    let stored = StoredVersion {
        resource_type: written.resource_type.to_owned(),
        id: written.id,
        version: written.version,
        last_updated: written.last_updated,
        seq: written.seq,
        deleted: false,
        body: if prefer(headers).return_minimal {
            Vec::new()
        } else {
            body
        },
    };
    resource_response(status, stored, location)
}

#[derive(Serialize)]
struct HistoryBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    link: Vec<Link>,
    entry: Vec<HistoryEntry<'a>>,
}

#[derive(Serialize)]
pub struct Link {
    pub relation: &'static str,
    pub url: String,
}

#[derive(Serialize)]
struct HistoryEntry<'a> {
    #[serde(rename = "fullUrl")]
    full_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a RawValue>,
    request: EntryRequest,
    response: EntryResponse,
}

#[derive(Serialize)]
struct EntryRequest {
    method: &'static str,
    url: String,
}

#[derive(Serialize)]
pub struct EntryResponse {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(rename = "lastModified", skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Box<RawValue>>,
}

pub fn parse_count(params: &QueryParams, default: usize, max: usize) -> ApiResult<usize> {
    match params.iter().rfind(|(k, _)| k == "_count") {
        None => Ok(default),
        Some((_, v)) => v.parse::<usize>().map(|n| n.min(max)).map_err(|_| {
            ApiError::invalid_parameter("_count", format!("_count '{v}' is not a number"))
        }),
    }
}

/// Instance history, newest first, paged by version.
pub async fn history(
    State(app): State<AppState>,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    grants: Option<Extension<Grants>>,
) -> ApiResult<Response> {
    let params = parse_query(query.as_deref());
    require_json_response(&headers, &params)?;
    let resource_type = known_type(&resource_type)?;
    let id = valid_id(&id)?.to_owned();
    for (name, _) in &params {
        if !matches!(
            name.as_str(),
            "_count" | "_before_version" | "_format" | "_pretty"
        ) {
            return Err(ApiError::NotSupported(format!(
                "history parameter '{name}' is not supported"
            )));
        }
    }
    let count = parse_count(&params, 50, 1000)?.max(1);
    let before = match params.iter().find(|(k, _)| k == "_before_version") {
        Some((_, v)) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::invalid_parameter("_before_version", format!("'{v}' is not a version"))
        })?),
        None => None,
    };
    let mut versions = app
        .store
        .history(resource_type, &id, before, count + 1)
        .await?;
    if versions.is_empty() && before.is_none() {
        return Err(ApiError::NotFound(format!(
            "{resource_type}/{id} does not exist"
        )));
    }
    if let Some(grants) = grants_of(&grants) {
        // With granular scopes, only the versions they select (a deletion has no body to
        // judge, so it is left out too).
        let listed = versions.len();
        versions.retain(|v| !v.deleted && auth::may_read_body(grants, resource_type, &v.body));
        if listed > 0 && versions.is_empty() {
            return Err(auth::outside_granular_scopes(grants, resource_type, &id));
        }
    }
    let base = &app.config.base_url;
    let mut link = vec![Link {
        relation: "self",
        url: format!("{base}/{resource_type}/{id}/_history?_count={count}"),
    }];
    let has_more = versions.len() > count;
    let page = &versions[..versions.len().min(count)];
    if has_more && let Some(last) = page.last() {
        link.push(Link {
            relation: "next",
            url: format!(
                "{base}/{resource_type}/{id}/_history?_count={count}&_before_version={}",
                last.version
            ),
        });
    }
    let raw: Vec<Option<&RawValue>> = page
        .iter()
        .map(|v| {
            (!v.deleted)
                .then(|| serde_json::from_slice::<&RawValue>(&v.body).ok())
                .flatten()
        })
        .collect();
    let entry = page
        .iter()
        .zip(raw)
        .map(|(v, resource)| HistoryEntry {
            full_url: format!("{base}/{resource_type}/{id}"),
            resource,
            request: EntryRequest {
                method: if v.deleted {
                    "DELETE"
                } else if v.version == 1 {
                    "POST"
                } else {
                    "PUT"
                },
                url: format!("{resource_type}/{id}"),
            },
            response: EntryResponse {
                status: if v.deleted {
                    "204"
                } else if v.version == 1 {
                    "201"
                } else {
                    "200"
                }
                .into(),
                location: None,
                etag: Some(format!("W/\"{}\"", v.version)),
                last_modified: Some(hearth_fhir::instant::format_instant(v.last_updated)),
                outcome: None,
            },
        })
        .collect();
    let bundle = HistoryBundle {
        resource_type: "Bundle",
        kind: "history",
        link,
        entry,
    };
    let body = serde_json::to_vec(&bundle).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut response = fhir_json(StatusCode::OK, body);
    if let Some(newest) = page.first() {
        response
            .headers_mut()
            .insert(header::LAST_MODIFIED, http_date(newest.last_updated));
    }
    Ok(response)
}

/// `Binary/{id}` and `OperationDefinition/{id}` have routes of their own (export files, served
/// definitions); their other interactions are the ordinary ones.
pub async fn update_binary(
    state: State<AppState>,
    Path(id): Path<String>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    update(state, Path(("Binary".to_owned(), id)), query, headers, body).await
}

pub async fn delete_binary(
    state: State<AppState>,
    Path(id): Path<String>,
    query: RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    delete(state, Path(("Binary".to_owned(), id)), query, headers).await
}

pub async fn update_operation_definition(
    state: State<AppState>,
    Path(id): Path<String>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let path = Path(("OperationDefinition".to_owned(), id));
    update(state, path, query, headers, body).await
}

pub async fn delete_operation_definition(
    state: State<AppState>,
    Path(id): Path<String>,
    query: RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    delete(
        state,
        Path(("OperationDefinition".to_owned(), id)),
        query,
        headers,
    )
    .await
}
