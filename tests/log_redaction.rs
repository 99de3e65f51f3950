//! No secret reaches a log line: this binary captures every log line of an end-to-end run (at
//! trace level for our crates and the HTTP/session libraries) and searches it for every secret
//! the run handled. Its own binary, because the capturing subscriber is process-global.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use librechat_bff::admin::hooks::sign;
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};
use support::{
    fake_librechat::FakeLibreChatOptions,
    world::{chat_body, http, World, ID_PASSWORD},
};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

const ADMIN_TOKEN: &str = "redaction-admin-token-5f1e2d";
const HOOK_SECRET: &str = "redaction-hook-secret-9a8b7c";

/// The parts of a secret worth searching for: the whole, and for a JWT its signature.
fn needles(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_owned()];
    if secret.matches('.').count() == 2 {
        if let Some(sig) = secret.rsplit('.').next().filter(|s| s.len() > 16) {
            out.push(sig.to_owned());
        }
    }
    out
}

#[tokio::test]
async fn no_secret_appears_in_any_log_line() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "librechat_bff=trace,provisioning=trace,tower_sessions=trace,tower_sessions_core=trace,\
             tower_http=trace,reqwest=trace,hyper=debug,hyper_util=debug,info",
        ))
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(move || writer.clone())
        .init();

    let w = World::new(FakeLibreChatOptions {
        access_token_lifetime: Duration::from_secs(60),
        ..FakeLibreChatOptions::default()
    })
    .await;
    let bff = w
        .bff(&[
            ("BFF__ADMIN__TOKEN", ADMIN_TOKEN.into()),
            ("BFF__HOOKS__SECRET", HOOK_SECRET.into()),
            // Every proxied call refreshes the LibreChat token: refresh cookies flow too.
            ("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "120".into()),
            ("BFF__IDENTITY__REFRESH_SKEW_SECS", "60".into()),
        ])
        .await;
    let email = w.user(&bff, 401).await;
    let lc_password = "lc-pass-401-Xy9!long".to_string();
    let mut secrets = vec![
        ID_PASSWORD.to_owned(),
        lc_password,
        ADMIN_TOKEN.to_owned(),
        HOOK_SECRET.to_owned(),
        w.key.clone(),
        w.idp.hs_secret().expect("hs"),
        "wrong-password-4f9d".to_owned(),
    ];

    // Password sign-in (and a failed one).
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user401", "wrong-password-4f9d").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        browser.login("user401", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    secrets.push(browser.cookie.clone().expect("cookie"));

    // A handed-over session with identity tokens the test knows, refreshed by the BFF.
    let issued: Value = http()
        .post(format!("{}/api/token/", w.idp.base_url))
        .json(&json!({"username": "user401", "password": ID_PASSWORD}))
        .send()
        .await
        .expect("idp")
        .json()
        .await
        .expect("json");
    let access = issued["access"].as_str().expect("access").to_owned();
    let refresh = issued["refresh"].as_str().expect("refresh").to_owned();
    let mut web = bff.client();
    let res = web
        .send(
            Method::POST,
            "/auth/session",
            Some(json!({ "refresh": refresh })),
            Some(&access),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK);
    secrets.extend([access.clone(), refresh, web.cookie.clone().expect("cookie")]);
    bff.clock.advance(Duration::from_secs(600));
    let me = web.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert!(w.idp.refresh_calls() >= 1);

    // Proxied calls: LibreChat login, refreshes, a chat turn and its stream.
    for _ in 0..3 {
        assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);
    }
    let started = browser
        .post("/api/chat/agents/chat/FakeAI", chat_body("hello"))
        .await;
    let stream_id = started.body["streamId"]
        .as_str()
        .expect("streamId")
        .to_owned();
    browser
        .get(&format!("/api/chat/agents/chat/stream/{stream_id}"))
        .await;
    assert!(w.lc.refresh_calls() >= 1);

    // Ops and the webhook.
    let res = http()
        .get(format!("{}/admin/users/401", bff.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin");
    assert_eq!(res.status(), StatusCode::OK);
    let body = json!({"event": "user.deactivated", "user": {"id": "401"}}).to_string();
    // The BFF's clock was moved forward above; sign with its time.
    let now = bff.state.clock.now().unix_timestamp();
    let signature = sign(HOOK_SECRET.as_bytes(), now, body.as_bytes());
    let res = http()
        .post(format!("{}/hooks/users", bff.base_url))
        .header(header::CONTENT_TYPE, "application/json")
        .header("X-BFF-Timestamp", now.to_string())
        .header("X-BFF-Signature", &signature)
        .body(body)
        .send()
        .await
        .expect("hook");
    assert_eq!(res.status(), StatusCode::OK);
    secrets.push(signature.trim_start_matches("sha256=").to_owned());

    // Every LibreChat token and refresh cookie the fake saw.
    for r in w.lc.requests() {
        if let Some(auth) = r.headers.get(header::AUTHORIZATION) {
            let value = auth.to_str().expect("ascii");
            secrets.push(value.trim_start_matches("Bearer ").to_owned());
        }
        if let Some(cookie) = r.headers.get(header::COOKIE) {
            for part in cookie.to_str().expect("ascii").split(';') {
                if let Some(v) = part.trim().strip_prefix("refreshToken=") {
                    secrets.push(v.to_owned());
                }
            }
        }
    }
    let _ = email;

    let logs = captured.text();
    assert!(
        logs.lines().count() > 50,
        "the run was logged: {} lines",
        logs.lines().count()
    );
    assert!(
        logs.contains("\"request_id\""),
        "lines carry their request id"
    );
    let mut leaked = Vec::new();
    for secret in &secrets {
        for needle in needles(secret) {
            if logs.contains(&needle) {
                leaked.push(needle);
            }
        }
    }
    assert!(leaked.is_empty(), "secrets in the logs: {leaked:?}");
}
