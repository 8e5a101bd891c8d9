//! The completion manifest, assembled once when the last unit commits and stored with the job:
//! status requests only read it.

use hearth_fhir::instant::format_instant;
use hearth_store::jobs::{FileRecord, JobRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::request::ExportRequest;

/// The manifest's `extension` key that carries `_exportId` (as HAPI FHIR names it).
pub const EXPORT_ID_EXTENSION: &str = "https://hapifhir.org/NamingSystem/bulk-export-identifier";

#[derive(Serialize, Deserialize)]
struct Manifest {
    #[serde(rename = "transactionTime")]
    transaction_time: String,
    request: String,
    #[serde(rename = "requiresAccessToken")]
    requires_access_token: bool,
    output: Vec<Item>,
    deleted: Vec<Item>,
    error: Vec<Item>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    extension: Map<String, Value>,
}

#[derive(Serialize, Deserialize)]
struct Item {
    #[serde(rename = "type")]
    resource_type: String,
    url: String,
    count: u64,
}

/// The URL a file is downloaded from.
pub fn file_url(base_url: &str, file_id: &str) -> String {
    format!("{base_url}/Binary/{file_id}")
}

pub fn build(
    job: &JobRecord,
    request: &ExportRequest,
    files: &[FileRecord],
    base_url: &str,
    requires_access_token: bool,
) -> String {
    let items = |kind: &str| -> Vec<Item> {
        files
            .iter()
            .filter(|f| f.kind == kind && f.count > 0)
            .map(|f| Item {
                resource_type: f.resource_type.clone(),
                url: file_url(base_url, &f.id),
                count: f.count,
            })
            .collect()
    };
    let mut extension = Map::new();
    if let Some(export_id) = &request.export_id {
        extension.insert(
            EXPORT_ID_EXTENSION.to_owned(),
            Value::String(export_id.clone()),
        );
    }
    let manifest = Manifest {
        transaction_time: format_instant(job.snapshot.transaction_time),
        request: job.request_url.clone(),
        requires_access_token,
        output: items("output"),
        deleted: items("deleted"),
        error: items("error"),
        extension,
    };
    serde_json::to_string(&manifest).unwrap_or_default()
}

/// A stored manifest with other file URLs (`url_for` maps each stored URL, `None` keeps it) and
/// `requiresAccessToken` set as given.
pub fn with_urls(
    manifest: &str,
    requires_access_token: bool,
    mut url_for: impl FnMut(&str) -> Option<String>,
) -> Result<String, serde_json::Error> {
    let mut parsed: Manifest = serde_json::from_str(manifest)?;
    parsed.requires_access_token = requires_access_token;
    for item in parsed
        .output
        .iter_mut()
        .chain(parsed.deleted.iter_mut())
        .chain(parsed.error.iter_mut())
    {
        if let Some(url) = url_for(&item.url) {
            item.url = url;
        }
    }
    serde_json::to_string(&parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_and_everything_else_kept() {
        let stored = r#"{"transactionTime":"2026-01-01T00:00:00Z","request":"http://h/fhir/$export","requiresAccessToken":true,"output":[{"type":"Patient","url":"http://h/fhir/Binary/a","count":2}],"deleted":[],"error":[{"type":"OperationOutcome","url":"http://h/fhir/Binary/b","count":1}],"extension":{"https://hapifhir.org/NamingSystem/bulk-export-identifier":"x"}}"#;
        let rewritten = with_urls(stored, false, |url| {
            url.strip_prefix("http://h/fhir/Binary/")
                .map(|id| format!("https://bucket/{id}?sig=1"))
        })
        .unwrap();
        assert_eq!(
            rewritten,
            stored
                .replace("http://h/fhir/Binary/a", "https://bucket/a?sig=1")
                .replace("http://h/fhir/Binary/b", "https://bucket/b?sig=1")
                .replace(
                    r#""requiresAccessToken":true"#,
                    r#""requiresAccessToken":false"#
                )
        );
    }
}
