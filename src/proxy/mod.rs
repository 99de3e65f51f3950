//! `/api/chat/{*path}` → LibreChat `/api/{path}`, as the signed-in user.
//!
//! Phases of a request: authenticate → acquire token → rewrite request → forward → filter
//! response. Bodies stream both ways; small bodies are buffered so a request can be replayed
//! once after LibreChat answers 401.

pub mod body;
pub mod headers;
pub mod lane;
pub mod path;
pub mod pool;
pub mod upstream;

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{header, request::Parts, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::MethodFilter,
};
use http_body_util::BodyExt;

use std::{sync::Arc, time::Duration};

use crate::{
    end_user::ClientInfo,
    error::ApiError,
    librechat::{TokenError, TokenManager, UpstreamToken},
    provisioner::Provisioner,
    session::{authenticate, Authenticator, UserInfo},
    telemetry::metrics::Metrics,
};

use body::{BodyFailure, BodyOutcome, ClientBody};
pub use upstream::Upstream;

/// The methods `/api/chat/*` forwards, for the router's route and the warm lane alike (GET covers
/// HEAD); any other is the router's 405.
pub const FORWARDED_METHODS: [Method; 6] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Whether `/api/chat/*` forwards `method` ([`FORWARDED_METHODS`], HEAD with GET).
pub fn forwards(method: &Method) -> bool {
    method == Method::HEAD || FORWARDED_METHODS.contains(method)
}

/// [`FORWARDED_METHODS`] as the router's method filter.
pub fn forwarded_filter() -> MethodFilter {
    FORWARDED_METHODS
        .iter()
        .filter_map(|m| MethodFilter::try_from(m.clone()).ok())
        .fold(MethodFilter::GET, MethodFilter::or)
}

/// Response extension on LibreChat's error answers (status ≥ 400): they pass through as LibreChat
/// sent them, while every other error response is the BFF's own and must be in the JSON problem
/// shape.
#[derive(Debug, Clone, Copy)]
pub struct Proxied;

/// What forwarding needs: who the caller is, their LibreChat token, the provisioner for users
/// without an account yet, and the pooled client to LibreChat.
pub struct Proxy {
    pub auth: Arc<Authenticator>,
    pub tokens: Arc<TokenManager>,
    pub provisioner: Provisioner,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    /// `server.request_body_idle_timeout_secs`.
    pub body_idle_timeout: Duration,
}

