//! Settings: compiled-in defaults (`config/default.toml`) → optional file → `BFF__SECTION__KEY`
//! environment variables. Unknown keys are errors; secrets may come from `*_file` paths and never
//! print (see [`Secret`]).

use jsonwebtoken::Algorithm;
use std::{fmt, net::SocketAddr, path::Path};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};

/// The documented defaults, embedded so a zero-config `serve` works.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

pub use crate::config_error::ConfigError;

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// A secret string: redacted in `Debug` and when the effective config is printed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub crypto: CryptoConfig,
    pub session: SessionConfig,
    pub csrf: CsrfConfig,
    pub login_throttle: LoginThrottleConfig,
    pub identity: IdentityConfig,
    pub librechat: LibreChatConfig,
    pub provisioning: ProvisioningConfig,
    pub admin: AdminConfig,
    pub hooks: HooksConfig,
    pub telemetry: TelemetryConfig,
    /// LibreChat's own web UI under a path of the BFF (off unless configured).
    #[serde(default)]
    pub ui: UiConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    pub log_level: String,
    pub metrics_on_main_listener: bool,
    pub metrics_addr: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningConfig {
    pub workers_in_serve: bool,
    pub concurrency: usize,
    pub max_attempts: u32,
    pub base_backoff_secs: u64,
    pub max_backoff_secs: u64,
    pub visibility_timeout_secs: u64,
    pub forwarded_for: String,
    pub service_account_email: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub group: String,
    pub token: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    pub secret: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    pub tolerance_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LibreChatConfig {
    pub url: String,
    pub connect_timeout_secs: u64,
    pub response_header_timeout_secs: u64,
    pub stream_idle_timeout_secs: u64,
    pub token_refresh_skew_secs: u64,
    pub browser_user_agent: String,
    pub deny_prefixes: Vec<String>,
    pub max_request_body_bytes: u64,
    pub replay_buffer_bytes: usize,
    pub pool_idle_timeout_secs: u64,
    /// PEM bundle of the CAs trusted for an https:// LibreChat (only these); empty: the
    /// system's roots.
    pub tls_ca_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub trusted_proxies: Vec<String>,
    pub drain_timeout_secs: u64,
    /// A connection must send a complete request head within this long; it is also the idle
    /// keep-alive timeout (hyper starts the same clock while waiting for the next request).
    pub header_read_timeout_secs: u64,
    /// Connections served at once; further ones wait in the accept backlog for a free slot.
    pub max_connections: usize,
    /// A request body (upload) that sends nothing for this long ends with 408.
    pub request_body_idle_timeout_secs: u64,
    /// Threads serving connections, each with its own single-threaded runtime; 0: one per core.
    #[serde(default)]
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<String>,
    pub key_prefix: String,
    /// TLS (`rediss…://`): PEM bundle of the CAs trusted (only these); empty: the system's roots.
    pub tls_ca_file: String,
    /// TLS client certificate (PEM) and its key, for Redis servers that require one.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoConfig {
    pub fernet_keys: Vec<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fernet_keys_file: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStoreKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    pub store: SessionStoreKind,
    pub cookie_name: String,
    pub cookie_secure: bool,
    pub idle_timeout_secs: u64,
    pub absolute_lifetime_secs: u64,
    pub slide_interval_secs: u64,
    pub max_cookie_bytes: usize,
    /// `store = "memory"`: expired sessions are deleted this often.
    pub memory_cleanup_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CsrfConfig {
    pub header_name: String,
    pub header_value: String,
    pub allowed_origins: Vec<String>,
}

/// Failed sign-ins counted per client address and per account identifier (see
/// `src/throttle.rs`). A limit of 0 turns that counter off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoginThrottleConfig {
    pub enabled: bool,
    pub per_address_failures: u32,
    pub per_address_window_secs: u64,
    pub per_identifier_failures: u32,
    pub per_identifier_window_secs: u64,
    pub max_identifier_bytes: usize,
    pub memory_max_keys: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub base_url: String,
    pub token_path: String,
    pub refresh_path: String,
    pub identifier_field: String,
    pub password_field: String,
    pub access_field: String,
    pub refresh_field: String,
    pub refresh_request_field: String,
    pub refresh_skew_secs: u64,
    pub timeout_secs: u64,
    /// PEM bundle of the CAs trusted for an https:// identity service (token endpoints and
    /// JWKS; only these); empty: the system's roots.
    pub tls_ca_file: String,
    pub jwt: JwtConfig,
    pub claims: ClaimsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithms: Vec<String>,
    pub hs_secret: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs_secret_file: Option<String>,
    pub public_key_pem_file: String,
    pub jwks_url: String,
    pub jwks_min_refetch_secs: u64,
    /// JWKS keys older than this are not trusted (refreshed in the background from half of it).
    pub jwks_max_age_secs: u64,
    pub leeway_secs: u64,
    pub issuer: String,
    pub audience: String,
    pub token_type_claim: String,
    pub token_type: String,
    pub require_token_type: bool,
    pub max_token_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsConfig {
    pub user_id: Vec<String>,
    pub email: String,
    pub name: String,
    pub groups: String,
}

impl Config {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`] with an explicit environment (tests must not mutate the process env).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("BFF__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("BFF")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("server.trusted_proxies")
                .with_list_parse_key("crypto.fernet_keys")
                .with_list_parse_key("csrf.allowed_origins")
                .with_list_parse_key("identity.jwt.algorithms")
                .with_list_parse_key("identity.claims.user_id")
                .with_list_parse_key("librechat.deny_prefixes")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let mut cfg: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.resolve_secret_files()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        resolve_file(
            "admin.token_file",
            &mut self.admin.token,
            self.admin.token_file.take(),
        )?;
        resolve_file(
            "hooks.secret_file",
            &mut self.hooks.secret,
            self.hooks.secret_file.take(),
        )?;
        if let Some(path) = self.redis.url_file.take() {
            self.redis.url = Secret::new(read_secret_file("redis.url_file", &path)?);
        }
        if let Some(path) = self.identity.jwt.hs_secret_file.take() {
            if !self.identity.jwt.hs_secret.is_empty() {
                return Err(invalid(
                    "identity.jwt.hs_secret_file",
                    "set either hs_secret or hs_secret_file, not both",
                ));
            }
            self.identity.jwt.hs_secret =
                Secret::new(read_secret_file("identity.jwt.hs_secret_file", &path)?);
        }
        if let Some(path) = self.crypto.fernet_keys_file.take() {
            if !self.crypto.fernet_keys.is_empty() {
                return Err(invalid(
                    "crypto.fernet_keys_file",
                    "set either fernet_keys or fernet_keys_file, not both",
                ));
            }
            let text = read_secret_file("crypto.fernet_keys_file", &path)?;
            self.crypto.fernet_keys = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(Secret::new)
                .collect();
        }
        Ok(())
    }

    /// Checks that hold for any deployment; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.trusted_proxies()?;
        self.validate_server()?;
        self.ui.validate()?;
        let (_, redis_tls) = crate::redis_conn::target::check(self.redis.url.expose())?;
        let r = &self.redis;
        if !redis_tls {
            for (key, value) in [
                ("redis.tls_ca_file", &r.tls_ca_file),
                ("redis.tls_cert_file", &r.tls_cert_file),
                ("redis.tls_key_file", &r.tls_key_file),
            ] {
                if !value.is_empty() {
                    return Err(invalid(
                        key,
                        "set, but redis.url does not use TLS (rediss://, rediss+sentinel:// or \
                         rediss+cluster://)",
                    ));
                }
            }
        }
        if r.tls_cert_file.is_empty() != r.tls_key_file.is_empty() {
            return Err(invalid(
                "redis.tls_cert_file",
                "set both redis.tls_cert_file and redis.tls_key_file, or neither",
            ));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty, without spaces or braces",
            ));
        }
        for (i, key) in self.crypto.fernet_keys.iter().enumerate() {
            if fernet::Fernet::new(key.expose().trim()).is_none() {
                return Err(invalid(
                    &format!("crypto.fernet_keys[{i}]"),
                    "not a Fernet key (url-safe base64 of 32 bytes; `librechat-bff keys generate` makes one)",
                ));
            }
        }
        if self.session.store == SessionStoreKind::Redis && self.crypto.fernet_keys.is_empty() {
            return Err(invalid(
                "crypto.fernet_keys",
                "required when session.store = \"redis\": tokens stored in Redis are encrypted and must stay readable after a restart",
            ));
        }
        let s = &self.session;
        if s.idle_timeout_secs == 0 {
            return Err(invalid("session.idle_timeout_secs", "must be > 0"));
        }
        if s.absolute_lifetime_secs < s.idle_timeout_secs {
            return Err(invalid(
                "session.absolute_lifetime_secs",
                "must be >= session.idle_timeout_secs",
            ));
        }
        if s.slide_interval_secs >= s.idle_timeout_secs {
            return Err(invalid(
                "session.slide_interval_secs",
                "must be < session.idle_timeout_secs",
            ));
        }
        let name = self.cookie_name();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "session.cookie_name",
                "must be a token of letters, digits, '-', '_' or '.'",
            ));
        }
        if name.starts_with("__Host-") && !s.cookie_secure {
            return Err(invalid(
                "session.cookie_name",
                "a __Host- cookie needs session.cookie_secure = true",
            ));
        }
        if http::HeaderName::from_bytes(self.csrf.header_name.as_bytes()).is_err() {
            return Err(invalid("csrf.header_name", "not a valid HTTP header name"));
        }
        if http::HeaderValue::from_str(&self.csrf.header_value).is_err()
            || self.csrf.header_value.is_empty()
        {
            return Err(invalid(
                "csrf.header_value",
                "must be a non-empty header value",
            ));
        }
        for origin in &self.csrf.allowed_origins {
            let ok = url::Url::parse(origin)
                .map(|u| {
                    u.origin().ascii_serialization() == origin.trim_end_matches('/')
                        && u.origin().is_tuple()
                })
                .unwrap_or(false);
            if !ok {
                return Err(invalid(
                    "csrf.allowed_origins",
                    format!("`{origin}` is not an origin like https://app.example.com (scheme, host, optional port; no path)"),
                ));
            }
        }
        self.validate_login_throttle()?;
        let id = &self.identity;
        if url::Url::parse(&id.base_url).is_err() {
            return Err(invalid("identity.base_url", "not a URL"));
        }
        for (key, path) in [
            ("identity.token_path", &id.token_path),
            ("identity.refresh_path", &id.refresh_path),
        ] {
            if !path.starts_with('/') {
                return Err(invalid(key, "must start with '/'"));
            }
        }
        if id.timeout_secs == 0 {
            return Err(invalid("identity.timeout_secs", "must be > 0"));
        }
        if !id.tls_ca_file.is_empty()
            && !id.base_url.starts_with("https://")
            && !id.jwt.jwks_url.starts_with("https://")
        {
            return Err(invalid(
                "identity.tls_ca_file",
                "set, but neither identity.base_url nor identity.jwt.jwks_url is https://",
            ));
        }
        parse_algorithms(&id.jwt)?;
        if id.jwt.jwks_max_age_secs == 0 {
            return Err(invalid("identity.jwt.jwks_max_age_secs", "must be > 0"));
        }
        if self.session.memory_cleanup_interval_secs == 0 {
            return Err(invalid(
                "session.memory_cleanup_interval_secs",
                "must be > 0",
            ));
        }
        if id.claims.user_id.is_empty() {
            return Err(invalid(
                "identity.claims.user_id",
                "name at least one claim",
            ));
        }
        self.validate_librechat()?;
        let p = &self.provisioning;
        if p.concurrency == 0 {
            return Err(invalid("provisioning.concurrency", "must be > 0"));
        }
        if p.max_attempts == 0 {
            return Err(invalid("provisioning.max_attempts", "must be > 0"));
        }
        if p.visibility_timeout_secs == 0 {
            return Err(invalid(
                "provisioning.visibility_timeout_secs",
                "must be > 0",
            ));
        }
        if p.forwarded_for.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid(
                "provisioning.forwarded_for",
                "must be an IP address",
            ));
        }
        if !provisioning::is_valid_email(&p.service_account_email) {
            return Err(invalid(
                "provisioning.service_account_email",
                "must be an email address",
            ));
        }
        if !self.telemetry.metrics_addr.is_empty()
            && self.telemetry.metrics_addr.parse::<SocketAddr>().is_err()
        {
            return Err(invalid(
                "telemetry.metrics_addr",
                "not an address like 0.0.0.0:9090",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_err() {
            return Err(invalid(
                "telemetry.log_level",
                "not a log filter like \"info\" or \"librechat_bff=debug,info\"",
            ));
        }
        if !self.admin.token.is_empty() && self.admin.token.expose().len() < 16 {
            return Err(invalid("admin.token", "must be at least 16 characters"));
        }
        if !self.hooks.secret.is_empty() && self.hooks.secret.expose().len() < 16 {
            return Err(invalid("hooks.secret", "must be at least 16 characters"));
        }
        Ok(())
    }

    fn validate_login_throttle(&self) -> Result<(), ConfigError> {
        let t = &self.login_throttle;
        for (key, limit, window) in [
            (
                "login_throttle.per_address_window_secs",
                t.per_address_failures,
                t.per_address_window_secs,
            ),
            (
                "login_throttle.per_identifier_window_secs",
                t.per_identifier_failures,
                t.per_identifier_window_secs,
            ),
        ] {
            if t.enabled && limit > 0 && window == 0 {
                return Err(invalid(key, "must be > 0 when its failure limit is > 0"));
            }
        }
        if t.max_identifier_bytes == 0 {
            return Err(invalid(
                "login_throttle.max_identifier_bytes",
                "must be > 0",
            ));
        }
        if t.enabled && t.memory_max_keys == 0 {
            return Err(invalid("login_throttle.memory_max_keys", "must be > 0"));
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let srv = &self.server;
        for (key, v) in [
            (
                "server.header_read_timeout_secs",
                srv.header_read_timeout_secs,
            ),
            (
                "server.request_body_idle_timeout_secs",
                srv.request_body_idle_timeout_secs,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if srv.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be > 0"));
        }
        Ok(())
    }

    fn validate_librechat(&self) -> Result<(), ConfigError> {
        let lc = &self.librechat;
        match url::Url::parse(&lc.url) {
            Ok(u) if u.scheme() == "https" => {}
            Ok(u) if u.scheme() == "http" => {
                if !lc.tls_ca_file.is_empty() {
                    return Err(invalid(
                        "librechat.tls_ca_file",
                        "set, but librechat.url is http:// (use https:// or drop the CA file)",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "librechat.url",
                    "must be an http:// or https:// URL",
                ))
            }
        }
        for (key, v) in [
            ("librechat.connect_timeout_secs", lc.connect_timeout_secs),
            (
                "librechat.response_header_timeout_secs",
                lc.response_header_timeout_secs,
            ),
            (
                "librechat.stream_idle_timeout_secs",
                lc.stream_idle_timeout_secs,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if http::HeaderValue::from_str(&lc.browser_user_agent).is_err()
            || !crate::end_user::is_browser_user_agent(&lc.browser_user_agent)
        {
            return Err(invalid(
                "librechat.browser_user_agent",
                "must be a browser User-Agent (LibreChat bans non-browser agents)",
            ));
        }
        for p in &lc.deny_prefixes {
            if p.is_empty() || p.starts_with('/') {
                return Err(invalid(
                    "librechat.deny_prefixes",
                    format!("`{p}` must be a path below /api/chat/ without a leading '/', e.g. \"agents/tools\""),
                ));
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|_| invalid("server.listen", "not an address like 127.0.0.1:8080"))
    }

    pub fn trusted_proxies(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.server
            .trusted_proxies
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        invalid(
                            "server.trusted_proxies",
                            format!("`{s}` is not a CIDR or IP address"),
                        )
                    })
            })
            .collect()
    }

    pub fn cookie_name(&self) -> String {
        match self.session.cookie_name.as_str() {
            "" if self.session.cookie_secure => "__Host-bff".to_owned(),
            "" => "bff".to_owned(),
            name => name.to_owned(),
        }
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn resolve_file(key: &str, secret: &mut Secret, path: Option<String>) -> Result<(), ConfigError> {
    if let Some(path) = path {
        if !secret.is_empty() {
            return Err(invalid(key, "set either the secret or its _file, not both"));
        }
        *secret = Secret::new(read_secret_file(key, &path)?);
    }
    Ok(())
}

fn read_secret_file(key: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {path}: {e}")))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// The key family of a JWT algorithm: one family per configuration (no HS/RS confusion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Hmac,
    Rsa,
    Ec,
}

pub fn family(alg: Algorithm) -> Option<Family> {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => Some(Family::Hmac),
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
        ES256 | ES384 => Some(Family::Ec),
        _ => None,
    }
}

/// Parses `identity.jwt.algorithms` and checks that the key material fits them.
pub fn parse_algorithms(cfg: &JwtConfig) -> Result<Vec<Algorithm>, ConfigError> {
    let bad = |reason: String| ConfigError::Invalid {
        key: "identity.jwt.algorithms".into(),
        reason,
    };
    if cfg.algorithms.is_empty() {
        return Err(bad("name at least one algorithm".into()));
    }
    let mut algs = Vec::new();
    for name in &cfg.algorithms {
        let alg: Algorithm = name
            .to_ascii_uppercase()
            .parse()
            .map_err(|_| bad(format!("`{name}` is not a JWT algorithm")))?;
        if family(alg).is_none() {
            return Err(bad(format!("`{name}` is not supported")));
        }
        algs.push(alg);
    }
    let hmac = algs.iter().any(|a| family(*a) == Some(Family::Hmac));
    let asym = algs.iter().any(|a| family(*a) != Some(Family::Hmac));
    if hmac && asym {
        return Err(bad(
            "HS* cannot be mixed with RS*/ES*/PS* (that invites key confusion)".into(),
        ));
    }
    if asym && cfg.public_key_pem_file.is_empty() && cfg.jwks_url.is_empty() {
        return Err(ConfigError::Invalid {
            key: "identity.jwt.jwks_url".into(),
            reason: "RS*/ES*/PS* need identity.jwt.jwks_url or identity.jwt.public_key_pem_file"
                .into(),
        });
    }
    if asym && !cfg.public_key_pem_file.is_empty() && !cfg.jwks_url.is_empty() {
        return Err(ConfigError::Invalid {
            key: "identity.jwt.jwks_url".into(),
            reason: "set either jwks_url or public_key_pem_file, not both".into(),
        });
    }
    if !cfg.jwks_url.is_empty() && url::Url::parse(&cfg.jwks_url).is_err() {
        return Err(ConfigError::Invalid {
            key: "identity.jwt.jwks_url".into(),
            reason: "not a URL".into(),
        });
    }
    Ok(algs)
}

/// `[ui]`: LibreChat's web UI served under `mount_path`, signed in through the BFF session
/// (see src/ui/).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    pub enabled: bool,
    pub mount_path: String,
    pub login_url: String,
    pub return_param: String,
    pub after_logout_url: String,
    pub public_origin: String,
    pub root_images: bool,
    pub public_share_links: bool,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            mount_path: "/chat".into(),
            login_url: "/login".into(),
            return_param: "next".into(),
            after_logout_url: "/".into(),
            public_origin: String::new(),
            root_images: true,
            public_share_links: false,
        }
    }
}

impl UiConfig {
    /// The mount path without its trailing slash (`/chat`).
    pub fn mount(&self) -> &str {
        self.mount_path.trim_end_matches('/')
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let mount = self.mount();
        let reserved = [
            "/api", "/auth", "/admin", "/hooks", "/healthz", "/readyz", "/metrics",
        ];
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        };
        if !mount.starts_with('/') || !mount[1..].split('/').all(segment_ok) {
            return Err(invalid(
                "ui.mount_path",
                "must be an absolute path of plain segments (e.g. \"/chat\"), not \"/\"",
            ));
        }
        if reserved
            .iter()
            .any(|r| mount == *r || mount.starts_with(&format!("{r}/")))
        {
            return Err(invalid(
                "ui.mount_path",
                "collides with the BFF's own routes (/api, /auth, /admin, /hooks, probes)",
            ));
        }
        if self.root_images && (mount == "/images" || mount.starts_with("/images/")) {
            return Err(invalid(
                "ui.mount_path",
                "collides with /images (ui.root_images)",
            ));
        }
        for (key, value) in [
            ("ui.login_url", &self.login_url),
            ("ui.after_logout_url", &self.after_logout_url),
        ] {
            let relative = value.starts_with('/') && !value.starts_with("//");
            let absolute = url::Url::parse(value)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !(relative || absolute) || value.bytes().any(|b| b.is_ascii_control()) {
                return Err(invalid(
                    key,
                    "must be a path (\"/login\") or an http(s) URL of the product",
                ));
            }
        }
        if self.return_param.is_empty()
            || !self
                .return_param
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid(
                "ui.return_param",
                "must be a plain query parameter name",
            ));
        }
        if !self.public_origin.is_empty() {
            let ok = url::Url::parse(&self.public_origin).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.has_host()
                    && u.path() == "/"
                    && u.query().is_none()
                    && !self.public_origin.ends_with('/')
            });
            if !ok {
                return Err(invalid(
                    "ui.public_origin",
                    "must be an origin like \"https://app.example.com\" (no path, no trailing slash)",
                ));
            }
        }
        Ok(())
    }
}
