//! The error of a configuration that cannot be used. A module of its own, below `config`, so the
//! modules `config` calls to check settings (Redis URLs, TLS files) need not import `config`.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config: {0}")]
    Load(String),
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}
