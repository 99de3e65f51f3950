//! `POST /hooks/users`: the identity service tells us a user was created or deactivated.
//!
//! Authenticated by `X-BFF-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>`
//! with `X-BFF-Timestamp: <unix seconds>`; a timestamp outside `hooks.tolerance_secs` is refused,
//! so a captured request cannot be replayed later.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

use std::sync::Arc;

use super::{
    ops::{self, NewUser},
    Ops,
};
use crate::{
    error::ApiError,
    extract::{parse_json, SmallBody},
};

#[derive(Deserialize)]
struct HookEvent {
    event: String,
    user: HookUser,
}

#[derive(Deserialize)]
struct HookUser {
    id: serde_json::Value,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    /// Django's `is_active`: on `user.updated`, false deactivates and true registers again.
    #[serde(default)]
    is_active: Option<bool>,
}

/// The signature header value for `body` at `timestamp` (what the identity service sends).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks signature and freshness; returns the signed timestamp.
fn verify(state: &Ops, headers: &HeaderMap, body: &[u8]) -> Result<i64, ApiError> {
    let secret = state.hooks_cfg.secret.expose().as_bytes();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let timestamp: i64 = header("x-bff-timestamp")
        .and_then(|t| t.trim().parse().ok())
        .ok_or(ApiError::HookSignature)?;
    let now = state.clock.now().unix_timestamp();
    if (now - timestamp).unsigned_abs() > state.hooks_cfg.tolerance_secs {
        return Err(ApiError::HookSignature);
    }
    let presented = header("x-bff-signature")
        .and_then(|s| s.trim().strip_prefix("sha256="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or(ApiError::HookSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| ApiError::Internal)?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&presented)
        .map_err(|_| ApiError::HookSignature)?;
    Ok(timestamp)
}

/// Each signed event is acted on once, and never after a newer one for the same user: within
/// the tolerance window a captured `user.created` could otherwise be replayed to undo a
/// deactivation. KEYS: seen, last. ARGV: timestamp, ttl. Returns `ok`, `duplicate` or `stale`.
/// Built once: its SHA1 is not recomputed per call.
static ADMIT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'duplicate' end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last > tonumber(ARGV[1]) then return 'stale' end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 'ok'
"#,
    )
});

async fn admit(
    state: &Ops,
    headers: &HeaderMap,
    user_id: &str,
    timestamp: i64,
) -> Result<&'static str, ApiError> {
    let signature = headers
        .get("x-bff-signature")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let digest = hex::encode(<Sha256 as sha2::Digest>::digest(signature));
    let ttl = state.hooks_cfg.tolerance_secs.saturating_mul(2).max(1);
    let mut conn = state.redis.conn().await.map_err(|e| {
        tracing::warn!(error = %e, "webhook: store unavailable");
        ApiError::SessionStoreUnavailable
    })?;
    let verdict: String = ADMIT
        .key(state.redis.key(&format!("{{hooks}}:seen:{digest}")))
        .key(state.redis.key(&format!("{{hooks}}:last:{user_id}")))
        .arg(timestamp)
        .arg(ttl)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "webhook: store unavailable");
            ApiError::SessionStoreUnavailable
        })?;
    Ok(match verdict.as_str() {
        "duplicate" => "duplicate",
        "stale" => "stale",
        _ => "ok",
    })
}

pub async fn users(
    State(state): State<Arc<Ops>>,
    headers: HeaderMap,
    SmallBody(body): SmallBody,
) -> Result<Response, ApiError> {
    if state.hooks_cfg.secret.is_empty() {
        return Err(ApiError::NotFound);
    }
    let timestamp = verify(&state, &headers, &body)?;
    let event: HookEvent = parse_json(&body)?;
    let user_id = match &event.user.id {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => {
            return Err(ApiError::BadRequest(
                "`user.id` must be a string or number.".into(),
            ))
        }
    };
    if user_id.is_empty() || user_id.len() > 256 || user_id.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "`user.id` must be 1–256 characters without control characters.".into(),
        ));
    }
    match admit(&state, &headers, &user_id, timestamp).await? {
        "ok" => {}
        verdict => {
            // Acknowledged (the sender need not retry) but not acted on.
            tracing::info!(user = %user_id, verdict, "webhook event ignored");
            return Ok(Json(json!({ "ignored": verdict })).into_response());
        }
    }
    let deactivated = event.event == "user.deactivated"
        || (event.event == "user.updated" && event.user.is_active == Some(false));
    if deactivated {
        let outcome = ops::deactivate(&state, &user_id, "deactivated by the identity service")
            .await
            .map_err(ApiError::from)?;
        return Ok(Json(outcome).into_response());
    }
    match event.event.as_str() {
        "user.created" | "user.updated" => {
            let email = event
                .user
                .email
                .ok_or_else(|| ApiError::BadRequest("`user.email` is required.".into()))?;
            // Only a creation or an explicit `is_active: true` lifts a deactivation.
            let reactivation =
                if event.event == "user.created" || event.user.is_active == Some(true) {
                    ops::Reactivation::Lift
                } else {
                    ops::Reactivation::Keep
                };
            let (job_id, created) = ops::add_user(
                &state,
                NewUser {
                    user_id,
                    email,
                    name: event.user.name,
                },
                "webhook",
                reactivation,
            )
            .await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "job_id": job_id, "created": created })),
            )
                .into_response())
        }
        other => Err(ApiError::BadRequest(format!(
            "Unknown event {other:?}: expected user.created, user.updated or user.deactivated."
        ))),
    }
}
