//! LibreChat's web UI under `/chat`, signed in through the BFF session (src/ui/): its auth calls
//! answered by the BFF, its API as the user behind a session-bound placeholder, the product's
//! login instead of LibreChat's, pages rebased under the mount, images with LibreChat's cookie.

use reqwest::{header, Method, StatusCode};
use serde_json::Value;
use support::{
    bff::TestBff,
    fake_librechat::FakeLibreChatOptions,
    world::{http, World, ID_PASSWORD},
};

const UI_ON: [(&str, &str); 3] = [
    ("BFF__UI__ENABLED", "true"),
    ("BFF__UI__LOGIN_URL", "https://app.example.com/login"),
    ("BFF__UI__AFTER_LOGOUT_URL", "https://app.example.com/bye"),
];

fn ui_env(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    UI_ON
        .iter()
        .chain(extra)
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect()
}

/// A browser tab of LibreChat's UI: the BFF cookie, same-origin requests, the placeholder
/// token once refreshed.
struct Tab {
    base: String,
    cookie: Option<String>,
    token: Option<String>,
}

struct Answer {
    status: StatusCode,
    headers: header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Tab {
    /// Signed in at the product (POST /auth/login), as the web app does.
    async fn signed_in(bff: &TestBff, user: &str) -> Tab {
        let mut browser = bff.client();
        let r = browser.login(user, ID_PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        Tab {
            base: bff.base_url.clone(),
            cookie: browser.cookie,
            token: None,
        }
    }

    fn anonymous(bff: &TestBff) -> Tab {
        Tab {
            base: bff.base_url.clone(),
            cookie: None,
            token: None,
        }
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = http()
            .request(method.clone(), format!("{}{path}", self.base))
            .header(header::USER_AGENT, support::world::BROWSER_UA);
        if let Some(c) = &self.cookie {
            req = req.header(header::COOKIE, c);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let mut extra = header::HeaderMap::new();
        if !matches!(method, Method::GET | Method::HEAD) {
            // What a browser sends on a same-origin fetch.
            extra.insert(header::ORIGIN, self.base.parse().expect("origin"));
            extra.insert("sec-fetch-site", "same-origin".parse().expect("value"));
        }
        for (k, v) in headers {
            let name = header::HeaderName::from_bytes(k.as_bytes()).expect("name");
            extra.insert(name, v.parse().expect("value"));
        }
        req = req.headers(extra);
        if method == Method::POST || method == Method::PUT {
            req = req
                .header(header::CONTENT_TYPE, "application/json")
                .body("{}");
        }
        let res = req.send().await.expect("BFF answers");
        Answer {
            status: res.status(),
            headers: res.headers().clone(),
            text: res.text().await.expect("body"),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[]).await
    }

    /// What LibreChat's client does on load.
    async fn refresh(&mut self) -> Answer {
        let a = self.send(Method::POST, "/chat/api/auth/refresh", &[]).await;
        self.token = a.json()["token"].as_str().map(str::to_owned);
        a
    }
}

fn is_jwt(s: &str) -> bool {
    s.split('.').count() == 3
}

#[tokio::test]
async fn the_ui_is_off_unless_enabled() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    let tab = Tab::anonymous(&bff);
    for path in ["/chat/", "/chat/api/config", "/images/u/a.png"] {
        let a = tab.get(path).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(a.json()["error"], "not_found", "{path}: {}", a.text);
    }
}

#[tokio::test]
async fn signed_out_visitors_go_to_the_product_login_and_come_back_under_the_mount() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&ui_env(&[])).await;
    let tab = Tab::anonymous(&bff);

    // The client's bootstrap: refresh answers 200 without a token (the client then loads login).
    let a = tab.send(Method::POST, "/chat/api/auth/refresh", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.json().get("token").is_none(), "{}", a.text);

