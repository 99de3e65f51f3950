//! The pooled HTTP client to LibreChat's `/api/*`, with the connect and response-header
//! timeouts; bodies stream both ways.

use std::time::Duration;

use axum::{
    body::Body,
    http::{uri::Authority, uri::Scheme, HeaderMap, HeaderValue, Method, Request, Response, Uri},
};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

use std::sync::Arc;

use super::{
    body::{BodyOutcome, IdleTimeoutBody},
    headers, Proxied,
};
use crate::telemetry::metrics::{GroupLabels, KindLabels, Metrics, StreamMetricsBody};
use crate::{
    config::{ConfigError, LibreChatConfig},
    error::ApiError,
};

pub struct Upstream {
    client: Client<HttpConnector, Body>,
    scheme: Scheme,
    authority: Authority,
    /// `{base path}/api/`: what `/api/chat/` maps to.
    prefix: String,
    header_timeout: Duration,
    idle_timeout: Duration,
    pub max_body: u64,
    pub replay_cap: usize,
    pub deny_prefixes: Vec<String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(cfg: &LibreChatConfig) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::Invalid {
            key: "librechat.url".into(),
            reason: reason.into(),
        };
        let uri: Uri = cfg.url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            // LibreChat sits on the private network; the proxy speaks plain HTTP to it.
            return Err(bad(
                "must be an http:// URL (LibreChat is reached on the private network)",
            ));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        let base = uri.path().trim_end_matches('/');
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(cfg.connect_timeout_secs)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(cfg.pool_idle_timeout_secs))
            .build(connector);
        Ok(Self {
            client,
            scheme: Scheme::HTTP,
            authority,
            prefix: format!("{base}/api/"),
            header_timeout: Duration::from_secs(cfg.response_header_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.stream_idle_timeout_secs),
            max_body: cfg.max_request_body_bytes,
            replay_cap: cfg.replay_buffer_bytes,
            deny_prefixes: cfg.deny_prefixes.clone(),
        })
    }

    /// `{librechat}/api/{rest}[?query]`.
    pub fn uri(&self, rest: &str, query: Option<&str>) -> Result<Uri, ApiError> {
        let path_and_query = match query {
            Some(q) => format!("{}{rest}?{q}", self.prefix),
            None => format!("{}{rest}", self.prefix),
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ApiError::BadPath)
    }

    /// Sends one request. When it fails because the client's body did (`client_body` says why),
    /// the error is the client's (413/400/408), not LibreChat's, and is not counted as an
    /// upstream error; hyper has already dropped the upstream connection.
    pub async fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Body,
        client_body: Option<&BodyOutcome>,
        metrics: &Metrics,
    ) -> Result<Response<Incoming>, ApiError> {
        let started = std::time::Instant::now();
        let result = self.send_inner(method, uri, headers, body).await;
        if result.is_err() {
            if let Some(failure) = client_body.and_then(BodyOutcome::failure) {
                tracing::info!(?failure, "request body failed; upstream request dropped");
                return Err(failure.into());
            }
        }
        metrics
            .upstream_duration
            .get_or_create(&GroupLabels {
                route_group: "chat",
            })
            .observe(started.elapsed().as_secs_f64());
        let kind = match &result {
            Err(ApiError::LibreChatTimeout) => Some("timeout"),
            Err(_) => Some("unreachable"),
            Ok(res) if res.status().is_server_error() => Some("server_error"),
            Ok(_) => None,
        };
        if let Some(kind) = kind {
            metrics
                .upstream_errors
                .get_or_create(&KindLabels { kind })
                .inc();
        }
        result
    }

    async fn send_inner(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response<Incoming>, ApiError> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        match tokio::time::timeout(self.header_timeout, self.client.request(req)).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "LibreChat request failed");
                Err(ApiError::LibreChatUnavailable)
            }
            Err(_) => Err(ApiError::LibreChatTimeout),
        }
    }

    /// LibreChat's response for the client: filtered headers, streamed body with idle timeout;
    /// event streams are counted while open.
    pub fn into_client_response(
        &self,
        res: Response<Incoming>,
        request_id: &HeaderValue,
        metrics: &Arc<Metrics>,
    ) -> axum::response::Response {
        let (mut parts, body) = res.into_parts();
        headers::filter_response(&mut parts.headers, request_id);
        let is_stream = parts
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
        let body = IdleTimeoutBody::new(body, self.idle_timeout);
        let body = if is_stream {
            Body::new(StreamMetricsBody::new(body, metrics.clone()))
        } else {
            Body::new(body)
        };
        parts.extensions.insert(Proxied);
        axum::response::Response::from_parts(parts, body)
    }
}
