//! LibreChat's own web UI under `ui.mount_path` (default `/chat`), already signed in through the
//! BFF session. The browser never holds a LibreChat token: the UI's auth calls are answered here,
//! its `Authorization` header carries an opaque placeholder bound to the BFF session, and every
//! request reaches LibreChat with the user's real token (or none, for static files).
//!
//! How LibreChat's client authenticates (v0.8.7 `AuthContext`, data-provider `request.ts`):
//! on load it calls `POST <base>api/auth/refresh` and uses `{token, user}`; on a 401 it refreshes
//! once and retries; a refresh answering 200 without a token sends it to `<base>login`, which is
//! redirected to the product's login here. Routes, in the order the router lists them:
//! - `refresh`, `logout`, `config`, `refused` (any other `api/auth/*`), `api` (`api/*` as the
//!   user, placeholder required), `images` (also at the root: avatars ignore the base path),
//!   `to_login` (`login*`, `oauth/*`), and `page` for everything else (static files without a
//!   session, SPA routes with one).
//!
//! CSRF: LibreChat's client sends no CSRF header. Unsafe methods need a same-origin `Origin`
//! (and `Sec-Fetch-Site: same-origin` when the browser sends it), and `api/*` calls need the
//! session's placeholder in `Authorization`, which only a same-origin script can have read.

mod html;

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Redirect, Response},
    Json,
};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tower_sessions::Session;

use crate::{
    config::UiConfig,
    credentials::KeyRing,
    error::ApiError,
    proxy::{path, As, Proxy},
    session::{
        auth::end_session, authenticate, authenticate_cookie, Authenticated, CsrfRule, SessionData,
        UserInfo, DATA_KEY,
    },
};

/// Prefix of the placeholder token the UI holds; never a JWT, so the client never tries to
/// refresh it ahead of time.
const PLACEHOLDER_PREFIX: &str = "bff-ui.";
/// How long the UI's bootstrap waits for a LibreChat account being provisioned, and how often
/// it looks.
const PROVISIONING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const PROVISIONING_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// LibreChat's HTML and JSON answers the BFF rewrites are read up to this size.
const REWRITE_CAP: usize = 2 * 1024 * 1024;

/// What the web UI routes need: the proxy (authentication, tokens, the LibreChat client) and
/// the `[ui]` settings.
pub struct Ui {
    pub proxy: Arc<Proxy>,
    cfg: UiConfig,
    /// Keys the placeholder to the session (derived from the Fernet key ring, so replicas agree).
    placeholder_key: [u8; 32],
}

impl Ui {
    pub fn new(proxy: Arc<Proxy>, cfg: UiConfig, keyring: &KeyRing) -> Self {
        Self {
            proxy,
            cfg,
            placeholder_key: keyring.derive("librechat-bff/ui-placeholder/v1"),
        }
    }

    /// `/chat` (no trailing slash).
    pub fn mount(&self) -> &str {
        self.cfg.mount()
    }

