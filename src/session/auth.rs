//! Who is calling: `Authorization: Bearer <identity JWT>` (mobile) or the session cookie (web).
//!
//! The warm cookie path serves from this replica's copy of the session (`session::cache`, Redis
//! store) or reads the record once (one Redis GET), and writes it back only when the idle timer
//! is pushed forward (at most once per `slide_interval`) or the identity token was refreshed.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::{header, request::Parts},
};
use time::OffsetDateTime;
use tower_sessions::{session::Id, Expiry, Session};

use super::{
    csrf::CsrfPolicy,
    registry::{IdentityTokenSet, RefreshLockError},
    SessionData, SessionError, SessionRegistry, UserInfo, DATA_KEY,
};
use crate::{
    clock::Clock,
    config::SessionConfig,
    end_user::{EndUser, EndUsers},
    error::ApiError,
    identity::{
        client::{IdentityClientError, DEFAULT_RETRY_AFTER},
        verifier::VerifyError,
    },
    identity::{IdentityClient, IdentityVerifier},
    telemetry::metrics::Metrics,
};

/// What authenticating a request needs: the identity verifier and client, the session registry,
/// the CSRF policy, and how the end user is recognised. Every route that needs a caller takes
/// this (as `Arc<Authenticator>` state), nothing more.
pub struct Authenticator {
    pub clock: Arc<dyn Clock>,
    pub verifier: Arc<IdentityVerifier>,
    pub identity: IdentityClient,
    pub sessions: Arc<SessionRegistry>,
    pub csrf: Arc<CsrfPolicy>,
    pub metrics: Arc<Metrics>,
    pub end_users: Arc<EndUsers>,
    /// `[session]`: timeouts, cookie cap.
    pub session_cfg: SessionConfig,
    /// `identity.refresh_skew_secs`.
    pub refresh_skew_secs: i64,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user: UserInfo,
    /// The cookie session, when authenticated by cookie.
    pub session: Option<CookieSession>,
}

#[derive(Debug, Clone)]
pub struct CookieSession {
    pub id: String,
    /// Shared with this replica's copy of the session (no clone on the warm path).
    pub data: Arc<SessionData>,
}

/// Extractor: the authenticated caller, idle timer slid.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub Authenticated);

impl<S> FromRequestParts<S> for CurrentUser
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        authenticate(&Arc::<Authenticator>::from_ref(state), parts, true)
            .await
            .map(CurrentUser)
    }
}

/// The bearer token of an `Authorization: Bearer` header (scheme case-insensitive).
pub fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authenticates the request; `slide` pushes the session's idle timer forward.
pub async fn authenticate(
    auth: &Arc<Authenticator>,
    parts: &Parts,
    slide: bool,
) -> Result<Authenticated, ApiError> {
    if parts.headers.contains_key(header::AUTHORIZATION) {
        let token = bearer_token(parts).ok_or(ApiError::Unauthenticated)?;
        let identity = auth.verifier.verify(token).await?;
        return Ok(Authenticated {
            user: UserInfo::from(identity),
            session: None,
        });
    }
    authenticate_cookie(auth, parts, slide, CsrfRule::Header).await
}

/// The CSRF rule a cookie-authenticated request must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrfRule {
    /// The configured header, and an allowlisted (or same-host) `Origin`: the product's apps.
    Header,
    /// Same origin only (LibreChat's web UI under `ui.mount_path`, which sends no CSRF header).
    SameOrigin,
}

/// Authenticates by the session cookie alone (an `Authorization` header is not looked at).
pub async fn authenticate_cookie(
    auth: &Arc<Authenticator>,
    parts: &Parts,
    slide: bool,
    rule: CsrfRule,
) -> Result<Authenticated, ApiError> {
    // A hostile cookie header is refused before the session is read.
    let cookie_bytes: usize = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.len())
        .sum();
    if cookie_bytes > auth.session_cfg.max_cookie_bytes {
        return Err(ApiError::Unauthenticated);
    }
    let session = parts
        .extensions
        .get::<Session>()
        .cloned()
        .ok_or(ApiError::Internal)?;
    let now = auth.clock.now().unix_timestamp();
    // Warm: this process's copy says the session is live and nothing is due (see
    // `session::cache`). Anything else reads the record.
    if let Some(id) = session.id() {
        if let Some(served) = served_from_copy(auth, parts, &id, slide, rule, now) {
            return served.map(|data| Authenticated {
                user: data.user.clone(),
                session: Some(CookieSession {
                    id: id.to_string(),
                    data,
                }),
            });
        }
    }
    // Boxed: the cold path's state (record load, refresh, write) stays out of the warm path's
    // future, which every proxied request carries.
    Box::pin(read_session(auth, parts, &session, slide, rule, now)).await
}

