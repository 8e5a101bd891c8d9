//! The HTTP edge's one error type: every failure becomes an `OperationOutcome` here, and only
//! here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hearth_fhir::envelope::EnvelopeError;
use hearth_fhir::outcome::{Issue, operation_outcome};
use hearth_store::{StoreError, WriteError};

use crate::http_util::FHIR_JSON;

/// A request that could not be served, with the status the client gets.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `400`: the request itself is wrong. `expression` names the parameter or element.
    #[error("{diagnostics}")]
    Invalid {
        diagnostics: String,
        expression: Option<String>,
    },
    /// `400`: something valid that Hearth does not do (never silently ignored).
    #[error("{0}")]
    NotSupported(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: u64 },
    /// `401`: no valid bearer token. `challenge` is the `WWW-Authenticate` value.
    #[error("{message}")]
    Unauthorized { message: String, challenge: String },
    /// `403`: the token is valid but does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// `408`: the client took too long to send its request.
    #[error("{0}")]
    RequestTimeout(String),
    /// `416`: a `Range` outside the file.
    #[error("the requested range is not within the {len} bytes of the file")]
    RangeNotSatisfiable { len: u64 },
    /// `500`: an export job failed; the message is the job's own.
    #[error("the export failed: {0}")]
    JobFailed(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(diagnostics: impl Into<String>) -> Self {
        Self::Invalid {
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    /// A bad value of the named parameter.
    pub fn invalid_parameter(parameter: &str, diagnostics: impl Into<String>) -> Self {
        Self::Invalid {
            diagnostics: diagnostics.into(),
            expression: Some(parameter.to_owned()),
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } | Self::NotSupported(_) | Self::Envelope(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Gone(_) => StatusCode::GONE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::JobFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Store(StoreError::Entry { error, .. }) => write_error_status(error),
            Self::Store(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn issue(&self) -> Issue {
        let code = match self {
            Self::Invalid { .. } | Self::Envelope(_) => "invalid",
            Self::NotSupported(_) | Self::UnsupportedMediaType(_) | Self::NotAcceptable(_) => {
                "not-supported"
            }
            Self::MethodNotAllowed(_) => "not-supported",
            Self::NotFound(_) => "not-found",
            Self::Gone(_) => "deleted",
            Self::PreconditionFailed(_) => "conflict",
            Self::PayloadTooLarge { .. } => "too-long",
            Self::TooManyRequests { .. } => "throttled",
            Self::Unauthorized { .. } => "login",
            Self::Forbidden(_) => "forbidden",
            Self::RequestTimeout(_) => "timeout",
            Self::RangeNotSatisfiable { .. } => "invalid",
            Self::JobFailed(_) => "exception",
            Self::Store(StoreError::Entry { .. }) => "conflict",
            Self::Store(_) | Self::Internal(_) => "exception",
        };
        let diagnostics = match self {
            // Internal details go to the log, not to the client.
            Self::Store(StoreError::Entry { .. }) => self.to_string(),
            Self::Store(_) | Self::Internal(_) => "internal server error".to_owned(),
            _ => self.to_string(),
        };
        let issue = Issue::error(code, diagnostics);
        match self {
            Self::Invalid {
                expression: Some(expression),
                ..
            } => issue.at(expression.clone()),
            Self::Store(StoreError::Entry { index, .. }) => {
                issue.at(format!("Bundle.entry[{index}]"))
            }
            _ => issue,
        }
    }
}

/// The status of one refused write, for bundle entries and single interactions alike.
pub fn write_error_status(error: &WriteError) -> StatusCode {
    match error {
        WriteError::VersionConflict { .. } => StatusCode::PRECONDITION_FAILED,
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, operation_outcome(&[self.issue()])).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        match self {
            Self::TooManyRequests { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            Self::Unauthorized { challenge, .. } => {
                if let Ok(value) = HeaderValue::from_str(&challenge) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            Self::RequestTimeout(_) => {
                // The rest of a slow body is not worth waiting for.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::RangeNotSatisfiable { len } => {
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    headers.insert(header::CONTENT_RANGE, value);
                }
            }
            _ => {}
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