    /// `path` without the mount path (`/chat/c/new` → `/c/new`); other paths as they are.
    fn below_mount<'a>(&self, path: &'a str) -> &'a str {
        path.strip_prefix(self.mount())
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .unwrap_or(path)
    }

    /// The token the UI holds for session `sid`: opaque, useless without the session cookie.
    fn placeholder(&self, sid: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.placeholder_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(sid.as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("{PLACEHOLDER_PREFIX}{}", hex::encode(&digest[..16]))
    }

    /// The request carries this session's placeholder (`Authorization: Bearer bff-ui.…`).
    fn check_placeholder(&self, parts: &Parts, sid: &str) -> Result<(), ApiError> {
        let sent = crate::session::auth::bearer_token(parts).unwrap_or_default();
        let expected = self.placeholder(sid);
        if bool::from(sent.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }

    /// The cookie session of a UI request; `None` when there is none (or it has ended).
    async fn session(&self, parts: &Parts, slide: bool) -> Result<Option<Authenticated>, ApiError> {
        match authenticate_cookie(&self.proxy.auth, parts, slide, CsrfRule::SameOrigin).await {
            Ok(a) => Ok(Some(a)),
            Err(ApiError::Unauthenticated | ApiError::SessionEnded) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `login_url` with where to come back (`target`, a path under the mount).
    fn login_redirect(&self, target: &str) -> Response {
        let target = match self.cfg.public_origin.as_str() {
            "" => target.to_owned(),
            origin => format!("{origin}{target}"),
        };
        let sep = if self.cfg.login_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let location = format!(
            "{}{sep}{}={}",
            self.cfg.login_url,
            self.cfg.return_param,
            percent_encoding::utf8_percent_encode(&target, percent_encoding::NON_ALPHANUMERIC)
        );
        let location = HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/"));
        (
            StatusCode::FOUND,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response()
    }

    /// Where to come back to after signing in: a path under the mount, never elsewhere.
    fn return_target(&self, wanted: Option<&str>) -> String {
        let mount = self.mount();
        let home = format!("{mount}/");
        let Some(wanted) = wanted else { return home };
        let safe = wanted.starts_with('/')
            && !wanted.starts_with("//")
            && !wanted
                .bytes()
                .any(|b| b == b'\\' || b.is_ascii_control() || b == b' ');
        if !safe {
            return home;
        }
        if wanted == mount || wanted.starts_with(&home) {
            wanted.to_owned()
        } else {
            format!("{mount}{wanted}")
        }
    }

    /// The signed-in user's LibreChat user object: `GET /api/user` through [`Proxy::send`]
    /// (token, header hygiene, one renewal after a 401), made from the UI request's head.
    async fn librechat_user(&self, user: &UserInfo, parts: &Parts) -> Result<Value, ApiError> {
        let mut head = parts.clone();
        head.method = Method::GET;
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::TRANSFER_ENCODING,
        ] {
            head.headers.remove(name);
        }
        head.headers
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        identity_encoding(&mut head.headers);
        let uri = self.proxy.upstream.uri("user", None)?;
        let res = self
            .proxy
            .send(head, Body::empty(), uri, As::User(user))
            .await?;
        if !res.status().is_success() {
            tracing::warn!(status = %res.status(), "LibreChat GET /api/user failed");
            return Err(ApiError::LibreChatUnavailable);
        }
        let (_, bytes) = read_rewritable(res).await?;
        serde_json::from_slice(&bytes).map_err(|_| {
            tracing::warn!("LibreChat GET /api/user answered no JSON");
            ApiError::LibreChatUnavailable
        })
    }
}

/// `POST {mount}/api/auth/refresh`: with a session, `{token: <placeholder>, user}`; without
/// one, 200 with no token, which sends LibreChat's client to `{mount}/login`.
pub async fn refresh(State(ui): State<Arc<Ui>>, parts: Parts) -> Result<Response, ApiError> {
    let Some(authed) = ui.session(&parts, true).await? else {
        return Ok(no_store(Json(json!({})).into_response()));
    };
    let sid = authed
        .session
        .as_ref()
        .map(|s| s.id.clone())
        .ok_or(ApiError::Internal)?;
    // A first visit may find the LibreChat account still being created (just in time): wait
    // for it a little rather than fail the client's bootstrap, which would send it round
    // through the login pages.
    let deadline = tokio::time::Instant::now() + PROVISIONING_WAIT;
    let user = loop {
        match ui.librechat_user(&authed.user, &parts).await {
            Err(ApiError::ProvisioningPendingFor(_) | ApiError::ProvisioningPending)
                if tokio::time::Instant::now() + PROVISIONING_POLL < deadline =>
            {
                tokio::time::sleep(PROVISIONING_POLL).await;
            }
            result => break result?,
        }
    };
    Ok(no_store(
        Json(json!({ "token": ui.placeholder(&sid), "user": user })).into_response(),
    ))
}

/// `POST {mount}/api/auth/logout`: ends the BFF session (as `/auth/logout` does; the user's
/// LibreChat login, shared by their other sessions, stays) and sends the UI to
/// `ui.after_logout_url`.
pub async fn logout(
    State(ui): State<Arc<Ui>>,
    parts: Parts,
    session: Session,
) -> Result<Response, ApiError> {
    let auth = &ui.proxy.auth;
    let data: Option<SessionData> = session
        .get(DATA_KEY)
        .await
        .map_err(|e| ApiError::from(crate::session::SessionError::from(e)))?;
    if let (Some(data), Some(id)) = (data, session.id()) {
        auth.csrf.check_same_origin(&parts)?;
        end_session(auth, &session, &data.user.id, &id.to_string()).await;
        tracing::info!(user = %data.user.id, "session closed from the web UI");
    }
    Ok(no_store(
        Json(json!({
            "message": "Logout successful",
            "redirect": ui.cfg.after_logout_url,
        }))
        .into_response(),
    ))
}

/// Any other `{mount}/api/auth/*` (login, register, 2FA, password reset, …): the product signs
/// users in, not LibreChat.
pub async fn refused() -> ApiError {
    ApiError::Forbidden("LibreChat's own sign-in is not used here: the product signs you in.")
}

/// `GET {mount}/login*`, `{mount}/oauth/*`: to the product's login, with where to come back.
/// LibreChat's client passes `redirect_to` to its login page; from there (OpenID auto-redirect)
/// it reaches `oauth/openid` with that page as its same-origin `Referer`.
pub async fn to_login(State(ui): State<Arc<Ui>>, uri: Uri, headers: HeaderMap) -> Response {
    let redirect_to = |query: Option<&str>| {
        url::form_urlencoded::parse(query?.as_bytes())
            .find(|(k, _)| k == "redirect_to")
            .map(|(_, v)| v.into_owned())
    };
    let from_referer = || {
        let referer = url::Url::parse(headers.get(header::REFERER)?.to_str().ok()?).ok()?;
        ui.below_mount(referer.path())
            .starts_with("/login")
            .then(|| redirect_to(referer.query()))?
    };
    let wanted = redirect_to(uri.query()).or_else(from_referer);
    ui.login_redirect(&ui.return_target(wanted.as_deref()))
}

/// `GET {mount}/api/config`: LibreChat's start-up config (as the user when signed in, so it
/// carries the interface settings), rewritten so the UI offers none of LibreChat's own sign-in
/// and, signed out, bounces to `{mount}/oauth/openid` (the product's login).
pub async fn config(State(ui): State<Arc<Ui>>, req: Request) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let authed = ui.session(&parts, false).await?;
    let uri = ui.proxy.upstream.uri("config", parts.uri.query())?;
    identity_encoding(&mut parts.headers);
    let who = match &authed {
        Some(a) => As::User(&a.user),
        None => As::Anonymous,
    };
    let res = ui.proxy.send(parts, body, uri, who).await?;
    rewrite_json(res, |config| {
        let Some(obj) = config.as_object_mut() else {
            return;
        };
        for key in [
            "emailLoginEnabled",
            "registrationEnabled",
            "passwordResetEnabled",
            "emailEnabled",
            "socialLoginEnabled",
        ] {
            obj.insert(key.into(), Value::Bool(false));
        }
        obj.insert("socialLogins".into(), json!([]));
        obj.insert("ldap".into(), json!({ "enabled": false }));
        obj.insert("openidLoginEnabled".into(), Value::Bool(true));
        obj.insert("openidAutoRedirect".into(), Value::Bool(true));
        obj.insert("openidLabel".into(), json!("Sign in"));
        obj.insert(
            "serverDomain".into(),
            json!(format!("{}{}", ui.cfg.public_origin, ui.mount())),
        );
    })
    .await
}

/// `{mount}/api/*` → LibreChat `/api/*` as the signed-in user, exactly as `/api/chat/*`, with
/// the web UI's CSRF rule and its placeholder in place of a token.
pub async fn api(State(ui): State<Arc<Ui>>, req: Request) -> Response {
    api_request(&ui, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn api_request(ui: &Ui, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let rest = ui
        .below_mount(parts.uri.path())
        .strip_prefix("/api/")
        .ok_or(ApiError::NotFound)?;
    let rest = path::checked_api_path(rest, &ui.proxy.upstream.deny_prefixes)?;
    let uri = ui.proxy.upstream.uri(rest, parts.uri.query())?;
    let authed = ui.session(&parts, true).await?;
    let placeholder_ok = |a: &Authenticated| {
        a.session
            .as_ref()
            .is_some_and(|s| ui.check_placeholder(&parts, &s.id).is_ok())
    };
    match authed {
        Some(a) if placeholder_ok(&a) => ui.proxy.send(parts, body, uri, As::User(&a.user)).await,
        _ if ui.cfg.public_share_links && is_public_share(&parts.method, rest) => {
            ui.proxy.send(parts, body, uri, As::Anonymous).await
        }
        _ => Err(ApiError::Unauthenticated),
    }
}

/// `GET api/share/<shareId>`: LibreChat's public view of a shared conversation.
fn is_public_share(method: &Method, rest: &str) -> bool {
    let mut segments = rest.split('/');
    *method == Method::GET
        && segments.next() == Some("share")
        && segments.next().is_some_and(|id| !id.is_empty())
        && segments.next().is_none()
}

/// `GET {mount}/images/*` and `/images/*` → LibreChat `/images/*` for a signed-in caller (the
/// web session, or a mobile app's identity JWT), with the user's LibreChat refresh cookie so
/// `secureImageLinks` works.
pub async fn images(State(ui): State<Arc<Ui>>, req: Request) -> Response {
    images_request(&ui, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn images_request(ui: &Ui, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let rest = ui
        .below_mount(parts.uri.path())
        .strip_prefix("/images/")
        .ok_or(ApiError::NotFound)?;
    path::decoded_segments(rest)?;
    let placeholder = crate::session::auth::bearer_token(&parts)
        .is_some_and(|t| t.starts_with(PLACEHOLDER_PREFIX));
    let user = if placeholder {
        authenticate_cookie(&ui.proxy.auth, &parts, false, CsrfRule::SameOrigin).await?
    } else {
        authenticate(&ui.proxy.auth, &parts, false).await?
    }
    .user;
    let uri = ui
        .proxy
        .upstream
        .root_uri(&format!("images/{rest}"), parts.uri.query())?;
    ui.proxy
        .send(parts, body, uri, As::UserWithCookie(&user))
        .await
}

/// Everything else under the mount: static files (a last segment with a dot, `assets/*`,
/// `health`) without a session; SPA routes (`/`, `c/<id>`, `search`, …) only with one, else to
/// the product's login. HTML answers get their `<base href>` pointed at the mount.
pub async fn page(State(ui): State<Arc<Ui>>, req: Request) -> Response {
    page_request(&ui, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn page_request(ui: &Ui, req: Request) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        return Err(ApiError::MethodNotAllowed);
    }
    let rest = ui
        .below_mount(parts.uri.path())
        .trim_start_matches('/')
        .to_owned();
    let segments = if rest.is_empty() {
        Vec::new()
    } else {
        path::decoded_segments(&rest)?
    };
    let first = segments.first().map(|s| s.as_ref());
    let is_static = segments.last().is_some_and(|s| s.contains('.'))
        || matches!(first, Some("assets" | "fonts"))
        || segments == ["health"];
    let is_public_share = ui.cfg.public_share_links && first == Some("share");
    if !is_static && !is_public_share && ui.session(&parts, true).await?.is_none() {
        let here = match parts.uri.query() {
            Some(q) => format!("{}/{rest}?{q}", ui.mount()),
            None => format!("{}/{rest}", ui.mount()),
        };
        return Ok(ui.login_redirect(&ui.return_target(Some(&here))));
    }
    // Anything but hashed assets may be the SPA's index.html, whose <base href> is rewritten:
    // it must come uncompressed and not as a 304 of the unrewritten page.
    if first != Some("assets") {
        identity_encoding(&mut parts.headers);
    }
    let uri = ui.proxy.upstream.root_uri(&rest, parts.uri.query())?;
    let res = ui.proxy.send(parts, body, uri, As::Anonymous).await?;
    Ok(html::rebase(res, &format!("{}/", ui.mount())).await)
}

/// `{mount}` without the trailing slash → `{mount}/`.
pub async fn to_mount(State(ui): State<Arc<Ui>>) -> Redirect {
    Redirect::permanent(&format!("{}/", ui.mount()))
}

/// Asks LibreChat for an uncompressed, unconditional answer (one the BFF may rewrite).
fn identity_encoding(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.remove(header::IF_NONE_MATCH);
    headers.remove(header::IF_MODIFIED_SINCE);
}

fn no_store(mut res: Response) -> Response {
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Applies `edit` to a successful JSON answer; any other answer passes unchanged.
async fn rewrite_json(res: Response, edit: impl FnOnce(&mut Value)) -> Result<Response, ApiError> {
    if !res.status().is_success() || !crate::extract::is_json(res.headers()) || is_encoded(&res) {
        return Ok(res);
    }
    let (parts, bytes) = read_rewritable(res).await?;
    let mut value: Value =
        serde_json::from_slice(&bytes).map_err(|_| ApiError::LibreChatUnavailable)?;
    edit(&mut value);
    let bytes = serde_json::to_vec(&value).map_err(|_| ApiError::Internal)?;
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// Whether LibreChat compressed the answer (then it cannot be rewritten).
fn is_encoded(res: &Response) -> bool {
    res.headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| e.as_bytes() != b"identity")
}

/// An answer the BFF will rewrite: its head without the validators and length of the original
/// body, and that body, read up to [`REWRITE_CAP`].
async fn read_rewritable(
    res: Response,
) -> Result<(axum::http::response::Parts, axum::body::Bytes), ApiError> {
    let (mut parts, body) = res.into_parts();
    let bytes = Limited::new(body, REWRITE_CAP)
        .collect()
        .await
        .map_err(|_| ApiError::LibreChatUnavailable)?
        .to_bytes();
    for name in [header::CONTENT_LENGTH, header::ETAG, header::LAST_MODIFIED] {
        parts.headers.remove(name);
    }
    Ok((parts, bytes))
}
