//! The complete-status body (the manifest) and the local files it turns into.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A Bulk Data manifest, read leniently: STU2/STU3 shape, with STU4's `outcome` accepted for
/// `error`, and items without a `url` (inline OperationOutcomes some servers put in `error`)
/// kept only in the saved copy of the manifest.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub transaction_time: String,
    #[serde(default)]
    pub request: Option<String>,
    /// Whether file requests must carry the access token. Absent means no: a server that
    /// wants a token says so, and a token is not sent where it is not needed.
    #[serde(default)]
    pub requires_access_token: bool,
    pub output: Vec<ManifestItem>,
    #[serde(default)]
    pub deleted: Vec<ManifestItem>,
    #[serde(default, alias = "outcome")]
    pub error: Vec<ManifestItem>,
}

/// One entry of `output`, `deleted` or `error`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ManifestItem {
    #[serde(rename = "type", default)]
    pub resource_type: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub count: Option<u64>,
}

impl Manifest {
    /// Parses a manifest body; `status_url` resolves relative file URLs (the IG requires
    /// absolute ones, but a relative one is unambiguous enough to use).
    pub fn parse(body: &[u8]) -> Result<Self, Error> {
        let manifest: Manifest =
            serde_json::from_slice(body).map_err(|e| Error::Manifest(e.to_string()))?;
        if hearth_fhir::instant::parse_instant(&manifest.transaction_time).is_err() {
            return Err(Error::Manifest(format!(
                "transactionTime '{}' is not a FHIR instant",
                manifest.transaction_time
            )));
        }
        Ok(manifest)
    }

    /// The files to download, with their local paths under `dir`, in manifest order.
    pub fn plan(&self, status_url: &Url, dir: &Path) -> Result<Vec<PlannedFile>, Error> {
        let mut files = Vec::new();
        let mut numbers: HashMap<(FileKind, String), u32> = HashMap::new();
        let groups = [
            (FileKind::Output, &self.output),
            (FileKind::Deleted, &self.deleted),
            (FileKind::Error, &self.error),
        ];
        for (kind, items) in groups {
            for item in items {
                let Some(url) = &item.url else {
                    if kind == FileKind::Output {
                        return Err(Error::Manifest("an output item has no url".into()));
                    }
                    continue;
                };
                let url = status_url
                    .join(url)
                    .map_err(|e| Error::Manifest(format!("file url '{url}': {e}")))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(Error::Manifest(format!("file url '{url}' is not http(s)")));
                }
                let stem = item
                    .resource_type
                    .as_deref()
                    .map(safe_stem)
                    .unwrap_or_else(|| kind.default_stem().to_owned());
                let number = numbers.entry((kind, stem.clone())).or_insert(0);
                *number += 1;
                let name = format!("{stem}.{number}.ndjson");
                let path = match kind.subdirectory() {
                    Some(sub) => dir.join(sub).join(name),
                    None => dir.join(name),
                };
                files.push(PlannedFile {
                    index: files.len(),
                    kind,
                    resource_type: item.resource_type.clone(),
                    url,
                    count: item.count,
                    path,
                    requires_token: self.requires_access_token,
                });
            }
        }
        Ok(files)
    }
}

/// Keeps a server-given type name from becoming a path: letters, digits, `-` and `_` only.
fn safe_stem(resource_type: &str) -> String {
    let stem: String = resource_type
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    if stem.is_empty() {
        "file".to_owned()
    } else {
        stem
    }
}

/// Which list of the manifest a file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Output,
    Deleted,
    Error,
}

impl FileKind {
    /// `deleted` and `error` files go to subdirectories, so a glob of the export directory
    /// finds only resources.
    pub fn subdirectory(self) -> Option<&'static str> {
        match self {
            Self::Output => None,
            Self::Deleted => Some("deleted"),
            Self::Error => Some("error"),
        }
    }

    fn default_stem(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::Deleted => "Bundle",
            Self::Error => "OperationOutcome",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::Deleted => "deleted",
            Self::Error => "error",
        }
    }
}

/// A manifest file and where it will be saved.
#[derive(Debug, Clone)]
pub struct PlannedFile {
    /// Position in the download plan.
    pub index: usize,
    pub kind: FileKind,
    pub resource_type: Option<String>,
    pub url: Url,
    /// The manifest's `count`, checked against the lines received.
    pub count: Option<u64>,
    /// The final path; the download goes to a temporary file beside it.
    pub path: PathBuf,
    /// Whether to send the access token with the download.
    pub requires_token: bool,
}

impl PlannedFile {
    /// The file name, for progress lines.
    pub fn name(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match self.kind.subdirectory() {
            Some(sub) => format!("{sub}/{name}"),
            None => name,
        }
    }
}

/// A file saved and verified.
#[derive(Debug, Clone, Serialize)]
pub struct SavedFile {
    pub kind: FileKind,
    #[serde(rename = "type")]
    pub resource_type: Option<String>,
    pub url: String,
    pub path: PathBuf,
    /// NDJSON lines (resources) in the file.
    pub resources: u64,
    /// Size of the saved (uncompressed) file.
    pub bytes: u64,
    /// Bytes that crossed the network (compressed when the server sent gzip).
    pub wire_bytes: u64,
    /// Times the body broke off and the download was resumed (or restarted).
    pub retries: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{
        "transactionTime": "2024-05-01T10:00:00.123Z",
        "request": "http://h/fhir/$export",
        "requiresAccessToken": true,
        "output": [
            {"type": "Patient", "url": "http://h/fhir/Binary/1", "count": 2},
            {"type": "Observation", "url": "Binary/2"},
            {"type": "Patient", "url": "http://h/fhir/Binary/3", "count": 1},
            {"type": "../../etc", "url": "http://h/fhir/Binary/4"}
        ],
        "deleted": [{"type": "Bundle", "url": "http://h/fhir/Binary/5"}],
        "outcome": [
            {"type": "OperationOutcome", "url": "http://h/fhir/Binary/6"},
            {"resourceType": "OperationOutcome", "issue": []}
        ],
        "extension": {"x": 1}
    }"#;

    #[test]
    fn a_manifest_becomes_a_plan_of_safe_local_names() {
        let manifest = Manifest::parse(MANIFEST.as_bytes()).unwrap();
        let status = Url::parse("http://h/fhir/$export-poll-status?_jobId=1").unwrap();
        let plan = manifest.plan(&status, Path::new("/out")).unwrap();
        let names: Vec<String> = plan.iter().map(PlannedFile::name).collect();
        assert_eq!(
            names,
            vec![
                "Patient.1.ndjson",
                "Observation.1.ndjson",
                "Patient.2.ndjson",
                "etc.1.ndjson",
                "deleted/Bundle.1.ndjson",
                "error/OperationOutcome.1.ndjson"
            ]
        );
        assert_eq!(plan[1].url.as_str(), "http://h/fhir/Binary/2");
        assert_eq!(plan[0].count, Some(2));
        assert_eq!(plan[4].path, Path::new("/out/deleted/Bundle.1.ndjson"));
        assert!(plan.iter().all(|f| f.requires_token));
    }

    #[test]
    fn a_manifest_needs_a_transaction_time_and_output() {
        assert!(Manifest::parse(br#"{"output": []}"#).is_err());
        assert!(Manifest::parse(br#"{"transactionTime": "later", "output": []}"#).is_err());
        let minimal = Manifest::parse(
            br#"{"transactionTime": "2024-05-01T10:00:00Z", "output": [], "error": []}"#,
        )
        .unwrap();
        assert!(!minimal.requires_access_token);
        assert!(minimal.deleted.is_empty());
    }
}