/// The cookie path without tower-sessions' layer (the proxy's warm lane, `proxy::lane`): the
/// session's copy here, when the cookie is unambiguous — exactly one cookie of that name, a plain
/// id, nothing percent-encoded, within `session.max_cookie_bytes` — and the copy serves as it is
/// with the idle timer sliding. `None`: anything else, which goes through the session layer
/// (where tower-sessions reads the cookie) and [`authenticate_cookie`].
pub fn authenticate_from_copy(
    auth: &Authenticator,
    parts: &Parts,
    cookie_name: &str,
    rule: CsrfRule,
) -> Option<Result<Arc<SessionData>, ApiError>> {
    auth.sessions.store().cache()?;
    let id = plain_session_id(parts, cookie_name, auth.session_cfg.max_cookie_bytes)?;
    let now = auth.clock.now().unix_timestamp();
    served_from_copy(auth, parts, &id, true, rule, now)
}

/// The session id of the one cookie named `name`, when reading it needs no judgement.
fn plain_session_id(parts: &Parts, name: &str, max_bytes: usize) -> Option<Id> {
    let mut total = 0;
    let mut found = None;
    for value in parts.headers.get_all(header::COOKIE) {
        total += value.len();
        // Percent-encoded names or values are decoded by tower-cookies: left to it.
        let value = value.to_str().ok().filter(|v| !v.contains('%'))?;
        if total > max_bytes {
            return None;
        }
        for cookie in cookie::Cookie::split_parse(value).flatten() {
            if cookie.name() == name {
                if found.is_some() {
                    return None;
                }
                found = Some(cookie.value().parse::<Id>().ok()?);
            }
        }
    }
    found
}

/// This replica's copy of session `id`, when it says the session is live and nothing is due,
/// and the request passes `rule`; `None` sends the request to the record.
fn served_from_copy(
    auth: &Authenticator,
    parts: &Parts,
    id: &Id,
    slide: bool,
    rule: CsrfRule,
    now: i64,
) -> Option<Result<Arc<SessionData>, ApiError>> {
    let cache = auth.sessions.store().cache()?;
    let data = cache.get(id).filter(|d| nothing_due(auth, d, now, slide))?;
    let checked = match rule {
        CsrfRule::Header => auth.csrf.check_cookie_request(parts),
        CsrfRule::SameOrigin => auth.csrf.check_same_origin(parts),
    };
    Some(checked.map(|()| data))
}

/// The cold cookie path: reads the record, ends it when it has expired, refreshes the identity
/// token and slides the idle timer when due, and keeps a copy for the warm path.
async fn read_session(
    auth: &Arc<Authenticator>,
    parts: &Parts,
    session: &Session,
    slide: bool,
    rule: CsrfRule,
    now: i64,
) -> Result<Authenticated, ApiError> {
    let cache = auth.sessions.store().cache();
    let epoch = cache.map(|c| c.epoch());
    let data: Option<SessionData> = session
        .get(DATA_KEY)
        .await
        .map_err(|e| ApiError::from(SessionError::from(e)))?;
    let Some(mut data) = data else {
        return Err(ApiError::Unauthenticated);
    };
    let sid = session.id().map(|id| id.to_string()).unwrap_or_default();
    if now >= data.absolute_expires_at || now >= data.idle_expires_at {
        end_session(auth, session, &data.user.id, &sid).await;
        return Err(ApiError::SessionEnded);
    }
    match rule {
        CsrfRule::Header => auth.csrf.check_cookie_request(parts)?,
        CsrfRule::SameOrigin => auth.csrf.check_same_origin(parts)?,
    }

    let mut changed = false;
    let skew = auth.refresh_skew_secs;
    if now + skew >= data.identity_exp {
        let caller = auth.end_users.end_user_of(parts)?;
        refresh_identity(auth, &caller, session, &sid, &mut data, now).await?;
        changed = true;
    }
    let cfg = &auth.session_cfg;
    if slide && now - data.last_slide_at >= cfg.slide_interval_secs as i64 {
        data.idle_expires_at = (now + cfg.idle_timeout_secs as i64).min(data.absolute_expires_at);
        data.last_slide_at = now;
        changed = true;
    }
    if changed {
        write_session(session, &data).await?;
    }
    let data = Arc::new(data);
    if let (Some(cache), Some(id), Some(epoch)) = (cache, session.id(), epoch) {
        cache.keep(id, data.clone(), epoch);
    }
    Ok(Authenticated {
        user: data.user.clone(),
        session: Some(CookieSession { id: sid, data }),
    })
}

