//! What can go wrong, as one enum: the CLI prints it as a one-line reason, tests match on it.

use std::path::PathBuf;

use serde::Deserialize;

/// Every failure of the client. Messages are one line and name what failed; a server's own
/// words (its OperationOutcome diagnostics) are part of the message when it sent any.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option or argument the client cannot use (a bad URL, instant or level).
    #[error("{0}")]
    Invalid(String),
    /// The server refused the kick-off.
    #[error("kick-off refused ({status}): {message}")]
    KickOffRefused { status: u16, message: String },
    /// The kick-off was accepted but the answer does not say where to poll.
    #[error("the kick-off answered {status} without a Content-Location to poll")]
    NoStatusUrl { status: u16 },
    /// The status endpoint reported that the job failed.
    #[error("the export failed ({status}): {message}")]
    JobFailed { status: u16, message: String },
    /// The status URL no longer knows the job: cancelled, deleted or expired.
    #[error("the export job is gone ({status}): {message}")]
    JobGone { status: u16, message: String },
    /// The server refused to cancel (or delete) the job.
    #[error("cancelling the export failed ({status}): {message}")]
    CancelRefused { status: u16, message: String },
    /// A request could not be sent or its answer not received, and was not retried (a
    /// kick-off is retried only when the connection could not be made, so a job is never
    /// started twice).
    #[error("{what}: {message}")]
    Network { what: String, message: String },
    /// The complete-status body is not a Bulk Data manifest.
    #[error("the manifest is not valid: {0}")]
    Manifest(String),
    /// A file could not be downloaded.
    #[error("downloading {url} failed{}: {message}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Download {
        url: String,
        status: Option<u16>,
        message: String,
    },
    /// A downloaded file has another number of resources than the manifest's `count`.
    #[error("{}: the manifest announced {expected} resources, the file has {actual}", path.display())]
    CountMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A request kept failing with transient errors (network, 429, 5xx) until the retry
    /// budget ran out.
    #[error("{what}: gave up after {attempts} attempts; last error: {last}")]
    RetriesExhausted {
        what: String,
        attempts: u32,
        last: String,
    },
    /// Getting or using an access token failed.
    #[error("authorization failed: {0}")]
    Auth(String),
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

#[derive(Deserialize)]
struct OutcomeIn {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    #[serde(default)]
    issue: Vec<IssueIn>,
}

#[derive(Deserialize)]
struct IssueIn {
    code: Option<String>,
    diagnostics: Option<String>,
    details: Option<DetailsIn>,
}

#[derive(Deserialize)]
struct DetailsIn {
    text: Option<String>,
}

/// The issue codes of an OperationOutcome body, or `None` when the body is not one.
pub(crate) fn outcome_codes(body: &[u8]) -> Option<Vec<String>> {
    let outcome: OutcomeIn = serde_json::from_slice(body).ok()?;
    if outcome.resource_type.as_deref() != Some("OperationOutcome") {
        return None;
    }
    Some(outcome.issue.into_iter().filter_map(|i| i.code).collect())
}

/// A one-line description of an error body: the OperationOutcome's diagnostics when it is one,
/// else the start of the body as text.
pub(crate) fn describe_body(body: &[u8]) -> String {
    if let Ok(outcome) = serde_json::from_slice::<OutcomeIn>(body)
        && outcome.resource_type.as_deref() == Some("OperationOutcome")
    {
        let texts: Vec<String> = outcome
            .issue
            .into_iter()
            .filter_map(|i| {
                i.diagnostics
                    .or_else(|| i.details.and_then(|d| d.text))
                    .or(i.code)
            })
            .collect();
        if !texts.is_empty() {
            return one_line(&texts.join("; "));
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = one_line(text.trim());
    if text.is_empty() {
        "(no details in the response)".to_owned()
    } else {
        text
    }
}

/// Collapses whitespace and cuts long text, so a reason fits one terminal line.
fn one_line(text: &str) -> String {
    const MAX: usize = 300;
    let mut out = String::with_capacity(text.len().min(MAX));
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_diagnostics_are_the_description() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"error","code":"invalid","diagnostics":"_type 'Foo' is not a resource type"},
            {"severity":"error","code":"invalid","details":{"text":"and a second\nline"}}]}"#;
        assert_eq!(
            describe_body(body),
            "_type 'Foo' is not a resource type; and a second line"
        );
        assert_eq!(outcome_codes(body).unwrap(), vec!["invalid", "invalid"]);
    }

    #[test]
    fn other_bodies_are_cut_to_one_line() {
        assert_eq!(
            describe_body(b"<html>\n<b>Bad gateway</b>\n</html>"),
            "<html> <b>Bad gateway</b> </html>"
        );
        assert_eq!(describe_body(b""), "(no details in the response)");
        assert!(describe_body("é".repeat(400).as_bytes()).chars().count() <= 301);
        assert!(outcome_codes(b"{\"resourceType\":\"Patient\"}").is_none());
    }
}
