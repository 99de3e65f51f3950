//! An in-process fake of an unmodified LibreChat v0.8.7 API server, for integration tests.
//!
//! It is a real HTTP/1.1 server on `127.0.0.1:<ephemeral port>` that follows
//! `shared/librechat-contract.md` and the exchanges recorded from a real server in
//! `tests/fixtures/librechat-transcripts/` (statuses, content types, Set-Cookie attributes, body
//! shapes, limiter and ban behaviour). `tests/librechat_conformance.rs` replays those recordings
//! against it. Where it knowingly differs from the real server, the difference is documented on the
//! option or item concerned and named in the conformance test.
//!
//! Everything is in memory and per instance: users, sessions, conversations, messages, files,
//! limiter windows and bans. Secrets are random per instance and never leave the process.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

const JSON_CT: &str = "application/json; charset=utf-8";
/// Express `res.send(string)` labels plain strings as HTML; LibreChat's text answers carry it.
const HTML_CT: &str = "text/html; charset=utf-8";
const NO_PARENT: &str = "00000000-0000-0000-0000-000000000000";
const BAN_MESSAGE: &str =
    "Your account has been temporarily banned due to violations of our service.";
const REGISTER_OK: &str = "Please check your email to verify your email address.";
const UNKNOWN_ERROR: &str = "An unknown error occurred.";
const FAKE_ENDPOINT: &str = "FakeAI";
const FAKE_MODEL: &str = "fake-model";
/// `express.json({limit:'3mb'})`.
const MAX_JSON_BODY: usize = 3 * 1024 * 1024;
/// Text parts of a multipart upload are small form fields; cap what is kept of each.
const MAX_TEXT_FIELD: usize = 1024 * 1024;
/// A finished generation nobody subscribed to is dropped after this (see `Job`).
const JOB_LINGER: Duration = Duration::from_secs(5);
/// Logout and the ban clear these, in this order, with only `Path` and an epoch `Expires`.
const CLEARED_COOKIES: [&str; 5] = [
    "refreshToken",
    "openid_access_token",
    "openid_id_token",
    "openid_user_id",
    "token_provider",
];
/// `FILE_UPLOAD_IP_MAX` / `FILE_UPLOAD_USER_MAX` defaults, both per 15 minutes.
const FILE_UPLOAD_IP_MAX: u32 = 100;
const FILE_UPLOAD_USER_MAX: u32 = 50;
const FILE_UPLOAD_WINDOW: Duration = Duration::from_secs(15 * 60);

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Server configuration; `Default` gives LibreChat's defaults (`.env.example` values).
#[derive(Clone, Debug)]
pub struct FakeLibreChatOptions {
    /// `SESSION_EXPIRY`: lifetime of access JWTs (default 15 min).
    pub access_token_lifetime: Duration,
    /// `REFRESH_TOKEN_EXPIRY`: session lifetime, fixed at login (default 7 days).
    pub refresh_token_lifetime: Duration,
    /// `LOGIN_MAX`: login attempts per client IP per window, successes included (default 7).
    pub login_max: u32,
    /// `LOGIN_WINDOW` (default 5 min).
    pub login_window: Duration,
    /// `REGISTER_MAX`: registrations per client IP per window (default 5).
    pub register_max: u32,
    /// `REGISTER_WINDOW` (default 60 min).
    pub register_window: Duration,
    /// `ALLOW_REGISTRATION` (default true).
    pub allow_registration: bool,
    /// `ALLOW_PASSWORD_RESET` (default false).
    pub allow_password_reset: bool,
    /// `BAN_VIOLATIONS`: one non-browser request to a guarded route bans user and IP (default true).
    pub ban_violations: bool,
    /// `BAN_DURATION` (default 2 h).
    pub ban_duration: Duration,
    /// `RESET_PASSWORD_MAX` per client IP per window (default 2).
    pub reset_password_max: u32,
    /// `RESET_PASSWORD_WINDOW` (default 2 min).
    pub reset_password_window: Duration,
    /// Delay before answering a registration of an existing email. The real server sleeps 1 s;
    /// the fake defaults to zero so suites stay fast (set 1 s to be exact).
    pub duplicate_register_delay: Duration,
    /// Gap between two SSE frames of a generation (default 20 ms), so streams are really streamed.
    pub sse_frame_interval: Duration,
    /// Reject (500 `Error processing file`) an upload whose `file` part precedes its `endpoint`
    /// field. Stricter than v0.8.7 without a per-endpoint `fileConfig` (which would accept it); on
    /// by default so a proxy that reorders parts is caught.
    pub strict_upload_field_order: bool,
    /// Add `Secure` to the auth cookies, as LibreChat does in production on a non-loopback
    /// `DOMAIN_SERVER` (default false, as recorded).
    pub secure_cookies: bool,
}

impl Default for FakeLibreChatOptions {
    fn default() -> Self {
        Self {
            access_token_lifetime: Duration::from_secs(15 * 60),
            refresh_token_lifetime: Duration::from_secs(7 * 24 * 3600),
            login_max: 7,
            login_window: Duration::from_secs(5 * 60),
            register_max: 5,
            register_window: Duration::from_secs(60 * 60),
            allow_registration: true,
            allow_password_reset: false,
            ban_violations: true,
            ban_duration: Duration::from_secs(2 * 3600),
            reset_password_max: 2,
            reset_password_window: Duration::from_secs(2 * 60),
            duplicate_register_delay: Duration::ZERO,
            sse_frame_interval: Duration::from_millis(20),
            strict_upload_field_order: true,
            secure_cookies: false,
        }
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: Method,
    /// Path including the query string.
    pub path: String,
    /// All request headers.
    pub headers: HeaderMap,
    /// The TCP peer (the BFF's side of the connection).
    pub peer: SocketAddr,
}

/// One multipart upload to `POST /api/files` or `/api/files/images` that was parsed, accepted or not.
#[derive(Clone, Debug)]
pub struct RecordedUpload {
    /// Request path (`/api/files` or `/api/files/images`).
    pub path: String,
    /// Part names in the order they arrived.
    pub field_names: Vec<String>,
    /// Filename of the `file` part, if any.
    pub file_name: Option<String>,
    /// Content-Type of the `file` part, if any.
    pub file_content_type: Option<String>,
    /// Bytes received in the `file` part.
    pub file_bytes: u64,
    /// Lower-case hex SHA-256 of the `file` part's bytes (of nothing when there was no file).
    pub sha256: String,
    /// HTTP status the fake answered with.
    pub status: u16,
}

/// Holds a response until released: the next generation before its last SSE frame (or until it
/// is aborted), or the answer of the next auth call (see [`FakeLibreChat::hold_next_auth`]).
/// Dropping the gate releases it, so a forgotten gate never wedges a stream.
pub struct StreamGate {
    inner: Arc<GateShared>,
}

impl StreamGate {
    /// Lets the held stream send its final frame and close.
    pub fn release(&self) {
        self.inner.released.send_replace(true);
    }

    /// Resolves once the held stream has sent everything but its last frame (or the held auth
    /// call has done its work) and is waiting.
    pub async fn reached(&self) {
        let mut rx = self.inner.reached.subscribe();
        let _ = rx.wait_for(|reached| *reached).await;
    }
}

impl Drop for StreamGate {
    fn drop(&mut self) {
        self.release();
    }
}

/// An answer served instead of LibreChat's (see [`FakeLibreChat::answer_with`]).
#[derive(Clone, Debug)]
pub struct CannedAnswer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl CannedAnswer {
    /// What an nginx ingress answers for a path it has no route for.
    pub fn ingress_404() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            content_type: "text/html",
            body: "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n\
                   <center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n\
                   </body>\r\n</html>\r\n"
                .into(),
        }
    }
}

/// The fake server. Dropping it stops the listener and closes every connection.
pub struct FakeLibreChat {
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub base_url: String,
    /// The socket address it listens on (kept across `go_down`/`come_back`).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<ServerHandle>>,
}

impl FakeLibreChat {
    /// Starts the server on an ephemeral loopback port.
    pub async fn start(opts: FakeLibreChatOptions) -> FakeLibreChat {
        let listener = bind_reusable(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("fake LibreChat: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake LibreChat: listener address");
        let base_url = format!("http://{addr}");
        let shared = Arc::new(Shared::new(opts, base_url.clone()));
        let server = spawn_server(listener, shared.clone());
        FakeLibreChat {
            base_url,
            addr,
            shared,
            server: Mutex::new(Some(server)),
        }
    }

    /// Creates a verified local user directly (no limiter); returns its `_id`. An existing email
    /// keeps its user and that user's id is returned.
    pub fn create_user(&self, email: &str, password: &str, name: &str) -> String {
        let mut db = lock(&self.shared.db);
        if let Some(user) = db.user_by_email(email) {
            return user.id.clone();
        }
        db.insert_user(&self.shared.oid, email, "", name, password)
    }

    /// Deletes every session of the user (as a ban or password reset does): refresh tokens die,
    /// issued access tokens keep working until they expire.
    pub fn delete_user_sessions(&self, email: &str) {
        let mut db = lock(&self.shared.db);
        if let Some(id) = db.user_by_email(email).map(|u| u.id.clone()) {
            db.sessions.retain(|s| s.user_id != id);
        }
    }

    /// Sets a user's password (sessions are left alone).
    pub fn set_password(&self, email: &str, password: &str) {
        let mut db = lock(&self.shared.db);
        let now = now_ms();
        if let Some(user) = db.user_by_email_mut(email) {
            user.password_hash = hash_password(password);
            user.updated_at = iso(now);
        }
    }

    /// Number of `POST /api/auth/login` requests received (rejected ones included).
    pub fn login_calls(&self) -> usize {
        self.shared.login_calls.load(Ordering::SeqCst)
    }

    /// Number of `POST /api/auth/refresh` requests received.
    pub fn refresh_calls(&self) -> usize {
        self.shared.refresh_calls.load(Ordering::SeqCst)
    }

    /// Number of `POST /api/auth/register` requests received.
    pub fn register_calls(&self) -> usize {
        self.shared.register_calls.load(Ordering::SeqCst)
    }

    /// Number of `POST /api/auth/logout` requests received.
    pub fn logout_calls(&self) -> usize {
        self.shared.logout_calls.load(Ordering::SeqCst)
    }

    /// Refuse every access token with 401 (on) or verify them again (off).
    pub fn reject_all_tokens(&self, on: bool) {
        self.shared.reject_tokens.store(on, Ordering::SeqCst);
    }

    /// The role (`ADMIN`, `USER`) of the user with this email.
    pub fn role_of(&self, email: &str) -> Option<String> {
        lock(&self.shared.db)
            .user_by_email(email)
            .map(|u| u.role.clone())
    }

    /// How many requests reached `path` (query string ignored).
    pub fn calls_to(&self, path: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.path.split('?').next() == Some(path))
            .count()
    }

