//! Auth routes (register, login, refresh, logout, password reset, config) and the tokens,
//! cookies and authentication they use.

use super::*;

pub(super) async fn register(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    let opts = shared.opts();
    let limit = lock(&shared.limits).register.hit(&ctx.ip);
    if limit.limited {
        let msg = format!(
            "Too many accounts created, please try again after {} minutes",
            minutes(opts.register_window)
        );
        return limit.with(json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({ "message": msg }),
        ));
    }
    if banned_by_ip_or_email(shared, ctx) {
        return limit.with(ban_response(ctx));
    }
    if !opts.allow_registration {
        return limit.with(json_reply(
            StatusCode::FORBIDDEN,
            &json!({"message": "Registration is not allowed."}),
        ));
    }
    let body = ctx.body();
    let reg = match validate_registration(&body) {
        Ok(reg) => reg,
        // registerUser answers zod failures with status 404.
        Err(msg) => {
            return limit.with(json_reply(
                StatusCode::NOT_FOUND,
                &json!({ "message": msg }),
            ))
        }
    };
    let exists = lock(&shared.db).user_by_email(&reg.email).is_some();
    if exists {
        // Same answer as a new registration (no enumeration); the real server sleeps 1 s here.
        if !opts.duplicate_register_delay.is_zero() {
            tokio::time::sleep(opts.duplicate_register_delay).await;
        }
    } else {
        lock(&shared.db).insert_user(
            &shared.oid,
            &reg.email,
            reg.username.as_deref().unwrap_or(""),
            &reg.name,
            &reg.password,
        );
    }
    limit.with(json_reply(
        StatusCode::OK,
        &json!({ "message": REGISTER_OK }),
    ))
}

pub(super) fn login(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    let opts = shared.opts();
    let limit = lock(&shared.limits).login.hit(&ctx.ip);
    if limit.limited {
        let msg = format!(
            "Too many login attempts, please try again after {} minutes.",
            minutes(opts.login_window)
        );
        return limit.with(json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({ "message": msg }),
        ));
    }
    if banned_by_ip_or_email(shared, ctx) {
        return limit.with(ban_response(ctx));
    }
    let body = ctx.body();
    let fail = |msg: &str| -> Response<Body> {
        // requireLocalAuth turns every passport failure into 404 {message}.
        limit.with(json_reply(
            StatusCode::NOT_FOUND,
            &json!({ "message": msg }),
        ))
    };
    // passport-local: both fields must be truthy before the strategy runs.
    if !js_truthy(body.get("email")) || !js_truthy(body.get("password")) {
        return fail("Missing credentials");
    }
    let mut issues = Vec::new();
    let email = zod_string(&body, "email", None, None, &mut issues);
    if email.as_deref().is_some_and(|e| !is_valid_email(e)) {
        issues.push(("email".to_owned(), "Invalid email".to_owned()));
    }
    let password = zod_string(&body, "password", Some(8), Some(128), &mut issues);
    if !issues.is_empty() {
        return fail(&errors_to_string(&issues));
    }
    let (email, password) = (email.unwrap_or_default(), password.unwrap_or_default());
    let Some(user) = lock(&shared.db).user_by_email(&email).cloned() else {
        return fail("Email does not exist.");
    };
    if user.password_hash != hash_password(&password) {
        return fail("Incorrect password.");
    }
    // Every login opens a new session.
    let expiration_ms = now_ms() + opts.refresh_token_lifetime.as_millis() as u64;
    let session_id = shared.oid.next();
    let refresh_token = sign_refresh(shared, &user.id, &session_id, expiration_ms);
    lock(&shared.db).sessions.push(Session {
        id: session_id,
        user_id: user.id.clone(),
        refresh_hash: sha256_hex(refresh_token.as_bytes()),
        expiration_ms,
    });
    let token = sign_access(shared, &user, &opts);
    let mut resp = json_reply(
        StatusCode::OK,
        &json!({"token": token, "user": user.to_json(UserView::Login)}),
    );
    set_auth_cookies(
        &mut resp,
        &refresh_token,
        expiration_ms,
        opts.secure_cookies,
    );
    limit.with(resp)
}

