//! Runs the real BFF router on an ephemeral loopback port, and a small HTTP client that keeps
//! the session cookie the way a browser would.

use std::{net::SocketAddr, sync::Arc};

use librechat_bff::{
    app::{router, AppState},
    clock::{Clock, ManualClock},
    config::Config,
};
use reqwest::{header, Method, StatusCode};
use serde_json::Value;
use tokio::task::JoinHandle;

/// Config from the embedded defaults plus `BFF__...` overrides (the process env is not read).
pub fn config(overrides: &[(&str, String)]) -> Config {
    let env = overrides
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect::<Vec<_>>();
    Config::load_with_env(None, env).expect("test config is valid")
}

pub struct TestBff {
    pub base_url: String,
    pub state: AppState,
    pub clock: ManualClock,
    task: JoinHandle<()>,
}

impl TestBff {
    pub async fn start(config: Config) -> TestBff {
        Self::start_with_clock(config, ManualClock::default()).await
    }

    pub async fn start_with_clock(config: Config, clock: ManualClock) -> TestBff {
        let state = AppState::with_clock(config, Arc::new(clock.clone()) as Arc<dyn Clock>)
            .expect("app state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        TestBff {
            base_url: format!("http://{addr}"),
            state,
            clock,
            task,
        }
    }

    /// Stops serving (the state, and with it any in-memory session, is dropped with `self`).
    pub fn stop(self) {
        self.task.abort();
    }

    pub fn client(&self) -> Browser {
        Browser::new(&self.base_url)
    }
}

impl Drop for TestBff {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that stores the session cookie from `Set-Cookie` and sends it back, like a browser.
#[derive(Clone)]
pub struct Browser {
    pub base_url: String,
    http: reqwest::Client,
    pub cookie: Option<String>,
    pub csrf: bool,
    pub origin: Option<String>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: header::HeaderMap,
    pub body: Value,
}

impl Browser {
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            cookie: None,
            csrf: true,
            origin: None,
        }
    }

    pub fn with_base(&self, base_url: &str) -> Self {
        let mut b = self.clone();
        b.base_url = base_url.to_owned();
        b
    }

    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
        bearer: Option<&str>,
    ) -> Reply {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        if let Some(c) = &self.cookie {
            req = req.header(header::COOKIE, c);
        }
        if self.csrf {
            req = req.header("X-CSRF", "1");
        }
        if let Some(o) = &self.origin {
            req = req.header(header::ORIGIN, o);
        }
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request reaches the BFF");
        let status = res.status();
        let headers = res.headers().clone();
        for sc in headers.get_all(header::SET_COOKIE) {
            let sc = sc.to_str().expect("ascii cookie");
            let pair = sc.split(';').next().unwrap_or_default().trim();
            let (_, value) = pair.split_once('=').unwrap_or((pair, ""));
            let removed = value.is_empty() || sc.to_ascii_lowercase().contains("max-age=0");
            self.cookie = if removed { None } else { Some(pair.to_owned()) };
        }
        let bytes = res.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn post(&mut self, path: &str, body: Value) -> Reply {
        self.send(Method::POST, path, Some(body), None).await
    }

    pub async fn login(&mut self, username: &str, password: &str) -> Reply {
        self.post(
            "/auth/login",
            serde_json::json!({ "username": username, "password": password }),
        )
        .await
    }
}