    /// Number of users.
    pub fn user_count(&self) -> usize {
        lock(&self.shared.db).users.len()
    }

    /// The `_id` of the user with this email (case-insensitive), if any.
    pub fn user_id(&self, email: &str) -> Option<String> {
        lock(&self.shared.db)
            .user_by_email(email)
            .map(|u| u.id.clone())
    }

    /// Number of live (unexpired) sessions of the user.
    pub fn session_count(&self, email: &str) -> usize {
        let db = lock(&self.shared.db);
        let now = now_ms();
        match db.user_by_email(email) {
            Some(u) => db
                .sessions
                .iter()
                .filter(|s| s.user_id == u.id && s.expiration_ms > now)
                .count(),
            None => 0,
        }
    }

    /// Number of conversations the user has.
    pub fn conversation_count(&self, email: &str) -> usize {
        let db = lock(&self.shared.db);
        match db.user_by_email(email) {
            Some(u) => db.convos.iter().filter(|c| c.user_id == u.id).count(),
            None => 0,
        }
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Delays every response by `d` (applied before the request is processed); zero turns it off.
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.shared.latency) = d;
    }

    /// Stops listening and drops every open connection: new connections are refused. State is
    /// kept, and generations already running go on.
    pub async fn go_down(&self) {
        let handle = lock(&self.server).take();
        if let Some(handle) = handle {
            let _ = handle.stop.send(());
            let _ = handle.task.await;
        }
    }

    /// Listens again on the same port with the same state.
    pub async fn come_back(&self) {
        if lock(&self.server).is_some() {
            return;
        }
        let listener = bind_reusable(self.addr).expect("fake LibreChat: re-bind the same port");
        let server = spawn_server(listener, self.shared.clone());
        *lock(&self.server) = Some(server);
    }

    /// The next chat generation (the next `POST /api/agents/chat/...`) streams every frame but its
    /// last, then waits until the returned gate is released (or the generation is aborted).
    pub fn hold_stream_end(&self) -> StreamGate {
        let inner = Arc::new(GateShared {
            released: watch::channel(false).0,
            reached: watch::channel(false).0,
        });
        *lock(&self.shared.pending_gate) = Some(inner.clone());
        StreamGate { inner }
    }

    /// The next `POST` to `path` (`/api/auth/refresh` or `/api/auth/login`) does its work on
    /// arrival (a refresh rotates the session's token, a login opens a session) and holds its
    /// answer until the returned gate is released.
    pub fn hold_next_auth(&self, path: &str) -> StreamGate {
        let inner = Arc::new(GateShared {
            released: watch::channel(false).0,
            reached: watch::channel(false).0,
        });
        lock(&self.shared.auth_gates).insert(path.to_owned(), inner.clone());
        StreamGate { inner }
    }

    /// Every request to `path` gets this canned answer instead of LibreChat's (still counted
    /// and recorded), e.g. an ingress's HTML 404 for a misrouted call; `None` restores it.
    pub fn answer_with(&self, path: &str, answer: Option<CannedAnswer>) {
        let mut canned = lock(&self.shared.canned);
        match answer {
            Some(a) => canned.insert(path.to_owned(), a),
            None => canned.remove(path),
        };
    }

    /// Every multipart upload that got past auth, ban, UA and upload-limiter checks, in order.
    pub fn uploads(&self) -> Vec<RecordedUpload> {
        lock(&self.shared.uploads).clone()
    }

    /// Whether this client address is currently banned.
    pub fn is_banned_ip(&self, ip: &str) -> bool {
        let key = ip_key(ip);
        lock(&self.shared.bans).is_banned(&format!("ip:{key}"))
    }

    /// Whether the user with this email is currently banned.
    pub fn is_banned_user(&self, email: &str) -> bool {
        let Some(id) = self.user_id(email) else {
            return false;
        };
        lock(&self.shared.bans).is_banned(&format!("user:{id}"))
    }

    /// Lifts every ban.
    pub fn clear_bans(&self) {
        lock(&self.shared.bans).entries.clear();
    }

    /// Empties every rate-limiter window, as a restart of the real server does (its limiters are
    /// in memory when `USE_REDIS` is off).
    pub fn reset_limiters(&self) {
        let opts = lock(&self.shared.opts).clone();
        *lock(&self.shared.limits) = Limiters::new(&opts);
    }

    /// Flips `ALLOW_PASSWORD_RESET` at run time.
    pub fn set_allow_password_reset(&self, allow: bool) {
        lock(&self.shared.opts).allow_password_reset = allow;
    }

    /// Flips `ALLOW_REGISTRATION` at run time.
    pub fn set_allow_registration(&self, allow: bool) {
        lock(&self.shared.opts).allow_registration = allow;
    }

    /// Stream ids of the generations still running.
    pub fn active_stream_ids(&self) -> Vec<String> {
        lock(&self.shared.jobs)
            .values()
            .filter(|j| !lock(&j.inner).done)
            .map(|j| j.stream_id.clone())
            .collect()
    }

    /// Signs an access JWT for the user with `iat = now + iat_offset_secs` and
    /// `exp = now + exp_offset_secs`, with the server's own secret (for expired-token tests).
    pub fn mint_access_token(
        &self,
        email: &str,
        iat_offset_secs: i64,
        exp_offset_secs: i64,
    ) -> String {
        let user = lock(&self.shared.db)
            .user_by_email(email)
            .cloned()
            .expect("fake LibreChat: mint_access_token for an unknown user");
        let now = (now_ms() / 1000) as i64;
        let claims = AccessClaims {
            id: user.id.clone(),
            username: user.username.clone(),
            provider: "local".into(),
            email: user.email.clone(),
            iat: now + iat_offset_secs,
            exp: now + exp_offset_secs,
        };
        sign(&claims, &self.shared.access_secret)
    }
}

impl Drop for FakeLibreChat {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        if let Some(handle) = lock(&self.server).take() {
            handle.task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server plumbing
// ---------------------------------------------------------------------------------------------

struct ServerHandle {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // `come_back` re-binds the port of connections it just killed (TIME_WAIT).
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn spawn_server(listener: TcpListener, shared: Arc<Shared>) -> ServerHandle {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        conns.spawn(serve_connection(shared.clone(), stream, peer));
                    }
                    // Transient accept errors (e.g. EMFILE): back off briefly instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        // Connections die with the listener: a "down" server answers nothing at all.
        conns.shutdown().await;
    });
    ServerHandle { stop, task }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req, peer).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    lock(&shared.requests).push(RecordedRequest {
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| req.uri().path().to_owned()),
        headers: req.headers().clone(),
        peer,
    });
    // Counted on arrival, so rejected attempts (malformed JSON, limiter, ban) count too.
    if req.method() == Method::POST {
        let counter = match req.uri().path().trim_end_matches('/') {
            "/api/auth/login" => Some(&shared.login_calls),
            "/api/auth/refresh" => Some(&shared.refresh_calls),
            "/api/auth/register" => Some(&shared.register_calls),
            "/api/auth/logout" => Some(&shared.logout_calls),
            _ => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = req.uri().path().to_owned();
    let canned = lock(&shared.canned).get(&path).cloned();
    if let Some(canned) = canned {
        let mut resp = Response::new(Body::from(canned.body));
        *resp.status_mut() = canned.status;
        set_header(resp.headers_mut(), "content-type", canned.content_type);
        return resp;
    }
    let held = (req.method() == Method::POST)
        .then(|| lock(&shared.auth_gates).remove(&path))
        .flatten();
    let mut resp = dispatch(&shared, req, peer).await;
    if let Some(gate) = held {
        // The work is done (token rotated, session opened); only the answer waits.
        gate.reached.send_replace(true);
        let mut released = gate.released.subscribe();
        let _ = released.wait_for(|released| *released).await;
    }
    // Every recorded response carried these two.
    let headers = resp.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        HeaderName::from_static("x-robots-tag"),
        HeaderValue::from_static("noindex"),
    );
    resp
}

/// What a route sees of a request.
struct Ctx {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    ip: String,
    /// `req.body` as Express 5 leaves it: `None` when no body parser ran (no JSON/urlencoded body).
    body: Option<Value>,
    /// The unread body, for multipart uploads.
    raw: Option<Incoming>,
}

impl Ctx {
    fn body(&self) -> Value {
        self.body.clone().unwrap_or_else(|| json!({}))
    }

    fn body_str(&self, key: &str) -> Option<String> {
        self.body
            .as_ref()
            .and_then(|b| b.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn user_agent(&self) -> &str {
        self.headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if path == "/health" && parts.method == Method::GET {
        return text(StatusCode::OK, "OK");
    }
    let media = media_type(&parts.headers);
    let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().parse::<u64>().is_ok());
    // express.json/urlencoded run globally, before every limiter: malformed JSON never counts.
    let (parsed, raw) = match media.as_deref() {
        Some(kind @ ("application/json" | "application/x-www-form-urlencoded")) if has_body => {
            let bytes = match http_body_util::Limited::new(body, MAX_JSON_BODY)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                    return text(StatusCode::PAYLOAD_TOO_LARGE, "request entity too large")
                }
                Err(_) => return text(StatusCode::BAD_REQUEST, "Bad Request"),
            };
            let value = if kind == "application/json" {
                match parse_json_body(&bytes) {
                    Some(v) => v,
                    None => {
                        return json_reply(
                            StatusCode::BAD_REQUEST,
                            &json!({"error": "Invalid JSON format",
                                    "message": "The request body contains malformed JSON"}),
                        )
                    }
                }
            } else {
                let mut map = Map::new();
                for (k, v) in url::form_urlencoded::parse(&bytes) {
                    map.insert(k.into_owned(), Value::String(v.into_owned()));
                }
                Value::Object(map)
            };
            (Some(value), None)
        }
        _ => (None, Some(body)),
    };
    if !(path == "/api" || path.starts_with("/api/")) {
        return spa_index();
    }
    let mut ctx = Ctx {
        method: parts.method,
        query: parse_query(parts.uri.query()),
        ip: client_ip(&parts.headers, peer),
        headers: parts.headers,
        path,
        body: parsed,
        raw,
    };
    route(shared, &mut ctx).await
}

