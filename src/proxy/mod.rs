//! `/api/chat/{*path}` → LibreChat `/api/{path}`, as the signed-in user.
//!
//! Phases of a request: authenticate → acquire token → rewrite request → forward → filter
//! response. Bodies stream both ways; small bodies are buffered so a request can be replayed
//! once after LibreChat answers 401.

pub mod body;
pub mod headers;
pub mod path;
pub mod upstream;

use std::net::SocketAddr;

use axum::{
    body::{Body, Bytes},
    extract::{ConnectInfo, Request, State},
    http::{header, request::Parts, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt, Limited};

use crate::{
    app::AppState, client::client_info, error::ApiError, librechat::TokenError,
    session::authenticate,
};

pub use upstream::Upstream;

pub async fn forward(State(state): State<AppState>, req: Request) -> Response {
    match forward_request(&state, req).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn forward_request(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();

    // 1. Authenticate: a path we would refuse anyway costs no session lookup.
    let rest = path::checked_rest(parts.uri.path(), &state.upstream.deny_prefixes)?;
    let user = authenticate(state, &parts, true).await?.user;
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .ok_or(ApiError::Internal)?;
    let client = client_info(peer, &parts.headers, state);

    // 2. Acquire the user's LibreChat token (in-process when warm). No usable account yet:
    // make sure a provisioning job exists (just in time), answer 503 meanwhile.
    let token = match state.tokens.token(&user.id, &client).await {
        Ok(token) => token,
        Err(e) => {
            if matches!(
                e,
                TokenError::ProvisioningPending | TokenError::CredentialInvalid
            ) {
                if let Err(pe) = state.provisioner.ensure(&user, "login").await {
                    tracing::warn!(user = %user.id, error = %pe, "cannot enqueue provisioning");
                }
            }
            return Err(e.into());
        }
    };

    // 3. Rewrite the request.
    let request_id = headers::request_id(&parts.headers);
    let uri = state.upstream.uri(rest, parts.uri.query())?;
    let mut body = RequestBody::prepare(&parts, body, &state.upstream).await?;
    let method = parts.method;
    // The client's headers are not needed any more: rewrite them in place.
    let mut upstream_headers = parts.headers;
    headers::rewrite_request(&mut upstream_headers, &token, &client, &request_id);

    // 4. Forward; on 401 renew the token and replay once if the body allows it.
    let first = body.take();
    // Keep a copy for the replay only when there can be one.
    let kept = body
        .replay_possible()
        .then(|| (uri.clone(), upstream_headers.clone()));
    let mut res = state
        .upstream
        .send(method.clone(), uri, upstream_headers, first, &state.metrics)
        .await?;
    if res.status() == StatusCode::UNAUTHORIZED {
        let (Some(replay), Some((uri, mut upstream_headers))) = (body.replay(), kept) else {
            state.tokens.invalidate(&user.id, token.generation);
            return Err(ApiError::LibreChatUnauthorized);
        };
        let renewed = state.tokens.replace(&user.id, &token, &client).await?;
        upstream_headers.insert(header::AUTHORIZATION, renewed.authorization.clone());
        res = state
            .upstream
            .send(method, uri, upstream_headers, replay, &state.metrics)
            .await?;
        if res.status() == StatusCode::UNAUTHORIZED {
            state.tokens.invalidate(&user.id, renewed.generation);
            return Err(ApiError::LibreChatUnauthorized);
        }
    }

    // 5. Filter the response and stream it back.
    Ok(state
        .upstream
        .into_client_response(res, &request_id, &state.metrics))
}

/// The request body as it will be sent, and whether it can be sent twice.
enum RequestBody {
    Empty,
    Buffered(Bytes),
    Streaming(Option<Body>),
}

impl RequestBody {
    async fn prepare(parts: &Parts, body: Body, upstream: &Upstream) -> Result<Self, ApiError> {
        let length = content_length(&parts.headers)?;
        let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
        match length {
            None if !chunked => Ok(Self::Empty),
            Some(0) => Ok(Self::Empty),
            Some(n) if n > upstream.max_body => Err(ApiError::PayloadTooLarge),
            Some(n) if n <= upstream.replay_cap as u64 => {
                let bytes = Limited::new(body, n as usize)
                    .collect()
                    .await
                    .map_err(|_| {
                        ApiError::BadRequest("The request body could not be read.".into())
                    })?
                    .to_bytes();
                Ok(Self::Buffered(bytes))
            }
            _ => Ok(Self::Streaming(Some(Body::new(Limited::new(
                body,
                usize::try_from(upstream.max_body).unwrap_or(usize::MAX),
            ))))),
        }
    }

    fn take(&mut self) -> Body {
        match self {
            Self::Empty => Body::empty(),
            Self::Buffered(b) => Body::from(b.clone()),
            Self::Streaming(b) => b.take().unwrap_or_else(Body::empty),
        }
    }

    fn replay_possible(&self) -> bool {
        !matches!(self, Self::Streaming(_))
    }

    /// A second copy, if the body was small enough to keep.
    fn replay(&self) -> Option<Body> {
        match self {
            Self::Empty => Some(Body::empty()),
            Self::Buffered(b) => Some(Body::from(b.clone())),
            Self::Streaming(_) => None,
        }
    }
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Content-Length is not a number.".into()))
        })
        .transpose()
}
