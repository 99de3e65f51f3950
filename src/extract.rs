//! Request body extraction that fails in the edge's JSON error shape, naming what was wrong.

use axum::{
    body::Bytes,
    extract::{FromRef, FromRequest, Request},
    http::header,
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest JSON body an `/auth` or admin route reads.
const MAX_JSON_BODY: usize = 64 * 1024;

/// The whole body, at most `limit` bytes, within `deadline`: 413 when larger, 408 when too slow
/// (a client that trickles a small body, or never finishes it, does not hold a handler), 400
/// when unreadable.
pub async fn read_small_body(
    req: Request,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(req.into_body(), limit);
    match tokio::time::timeout(deadline, body.collect()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge),
        Ok(Err(_)) => Err(ApiError::BadRequest(
            "The request body could not be read.".into(),
        )),
    }
}

/// How long a small body may take to arrive in all (`server.request_body_idle_timeout_secs`);
/// the extractors below read it from the router's state.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

/// The raw body of a small request (webhooks: the signature covers the exact bytes), bounded in
/// size and time like [`JsonBody`].
pub struct SmallBody(pub Bytes);

impl<S> FromRequest<S> for SmallBody
where
    S: Send + Sync,
    BodyDeadline: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let BodyDeadline(deadline) = BodyDeadline::from_ref(state);
        read_small_body(req, MAX_JSON_BODY, deadline)
            .await
            .map(SmallBody)
    }
}

/// Whether the headers declare a JSON body (`application/json`, `…+json`).
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.to_ascii_lowercase();
            ct.starts_with("application/json") || ct.contains("+json")
        })
}

/// Like `axum::Json`, but rejections are `{"error":"bad_request","message":...}`.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
    BodyDeadline: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::BadRequest(
                "Send a JSON body with Content-Type: application/json.".into(),
            ));
        }
        let BodyDeadline(deadline) = BodyDeadline::from_ref(state);
        let body = read_small_body(req, MAX_JSON_BODY, deadline).await?;
        parse_json(&body).map(JsonBody)
    }
}

/// Parses JSON, turning serde's message (which names the field) into a 400.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("The JSON body is not valid: {e}.")))
}