/// `express.json` in strict mode: an empty body is `{}`, only objects and arrays are accepted.
fn parse_json_body(bytes: &[u8]) -> Option<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(json!({}));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => Some(v),
        _ => None,
    }
}

async fn route(shared: &Arc<Shared>, ctx: &mut Ctx) -> Response<Body> {
    let rest = ctx.path.strip_prefix("/api").unwrap_or_default().to_owned();
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let method = ctx.method.clone();
    match segs.as_slice() {
        ["auth", "register"] if method == Method::POST => register(shared, ctx).await,
        ["auth", "login"] if method == Method::POST => login(shared, ctx),
        ["auth", "refresh"] if method == Method::POST => refresh(shared, ctx),
        ["auth", "logout"] if method == Method::POST => logout(shared, ctx),
        ["auth", "requestPasswordReset"] if method == Method::POST => {
            request_password_reset(shared, ctx)
        }
        ["auth", "resetPassword"] if method == Method::POST => reset_password(shared, ctx),
        ["config"] if method == Method::GET => config(shared, ctx),
        ["user", ..] => {
            let user = match authenticate(shared, ctx) {
                Ok(u) => u,
                Err(resp) => return *resp,
            };
            if segs.len() == 1 && method == Method::GET {
                json_reply(StatusCode::OK, &user.to_json(UserView::Profile))
            } else {
                endpoint_not_found()
            }
        }
        ["convos", tail @ ..] => match authenticate(shared, ctx) {
            Ok(user) => convos(shared, ctx, &user, tail),
            Err(resp) => *resp,
        },
        ["messages", tail @ ..] => match authenticate(shared, ctx) {
            Ok(user) => messages(shared, ctx, &user, tail),
            Err(resp) => *resp,
        },
        ["endpoints"] | ["models"] if method == Method::GET => {
            if let Err(resp) = authenticate(shared, ctx) {
                return *resp;
            }
            if segs[0] == "endpoints" {
                endpoints_reply()
            } else {
                json_reply(StatusCode::OK, &models_json())
            }
        }
        [first @ ("agents" | "files" | "assistants"), tail @ ..] => {
            let user = match guard(shared, ctx) {
                Ok(u) => u,
                Err(resp) => return *resp,
            };
            match *first {
                "agents" => agents(shared, ctx, &user, tail).await,
                "files" => files(shared, ctx, &user, tail).await,
                _ => endpoint_not_found(),
            }
        }
        _ => endpoint_not_found(),
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

struct Shared {
    opts: Mutex<FakeLibreChatOptions>,
    base_url: String,
    access_secret: Vec<u8>,
    refresh_secret: Vec<u8>,
    oid: ObjectIdGen,
    db: Mutex<Db>,
    limits: Mutex<Limiters>,
    bans: Mutex<Bans>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    pending_gate: Mutex<Option<Arc<GateShared>>>,
    /// Auth answers to hold, by path (see `FakeLibreChat::hold_next_auth`).
    auth_gates: Mutex<HashMap<String, Arc<GateShared>>>,
    /// Canned answers, by path (see `FakeLibreChat::answer_with`).
    canned: Mutex<HashMap<String, CannedAnswer>>,
    latency: Mutex<Duration>,
    requests: Mutex<Vec<RecordedRequest>>,
    uploads: Mutex<Vec<RecordedUpload>>,
    login_calls: AtomicUsize,
    refresh_calls: AtomicUsize,
    register_calls: AtomicUsize,
    logout_calls: AtomicUsize,
    /// Every access token is refused (401), as for a user LibreChat no longer accepts.
    reject_tokens: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn new(opts: FakeLibreChatOptions, base_url: String) -> Self {
        Self {
            limits: Mutex::new(Limiters::new(&opts)),
            opts: Mutex::new(opts),
            base_url,
            access_secret: random_bytes(32),
            refresh_secret: random_bytes(32),
            oid: ObjectIdGen::new(),
            db: Mutex::new(Db::default()),
            bans: Mutex::new(Bans::default()),
            jobs: Mutex::new(HashMap::new()),
            pending_gate: Mutex::new(None),
            auth_gates: Mutex::new(HashMap::new()),
            canned: Mutex::new(HashMap::new()),
            latency: Mutex::new(Duration::ZERO),
            requests: Mutex::new(Vec::new()),
            uploads: Mutex::new(Vec::new()),
            login_calls: AtomicUsize::new(0),
            refresh_calls: AtomicUsize::new(0),
            register_calls: AtomicUsize::new(0),
            logout_calls: AtomicUsize::new(0),
            reject_tokens: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn opts(&self) -> FakeLibreChatOptions {
        lock(&self.opts).clone()
    }

    fn remove_job_if_same(&self, job: &Arc<Job>) {
        let mut jobs = lock(&self.jobs);
        if jobs
            .get(&job.stream_id)
            .is_some_and(|j| Arc::ptr_eq(j, job))
        {
            jobs.remove(&job.stream_id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later request into a second panic.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone, Debug)]
struct User {
    id: String,
    email: String,
    username: String,
    name: String,
    password_hash: String,
    role: String,
    personalization_id: String,
    created_at: String,
    updated_at: String,
}

#[derive(Clone, Copy)]
enum UserView {
    /// Login answer: the DB document plus `id`.
    Login,
    /// Refresh answer: the lean DB document, `_id` but no `id`.
    Refresh,
    /// `GET /api/user`: whitelisted fields with both `_id` and `id`, no `refreshToken`.
    Profile,
}

impl User {
    fn to_json(&self, view: UserView) -> Value {
        let mut v = json!({
            "_id": self.id,
            "name": self.name,
            "username": self.username,
            "email": self.email,
            "emailVerified": true,
            "avatar": null,
            "provider": "local",
            "role": self.role,
            "plugins": [],
            "twoFactorEnabled": false,
            "termsAccepted": false,
            "personalization": {"memories": true, "_id": self.personalization_id},
            "favorites": [],
            "skillStates": {},
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        });
        if let Some(obj) = v.as_object_mut() {
            match view {
                UserView::Login => {
                    obj.insert("refreshToken".into(), json!([]));
                    obj.insert("id".into(), json!(self.id));
                }
                UserView::Refresh => {
                    obj.insert("refreshToken".into(), json!([]));
                }
                UserView::Profile => {
                    obj.insert("id".into(), json!(self.id));
                }
            }
        }
        v
    }
}

struct Session {
    id: String,
    user_id: String,
    refresh_hash: String,
    expiration_ms: u64,
}

struct ResetToken {
    user_id: String,
    token_hash: String,
    expires_ms: u64,
}

struct Convo {
    user_id: String,
    /// The conversation document as LibreChat stores it (without internal-only fields).
    doc: Map<String, Value>,
}

impl Convo {
    fn id(&self) -> &str {
        self.doc
            .get("conversationId")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn list_item(&self) -> Value {
        let mut item = Map::new();
        for key in [
            "_id",
            "conversationId",
            "endpoint",
            "title",
            "createdAt",
            "updatedAt",
            "user",
            "model",
            "agent_id",
            "chatProjectId",
        ] {
            if let Some(v) = self.doc.get(key) {
                item.insert(key.into(), v.clone());
            }
        }
        Value::Object(item)
    }
}

struct StoredMessage {
    conversation_id: String,
    /// Fields as `GET /api/messages/:id` returns them (`_id`, `__v`, `user` excluded).
    doc: Value,
}

struct StoredFile {
    user_id: String,
    doc: Map<String, Value>,
}

#[derive(Default)]
struct Db {
    users: Vec<User>,
    sessions: Vec<Session>,
    reset_tokens: Vec<ResetToken>,
    convos: Vec<Convo>,
    messages: Vec<StoredMessage>,
    files: Vec<StoredFile>,
}

impl Db {
    fn user_by_email(&self, email: &str) -> Option<&User> {
        let email = email.trim().to_lowercase();
        self.users.iter().find(|u| u.email == email)
    }

    fn user_by_email_mut(&mut self, email: &str) -> Option<&mut User> {
        let email = email.trim().to_lowercase();
        self.users.iter_mut().find(|u| u.email == email)
    }

    fn user_by_id(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    fn insert_user(
        &mut self,
        oid: &ObjectIdGen,
        email: &str,
        username: &str,
        name: &str,
        password: &str,
    ) -> String {
        let now = iso(now_ms());
        let personalization_id = oid.next();
        let id = oid.next();
        // The first account on a LibreChat instance becomes its admin.
        let role = if self.users.is_empty() {
            "ADMIN"
        } else {
            "USER"
        };
        self.users.push(User {
            id: id.clone(),
            email: email.trim().to_lowercase(),
            username: username.to_lowercase(),
            name: name.to_owned(),
            password_hash: hash_password(password),
            role: role.into(),
            personalization_id,
            created_at: now.clone(),
            updated_at: now,
        });
        id
    }

    fn convo(&self, conversation_id: &str) -> Option<&Convo> {
        self.convos.iter().find(|c| c.id() == conversation_id)
    }

    fn convo_mut(&mut self, conversation_id: &str) -> Option<&mut Convo> {
        self.convos.iter_mut().find(|c| c.id() == conversation_id)
    }
}

/// Mongo-style 24-hex ids: seconds, a per-instance random part, a counter.
struct ObjectIdGen {
    random: [u8; 5],
    counter: AtomicU32,
}

impl ObjectIdGen {
    fn new() -> Self {
        Self {
            random: rand::random(),
            counter: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
        }
    }

    fn next(&self) -> String {
        let secs = (now_ms() / 1000) as u32;
        let count = self.counter.fetch_add(1, Ordering::SeqCst) & 0x00ff_ffff;
        format!("{secs:08x}{}{count:06x}", hex(&self.random))
    }
}

// ---------------------------------------------------------------------------------------------
// Limiters and bans
// ---------------------------------------------------------------------------------------------

/// express-rate-limit's memory store: a fixed window per key, opened by the key's first hit; every
/// request counts, including the rejected ones.
struct FixedWindow {
    max: u32,
    window_ms: u64,
    hits: HashMap<String, (u32, u64)>,
}

struct LimitResult {
    limit: u32,
    remaining: u32,
    reset_ms: u64,
    limited: bool,
    now_ms: u64,
}

impl FixedWindow {
    fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window_ms: window.as_millis() as u64,
            hits: HashMap::new(),
        }
    }

    fn hit(&mut self, key: &str) -> LimitResult {
        let now = now_ms();
        let entry = self
            .hits
            .entry(key.to_owned())
            .or_insert((0, now + self.window_ms));
        if now >= entry.1 {
            *entry = (0, now + self.window_ms);
        }
        entry.0 += 1;
        LimitResult {
            limit: self.max,
            remaining: self.max.saturating_sub(entry.0),
            reset_ms: entry.1,
            limited: entry.0 > self.max,
            now_ms: now,
        }
    }
}

impl LimitResult {
    fn apply(&self, resp: &mut Response<Body>) {
        let h = resp.headers_mut();
        set_header(h, "x-ratelimit-limit", &self.limit.to_string());
        set_header(h, "x-ratelimit-remaining", &self.remaining.to_string());
        set_header(
            h,
            "x-ratelimit-reset",
            &self.reset_ms.div_ceil(1000).to_string(),
        );
        if self.limited {
            let retry = self.reset_ms.saturating_sub(self.now_ms).div_ceil(1000);
            set_header(h, "retry-after", &retry.to_string());
        }
    }

    fn with(&self, mut resp: Response<Body>) -> Response<Body> {
        self.apply(&mut resp);
        resp
    }
}

struct Limiters {
    login: FixedWindow,
    register: FixedWindow,
    reset: FixedWindow,
    file_ip: FixedWindow,
    file_user: FixedWindow,
}

impl Limiters {
    fn new(opts: &FakeLibreChatOptions) -> Self {
        Self {
            login: FixedWindow::new(opts.login_max, opts.login_window),
            register: FixedWindow::new(opts.register_max, opts.register_window),
            reset: FixedWindow::new(opts.reset_password_max, opts.reset_password_window),
            file_ip: FixedWindow::new(FILE_UPLOAD_IP_MAX, FILE_UPLOAD_WINDOW),
            file_user: FixedWindow::new(FILE_UPLOAD_USER_MAX, FILE_UPLOAD_WINDOW),
        }
    }
}

#[derive(Default)]
struct Bans {
    /// `ip:<key>` / `user:<id>` → expiry (ms since epoch).
    entries: HashMap<String, u64>,
}

impl Bans {
    fn is_banned(&self, key: &str) -> bool {
        self.entries.get(key).is_some_and(|&until| until > now_ms())
    }
}

fn minutes(d: Duration) -> u64 {
    d.as_secs() / 60
}

/// `checkBan` for login/register/reset: the client IP and the user named by `req.body.email`.
fn banned_by_ip_or_email(shared: &Shared, ctx: &Ctx) -> bool {
    if !shared.opts().ban_violations {
        return false;
    }
    let user_id = ctx
        .body_str("email")
        .and_then(|email| lock(&shared.db).user_by_email(&email).map(|u| u.id.clone()));
    let bans = lock(&shared.bans);
    bans.is_banned(&format!("ip:{}", ctx.ip))
        || user_id.is_some_and(|id| bans.is_banned(&format!("user:{id}")))
}

/// checkBan's answer: non-browsers always get 403 JSON; browsers on `/api/agents/chat*` get
/// `denyRequest` (an SSE-formatted 200, or a 500 when there is no body to read).
fn ban_response(ctx: &Ctx) -> Response<Body> {
    if is_browser(ctx.user_agent()) && ctx.path.starts_with("/api/agents/chat") {
        return deny_request(ctx);
    }
    json_reply(StatusCode::FORBIDDEN, &json!({ "message": BAN_MESSAGE }))
}

/// LibreChat's `denyRequest` for a banned browser on the chat routes. Express 5 leaves `req.body`
/// undefined without a body, and v0.8.7 then crashes on destructuring it: 500 text.
fn deny_request(ctx: &Ctx) -> Response<Body> {
    let Some(body) = ctx.body.as_ref() else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, UNKNOWN_ERROR);
    };
    let message_id = body
        .get("messageId")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(uuid4);
    let conversation_id = match body.get("conversationId").and_then(Value::as_str) {
        Some(id) if id != "new" => id.to_owned(),
        _ => uuid4(),
    };
    let parent = body.get("parentMessageId").cloned().unwrap_or(Value::Null);
    let user_message = json!({
        "sender": "User",
        "messageId": message_id,
        "parentMessageId": parent,
        "conversationId": conversation_id,
        "isCreatedByUser": true,
        "text": body.get("text").cloned().unwrap_or(Value::Null),
    });
    let error_message = json!({
        "sender": "AI",
        "messageId": uuid4(),
        "conversationId": conversation_id,
        "parentMessageId": message_id,
        "unfinished": false,
        "error": true,
        "final": true,
        "text": "{\"type\":\"ban\"}",
        "isCreatedByUser": false,
    });
    let body = format!(
        "{}{}",
        sse_frame(
            "message",
            &json!({"message": user_message, "created": true})
        ),
        sse_frame("error", &error_message)
    );
    raw_chunked(StatusCode::OK, body)
}

/// ua-parser-js finds a `browser.name` for real browsers only; this is the same split for the
/// agents tests care about (`okhttp/4.12`, `curl/8`, `python-requests`, empty → non-browser).
fn is_browser(ua: &str) -> bool {
    const TOKENS: [&str; 10] = [
        "Mozilla/",
        "Chrome/",
        "Chromium/",
        "Firefox/",
        "Safari/",
        "Edg/",
        "Edge/",
        "OPR/",
        "Opera",
        "Trident/",
    ];
    TOKENS.iter().any(|t| ua.contains(t))
}

// ---------------------------------------------------------------------------------------------
// Auth routes
// ---------------------------------------------------------------------------------------------

async fn register(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
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

fn login(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
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

fn refresh(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
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

fn logout(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
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

fn request_password_reset(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
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

fn reset_password(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
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

fn config(shared: &Arc<Shared>, ctx: &Ctx) -> Response<Body> {
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
struct AccessClaims {
    id: String,
    username: String,
    provider: String,
    email: String,
    iat: i64,
    exp: i64,
}

#[derive(Serialize, Deserialize)]
struct RefreshClaims {
    id: String,
    #[serde(rename = "sessionId")]
    session_id: String,
    /// Not in LibreChat's payload; keeps two rotations within one second distinct.
    jti: String,
    iat: i64,
    exp: i64,
}

fn sign<T: Serialize>(claims: &T, secret: &[u8]) -> String {
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
enum JwtError {
    Malformed,
    Invalid,
    Signature,
    Expired,
}

impl JwtError {
    fn message(&self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt malformed",
            JwtError::Invalid => "invalid token",
            JwtError::Signature => "invalid signature",
            JwtError::Expired => "jwt expired",
        }
    }
}

fn verify<T: serde::de::DeserializeOwned>(token: &str, secret: &[u8]) -> Result<T, JwtError> {
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
type Rejection = Box<Response<Body>>;

/// `requireJwtAuth`: passport-jwt reading only `Authorization: Bearer <token>` (scheme
/// case-insensitive); failures are 401 JSON `{message: info.message}`.
fn authenticate(shared: &Shared, ctx: &Ctx) -> Result<User, Rejection> {
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
fn guard(shared: &Arc<Shared>, ctx: &Ctx) -> Result<User, Rejection> {
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

fn parse_cookies(headers: &HeaderMap) -> HashMap<String, String> {
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

// ---------------------------------------------------------------------------------------------
// Conversations and messages
// ---------------------------------------------------------------------------------------------

fn convos(shared: &Arc<Shared>, ctx: &Ctx, user: &User, tail: &[&str]) -> Response<Body> {
    match (ctx.method.clone(), tail) {
        (Method::GET, []) => list_convos(shared, ctx, user),
        (Method::POST, ["update"]) => {
            let body = ctx.body();
            let arg = body.get("arg").cloned().unwrap_or(Value::Null);
            let Some(conversation_id) = arg.get("conversationId").and_then(Value::as_str) else {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "conversationId is required"}),
                );
            };
            let mut db = lock(&shared.db);
            let Some(convo) = db
                .convo_mut(conversation_id)
                .filter(|c| c.user_id == user.id)
            else {
                // UNCONFIRMED: the real saveConvo may upsert; the fake refuses unknown ids.
                return json_reply(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "Conversation not found"}),
                );
            };
            if let Some(fields) = arg.as_object() {
                for (key, value) in fields {
                    if key != "conversationId" && key != "_id" && key != "user" {
                        convo.doc.insert(key.clone(), value.clone());
                    }
                }
            }
            convo.doc.insert("updatedAt".into(), json!(iso(now_ms())));
            json_reply(StatusCode::CREATED, &Value::Object(convo.doc.clone()))
        }
        (Method::DELETE, []) => {
            let body = ctx.body();
            let conversation_id = body
                .get("arg")
                .and_then(|a| a.get("conversationId"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let Some(conversation_id) = conversation_id else {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "no parameters provided"}),
                );
            };
            delete_convos(shared, user, |c| c.id() == conversation_id)
        }
        (Method::DELETE, ["all"]) => delete_convos(shared, user, |_| true),
        (Method::GET, [conversation_id]) => {
            let db = lock(&shared.db);
            match db.convo(conversation_id).filter(|c| c.user_id == user.id) {
                Some(convo) => json_reply(StatusCode::OK, &Value::Object(convo.doc.clone())),
                // `res.status(404).end()`
                None => empty(StatusCode::NOT_FOUND),
            }
        }
        _ => endpoint_not_found(),
    }
}

fn list_convos(shared: &Arc<Shared>, ctx: &Ctx, user: &User) -> Response<Body> {
    let limit = ctx
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(25);
    let archived = ctx.query.get("isArchived").is_some_and(|v| v == "true");
    let sort_by = ctx
        .query
        .get("sortBy")
        .map(String::as_str)
        .filter(|s| matches!(*s, "updatedAt" | "createdAt" | "title"))
        .unwrap_or("updatedAt")
        .to_owned();
    let ascending = ctx.query.get("sortDirection").is_some_and(|d| d == "asc");
    let search = ctx.query.get("search").map(|s| s.to_lowercase());
    // The cursor is opaque to clients; here it is the base64 of the next offset.
    let offset = ctx
        .query
        .get("cursor")
        .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0);
    let db = lock(&shared.db);
    let mut list: Vec<&Convo> = db
        .convos
        .iter()
        .filter(|c| c.user_id == user.id)
        .filter(|c| {
            c.doc
                .get("isArchived")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                == archived
        })
        .filter(|c| match &search {
            Some(s) => c
                .doc
                .get("title")
                .and_then(Value::as_str)
                .is_some_and(|t| t.to_lowercase().contains(s)),
            None => true,
        })
        .collect();
    list.sort_by(|a, b| {
        let key = |c: &Convo| {
            c.doc
                .get(&sort_by)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let ord = key(a).cmp(&key(b));
        if ascending {
            ord
        } else {
            ord.reverse()
        }
    });
    let page: Vec<Value> = list
        .iter()
        .skip(offset)
        .take(limit)
        .map(|c| c.list_item())
        .collect();
    let next_cursor = if offset + limit < list.len() {
        json!(base64::engine::general_purpose::STANDARD.encode((offset + limit).to_string()))
    } else {
        Value::Null
    };
    json_reply(
        StatusCode::OK,
        &json!({"conversations": page, "nextCursor": next_cursor}),
    )
}

fn delete_convos(
    shared: &Arc<Shared>,
    user: &User,
    which: impl Fn(&Convo) -> bool,
) -> Response<Body> {
    let mut db = lock(&shared.db);
    let doomed: Vec<String> = db
        .convos
        .iter()
        .filter(|c| c.user_id == user.id && which(c))
        .map(|c| c.id().to_owned())
        .collect();
    db.convos
        .retain(|c| !(c.user_id == user.id && doomed.iter().any(|d| d == c.id())));
    let before = db.messages.len();
    db.messages.retain(|m| !doomed.contains(&m.conversation_id));
    let deleted_messages = before - db.messages.len();
    json_reply(
        StatusCode::CREATED,
        &json!({
            "acknowledged": true,
            "deletedCount": doomed.len(),
            "messages": {"acknowledged": true, "deletedCount": deleted_messages},
        }),
    )
}

fn messages(shared: &Arc<Shared>, ctx: &Ctx, user: &User, tail: &[&str]) -> Response<Body> {
    if ctx.method != Method::GET || tail.is_empty() || tail.len() > 2 {
        return endpoint_not_found();
    }
    let db = lock(&shared.db);
    // validateMessageReq
    match db.convo(tail[0]) {
        None => {
            return json_reply(
                StatusCode::NOT_FOUND,
                &json!({"error": "Conversation not found"}),
            )
        }
        Some(c) if c.user_id != user.id => {
            return json_reply(
                StatusCode::FORBIDDEN,
                &json!({"error": "User not authorized for this conversation"}),
            )
        }
        Some(_) => {}
    }
    let list: Vec<Value> = db
        .messages
        .iter()
        .filter(|m| m.conversation_id == tail[0])
        .filter(|m| {
            tail.len() == 1 || m.doc.get("messageId").and_then(Value::as_str) == Some(tail[1])
        })
        .map(|m| m.doc.clone())
        .collect();
    json_reply(StatusCode::OK, &Value::Array(list))
}

fn endpoints_reply() -> Response<Body> {
    let body = json!({
        "agents": {
            "userProvide": false,
            "capabilities": ["deferred_tools", "execute_code", "file_search", "web_search",
                "artifacts", "subagents", "actions", "context", "skills", "tools", "chain", "ocr"],
            "order": 1,
            "disableBuilder": false,
        },
        FAKE_ENDPOINT: {
            "order": 9999,
            "type": "custom",
            "userProvide": false,
            "userProvideURL": false,
            "modelDisplayLabel": FAKE_ENDPOINT,
        },
    });
    // Recorded: `res.send(JSON string)`, so JSON under a text/html content type.
    let mut resp = Response::new(Body::from(body.to_string()));
    set_header(resp.headers_mut(), "content-type", HTML_CT);
    resp
}

fn models_json() -> Value {
    json!({
        "openAI": ["gpt-4o", "gpt-4o-mini"],
        "google": ["gemini-2.5-pro", "gemini-2.5-flash"],
        "anthropic": ["claude-sonnet-4-5", "claude-haiku-4-5"],
        "azureOpenAI": ["gpt-4o", "gpt-4o-mini"],
        "assistants": ["gpt-4o", "gpt-4o-mini"],
        "azureAssistants": ["gpt-4o", "gpt-4o-mini"],
        "bedrock": ["anthropic.claude-sonnet-4-5-20250929-v1:0"],
        FAKE_ENDPOINT: [FAKE_MODEL],
    })
}

// ---------------------------------------------------------------------------------------------
// Agents: chat, streams, abort
// ---------------------------------------------------------------------------------------------

struct GateShared {
    released: watch::Sender<bool>,
    reached: watch::Sender<bool>,
}

/// One generation. It runs on its own task, independent of any HTTP connection; frames are kept
/// so the first subscriber gets everything produced before it arrived. The job disappears once a
/// subscriber has been sent the final frame, or `JOB_LINGER` after it finished unobserved (the
/// real server's grace for a late subscriber is not recorded; a later GET gets 404).
struct Job {
    stream_id: String,
    user_id: String,
    created_at_ms: u64,
    gate: Option<Arc<GateShared>>,
    abort: watch::Sender<bool>,
    progress: watch::Sender<u64>,
    inner: Mutex<JobInner>,
}

struct JobInner {
    frames: Vec<Bytes>,
    done: bool,
    subscribed: bool,
    aggregated: String,
    run_step: Option<Value>,
    user_message: Value,
    response_message_id: String,
    sender: String,
    model: String,
}

impl Job {
    fn push(&self, data: &Value, done: bool) {
        {
            let mut inner = lock(&self.inner);
            inner.frames.push(Bytes::from(sse_frame("message", data)));
            inner.done |= done;
        }
        self.progress.send_modify(|n| *n += 1);
    }

    fn resume_state(&self) -> Value {
        let inner = lock(&self.inner);
        let user = &inner.user_message;
        json!({
            "runSteps": inner.run_step.iter().cloned().collect::<Vec<_>>(),
            "aggregatedContent": [{"type": "text", "text": inner.aggregated}],
            "userMessage": {
                "messageId": user.get("messageId"),
                "parentMessageId": user.get("parentMessageId"),
                "conversationId": user.get("conversationId"),
                "text": user.get("text"),
            },
            "responseMessageId": inner.response_message_id,
            "conversationId": self.stream_id,
            "sender": inner.sender,
            "model": inner.model,
            "contextUsage": context_usage(&inner.response_message_id, &inner.sender, &inner.model),
        })
    }
}

struct Turn {
    user_id: String,
    conversation_id: String,
    endpoint: String,
    model: String,
    text: String,
    user_message: Value,
    response_message_id: String,
    /// Set on the first turn of a new conversation: the title generated for it.
    title: Option<String>,
    gap: Duration,
}

async fn agents(shared: &Arc<Shared>, ctx: &Ctx, user: &User, tail: &[&str]) -> Response<Body> {
    match (ctx.method.clone(), tail) {
        (Method::GET, []) => json_reply(
            StatusCode::OK,
            &json!({"object": "list", "data": [], "first_id": null, "last_id": null,
                    "has_more": false, "after": null}),
        ),
        (Method::POST, ["chat", "abort"]) => abort_chat(shared, ctx, user).await,
        (Method::GET, ["chat", "active"]) => {
            let ids: Vec<String> = lock(&shared.jobs)
                .values()
                .filter(|j| j.user_id == user.id && !lock(&j.inner).done)
                .map(|j| j.stream_id.clone())
                .collect();
            json_reply(StatusCode::OK, &json!({ "activeJobIds": ids }))
        }
        (Method::GET, ["chat", "status", conversation_id]) => {
            let job = lock(&shared.jobs).get(*conversation_id).cloned();
            match job.filter(|j| j.user_id == user.id && !lock(&j.inner).done) {
                Some(job) => {
                    let state = job.resume_state();
                    json_reply(
                        StatusCode::OK,
                        &json!({
                            "active": true,
                            "streamId": job.stream_id,
                            "status": "running",
                            "aggregatedContent": state["aggregatedContent"].clone(),
                            "createdAt": job.created_at_ms,
                            "resumeState": state,
                        }),
                    )
                }
                None => json_reply(StatusCode::OK, &json!({"active": false})),
            }
        }
        (Method::GET, ["chat", "stream", stream_id]) => open_stream(shared, ctx, user, stream_id),
        (Method::POST, ["chat", endpoint]) => start_chat(shared, ctx, user, endpoint),
        _ => endpoint_not_found(),
    }
}

fn start_chat(shared: &Arc<Shared>, ctx: &Ctx, user: &User, endpoint: &str) -> Response<Body> {
    let body = ctx.body();
    let text = body.get("text").and_then(Value::as_str).map(str::to_owned);
    let endpoint_type = body.get("endpointType").and_then(Value::as_str);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    // Turn errors come back as HTTP 200 with an SSE-formatted `event: error` body (handleError),
    // not as 4xx. The exact wording is UNCONFIRMED.
    let turn_error =
        |msg: &str| raw_chunked(StatusCode::OK, sse_frame("error", &json!({"text": msg})));
    let Some(text) = text else {
        return turn_error("Prompt is required.");
    };
    if endpoint != "agents" && endpoint_type.is_none() {
        return turn_error("Error building endpoint option");
    }
    if endpoint == FAKE_ENDPOINT && model != FAKE_MODEL {
        return turn_error(&format!("Model {model} not found for endpoint {endpoint}"));
    }
    let conversation_id = match body.get("conversationId").and_then(Value::as_str) {
        Some(id) if id != "new" && !id.is_empty() => id.to_owned(),
        _ => uuid4(),
    };
    let parent_message_id = body
        .get("parentMessageId")
        .and_then(Value::as_str)
        .unwrap_or(NO_PARENT)
        .to_owned();
    let now = now_ms();
    let agent_id = format!("{endpoint}__{model}___{endpoint}");
    let mut db = lock(&shared.db);
    let is_new = match db.convo(&conversation_id) {
        Some(c) if c.user_id != user.id => {
            // UNCONFIRMED body: validateConvoAccess refuses someone else's conversation.
            return json_reply(
                StatusCode::FORBIDDEN,
                &json!({"message": "You do not have access to this conversation"}),
            );
        }
        Some(_) => false,
        None => true,
    };
    if is_new {
        let mut doc = Map::new();
        doc.insert("_id".into(), json!(shared.oid.next()));
        doc.insert("conversationId".into(), json!(conversation_id));
        doc.insert("user".into(), json!(user.id));
        doc.insert("endpoint".into(), json!(endpoint));
        doc.insert("endpointType".into(), json!(endpoint_type));
        doc.insert("agent_id".into(), json!(agent_id));
        doc.insert("resendFiles".into(), json!(true));
        doc.insert("maxContextTokens".into(), json!(30400));
        doc.insert("model".into(), json!(model));
        doc.insert("messages".into(), json!([]));
        doc.insert("updatedAt".into(), json!(iso(now)));
        doc.insert("createdAt".into(), json!(iso(now)));
        doc.insert("__v".into(), json!(0));
        doc.insert("title".into(), json!("New Chat"));
        doc.insert("isTemporary".into(), json!(false));
        doc.insert("isArchived".into(), json!(false));
        doc.insert("tags".into(), json!([]));
        doc.insert("chatProjectId".into(), Value::Null);
        doc.insert("files".into(), json!([]));
        db.convos.push(Convo {
            user_id: user.id.clone(),
            doc,
        });
    }
    // The client's messageId is a placeholder; the stored id is the server's.
    let message_id = uuid4();
    let token_count = text.split_whitespace().count().max(1) * 2;
    let user_message = json!({
        "messageId": message_id,
        "parentMessageId": parent_message_id,
        "conversationId": conversation_id,
        "sender": "User",
        "text": text,
        "isCreatedByUser": true,
        "tokenCount": token_count,
    });
    let stored = json!({
        "messageId": message_id,
        "updatedAt": iso(now),
        "unfinished": false,
        "endpoint": endpoint,
        "tokenCount": token_count,
        "isCreatedByUser": true,
        "text": text,
        "sender": "User",
        "conversationId": conversation_id,
        "parentMessageId": parent_message_id,
        "createdAt": iso(now),
        "model": null,
        "isTemporary": false,
        "error": false,
    });
    let object_id = shared.oid.next();
    if let Some(convo) = db.convo_mut(&conversation_id) {
        if let Some(Value::Array(ids)) = convo.doc.get_mut("messages") {
            ids.push(json!(object_id));
        }
    }
    db.messages.push(StoredMessage {
        conversation_id: conversation_id.clone(),
        doc: stored,
    });
    drop(db);

    let response_message_id = uuid4();
    let job = Arc::new(Job {
        stream_id: conversation_id.clone(),
        user_id: user.id.clone(),
        created_at_ms: now,
        gate: lock(&shared.pending_gate).take(),
        abort: watch::channel(false).0,
        progress: watch::channel(0).0,
        inner: Mutex::new(JobInner {
            frames: Vec::new(),
            done: false,
            subscribed: false,
            aggregated: String::new(),
            run_step: None,
            user_message: user_message.clone(),
            response_message_id: response_message_id.clone(),
            sender: endpoint.to_owned(),
            model: model.clone(),
        }),
    });
    // streamId == conversationId: a new turn in a conversation replaces a still-running one.
    if let Some(previous) = lock(&shared.jobs).insert(conversation_id.clone(), job.clone()) {
        previous.abort.send_replace(true);
    }
    let title = is_new.then(|| {
        let words: Vec<&str> = text.split_whitespace().take(4).collect();
        format!("Fake Title About {}", words.join(" "))
    });
    let turn = Turn {
        user_id: user.id.clone(),
        conversation_id: conversation_id.clone(),
        endpoint: endpoint.to_owned(),
        model,
        text,
        user_message,
        response_message_id,
        title,
        gap: shared.opts().sse_frame_interval,
    };
    tokio::spawn(generate(shared.clone(), job, turn));
    json_reply(
        StatusCode::OK,
        &json!({"streamId": conversation_id, "conversationId": conversation_id,
                "status": "started"}),
    )
}

/// Waits `gap`, or less if the job is aborted meanwhile; true when aborted.
async fn pause(abort: &mut watch::Receiver<bool>, gap: Duration) -> bool {
    if *abort.borrow() {
        return true;
    }
    let slept = tokio::select! {
        _ = tokio::time::sleep(gap) => true,
        _ = abort.wait_for(|a| *a) => false,
    };
    !slept || *abort.borrow()
}

async fn generate(shared: Arc<Shared>, job: Arc<Job>, turn: Turn) {
    let mut abort = job.abort.subscribe();
    let run_id = turn.response_message_id.clone();
    let step_id = format!("step_{}", &uuid4().replace('-', "")[..21]);
    let started = now_ms();

    job.push(
        &json!({"created": true, "message": turn.user_message, "streamId": job.stream_id}),
        false,
    );
    let mut aborted = pause(&mut abort, turn.gap).await;
    if !aborted {
        job.push(
            &json!({"event": "on_context_usage",
                    "data": context_usage(&run_id, &turn.endpoint, &turn.model)}),
            false,
        );
        aborted = pause(&mut abort, turn.gap).await;
    }
    if !aborted {
        let step = json!({
            "stepIndex": 0,
            "id": step_id,
            "type": "message_creation",
            "index": 0,
            "stepDetails": {"type": "message_creation",
                "message_creation": {"message_id": format!("msg_{}", &uuid4()[..8]),
                                     "content_type": "text"}},
            "usage": null,
            "status": "in_progress",
            "runId": run_id,
            "created_at": started,
        });
        lock(&job.inner).run_step = Some(step.clone());
        job.push(&json!({"event": "on_run_step", "data": step}), false);
        aborted = pause(&mut abort, turn.gap).await;
    }
    let reply = format!("echo: {}", turn.text);
    let chars: Vec<char> = reply.chars().collect();
    for (i, chunk) in chars.chunks(4).enumerate() {
        if aborted {
            break;
        }
        let piece: String = chunk.iter().collect();
        lock(&job.inner).aggregated.push_str(&piece);
        job.push(
            &json!({"event": "on_message_delta", "data": {"id": step_id,
                    "delta": {"content": [{"type": "text", "text": piece}]}}}),
            false,
        );
        // The title arrives interleaved with the deltas, on the first turn only.
        if i == 0 {
            if let Some(title) = &turn.title {
                job.push(
                    &json!({"event": "title", "data": {"conversationId": turn.conversation_id,
                            "title": title}}),
                    false,
                );
            }
        }
        aborted = pause(&mut abort, turn.gap).await;
    }
    let output_tokens = reply.split_whitespace().count();
    let input_tokens = turn.text.split_whitespace().count() * 2 + 4;
    if !aborted {
        job.push(
            &json!({"event": "on_token_usage", "data": {
                "input_tokens": input_tokens, "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens, "model": turn.model,
                "provider": "openAI", "runId": run_id, "seq": 1}}),
            false,
        );
    }
    if !aborted {
        if let Some(gate) = &job.gate {
            gate.reached.send_replace(true);
            let mut released = gate.released.subscribe();
            aborted = tokio::select! {
                _ = released.wait_for(|r| *r) => false,
                _ = abort.wait_for(|a| *a) => true,
            };
        }
    }
    let final_frame = finish_turn(&shared, &job, &turn, aborted, output_tokens);
    job.push(&final_frame, true);
    // Nobody may ever subscribe: drop the job after a grace period.
    let shared_for_cleanup = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(JOB_LINGER).await;
        shared_for_cleanup.remove_job_if_same(&job);
    });
}

/// Saves the assistant message and builds the `final` frame.
fn finish_turn(shared: &Shared, job: &Job, turn: &Turn, aborted: bool, tokens: usize) -> Value {
    let now = now_ms();
    let aggregated = lock(&job.inner).aggregated.clone();
    let content = json!([{"type": "text", "text": aggregated}]);
    let user_msg_id = turn.user_message["messageId"].clone();
    let object_id = shared.oid.next();
    let mut db = lock(&shared.db);
    // The stored message says unfinished:false even after an abort (as recorded).
    let mut stored = json!({
        "messageId": turn.response_message_id,
        "updatedAt": iso(now),
        "unfinished": false,
        "attachments": [],
        "tokenCount": tokens,
        "content": content,
        "text": "",
        "endpoint": turn.endpoint,
        "sender": turn.endpoint,
        "model": turn.model,
        "isCreatedByUser": false,
        "parentMessageId": user_msg_id,
        "conversationId": turn.conversation_id,
        "createdAt": iso(now),
        "isTemporary": false,
        "error": false,
    });
    if !aborted {
        if let Some(obj) = stored.as_object_mut() {
            obj.insert("metadata".into(), message_metadata(turn, tokens));
        }
    }
    db.messages.push(StoredMessage {
        conversation_id: turn.conversation_id.clone(),
        doc: stored,
    });
    let convo = db.convo_mut(&turn.conversation_id);
    let Some(convo) = convo.filter(|c| c.user_id == turn.user_id) else {
        // Deleted while generating: still close the stream properly.
        return json!({"final": true, "conversation": {"conversationId": turn.conversation_id},
                      "title": "New Chat", "requestMessage": turn.user_message,
                      "responseMessage": {"messageId": turn.response_message_id}});
    };
    if let Some(Value::Array(ids)) = convo.doc.get_mut("messages") {
        ids.push(json!(object_id));
    }
    convo.doc.insert("updatedAt".into(), json!(iso(now)));
    if aborted {
        return json!({
            "final": true,
            "conversation": {"conversationId": turn.conversation_id},
            "title": "New Chat",
            "requestMessage": {
                "messageId": user_msg_id,
                "parentMessageId": turn.user_message["parentMessageId"],
                "conversationId": turn.conversation_id,
                "text": turn.text,
                "isCreatedByUser": true,
            },
            "responseMessage": {
                "messageId": turn.response_message_id,
                "parentMessageId": user_msg_id,
                "conversationId": turn.conversation_id,
                "content": content,
                "sender": turn.endpoint,
                "endpoint": turn.endpoint,
                "model": turn.model,
                "unfinished": true,
                "error": false,
                "isCreatedByUser": false,
            },
            "aborted": true,
            "earlyAbort": false,
        });
    }
    // The final frame shows the conversation as it was before the title landed ("New Chat").
    let snapshot = Value::Object(convo.doc.clone());
    let title = snapshot["title"].clone();
    if let Some(generated) = &turn.title {
        convo.doc.insert("title".into(), json!(generated));
    }
    json!({
        "final": true,
        "conversation": snapshot,
        "title": title,
        "requestMessage": turn.user_message,
        "responseMessage": {
            "messageId": turn.response_message_id,
            "conversationId": turn.conversation_id,
            "parentMessageId": user_msg_id,
            "isCreatedByUser": false,
            "isEdited": false,
            "model": turn.model,
            "sender": turn.endpoint,
            "promptTokens": tokens,
            "endpoint": turn.endpoint,
            "metadata": message_metadata(turn, tokens),
            "text": "",
            "content": content,
            "tokenCount": tokens,
            "attachments": [],
        },
    })
}

fn context_usage(run_id: &str, endpoint: &str, model: &str) -> Value {
    json!({
        "runId": run_id,
        "agentId": format!("{endpoint}__{model}___{endpoint}"),
        "breakdown": {"maxContextTokens": 30400, "messageCount": 1},
        "contextBudget": 28880,
        "remainingContextTokens": 28866,
    })
}

fn message_metadata(turn: &Turn, tokens: usize) -> Value {
    json!({
        "contextUsage": context_usage(&turn.response_message_id, &turn.endpoint, &turn.model),
        "usage": {"input": tokens, "output": tokens, "cacheWrite": 0, "cacheRead": 0},
    })
}

fn open_stream(shared: &Arc<Shared>, ctx: &Ctx, user: &User, stream_id: &str) -> Response<Body> {
    let Some(job) = lock(&shared.jobs).get(stream_id).cloned() else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "Stream not found",
                    "message": "The generation job does not exist or has expired."}),
        );
    };
    if job.user_id != user.id {
        return json_reply(StatusCode::FORBIDDEN, &json!({"error": "Unauthorized"}));
    }
    let resume = ctx.query.get("resume").is_some_and(|v| v == "true");
    let (start, sync) = {
        let mut inner = lock(&job.inner);
        let first = !inner.subscribed;
        inner.subscribed = true;
        if resume {
            (inner.frames.len(), true)
        } else if first {
            // Everything produced before the first subscriber arrived is replayed to it.
            (0, false)
        } else {
            (inner.frames.len(), false)
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    if sync {
        let frame = sse_frame(
            "message",
            &json!({"sync": true, "resumeState": job.resume_state()}),
        );
        // The channel is fresh and has room: this cannot block or fail.
        let _ = tx.try_send(Bytes::from(frame));
    }
    tokio::spawn(forward_frames(shared.clone(), job, start, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    set_header(h, "content-type", "text/event-stream");
    set_header(h, "cache-control", "no-cache, no-transform");
    set_header(h, "content-encoding", "identity");
    set_header(h, "x-accel-buffering", "no");
    set_header(h, "connection", "keep-alive");
    resp
}

/// Copies a job's frames to one subscriber, frame by frame, as they are produced.
async fn forward_frames(
    shared: Arc<Shared>,
    job: Arc<Job>,
    mut next: usize,
    tx: mpsc::Sender<Bytes>,
) {
    let mut progress = job.progress.subscribe();
    loop {
        progress.borrow_and_update();
        let (batch, done) = {
            let inner = lock(&job.inner);
            (
                inner.frames[next.min(inner.frames.len())..].to_vec(),
                inner.done,
            )
        };
        for frame in batch {
            if tx.send(frame).await.is_err() {
                return; // the client went away; the generation goes on
            }
            next += 1;
        }
        if done {
            // Delivered the final frame: the job is over for everyone.
            shared.remove_job_if_same(&job);
            return;
        }
        if progress.changed().await.is_err() {
            return;
        }
    }
}

async fn abort_chat(shared: &Arc<Shared>, ctx: &Ctx, user: &User) -> Response<Body> {
    let body = ctx.body();
    let id = ["streamId", "conversationId", "abortKey"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .map(|id| id.split(':').next().unwrap_or(id).to_owned())
        .unwrap_or_default();
    let job = lock(&shared.jobs).get(&id).cloned();
    let Some(job) = job.filter(|j| j.user_id == user.id && !lock(&j.inner).done) else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "Job not found", "streamId": id}),
        );
    };
    job.abort.send_replace(true);
    // Answer once the partial response is saved and the final frame is out.
    let mut progress = job.progress.subscribe();
    let finished = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if lock(&job.inner).done {
                return;
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    if finished.is_err() {
        return json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": "Abort timed out"}),
        );
    }
    json_reply(
        StatusCode::OK,
        &json!({"success": true, "aborted": job.stream_id}),
    )
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

async fn files(shared: &Arc<Shared>, ctx: &mut Ctx, user: &User, tail: &[&str]) -> Response<Body> {
    match (ctx.method.clone(), tail) {
        (Method::GET, []) => {
            let db = lock(&shared.db);
            // Newest first.
            let list: Vec<Value> = db
                .files
                .iter()
                .rev()
                .filter(|f| f.user_id == user.id)
                .map(|f| Value::Object(f.doc.clone()))
                .collect();
            json_reply(StatusCode::OK, &Value::Array(list))
        }
        // No fileConfig in librechat.yaml → `res.json(undefined)`: JSON type, empty body.
        (Method::GET, ["config"]) => {
            let mut resp = raw_chunked(StatusCode::OK, String::new());
            set_header(resp.headers_mut(), "content-type", JSON_CT);
            resp
        }
        (Method::POST, []) => upload(shared, ctx, user, false).await,
        (Method::POST, ["images"]) => upload(shared, ctx, user, true).await,
        _ => endpoint_not_found(),
    }
}

#[derive(Default)]
struct ParsedUpload {
    field_names: Vec<String>,
    text: HashMap<String, String>,
    file_name: Option<String>,
    file_content_type: Option<String>,
    file_bytes: u64,
    sha256: String,
    has_file: bool,
    /// Set when the `file` part arrived before any `endpoint` field.
    order_violation: bool,
    /// multer/busboy errors: a second or unexpected file field, a broken body.
    multer_error: bool,
}

async fn upload(shared: &Arc<Shared>, ctx: &mut Ctx, user: &User, image: bool) -> Response<Body> {
    let path = ctx.path.clone();
    let ip_limit = lock(&shared.limits).file_ip.hit(&ctx.ip);
    if ip_limit.limited {
        return ip_limit.with(json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"message": "Too many file upload requests. Try again later"}),
        ));
    }
    let user_limit = lock(&shared.limits).file_user.hit(&user.id);
    if user_limit.limited {
        return user_limit.with(json_reply(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"message": "Too many file upload requests. Try again later"}),
        ));
    }
    let strict = shared.opts().strict_upload_field_order;
    let parsed = parse_multipart(ctx, strict).await;
    let resp = user_limit.with(process_upload(shared, user, image, &parsed));
    lock(&shared.uploads).push(RecordedUpload {
        path,
        field_names: parsed.field_names,
        file_name: parsed.file_name,
        file_content_type: parsed.file_content_type,
        file_bytes: parsed.file_bytes,
        sha256: parsed.sha256,
        status: resp.status().as_u16(),
    });
    resp
}

