//! LibreChat's auth routes, exactly as the contract (shared/librechat-contract.md §1–4) says:
//! the refresh token travels as a cookie we keep ourselves (a cookie jar would not send a
//! Secure cookie to an internal http URL), redirects are never followed, and every call carries
//! the end user's address and a browser User-Agent.

use std::time::Duration;

use cookie::Cookie;
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

use crate::{
    config::{ConfigError, LibreChatConfig},
    end_user::ClientInfo,
};

/// The cookie LibreChat keeps its refresh token in.
const REFRESH_COOKIE: &str = "refreshToken";

#[derive(Debug, thiserror::Error)]
pub enum LibreChatError {
    /// LibreChat's own verdict on the email/password (see `login_not_found`).
    #[error("LibreChat refused the email/password")]
    BadCredentials,
    #[error("the LibreChat session is gone (refresh refused)")]
    SessionExpired,
    #[error("LibreChat rate limit; retry after {}s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    #[error("LibreChat has banned this user or address")]
    Banned,
    #[error("the LibreChat account needs two-factor authentication")]
    TwoFactorRequired,
    #[error("LibreChat rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("LibreChat unreachable: {0}")]
    Unavailable(String),
    #[error("LibreChat answered unexpectedly: {0}")]
    Unexpected(String),
}

/// A LibreChat login: the access token and the refresh cookie that renews it.
#[derive(Clone)]
pub struct LibreChatLogin {
    pub token: String,
    pub user_id: Option<String>,
    pub refresh_token: String,
    /// `exp` of the access token (unix seconds).
    pub token_exp: i64,
    /// `exp` of the refresh token: the LibreChat session's fixed end.
    pub refresh_exp: i64,
    /// `user.role` (`USER`, `ADMIN`), when the answer carries it.
    pub role: Option<String>,
}

impl std::fmt::Debug for LibreChatLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibreChatLogin")
            .field("user_id", &self.user_id)
            .field("token_exp", &self.token_exp)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct LibreChatClient {
    http: reqwest::Client,
    base: String,
}

impl LibreChatClient {
    /// With `librechat.tls_ca_file`, only that bundle's CAs are trusted.
    pub fn new(cfg: &LibreChatConfig) -> Result<Self, ConfigError> {
        let ca = crate::tls::CaBundle::load("librechat.tls_ca_file", &cfg.tls_ca_file)?;
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .timeout(Duration::from_secs(cfg.response_header_timeout_secs.max(5)))
            .pool_idle_timeout(Duration::from_secs(cfg.pool_idle_timeout_secs))
            .redirect(reqwest::redirect::Policy::none());
        let http = crate::tls::reqwest_trust(builder, "librechat.tls_ca_file", ca.as_ref())?
            .build()
            .map_err(|e| ConfigError::Invalid {
                key: "librechat.tls_ca_file".into(),
                reason: format!(
                    "cannot build the HTTP client: {}",
                    crate::tls::error_chain(&e)
                ),
            })?;
        Ok(Self {
            http,
            base: cfg.url.trim_end_matches('/').to_owned(),
        })
    }

    fn post(&self, path: &str, client: &ClientInfo) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .header("x-forwarded-for", client.ip.to_string())
            .header(header::USER_AGENT, client.user_agent.clone())
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, LibreChatError> {
        req.send()
            .await
            .map_err(|e| LibreChatError::Unavailable(crate::tls::error_chain(&e.without_url())))
    }

