//! librechat-bff: puts an unmodified LibreChat behind a product's own login.
//!
//! Start reading at [`app::app`]: what every request passes, then [`app::router`] with every
//! route and where it goes;
//! [`startup::AppState`] is where everything is built.

pub mod admin;
pub mod app;
pub mod clock;
pub mod config;
pub mod config_error;
pub mod credentials;
pub mod doctor;
pub mod edge;
pub mod end_user;
pub mod error;
pub mod extract;
pub mod identity;
pub mod librechat;
pub mod lock;
pub mod per_core;
pub mod probes;
pub mod provisioner;
pub mod proxy;
pub mod redis_conn;
pub mod serve;
pub mod session;
pub mod startup;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod ui;
