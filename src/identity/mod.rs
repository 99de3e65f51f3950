//! The identity service: verifying its access JWTs and calling its token endpoints.

pub mod client;
pub mod verifier;

pub use client::{IdentityClient, IdentityTokens};
pub use verifier::{IdentityVerifier, VerifiedIdentity};
