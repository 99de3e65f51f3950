//! Request body extraction that fails in the edge's JSON error shape, naming what was wrong.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::header,
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest JSON body an `/auth` or admin route reads.
const MAX_JSON_BODY: usize = 64 * 1024;

/// Like `axum::Json`, but rejections are `{"error":"bad_request","message":...}`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.to_ascii_lowercase();
                ct.starts_with("application/json") || ct.contains("+json")
            });
        if !is_json {
            return Err(ApiError::BadRequest(
                "Send a JSON body with Content-Type: application/json.".into(),
            ));
        }
        let req =
            req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, MAX_JSON_BODY)));
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|_| ApiError::BadRequest("The body is too large or unreadable.".into()))?;
        parse_json(&body).map(JsonBody)
    }
}

/// Parses JSON, turning serde's message (which names the field) into a 400.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("The JSON body is not valid: {e}.")))
}