/// Streams the multipart body: text parts are kept, the file part is only counted and hashed, so
/// an upload of any size needs constant memory.
async fn parse_multipart(ctx: &mut Ctx, strict_order: bool) -> ParsedUpload {
    let mut out = ParsedUpload {
        sha256: sha256_hex(b""),
        ..ParsedUpload::default()
    };
    let boundary = ctx
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let (Some(boundary), Some(raw)) = (boundary, ctx.raw.take()) else {
        // Not multipart: multer leaves req.file unset and the route fails later.
        return out;
    };
    let mut multipart = multer::Multipart::new(Body::new(raw).into_data_stream(), boundary);
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(_) => {
                out.multer_error = true;
                break;
            }
        };
        let name = field.name().unwrap_or("").to_owned();
        out.field_names.push(name.clone());
        if let Some(file_name) = field.file_name().map(str::to_owned) {
            // upload.single('file'): any other file field, or a second one, is a MulterError.
            let is_the_file = name == "file" && !out.has_file;
            if is_the_file {
                out.has_file = true;
                out.file_name = Some(file_name);
                out.file_content_type = field.content_type().map(|m| m.to_string());
                // fileFilter reads req.body.endpoint while the file streams in.
                if strict_order && !out.text.contains_key("endpoint") {
                    out.order_violation = true;
                }
            } else {
                out.multer_error = true;
            }
            let mut hasher = Sha256::new();
            let mut bytes = 0u64;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        hasher.update(&chunk);
                        bytes += chunk.len() as u64;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        out.multer_error = true;
                        break;
                    }
                }
            }
            if is_the_file {
                out.file_bytes = bytes;
                out.sha256 = hex(&hasher.finalize());
            }
        } else {
            let mut value = Vec::new();
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        let room = MAX_TEXT_FIELD.saturating_sub(value.len());
                        value.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        out.multer_error = true;
                        break;
                    }
                }
            }
            out.text
                .insert(name, String::from_utf8_lossy(&value).into_owned());
        }
        if out.multer_error {
            break;
        }
    }
    out
}

