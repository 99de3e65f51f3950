//! The ops API (`/admin/*`) and the identity service's webhook (`/hooks/users`).
//!
//! Admin callers: `Authorization: Bearer <admin.token>` (constant-time compare), or any
//! authenticated identity (Bearer JWT or cookie session) in the `admin.group` group. Everyone
//! else: 401 without credentials, 403 with the wrong ones.

pub mod hooks;
pub mod ops;

use std::sync::Arc;

use axum::{
    extract::{Path, Query, Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::{
    clock::Clock,
    config::{AdminConfig, HooksConfig},
    credentials::{vault::CredentialVault, KeyRing},
    error::ApiError,
    extract::JsonBody,
    librechat::TokenManager,
    provisioner::Provisioner,
    redis_conn::RedisHandle,
    session::{auth::bearer_token, authenticate, Authenticator, SessionRegistry},
    telemetry::metrics::Metrics,
};

use ops::{NewUser, OpsError};

/// What operations touch: the vault, the queue, sessions, LibreChat logins — and how an
/// operator is recognised. Used by the admin API, the webhook and the CLI alike.
pub struct Ops {
    pub auth: Arc<Authenticator>,
    pub vault: CredentialVault,
    pub provisioner: Provisioner,
    pub sessions: Arc<SessionRegistry>,
    pub tokens: Arc<TokenManager>,
    pub keyring: Arc<KeyRing>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub redis: RedisHandle,
    pub admin_cfg: AdminConfig,
    pub hooks_cfg: HooksConfig,
}

/// Route layer of `/admin/*`: the caller must be an operator — `Authorization: Bearer
/// <admin.token>`, or an identity (JWT or cookie session) in `admin.group`. No credentials: 401;
/// the store down: 503; any other credential: 403.
pub async fn require_operator(
    State(ops): State<Arc<Ops>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let token = &ops.admin_cfg.token;
    let by_token = bearer_token(&parts).is_some_and(|presented| {
        !token.is_empty() && bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes()))
    });
    if !by_token {
        let denied = ApiError::Forbidden("This needs an operator (see admin.group / admin.token).");
        match authenticate(&ops.auth, &parts, false).await {
            Ok(caller) => {
                let group = &ops.admin_cfg.group;
                if group.is_empty() || !caller.user.groups.iter().any(|g| g == group) {
                    return Err(denied);
                }
            }
            Err(e @ (ApiError::Unauthenticated | ApiError::SessionStoreUnavailable)) => {
                return Err(e)
            }
            Err(_) => return Err(denied),
        }
    }
    Ok(next.run(Request::from_parts(parts, body)).await)
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Invalid(m) => ApiError::BadRequest(m),
            OpsError::Provision(e @ crate::provisioner::ProvisionError::EmailTaken { .. }) => {
                ApiError::Conflict("email_conflict", e.to_string())
            }
            other => {
                tracing::warn!(error = %other, "admin operation failed");
                ApiError::SessionStoreUnavailable
            }
        }
    }
}

/// `POST /admin/users {user_id, email, name?}` → 202 `{job_id, created}`.
pub async fn add_user(
    State(state): State<Arc<Ops>>,
    JsonBody(user): JsonBody<NewUser>,
) -> Result<Response, ApiError> {
    let (job_id, created) = ops::add_user(&state, user, "admin", ops::Reactivation::Lift).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job_id": job_id, "created": created })),
    )
        .into_response())
}

/// `GET /admin/users/{id}`: state, LibreChat user id, attempts, last error — never the password.
pub async fn show_user(
    State(state): State<Arc<Ops>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    ops::user_status(&state, &id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

#[derive(Deserialize)]
pub struct JobsQuery {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /admin/jobs?state=dead|pending|delayed|running|done[&limit=N]`.
pub async fn list_jobs(
    State(state): State<Arc<Ops>>,
    Query(q): Query<JobsQuery>,
) -> Result<Json<Value>, ApiError> {
    let job_state = ops::parse_state(q.state.as_deref().unwrap_or("dead"))?;
    let jobs = state
        .provisioner
        .queue
        .list(job_state, q.limit.unwrap_or(100).min(1000))
        .await
        .map_err(OpsError::from)?;
    Ok(Json(json!({
        "jobs": jobs.iter().map(ops::job_json).collect::<Vec<_>>()
    })))
}

/// `POST /admin/jobs/{id}/retry` → 202 `{job_id}` (the user's active job if one already runs).
pub async fn retry_job(
    State(state): State<Arc<Ops>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.provisioner.queue.requeue(&id).await {
        Ok(job_id) => Ok((StatusCode::ACCEPTED, Json(json!({ "job_id": job_id }))).into_response()),
        Err(provisioning::QueueError::NotFound(_)) => Err(ApiError::NotFound),
        Err(e) => Err(OpsError::from(e).into()),
    }
}

/// `POST /admin/users/{id}/deactivate` → `{revoked: N, cancelled_job}`: what the identity
/// service's `user.deactivated` webhook does, for ops.
pub async fn deactivate_user(
    State(state): State<Arc<Ops>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        ops::deactivate(&state, &id, "deactivated by an operator").await?,
    ))
}

/// `DELETE /admin/users/{id}/sessions` → `{revoked: N}`.
pub async fn revoke_sessions(
    State(state): State<Arc<Ops>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let revoked = state.sessions.revoke_all(&id).await?;
    state
        .metrics
        .sessions
        .get_or_create(&crate::telemetry::metrics::EventLabels { event: "revoked" })
        .inc_by(revoked as u64);
    tracing::info!(user = %id, revoked, "sessions revoked by an operator");
    Ok(Json(json!({ "revoked": revoked })))
}
