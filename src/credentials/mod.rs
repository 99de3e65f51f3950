//! Secrets at rest: the Fernet key ring (and, with the bridge issue, the per-user credential vault).

pub mod keyring;
pub mod vault;

pub use keyring::{CryptoError, KeyRing};