/// Whether a session copy may serve as it is: live, its identity token not due for a refresh,
/// and (with `slide`) its idle timer not due to be pushed forward.
fn nothing_due(auth: &Authenticator, data: &SessionData, now: i64, slide: bool) -> bool {
    let cfg = &auth.session_cfg;
    now < data.absolute_expires_at
        && now < data.idle_expires_at
        && now + auth.refresh_skew_secs < data.identity_exp
        && !(slide && now - data.last_slide_at >= cfg.slide_interval_secs as i64)
}

/// Stores the session data and pins the record's (and cookie's) expiry to the idle deadline,
/// which never passes the absolute one.
pub async fn write_session(session: &Session, data: &SessionData) -> Result<(), ApiError> {
    session
        .insert(DATA_KEY, data)
        .await
        .map_err(|e| ApiError::from(SessionError::from(e)))?;
    let until = OffsetDateTime::from_unix_timestamp(data.idle_expires_at)
        .map_err(|_| ApiError::Internal)?;
    session.set_expiry(Some(Expiry::AtDateTime(until)));
    Ok(())
}

/// Destroys a cookie session everywhere; failures are logged, the caller answers 401 anyway.
pub async fn end_session(auth: &Arc<Authenticator>, session: &Session, user_id: &str, sid: &str) {
    auth.metrics.session("ended");
    if let Err(e) = auth.sessions.forget(user_id, sid).await {
        tracing::warn!(error = %e, "could not delete ended session");
    }
    if let Err(e) = session.flush().await {
        tracing::warn!(error = %e, "could not flush ended session");
    }
}

