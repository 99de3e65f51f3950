//! The pooled HTTP client to LibreChat's `/api/*`, with the connect and response-header
//! timeouts; bodies stream both ways.
//!
//! The response-header timeout starts once the request body has been sent: an upload may take
//! as long as the client needs (each gap is bounded by `server.request_body_idle_timeout_secs`,
//! see [`super::body::ClientBody`]). While the body is being sent, LibreChat must keep taking it:
//! if it takes nothing for `response_header_timeout_secs` while the BFF has bytes for it, the
//! answer is 504 too.

use std::{
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{uri::Scheme, HeaderMap, HeaderName, Method, Request, Response, Uri},
};
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::{sync::Notify, time::Instant};

use std::sync::Arc;

use super::{
    body::{BodyOutcome, IdleTimeoutBody},
    headers,
    pool::{Pool, PooledBody, SendError},
    Proxied,
};
use crate::telemetry::metrics::{KindLabels, Metrics, StreamMetricsBody};
use crate::{
    config::{ConfigError, LibreChatConfig},
    error::ApiError,
};

pub struct Upstream {
    /// Keep-alive connections per core runtime, so a request never borrows a connection whose
    /// task runs on another thread (see `per_core`). The connector speaks TLS to an https://
    /// LibreChat (trusting `librechat.tls_ca_file`, else the system's roots) and plain TCP to
    /// an http:// one.
    pool: Arc<Pool>,
    /// `{base path}/api/`: what `/api/chat/` maps to.
    prefix: String,
    header_timeout: Duration,
    idle_timeout: Duration,
    pub max_body: u64,
    pub replay_cap: usize,
    pub deny_prefixes: Vec<String>,
    /// The configured CSRF header (`csrf.header_name`), stripped before LibreChat.
    pub csrf_header: HeaderName,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// `cores`: the number of core runtimes that will use it (`server.worker_threads`).
    pub fn new(cfg: &LibreChatConfig, cores: usize) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::Invalid {
            key: "librechat.url".into(),
            reason: reason.into(),
        };
        let uri: Uri = cfg.url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => return Err(bad("must be an http:// or https:// URL")),
        };
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        let base = uri.path().trim_end_matches('/');
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(cfg.connect_timeout_secs)));
        http.set_nodelay(true);
        // `https_or_http`: the URI's scheme decides; `enforce_http(false)` lets https through.
        http.enforce_http(false);
        let ca = crate::tls::CaBundle::load("librechat.tls_ca_file", &cfg.tls_ca_file)?;
        let tls = crate::tls::http_client_config("librechat.tls_ca_file", ca.as_ref())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let pool = Pool::new(
            connector,
            &scheme,
            &authority,
            cores + 1,
            Duration::from_secs(cfg.pool_idle_timeout_secs),
        )
        .map_err(|_| bad("the host is not a valid Host header"))?;
        Ok(Self {
            pool: Arc::new(pool),
            prefix: format!("{base}/api/"),
            header_timeout: Duration::from_secs(cfg.response_header_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.stream_idle_timeout_secs),
            max_body: cfg.max_request_body_bytes,
            replay_cap: cfg.replay_buffer_bytes,
            deny_prefixes: cfg.deny_prefixes.clone(),
            csrf_header: HeaderName::from_static("x-csrf"),
        })
    }

    /// Sets the CSRF header to strip (`csrf.header_name`, validated at load).
    pub fn with_csrf_header(mut self, name: &str) -> Result<Self, ConfigError> {
        self.csrf_header =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| ConfigError::Invalid {
                key: "csrf.header_name".into(),
                reason: "not a valid HTTP header name".into(),
            })?;
        Ok(self)
    }

    /// `{base path}/api/{rest}[?query]` (origin form: the pool sends `Host`).
    pub fn uri(&self, rest: &str, query: Option<&str>) -> Result<Uri, ApiError> {
        self.build_uri(&self.prefix, rest, query)
    }

    /// `{base path}/{rest}[?query]`: LibreChat's routes outside `/api` (web UI, `/images`).
    pub fn root_uri(&self, rest: &str, query: Option<&str>) -> Result<Uri, ApiError> {
        let base = self.prefix.strip_suffix("api/").unwrap_or(&self.prefix);
        self.build_uri(base, rest, query)
    }

    fn build_uri(&self, prefix: &str, rest: &str, query: Option<&str>) -> Result<Uri, ApiError> {
        // Built by hand: `format!` costs more than the rest of this function (every request).
        let mut path_and_query =
            String::with_capacity(prefix.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
        path_and_query.push_str(prefix);
        path_and_query.push_str(rest);
        if let Some(q) = query {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Uri::try_from(path_and_query).map_err(|_| ApiError::BadPath)
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
    ) -> Result<Response<PooledBody>, ApiError> {
        let started = std::time::Instant::now();
        let result = self.send_inner(method, uri, headers, body).await;
        if result.is_err() {
            if let Some(failure) = client_body.and_then(BodyOutcome::failure) {
                tracing::info!(?failure, "request body failed; upstream request dropped");
                return Err(failure.into());
            }
        }
        metrics.chat_upstream(started.elapsed().as_secs_f64());
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
    ) -> Result<Response<PooledBody>, ApiError> {
        use http_body::Body as _;
        // Nothing to send: the header clock starts at once.
        let progress = (!body.is_end_stream()).then(|| std::sync::Arc::new(SendProgress::new()));
        let body = match &progress {
            Some(p) => Body::new(ProgressBody {
                inner: body,
                progress: p.clone(),
            }),
            None => body,
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let request = self.pool.send(req);
        tokio::pin!(request);
        if let Some(progress) = progress {
            // Until the body is sent: no total limit, only LibreChat not taking it.
            loop {
                if progress.done() {
                    break;
                }
                let deadline = progress.stall_deadline(self.header_timeout);
                tokio::select! {
                    res = &mut request => return classify(res),
                    _ = progress.sent.notified() => break,
                    _ = tokio::time::sleep_until(deadline) => {
                        if progress.stalled(self.header_timeout) {
                            tracing::warn!("LibreChat stopped taking the request body");
                            return Err(ApiError::LibreChatTimeout);
                        }
                    }
                }
            }
        }
        match tokio::time::timeout(self.header_timeout, request).await {
            Ok(res) => classify(res),
            Err(_) => Err(ApiError::LibreChatTimeout),
        }
    }

    /// LibreChat's response for the client: filtered headers, streamed body with idle timeout;
    /// event streams are counted while open.
    pub fn into_client_response(
        &self,
        res: Response<PooledBody>,
        metrics: &Arc<Metrics>,
    ) -> axum::response::Response {
        let (mut parts, body) = res.into_parts();
        headers::filter_response(&mut parts.headers);
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
        // Only error answers are looked at by the edge (`problem_shape`); marking every answer
        // would allocate an extensions map per request.
        if parts.status.as_u16() >= 400 {
            parts.extensions.insert(Proxied);
        }
        axum::response::Response::from_parts(parts, body)
    }
}

fn classify(
    res: Result<Response<PooledBody>, SendError>,
) -> Result<Response<PooledBody>, ApiError> {
    res.map_err(|e| {
        // The cause is in the sources ("client error (Connect)" alone says nothing).
        let error = crate::tls::error_chain(&e);
        if crate::tls::is_tls_failure(&e) {
            tracing::warn!(
                %error,
                "LibreChat TLS handshake failed: its certificate is not trusted or does not name \
                 the host (check librechat.tls_ca_file and librechat.url)"
            );
        } else {
            tracing::warn!(%error, "LibreChat request failed");
        }
        ApiError::LibreChatUnavailable
    })
}

/// How far a request body has got on its way to LibreChat, shared by the body (in hyper's hands)
/// and [`Upstream::send`].
#[derive(Debug)]
struct SendProgress {
    state: Mutex<ProgressState>,
    /// Signalled once, when the body has ended (or failed).
    sent: Notify,
}

#[derive(Debug, Clone, Copy)]
struct ProgressState {
    /// Last time hyper took a frame from the body or found it waiting for the client.
    last: Instant,
    /// The body's last answer was `Pending`: the client is the slow one (its idle timeout runs).
    waiting_on_client: bool,
    done: bool,
}

impl SendProgress {
    fn new() -> Self {
        Self {
            state: Mutex::new(ProgressState {
                last: Instant::now(),
                waiting_on_client: false,
                done: false,
            }),
            sent: Notify::new(),
        }
    }

    fn get(&self) -> ProgressState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn done(&self) -> bool {
        self.get().done
    }

    /// When LibreChat will have been silent too long if nothing changes.
    fn stall_deadline(&self, limit: Duration) -> Instant {
        let s = self.get();
        if s.waiting_on_client {
            Instant::now() + limit
        } else {
            s.last + limit
        }
    }

    /// Whether hyper has held a frame for LibreChat for `limit` without asking for the next.
    fn stalled(&self, limit: Duration) -> bool {
        let s = self.get();
        !s.done && !s.waiting_on_client && s.last.elapsed() >= limit
    }

    fn finish(&self) {
        self.update(|s| s.done = true);
        self.sent.notify_one();
    }
}

/// The request body, reporting its progress to [`SendProgress`].
struct ProgressBody {
    inner: Body,
    progress: std::sync::Arc<SendProgress>,
}

impl http_body::Body for ProgressBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if this.inner.is_end_stream() {
                    this.progress.finish();
                } else {
                    this.progress.update(|s| {
                        s.last = Instant::now();
                        s.waiting_on_client = false;
                    });
                }
            }
            Poll::Ready(Some(Err(_)) | None) => this.progress.finish(),
            Poll::Pending => this.progress.update(|s| {
                s.last = Instant::now();
                s.waiting_on_client = true;
            }),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
