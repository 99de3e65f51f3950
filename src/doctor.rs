//! `librechat-bff doctor`: checks the deployment around the BFF and prints a checklist with a fix
//! for every problem. Exit code 0 when nothing failed (warnings allowed), 1 otherwise.

use std::time::Duration;

use serde_json::Value;

use crate::{
    app::AppState,
    config::{Config, SessionStoreKind},
    redis_conn::{self, Topology},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub level: Level,
    pub what: String,
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>) -> Check {
    Check {
        level: Level::Ok,
        what: what.into(),
        fix: None,
    }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        level: Level::Warn,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        level: Level::Fail,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

pub async fn run(state: &AppState) -> Vec<Check> {
    let mut checks = config_checks(&state.config, state);
    checks.extend(redis_checks(state).await);
    checks.extend(librechat_checks(&state.config).await);
    checks.extend(identity_checks(&state.config).await);
    checks
}

pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.level {
            Level::Ok => "[ok]  ",
            Level::Warn => "[warn]",
            Level::Fail => "[FAIL]",
        };
        out.push_str(&format!("{tag} {}\n", c.what));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("       fix: {fix}\n"));
        }
    }
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    let warned = checks.iter().filter(|c| c.level == Level::Warn).count();
    out.push_str(&format!(
        "\n{} checks: {} failed, {} warnings\n",
        checks.len(),
        failed,
        warned
    ));
    out
}

fn config_checks(cfg: &Config, state: &AppState) -> Vec<Check> {
    let mut checks = vec![ok("configuration loads and validates")];
    if state.keyring.is_ephemeral() {
        checks.push(fail(
            "crypto.fernet_keys is empty: encrypted data dies with the process",
            "run `librechat-bff keys generate` and set crypto.fernet_keys (or fernet_keys_file)",
        ));
    } else {
        checks.push(ok(format!(
            "Fernet key ring: {} key(s), the first encrypts",
            cfg.crypto.fernet_keys.len()
        )));
    }
    match cfg.session.store {
        SessionStoreKind::Memory => checks.push(warn(
            "session.store = \"memory\": sessions vanish on restart and are not shared",
            "set session.store = \"redis\" for production",
        )),
        SessionStoreKind::Redis => checks.push(ok("sessions are kept in Redis")),
    }
    if !cfg.session.cookie_secure {
        checks.push(warn(
            "session.cookie_secure = false",
            "serve over HTTPS and set session.cookie_secure = true",
        ));
    }
    if cfg.admin.token.is_empty() && cfg.admin.group.is_empty() {
        checks.push(warn(
            "nobody can use /admin/* (admin.token and admin.group are empty)",
            "set admin.group to your operators' identity group, or admin.token_file",
        ));
    }
    checks
}

