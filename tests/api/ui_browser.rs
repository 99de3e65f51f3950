//! LibreChat's web UI under `/chat` in a real browser (issue 11): headless Debian Chromium driven
//! by playwright-core (`tests/browser/run.mjs`) opens a page that uses LibreChat's real client
//! request layer (the npm package `librechat-data-provider`: its axios interceptors, token header
//! and data service), served by the fake LibreChat (`spa_dir`) through the BFF with `[ui]` on.
//!
//! Needs `node`, `tests/browser/node_modules` and `/usr/bin/chromium` (or `BFF_CHROMIUM`), which
//! `scripts/test.sh` installs. Missing ones fail the test saying so; `BFF_SKIP_BROWSER=1` skips it.
//! Screenshots (and, on failure, network logs) go to `target/browser-artifacts/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::{response::Html, routing::get, Router};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{
    bff::{Browser, TestBff},
    fake_librechat::{FakeLibreChat, FakeLibreChatOptions},
    world::{World, ID_PASSWORD},
};

const ADMIN_TOKEN: &str = "browser-test-admin-token-0123456789";
/// Every scenario of run.mjs; the test fails if one did not run.
const SCENARIOS: [&str; 6] = [
    "a_opens_signed_in_and_calls_the_api_with_the_placeholder",
    "b_recovers_from_a_401_through_one_refresh",
    "c_session_ended_elsewhere_redirects_to_the_product_login",
    "d_logout_lands_on_the_after_logout_page",
    "e_no_session_opening_a_chat_route_goes_to_the_product_login",
    "f_page_loaded_without_session_follows_librechat_login_to_the_product",
];
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

struct Tools {
    chromium: PathBuf,
}

/// What the browser test needs, or `None` when `BFF_SKIP_BROWSER=1`; panics naming what is
/// missing otherwise (a browser test that silently passes would prove nothing).
fn tools() -> Option<Tools> {
    if std::env::var("BFF_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("ui_browser: skipped (BFF_SKIP_BROWSER=1)");
        return None;
    }
    let chromium =
        PathBuf::from(std::env::var("BFF_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!("Chromium at {}", chromium.display()));
    }
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        missing.push("node on PATH".into());
    }
    for package in ["playwright-core", "librechat-data-provider", "esbuild"] {
        let dir = browser_dir().join("node_modules").join(package);
        if !dir.join("package.json").is_file() {
            missing.push(format!("{}", dir.display()));
        }
    }
    assert!(
        missing.is_empty(),
        "the browser test needs {}: run scripts/test.sh (it installs Debian's chromium and runs \
         `npm ci` in tests/browser), or set BFF_SKIP_BROWSER=1 to skip it",
        missing.join(", ")
    );
    Some(Tools { chromium })
}