pub async fn forward(State(state): State<Arc<Proxy>>, req: Request) -> Response {
    match forward_request(&state, req).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn forward_request(state: &Proxy, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // 1. Authenticate: a path we would refuse anyway costs no session lookup.
    let rest = path::checked_rest(parts.uri.path(), &state.upstream.deny_prefixes)?;
    let user = authenticate(&state.auth, &parts, true).await?.user;
    let uri = state.upstream.uri(rest, parts.uri.query())?;
    state.send(parts, body, uri, As::User(&user)).await
}

/// Who LibreChat sees a forwarded request come from.
#[derive(Debug, Clone, Copy)]
pub enum As<'a> {
    /// The user, with their LibreChat access token.
    User(&'a UserInfo),
    /// The user, also with their LibreChat refresh cookie (`/images` with `secureImageLinks`).
    UserWithCookie(&'a UserInfo),
    /// Nobody: static files of the web UI and public routes.
    Anonymous,
}

impl Proxy {
    /// Phases 2–5 of a request whose caller and LibreChat URI are known: acquire the token,
    /// rewrite, forward (replaying once after a 401), stream the answer back. The peer is the
    /// request's `ConnectInfo`.
    pub async fn send(
        &self,
        parts: Parts,
        body: Body,
        uri: axum::http::Uri,
        who: As<'_>,
    ) -> Result<Response, ApiError> {
        let peer = crate::end_user::peer(&parts)?;
        self.send_from(peer, parts, body, uri, who).await
    }

    /// [`Proxy::send`] for a request from `peer` (the socket's; the end user may be behind it).
    pub async fn send_from(
        &self,
        peer: std::net::IpAddr,
        parts: Parts,
        body: Body,
        uri: axum::http::Uri,
        who: As<'_>,
    ) -> Result<Response, ApiError> {
        let client = self.auth.end_users.client_info(peer, &parts.headers);
        // 2. Acquire the user's LibreChat token (in-process when warm).
        let (user, token) = match who {
            As::User(user) | As::UserWithCookie(user) => {
                (Some(user), Some(self.token_for(user, &client).await?))
            }
            As::Anonymous => (None, None),
        };
        let cookie = match who {
            As::UserWithCookie(user) => Some(
                self.tokens
                    .refresh_cookie(&user.id, &client)
                    .await
                    .map_err(ApiError::from)?,
            ),
            _ => None,
        };

        // 3. Rewrite the request.
        // Set by the edge on every request of the main listener (sanitised there).
        let request_id = (!parts.headers.contains_key(&crate::telemetry::X_REQUEST_ID))
            .then(|| crate::telemetry::request_id(&parts.headers));
        let mut body =
            RequestBody::prepare(&parts, body, &self.upstream, self.body_idle_timeout).await?;
        let method = parts.method;
        // The client's headers are not needed any more: rewrite them in place.
        let mut upstream_headers = parts.headers;
        headers::rewrite_request(
            &mut upstream_headers,
            token.as_ref(),
            &client,
            request_id.as_ref(),
            &self.upstream.csrf_header,
        );
        if let Some(cookie) = cookie {
            upstream_headers.insert(header::COOKIE, cookie);
        }

        // 4. Forward; on 401 renew the token and replay once if the body allows it.
        let (first, outcome) = body.take();
        // Keep a copy for the replay only when there can be one.
        let kept = (body.replay_possible() && token.is_some())
            .then(|| (uri.clone(), upstream_headers.clone()));
        let mut res = self
            .upstream
            .send(
                method.clone(),
                uri,
                upstream_headers,
                first,
                outcome.as_ref(),
                &self.metrics,
            )
            .await?;
        if let (Some(user), Some(token)) = (user, &token) {
            if res.status() == StatusCode::UNAUTHORIZED {
                let (Some(replay), Some((uri, mut upstream_headers))) = (body.replay(), kept)
                else {
                    self.tokens.invalidate(&user.id, token.generation);
                    return Err(ApiError::LibreChatUnauthorized);
                };
                let renewed = Box::pin(self.tokens.replace(&user.id, token, &client)).await?;
                upstream_headers.insert(header::AUTHORIZATION, renewed.authorization.clone());
                res = self
                    .upstream
                    .send(method, uri, upstream_headers, replay, None, &self.metrics)
                    .await?;
                if res.status() == StatusCode::UNAUTHORIZED {
                    self.tokens.renewal_refused(&user.id, &renewed);
                    return Err(ApiError::LibreChatUnauthorized);
                }
            }
        }

        // 5. Filter the response and stream it back.
        Ok(self.upstream.into_client_response(res, &self.metrics))
    }

    /// The user's LibreChat token. No usable account yet: make sure a provisioning job exists
    /// (just in time), answer 503 meanwhile with the time the job runs next.
    pub async fn token_for(
        &self,
        user: &UserInfo,
        client: &ClientInfo,
    ) -> Result<UpstreamToken, ApiError> {
        match self.tokens.token(&user.id, client).await {
            Ok(token) => Ok(token),
            // Boxed: kept out of the warm path's future (see `TokenManager::token`).
            Err(e) => Err(Box::pin(self.no_token(user, e)).await),
        }
    }

    /// The answer when the user has no usable LibreChat token: a provisioning job is made sure
    /// of when the account is missing or its password was refused.
    async fn no_token(&self, user: &UserInfo, e: TokenError) -> ApiError {
        if matches!(
            e,
            TokenError::ProvisioningPending | TokenError::CredentialInvalid
        ) {
            if let Err(pe) = self.provisioner.ensure(user, "login").await {
                tracing::warn!(user = %user.id, error = %pe, "cannot enqueue provisioning");
            }
        }
        if matches!(e, TokenError::ProvisioningPending) {
            return ApiError::ProvisioningPendingFor(self.provisioner.retry_after(&user.id).await);
        }
        e.into()
    }
}

/// The request body as it will be sent, and whether it can be sent twice.
enum RequestBody {
    Empty,
    Buffered(Bytes),
    /// Streamed through a [`ClientBody`]; its outcome explains a failed upstream request.
    Streaming(Option<(Body, BodyOutcome)>),
}

impl From<BodyFailure> for ApiError {
    fn from(failure: BodyFailure) -> Self {
        match failure {
            BodyFailure::TooLarge => ApiError::PayloadTooLarge,
            BodyFailure::Malformed => ApiError::MalformedBody,
            BodyFailure::Idle => ApiError::RequestTimeout,
        }
    }
}

impl RequestBody {
    async fn prepare(
        parts: &Parts,
        body: Body,
        upstream: &Upstream,
        idle: std::time::Duration,
    ) -> Result<Self, ApiError> {
        let length = content_length(&parts.headers)?;
        let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
        match length {
            None if !chunked => Ok(Self::Empty),
            Some(0) => Ok(Self::Empty),
            Some(n) if n > upstream.max_body => Err(ApiError::PayloadTooLarge),
            Some(n) if n <= upstream.replay_cap as u64 => {
                let guarded = ClientBody::new(body, n, idle);
                let outcome = guarded.outcome();
                let bytes = guarded
                    .collect()
                    .await
                    .map_err(|_| {
                        ApiError::from(outcome.failure().unwrap_or(BodyFailure::Malformed))
                    })?
                    .to_bytes();
                Ok(Self::Buffered(bytes))
            }
            _ => {
                let guarded = ClientBody::new(body, upstream.max_body, idle);
                let outcome = guarded.outcome();
                Ok(Self::Streaming(Some((Body::new(guarded), outcome))))
            }
        }
    }

    /// The body for the first attempt, with the outcome to consult if that attempt fails.
    fn take(&mut self) -> (Body, Option<BodyOutcome>) {
        match self {
            Self::Empty => (Body::empty(), None),
            Self::Buffered(b) => (Body::from(b.clone()), None),
            Self::Streaming(b) => match b.take() {
                Some((body, outcome)) => (body, Some(outcome)),
                None => (Body::empty(), None),
            },
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
