//! `/healthz` (the process answers) and `/readyz` (the session store answers).

use axum::{extract::State, http::StatusCode, Json};
use serde_json::{json, Value};

use crate::{app::AppState, error::problem};

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /metrics`: Prometheus text; queue gauges are sampled now.
pub async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Ok((depth, delayed, dead)) = state.provisioner.queue.sizes().await {
        state.metrics.queue_depth.set(depth as i64);
        state.metrics.queue_delayed.set(delayed as i64);
        state.metrics.dead_letter_size.set(dead as i64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

pub async fn readyz(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match state.sessions.store() {
        crate::session::BffSessionStore::Memory(_) => {
            Json(json!({ "status": "ready", "session_store": "memory" })).into_response()
        }
        crate::session::BffSessionStore::Redis(_) => match state.redis.ping().await {
            Ok(()) => Json(json!({ "status": "ready", "session_store": "redis" })).into_response(),
            Err(e) => {
                tracing::warn!(error = %e, "readiness: redis unreachable");
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "session_store_unavailable",
                    "The session store (Redis) is unreachable.",
                )
            }
        },
    }
}
