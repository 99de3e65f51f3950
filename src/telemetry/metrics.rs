//! Prometheus metrics (OpenMetrics text at `GET /metrics`). Names follow Prometheus conventions:
//! `bff_` prefix, base units (seconds), `_total` on counters (added by the encoder).

use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route_group: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub route_group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub upstream_duration: Family<GroupLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<KindLabels, Counter>,
    /// Error answers the BFF itself gave, by problem code.
    pub errors: Family<CodeLabels, Counter>,
    pub librechat_auth: Family<AuthLabels, Counter>,
    pub identity_auth: Family<AuthLabels, Counter>,
    pub sessions: Family<EventLabels, Counter>,
    pub sse_active: Gauge,
    pub sse_duration: Histogram,
    pub jobs: Family<OutcomeLabels, Counter>,
    pub queue_depth: Gauge,
    pub queue_delayed: Gauge,
    pub dead_letter_size: Gauge,
    /// The series of the hottest label sets, resolved on first use: a `Family` lookup hashes
    /// the labels under a lock on every request.
    chat_ok: OnceLock<(Counter, Histogram)>,
    chat_upstream: OnceLock<Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bff");
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            errors: Family::default(),
            librechat_auth: Family::default(),
            identity_auth: Family::default(),
            sessions: Family::default(),
            sse_active: Gauge::default(),
            // 1 s .. ~1 h
            sse_duration: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            jobs: Family::default(),
            queue_depth: Gauge::default(),
            queue_delayed: Gauge::default(),
            dead_letter_size: Gauge::default(),
            chat_ok: OnceLock::new(),
            chat_upstream: OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by route group and status",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to response headers, by route group and status (stream bodies excluded)",
            m.request_duration.clone(),
        );
        registry.register(
            "librechat_upstream_duration_seconds",
            "LibreChat time to response headers for proxied requests",
            m.upstream_duration.clone(),
        );
        registry.register(
            "librechat_upstream_errors",
            "Proxied requests LibreChat did not answer, by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "errors",
            "Error answers the BFF gave itself, by problem code",
            m.errors.clone(),
        );
        registry.register(
            "librechat_auth",
            "LibreChat logins, refreshes and re-logins, by outcome",
            m.librechat_auth.clone(),
        );
        registry.register(
            "identity_auth",
            "Identity-service logins and refreshes, by outcome",
            m.identity_auth.clone(),
        );
        registry.register(
            "sessions",
            "Cookie sessions created, ended and revoked",
            m.sessions.clone(),
        );
        registry.register(
            "sse_streams_active",
            "Server-sent-event streams open now",
            m.sse_active.clone(),
        );
        registry.register(
            "sse_stream_duration_seconds",
            "How long server-sent-event streams stayed open",
            m.sse_duration.clone(),
        );
        registry.register(
            "provisioning_jobs",
            "Provisioning job runs, by outcome",
            m.jobs.clone(),
        );
        registry.register(
            "provisioning_queue_depth",
            "Provisioning jobs waiting or running",
            m.queue_depth.clone(),
        );
        registry.register(
            "provisioning_delayed_jobs",
            "Provisioning jobs waiting for a retry",
            m.queue_delayed.clone(),
        );
        registry.register(
            "provisioning_dead_letter_size",
            "Entries in the provisioning dead-letter stream",
            m.dead_letter_size.clone(),
        );
        Self { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }

    pub fn librechat(&self, operation: &'static str, outcome: &'static str) {
        self.librechat_auth
            .get_or_create(&AuthLabels { operation, outcome })
            .inc();
    }

    pub fn identity(&self, operation: &'static str, outcome: &'static str) {
        self.identity_auth
            .get_or_create(&AuthLabels { operation, outcome })
            .inc();
    }

    /// One answered request: its count and its time to response headers.
    pub fn request(&self, route_group: &'static str, status: u16, seconds: f64) {
        let labels = RequestLabels {
            route_group,
            status,
        };
        if route_group == "chat" && status == 200 {
            let (count, duration) = self.chat_ok.get_or_init(|| {
                (
                    self.requests.get_or_create(&labels).clone(),
                    self.request_duration.get_or_create(&labels).clone(),
                )
            });
            count.inc();
            duration.observe(seconds);
            return;
        }
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// LibreChat's time to response headers for a proxied request.
    pub fn chat_upstream(&self, seconds: f64) {
        self.chat_upstream
            .get_or_init(|| {
                self.upstream_duration
                    .get_or_create(&GroupLabels {
                        route_group: "chat",
                    })
                    .clone()
            })
            .observe(seconds);
    }

    pub fn session(&self, event: &'static str) {
        self.sessions.get_or_create(&EventLabels { event }).inc();
    }
}

/// The route group a path belongs to (bounded label cardinality).
pub fn route_group(path: &str) -> &'static str {
    if path.starts_with("/api/chat/") {
        "chat"
    } else if path.starts_with("/auth/") {
        "auth"
    } else if path.starts_with("/admin/") {
        "admin"
    } else if path.starts_with("/hooks/") {
        "hooks"
    } else if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        "health"
    } else {
        "other"
    }
}

/// Wraps an SSE body: counts it as active while open and records its duration when it ends
/// (or the client goes away), so streams stay out of the request-latency histogram.
pub struct StreamMetricsBody<B> {
    inner: B,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl<B> StreamMetricsBody<B> {
    pub fn new(inner: B, metrics: Arc<Metrics>) -> Self {
        metrics.sse_active.inc();
        Self {
            inner,
            metrics,
            started: Instant::now(),
        }
    }
}

impl<B> Drop for StreamMetricsBody<B> {
    fn drop(&mut self) {
        self.metrics.sse_active.dec();
        self.metrics
            .sse_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl<B> Body for StreamMetricsBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn the_hot_series_are_the_familys_own() {
        let m = Metrics::new();
        m.request("chat", 200, 0.002);
        m.request("chat", 200, 0.002);
        m.request("chat", 404, 0.002);
        m.request("auth", 200, 0.002);
        m.chat_upstream(0.001);
        m.chat_upstream(0.001);
        let text = m.encode();
        for line in [
            r#"bff_http_requests_total{route_group="chat",status="200"} 2"#,
            r#"bff_http_requests_total{route_group="chat",status="404"} 1"#,
            r#"bff_http_requests_total{route_group="auth",status="200"} 1"#,
            r#"bff_http_request_duration_seconds_count{route_group="chat",status="200"} 2"#,
            r#"bff_librechat_upstream_duration_seconds_count{route_group="chat"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
