//! The Bulk Data endpoints: `$export` kick-off, `$export-poll-status` (GET, POST, DELETE) and
//! file downloads at `Binary/<file id>`. Only HTTP concerns live here; the work is the export
//! engine's.

use std::io::{Read, Seek, SeekFrom};

use axum::Extension;
use axum::body::Body;
use axum::extract::{OriginalUri, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use hearth_export::{
    DownloadableFile, ExportRequest, FileSource, JobView, KickOffError, Level, OutputError,
};
use hearth_fhir::instant::now_micros;
use hearth_fhir::outcome::{Issue, operation_outcome};
use hearth_store::jobs::CancelOutcome;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::AppState;
use crate::auth::{self, Grants};
use crate::error::{ApiError, ApiResult};
use crate::http_util::{
    QueryParams, fhir_json, http_date, parse_query, prefer, read_body, require_json_body,
};

/// Who owns a job. Without authorization every caller is the same client.
const ANONYMOUS: &str = "anonymous";

#[derive(Deserialize)]
struct ParametersIn {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    #[serde(default)]
    parameter: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// A `Parameters` body as name/value pairs: primitives as their text, references as their
/// `reference`. (Parameter values here are codes, strings, instants and booleans, so reading
/// them through `Value` loses nothing.)
fn parameters_body(body: &[u8]) -> ApiResult<QueryParams> {
    use serde_json::Value;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::invalid(
            "the body must be a Parameters resource (a JSON object)",
        ));
    }
    let parsed: ParametersIn = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!("the body is not a valid Parameters resource: {e}"))
    })?;
    if parsed.resource_type.as_deref() != Some("Parameters") {
        return Err(ApiError::invalid("the body must be a Parameters resource"));
    }
    let mut pairs = Vec::with_capacity(parsed.parameter.len());
    for parameter in parsed.parameter {
        let Some(Value::String(name)) = parameter.get("name") else {
            return Err(ApiError::invalid("every Parameters.parameter needs a name"));
        };
        let value = parameter
            .iter()
            .find(|(key, _)| key.starts_with("value"))
            .and_then(|(kind, value)| match (kind.as_str(), value) {
                ("valueReference", Value::Object(reference)) => reference
                    .get("reference")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                (_, Value::String(text)) => Some(text.clone()),
                (_, Value::Bool(b)) => Some(b.to_string()),
                (_, Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .ok_or_else(|| {
                ApiError::invalid_parameter(name, format!("parameter '{name}' has no usable value"))
            })?;
        pairs.push((name.clone(), value));
    }
    Ok(pairs)
}

/// The `Accept` of a kick-off is the format of its OperationOutcome: FHIR JSON.
fn check_kick_off_accept(app: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        if app.config.lenient_headers {
            return Ok(());
        }
        return Err(ApiError::invalid(
            "the kick-off needs 'Accept: application/fhir+json'",
        ));
    };
    let fits = accept.split(',').any(|item| {
        let essence = item
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        matches!(
            essence.as_str(),
            "application/fhir+json" | "application/json" | "application/json+fhir" | "*/*"
        )
    });
    if fits {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "the kick-off's Accept must be application/fhir+json, not '{accept}'"
        )))
    }
}

/// The kick-off URL as the client sent it.
fn request_url(app: &AppState, uri: &axum::http::Uri) -> String {
    let base = &app.config.base_url;
    let origin = base.strip_suffix(crate::FHIR_PATH).unwrap_or(base);
    match uri.path_and_query() {
        Some(path) => format!("{origin}{path}"),
        None => base.clone(),
    }
}

/// `[base]/$export`.
pub async fn kick_off(
    state: State<AppState>,
    grants: Option<Extension<Grants>>,
    method: Method,
    uri: OriginalUri,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    kick_off_at(
        Level::System,
        state,
        grants,
        method,
        uri,
        query,
        headers,
        body,
    )
    .await
}

/// `[base]/Patient/$export`.
pub async fn kick_off_patient(
    state: State<AppState>,
    grants: Option<Extension<Grants>>,
    method: Method,
    uri: OriginalUri,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    kick_off_at(
        Level::Patient,
        state,
        grants,
        method,
        uri,
        query,
        headers,
        body,
    )
    .await
}