    /// `POST /api/auth/login {email, password}` → `{token, user}` + refresh cookie.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        client: &ClientInfo,
    ) -> Result<LibreChatLogin, LibreChatError> {
        let res = self
            .send(
                self.post("/api/auth/login", client)
                    .json(&json!({ "email": email, "password": password })),
            )
            .await?;
        let status = res.status();
        if status == StatusCode::NOT_FOUND {
            return Err(login_not_found(res).await);
        }
        if !status.is_success() {
            return Err(failure(res).await);
        }
        let cookie = refresh_cookie(res.headers());
        let body: Value = res
            .json()
            .await
            .map_err(|_| LibreChatError::Unexpected("login answered non-JSON".into()))?;
        if body.get("twoFAPending").and_then(Value::as_bool) == Some(true) {
            return Err(LibreChatError::TwoFactorRequired);
        }
        into_login(&body, cookie)
    }

    /// `POST /api/auth/refresh` with only the Cookie header. The refresh token rotates: the
    /// returned one replaces the old, which is dead from now on.
    pub async fn refresh(
        &self,
        refresh_token: &str,
        client: &ClientInfo,
    ) -> Result<LibreChatLogin, LibreChatError> {
        let res = self
            .send(
                self.post("/api/auth/refresh", client)
                    .header(header::COOKIE, refresh_cookie_header(refresh_token)),
            )
            .await?;
        let status = res.status();
        let is_json = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        // 401/403 text, 302 to /login, and 200 text "Refresh token not provided" all mean the
        // session is gone (contract §3).
        if status.is_redirection()
            || status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN
            || (status == StatusCode::OK && !is_json)
        {
            return Err(LibreChatError::SessionExpired);
        }
        if !status.is_success() {
            return Err(failure(res).await);
        }
        let cookie = refresh_cookie(res.headers());
        let body: Value = res
            .json()
            .await
            .map_err(|_| LibreChatError::Unexpected("refresh answered non-JSON".into()))?;
        into_login(&body, cookie)
    }

    /// `POST /api/auth/logout` with Bearer AND cookie (without the cookie LibreChat may delete an
    /// arbitrary session of the user, contract §4).
    pub async fn logout(
        &self,
        token: &str,
        refresh_token: &str,
        client: &ClientInfo,
    ) -> Result<(), LibreChatError> {
        let res = self
            .send(
                self.post("/api/auth/logout", client)
                    .bearer_auth(token)
                    .header(header::COOKIE, refresh_cookie_header(refresh_token)),
            )
            .await?;
        success(res).await
    }

    /// `POST /api/auth/register`. 200 means created OR already existing (indistinguishable).
    pub async fn register(
        &self,
        name: &str,
        email: &str,
        password: &str,
        client: &ClientInfo,
    ) -> Result<(), LibreChatError> {
        let res = self
            .send(self.post("/api/auth/register", client).json(&json!({
                "name": name,
                "email": email,
                "password": password,
                "confirm_password": password,
            })))
            .await?;
        success(res).await
    }

    /// `POST /api/auth/requestPasswordReset {email}`: with no email service configured LibreChat
    /// answers `{link}` (contract §6); with one it answers `{message}` (→ `None`).
    pub async fn request_password_reset(
        &self,
        email: &str,
        client: &ClientInfo,
    ) -> Result<Option<String>, LibreChatError> {
        let res = self
            .send(
                self.post("/api/auth/requestPasswordReset", client)
                    .json(&json!({ "email": email })),
            )
            .await?;
        if !res.status().is_success() {
            return Err(failure(res).await);
        }
        let body: Value = res.json().await.unwrap_or(Value::Null);
        Ok(body.get("link").and_then(Value::as_str).map(str::to_owned))
    }

    /// `POST /api/auth/resetPassword`. Kills every LibreChat session of that user.
    pub async fn reset_password(
        &self,
        librechat_user_id: &str,
        token: &str,
        password: &str,
        client: &ClientInfo,
    ) -> Result<(), LibreChatError> {
        let res = self
            .send(self.post("/api/auth/resetPassword", client).json(&json!({
                "userId": librechat_user_id,
                "token": token,
                "password": password,
                "confirm_password": password,
            })))
            .await?;
        success(res).await
    }
}

/// `Ok` for a 2xx answer, else the typed failure.
async fn success(res: reqwest::Response) -> Result<(), LibreChatError> {
    if res.status().is_success() {
        Ok(())
    } else {
        Err(failure(res).await)
    }
}

/// Maps a non-success auth-route answer to an error, without keeping LibreChat's body beyond
/// its `message` (which never holds a secret on these routes).
async fn failure(res: reqwest::Response) -> LibreChatError {
    let status = res.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        let secs = res
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(60);
        return LibreChatError::RateLimited {
            retry_after: Duration::from_secs(secs),
        };
    }
    if status.is_server_error() {
        return LibreChatError::Unavailable(format!("LibreChat answered {status}"));
    }
    let text = res.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.chars().take(200).collect());
    if status == StatusCode::FORBIDDEN && message.contains("banned") {
        return LibreChatError::Banned;
    }
    LibreChatError::Rejected {
        status: status.as_u16(),
        message,
    }
}

