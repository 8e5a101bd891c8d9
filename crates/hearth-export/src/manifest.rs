//! The completion manifest, assembled once when the last unit commits and stored with the job:
//! status requests only read it.

use std::collections::HashMap;

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
    #[serde(
        rename = "outputOrganizedBy",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    output_organized_by: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    extension: Map<String, Value>,
}

#[derive(Serialize, Deserialize)]
struct Item {
    /// Absent from the `output` of organized output, whose files hold blocks of many types.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    resource_type: Option<String>,
    url: String,
    /// Lines: resources, and the block headers of organized output.
    count: u64,
    #[serde(
        rename = "continuesInFile",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    continues_in_file: Option<String>,
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
    let organized = request.organize_output_by.is_some();
    // A block that goes on continues in its unit's next part.
    let parts: HashMap<(i64, i64), &str> = files
        .iter()
        .filter(|f| f.kind == "output")
        .map(|f| ((f.unit_no, f.part), f.id.as_str()))
        .collect();
    let items = |kind: &str| -> Vec<Item> {
        files
            .iter()
            .filter(|f| f.kind == kind && f.count > 0)
            .map(|f| Item {
                resource_type: (!organized || kind != "output").then(|| f.resource_type.clone()),
                url: file_url(base_url, &f.id),
                count: f.count,
                continues_in_file: f
                    .continues
                    .then(|| parts.get(&(f.unit_no, f.part + 1)))
                    .flatten()
                    .map(|next| file_url(base_url, next)),
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
        output_organized_by: request.organize_output_by.clone(),
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
        if let Some(next) = &item.continues_in_file
            && let Some(url) = url_for(next)
        {
            item.continues_in_file = Some(url);
        }
    }
    serde_json::to_string(&parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organized_output_has_no_types_and_links_continued_files() {
        let stored = r#"{"transactionTime":"2026-01-01T00:00:00Z","request":"http://h/fhir/$export?organizeOutputBy=Patient","requiresAccessToken":true,"output":[{"url":"http://h/fhir/Binary/a","count":5,"continuesInFile":"http://h/fhir/Binary/b"},{"url":"http://h/fhir/Binary/b","count":2}],"deleted":[],"error":[],"outputOrganizedBy":"Patient"}"#;
        let rewritten = with_urls(stored, true, |url| {
            url.strip_prefix("http://h/fhir/Binary/")
                .map(|id| format!("https://bucket/{id}"))
        })
        .unwrap();
        assert_eq!(
            rewritten,
            stored.replace("http://h/fhir/Binary/", "https://bucket/")
        );
    }

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
