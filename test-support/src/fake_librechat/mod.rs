//! An in-process fake of an unmodified LibreChat v0.8.7 API server, for integration tests.
//!
//! It is a real HTTP/1.1 server on `127.0.0.1:<ephemeral port>` that follows
//! `shared/librechat-contract.md` and the exchanges recorded from a real server in
//! `tests/fixtures/librechat-transcripts/` (statuses, content types, Set-Cookie attributes, body
//! shapes, limiter and ban behaviour). `tests/api/librechat_conformance.rs` replays those
//! recordings against it. Where it knowingly differs from the real server, the difference is
//! documented on the option or item concerned and named in the conformance test.
//!
//! Everything is in memory and per instance: users, sessions, conversations, messages, files,
//! limiter windows and bans. Secrets are random per instance and never leave the process.
//!
//! This file is the public API; the server, its state and the routes live in the submodules, one
//! per concern (`server` parses a request and routes it to them).

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

mod auth;
mod chat;
mod convos;
mod files;
mod limits;
mod server;
mod spa;
mod state;
mod util;
mod validation;

use self::{
    auth::*, chat::*, convos::*, files::*, limits::*, server::*, state::*, util::*, validation::*,
};

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
    /// `secureImageLinks` (librechat.yaml): `/images/*` only with the owner's refresh cookie
    /// (default false, as LibreChat's default).
    pub secure_image_links: bool,
    /// A built web client to serve outside `/api` (default none: the built-in shell of `spa.rs`).
    /// When set, a GET of a path naming a file in this directory gets that file (content type by
    /// extension), and of every other path (but `/images/*`) its `index.html`, as LibreChat
    /// serves `client/dist` with its single-page-app fallback.
    pub spa_dir: Option<std::path::PathBuf>,
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
            secure_image_links: false,
            spa_dir: None,
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
