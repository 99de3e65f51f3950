//! The integration tests, one binary (one link, one process): each module is a former
//! `tests/<name>.rs`. The harness (real Redis, fake identity service, fake LibreChat, the BFF in
//! process) is the `support` crate, `test-support/`.
//!
//! Two tests need a process of their own and stay separate binaries: `tests/log_redaction.rs`
//! installs a process-global log subscriber, and `tests/upload_streaming.rs` measures the
//! process's peak RSS.
//!
//! Run one area with `cargo test --test api bridge::` (module path as filter).

mod bridge;
mod cli;
mod cluster;
mod compose;
mod config;
mod credentials;
mod identity;
mod librechat_conformance;
mod operations;
mod provisioning;
mod scale_out;
mod sentinel;
mod sessions;
mod tls;
mod ui;
mod ui_browser;