/// Bundles the test page (page/app.js with librechat-data-provider) into `out`.
async fn build_page(out: &Path) {
    let built = tokio::process::Command::new("node")
        .arg(browser_dir().join("build.mjs"))
        .arg(out)
        .output()
        .await
        .expect("run node tests/browser/build.mjs");
    assert!(
        built.status.success(),
        "building the test page failed:\n{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
}

/// The product's own pages the BFF sends the browser to: its login and its after-logout page.
async fn product_site() -> String {
    let app = Router::new()
        .route(
            "/login",
            get(|| async { Html("<!DOCTYPE html><h1 id=\"product-login\">Product login</h1>") }),
        )
        .route(
            "/bye",
            get(|| async {
                Html("<!DOCTYPE html><h1 id=\"product-after-logout\">Signed out</h1>")
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// Signs `username` in at the BFF (`POST /auth/login`) and returns (cookie name, session id).
async fn sign_in(bff: &TestBff, username: &str) -> (String, String) {
    let mut browser: Browser = bff.client();
    let res = browser.login(username, ID_PASSWORD).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let cookie = browser.cookie.expect("a session cookie");
    let (name, value) = cookie.split_once('=').expect("name=value");
    (name.to_owned(), value.to_owned())
}

#[tokio::test]
async fn librechat_web_client_under_chat_in_a_real_browser() {
    let Some(tools) = tools() else { return };
    let spa = tempfile::tempdir().expect("tempdir");
    build_page(spa.path()).await;

    let w = World::new(FakeLibreChatOptions {
        spa_dir: Some(spa.path().to_owned()),
        secure_image_links: true,
        ..FakeLibreChatOptions::default()
    })
    .await;
    let product = product_site().await;
    let login_url = format!("{product}/login");
    let after_logout_url = format!("{product}/bye");
    let bff = w
        .bff(&[
            ("BFF__UI__ENABLED", "true".into()),
            ("BFF__UI__LOGIN_URL", login_url.clone()),
            ("BFF__UI__AFTER_LOGOUT_URL", after_logout_url.clone()),
            ("BFF__ADMIN__TOKEN", ADMIN_TOKEN.into()),
        ])
        .await;
    w.user(&bff, 1).await;
    w.user(&bff, 2).await;
    let (cookie_name, signed_in) = sign_in(&bff, "user1").await;
    let (_, logout) = sign_in(&bff, "user1").await;
    let (_, revoked) = sign_in(&bff, "user2").await;

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("browser-artifacts");
    let config = json!({
        "bff": bff.base_url,
        "mount": "/chat",
        "cookie": {"name": cookie_name, "secure": cookie_name.starts_with("__Host-")},
        "sessions": {"signedIn": signed_in, "revoked": revoked, "logout": logout},
        "user": {"name": "User 1"},
        "revoke": {
            "url": format!("{}/admin/users/2/sessions", bff.base_url),
            "token": ADMIN_TOKEN,
        },
        "loginUrl": login_url,
        "afterLogoutUrl": after_logout_url,
        "returnParam": "next",
        "chromium": tools.chromium,
        "artifacts": artifacts,
    });
    let config_file = spa.path().join("run-config.json");
    std::fs::write(&config_file, config.to_string()).expect("write the runner's config");

    let started = Instant::now();
    let child = tokio::process::Command::new("node")
        .arg(browser_dir().join("run.mjs"))
        .arg(&config_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node tests/browser/run.mjs");
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the browser run took over {RUN_TIMEOUT:?}"))
        .expect("run.mjs output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{stderr}browser run: {:.1} s; artifacts in {}",
        started.elapsed().as_secs_f64(),
        artifacts.display()
    );
    let result: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "run.mjs printed no result ({}):\n{stdout}\n{stderr}",
                out.status
            )
        });
    assert_eq!(
        result["failed"],
        json!([]),
        "browser scenarios failed (screenshots and network logs in {}):\n{stderr}",
        artifacts.display()
    );
    assert_eq!(result["passed"], json!(SCENARIOS), "{stderr}");
    assert!(out.status.success(), "run.mjs: {}\n{stderr}", out.status);

    // LibreChat saw the user's real token, never the browser's placeholder.
    let seen = w.lc.requests();
    let renamed = seen
        .iter()
        .find(|r| r.path == "/api/convos/update")
        .expect("the browser's rename reached LibreChat");
    let auth = renamed.headers["authorization"].to_str().expect("ascii");
    assert!(auth.starts_with("Bearer eyJ"), "LibreChat's JWT: {auth}");
    let images: Vec<_> = seen
        .iter()
        .filter(|r| r.path.starts_with("/images/"))
        .collect();
    assert!(
        images.len() >= 2,
        "each signed-in page loads its avatar and an image"
    );
    for r in images {
        let cookie = r.headers["cookie"].to_str().expect("ascii");
        assert!(cookie.contains("refreshToken=eyJ"), "{}: {cookie}", r.path);
    }
    for r in &seen {
        for (name, value) in &r.headers {
            let value = value.to_str().unwrap_or_default();
            assert!(
                !value.contains("bff-ui."),
                "{} {} carried the placeholder in {name}",
                r.method,
                r.path
            );
        }
    }
    // Logging out ended that session only; the revoked one is over.
    for (sid, status) in [
        (&signed_in, StatusCode::OK),
        (&logout, StatusCode::UNAUTHORIZED),
        (&revoked, StatusCode::UNAUTHORIZED),
    ] {
        let mut client = bff.client();
        client.cookie = Some(format!("{cookie_name}={sid}"));
        assert_eq!(client.get("/auth/me").await.status, status);
    }
}

/// The fake LibreChat's `spa_dir`: files by path with a type by extension, `index.html` for
/// every other path outside `/api` (as LibreChat serves its built client), `/api` untouched.
#[tokio::test]
async fn fake_librechat_serves_a_built_client_from_spa_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("assets")).expect("mkdir");
    std::fs::write(
        dir.path().join("index.html"),
        "<html><base href=\"/\" /></html>",
    )
    .expect("write");
    std::fs::write(dir.path().join("assets/app.js"), "console.log(1)").expect("write");
    let lc = FakeLibreChat::start(FakeLibreChatOptions {
        spa_dir: Some(dir.path().to_owned()),
        ..FakeLibreChatOptions::default()
    })
    .await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", lc.base_url)).send();

    let js = get("/assets/app.js").await.expect("get");
    assert_eq!(js.status(), StatusCode::OK);
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(js.text().await.expect("body"), "console.log(1)");
    for path in [
        "/",
        "/c/new",
        "/login?redirect_to=%2Fc%2Fnew",
        "/assets/missing.js",
        "/assets/../index.html",
        "/%2e%2e/Cargo.toml",
    ] {
        let res = get(path).await.expect("get");
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert_eq!(
            res.headers()["content-type"],
            "text/html; charset=utf-8",
            "{path}"
        );
        assert_eq!(
            res.text().await.expect("body"),
            "<html><base href=\"/\" /></html>",
            "{path}"
        );
    }
    let api = get("/api/nope").await.expect("get");
    assert_eq!(api.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        api.json::<Value>().await.expect("json"),
        json!({"message": "Endpoint not found"})
    );
}
