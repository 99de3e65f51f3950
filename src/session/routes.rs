//! `/auth/*`: sign in (password or handed-over token), sign out, and who am I.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    http::request::Parts,
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tower_sessions::Session;

use super::{
    auth::{authenticate, bearer_token, end_session, write_session, Authenticated, Authenticator},
    registry::IdentityTokenSet,
    SessionData, SessionError, UserInfo,
};
use crate::{
    credentials::vault::{CredentialStatus, CredentialVault},
    error::ApiError,
    extract::{parse_json, JsonBody, SmallBody},
    identity::{client::IdentityClientError, IdentityTokens, VerifiedIdentity},
    provisioner::Provisioner,
    throttle::{LoginThrottle, ThrottleError},
};

/// What signing in needs beyond authenticating: the login throttle, the credential vault (no
/// session for a deactivated user) and the provisioner (just-in-time, off the sign-in path).
pub struct SignIn {
    pub auth: Arc<Authenticator>,
    pub throttle: Arc<LoginThrottle>,
    pub vault: CredentialVault,
    pub provisioner: Provisioner,
}

/// Extra fields (e.g. a "remember me" flag a web app sends) are ignored.
#[derive(Deserialize)]
pub struct LoginRequest {
    email: Option<String>,
    username: Option<String>,
    password: String,
}

/// `POST /auth/login {email|username, password}`: signs in at the identity service and opens a
/// cookie session. Failed attempts are throttled per client address and per identifier
/// (`src/throttle.rs`): over a limit the identity service is not called at all.
pub async fn login(
    State(state): State<Arc<SignIn>>,
    parts: Parts,
    session: Session,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Json<Value>, ApiError> {
    state.auth.csrf.check_origin(&parts.headers)?;
    let caller = state.auth.end_users.end_user_of(&parts)?;
    let identifier = body
        .email
        .or(body.username)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::BadRequest("Send `email` or `username`.".into()))?;
    let max = state.throttle.max_identifier_bytes();
    if identifier.len() > max {
        return Err(ApiError::BadRequest(format!(
            "`email`/`username` is longer than {max} bytes."
        )));
    }
    if body.password.is_empty() {
        return Err(ApiError::BadRequest("Send a non-empty `password`.".into()));
    }
    let attempt = match state.throttle.begin(caller.ip, &identifier).await {
        Ok(attempt) => attempt,
        Err(e) => {
            if matches!(e, ThrottleError::Throttled(_)) {
                state.auth.metrics.identity("login", "throttled");
                tracing::debug!(ip = %caller.ip, "sign-in throttled");
            }
            return Err(e.into());
        }
    };
    let tokens = match state
        .auth
        .identity
        .obtain(&identifier, &body.password, &caller)
        .await
    {
        Ok(t) => {
            state.auth.metrics.identity("login", "ok");
            state.throttle.succeeded(attempt).await;
            t
        }
        Err(e @ IdentityClientError::Rejected) => {
            state.auth.metrics.identity("login", "rejected");
            state.throttle.failed(attempt);
            return Err(e.into());
        }
        Err(e) => {
            state.auth.metrics.identity("login", "error");
            state.throttle.inconclusive(attempt).await;
            return Err(e.into());
        }
    };
    let identity = state
        .auth
        .verifier
        .verify(&tokens.access)
        .await
        .map_err(|e| ApiError::from(IdentityClientError::Token(e)))?;
    let data = open_session(&state, &session, &identity, tokens).await?;
    Ok(Json(me_body(&data.user, Some(&data))))
}

#[derive(Deserialize, Default)]
pub struct ExchangeRequest {
    refresh: Option<String>,
}

/// `POST /auth/session` with `Authorization: Bearer <identity access token>` and optionally
/// `{refresh}`: the web app, which signs users in itself, hands a user over to a cookie session.
pub async fn exchange(
    State(state): State<Arc<SignIn>>,
    parts: Parts,
    session: Session,
    SmallBody(body): SmallBody,
) -> Result<Json<Value>, ApiError> {
    state.auth.csrf.check_origin(&parts.headers)?;
    let access = bearer_token(&parts).ok_or(ApiError::Unauthenticated)?;
    let body: ExchangeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ExchangeRequest::default()
    } else {
        parse_json(&body)?
    };
    let identity = state.auth.verifier.verify(access).await?;
    let refresh = body.refresh.filter(|r| !r.is_empty());
    let tokens = IdentityTokens {
        access: access.to_owned(),
        refresh,
    };
    let data = open_session(&state, &session, &identity, tokens).await?;
    Ok(Json(me_body(&data.user, Some(&data))))
}

