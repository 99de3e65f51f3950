//! The edge's one error shape: `{"error":"<snake_case_code>","message":"<sentence>"}`.
//!
//! Modules keep their own typed errors; `From` impls here decide the status and the wording a
//! client sees. Upstream bodies and secrets never reach the message.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required")]
    Unauthenticated,
    #[error("the identity token was rejected: {0}")]
    InvalidToken(String),
    #[error("the session has ended")]
    SessionEnded,
    #[error("the email/username or password is wrong")]
    BadCredentials,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Csrf(&'static str),
    #[error("the identity service is unavailable")]
    IdentityUnavailable,
    #[error("the session store is unavailable")]
    SessionStoreUnavailable,
    #[error("not found")]
    NotFound,
    #[error("the webhook signature or timestamp is not valid")]
    HookSignature,
    #[error("the request path is not acceptable")]
    BadPath,
    #[error("the request body exceeds the limit")]
    PayloadTooLarge,
    #[error("LibreChat is unreachable")]
    LibreChatUnavailable,
    #[error("LibreChat did not answer in time")]
    LibreChatTimeout,
    #[error("LibreChat refused the user's token")]
    LibreChatUnauthorized,
    #[error("the user's LibreChat account is being provisioned")]
    ProvisioningPending,
    #[error("the stored LibreChat credential no longer works")]
    CredentialInvalid,
    #[error("the user is deactivated")]
    AccountDisabled,
    #[error("LibreChat is rate limiting; retry after {0}s")]
    UpstreamRateLimited(u64),
    #[error("the user's email belongs to another user's chat account")]
    AccountConflict,
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("LibreChat has banned this user or address")]
    UpstreamBanned,
    #[error("internal error")]
    Internal,
    #[error("too many failed sign-ins; retry after {0}s")]
    LoginThrottled(u64),
    #[error("the request body stalled")]
    RequestTimeout,
    #[error("the request body is malformed")]
    MalformedBody,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The identity service's signing keys (JWKS) cannot be read; retry after the seconds.
    #[error("the identity signing keys are unavailable; retry after {0}s")]
    IdentityKeysUnavailable(u64),
    /// As [`ApiError::ProvisioningPending`], with the seconds until the user's job runs next.
    #[error("the user's LibreChat account is being provisioned; retry after {0}s")]
    ProvisioningPendingFor(u64),
    /// The identity service asked us to come back later (429, or 503 with `Retry-After`).
    #[error("the identity service is throttling; retry after {0}s")]
    IdentityThrottled(u64),
    /// Another request is renewing this user's upstream login and did not finish in time.
    #[error("a renewal for this user is still in progress; retry after {0}s")]
    Busy(u64),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated
            | Self::InvalidToken(_)
            | Self::SessionEnded
            | Self::BadCredentials => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) | Self::Csrf(_) => StatusCode::FORBIDDEN,
            Self::IdentityUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::SessionStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::HookSignature => StatusCode::UNAUTHORIZED,
            Self::BadPath => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::LibreChatUnavailable => StatusCode::BAD_GATEWAY,
            Self::LibreChatUnauthorized => StatusCode::UNAUTHORIZED,
            Self::LibreChatTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::ProvisioningPending | Self::CredentialInvalid | Self::UpstreamBanned => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamRateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::AccountDisabled => StatusCode::FORBIDDEN,
            Self::AccountConflict | Self::Conflict(..) => StatusCode::CONFLICT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::LoginThrottled(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::MalformedBody => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::IdentityKeysUnavailable(_) | Self::ProvisioningPendingFor(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::IdentityThrottled(_) | Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidToken(_) => "invalid_token",
            Self::SessionEnded => "session_ended",
            Self::BadCredentials => "invalid_credentials",
            Self::BadRequest(_) => "bad_request",
            Self::Forbidden(_) => "forbidden",
            Self::Csrf(_) => "csrf_rejected",
            Self::IdentityUnavailable => "identity_unavailable",
            Self::SessionStoreUnavailable => "session_store_unavailable",
            Self::NotFound => "not_found",
            Self::HookSignature => "invalid_signature",
            Self::BadPath => "bad_path",
            Self::PayloadTooLarge => "payload_too_large",
            Self::LibreChatUnavailable => "librechat_unavailable",
            Self::LibreChatUnauthorized => "librechat_unauthorized",
            Self::LibreChatTimeout => "librechat_timeout",
            Self::ProvisioningPending => "provisioning_pending",
            Self::CredentialInvalid => "librechat_credential_invalid",
            Self::AccountDisabled => "account_disabled",
            Self::UpstreamRateLimited(_) => "librechat_rate_limited",
            Self::UpstreamBanned => "librechat_banned",
            Self::AccountConflict => "account_conflict",
            Self::Conflict(code, _) => code,
            Self::Internal => "internal_error",
            Self::LoginThrottled(_) => "login_throttled",
            Self::RequestTimeout => "request_timeout",
            Self::MalformedBody => "malformed_body",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::IdentityKeysUnavailable(_) => "identity_keys_unavailable",
            Self::ProvisioningPendingFor(_) => "provisioning_pending",
            Self::IdentityThrottled(_) => "identity_unavailable",
            Self::Busy(_) => "busy",
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Unauthenticated => {
                "Sign in first: send the session cookie or an Authorization: Bearer token.".into()
            }
            Self::InvalidToken(e) => format!("The identity token was rejected: {e}."),
            Self::SessionEnded => "The session has ended; sign in again.".into(),
            Self::BadCredentials => "The email/username or password is wrong.".into(),
            Self::BadRequest(m) => m.clone(),
            Self::Forbidden(m) | Self::Csrf(m) => (*m).to_owned(),
            Self::IdentityUnavailable => {
                "The identity service did not answer as expected; try again shortly.".into()
            }
            Self::SessionStoreUnavailable => {
                "The session store is unreachable; try again shortly.".into()
            }
            Self::NotFound => "No such route.".into(),
            Self::HookSignature => {
                "The X-BFF-Signature / X-BFF-Timestamp headers are missing, wrong or too old."
                    .into()
            }
            Self::BadPath => {
                "The path has dot segments, encoded slashes, empty segments or control bytes."
                    .into()
            }
            Self::PayloadTooLarge => {
                "The request body is larger than this route accepts (64 KiB for /auth, admin and \
                 webhooks; librechat.max_request_body_bytes for /api/chat)."
                    .into()
            }
            Self::LibreChatUnavailable => "LibreChat is unreachable; try again shortly.".into(),
            Self::LibreChatTimeout => "LibreChat did not answer in time.".into(),
            Self::LibreChatUnauthorized => {
                "LibreChat refused the user's token; retry the request.".into()
            }
            Self::ProvisioningPending => {
                "Your chat account is being set up; retry in a few seconds.".into()
            }
            Self::CredentialInvalid => {
                "The chat account's stored credential no longer works; an operator must repair it."
                    .into()
            }
            Self::AccountDisabled => "This account has been deactivated.".into(),
            Self::UpstreamRateLimited(s) => {
                format!("LibreChat is rate limiting; retry after {s} seconds.")
            }
            Self::UpstreamBanned => {
                "LibreChat has temporarily banned this user or address; see the runbook.".into()
            }
            Self::AccountConflict => "Your chat account cannot be set up: its email address \
                 belongs to another user's chat account. Contact support."
                .into(),
            Self::Conflict(_, m) => m.clone(),
            Self::Internal => "Something went wrong on our side.".into(),
            Self::LoginThrottled(s) => {
                format!("Too many failed sign-in attempts; retry after {s} seconds.")
            }
            Self::RequestTimeout => {
                "The request body did not arrive in time (server.request_body_idle_timeout_secs \
                 between chunks of an upload, in all for a small body)."
                    .into()
            }
            Self::MalformedBody => {
                "The request body is malformed (broken chunked encoding or cut short).".into()
            }
            Self::MethodNotAllowed => "This route does not accept that method.".into(),
            Self::IdentityKeysUnavailable(s) => format!(
                "The identity service's signing keys cannot be fetched right now; retry after \
                 {s} seconds (your token was not rejected)."
            ),
            Self::ProvisioningPendingFor(s) => {
                format!("Your chat account is being set up; retry in {s} seconds.")
            }
            Self::IdentityThrottled(s) => format!(
                "The identity service is busy; retry after {s} seconds (you are still signed in)."
            ),
            Self::Busy(s) => format!("Your sign-in is being renewed; retry in {s} seconds."),
        }
    }
}

