//! Runs the real BFF (the production server loop, `serve::serve`, with its timeouts and
//! connection cap) on an ephemeral loopback port, and a small HTTP client that keeps the session
//! cookie the way a browser would.

use std::sync::Arc;

use librechat_bff::{
    app::AppState,
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
        // Serves until the task is aborted (stop/drop), which also closes every connection.
        let task = tokio::spawn(librechat_bff::serve::serve(
            listener,
            state.clone(),
            std::future::pending(),
        ));
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

/// One response read off a raw TCP connection (see [`read_response`]).
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Reads one HTTP/1.1 response: the head, then a Content-Length or chunked body (or everything
/// until EOF). `None` when the connection closes before a complete head arrives.
pub async fn read_response<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<RawReply> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if !read_into(r, &mut buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let body = if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            if !read_into(r, &mut rest).await {
                break;
            }
        }
        rest.truncate(len);
        rest
    } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
                if !read_into(r, &mut rest).await {
                    break;
                }
                continue;
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            while rest.len() < line_end + 2 + size + 2 {
                if !read_into(r, &mut rest).await {
                    return None;
                }
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
        }
        body
    } else {
        while read_into(r, &mut rest).await {}
        rest
    };
    Some(RawReply {
        status,
        headers,
        body,
    })
}

/// Appends what one read brings; false at EOF or on an error.
async fn read_into<R: tokio::io::AsyncRead + Unpin>(r: &mut R, out: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    match r.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            out.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Sends `request` as is on a new connection and reads one response.
pub async fn raw_exchange(base_url: &str, request: &[u8]) -> Option<RawReply> {
    use tokio::io::AsyncWriteExt;
    let addr = base_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    read_response(&mut s).await
}