fn process_upload(shared: &Shared, user: &User, image: bool, up: &ParsedUpload) -> Response<Body> {
    if up.multer_error {
        // MulterError → ErrorController's generic answer.
        return text(StatusCode::INTERNAL_SERVER_ERROR, UNKNOWN_ERROR);
    }
    let failed = || {
        json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"message": "Error processing file"}),
        )
    };
    let field = |k: &str| up.text.get(k).filter(|v| !v.is_empty());
    // filterFile
    let client_file_id = field("file_id");
    if !up.has_file
        || up.order_violation
        || up.file_bytes == 0
        || client_file_id.is_none_or(|id| uuid::Uuid::parse_str(id).is_err())
        || field("endpoint").is_none()
    {
        return failed();
    }
    let content_type = up
        .file_content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    let (width, height) = (
        field("width").and_then(|w| w.parse::<u64>().ok()),
        field("height").and_then(|h| h.parse::<u64>().ok()),
    );
    if image && (width.is_none() || height.is_none() || !content_type.starts_with("image/")) {
        return failed();
    }
    // processAgentFileUpload: without message_file (any non-empty value is truthy) a file must
    // name an agent, and an agent file must name a tool resource.
    let message_file = field("message_file").is_some();
    if !image && !message_file && (field("agent_id").is_none() || field("tool_resource").is_none())
    {
        return failed();
    }
    let now = iso(now_ms());
    let file_id = uuid4();
    let file_name = up.file_name.clone().unwrap_or_default();
    let dir = if content_type.starts_with("image/") {
        "images"
    } else {
        "uploads"
    };
    let mut doc = Map::new();
    doc.insert("_id".into(), json!(shared.oid.next()));
    doc.insert("file_id".into(), json!(file_id));
    doc.insert("updatedAt".into(), json!(now));
    if image {
        doc.insert("height".into(), json!(height));
        doc.insert("width".into(), json!(width));
    }
    doc.insert("type".into(), json!(content_type));
    doc.insert("source".into(), json!("local"));
    doc.insert("context".into(), json!("message_attachment"));
    doc.insert("filename".into(), json!(file_name));
    doc.insert(
        "filepath".into(),
        json!(format!("/{dir}/{}/{file_id}__{file_name}", user.id)),
    );
    // The real server reports the stored size (re-encoded for images); the fake stores nothing.
    doc.insert("bytes".into(), json!(up.file_bytes));
    doc.insert("temp_file_id".into(), json!(client_file_id));
    doc.insert("user".into(), json!(user.id));
    doc.insert("__v".into(), json!(0));
    doc.insert("createdAt".into(), json!(now));
    doc.insert("object".into(), json!("file"));
    doc.insert("usage".into(), json!(0));
    lock(&shared.db).files.push(StoredFile {
        user_id: user.id.clone(),
        doc: doc.clone(),
    });
    let message = if image {
        "File uploaded and processed successfully"
    } else {
        "Agent file uploaded and processed successfully"
    };
    doc.insert("message".into(), json!(message));
    json_reply(StatusCode::OK, &Value::Object(doc))
}

