//! `OperationOutcome`: how every error (and some good news) is told to a FHIR client.

use serde::Serialize;

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

/// One `OperationOutcome.issue`. `code` is from the FHIR IssueType value set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    pub severity: Severity,
    pub code: &'static str,
    pub diagnostics: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expression: Vec<String>,
}

impl Issue {
    pub fn new(severity: Severity, code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            severity,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, diagnostics)
    }

    pub fn information(diagnostics: impl Into<String>) -> Self {
        Self::new(Severity::Information, "informational", diagnostics)
    }

    /// Names the element or parameter the issue is about.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression.push(expression.into());
        self
    }
}

#[derive(Serialize)]
struct OperationOutcome<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    issue: &'a [Issue],
}

/// Serialises issues as a compact `OperationOutcome` resource.
pub fn operation_outcome(issues: &[Issue]) -> Vec<u8> {
    serde_json::to_vec(&OperationOutcome {
        resource_type: "OperationOutcome",
        issue: issues,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_as_fhir() {
        let json = operation_outcome(&[Issue::error("invalid", "bad _type").at("_type")]);
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"bad _type","expression":["_type"]}]}"#
        );
    }
}
