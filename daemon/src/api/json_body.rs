//! The JSON request-body extractor of the local API.
//!
//! Axum's own `Json` extractor answers a bad body with a plain-text message and, for a missing
//! `Content-Type`, status 415. The local API instead answers every unreadable body with
//! `400 invalid_argument` in the usual JSON error shape, with a message that names the problem
//! (the unknown field, the missing field, the line and column of a syntax error). The
//! `Content-Type` header is not required: the body is JSON by definition of the API.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::api::error::ApiError;

/// A request body parsed as JSON into `T`; failures are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::invalid(format!("cannot read the request body: {}", e.body_text()))
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// Parse `bytes` as a JSON `T`, describing any failure for a person.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        ApiError::invalid(match e.classify() {
            Category::Data => format!("invalid request body: {e}"),
            Category::Syntax | Category::Eof | Category::Io => {
                format!("the request body is not valid JSON: {e}")
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::api::http::CreateVolumeRequest;

    fn message(body: &str) -> String {
        parse::<CreateVolumeRequest>(body.as_bytes())
            .unwrap_err()
            .message()
            .to_owned()
    }

    #[test]
    fn names_the_problem() {
        assert!(message("").contains("empty"));
        assert!(message("{\"name\": ").contains("not valid JSON"));
        assert!(
            message(r#"{"name": "a", "size": 1, "sizee": 2}"#).contains("unknown field `sizee`")
        );
        assert!(message(r#"{"size": 1}"#).contains("missing field `name`"));
        assert!(message(r#"{"name": "a", "size": "lots"}"#).contains("invalid size"));
    }
}