/// Refreshes the session's identity access token, single-flight per session across requests
/// and replicas. SimpleJWT rotates and blacklists refresh tokens, so a second refresh with the
/// same token would end the user's identity session.
///
/// The locked refresh runs detached from the request (a spawned task this request awaits): once
/// the identity service has rotated the refresh token, the new one is stored even if the client
/// has gone away meanwhile (a phone backgrounding mid-request), and the lock is released.
///
/// Only a definite refusal (400/401/403) ends the session. When the identity service says "later"
/// (429, 5xx, timeout), the session is kept: a still-valid access token goes on serving, else the
/// answer is 503 with `Retry-After`, and this process does not ask again for that long.
async fn refresh_identity(
    auth: &Arc<Authenticator>,
    caller: &EndUser,
    session: &Session,
    sid: &str,
    data: &mut SessionData,
    now: i64,
) -> Result<(), ApiError> {
    if let Some(wait) = auth.sessions.refresh_deferred(sid, now) {
        return refresh_deferred(auth, session, sid, data, now, wait).await;
    }
    let task = {
        let (auth, caller, session) = (auth.clone(), caller.clone(), session.clone());
        let (sid, mut data) = (sid.to_owned(), data.clone());
        tokio::spawn(async move {
            let guard = auth
                .sessions
                .lock_refresh(&sid)
                .await
                .map_err(|e| match e {
                    RefreshLockError::Busy => ApiError::Busy(2),
                    RefreshLockError::Store(e) => ApiError::from(e),
                })?;
            let result = refresh_locked(&auth, &caller, &session, &sid, &mut data, now).await;
            guard.release().await;
            result.map(|()| data)
        })
    };
    match task.await {
        Ok(Ok(refreshed)) => {
            *data = refreshed;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(e) => {
            tracing::error!(error = %e, "identity refresh task failed");
            Err(ApiError::Internal)
        }
    }
}

/// While the identity service's "later" holds: adopt tokens refreshed meanwhile (by another
/// replica), serve a still-valid access token, else 503 with the seconds left.
async fn refresh_deferred(
    auth: &Arc<Authenticator>,
    session: &Session,
    sid: &str,
    data: &mut SessionData,
    now: i64,
    wait: u64,
) -> Result<(), ApiError> {
    let Some(current) = unchanged_tokens(auth, session, sid, data).await? else {
        return Ok(());
    };
    if now < current.access_exp {
        return Ok(());
    }
    Err(ApiError::IdentityThrottled(wait))
}

/// The session's stored tokens when they are still the generation `data` saw; `None` when
/// another request (or replica) refreshed meanwhile, whose result `data` then adopts. No tokens
/// at all: the session is over.
async fn unchanged_tokens(
    auth: &Arc<Authenticator>,
    session: &Session,
    sid: &str,
    data: &mut SessionData,
) -> Result<Option<IdentityTokenSet>, ApiError> {
    let Some(current) = auth.sessions.tokens(sid).await? else {
        end_session(auth, session, &data.user.id, sid).await;
        return Err(ApiError::SessionEnded);
    };
    if current.generation != data.identity_generation {
        data.identity_exp = current.access_exp;
        data.identity_generation = current.generation;
        return Ok(None);
    }
    Ok(Some(current))
}

async fn refresh_locked(
    auth: &Arc<Authenticator>,
    caller: &EndUser,
    session: &Session,
    sid: &str,
    data: &mut SessionData,
    now: i64,
) -> Result<(), ApiError> {
    let Some(current) = unchanged_tokens(auth, session, sid, data).await? else {
        return Ok(());
    };
    let Some(refresh) = current.refresh.as_deref() else {
        // Handed over without a refresh token: the session lives as long as the access token.
        if now < current.access_exp {
            return Ok(());
        }
        end_session(auth, session, &data.user.id, sid).await;
        return Err(ApiError::SessionEnded);
    };
    let refreshed = auth.identity.refresh(refresh, caller).await;
    auth.metrics.identity(
        "refresh",
        match &refreshed {
            Ok(_) => "ok",
            Err(IdentityClientError::Rejected) => "rejected",
            Err(IdentityClientError::Throttled { .. }) => "throttled",
            Err(_) => "error",
        },
    );
    let issued = match refreshed {
        Ok(tokens) => tokens,
        Err(IdentityClientError::Rejected) => {
            tracing::info!(user = %data.user.id, "identity refresh refused; ending session");
            end_session(auth, session, &data.user.id, sid).await;
            return Err(ApiError::SessionEnded);
        }
        Err(e) => {
            // No verdict on the session: keep it, and give the identity service room.
            let retry_after = match &e {
                IdentityClientError::Throttled { retry_after } => *retry_after,
                _ => DEFAULT_RETRY_AFTER,
            };
            auth.sessions.defer_refresh(sid, now, retry_after);
            if now < current.access_exp {
                tracing::warn!(error = %e, "identity refresh failed; the access token is still valid");
                return Ok(());
            }
            tracing::warn!(error = %e, "identity refresh failed; keeping the session");
            return Err(e.into());
        }
    };
    // Without rotation the old refresh token stays valid.
    let refresh = issued.refresh.or(current.refresh);
    let identity = match auth.verifier.verify(&issued.access).await {
        Ok(identity) if identity.user_id == data.user.id => identity,
        Err(e @ VerifyError::KeysUnavailable { .. }) => {
            // The identity service just rotated the refresh token: keep the new pair, or the
            // session would die with the next refresh. It is verified at the next refresh.
            let retry_after_secs = match &e {
                VerifyError::KeysUnavailable {
                    retry_after_secs, ..
                } => *retry_after_secs,
                _ => DEFAULT_RETRY_AFTER.as_secs(),
            };
            let tokens = IdentityTokenSet {
                access: issued.access,
                refresh,
                access_exp: current.access_exp,
                generation: current.generation + 1,
            };
            auth.sessions.update_tokens(sid, &tokens).await?;
            data.identity_generation = tokens.generation;
            auth.sessions
                .defer_refresh(sid, now, Duration::from_secs(retry_after_secs));
            tracing::warn!(error = %e, "refreshed identity token cannot be verified yet; kept");
            return if now < current.access_exp {
                Ok(())
            } else {
                Err(e.into())
            };
        }
        Ok(_) | Err(_) => {
            tracing::warn!(
                "refreshed identity token does not verify for this user; ending session"
            );
            end_session(auth, session, &data.user.id, sid).await;
            return Err(ApiError::SessionEnded);
        }
    };
    let tokens = IdentityTokenSet {
        access: issued.access,
        refresh,
        access_exp: identity.expires_at,
        generation: current.generation + 1,
    };
    auth.sessions.update_tokens(sid, &tokens).await?;
    auth.sessions.clear_deferral(sid);
    data.identity_exp = identity.expires_at;
    data.identity_generation = tokens.generation;
    data.user = UserInfo::from(&identity);
    Ok(())
}
