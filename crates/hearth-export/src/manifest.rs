//! The completion manifest, assembled once when the last unit commits and stored with the job:
//! status requests only read it.

use hearth_fhir::instant::format_instant;
use hearth_store::jobs::{FileRecord, JobRecord};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::request::ExportRequest;

/// The manifest's `extension` key that carries `_exportId` (as HAPI FHIR names it).
pub const EXPORT_ID_EXTENSION: &str = "https://hapifhir.org/NamingSystem/bulk-export-identifier";

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "transactionTime")]
    transaction_time: String,
    request: &'a str,
    #[serde(rename = "requiresAccessToken")]
    requires_access_token: bool,
    output: Vec<Item>,
    deleted: Vec<Item>,
    error: Vec<Item>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    extension: Map<String, Value>,
}

#[derive(Serialize)]
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
        request: &job.request_url,
        requires_access_token,
        output: items("output"),
        deleted: items("deleted"),
        error: items("error"),
        extension,
    };
    serde_json::to_string(&manifest).unwrap_or_default()
}
