//! Per-request context: a request id (the client's `X-Request-Id` when sane, else a new one) on
//! the request, the response and every log line of the request (a span), plus the request
//! metrics. Latency is time to response headers, so streamed bodies don't distort it.

use std::time::Instant;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use tracing::Instrument;

use std::sync::Arc;

use crate::error::ErrorCause;

use super::{
    metrics::{route_group, CodeLabels, Metrics, RequestLabels},
    request_id, X_REQUEST_ID,
};

pub async fn observe(
    State(metrics): State<Arc<Metrics>>,
    mut req: Request,
    next: Next,
) -> Response {
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
    let mut res = next.run(req).instrument(span.clone()).await;
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
