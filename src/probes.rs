//! Probes and scrapes: `/healthz` (the process answers), `/readyz` (the session store answers)
//! and `/metrics` (Prometheus, queue gauges sampled at scrape time).

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use provisioning::JobQueue;
use serde_json::{json, Value};

use crate::{error::problem, redis_conn::RedisHandle, telemetry::metrics::Metrics};

/// What the probes look at.
pub struct Probes {
    /// The session store when it is Redis (`None`: sessions live in memory).
    pub session_redis: Option<RedisHandle>,
    pub queue: JobQueue,
    pub metrics: Arc<Metrics>,
}

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /metrics`: Prometheus text; queue gauges are sampled now.
pub async fn metrics(State(probes): State<Arc<Probes>>) -> Response {
    if let Ok((depth, delayed, dead)) = probes.queue.sizes().await {
        probes.metrics.queue_depth.set(depth as i64);
        probes.metrics.queue_delayed.set(delayed as i64);
        probes.metrics.dead_letter_size.set(dead as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        probes.metrics.encode(),
    )
        .into_response()
}

pub async fn readyz(State(probes): State<Arc<Probes>>) -> Response {
    let Some(redis) = &probes.session_redis else {
        return Json(json!({ "status": "ready", "session_store": "memory" })).into_response();
    };
    match redis.ping().await {
        Ok(()) => Json(json!({ "status": "ready", "session_store": "redis" })).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: redis unreachable");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "session_store_unavailable",
                "The session store (Redis) is unreachable.",
            )
        }
    }
}
