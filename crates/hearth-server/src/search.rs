//! Type-level search: `GET [base]/{type}?...` returning a `searchset` Bundle.
//!
//! `_id` and `_lastUpdated` (prefixes `eq gt ge lt le sa eb`) use the store's indexes; every
//! other R4 search parameter goes to the search engine (`hearth_fhir::search`), evaluated on
//! each resource of the type. Result parameters: `_count`, `_summary=count`,
//! `_total=none|accurate`, and `_cursor`, the keyset position of the next page (a change
//! sequence number, never an offset). A parameter the engine cannot evaluate is refused by
//! name, or, with `Prefer: handling=lenient`, ignored and reported in the Bundle.

use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use hearth_fhir::instant::{Micros, parse_date_range};
use hearth_fhir::outcome::{Issue, Severity, operation_outcome};
use std::sync::Arc;

use hearth_fhir::search::{Filter, SearchError};
use hearth_store::SearchQuery;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::AppState;
use crate::auth::Grants;
use crate::error::{ApiError, ApiResult};
use crate::http_util::{
    QueryParams, comma_values, fhir_json, parse_query, prefer, require_json_response,
};
use crate::rest::{Link, known_type, parse_count};

const DEFAULT_COUNT: usize = 50;
const MAX_COUNT: usize = 1000;

#[derive(Serialize)]
struct SearchBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    link: Vec<Link>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entry: Vec<SearchEntry<'a>>,
}

#[derive(Serialize)]
struct SearchEntry<'a> {
    #[serde(rename = "fullUrl", skip_serializing_if = "Option::is_none")]
    full_url: Option<String>,
    resource: &'a RawValue,
    search: SearchMode,
}

#[derive(Serialize)]
struct SearchMode {
    mode: &'static str,
}

/// Narrows `(after, before)` (both exclusive) by one `_lastUpdated` value.
fn apply_last_updated(
    value: &str,
    after: &mut Option<Micros>,
    before: &mut Option<Micros>,
) -> ApiResult<()> {
    let (prefix, date) =
        if value.len() > 2 && value.as_bytes()[..2].iter().all(u8::is_ascii_lowercase) {
            value.split_at(2)
        } else {
            ("eq", value)
        };
    let range = parse_date_range(date)
        .map_err(|e| ApiError::invalid_parameter("_lastUpdated", e.to_string()))?;
    let mut raise = |to: Micros| *after = Some(after.map_or(to, |a| a.max(to)));
    let (lower, upper) = match prefix {
        "eq" => (Some(range.start - 1), Some(range.end)),
        "gt" | "sa" => (Some(range.end - 1), None),
        "ge" => (Some(range.start - 1), None),
        "lt" | "eb" => (None, Some(range.start)),
        "le" => (None, Some(range.end)),
        other => {
            return Err(ApiError::invalid_parameter(
                "_lastUpdated",
                format!("the prefix '{other}' is not supported for _lastUpdated"),
            ));
        }
    };
    if let Some(lower) = lower {
        raise(lower);
    }
    if let Some(upper) = upper {
        *before = Some(before.map_or(upper, |b| b.min(upper)));
    }
    Ok(())
}

struct ParsedSearch {
    query: SearchQuery,
    ignored: Vec<String>,
}