// ---------------------------------------------------------------------------------------------
// Validation (zod-like)
// ---------------------------------------------------------------------------------------------

struct Registration {
    name: String,
    username: Option<String>,
    email: String,
    password: String,
}

fn zod_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `z.string().min(min).max(max)`: pushes zod's messages for `key`, returns the string if it is
/// one.
fn zod_string(
    body: &Value,
    key: &str,
    min: Option<usize>,
    max: Option<usize>,
    issues: &mut Vec<(String, String)>,
) -> Option<String> {
    match body.get(key) {
        None => {
            issues.push((key.into(), "Required".into()));
            None
        }
        Some(Value::String(s)) => {
            let len = s.chars().count();
            if let Some(min) = min.filter(|m| len < *m) {
                issues.push((
                    key.into(),
                    format!("String must contain at least {min} character(s)"),
                ));
            }
            if let Some(max) = max.filter(|m| len > *m) {
                issues.push((
                    key.into(),
                    format!("String must contain at most {max} character(s)"),
                ));
            }
            Some(s.clone())
        }
        Some(other) => {
            issues.push((
                key.into(),
                format!("Expected string, received {}", zod_type(other)),
            ));
            None
        }
    }
}

/// LibreChat's errorsToString: `"<path>: <message>"` joined by spaces (a root issue has an empty
/// path, hence `": The passwords did not match"`).
fn errors_to_string(issues: &[(String, String)]) -> String {
    issues
        .iter()
        .map(|(path, msg)| format!("{path}: {msg}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn validate_registration(body: &Value) -> Result<Registration, String> {
    let mut issues = Vec::new();
    let name = zod_string(body, "name", Some(3), Some(80), &mut issues);
    let username = match body.get("username") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            let len = s.chars().count();
            // Approximation of the script whitelist and the injection blacklist.
            let allowed = |c: char| c.is_alphanumeric() || "_.@#$%&*()-".contains(c);
            let injection = [
                "'", "--", "$ne", "$gt", "$lt", "$or", "{", "}", ";", "<", ">", "/", "=",
            ]
            .iter()
            .any(|p| s.contains(p));
            if !(2..=80).contains(&len) || !s.chars().all(allowed) || injection {
                issues.push(("username".into(), "Invalid input".into()));
            }
            Some(s.clone())
        }
        Some(other) => {
            issues.push((
                "username".into(),
                format!("Expected string, received {}", zod_type(other)),
            ));
            None
        }
    };
    let email = zod_string(body, "email", None, None, &mut issues);
    if email.as_deref().is_some_and(|e| !is_valid_email(e)) {
        issues.push(("email".into(), "Invalid email".into()));
    }
    let password_rules = |key: &str, issues: &mut Vec<(String, String)>| {
        let value = zod_string(body, key, Some(8), Some(128), issues);
        if value.as_deref().is_some_and(|p| p.trim().is_empty()) {
            issues.push((key.into(), "Password cannot be only spaces".into()));
        }
        value
    };
    let password = password_rules("password", &mut issues);
    let confirm = password_rules("confirm_password", &mut issues);
    // The object-level refinement only runs when every field parsed.
    if issues.is_empty() && password != confirm {
        issues.push((String::new(), "The passwords did not match".into()));
    }
    if !issues.is_empty() {
        return Err(errors_to_string(&issues));
    }
    Ok(Registration {
        name: name.unwrap_or_default(),
        username,
        email: email.unwrap_or_default().trim().to_lowercase(),
        password: password.unwrap_or_default(),
    })
}

