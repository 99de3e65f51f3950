//! `librechat-bff doctor`: checks the deployment around the BFF and prints a checklist with a fix
//! for every problem. Exit code 0 when nothing failed (warnings allowed), 1 otherwise.

use std::time::Duration;

use serde_json::Value;

use crate::{
    app::AppState,
    config::{Config, SessionStoreKind},
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
    let mut checks = Vec::new();
    let mut conn = match state.redis.conn().await {
        Ok(c) => c,
        Err(e) => {
            return vec![fail(
                format!("Redis unreachable: {}", e.kind_name()),
                "start Redis or fix redis.url (credentials, sessions and jobs live there)",
            )]
        }
    };
    match redis::cmd("PING").query_async::<String>(&mut conn).await {
        Ok(_) => checks.push(ok("Redis answers")),
        Err(e) => {
            return vec![fail(
                format!("Redis does not answer PING: {}", e.kind_name()),
                "check redis.url and the Redis server's health",
            )]
        }
    }
    let aof: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut conn)
        .await;
    match aof.as_deref() {
        Ok([_, v]) if v == "yes" => checks.push(ok("Redis persistence: appendonly yes")),
        Ok(_) => checks.push(warn(
            "Redis runs without AOF: a Redis restart can lose credentials, sessions and jobs",
            "run Redis with `appendonly yes` (compose.librechat.yaml does)",
        )),
        Err(_) => checks.push(warn(
            "cannot read Redis's appendonly setting (CONFIG is disabled?)",
            "make sure your Redis persists with AOF",
        )),
    }
    // A credential the ring cannot decrypt means a key was removed too early.
    let pattern = state.redis.key("cred:*");
    let sample: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(&pattern)
        .arg("COUNT")
        .arg(100)
        .query_async(&mut conn)
        .await;
    if let Ok((_, keys)) = sample {
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

async fn librechat_checks(cfg: &Config) -> Vec<Check> {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(_) => return vec![fail("cannot build an HTTP client", "report a bug")],
    };
    let base = cfg.librechat.url.trim_end_matches('/');
    let mut checks = Vec::new();
    match http.get(format!("{base}/health")).send().await {
        Ok(r) if r.status().is_success() => checks.push(ok(format!("LibreChat answers at {base}"))),
        Ok(r) => {
            return vec![fail(
                format!("LibreChat /health answered {}", r.status()),
                "check librechat.url points at LibreChat's API server",
            )]
        }
        Err(_) => {
            return vec![fail(
                format!("LibreChat unreachable at {base}"),
                "start LibreChat or fix librechat.url",
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
            let r = reqwest::Client::new()
                .get(&jwt.jwks_url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
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
