//! Talking to LibreChat as each user: the auth-route client and the per-user token manager.

pub mod client;
pub mod service_account;
pub mod tokens;

pub use client::{LibreChatClient, LibreChatError, LibreChatLogin};
pub use tokens::{TokenError, TokenManager, UpstreamToken};

/// `exp` of a JWT, read without verifying it (we are its bearer, not its judge).
pub fn jwt_exp(token: &str) -> Option<i64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}