/// zod's email check: a local part of `[A-Za-z0-9_'+\-.]` not starting with a dot, without
/// `..`, ending in `[A-Za-z0-9_+-]`; a dotted domain whose last label is 2+ letters.
fn is_valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && !local.starts_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_'+-.".contains(c))
        && local
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || "_+-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels[..labels.len() - 1].iter().all(|l| {
            l.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    local_ok && domain_ok
}

fn js_truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn json_reply(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(value.to_string()));
    *resp.status_mut() = status;
    set_header(resp.headers_mut(), "content-type", JSON_CT);
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_owned()));
    *resp.status_mut() = status;
    set_header(resp.headers_mut(), "content-type", HTML_CT);
    resp
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// A body written with raw `res.write`: no Content-Type, chunked transfer encoding.
fn raw_chunked(status: StatusCode, body: String) -> Response<Body> {
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(Bytes::from(body)) });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    resp
}

fn redirect_to_login() -> Response<Body> {
    let mut resp = Response::new(Body::from("Found. Redirecting to /login"));
    *resp.status_mut() = StatusCode::FOUND;
    set_header(resp.headers_mut(), "location", "/login");
    set_header(
        resp.headers_mut(),
        "content-type",
        "text/plain; charset=utf-8",
    );
    resp
}

