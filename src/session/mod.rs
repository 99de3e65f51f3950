//! Server-side sessions: what a cookie session holds, where its identity tokens live, and how a
//! request is authenticated (cookie session or Bearer identity JWT).

pub mod auth;
pub mod cache;
pub mod csrf;
pub mod registry;
pub mod routes;
pub mod store;

use serde::{Deserialize, Serialize};

pub use auth::{
    authenticate, authenticate_cookie, authenticate_from_copy, Authenticated, Authenticator,
    CsrfRule, CurrentUser,
};
pub use registry::SessionRegistry;
pub use store::{BffSessionStore, RedisSessionStore};

use crate::credentials::CryptoError;
pub use crate::identity::UserInfo;

/// Key of [`SessionData`] inside the tower-sessions record.
pub const DATA_KEY: &str = "bff";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("stored tokens cannot be decrypted: {0}")]
    Crypto(#[from] CryptoError),
    #[error("stored session data is corrupt: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for SessionError {
    fn from(e: redis::RedisError) -> Self {
        Self::StoreUnavailable(e.to_string())
    }
}

impl From<tower_sessions::session_store::Error> for SessionError {
    fn from(e: tower_sessions::session_store::Error) -> Self {
        use tower_sessions::session_store::Error as E;
        match e {
            E::Backend(m) => Self::StoreUnavailable(m),
            E::Encode(m) | E::Decode(m) => Self::Corrupt(m),
        }
    }
}

impl From<tower_sessions::session::Error> for SessionError {
    fn from(e: tower_sessions::session::Error) -> Self {
        use tower_sessions::session::Error as E;
        match e {
            E::SerdeJson(e) => Self::Corrupt(e.to_string()),
            E::Store(e) => Self::StoreUnavailable(e.to_string()),
        }
    }
}

/// What a cookie session holds in its record. No tokens: those are Fernet-encrypted in the
/// [`SessionRegistry`], so the record can be read on every request without decrypting anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionData {
    pub user: UserInfo,
    /// Unix seconds.
    pub created_at: i64,
    pub absolute_expires_at: i64,
    pub idle_expires_at: i64,
    pub last_slide_at: i64,
    /// `exp` of the identity access token as last seen; the registry holds the truth.
    pub identity_exp: i64,
    /// Generation of the identity tokens this record last saw (see `IdentityTokenSet`).
    pub identity_generation: u64,
}

impl From<SessionError> for crate::error::ApiError {
    fn from(e: SessionError) -> Self {
        use SessionError as E;
        match e {
            E::StoreUnavailable(_) => crate::error::ApiError::SessionStoreUnavailable,
            E::Crypto(_) | E::Corrupt(_) => crate::error::ApiError::SessionEnded,
        }
    }
}