pub(super) fn refresh(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    let opts = shared.opts();
    // Only the Cookie header is read; the body is ignored.
    let cookies = parse_cookies(&ctx.headers);
    let token = match cookies.get("refreshToken") {
        Some(t) if !t.is_empty() => t.clone(),
        _ => return text(StatusCode::OK, "Refresh token not provided"),
    };
    // jwt.verify throws on a bad signature, a malformed token and an expired one alike; the
    // controller's catch answers all three with 403 text.
    let claims: RefreshClaims = match verify(&token, &shared.refresh_secret) {
        Ok(c) => c,
        Err(_) => return text(StatusCode::FORBIDDEN, "Invalid refresh token"),
    };
    let now = now_ms();
    let mut db = lock(&shared.db);
    let Some(user) = db.user_by_id(&claims.id).cloned() else {
        // `res.status(401).redirect('/login')`: redirect overrides the status.
        return redirect_to_login();
    };
    let hash = sha256_hex(token.as_bytes());
    let Some(session) = db
        .sessions
        .iter_mut()
        .find(|s| s.user_id == user.id && s.refresh_hash == hash && s.expiration_ms > now)
    else {
        let retry = ctx.query.get("retry").is_some_and(|v| !v.is_empty());
        return if retry {
            text(StatusCode::FORBIDDEN, "No session found")
        } else {
            text(
                StatusCode::UNAUTHORIZED,
                "Refresh token expired or not found for this user",
            )
        };
    };
    // Rotation: a new token for the same session; its expiry stays the one fixed at login.
    let new_token = sign_refresh(shared, &user.id, &session.id, session.expiration_ms);
    session.refresh_hash = sha256_hex(new_token.as_bytes());
    let expiration_ms = session.expiration_ms;
    drop(db);
    let token = sign_access(shared, &user, &opts);
    let mut resp = json_reply(
        StatusCode::OK,
        &json!({"token": token, "user": user.to_json(UserView::Refresh)}),
    );
    set_auth_cookies(&mut resp, &new_token, expiration_ms, opts.secure_cookies);
    resp
}

pub(super) fn logout(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    let user = match authenticate(shared, ctx) {
        Ok(u) => u,
        Err(resp) => return *resp,
    };
    let cookies = parse_cookies(&ctx.headers);
    let now = now_ms();
    let mut db = lock(&shared.db);
    let position = match cookies.get("refreshToken").filter(|t| !t.is_empty()) {
        Some(token) => {
            let hash = sha256_hex(token.as_bytes());
            db.sessions.iter().position(|s| {
                s.user_id == user.id && s.refresh_hash == hash && s.expiration_ms > now
            })
        }
        // Without a cookie LibreChat's findSession matches on the user alone and deletes
        // whichever session comes first.
        None => db
            .sessions
            .iter()
            .position(|s| s.user_id == user.id && s.expiration_ms > now),
    };
    if let Some(i) = position {
        db.sessions.remove(i);
    }
    drop(db);
    let mut resp = json_reply(StatusCode::OK, &json!({"message": "Logout successful"}));
    clear_auth_cookies(&mut resp);
    resp
}

pub(super) fn request_password_reset(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    let opts = shared.opts();
    let limit = lock(&shared.limits).reset.hit(&ctx.ip);
    if limit.limited {
        let msg = format!(
            "Too many attempts, please try again after {} minute(s)",
            minutes(opts.reset_password_window)
        );
        return limit.with(json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({ "message": msg }),
        ));
    }
    if banned_by_ip_or_email(shared, ctx) {
        return limit.with(ban_response(ctx));
    }
    if !opts.allow_password_reset {
        return limit.with(text(
            StatusCode::FORBIDDEN,
            "Password reset is not allowed.",
        ));
    }
    let email = ctx.body_str("email").unwrap_or_default();
    let mut db = lock(&shared.db);
    let Some(user_id) = db.user_by_email(&email).map(|u| u.id.clone()) else {
        return limit.with(json_reply(
            StatusCode::OK,
            &json!({"message":
                "If an account with that email exists, a password reset link has been sent to it."}),
        ));
    };
    // No email transport: the link (with the raw token) comes back in the body. Old tokens die.
    let token = hex(&random_bytes(32));
    db.reset_tokens.retain(|t| t.user_id != user_id);
    db.reset_tokens.push(ResetToken {
        user_id: user_id.clone(),
        token_hash: sha256_hex(token.as_bytes()),
        expires_ms: now_ms() + 900_000,
    });
    let link = format!(
        "{}/reset-password?token={token}&userId={user_id}",
        shared.base_url
    );
    limit.with(json_reply(StatusCode::OK, &json!({ "link": link })))
}

