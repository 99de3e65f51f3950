//! What can go wrong acquiring a user's LibreChat token ([`TokenError`]), and how the errors of
//! LibreChat, the vault, Redis and the locks map onto it.

use std::time::Duration;

use crate::{credentials::vault::VaultError, librechat::client::LibreChatError, lock::LockError};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the user's LibreChat account is not provisioned yet")]
    ProvisioningPending,
    #[error("the stored LibreChat credential no longer works")]
    CredentialInvalid,
    #[error("the user is deactivated")]
    Disabled,
    #[error("the user's email is bound to another identity user")]
    Conflict,
    #[error("LibreChat refused a token it issued moments ago")]
    RejectedFresh,
    #[error("LibreChat rate limit; retry after {}s", .0.as_secs())]
    RateLimited(Duration),
    #[error("LibreChat has banned this user or address")]
    Banned,
    #[error("LibreChat unavailable: {0}")]
    Unavailable(String),
    #[error("store unavailable: {0}")]
    Store(String),
    /// Another renewal of this user's login (in this process or another replica) did not finish
    /// within the wait bound.
    #[error("a renewal of this user's LibreChat login is still running")]
    Busy,
}

impl From<redis::RedisError> for TokenError {
    fn from(e: redis::RedisError) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<VaultError> for TokenError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Unavailable(e) => Self::Store(e.to_string()),
            VaultError::Corrupt(_) | VaultError::Crypto(_) | VaultError::NoPassword(_) => {
                Self::CredentialInvalid
            }
            VaultError::Contended(m) => Self::Store(m),
        }
    }
}

impl From<LockError> for TokenError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Redis(e) => Self::Store(e.to_string()),
            LockError::Timeout(_) => Self::Busy,
        }
    }
}

/// A failed LibreChat call as the token manager reports it.
pub(super) fn from_librechat(e: LibreChatError) -> TokenError {
    match e {
        LibreChatError::RateLimited { retry_after } => TokenError::RateLimited(retry_after),
        LibreChatError::Banned => TokenError::Banned,
        LibreChatError::BadCredentials | LibreChatError::TwoFactorRequired => {
            TokenError::CredentialInvalid
        }
        other => TokenError::Unavailable(other.to_string()),
    }
}