/// v0.8.7 answers unknown `/api/...` routes with its API 404 handler (recorded for
/// `GET /api/auth/refresh`), not with the SPA page.
fn endpoint_not_found() -> Response<Body> {
    json_reply(
        StatusCode::NOT_FOUND,
        &json!({"message": "Endpoint not found"}),
    )
}

/// Any non-API path gets the client's index.html.
fn spa_index() -> Response<Body> {
    text(
        StatusCode::OK,
        "<!DOCTYPE html><html lang=\"en-US\"><head><meta charset=\"utf-8\"><base href=\"/\" />\
         <title>LibreChat</title></head><body><div id=\"root\"></div></body></html>",
    )
}

fn sse_frame(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn set_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

fn append_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.append(name, value);
    }
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(q) = query {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
    }
    out
}

/// Express with `trust proxy` 1: the right-most `X-Forwarded-For` entry when the header is there,
/// else the socket peer; port stripped and IPv6 reduced to its /56 like `removePorts`.
fn client_ip(headers: &HeaderMap, peer: SocketAddr) -> String {
    let forwarded: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    match forwarded.last() {
        Some(last) => ip_key(last),
        None => ip_key(&peer.ip().to_string()),
    }
}

fn ip_key(raw: &str) -> String {
    let raw = raw.trim();
    let ip = raw
        .parse::<IpAddr>()
        .ok()
        .or_else(|| raw.parse::<SocketAddr>().ok().map(|s| s.ip()));
    match ip {
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let seg = v6.segments();
                let masked = Ipv6Addr::new(seg[0], seg[1], seg[2], seg[3] & 0xff00, 0, 0, 0, 0);
                format!("{masked}/56")
            }
        },
        Some(IpAddr::V4(v4)) => v4.to_string(),
        None => raw.to_owned(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `Date.toISOString()`: `2026-11-22T10:23:30.237Z`.
fn iso(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn uuid4() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Passwords are only compared; a digest keeps them out of any debug output.
fn hash_password(password: &str) -> String {
    sha256_hex(password.as_bytes())
}
