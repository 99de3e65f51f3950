//! librechat-bff: puts an unmodified LibreChat behind a product's own login.
//!
//! Start reading at [`app::router`]: it lists every route and where it goes.

pub mod admin;
pub mod app;
pub mod client;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod doctor;
pub mod error;
pub mod extract;
pub mod health;
pub mod identity;
pub mod librechat;
pub mod lock;
pub mod provision;
pub mod proxy;
pub mod redis_conn;
pub mod serve;
pub mod session;
pub mod telemetry;
pub mod throttle;