/// `[base]/Group/[id]/$export`.
#[allow(clippy::too_many_arguments)]
pub async fn kick_off_group(
    state: State<AppState>,
    grants: Option<Extension<Grants>>,
    Path(id): Path<String>,
    method: Method,
    uri: OriginalUri,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let id = crate::rest::valid_id(&id)?.to_owned();
    kick_off_at(
        Level::Group(id),
        state,
        grants,
        method,
        uri,
        query,
        headers,
        body,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn kick_off_at(
    level: Level,
    State(app): State<AppState>,
    grants: Option<Extension<Grants>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let prefer = prefer(&headers);
    if !prefer.respond_async {
        return Err(ApiError::invalid(
            "$export needs 'Prefer: respond-async' (the result is delivered asynchronously)",
        ));
    }
    check_kick_off_accept(&app, &headers)?;
    let mut params = parse_query(query.as_deref());
    if level != Level::System && params.iter().any(|(k, _)| k == "patient") {
        return Err(ApiError::invalid_parameter(
            "patient",
            "the patient parameter is accepted in a POST Parameters body only",
        ));
    }
    if method == Method::POST {
        let body = read_body(&headers, body, app.config.max_body_bytes).await?;
        if !body.iter().all(u8::is_ascii_whitespace) {
            require_json_body(&headers)?;
        }
        params.extend(parameters_body(&body)?);
    }
    let mut request = ExportRequest::parse(
        level,
        &params,
        prefer.lenient,
        request_url(&app, &uri),
        now_micros(),
    )
    .map_err(|e| ApiError::invalid_parameter(&e.parameter, e.message))?;
    // With authorization on, only what the token covers (403 for more).
    let grants = grants.map(|Extension(grants)| grants);
    auth::restrict_export(grants.as_ref(), &mut request)?;
    let client = grants.as_ref().map_or(ANONYMOUS, |g| g.client.as_str());
    let job_id = app
        .engine
        .kick_off(request, client)
        .await
        .map_err(|e| match e {
            KickOffError::Parameter(e) => ApiError::invalid_parameter(&e.parameter, e.message),
            KickOffError::NotFound(message) => ApiError::NotFound(message),
            KickOffError::TooMany { .. } => ApiError::TooManyRequests {
                message: format!("{e}; wait for one to finish or cancel one"),
                retry_after: 30,
            },
            KickOffError::Store(e) => e.into(),
            KickOffError::Io(e) => ApiError::Internal(e.to_string()),
            KickOffError::Output(e) => ApiError::Internal(e.to_string()),
        })?;
    auth::audit("export.kick_off", grants.as_ref(), &job_id, "202");
    let location = hearth_export::manifest::status_url(&app.config.base_url, &job_id, 1);
    let mut response = StatusCode::ACCEPTED.into_response();
    response.headers_mut().insert(
        header::CONTENT_LOCATION,
        HeaderValue::from_str(&location).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    Ok(response)
}

/// The parameters of a status request: the job id, and the raw `_page`.
async fn status_params(
    app: &AppState,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(String, Option<String>)> {
    let mut params = parse_query(query);
    if *method == Method::POST {
        let body = read_body(headers, body, app.config.max_body_bytes).await?;
        params.extend(parameters_body(&body)?);
    }
    let last = |name: &str| {
        params
            .iter()
            .rfind(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    let id = last("_jobId").filter(|v| !v.is_empty()).ok_or_else(|| {
        ApiError::invalid_parameter("_jobId", "$export-poll-status needs a _jobId")
    })?;
    Ok((id, last("_page")))
}

/// `_page`: which manifest page of a job with partial manifests (the first without it).
fn manifest_page(raw: Option<&str>) -> ApiResult<u64> {
    let Some(raw) = raw else { return Ok(1) };
    raw.parse::<u64>()
        .ok()
        .filter(|page| *page >= 1)
        .ok_or_else(|| {
            ApiError::invalid_parameter(
                "_page",
                format!("_page must be a manifest page number from 1, not '{raw}'"),
            )
        })
}

fn unknown_job(id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "export job '{id}' does not exist: it was never started, was cancelled or deleted, or has expired"
    ))
}

pub async fn poll_status(
    State(app): State<AppState>,
    grants: Option<Extension<Grants>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (id, page) = status_params(&app, &method, query.as_deref(), &headers, body).await?;
    // Another client's job answers as if it did not exist.
    let grants = grants.map(|Extension(grants)| grants);
    if !auth::owns_job(&app, grants.as_ref(), &id).await? {
        return Err(unknown_job(&id));
    }
    if method == Method::DELETE {
        app.polls.forget(&id);
        let outcome = app.engine.cancel(&id).await?;
        let answered = match outcome {
            CancelOutcome::Cancelled => "202",
            _ => "404",
        };
        auth::audit("export.cancel", grants.as_ref(), &id, answered);
        return match outcome {
            CancelOutcome::Cancelled => Ok(fhir_json(
                StatusCode::ACCEPTED,
                operation_outcome(&[Issue::information(format!(
                    "export job {id} was cancelled and its files removed"
                ))]),
            )),
            CancelOutcome::AlreadyFinished => Err(ApiError::NotFound(format!(
                "export job {id} had already completed; nothing to cancel (its files were removed)"
            ))),
            CancelOutcome::NotFound => Err(unknown_job(&id)),
        };
    }
    let page = manifest_page(page.as_deref())?;
    app.polls.check(&id)?;
    let view = app.engine.status(&id, page).await?;
    match &view {
        JobView::InProgress { retry_after, .. } => app.polls.told(&id, *retry_after),
        JobView::Completed { .. } => auth::audit("export.status", grants.as_ref(), &id, "200"),
        JobView::Failed { .. } => auth::audit("export.status", grants.as_ref(), &id, "500"),
        // A client given a partial manifest follows its `next` link at once: no wait to pace.
        JobView::Partial { .. } | JobView::NotFound | JobView::NoSuchPage { .. } => {}
    }
    if !matches!(view, JobView::InProgress { .. }) {
        app.polls.forget(&id);
    }
    match view {
        JobView::InProgress {
            progress,
            retry_after,
        } => {
            let mut response = StatusCode::ACCEPTED.into_response();
            let headers = response.headers_mut();
            if let Ok(progress) = HeaderValue::from_str(&progress) {
                headers.insert("x-progress", progress);
            }
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            Ok(response)
        }
        JobView::Partial { manifest, progress } => {
            let mut response = (StatusCode::ACCEPTED, manifest).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Ok(progress) = HeaderValue::from_str(&progress) {
                headers.insert("x-progress", progress);
            }
            Ok(response)
        }
        JobView::Completed {
            manifest,
            expires_at,
        } => {
            let mut response = (StatusCode::OK, manifest).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::EXPIRES, http_date(expires_at));
            Ok(response)
        }
        JobView::Failed { message } => Err(ApiError::JobFailed(message)),
        JobView::NotFound => Err(unknown_job(&id)),
        JobView::NoSuchPage { pages } => Err(ApiError::NotFound(format!(
            "export job {id} has no manifest page {page}: it has {pages}"
        ))),
    }
}

/// The one byte range of a `Range` header, resolved against the file length.
fn byte_range(headers: &HeaderMap, len: u64, etag: &str) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok())
        && if_range != etag
    {
        return Ok(None);
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: answer with the whole file, which HTTP allows.
        return Ok(None);
    }
    let unsatisfiable = || ApiError::RangeNotSatisfiable { len };
    let (start, end) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let suffix: u64 = suffix.parse().map_err(|_| unsatisfiable())?;
            if suffix == 0 {
                return Err(unsatisfiable());
            }
            (len.saturating_sub(suffix), len.saturating_sub(1))
        }
        (start, "") => (
            start.parse().map_err(|_| unsatisfiable())?,
            len.saturating_sub(1),
        ),
        (start, end) => (
            start.parse().map_err(|_| unsatisfiable())?,
            end.parse::<u64>()
                .map_err(|_| unsatisfiable())?
                .min(len.saturating_sub(1)),
        ),
    };
    if len == 0 || start > end || start >= len {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

fn wants_binary_resource(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            let first = accept
                .split(',')
                .next()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim();
            first.eq_ignore_ascii_case("application/fhir+json")
                || first.eq_ignore_ascii_case("application/json")
        })
}