    // SPA pages and LibreChat's own login screens redirect to the product's login.
    let cases = [
        ("/chat/", "%2Fchat%2F"),
        ("/chat/c/new?q=1", "%2Fchat%2Fc%2Fnew%3Fq%3D1"),
        (
            "/chat/login?redirect_to=%2Fchat%2Fc%2Fabc",
            "%2Fchat%2Fc%2Fabc",
        ),
        // A path outside the mount is taken as one under it; anything else goes home.
        ("/chat/login?redirect_to=%2Fc%2Fabc", "%2Fchat%2Fc%2Fabc"),
        (
            "/chat/login?redirect_to=https%3A%2F%2Fevil.example%2F",
            "%2Fchat%2F",
        ),
        ("/chat/login?redirect_to=%2F%2Fevil.example", "%2Fchat%2F"),
        ("/chat/login?redirect_to=%2F%5Cevil.example", "%2Fchat%2F"),
        ("/chat/login/2fa", "%2Fchat%2F"),
        ("/chat/oauth/openid", "%2Fchat%2F"),
        ("/chat/oauth/google", "%2Fchat%2F"),
    ];
    for (path, next) in cases {
        let a = tab.get(path).await;
        assert_eq!(a.status, StatusCode::FOUND, "{path}");
        assert_eq!(
            a.header("location"),
            Some(format!("https://app.example.com/login?next={next}").as_str()),
            "{path}"
        );
    }
    // From LibreChat's login page (OpenID auto-redirect), the deep link is in the Referer.
    let referer = format!("{}/chat/login?redirect_to=%2Fchat%2Fc%2Fdeep", tab.base);
    let a = tab
        .send(Method::GET, "/chat/oauth/openid", &[("referer", &referer)])
        .await;
    assert_eq!(
        a.header("location"),
        Some("https://app.example.com/login?next=%2Fchat%2Fc%2Fdeep")
    );
    let a = tab
        .send(
            Method::GET,
            "/chat/oauth/openid",
            &[(
                "referer",
                "https://evil.example/login?redirect_to=https%3A%2F%2Fevil.example",
            )],
        )
        .await;
    assert_eq!(
        a.header("location"),
        Some("https://app.example.com/login?next=%2Fchat%2F")
    );
    // The mount without its slash.
    let a = tab.get("/chat").await;
    assert_eq!(a.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(a.header("location"), Some("/chat/"));

    // The API without a session: 401 JSON, which makes the client refresh (and then redirect).
    let a = tab.get("/chat/api/convos").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"], "unauthenticated", "{}", a.text);
    assert_eq!(w.lc.calls_to("/api/convos"), 0);
}

#[tokio::test]
async fn a_signed_in_user_gets_a_placeholder_and_their_librechat_user_never_a_token() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&ui_env(&[])).await;
    let email = w.user(&bff, 31).await;
    let mut tab = Tab::signed_in(&bff, "user31").await;

    let a = tab.refresh().await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert!(a.header("set-cookie").is_none());
    let body = a.json();
    let token = body["token"].as_str().expect("token");
    assert!(token.starts_with("bff-ui."), "{token}");
    assert!(!is_jwt(token), "the placeholder is no JWT: {token}");
    assert_eq!(body["user"]["email"], email.as_str());
    let lc_id = w.lc.user_id(&email).expect("LibreChat user");
    assert_eq!(body["user"]["_id"], lc_id.as_str());

    // The API as the user: LibreChat sees the user's real token, never the BFF's cookie or
    // the placeholder.
    let a = tab.get("/chat/api/convos").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let seen =
        w.lc.requests()
            .into_iter()
            .rfind(|r| r.path.starts_with("/api/convos"))
            .expect("reached LibreChat");
    let auth = seen.headers[header::AUTHORIZATION].to_str().expect("ascii");
    let lc_token = auth.strip_prefix("Bearer ").expect("bearer");
    assert!(is_jwt(lc_token), "{auth}");
    assert!(!seen.headers.contains_key(header::COOKIE));
    // No answer the browser saw carries that token.
    for path in ["/chat/api/user", "/chat/api/config", "/chat/"] {
        let a = tab.get(path).await;
        assert!(
            !a.text.contains(lc_token),
            "{path} leaks the LibreChat token"
        );
    }
    let a = tab.refresh().await;
    assert!(!a.text.contains(lc_token));
    assert_eq!(a.json()["token"], token, "stable for the session");
}

