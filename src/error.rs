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

use crate::identity::{client::IdentityClientError, verifier::VerifyError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required")]
    Unauthenticated,
    #[error("the identity token was rejected: {0}")]
    InvalidToken(#[source] VerifyError),
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
    #[error("internal error")]
    Internal,
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
            Self::IdentityUnavailable => StatusCode::BAD_GATEWAY,
            Self::SessionStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
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
            Self::Internal => "internal_error",
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
            Self::Internal => "Something went wrong on our side.".into(),
        }
    }
}

/// A JSON problem response with the given status, code and message.
pub fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    let mut res = (status, Json(json!({ "error": code, "message": message }))).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::warn!(error = %self, code = self.code(), "request failed");
        }
        let mut res = problem(self.status(), self.code(), &self.message());
        if matches!(self, Self::Unauthenticated | Self::SessionEnded) {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<VerifyError> for ApiError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::KeysUnavailable(_) => Self::IdentityUnavailable,
            other => Self::InvalidToken(other),
        }
    }
}

impl From<IdentityClientError> for ApiError {
    fn from(e: IdentityClientError) -> Self {
        match e {
            IdentityClientError::Rejected => Self::BadCredentials,
            IdentityClientError::Token(v) => Self::from(v),
            IdentityClientError::Unavailable(_) | IdentityClientError::BadResponse(_) => {
                Self::IdentityUnavailable
            }
        }
    }
}

impl From<crate::session::SessionError> for ApiError {
    fn from(e: crate::session::SessionError) -> Self {
        use crate::session::SessionError as E;
        match e {
            E::StoreUnavailable(_) => Self::SessionStoreUnavailable,
            E::Crypto(_) | E::Corrupt(_) => Self::SessionEnded,
        }
    }
}

impl ApiError {
    /// For layers that need a concrete response type (panic handler).
    pub fn into_response_boxed(self) -> Response {
        self.into_response()
    }
}

/// Router fallback: unknown routes answer in the same JSON shape.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}