async fn redis_checks(state: &AppState) -> Vec<Check> {
    let redis = &state.redis;
    let url = redis.shown_url();
    let mut checks = Vec::new();
    let kind = match redis.topology() {
        Topology::Single => "one node",
        Topology::Unix => "one node (unix socket)",
        Topology::Sentinel => "Sentinel",
        Topology::Cluster => "Cluster",
    };
    let tls = if redis.uses_tls() { ", TLS" } else { "" };
    let mut conn = match redis.conn().await {
        Ok(c) => c,
        Err(e) => {
            let mut detail = redis_conn::describe_error(&e);
            if !detail.contains(url) {
                detail = format!("{url}: {detail}");
            }
            return vec![if crate::tls::is_tls_failure(&e) {
                fail(
                    format!("Redis TLS handshake failed: {detail}"),
                    "set redis.tls_ca_file to the CA that signed the Redis certificate (its chain, \
                     validity dates and host name are verified), and name the host as the \
                     certificate does",
                )
            } else {
                fail(
                    format!("Redis unreachable: {detail}"),
                    "start Redis or fix redis.url (credentials, sessions and jobs live there)",
                )
            }];
        }
    };
    match redis::cmd("PING").query_async::<String>(&mut conn).await {
        Ok(_) => checks.push(ok(format!("Redis answers at {url} ({kind}{tls})"))),
        Err(e) => {
            return vec![fail(
                format!("Redis at {url} does not answer PING: {}", e.kind_name()),
                "check redis.url and the Redis server's health",
            )]
        }
    }
    if redis.uses_tls() {
        let trust = if state.config.redis.tls_ca_file.is_empty() {
            "the system's trusted roots"
        } else {
            "redis.tls_ca_file"
        };
        checks.push(ok(format!(
            "Redis TLS handshake: the certificate is trusted ({trust}), valid now and names the host"
        )));
        checks.extend(
            expiry_checks(
                "Redis",
                redis.tls_endpoints().await,
                {
                    let r = &state.config.redis;
                    crate::tls::redis_client_config(
                        &r.tls_ca_file,
                        &r.tls_cert_file,
                        &r.tls_key_file,
                    )
                },
                "redis.tls_ca_file",
            )
            .await,
        );
    }
    if redis.topology() == Topology::Cluster {
        checks.extend(cluster_checks(state).await);
    }
    let mut aof = redis::cmd("CONFIG");
    aof.arg("GET").arg("appendonly");
    match redis.on_each_master(&aof).await {
        Ok(answers) => {
            let without: Vec<String> = answers
                .iter()
                .filter_map(|(node, answer)| {
                    let value: Option<Vec<String>> = answer
                        .as_ref()
                        .ok()
                        .and_then(|v| redis::from_redis_value(v.clone()).ok());
                    match value.as_deref() {
                        Some([_, v]) if v == "yes" => None,
                        Some(_) => Some(node.clone()),
                        None => Some(format!("{node} (CONFIG disabled?)")),
                    }
                })
                .collect();
            if without.is_empty() {
                checks.push(ok("Redis persistence: appendonly yes"));
            } else {
                checks.push(warn(
                    format!(
                        "Redis runs without AOF (or it cannot be read) on {}: a Redis restart can lose credentials, sessions and jobs",
                        without.join(", ")
                    ),
                    "run Redis with `appendonly yes` (compose.librechat.yaml does)",
                ));
            }
        }
        Err(_) => checks.push(warn(
            "cannot read Redis's appendonly setting (CONFIG is disabled?)",
            "make sure your Redis persists with AOF",
        )),
    }
    // A credential the ring cannot decrypt means a key was removed too early.
    let pattern = state.redis.key("cred:*");
    if let Ok(keys) = state.redis.scan_keys(&pattern, 1).await {
        if let Some(key) = keys.first() {
            let user = key.rsplit(':').next().unwrap_or_default().to_owned();
            match state.vault.get(&user).await {
                Ok(Some(r)) if state.vault.password(&r).is_ok() => {
                    checks.push(ok("stored credentials decrypt with the key ring"))
                }
                Ok(Some(_)) => checks.push(fail(
                    "a stored credential does not decrypt with crypto.fernet_keys",
                    "add back the key it was encrypted with (keep old keys after the first until `credentials rotate` has run)",
                )),
                _ => {}
            }
        }
    }
    checks
}

/// Cluster state and slot coverage as each master sees it; every node (replicas included)
/// reachable with the configured TLS and credentials.
async fn cluster_checks(state: &AppState) -> Vec<Check> {
    let mut checks = Vec::new();
    match state.redis.cluster_health().await {
        Ok(Some(health)) => {
            let failing: Vec<String> = health
                .states
                .iter()
                .filter(|(_, s)| s != "ok")
                .map(|(node, s)| format!("{node}: {s}"))
                .collect();
            if failing.is_empty() {
                checks.push(ok(format!(
                    "Redis Cluster state ok on all {} masters",
                    health.masters
                )));
            } else {
                checks.push(fail(
                    format!("Redis Cluster state is not ok: {}", failing.join(", ")),
                    "check `redis-cli --cluster check <node>`: a master without a reachable replica, or a lost quorum",
                ));
            }
            if health.covered == 16384 {
                checks.push(ok("all 16384 hash slots are served"));
            } else {
                checks.push(fail(
                    format!("only {} of 16384 hash slots are served", health.covered),
                    "assign the missing slots (`redis-cli --cluster fix <node>`): keys in them cannot be read or written",
                ));
            }
            if health.replicas < health.masters {
                checks.push(warn(
                    format!(
                        "{} replicas for {} masters: a master without a replica is a single point of failure",
                        health.replicas, health.masters
                    ),
                    "give every master at least one replica",
                ));
            }
        }
        Ok(None) => {}
        Err(e) => checks.push(fail(
            format!("cannot read the cluster's topology: {}", e.kind_name()),
            "check that redis.url names nodes of a Redis Cluster (cluster-enabled yes)",
        )),
    }
    let nodes = state.redis.check_cluster_nodes().await;
    let bad: Vec<String> = nodes
        .iter()
        .filter_map(|(node, e)| {
            e.as_ref()
                .map(|e| format!("{node}: {}", redis_conn::describe_error(e)))
        })
        .collect();
    if !nodes.is_empty() {
        if bad.is_empty() {
            checks.push(ok(format!(
                "every cluster node ({}) accepts a connection{}",
                nodes.len(),
                if state.redis.uses_tls() {
                    " and a TLS handshake"
                } else {
                    ""
                }
            )));
        } else {
            checks.push(fail(
                format!("cluster nodes refuse a connection: {}", bad.join("; ")),
                "every node (replicas too: they become masters) must be reachable with the same credentials and, with TLS, a certificate from redis.tls_ca_file naming its announced address",
            ));
        }
    }
    checks
}