#[tokio::test]
async fn api_calls_need_this_sessions_placeholder() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&ui_env(&[])).await;
    w.user(&bff, 32).await;
    w.user(&bff, 33).await;
    let mut mine = Tab::signed_in(&bff, "user32").await;
    let mut theirs = Tab::signed_in(&bff, "user33").await;
    mine.refresh().await;
    theirs.refresh().await;
    assert_ne!(mine.token, theirs.token);

    assert_eq!(mine.get("/chat/api/convos").await.status, StatusCode::OK);
    let before = w.lc.calls_to("/api/convos");
    // No token, a stale one, another session's, or a LibreChat-looking JWT: 401 (the client
    // then refreshes once and retries with the right one).
    let stale = Tab {
        token: Some("bff-ui.00000000000000000000000000000000".into()),
        ..Tab::signed_in(&bff, "user32").await
    };
    let none = Tab {
        token: None,
        cookie: mine.cookie.clone(),
        base: mine.base.clone(),
    };
    let swapped = Tab {
        token: theirs.token.clone(),
        cookie: mine.cookie.clone(),
        base: mine.base.clone(),
    };
    let jwt = Tab {
        token: Some(w.bearer(32)),
        cookie: mine.cookie.clone(),
        base: mine.base.clone(),
    };
    for (name, tab) in [
        ("stale", &stale),
        ("none", &none),
        ("swapped", &swapped),
        ("jwt", &jwt),
    ] {
        let a = tab.get("/chat/api/convos").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{name}: {}", a.text);
    }
    assert_eq!(
        w.lc.calls_to("/api/convos"),
        before,
        "none reached LibreChat"
    );
}

#[tokio::test]
async fn unsafe_ui_requests_must_be_same_origin_and_need_no_csrf_header() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&ui_env(&[])).await;
    w.user(&bff, 34).await;
    let mut tab = Tab::signed_in(&bff, "user34").await;
    tab.refresh().await;

    let path = "/chat/api/convos/update";
    let cases: [(&str, &[(&str, &str)]); 3] = [
        ("cross-site origin", &[("origin", "https://evil.example")]),
        ("cross-site fetch", &[("sec-fetch-site", "cross-site")]),
        ("same-site fetch", &[("sec-fetch-site", "same-site")]),
    ];
    for (name, headers) in cases {
        let a = tab.send(Method::POST, path, headers).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{name}: {}", a.text);
        assert_eq!(a.json()["error"], "csrf_rejected", "{name}");
    }
    // Without any Origin (what a non-browser or an old form post sends).
    let a = http()
        .post(format!("{}{path}", tab.base))
        .header(header::COOKIE, tab.cookie.as_deref().unwrap_or_default())
        .bearer_auth(tab.token.as_deref().unwrap_or_default())
        .json(&serde_json::json!({"arg": {}}))
        .send()
        .await
        .expect("answer");
    assert_eq!(a.status(), StatusCode::FORBIDDEN);
    assert_eq!(w.lc.calls_to("/api/convos/update"), 0);
    // Same origin, no CSRF header: reaches LibreChat (whose own verdict on the body stands).
    let a = tab.send(Method::POST, path, &[]).await;
    assert_ne!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_eq!(w.lc.calls_to("/api/convos/update"), 1);
}

#[tokio::test]
async fn librechats_own_sign_in_routes_and_denied_routes_are_refused() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&ui_env(&[])).await;
    w.user(&bff, 35).await;
    let mut tab = Tab::signed_in(&bff, "user35").await;
    tab.refresh().await;
    let calls_before = w.lc.requests().len();
    for path in [
        "/chat/api/auth/login",
        "/chat/api/auth/register",
        "/chat/api/auth/2fa/enable",
        "/chat/api/auth/requestPasswordReset",
        "/chat/api/auth/resetPassword",
        "/chat/api/Auth/login",
    ] {
        let a = tab.send(Method::POST, path, &[]).await;
        assert!(
            a.status == StatusCode::FORBIDDEN || a.status == StatusCode::NOT_FOUND,
            "{path}: {} {}",
            a.status,
            a.text
        );
        assert!(a.json()["error"].is_string(), "{path}: {}", a.text);
    }
    for (method, path) in [
        (Method::DELETE, "/chat/api/user/delete"),
        (Method::GET, "/chat/api/admin/users"),
        (Method::POST, "/chat/api/api-keys"),
    ] {
        let a = tab.send(method, path, &[]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.text);
    }
    let reached: Vec<String> = w.lc.requests()[calls_before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(reached.is_empty(), "reached LibreChat: {reached:?}");
}

