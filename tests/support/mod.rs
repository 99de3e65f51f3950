//! Test harness shared by the integration tests: a real Redis, a fake identity service and a fake
//! LibreChat, each a real server on an ephemeral loopback port, plus the BFF itself.
#![allow(dead_code)]

pub mod bff;
pub mod fake_idp;
pub mod fake_librechat;
pub mod redis;
pub mod wait;
pub mod world;
