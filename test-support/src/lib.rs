//! Test harness shared by the workspace's integration tests and benches: a real Redis, a fake
//! identity service and a fake LibreChat, each a real server on an ephemeral loopback port, plus
//! the BFF itself. A crate of its own so it is compiled once, not once per test binary.
//!
//! Without the default `bff` feature only [`redis`], [`redis_cluster`], [`tls`] and [`wait`] are built (the `provisioning`
//! crate's tests use them and must not depend on librechat-bff).

#[cfg(feature = "bff")]
pub mod bff;
#[cfg(feature = "bff")]
pub mod fake_idp;
#[cfg(feature = "bff")]
pub mod fake_librechat;
pub mod redis;
pub mod redis_cluster;
pub mod tls;
pub mod wait;
#[cfg(feature = "bff")]
pub mod world;