/// How file bytes are turned into the response body.
#[derive(Clone, Copy)]
enum Encoding {
    Identity,
    Gzip,
    /// The FHIR `Binary` resource around the base64 of the file.
    BinaryJson,
}

const CHUNK: usize = 3 * 64 * 1024;

/// Streams `len` bytes of `path` from `start`, transformed on a blocking thread; never more
/// than a few chunks in memory.
fn stream_file(
    path: std::path::PathBuf,
    start: u64,
    len: u64,
    encoding: Encoding,
    file_id: String,
) -> Body {
    stream_encoded(
        move || {
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(start))?;
            Ok(file)
        },
        len,
        encoding,
        file_id,
    )
}

/// Streams `len` bytes of what `open` returns, transformed on a blocking thread.
fn stream_encoded<R, F>(open: F, len: u64, encoding: Encoding, file_id: String) -> Body
where
    R: Read,
    F: FnOnce() -> std::io::Result<R> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let send = |chunk: std::io::Result<Bytes>| sender.blocking_send(chunk).is_ok();
        let result = (|| -> std::io::Result<()> {
            let mut file = open()?;
            let mut remaining = len;
            let mut buffer = vec![0u8; CHUNK];
            let mut gzip = matches!(encoding, Encoding::Gzip).then(|| {
                flate2::write::GzEncoder::new(
                    Vec::with_capacity(CHUNK),
                    flate2::Compression::fast(),
                )
            });
            if matches!(encoding, Encoding::BinaryJson) {
                let head = format!(
                    r#"{{"resourceType":"Binary","id":"{file_id}","contentType":"application/fhir+ndjson","data":""#
                );
                if !send(Ok(Bytes::from(head))) {
                    return Ok(());
                }
            }
            while remaining > 0 {
                let want = (remaining as usize).min(CHUNK);
                // Fill whole chunks so base64 pieces (3-byte groups) concatenate correctly.
                let mut filled = 0;
                while filled < want {
                    let n = file.read(&mut buffer[filled..want])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                remaining -= filled as u64;
                let piece = &buffer[..filled];
                let out = match (&encoding, gzip.as_mut()) {
                    (Encoding::Gzip, Some(encoder)) => {
                        use std::io::Write;
                        encoder.write_all(piece)?;
                        Bytes::from(std::mem::take(encoder.get_mut()))
                    }
                    (Encoding::BinaryJson, _) => {
                        Bytes::from(base64::engine::general_purpose::STANDARD.encode(piece))
                    }
                    _ => Bytes::copy_from_slice(piece),
                };
                if !out.is_empty() && !send(Ok(out)) {
                    return Ok(());
                }
            }
            if let Some(encoder) = gzip {
                let tail = encoder.finish()?;
                send(Ok(Bytes::from(tail)));
            }
            if matches!(encoding, Encoding::BinaryJson) {
                send(Ok(Bytes::from_static(b"\"}")));
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = sender.blocking_send(Err(e));
        }
    });
    Body::from_stream(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|chunk| (chunk, receiver)) },
    ))
}

