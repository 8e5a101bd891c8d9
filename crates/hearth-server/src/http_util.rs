//! Small HTTP pieces shared by the handlers: content negotiation, bodies, headers.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hearth_fhir::instant::{Micros, to_system_time};
use hearth_store::StoredVersion;
use http_body_util::BodyExt;

use crate::error::{ApiError, ApiResult};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Query parameters in order, repeats kept (FHIR gives repeats meaning).
pub type QueryParams = Vec<(String, String)>;

pub fn parse_query(raw: Option<&str>) -> QueryParams {
    raw.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Values of one parameter, repeats and comma-separated lists flattened.
pub fn comma_values<'a>(params: &'a QueryParams, name: &str) -> Vec<&'a str> {
    params
        .iter()
        .filter(|(key, _)| key == name)
        .flat_map(|(_, value)| value.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

/// Reads a request body, refusing more than `limit` bytes without reading them all.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<Bytes> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => Err(ApiError::invalid(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// FHIR bodies must be JSON: `application/fhir+json` or `application/json`.
pub fn require_json_body(headers: &HeaderMap) -> ApiResult<()> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/fhir+json")
        || essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("application/json+fhir")
    {
        Ok(())
    } else if essence.is_empty() {
        Err(ApiError::UnsupportedMediaType(
            "the request has no Content-Type; send application/fhir+json".into(),
        ))
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{essence}' is not supported; send application/fhir+json"
        )))
    }
}

/// Hearth answers in JSON only: refuse a request that accepts only something else
/// (`Accept` or `_format`).
pub fn require_json_response(headers: &HeaderMap, params: &QueryParams) -> ApiResult<()> {
    if let Some((_, format)) = params.iter().find(|(k, _)| k == "_format") {
        let format = format.trim();
        if matches!(
            format,
            "json" | "application/json" | "application/fhir+json" | "application/json+fhir"
        ) {
            return Ok(());
        }
        return Err(ApiError::NotAcceptable(format!(
            "_format '{format}' is not supported; Hearth speaks JSON"
        )));
    }
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let acceptable = accept.split(',').any(|item| {
        let essence = item.split(';').next().unwrap_or("").trim();
        essence.is_empty()
            || essence == "*/*"
            || essence == "application/*"
            || essence.eq_ignore_ascii_case("application/fhir+json")
            || essence.eq_ignore_ascii_case("application/json")
            || essence.eq_ignore_ascii_case("application/json+fhir")
            || essence.eq_ignore_ascii_case("application/fhir+ndjson")
    });
    if acceptable {
        Ok(())
    } else {
        Err(ApiError::NotAcceptable(format!(
            "cannot answer in '{accept}'; Hearth speaks application/fhir+json"
        )))
    }
}

/// The `Prefer` header's parts that Hearth acts on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prefer {
    pub respond_async: bool,
    pub lenient: bool,
    pub return_minimal: bool,
}

pub fn prefer(headers: &HeaderMap) -> Prefer {
    let mut prefer = Prefer::default();
    for value in headers.get_all("prefer") {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token: String = token.chars().filter(|c| !c.is_whitespace()).collect();
            match token.to_ascii_lowercase().as_str() {
                "respond-async" => prefer.respond_async = true,
                "handling=lenient" => prefer.lenient = true,
                "handling=strict" => prefer.lenient = false,
                "return=minimal" => prefer.return_minimal = true,
                _ => {}
            }
        }
    }
    prefer
}

/// `If-Match: W/"3"` (or `"3"`, or `3`) as a version number.
pub fn if_match(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    parse_etag(text).map(Some).ok_or_else(|| {
        ApiError::invalid(format!(
            "If-Match '{text}' is not a version ETag like W/\"3\""
        ))
    })
}

pub fn parse_etag(text: &str) -> Option<u64> {
    let text = text.trim();
    let text = text.strip_prefix("W/").unwrap_or(text);
    text.trim_matches('"').parse().ok()
}

pub fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\"")).expect("a number is a valid header")
}

pub fn http_date(micros: Micros) -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(to_system_time(micros)))
        .expect("an HTTP date is a valid header")
}

/// A JSON body with the FHIR media type.
pub fn fhir_json(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// A stored resource with its version headers.
pub fn resource_response(
    status: StatusCode,
    stored: StoredVersion,
    location: Option<String>,
) -> Response {
    let version = stored.version;
    let last_updated = stored.last_updated;
    let mut response = fhir_json(status, stored.body);
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(version));
    headers.insert(header::LAST_MODIFIED, http_date(last_updated));
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(header::LOCATION, location);
    }
    response
}