/// A certificate ending within this long is a warning.
const EXPIRY_WARNING: time::Duration = time::Duration::days(21);

/// Each endpoint's certificate: when it ends (the earliest, or a warning when one ends within
/// [`EXPIRY_WARNING`]); a handshake that fails is a failure naming the endpoint.
async fn expiry_checks(
    what: &str,
    endpoints: Vec<(String, u16)>,
    config: Result<rustls::ClientConfig, crate::config::ConfigError>,
    ca_key: &str,
) -> Vec<Check> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let config = match config {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => return vec![fail(format!("{what} TLS: {e}"), format!("fix {ca_key}"))],
    };
    let now = time::OffsetDateTime::now_utc();
    let mut checks = Vec::new();
    let mut earliest: Option<time::OffsetDateTime> = None;
    for (host, port) in &endpoints {
        match crate::tls::certificate_expiry(host, *port, config.clone()).await {
            Ok(until) if until - now < EXPIRY_WARNING => checks.push(warn(
                format!(
                    "{what} certificate of {host}:{port} expires {} (in {} days)",
                    until.date(),
                    (until - now).whole_days()
                ),
                "renew it before then (the BFF refuses an expired certificate)",
            )),
            Ok(until) => earliest = Some(earliest.map_or(until, |e| e.min(until))),
            Err(e) => checks.push(fail(
                format!("{what} TLS handshake with {host}:{port} failed: {e}"),
                format!("set {ca_key} to the CA that signed its certificate"),
            )),
        }
    }
    if let Some(until) = earliest.filter(|_| checks.is_empty()) {
        checks.push(ok(format!(
            "{what} certificate{} valid until {}",
            if endpoints.len() > 1 {
                format!("s of {} endpoints", endpoints.len())
            } else {
                String::new()
            },
            until.date()
        )));
    }
    checks
}

/// `host:port` of the https:// URLs among `urls`.
fn https_endpoints(urls: &[&str]) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for url in urls {
        let Ok(u) = url::Url::parse(url) else {
            continue;
        };
        if u.scheme() != "https" {
            continue;
        }
        if let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) {
            let endpoint = (host.trim_matches(['[', ']']).to_owned(), port);
            if !out.contains(&endpoint) {
                out.push(endpoint);
            }
        }
    }
    out
}

/// A client for `doctor`'s calls to a service: its own CA bundle, no redirects, 5 s.
fn doctor_http(key: &str, ca_file: &str) -> Result<reqwest::Client, String> {
    let ca = crate::tls::CaBundle::load(key, ca_file).map_err(|e| e.to_string())?;
    let builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none());
    crate::tls::reqwest_trust(builder, key, ca.as_ref())
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| crate::tls::error_chain(&e))
}

/// A failed call: a TLS verdict named as such, with the setting to fix.
fn unreachable(what: &str, url: &str, e: &reqwest::Error, ca_key: &str, url_key: &str) -> Check {
    let error = crate::tls::error_chain(e);
    if crate::tls::is_tls_failure(e) {
        fail(
            format!("{what} at {url}: TLS handshake failed: {error}"),
            format!("set {ca_key} to the CA that signed its certificate (chain, validity dates and host name are verified)"),
        )
    } else {
        fail(
            format!("{what} unreachable at {url}: {error}"),
            format!("start it or fix {url_key}"),
        )
    }
}