/// A 404 from `POST /api/auth/login` is LibreChat's credential verdict only when it is its own
/// answer (contract §2, `requireLocalAuth`: `res.status(404).send(info)` with passport's `info`):
/// a JSON `{message}` saying "Incorrect password.", "Email does not exist.", passport-local's
/// "Missing credentials", or a zod validation text (`email: …` / `password: …`). Anything else —
/// an ingress's HTML 404, no JSON, another message (LibreChat's "Endpoint not found" for a
/// misrouted path) — says nothing about the password and must not mark the credential drifted.
async fn login_not_found(res: reqwest::Response) -> LibreChatError {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("application/json"));
    let text = if is_json {
        read_bounded(res, 4096).await
    } else {
        String::new()
    };
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned));
    match message {
        Some(m) if is_credential_verdict(&m) => LibreChatError::BadCredentials,
        Some(_) => LibreChatError::Unavailable(
            "LibreChat login answered 404 with a message that is not a credential verdict".into(),
        ),
        None => LibreChatError::Unavailable(
            "LibreChat login answered 404 without LibreChat's JSON (misrouted?)".into(),
        ),
    }
}

/// The body as text when it is at most `max` bytes (LibreChat's verdicts are one sentence);
/// empty when longer or unreadable.
async fn read_bounded(mut res: reqwest::Response, max: usize) -> String {
    let mut body = Vec::new();
    loop {
        match res.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= max => body.extend_from_slice(&chunk),
            Ok(None) => return String::from_utf8(body).unwrap_or_default(),
            Ok(Some(_)) | Err(_) => return String::new(),
        }
    }
}

/// Passport's and zod's refusals of a login body (contract §2; `api/strategies/localStrategy.js`
/// and `errorsToString`, which joins `<field>: <message>` issues with spaces).
fn is_credential_verdict(message: &str) -> bool {
    const VERDICTS: [&str; 3] = [
        "Incorrect password.",
        "Email does not exist.",
        "Missing credentials",
    ];
    let message = message.trim();
    VERDICTS.contains(&message)
        || message.starts_with("email: ")
        || message.starts_with("password: ")
}

/// The `refreshToken` value from the response's `Set-Cookie` lines (the first non-empty one).
fn refresh_cookie(headers: &header::HeaderMap) -> Option<String> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|line| Cookie::parse(line).ok())
        .find(|c| c.name() == REFRESH_COOKIE && !c.value().is_empty())
        .map(|c| c.value().to_owned())
}

/// The `Cookie:` header LibreChat's refresh and logout expect: the refresh token and the
/// provider that issued it (contract §3–4).
fn refresh_cookie_header(refresh_token: &str) -> String {
    format!(
        "{}; {}",
        Cookie::new(REFRESH_COOKIE, refresh_token).stripped(),
        Cookie::new("token_provider", "librechat").stripped()
    )
}

fn into_login(body: &Value, cookie: Option<String>) -> Result<LibreChatLogin, LibreChatError> {
    let token = body
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| LibreChatError::Unexpected("no token in the answer".into()))?
        .to_owned();
    let refresh_token =
        cookie.ok_or_else(|| LibreChatError::Unexpected("no refreshToken cookie".into()))?;
    // Login answers carry `user.id` and `user._id`; refresh answers only `_id` (contract pitfall 4).
    let user_id = body
        .get("user")
        .and_then(|u| u.get("id").or_else(|| u.get("_id")))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let role = body
        .get("user")
        .and_then(|u| u.get("role"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let token_exp = super::jwt_exp(&token)
        .ok_or_else(|| LibreChatError::Unexpected("access token has no exp".into()))?;
    let refresh_exp = super::jwt_exp(&refresh_token).unwrap_or(token_exp);
    Ok(LibreChatLogin {
        token,
        user_id,
        refresh_token,
        token_exp,
        refresh_exp,
        role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_cookie_is_read_from_set_cookie_lines() {
        let mut headers = header::HeaderMap::new();
        for line in [
            "token_provider=librechat; Path=/; HttpOnly",
            "refreshToken=; Max-Age=0; Path=/",
            "refreshToken=eyJ.abc.def; Expires=Wed, 21 Oct 2099 07:28:00 GMT; HttpOnly; Secure; SameSite=Strict",
        ] {
            headers.append(
                header::SET_COOKIE,
                header::HeaderValue::from_str(line).expect("valid header"),
            );
        }
        assert_eq!(refresh_cookie(&headers).as_deref(), Some("eyJ.abc.def"));
        assert_eq!(refresh_cookie(&header::HeaderMap::new()), None);
    }

    #[test]
    fn refresh_cookie_header_carries_token_and_provider() {
        assert_eq!(
            refresh_cookie_header("eyJ.abc.def"),
            "refreshToken=eyJ.abc.def; token_provider=librechat"
        );
    }
}
