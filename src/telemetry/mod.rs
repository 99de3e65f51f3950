//! Logging set-up. `RUST_LOG` filters (default `info`); `BFF_LOG_FORMAT=json` switches to JSON lines.

use tracing_subscriber::{fmt, EnvFilter};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("BFF_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = fmt().with_env_filter(filter).with_target(false);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // Already initialised (tests) is fine.
    let _ = result;
}