/// `GET [base]/Binary/<id>`: an export file, or else a stored Binary resource.
pub async fn binary(
    State(app): State<AppState>,
    grants: Option<Extension<Grants>>,
    Path(id): Path<String>,
    raw_query: RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let grants = grants.map(|Extension(grants)| grants);
    // Another client's file is treated as no file at all.
    let file = app
        .engine
        .file(&id)
        .await?
        .filter(|file| auth::owns_file(grants.as_ref(), file));
    match file {
        Some(file) => {
            auth::check_file(grants.as_ref(), &file)?;
            let job = file.job.id.clone();
            let result = download(file, &headers).await;
            let status = result.as_ref().map_or_else(|e| e.status(), |r| r.status());
            auth::audit("export.download", grants.as_ref(), &job, status.as_str());
            result
        }
        None => {
            auth::require_read(grants.as_ref(), "Binary")?;
            crate::rest::read(
                State(app),
                Path(("Binary".to_owned(), id)),
                raw_query,
                headers,
                grants.map(Extension),
            )
            .await
        }
    }
}

async fn download(file: DownloadableFile, headers: &HeaderMap) -> ApiResult<Response> {
    let gone = || ApiError::NotFound(format!("file {} is no longer available", file.record.id));
    let len = match &file.source {
        FileSource::Local(path) => match tokio::fs::metadata(path).await {
            Ok(meta) => meta.len(),
            Err(_) => return Err(gone()),
        },
        FileSource::Remote(remote) => remote.size(),
    };
    let etag = format!("\"{}\"", file.record.id);
    let binary = wants_binary_resource(headers);
    let range = if binary {
        None
    } else {
        byte_range(headers, len, &etag)?
    };
    let encoding = if binary {
        Encoding::BinaryJson
    } else if range.is_none() && accepts_gzip(headers) {
        Encoding::Gzip
    } else {
        Encoding::Identity
    };
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let body_len = if len == 0 { 0 } else { end - start + 1 };
    let body = match &file.source {
        FileSource::Local(path) => stream_file(
            path.clone(),
            start,
            body_len,
            encoding,
            file.record.id.clone(),
        ),
        // A ranged GET, so a resumed download fetches only what is missing.
        FileSource::Remote(remote) => {
            let reader = remote.open(start, body_len).await.map_err(|e| match e {
                OutputError::NotFound(_) => gone(),
                e => ApiError::Internal(format!("cannot read file {}: {e}", file.record.id)),
            })?;
            stream_encoded(
                move || Ok(reader),
                body_len,
                encoding,
                file.record.id.clone(),
            )
        }
    };
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut response = (status, body).into_response();
    let out = response.headers_mut();
    let content_type = if binary {
        crate::http_util::FHIR_JSON
    } else {
        "application/fhir+ndjson"
    };
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(
        header::VARY,
        HeaderValue::from_static("accept, accept-encoding"),
    );
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, etag);
    }
    if let Some(expires) = file.job.expires_at {
        out.insert(header::EXPIRES, http_date(expires));
    }
    match encoding {
        Encoding::Gzip => {
            out.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        Encoding::Identity => {
            out.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
            if range.is_some()
                && let Ok(value) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
            {
                out.insert(header::CONTENT_RANGE, value);
            }
        }
        Encoding::BinaryJson => {}
    }
    Ok(response)
}
