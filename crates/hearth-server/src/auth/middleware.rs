//! The check every request passes when authorization is on: a valid bearer token (`401` with an
//! OperationOutcome and `WWW-Authenticate` otherwise), then the interaction's permission
//! (`403`). The verified [`Grants`] ride along in the request's extensions for the export
//! handlers, which check what only they can know (job owners, file types).
//!
//! Rules by interaction:
//! - open: `metadata`, `.well-known/smart-configuration`, the token endpoint;
//! - bulk export (`$export`, `$export-poll-status`, export files at `Binary/<id>`): any valid
//!   token here, the handlers decide;
//! - read, vread, history: `r` on the type; search: `s` on the type, and on every type when the
//!   search reaches other types (`_include`, `_revinclude`, `_has`, chained parameters);
//! - everything that writes: `403`, since Hearth never grants write scopes.
//!
//! A type reached only through granular scopes passes here; the handlers narrow what it
//! returns to the resources the scopes' filters select.

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hearth_fhir::resource_type::canonical_resource_type;

use super::grants::Grants;
use super::{audit_failure, short};
use crate::AppState;
use crate::error::ApiError;

/// Paths under the FHIR base that need no token.
const OPEN: &[&str] = &[
    "/metadata",
    "/.well-known/smart-configuration",
    "/auth/token",
];

pub async fn enforce(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(auth) = app.auth.clone() else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(crate::FHIR_PATH) else {
        // Outside FHIR there is nothing but the 404 fallback.
        return next.run(request).await;
    };
    if OPEN.contains(&rest) {
        return next.run(request).await;
    }
    let grants = match auth.bearer(request.headers()).await {
        Ok(grants) => grants,
        Err(error) => {
            audit_failure(
                "token_rejected",
                None,
                "401",
                &format!("{} {}: {error}", request.method(), short(&path)),
            );
            return ApiError::from(error).into_response();
        }
    };
    if let Err(message) = permitted(&grants, request.method(), rest, request.uri().query()) {
        audit_failure("forbidden", Some(&grants.client), "403", &message);
        return ApiError::Forbidden(message).into_response();
    }
    request.extensions_mut().insert(grants);
    next.run(request).await
}

/// Whether `grants` allow `method` on `path` (below the FHIR base); the refusal says why.
pub fn permitted(
    grants: &Grants,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<(), String> {
    // The router decodes percent-escapes in path captures (`Pat%69ent` reaches the Patient
    // handlers), so the rules must judge the decoded segments.
    let decoded: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    if segments.iter().any(|s| s.starts_with("$export")) {
        return Ok(());
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Err(format!(
            "{method} is not allowed with authorization on: access tokens grant read and search only"
        ));
    }
    match segments.as_slice() {
        // An export file or a Binary resource: the download handler decides.
        ["Binary", _] => Ok(()),
        [type_name] => {
            need(grants, type_name, "search", |a| a.search)?;
            if reaches_other_types(query) && !grants.access_all().search {
                return Err(format!(
                    "searching {type_name} with _include, _revinclude, _has or chained parameters needs search access to every type"
                ));
            }
            Ok(())
        }
        [type_name, _] | [type_name, _, "_history"] | [type_name, _, "_history", _] => {
            need(grants, type_name, "read", |a| a.read)
        }
        // No such interaction: the router answers 404.
        _ => Ok(()),
    }
}

fn need(
    grants: &Grants,
    type_name: &str,
    verb: &str,
    has: impl Fn(super::scopes::Access) -> bool,
) -> Result<(), String> {
    // Unknown types are left to the handlers, which answer 404.
    let Some(resource_type) = canonical_resource_type(type_name) else {
        return Ok(());
    };
    if has(grants.access(resource_type)) {
        Ok(())
    } else {
        Err(format!(
            "the access token does not allow {verb} of {resource_type}"
        ))
    }
}

/// `%XX` escapes decoded (invalid ones kept as they are), as the router decodes captures.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a search's parameters bring in resources of other types.
fn reaches_other_types(query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    form_urlencoded::parse(query.as_bytes()).any(|(name, _)| {
        let name = name.split(':').next().unwrap_or("");
        matches!(name, "_include" | "_revinclude" | "_has") || name.contains('.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_searches_and_writes_follow_the_scopes() {
        let grants = Grants::from_scopes("c", "system/Patient.r system/Observation.s");
        let get = Method::GET;
        assert!(permitted(&grants, &get, "/Patient/1", None).is_ok());
        assert!(permitted(&grants, &get, "/Patient/1/_history/2", None).is_ok());
        assert!(permitted(&grants, &get, "/Patient", None).is_err());
        assert!(permitted(&grants, &get, "/Observation", Some("_count=1")).is_ok());
        assert!(permitted(&grants, &get, "/Observation/1", None).is_err());
        assert!(
            permitted(
                &grants,
                &get,
                "/Observation",
                Some("_include=Observation:subject")
            )
            .is_err()
        );
        assert!(permitted(&grants, &get, "/Observation", Some("subject.name=x")).is_err());
        assert!(permitted(&grants, &get, "/Condition/1", None).is_err());
        assert!(permitted(&grants, &Method::POST, "/Patient", None).is_err());
        assert!(permitted(&grants, &Method::PUT, "/Patient/1", None).is_err());
        assert!(permitted(&grants, &Method::POST, "/", None).is_err());
        assert!(permitted(&grants, &Method::POST, "/$export", None).is_ok());
        assert!(permitted(&grants, &Method::DELETE, "/$export-poll-status", None).is_ok());
        assert!(permitted(&grants, &Method::POST, "/Group/g/$export", None).is_ok());
        assert!(permitted(&grants, &get, "/Binary/x", None).is_ok());
        assert!(permitted(&grants, &get, "/NoSuchType/1", None).is_ok());
        // Escaped names are judged as the router will see them.
        assert!(permitted(&grants, &get, "/Observ%61tion/1", None).is_err());
        assert!(permitted(&grants, &get, "/Pat%69ent/1", None).is_ok());
        assert!(permitted(&grants, &Method::POST, "/%24export", None).is_ok());
        let all = Grants::from_scopes("c", "system/*.rs");
        assert!(
            permitted(
                &all,
                &get,
                "/Observation",
                Some("_revinclude=Provenance:target")
            )
            .is_ok()
        );
    }
}