pub(super) fn reset_password(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    if banned_by_ip_or_email(shared, ctx) {
        return ban_response(ctx);
    }
    if !shared.opts().allow_password_reset {
        return text(StatusCode::FORBIDDEN, "Password reset is not allowed.");
    }
    let user_id = ctx.body_str("userId").unwrap_or_default();
    let token = ctx.body_str("token").unwrap_or_default();
    let password = ctx.body_str("password").unwrap_or_default();
    let now = now_ms();
    let mut db = lock(&shared.db);
    let hash = sha256_hex(token.as_bytes());
    let valid = db
        .reset_tokens
        .iter()
        .position(|t| t.user_id == user_id && t.token_hash == hash && t.expires_ms > now);
    let (Some(i), false) = (valid, password.is_empty()) else {
        // A serialized Error: its message is not enumerable, so the body is `{}`.
        return json_reply(StatusCode::BAD_REQUEST, &json!({}));
    };
    db.reset_tokens.remove(i);
    if let Some(user) = db.users.iter_mut().find(|u| u.id == user_id) {
        user.password_hash = hash_password(&password);
        user.updated_at = iso(now);
    }
    db.sessions.retain(|s| s.user_id != user_id);
    json_reply(
        StatusCode::OK,
        &json!({"message": "Password reset was successful"}),
    )
}

pub(super) fn config(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
    let opts = shared.opts();
    let mut cfg = json!({
        "appTitle": "LibreChat",
        "socialLogins": [],
        "discordLoginEnabled": false,
        "facebookLoginEnabled": false,
        "githubLoginEnabled": false,
        "googleLoginEnabled": false,
        "appleLoginEnabled": false,
        "openidLoginEnabled": false,
        "samlLoginEnabled": false,
        "emailLoginEnabled": true,
        "registrationEnabled": opts.allow_registration,
        "socialLoginEnabled": false,
        "passwordResetEnabled": opts.allow_password_reset,
        "emailEnabled": false,
        "showBirthdayIcon": false,
        "helpAndFaqURL": "https://librechat.ai",
        "sharedLinksEnabled": true,
        "publicSharedLinksEnabled": false,
        "serverDomain": shared.base_url,
    });
    // With a valid token the startup config grows the per-user sections.
    if authenticate(shared, ctx).is_ok() {
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert("interface".into(), json!({"endpointsMenu": true}));
            obj.insert("modelSpecs".into(), json!({"list": []}));
            obj.insert("balance".into(), json!({"enabled": false}));
        }
    }
    json_reply(StatusCode::OK, &cfg)
}

// ---------------------------------------------------------------------------------------------
// Tokens, cookies, authentication
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
pub(super) struct AccessClaims {
    pub(super) id: String,
    pub(super) username: String,
    pub(super) provider: String,
    pub(super) email: String,
    pub(super) iat: i64,
    pub(super) exp: i64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct RefreshClaims {
    pub(super) id: String,
    #[serde(rename = "sessionId")]
    session_id: String,
    /// Not in LibreChat's payload; keeps two rotations within one second distinct.
    jti: String,
    pub(super) iat: i64,
    pub(super) exp: i64,
}

pub(super) fn sign<T: Serialize>(claims: &T, secret: &[u8]) -> String {
    // HS256 over serde_json output cannot fail for these plain structs.
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

fn sign_access(shared: &Shared, user: &User, opts: &FakeLibreChatOptions) -> String {
    let now = (now_ms() / 1000) as i64;
    // Like the real server: no jti, so two logins in one second get the same access token.
    let claims = AccessClaims {
        id: user.id.clone(),
        username: user.username.clone(),
        provider: "local".into(),
        email: user.email.clone(),
        iat: now,
        exp: now + opts.access_token_lifetime.as_secs().max(1) as i64,
    };
    sign(&claims, &shared.access_secret)
}

fn sign_refresh(shared: &Shared, user_id: &str, session_id: &str, expiration_ms: u64) -> String {
    let claims = RefreshClaims {
        id: user_id.to_owned(),
        session_id: session_id.to_owned(),
        jti: hex(&random_bytes(8)),
        iat: (now_ms() / 1000) as i64,
        exp: (expiration_ms / 1000) as i64,
    };
    sign(&claims, &shared.refresh_secret)
}

/// The messages node's jsonwebtoken gives, in the order it checks.
#[derive(Debug)]
pub(super) enum JwtError {
    Malformed,
    Invalid,
    Signature,
    Expired,
}

impl JwtError {
    pub(super) fn message(&self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt malformed",
            JwtError::Invalid => "invalid token",
            JwtError::Signature => "invalid signature",
            JwtError::Expired => "jwt expired",
        }
    }
}

pub(super) fn verify<T: serde::de::DeserializeOwned>(
    token: &str,
    secret: &[u8],
) -> Result<T, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(JwtError::Malformed);
    }
    // Decoding problems come before the signature check in node's jsonwebtoken.
    let decodes_to_object = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v.is_object())
    };
    if !decodes_to_object(parts[0]) || !decodes_to_object(parts[1]) {
        return Err(JwtError::Invalid);
    }
    // Signature first, then expiry checked by hand: node treats `exp <= now` as expired, the
    // Rust crate only `exp < now`.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let claims =
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(secret), &validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                JwtErrorKind::InvalidSignature => JwtError::Signature,
                _ => JwtError::Invalid,
            })?;
    let now = (now_ms() / 1000) as f64;
    if claims
        .get("exp")
        .and_then(Value::as_f64)
        .is_some_and(|exp| now >= exp)
    {
        return Err(JwtError::Expired);
    }
    serde_json::from_value(claims).map_err(|_| JwtError::Invalid)
}