fn parse_search(
    resource_type: &str,
    params: &QueryParams,
    lenient: bool,
) -> ApiResult<ParsedSearch> {
    let mut query = SearchQuery {
        resource_type: resource_type.to_owned(),
        count: parse_count(params, DEFAULT_COUNT, MAX_COUNT)?,
        total: true,
        ..SearchQuery::default()
    };
    let mut ignored = Vec::new();
    let mut filters: Vec<(String, String)> = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "_id" => {}
            "_lastUpdated" => {
                apply_last_updated(value, &mut query.updated_after, &mut query.updated_before)?
            }
            "_count" | "_format" | "_pretty" => {}
            "_summary" => match value.as_str() {
                "count" => query.count = 0,
                "false" => {}
                other => {
                    return Err(ApiError::NotSupported(format!(
                        "_summary={other} is not supported (count and false are)"
                    )));
                }
            },
            "_total" => match value.as_str() {
                "none" => query.total = false,
                "accurate" | "estimate" => query.total = true,
                other => {
                    return Err(ApiError::invalid_parameter(
                        "_total",
                        format!("_total={other} is not a valid value"),
                    ));
                }
            },
            "_cursor" => {
                query.after_seq = value.parse().map_err(|_| {
                    ApiError::invalid_parameter("_cursor", "the paging cursor is not valid")
                })?;
            }
            _ => filters.push((name.clone(), value.clone())),
        }
    }
    // Everything else goes to the search engine. Lenient: drop what it refuses, by name.
    loop {
        match Filter::parse(resource_type, &filters) {
            Ok(filter) => {
                if !filters.is_empty() {
                    query.filter = Some(Arc::new(filter));
                }
                break;
            }
            Err(e) if lenient => {
                let refused = e.parameter().to_owned();
                let before = filters.len();
                filters.retain(|(name, _)| name.split(':').next() != Some(refused.as_str()));
                if filters.len() == before {
                    return Err(search_error(e));
                }
                ignored.push(format!("{refused} ({e})"));
            }
            Err(e) => return Err(search_error(e)),
        }
    }
    query.ids = comma_values(params, "_id")
        .into_iter()
        .map(str::to_owned)
        .collect();
    Ok(ParsedSearch { query, ignored })
}

fn search_error(error: SearchError) -> ApiError {
    let parameter = error.parameter().to_owned();
    ApiError::invalid_parameter(
        &parameter,
        format!("{error} (send Prefer: handling=lenient to ignore unsupported parameters)"),
    )
}

fn query_string(params: &QueryParams, cursor: Option<i64>) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params.iter().filter(|(k, _)| k != "_cursor") {
        out.append_pair(k, v);
    }
    if let Some(cursor) = cursor {
        out.append_pair("_cursor", &cursor.to_string());
    }
    out.finish()
}

pub async fn search(
    State(app): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    grants: Option<Extension<Grants>>,
) -> ApiResult<Response> {
    let params = parse_query(raw_query.as_deref());
    require_json_response(&headers, &params)?;
    let resource_type = known_type(&resource_type)?;
    let ParsedSearch { mut query, ignored } =
        parse_search(resource_type, &params, prefer(&headers).lenient)?;
    // Granular scopes: the search sees only what they select.
    if let Some(Extension(grants)) = &grants
        && let Some(narrowing) = grants.narrowing(resource_type, |a| a.search)
    {
        query.filter = Some(Arc::new(match query.filter.take() {
            Some(asked) => (*asked).clone().within_any(vec![narrowing]),
            None => narrowing,
        }));
    }
    let page = app.store.search(query).await?;

    let base = &app.config.base_url;
    let link_to = |cursor| {
        let query = query_string(&params, cursor);
        if query.is_empty() {
            format!("{base}/{resource_type}")
        } else {
            format!("{base}/{resource_type}?{query}")
        }
    };
    let mut link = vec![Link {
        relation: "self",
        url: link_to(None),
    }];
    if let Some(next) = page.next_after_seq {
        link.push(Link {
            relation: "next",
            url: link_to(Some(next)),
        });
    }
    let mut entry = Vec::with_capacity(page.resources.len() + 1);
    for stored in &page.resources {
        let resource = serde_json::from_slice::<&RawValue>(&stored.body)
            .map_err(|e| ApiError::Internal(format!("stored body is not JSON: {e}")))?;
        entry.push(SearchEntry {
            full_url: Some(format!("{base}/{resource_type}/{}", stored.id)),
            resource,
            search: SearchMode { mode: "match" },
        });
    }
    let outcome = (!ignored.is_empty()).then(|| {
        operation_outcome(&[Issue::new(
            Severity::Warning,
            "not-supported",
            format!(
                "ignored unsupported search parameters: {}",
                ignored.join(", ")
            ),
        )])
    });
    let outcome_raw = match &outcome {
        Some(bytes) => Some(
            serde_json::from_slice::<&RawValue>(bytes)
                .map_err(|e| ApiError::Internal(e.to_string()))?,
        ),
        None => None,
    };
    if let Some(resource) = outcome_raw {
        entry.push(SearchEntry {
            full_url: None,
            resource,
            search: SearchMode { mode: "outcome" },
        });
    }
    let bundle = SearchBundle {
        resource_type: "Bundle",
        kind: "searchset",
        total: page.total,
        link,
        entry,
    };
    let body = serde_json::to_vec(&bundle).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(fhir_json(StatusCode::OK, body))
}
