//! The completion manifest, assembled once when the last unit commits and stored with the job:
//! status requests only read it.
//!
//! With `allowPartialManifests` a job's manifest comes in pages instead, each listing the files
//! of a fixed range of unit numbers and linking to the next. A page depends only on the plan
//! and on committed units, whose files never change, so it is built on request by whichever
//! process answers, and reads the same every time.

use std::collections::HashMap;
use std::ops::Range;

use hearth_fhir::instant::format_instant;
use hearth_store::jobs::{FileRecord, JOB_LEVEL_UNIT, JobRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::request::ManifestSettings;

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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    link: Vec<Link>,
}

#[derive(Serialize, Deserialize)]
struct Link {
    relation: String,
    url: String,
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

/// Units per manifest page of a job with partial manifests. Small, so a client gets files early;
/// fixed, so every process pages a job alike.
pub const UNITS_PER_PAGE: u64 = 4;

/// The status URL of a job: its first manifest page, or page `page` (from 1).
pub fn status_url(base_url: &str, job_id: &str, page: u64) -> String {
    let first = format!("{base_url}/$export-poll-status?_jobId={job_id}");
    if page <= 1 {
        first
    } else {
        format!("{first}&_page={page}")
    }
}

/// How many manifest pages a job of `units_total` units has (one even without units).
pub fn page_count(units_total: u64) -> u64 {
    units_total.div_ceil(UNITS_PER_PAGE).max(1)
}

/// The unit numbers whose files page `page` of `pages` lists. The last page also lists the
/// job-level files ([`JOB_LEVEL_FILES`]): error reports are complete only once the job is.
pub fn page_units(page: u64, pages: u64) -> Range<i64> {
    let start = (page.saturating_sub(1) * UNITS_PER_PAGE) as i64;
    if page >= pages {
        start..i64::MAX
    } else {
        start..start + UNITS_PER_PAGE as i64
    }
}

/// The unit numbers of files that belong to the job as a whole.
pub const JOB_LEVEL_FILES: Range<i64> = JOB_LEVEL_UNIT..0;

/// A manifest of `files`, linking to `next` (the next page's URL) when given.
pub fn build(
    job: &JobRecord,
    settings: &ManifestSettings,
    files: &[FileRecord],
    base_url: &str,
    requires_access_token: bool,
    next: Option<String>,
) -> String {
    let organized = settings.organize_output_by.is_some();
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
    if let Some(export_id) = &settings.export_id {
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
        output_organized_by: settings.organize_output_by.clone(),
        extension,
        link: next
            .map(|url| {
                vec![Link {
                    relation: "next".into(),
                    url,
                }]
            })
            .unwrap_or_default(),
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
    fn pages_cover_every_unit_once_in_fixed_ranges() {
        assert_eq!(page_count(0), 1);
        assert_eq!(page_count(4), 1);
        assert_eq!(page_count(9), 3);
        assert_eq!(page_units(1, 3), 0..4);
        assert_eq!(page_units(2, 3), 4..8);
        assert_eq!(page_units(3, 3), 8..i64::MAX);
        assert_eq!(page_units(1, 1), 0..i64::MAX);
        assert_eq!(
            status_url("http://h/fhir", "j", 1),
            "http://h/fhir/$export-poll-status?_jobId=j"
        );
        assert_eq!(
            status_url("http://h/fhir", "j", 2),
            "http://h/fhir/$export-poll-status?_jobId=j&_page=2"
        );
    }

    #[test]
    fn a_page_keeps_its_next_link_when_its_urls_are_rewritten() {
        let stored = r#"{"transactionTime":"2026-01-01T00:00:00Z","request":"http://h/fhir/$export","requiresAccessToken":false,"output":[{"type":"Patient","url":"http://h/fhir/Binary/a","count":2}],"deleted":[],"error":[],"link":[{"relation":"next","url":"http://h/fhir/$export-poll-status?_jobId=j&_page=2"}]}"#;
        let rewritten =
            with_urls(stored, false, |_| Some("https://bucket/a?sig=1".into())).unwrap();
        assert_eq!(
            rewritten,
            stored.replace("http://h/fhir/Binary/a", "https://bucket/a?sig=1")
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
