//! The edge of the main listener, in one layer: a request id (the client's `X-Request-Id` when
//! sane, else a new one) on the request, the response and every log line of the request (a span),
//! the request metrics, and the JSON problem shape of any error the BFF answers itself
//! ([`crate::error::problem_shape`]). Latency is time to response headers, so streamed bodies
//! don't distort it.
//!
//! Hand-written rather than axum's `from_fn` + `map_response`: each of those boxed a clone of the
//! whole stack below it on every request (issue 12).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::{extract::Request, response::Response};
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use crate::error::{problem_shape, ErrorCause};

use super::{
    metrics::{route_group, CodeLabels, Metrics, RequestLabels},
    request_id, X_REQUEST_ID,
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
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The service that was polled ready serves this request; the clone waits for the next.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let metrics = self.metrics.clone();
        Box::pin(async move { Ok(observe(&metrics, req, inner).await) })
    }
}

async fn observe<S>(metrics: &Metrics, mut req: Request, inner: S) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
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
    let res = async {
        match inner.oneshot(req).await {
            Ok(res) => problem_shape(res).await,
            Err(never) => match never {},
        }
    }
    .instrument(span.clone())
    .await;
    let mut res = res;
    let elapsed = started.elapsed();
    let status = res.status().as_u16();
    res.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    let labels = RequestLabels {
        route_group: group,
        status,
    };
    metrics.requests.get_or_create(&labels).inc();
    metrics
        .request_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
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