/// `Retry-After` of `provisioning_pending` when the job's next run is not known (queued or
/// running jobs finish within seconds).
pub const PROVISIONING_RETRY_SECS: u64 = 2;

/// `Retry-After` of `identity_unavailable` (identity service unreachable, timed out or 5xx).
pub const IDENTITY_RETRY_SECS: u64 = 5;

/// A JSON problem response with the given status, code and message.
pub fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    let mut res = (status, Json(json!({ "error": code, "message": message }))).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Response extension on the BFF's own error answers: the request's log line names the cause
/// (once) and `bff_errors_total` counts the code (see `telemetry::middleware`).
#[derive(Debug, Clone)]
pub struct ErrorCause {
    pub code: &'static str,
    pub cause: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = problem(self.status(), self.code(), &self.message());
        res.extensions_mut().insert(ErrorCause {
            code: self.code(),
            cause: self.to_string(),
        });
        if matches!(self, Self::Unauthenticated | Self::SessionEnded) {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let retry_after = match self {
            Self::ProvisioningPending => Some(PROVISIONING_RETRY_SECS),
            Self::ProvisioningPendingFor(s) | Self::IdentityKeysUnavailable(s) => Some(s),
            Self::UpstreamRateLimited(s) | Self::LoginThrottled(s) => Some(s),
            Self::IdentityThrottled(s) | Self::Busy(s) => Some(s),
            Self::IdentityUnavailable => Some(IDENTITY_RETRY_SECS),
            _ => None,
        };
        if let Some(secs) = retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<crate::librechat::TokenError> for ApiError {
    fn from(e: crate::librechat::TokenError) -> Self {
        use crate::librechat::TokenError as E;
        match e {
            E::ProvisioningPending => Self::ProvisioningPending,
            E::CredentialInvalid => Self::CredentialInvalid,
            E::Disabled => Self::AccountDisabled,
            E::Conflict => Self::AccountConflict,
            E::RejectedFresh => Self::LibreChatUnauthorized,
            E::Busy => Self::Busy(2),
            E::RateLimited(d) => Self::UpstreamRateLimited(d.as_secs().max(1)),
            E::Banned => Self::UpstreamBanned,
            E::Unavailable(m) => {
                tracing::warn!(error = %m, "LibreChat auth call failed");
                Self::LibreChatUnavailable
            }
            E::Store(m) => {
                tracing::warn!(error = %m, "store unavailable");
                Self::SessionStoreUnavailable
            }
        }
    }
}

/// Router fallback: unknown routes answer in the same JSON shape.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}