async fn librechat_checks(cfg: &Config) -> Vec<Check> {
    let http = match doctor_http("librechat.tls_ca_file", &cfg.librechat.tls_ca_file) {
        Ok(c) => c,
        Err(e) => {
            return vec![fail(
                format!("cannot build an HTTP client: {e}"),
                "fix librechat.tls_ca_file",
            )]
        }
    };
    let base = cfg.librechat.url.trim_end_matches('/');
    let mut checks = Vec::new();
    match http.get(format!("{base}/health")).send().await {
        Ok(r) if r.status().is_success() => {
            checks.push(ok(format!("LibreChat answers at {base}")));
            if base.starts_with("https://") {
                checks.push(ok("LibreChat TLS handshake: the certificate is trusted, valid now and names the host"));
                let ca =
                    crate::tls::CaBundle::load("librechat.tls_ca_file", &cfg.librechat.tls_ca_file);
                let config = ca.and_then(|ca| {
                    crate::tls::http_client_config("librechat.tls_ca_file", ca.as_ref())
                });
                checks.extend(
                    expiry_checks(
                        "LibreChat",
                        https_endpoints(&[base]),
                        config,
                        "librechat.tls_ca_file",
                    )
                    .await,
                );
            }
        }
        Ok(r) => {
            return vec![fail(
                format!("LibreChat /health answered {}", r.status()),
                "check librechat.url points at LibreChat's API server",
            )]
        }
        Err(e) => {
            return vec![unreachable(
                "LibreChat",
                base,
                &e,
                "librechat.tls_ca_file",
                "librechat.url",
            )]
        }
    }
    let config: Option<Value> = match http.get(format!("{base}/api/config")).send().await {
        Ok(r) if r.status().is_success() => r.json().await.ok(),
        _ => None,
    };
    let Some(config) = config else {
        checks.push(fail(
            "LibreChat /api/config did not answer JSON",
            "check that librechat.url is LibreChat (v0.7.x or later)",
        ));
        return checks;
    };
    if config.get("registrationEnabled").and_then(Value::as_bool) == Some(true) {
        checks.push(ok("LibreChat registration is enabled"));
    } else {
        checks.push(fail(
            "LibreChat registration is disabled: new users cannot be provisioned",
            "set ALLOW_REGISTRATION=true in LibreChat's environment",
        ));
    }
    if config.get("passwordResetEnabled").and_then(Value::as_bool) == Some(true) {
        checks.push(ok(
            "LibreChat password reset is enabled (conflicts can self-heal)",
        ));
    } else {
        checks.push(warn(
            "LibreChat password reset is disabled: existing accounts become `conflict`",
            "set ALLOW_PASSWORD_RESET=true (with no email service) in LibreChat's environment",
        ));
    }
    checks
}

async fn identity_checks(cfg: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let http = match doctor_http("identity.tls_ca_file", &cfg.identity.tls_ca_file) {
        Ok(c) => c,
        Err(e) => {
            return vec![fail(
                format!("cannot build an HTTP client: {e}"),
                "fix identity.tls_ca_file",
            )]
        }
    };
    // Any answer of the token endpoint (a GET is 405) proves the connection and its TLS.
    let base = cfg.identity.base_url.trim_end_matches('/');
    if base.starts_with("https://") {
        let token_url = format!("{base}{}", cfg.identity.token_path);
        match http.get(&token_url).send().await {
            Ok(_) => checks.push(ok(format!(
                "identity service TLS handshake at {base}: the certificate is trusted, valid now and names the host"
            ))),
            Err(e) => {
                checks.push(unreachable(
                    "identity service",
                    base,
                    &e,
                    "identity.tls_ca_file",
                    "identity.base_url",
                ));
                checks.extend(identity_key_checks(cfg, &http).await);
                return checks;
            }
        }
    }
    let ca = crate::tls::CaBundle::load("identity.tls_ca_file", &cfg.identity.tls_ca_file);
    let config =
        ca.and_then(|ca| crate::tls::http_client_config("identity.tls_ca_file", ca.as_ref()));
    checks.extend(
        expiry_checks(
            "identity service",
            https_endpoints(&[base, &cfg.identity.jwt.jwks_url]),
            config,
            "identity.tls_ca_file",
        )
        .await,
    );
    checks.extend(identity_key_checks(cfg, &http).await);
    checks
}

async fn identity_key_checks(cfg: &Config, http: &reqwest::Client) -> Vec<Check> {
    let jwt = &cfg.identity.jwt;
    let hmac = jwt
        .algorithms
        .iter()
        .any(|a| a.to_ascii_uppercase().starts_with("HS"));
    if hmac {
        if jwt.hs_secret.is_empty() {
            return vec![fail(
                "identity.jwt.hs_secret is empty: every identity token is rejected",
                "set identity.jwt.hs_secret_file to the identity service's SIGNING_KEY",
            )];
        }
        return vec![ok("identity tokens: HMAC secret configured")];
    }
    if !jwt.jwks_url.is_empty() {
        let keys = async {
            let r = http.get(&jwt.jwks_url).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            Some(v.get("keys")?.as_array()?.len())
        }
        .await;
        return match keys {
            Some(n) if n > 0 => vec![ok(format!("identity JWKS: {n} key(s)"))],
            _ => vec![fail(
                format!(
                    "identity JWKS at {} has no keys or does not answer",
                    jwt.jwks_url
                ),
                "fix identity.jwt.jwks_url",
            )],
        };
    }
    vec![ok("identity tokens: PEM public key configured")]
}

trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for redis::RedisError {
    fn kind_name(&self) -> String {
        // The error's Display may include the URL (with a password): print the kind only.
        format!("{:?}", self.kind())
    }
}
