//! Calls the identity service's token endpoints (SimpleJWT by default: `POST /api/token/` and
//! `POST /api/token/refresh/`). Upstream bodies are never echoed: they may carry tokens.

use std::time::Duration;

use reqwest::{header::HeaderMap, StatusCode};
use serde_json::{Map, Value};

use crate::{
    config::{ConfigError, IdentityConfig},
    end_user::EndUser,
};

use super::verifier::VerifyError;

/// How long to wait before asking again when the identity service says "later" without saying
/// how long (a 429 or 503 without `Retry-After`).
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// A `Retry-After` beyond this is clamped: a session is not frozen for longer on one answer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum IdentityClientError {
    /// A definite no: the token endpoint answered 400, 401 or 403 (wrong password, refresh
    /// token expired/blacklisted, inactive user). Only this ends a session or counts as a failed
    /// sign-in.
    #[error("the identity service refused the credentials")]
    Rejected,
    /// 429 (or a 503 carrying `Retry-After`): the identity service asks us to come back later.
    #[error("the identity service is throttling; retry after {}s", retry_after.as_secs())]
    Throttled { retry_after: Duration },
    /// The issued token did not verify.
    #[error("issued token does not verify: {0}")]
    Token(#[source] VerifyError),
    /// Unreachable, timed out, 5xx, or an answer that is no verdict (another 4xx, e.g. a
    /// misrouted 404 from an ingress).
    #[error("identity service unavailable: {0}")]
    Unavailable(String),
    #[error("identity service answered unexpectedly: {0}")]
    BadResponse(String),
}

/// Tokens as the identity service issued them. `refresh` is `None` when a refresh response did
/// not rotate it.
#[derive(Clone)]
pub struct IdentityTokens {
    pub access: String,
    pub refresh: Option<String>,
}

impl std::fmt::Debug for IdentityTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityTokens(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct IdentityClient {
    http: reqwest::Client,
    token_url: String,
    refresh_url: String,
    identifier_field: String,
    password_field: String,
    access_field: String,
    refresh_field: String,
    refresh_request_field: String,
}

impl IdentityClient {
    pub fn new(cfg: &IdentityConfig, http: reqwest::Client) -> Self {
        let base = cfg.base_url.trim_end_matches('/');
        Self {
            http,
            token_url: format!("{base}{}", cfg.token_path),
            refresh_url: format!("{base}{}", cfg.refresh_path),
            identifier_field: cfg.identifier_field.clone(),
            password_field: cfg.password_field.clone(),
            access_field: cfg.access_field.clone(),
            refresh_field: cfg.refresh_field.clone(),
            refresh_request_field: cfg.refresh_request_field.clone(),
        }
    }

    /// An HTTP client for the identity service: timeouts, no redirects (a redirect from a token
    /// endpoint is a misconfiguration, not something to follow with a password).
    /// With `identity.tls_ca_file`, only that bundle's CAs are trusted (token endpoints and
    /// JWKS alike).
    pub fn http_client(cfg: &IdentityConfig) -> Result<reqwest::Client, ConfigError> {
        let ca = crate::tls::CaBundle::load("identity.tls_ca_file", &cfg.tls_ca_file)?;
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .connect_timeout(Duration::from_secs(cfg.timeout_secs.min(5)))
            .redirect(reqwest::redirect::Policy::none());
        crate::tls::reqwest_trust(builder, "identity.tls_ca_file", ca.as_ref())?
            .build()
            .map_err(|e| ConfigError::Invalid {
                key: "identity.tls_ca_file".into(),
                reason: format!(
                    "cannot build the HTTP client: {}",
                    crate::tls::error_chain(&e)
                ),
            })
    }

    /// Exchanges a user's identifier (email or username) and password for tokens, on behalf of
    /// `caller` (forwarded as `X-Forwarded-For` and `User-Agent`).
    pub async fn obtain(
        &self,
        identifier: &str,
        password: &str,
        caller: &EndUser,
    ) -> Result<IdentityTokens, IdentityClientError> {
        let mut body = Map::new();
        body.insert(self.identifier_field.clone(), identifier.into());
        body.insert(self.password_field.clone(), password.into());
        let obj = self.post(&self.token_url, body, caller).await?;
        let refresh = self.field(&obj, &self.refresh_field);
        Ok(IdentityTokens {
            access: self
                .field(&obj, &self.access_field)
                .ok_or_else(|| missing(&self.access_field))?,
            refresh,
        })
    }

    /// Trades a refresh token for a new access token (and, with rotation, a new refresh token),
    /// on behalf of `caller` (the request that needed it).
    pub async fn refresh(
        &self,
        refresh: &str,
        caller: &EndUser,
    ) -> Result<IdentityTokens, IdentityClientError> {
        let mut body = Map::new();
        body.insert(self.refresh_request_field.clone(), refresh.into());
        let obj = self.post(&self.refresh_url, body, caller).await?;
        Ok(IdentityTokens {
            access: self
                .field(&obj, &self.access_field)
                .ok_or_else(|| missing(&self.access_field))?,
            refresh: self.field(&obj, &self.refresh_field),
        })
    }

    /// The end user's address is the only `X-Forwarded-For` entry: the BFF is the hop the
    /// identity service talks to, and what the client sent was already judged by `client_ip`.
    async fn post(
        &self,
        url: &str,
        body: Map<String, Value>,
        caller: &EndUser,
    ) -> Result<Map<String, Value>, IdentityClientError> {
        let mut req = self
            .http
            .post(url)
            .header("x-forwarded-for", caller.ip.to_string());
        if let Some(ua) = &caller.user_agent {
            req = req.header(reqwest::header::USER_AGENT, ua.clone());
        }
        let res = req.json(&body).send().await.map_err(|e| {
            IdentityClientError::Unavailable(crate::tls::error_chain(&e.without_url()))
        })?;
        let status = res.status();
        if !status.is_success() {
            return Err(classify_failure(status, res.headers()));
        }
        match res.json::<Value>().await {
            Ok(Value::Object(obj)) => Ok(obj),
            _ => Err(IdentityClientError::BadResponse(
                "token endpoint did not answer a JSON object".into(),
            )),
        }
    }

    fn field(&self, obj: &Map<String, Value>, name: &str) -> Option<String> {
        obj.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }
}

/// A non-2xx answer of a token endpoint. SimpleJWT/DRF refuse with 400 (invalid input), 401
/// (wrong credentials, invalid or blacklisted token) and 403; everything else says nothing about
/// the credentials and must never end a session.
fn classify_failure(status: StatusCode, headers: &HeaderMap) -> IdentityClientError {
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).clamp(Duration::from_secs(1), MAX_RETRY_AFTER));
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            IdentityClientError::Rejected
        }
        StatusCode::TOO_MANY_REQUESTS => IdentityClientError::Throttled {
            retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
        },
        StatusCode::SERVICE_UNAVAILABLE if retry_after.is_some() => {
            IdentityClientError::Throttled {
                retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            }
        }
        _ => IdentityClientError::Unavailable(format!("token endpoint answered {status}")),
    }
}

fn missing(field: &str) -> IdentityClientError {
    IdentityClientError::BadResponse(format!("token response lacks `{field}`"))
}