#[tokio::test]
async fn the_startup_config_offers_no_librechat_login_signed_in_or_not() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&ui_env(&[(
            "BFF__UI__PUBLIC_ORIGIN",
            "https://app.example.com",
        )]))
        .await;
    w.user(&bff, 36).await;

    let check = |cfg: &Value| {
        for key in [
            "emailLoginEnabled",
            "registrationEnabled",
            "passwordResetEnabled",
        ] {
            assert_eq!(cfg[key], false, "{key}: {cfg}");
        }
        assert_eq!(cfg["socialLogins"], serde_json::json!([]));
        assert_eq!(cfg["openidLoginEnabled"], true);
        assert_eq!(cfg["openidAutoRedirect"], true);
        assert_eq!(cfg["serverDomain"], "https://app.example.com/chat");
        assert_eq!(cfg["appTitle"], "LibreChat", "the rest is LibreChat's");
    };
    let anonymous = Tab::anonymous(&bff).get("/chat/api/config").await;
    assert_eq!(anonymous.status, StatusCode::OK, "{}", anonymous.text);
    check(&anonymous.json());
    assert!(anonymous.json().get("interface").is_none());

    let mut tab = Tab::signed_in(&bff, "user36").await;
    tab.refresh().await;
    let signed_in = tab
        .send(
            Method::GET,
            "/chat/api/config",
            &[("if-none-match", "*"), ("accept-encoding", "gzip")],
        )
        .await;
    assert_eq!(signed_in.status, StatusCode::OK);
    check(&signed_in.json());
    assert!(
        signed_in.json().get("interface").is_some(),
        "as the user: {}",
        signed_in.text
    );
}

#[tokio::test]
async fn pages_are_rebased_under_the_mount_and_static_files_need_no_session() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&ui_env(&[])).await;
    w.user(&bff, 37).await;
    let tab = Tab::signed_in(&bff, "user37").await;

    // The browser asks for gzip and revalidates; the page still comes back rebased.
    let a = tab
        .send(
            Method::GET,
            "/chat/c/new",
            &[
                ("accept-encoding", "gzip, deflate"),
                ("if-none-match", "W/\"spa-index-1\""),
            ],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.text.contains("<base href=\"/chat/\" />"), "{}", a.text);
    assert!(a.header("content-encoding").is_none());
    assert!(a.header("etag").is_none());
    let seen =
        w.lc.requests()
            .into_iter()
            .rfind(|r| r.path == "/c/new")
            .expect("reached");
    assert!(
        !seen.headers.contains_key(header::COOKIE),
        "no BFF cookie for LibreChat"
    );

    // Static files without a session, from LibreChat's root.
    let anon = Tab::anonymous(&bff);
    let a = anon.get("/chat/assets/index.js").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.text.contains("asset index.js"), "{}", a.text);
    let a = anon.get("/chat/manifest.webmanifest").await;
    assert_eq!(a.status, StatusCode::OK);
    let a = anon.get("/chat/health").await;
    assert_eq!((a.status, a.text.as_str()), (StatusCode::OK, "OK"));
    // Traversal (sent raw: a URL library would resolve it first) and other methods are refused.
    let before = w.lc.requests().len();
    for path in [
        "/chat/assets/%2e%2e/x.js",
        "/chat/a/..%2f..%2fx.js",
        "/chat/assets/../../x.js",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let a = support::bff::raw_exchange(&bff.base_url, request.as_bytes())
            .await
            .expect("answer");
        assert_eq!(a.status, 400, "{path}: {a:?}");
    }
    assert_eq!(w.lc.requests().len(), before, "nothing reached LibreChat");
    let a = tab.send(Method::DELETE, "/chat/c/new", &[]).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn logout_from_the_ui_ends_the_session_and_goes_to_the_product() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&ui_env(&[])).await;
    w.user(&bff, 38).await;
    let mut tab = Tab::signed_in(&bff, "user38").await;
    tab.refresh().await;

    // A cross-site logout changes nothing.
    let a = tab
        .send(
            Method::POST,
            "/chat/api/auth/logout",
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(tab.get("/chat/api/convos").await.status, StatusCode::OK);

    let a = tab.send(Method::POST, "/chat/api/auth/logout", &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json()["redirect"], "https://app.example.com/bye");
    assert_eq!(
        tab.get("/chat/api/convos").await.status,
        StatusCode::UNAUTHORIZED
    );
    let a = tab.refresh().await;
    assert!(a.json().get("token").is_none(), "signed out: {}", a.text);
    let me = tab.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn images_reach_librechat_with_the_users_cookie_for_web_and_mobile() {
    let w = World::new(FakeLibreChatOptions {
        secure_image_links: true,
        ..Default::default()
    })
    .await;
    let bff = w.bff(&ui_env(&[])).await;
    let email = w.user(&bff, 39).await;
    let mut tab = Tab::signed_in(&bff, "user39").await;
    tab.refresh().await;
    let uid = w.lc.user_id(&email).expect("LibreChat id");

    // In a message, under the mount; the avatar at the root (it ignores the base path).
    for path in [
        format!("/chat/images/{uid}/picture.png"),
        format!("/images/{uid}/avatar-1.png?manual=true"),
    ] {
        let a = tab.get(&path).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text);
        assert!(
            a.text.starts_with(&format!("fake-png:{uid}/")),
            "{}",
            a.text
        );
    }
    let seen =
        w.lc.requests()
            .into_iter()
            .rfind(|r| r.path.starts_with("/images/"))
            .expect("reached");
    let cookie = seen.headers[header::COOKIE].to_str().expect("ascii");
    assert!(
        cookie.starts_with("refreshToken=") && cookie.contains("token_provider=librechat"),
        "{cookie}"
    );
    assert!(!cookie.contains("bff"), "no BFF cookie: {cookie}");

    // Mobile: the identity JWT.
    let a = http()
        .get(format!("{}/chat/images/{uid}/picture.png", bff.base_url))
        .bearer_auth(w.bearer(39))
        .send()
        .await
        .expect("answer");
    assert_eq!(a.status(), StatusCode::OK);

    // Another user's path: LibreChat's own verdict; nobody signed in: 401 from the BFF.
    let a = tab.get("/chat/images/someone-else/picture.png").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = Tab::anonymous(&bff)
        .get(&format!("/images/{uid}/avatar-1.png"))
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"], "unauthenticated");
}

