//! Secrets at rest: the Fernet key ring (and, with the bridge issue, the per-user credential vault).

pub mod keyring;

pub use keyring::{CryptoError, KeyRing};