/// A middleware's early answer (boxed: responses are large and this is the cold path).
pub(super) type Rejection = Box<Response<Body>>;

/// `requireJwtAuth`: passport-jwt reading only `Authorization: Bearer <token>` (scheme
/// case-insensitive); failures are 401 JSON `{message: info.message}`.
pub(super) fn authenticate(shared: &Shared, ctx: &Ctx) -> Result<User, Rejection> {
    let unauthorized = |msg: &str| {
        Box::new(json_reply(
            StatusCode::UNAUTHORIZED,
            &json!({ "message": msg }),
        ))
    };
    let token = ctx
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let mut words = v.split_whitespace();
            match (words.next(), words.next()) {
                (Some(scheme), Some(token)) if scheme.eq_ignore_ascii_case("bearer") => {
                    Some(token.to_owned())
                }
                _ => None,
            }
        });
    let Some(token) = token else {
        return Err(unauthorized("No auth token"));
    };
    if shared.reject_tokens.load(Ordering::SeqCst) {
        return Err(unauthorized("Unauthorized"));
    }
    let claims: AccessClaims =
        verify(&token, &shared.access_secret).map_err(|e| unauthorized(e.message()))?;
    lock(&shared.db)
        .user_by_id(&claims.id)
        .cloned()
        .ok_or_else(|| unauthorized("Unauthorized"))
}

/// The chain of `/api/agents`, `/api/files`, `/api/assistants`: requireJwtAuth → checkBan →
/// uaParser.
pub(super) fn guard(shared: &Arc<Shared>, ctx: &Ctx) -> Result<User, Rejection> {
    let user = authenticate(shared, ctx)?;
    let opts = shared.opts();
    if opts.ban_violations {
        let bans = lock(&shared.bans);
        if bans.is_banned(&format!("ip:{}", ctx.ip)) || bans.is_banned(&format!("user:{}", user.id))
        {
            return Err(Box::new(ban_response(ctx)));
        }
    }
    if !is_browser(ctx.user_agent()) {
        let mut resp = raw_chunked(
            StatusCode::OK,
            sse_frame("error", &json!({"message": "Illegal request"})),
        );
        // NON_BROWSER_VIOLATION_SCORE 20 reaches BAN_INTERVAL 20 at once: ban user and IP, kill
        // the user's sessions, clear the cookies on this very response.
        if opts.ban_violations {
            let until = now_ms() + opts.ban_duration.as_millis() as u64;
            {
                let mut bans = lock(&shared.bans);
                bans.entries.insert(format!("user:{}", user.id), until);
                bans.entries.insert(format!("ip:{}", ctx.ip), until);
            }
            lock(&shared.db).sessions.retain(|s| s.user_id != user.id);
            clear_auth_cookies(&mut resp);
        }
        return Err(Box::new(resp));
    }
    Ok(user)
}

fn set_auth_cookies(
    resp: &mut Response<Body>,
    refresh_token: &str,
    expiration_ms: u64,
    secure: bool,
) {
    let expires = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(expiration_ms));
    let secure = if secure { "; Secure" } else { "" };
    for (name, value) in [
        ("refreshToken", refresh_token),
        ("token_provider", "librechat"),
    ] {
        let cookie =
            format!("{name}={value}; Path=/; Expires={expires}; HttpOnly{secure}; SameSite=Strict");
        append_header(resp.headers_mut(), header::SET_COOKIE, &cookie);
    }
}

fn clear_auth_cookies(resp: &mut Response<Body>) {
    for name in CLEARED_COOKIES {
        let cookie = format!("{name}=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
        append_header(resp.headers_mut(), header::SET_COOKIE, &cookie);
    }
}

pub(super) fn parse_cookies(headers: &HeaderMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((name, val)) = pair.trim().split_once('=') {
                // cookie-parser keeps the first occurrence of a name.
                out.entry(name.trim().to_owned())
                    .or_insert_with(|| val.trim().trim_matches('"').to_owned());
            }
        }
    }
    out
}