/// Opens a fresh session for `identity`. Any session the cookie pointed at is ended first and
/// the id is new, so a planted session id is worthless (no fixation).
async fn open_session(
    state: &SignIn,
    session: &Session,
    identity: &VerifiedIdentity,
    tokens: IdentityTokens,
) -> Result<SessionData, ApiError> {
    // A deactivated user gets no new session (their identity token may live a few minutes
    // more). Without the credential store the check is skipped: chat enforces it anyway.
    match state.vault.get(&identity.user_id).await {
        Ok(Some(record)) if record.status == CredentialStatus::Disabled => {
            return Err(ApiError::AccountDisabled)
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "deactivation check skipped at sign-in"),
    }
    let previous: Option<SessionData> = session
        .get(super::DATA_KEY)
        .await
        .map_err(|e| ApiError::from(SessionError::from(e)))?;
    if let (Some(prev), Some(id)) = (previous, session.id()) {
        state
            .auth
            .sessions
            .forget(&prev.user.id, &id.to_string())
            .await?;
    }
    session
        .cycle_id()
        .await
        .map_err(|e| ApiError::from(SessionError::from(e)))?;
    session.clear().await;

    let now = state.auth.clock.now().unix_timestamp();
    let cfg = &state.auth.session_cfg;
    let absolute = now + cfg.absolute_lifetime_secs as i64;
    let data = SessionData {
        user: UserInfo::from(identity),
        created_at: now,
        absolute_expires_at: absolute,
        idle_expires_at: (now + cfg.idle_timeout_secs as i64).min(absolute),
        last_slide_at: now,
        identity_exp: identity.expires_at,
        identity_generation: 0,
    };
    write_session(session, &data).await?;
    session
        .save()
        .await
        .map_err(|e| ApiError::from(SessionError::from(e)))?;
    let sid = session.id().ok_or(ApiError::Internal)?.to_string();
    let until = OffsetDateTime::from_unix_timestamp(absolute).map_err(|_| ApiError::Internal)?;
    let stored = IdentityTokenSet {
        access: tokens.access,
        refresh: tokens.refresh,
        access_exp: identity.expires_at,
        generation: 0,
    };
    state
        .auth
        .sessions
        .register(&data.user.id, &sid, &stored, until)
        .await?;
    tracing::info!(user = %data.user.id, "session opened");
    state.auth.metrics.session("created");
    // Just-in-time provisioning, off the sign-in path: sign-in never waits for it.
    let provisioner = state.provisioner.clone();
    let user = data.user.clone();
    tokio::spawn(async move {
        if let Err(e) = provisioner.ensure(&user, "login").await {
            tracing::warn!(user = %user.id, error = %e, "cannot enqueue provisioning");
        }
    });
    Ok(data)
}

/// `POST /auth/logout`: ends the cookie session. Idempotent: no session is fine too.
pub async fn logout(
    State(auth): State<Arc<Authenticator>>,
    parts: Parts,
    session: Session,
) -> Result<Json<Value>, ApiError> {
    let data: Option<SessionData> = session
        .get(super::DATA_KEY)
        .await
        .map_err(|e| ApiError::from(SessionError::from(e)))?;
    if let (Some(data), Some(id)) = (data, session.id()) {
        auth.csrf.check_cookie_request(&parts)?;
        end_session(&auth, &session, &data.user.id, &id.to_string()).await;
        tracing::info!(user = %data.user.id, "session closed");
    }
    Ok(Json(json!({ "ok": true })))
}

#[derive(Deserialize)]
pub struct MeQuery {
    slide: Option<String>,
}

/// `GET /auth/me[?slide=false]`: the user and the session's deadlines; never a token.
pub async fn me(
    State(auth): State<Arc<Authenticator>>,
    Query(query): Query<MeQuery>,
    parts: Parts,
) -> Result<Json<Value>, ApiError> {
    let slide = !matches!(query.slide.as_deref(), Some("false" | "0"));
    let Authenticated { user, session } = authenticate(&auth, &parts, slide).await?;
    Ok(Json(me_body(&user, session.as_ref().map(|s| &*s.data))))
}

fn me_body(user: &UserInfo, data: Option<&SessionData>) -> Value {
    let session = data.map(|d| {
        json!({
            "expires_at": rfc3339(d.absolute_expires_at),
            "idle_expires_at": rfc3339(d.idle_expires_at),
        })
    });
    json!({ "user": user, "session": session })
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
