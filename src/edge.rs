//! The edge of the main listener, in one layer: a panic answered as a JSON 500, a request id (the
//! client's `X-Request-Id` when sane, else a new one) on the request, the response and every log
//! line of the request (a span), the request metrics, and the JSON problem shape of any error the
//! BFF answers itself ([`problem_shape`]). Latency is time to response headers, so streamed
//! bodies don't distort it.
//!
//! Hand-written rather than axum's `from_fn` + `map_response`: each of those boxed a clone of the
//! whole stack below it on every request (issue 12).

use std::{
    convert::Infallible,
    future::Future,
    panic::{self, AssertUnwindSafe},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    extract::Request,
    response::{IntoResponse, Response},
};
use futures_util::FutureExt;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{
    error::{problem, ApiError, ErrorCause},
    telemetry::{
        metrics::{route_group, CodeLabels, Metrics},
        request_id, X_REQUEST_ID,
    },
};

/// Wraps a router in [`Edge`].
#[derive(Clone)]
pub struct EdgeLayer {
    metrics: Arc<Metrics>,
}

impl EdgeLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let request_id = request_id(req.headers());
        req.headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        let group = route_group(req.uri().path());
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or_default(),
            method = %req.method(),
            route_group = group,
        );
        let started = Instant::now();
        // The service that was polled ready takes the request here (no clone of the stack below).
        // A panic below it (taking the request or answering it) is a JSON 500 for this request;
        // the panic hook reports it, the connection and the process go on.
        let answer =
            span.in_scope(|| panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))));
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let res = async {
                let res = match answer {
                    Ok(answer) => match AssertUnwindSafe(answer).catch_unwind().await {
                        Ok(Ok(res)) => res,
                        Ok(Err(never)) => match never {},
                        Err(_) => ApiError::Internal.into_response(),
                    },
                    Err(_) => ApiError::Internal.into_response(),
                };
                problem_shape(res).await
            }
            .instrument(span.clone())
            .await;
            Ok(observed(&metrics, res, request_id, group, started, &span))
        })
    }
}

/// The response's request id, metrics and log line.
fn observed(
    metrics: &Metrics,
    mut res: Response,
    request_id: axum::http::HeaderValue,
    group: &'static str,
    started: Instant,
    span: &tracing::Span,
) -> Response {
    let elapsed = started.elapsed();
    let status = res.status().as_u16();
    res.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    metrics.request(group, status, elapsed.as_secs_f64());
    let elapsed_ms = elapsed.as_millis() as u64;
    // One line per request; an error the BFF answered itself carries its cause here, once.
    span.in_scope(|| match res.extensions().get::<ErrorCause>() {
        Some(e) => {
            metrics
                .errors
                .get_or_create(&CodeLabels { code: e.code })
                .inc();
            // A client error's text may quote what the client sent (a password among it): only
            // server errors, whose causes are ours, are logged in full.
            if status >= 500 {
                tracing::warn!(status, elapsed_ms, error = e.code, cause = %e.cause, "request");
            } else {
                tracing::info!(status, elapsed_ms, error = e.code, "request");
            }
        }
        None => tracing::info!(status, elapsed_ms, "request"),
    });
    res
}

/// Rewrites an error response the BFF produced without the JSON problem shape (axum's 405 has
/// no body; its body-limit 413 and Query/Path rejections are plain text) into
/// `{"error","message"}`, keeping status and headers (`Allow`, `Retry-After`, ...). LibreChat's
/// own answers (marked [`crate::proxy::Proxied`]) pass as they are.
pub async fn problem_shape(res: axum::response::Response) -> axum::response::Response {
    let status = res.status();
    if status.as_u16() < 400
        || res.extensions().get::<crate::proxy::Proxied>().is_some()
        || crate::extract::is_json(res.headers())
    {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    // A client error's text (axum's rejection) says what was wrong; a server error's stays ours.
    let detail = if status.is_client_error() {
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 1024))
            .await
            .ok()
            .and_then(|c| String::from_utf8(c.to_bytes().to_vec()).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    } else {
        None
    };
    let (code, generic) = problem_code(status);
    let message = detail.unwrap_or_else(|| generic.to_owned());
    let (shaped, body) = problem(status, code, &message).into_parts();
    parts.extensions.insert(ErrorCause {
        code,
        cause: message,
    });
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    for (name, value) in &shaped.headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    axum::response::Response::from_parts(parts, body)
}

/// Code and message for an error status the BFF produced without saying more.
fn problem_code(status: axum::http::StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("bad_request", "The request is not valid."),
        401 => ("unauthenticated", "Sign in first."),
        403 => ("forbidden", "This is not allowed."),
        404 => ("not_found", "No such route."),
        405 => (
            "method_not_allowed",
            "This route does not accept that method.",
        ),
        408 => ("request_timeout", "The request did not arrive in time."),
        411 => ("length_required", "The request needs a Content-Length."),
        413 => ("payload_too_large", "The request body is too large."),
        414 => ("uri_too_long", "The request URI is too long."),
        415 => (
            "unsupported_media_type",
            "The request body's Content-Type is not accepted.",
        ),
        422 => (
            "unprocessable_entity",
            "The request body could not be processed.",
        ),
        429 => ("too_many_requests", "Too many requests; retry later."),
        431 => ("headers_too_large", "The request headers are too large."),
        s if s < 500 => ("bad_request", "The request is not acceptable."),
        503 => (
            "service_unavailable",
            "The service is unavailable; try again shortly.",
        ),
        _ => ("internal_error", "Something went wrong on our side."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    /// Panics while taking a request (`/call`), while answering it (`/answer`), else answers.
    #[derive(Clone)]
    struct Fragile;

    impl Service<Request> for Fragile {
        type Response = Response;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request) -> Self::Future {
            let path = req.uri().path().to_owned();
            assert_ne!(path, "/call", "panic while taking the request");
            Box::pin(async move {
                assert_ne!(path, "/answer", "panic while answering");
                Ok(Response::new(Body::from("fine")))
            })
        }
    }

    #[tokio::test]
    async fn a_panic_below_is_a_json_500_and_the_next_request_is_served() {
        let mut edge = EdgeLayer::new(Arc::new(Metrics::new())).layer(Fragile);
        for path in ["/call", "/answer", "/fine"] {
            let req = Request::builder()
                .uri(path)
                .body(Body::empty())
                .expect("request");
            let res = match edge.call(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            assert!(res.headers().contains_key(&X_REQUEST_ID), "{path}");
            let status = res.status();
            let body = http_body_util::BodyExt::collect(res.into_body())
                .await
                .expect("body")
                .to_bytes();
            if path == "/fine" {
                assert_eq!(status, 200);
                assert_eq!(&body[..], b"fine");
            } else {
                assert_eq!(status, 500, "{path}");
                let problem: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                assert_eq!(problem["error"], "internal_error", "{path}: {problem}");
            }
        }
    }
}
