//! The identity service: verifying its access JWTs and calling its token endpoints.

pub mod client;
pub mod verifier;

pub use client::{IdentityClient, IdentityTokens};
pub use verifier::{IdentityVerifier, VerifiedIdentity};

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use client::IdentityClientError;
use verifier::VerifyError;

/// The user as the BFF knows them (from the identity JWT's claims).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<String>,
}

impl From<&VerifiedIdentity> for UserInfo {
    fn from(v: &VerifiedIdentity) -> Self {
        Self::from(v.clone())
    }
}

impl From<VerifiedIdentity> for UserInfo {
    fn from(v: VerifiedIdentity) -> Self {
        Self {
            id: v.user_id,
            email: v.email,
            name: v.name,
            groups: v.groups,
        }
    }
}

// How identity failures reach the client.
impl From<VerifyError> for ApiError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::KeysUnavailable {
                retry_after_secs, ..
            } => ApiError::IdentityKeysUnavailable(retry_after_secs),
            other => ApiError::InvalidToken(other.to_string()),
        }
    }
}

impl From<IdentityClientError> for ApiError {
    fn from(e: IdentityClientError) -> Self {
        match e {
            IdentityClientError::Rejected => ApiError::BadCredentials,
            IdentityClientError::Throttled { retry_after } => {
                ApiError::IdentityThrottled(retry_after.as_secs().max(1))
            }
            IdentityClientError::Token(v) => ApiError::from(v),
            IdentityClientError::Unavailable(_) | IdentityClientError::BadResponse(_) => {
                ApiError::IdentityUnavailable
            }
        }
    }
}
