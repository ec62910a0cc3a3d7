//! The one place where control errors become HTTP responses.
//!
//! Every failure of the local API, whether it comes from the storage engine, from validating a
//! request, or from a malformed body, is an [`ApiError`]: a stable [`ErrorKind`] and a message.
//! [`status_for`] is the only mapping from kinds to HTTP statuses in the crate; the body is
//! always `{"code": "<kind code>", "message": "..."}` ([`ErrorBody`]).

use ::api::{ControlError, ErrorKind};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use ::api::http::ErrorBody;

/// An error answer of the local API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    kind: ErrorKind,
    message: String,
}

impl ApiError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// An `invalid_argument` error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        Self::new(e.kind(), e.full_message())
    }
}

/// The HTTP status for an error kind. This is the crate's only such mapping.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        // `ErrorKind` is non-exhaustive: a kind added later is an internal error until it is
        // given its own status here.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_for(self.kind);
        if status.is_server_error() {
            tracing::warn!(code = self.kind.code(), message = %self.message, "API request failed");
        } else {
            tracing::debug!(code = self.kind.code(), message = %self.message, "API request refused");
        }
        let body = ErrorBody {
            code: self.kind.code().to_owned(),
            message: self.message,
        };
        (status, Json(body)).into_response()
    }
}

/// The answer to a known path asked with a method it does not serve: `405`, in the usual
/// error shape with code `invalid_argument` (there is no error kind for a wrong method).
pub fn method_not_allowed(method: &Method, path: &str) -> Response {
    let mut response =
        ApiError::invalid(format!("{path} does not accept {method}")).into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status() {
        let cases = [
            (ErrorKind::InvalidArgument, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::ResourceExhausted, 507),
            (ErrorKind::FailedPrecondition, 412),
            (ErrorKind::Unimplemented, 501),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in cases {
            assert_eq!(status_for(kind).as_u16(), status, "{kind}");
        }
    }
}