#[tokio::test]
async fn shared_links_open_without_a_session_only_when_configured() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let closed = w.bff(&ui_env(&[])).await;
    let anon = Tab::anonymous(&closed);
    assert_eq!(anon.get("/chat/share/abc").await.status, StatusCode::FOUND);
    assert_eq!(
        anon.get("/chat/api/share/abc").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(w.lc.calls_to("/api/share/abc"), 0);

    let open = w
        .bff(&ui_env(&[("BFF__UI__PUBLIC_SHARE_LINKS", "true")]))
        .await;
    let anon = Tab::anonymous(&open);
    let page = anon.get("/chat/share/abc").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("<base href=\"/chat/\""));
    anon.get("/chat/api/share/abc").await;
    let seen =
        w.lc.requests()
            .into_iter()
            .rfind(|r| r.path == "/api/share/abc")
            .expect("forwarded");
    assert!(
        !seen.headers.contains_key(header::AUTHORIZATION),
        "anonymously"
    );
    // Only the public view: listing the user's links still needs a session.
    assert_eq!(
        anon.get("/chat/api/share/").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        anon.get("/chat/api/share/link/abc").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_first_visit_waits_for_the_librechat_account_being_created() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&ui_env(&[("BFF__PROVISIONING__BASE_BACKOFF_SECS", "1")]))
        .await;
    // Known to the identity service only: no LibreChat account, no stored credential.
    w.idp.add_user(support::fake_idp::FakeUser {
        id: 40,
        username: "user40".into(),
        email: "user40@example.com".into(),
        password: ID_PASSWORD.into(),
        name: "User 40".into(),
        groups: vec![],
        is_active: true,
    });
    assert!(w.lc.user_id("user40@example.com").is_none());
    // A provisioning worker, as `serve` runs one (the test BFF runs none by itself).
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = bff.state.provisioner.spawn_worker(stopped);
    let mut tab = Tab::signed_in(&bff, "user40").await;
    let a = tab.refresh().await;
    let _ = stop.send(true);
    let _ = worker.await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(
        tab.token.is_some(),
        "signed in once the account exists: {}",
        a.text
    );
    let lc_id = w.lc.user_id("user40@example.com").expect("provisioned");
    assert_eq!(a.json()["user"]["_id"], lc_id.as_str());
}
