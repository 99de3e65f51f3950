//! A fake identity service that behaves like Django REST framework + djangorestframework-simplejwt
//! with `ROTATE_REFRESH_TOKENS = True` and `BLACKLIST_AFTER_ROTATION = True` (both switchable).
//!
//! It is a real HTTP server on `127.0.0.1:<ephemeral port>`:
//! - `POST /api/token/` (`TokenObtainPairView`): `{username|email, password}` → `{access, refresh}`;
//! - `POST /api/token/refresh/` (`TokenRefreshView`): `{refresh}` → `{access, refresh}`;
//! - `GET /.well-known/jwks.json`: the current RS256 public key (RS256 mode only).
//!
//! Status codes, headers and error bodies are DRF's and SimpleJWT's. Tokens carry SimpleJWT's
//! claims (`token_type`, `exp`, `iat`, `jti`, `user_id` as a string) plus the `email`, `name` and
//! `groups` claims Django apps commonly add in `get_token`, and `iss`/`aud` when configured.
//!
//! One deliberate difference: checking and blacklisting a refresh token is atomic here, whereas
//! Django has a small window in which two concurrent refreshes with the same token can both
//! succeed. Tests therefore catch any duplicate refresh, not just the unlucky ones.
//!
//! RS256 keys are the pre-generated test keys in `tests/fixtures/keys/` (generating RSA keys at
//! run time is slow in debug builds).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngExt as _;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const NO_ACTIVE_ACCOUNT: &str = "No active account found with the given credentials";
const TOKEN_INVALID: &str = "Token is invalid or expired";
const TOKEN_BLACKLISTED: &str = "Token is blacklisted";
const TOKEN_WRONG_TYPE: &str = "Token has wrong type";
const TOKEN_NO_ID: &str = "Token has no id";
const FIELD_REQUIRED: &str = "This field is required.";
/// `AUTH_HEADER_TYPES[0]` and `TokenViewBase.www_authenticate_realm`: DRF turns a 401 without
/// this header into a 403, so SimpleJWT's token views always send it.
const WWW_AUTHENTICATE: &str = "Bearer realm=\"api\"";
/// Django's production 404 page (`DEBUG = False`).
const DJANGO_404: &str =
    "<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n\
    </head>\n<body>\n  <h1>Not Found</h1><p>The requested resource was not found on this server.\
    </p>\n</body>\n</html>\n";

/// A pre-generated test keypair (see `tests/fixtures/keys/README.md`).
struct TestKey {
    private_pem: &'static str,
    public_pem: &'static str,
    /// `{"kty":"RSA","n":..,"e":..}`, precomputed from the PEM.
    jwk: &'static str,
}

const TEST_KEYS: [TestKey; 3] = [
    TestKey {
        private_pem: include_str!("../../tests/fixtures/keys/idp-rsa-1.pem"),
        public_pem: include_str!("../../tests/fixtures/keys/idp-rsa-1.pub.pem"),
        jwk: include_str!("../../tests/fixtures/keys/idp-rsa-1.jwk.json"),
    },
    TestKey {
        private_pem: include_str!("../../tests/fixtures/keys/idp-rsa-2.pem"),
        public_pem: include_str!("../../tests/fixtures/keys/idp-rsa-2.pub.pem"),
        jwk: include_str!("../../tests/fixtures/keys/idp-rsa-2.jwk.json"),
    },
    TestKey {
        private_pem: include_str!("../../tests/fixtures/keys/idp-rsa-3.pem"),
        public_pem: include_str!("../../tests/fixtures/keys/idp-rsa-3.pub.pem"),
        jwk: include_str!("../../tests/fixtures/keys/idp-rsa-3.jwk.json"),
    },
];

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum IdpSigning {
    /// `SIGNING_KEY` with `ALGORITHM = "HS256"`.
    Hs256 { secret: String },
    /// RS256 with a test key, published at `/.well-known/jwks.json`; tokens carry its `kid`.
    Rs256,
}

/// SimpleJWT settings; `Default` is HS256 with a random secret and SimpleJWT's default lifetimes.
#[derive(Clone, Debug)]
pub struct FakeIdpOptions {
    pub signing: IdpSigning,
    /// `ACCESS_TOKEN_LIFETIME` (default 5 min).
    pub access_lifetime: Duration,
    /// `REFRESH_TOKEN_LIFETIME` (default 1 day).
    pub refresh_lifetime: Duration,
    /// `ISSUER`: added to every token and required on refresh tokens when set.
    pub issuer: Option<String>,
    /// `AUDIENCE`: likewise.
    pub audience: Option<String>,
    /// `ROTATE_REFRESH_TOKENS` (default true): refresh answers with a new refresh token.
    pub rotate_refresh: bool,
    /// `BLACKLIST_AFTER_ROTATION` (default true): the used refresh token stops working.
    pub blacklist_after_rotation: bool,
}

impl Default for FakeIdpOptions {
    fn default() -> Self {
        FakeIdpOptions {
            signing: IdpSigning::Hs256 {
                secret: random_hex(32),
            },
            access_lifetime: Duration::from_secs(5 * 60),
            refresh_lifetime: Duration::from_secs(24 * 60 * 60),
            issuer: None,
            audience: None,
            rotate_refresh: true,
            blacklist_after_rotation: true,
        }
    }
}

/// A Django user. `add_user` with an existing id replaces it (e.g. to deactivate it).
#[derive(Clone, Debug)]
pub struct FakeUser {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub password: String,
    pub name: String,
    pub groups: Vec<String>,
    pub is_active: bool,
}

/// What both token endpoints answer instead of working (see [`FakeIdp::set_outage`]).
#[derive(Clone, Debug)]
pub enum Outage {
    /// DRF's throttling: 429 `{"detail": "Request was throttled. ..."}` with `Retry-After`.
    Throttled { retry_after_secs: u64 },
    /// A 5xx page from whatever sits in front of Django (gunicorn, a load balancer).
    ServerError(StatusCode),
}

/// Holds the answer of the next refresh (see [`FakeIdp::hold_next_refresh`]). Dropping the gate
/// releases it, so a forgotten gate never wedges a test.
pub struct RefreshGate {
    inner: Arc<Gate>,
}

struct Gate {
    released: tokio::sync::watch::Sender<bool>,
    reached: tokio::sync::watch::Sender<bool>,
}

impl RefreshGate {
    /// Lets the held refresh answer.
    pub fn release(&self) {
        self.inner.released.send_replace(true);
    }

    /// Resolves once the held refresh has rotated and blacklisted the token and is waiting.
    pub async fn reached(&self) {
        let mut rx = self.inner.reached.subscribe();
        let _ = rx.wait_for(|reached| *reached).await;
    }
}

impl Drop for RefreshGate {
    fn drop(&mut self) {
        self.release();
    }
}

/// Who a request to a token endpoint came from, as the identity service sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// `/api/token/` or `/api/token/refresh/`.
    pub path: &'static str,
    /// Every `X-Forwarded-For` header value, in order.
    pub forwarded_for: Vec<String>,
    pub user_agent: Option<String>,
}

pub struct FakeIdp {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub base_url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeIdp {
    pub async fn start(opts: FakeIdpOptions) -> FakeIdp {
        let signing = match &opts.signing {
            IdpSigning::Hs256 { secret } => Signing::Hs256 {
                secret: secret.clone(),
            },
            IdpSigning::Rs256 => Signing::Rs256 {
                index: 0,
                generation: 0,
            },
        };
        let rsa = TEST_KEYS
            .iter()
            .map(|k| {
                let encoding = EncodingKey::from_rsa_pem(k.private_pem.as_bytes())
                    .expect("test RSA private key parses");
                let jwk: Value = serde_json::from_str(k.jwk).expect("test JWK is JSON");
                let (n, e) = (jwk["n"].as_str(), jwk["e"].as_str());
                let decoding = DecodingKey::from_rsa_components(
                    n.expect("test JWK has n"),
                    e.expect("test JWK has e"),
                )
                .expect("test JWK components decode");
                RsaKey {
                    encoding,
                    decoding,
                    jwk,
                    public_pem: k.public_pem,
                }
            })
            .collect();
        let shared = Arc::new(Shared {
            access_lifetime: opts.access_lifetime,
            refresh_lifetime: opts.refresh_lifetime,
            issuer: opts.issuer,
            audience: opts.audience,
            rotate_refresh: opts.rotate_refresh,
            blacklist_after_rotation: opts.blacklist_after_rotation,
            kid_prefix: format!("fake-idp-{}", random_hex(4)),
            rsa,
            state: Mutex::new(IdpState {
                users: HashMap::new(),
                signing,
                outstanding: HashMap::new(),
                blacklisted: HashSet::new(),
                refresh_delay: Duration::ZERO,
                outage: None,
            }),
            token_calls: AtomicUsize::new(0),
            refresh_calls: AtomicUsize::new(0),
            jwks_calls: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            refresh_gate: Mutex::new(None),
        });

        let app = Router::new()
            .route(
                "/api/token/",
                post(obtain_pair).fallback(method_not_allowed),
            )
            .route(
                "/api/token/refresh/",
                post(refresh).fallback(method_not_allowed),
            )
            .route("/.well-known/jwks.json", get(jwks))
            .fallback(|| async { not_found() })
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake identity service");
        let addr: SocketAddr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            // Ends only when the task is aborted (on drop); an accept error would end the test's
            // server, which then shows up as connection errors in the test.
            let _ = axum::serve(listener, app).await;
        });
        FakeIdp {
            base_url: format!("http://{addr}"),
            shared,
            task,
        }
    }

    pub fn add_user(&self, user: FakeUser) {
        self.shared.lock().users.insert(user.id, user);
    }

    /// The HMAC secret in HS256 mode, `None` in RS256 mode.
    pub fn hs_secret(&self) -> Option<String> {
        match &self.shared.lock().signing {
            Signing::Hs256 { secret } => Some(secret.clone()),
            Signing::Rs256 { .. } => None,
        }
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base_url)
    }

    /// The current RSA public key as SPKI PEM (`BEGIN PUBLIC KEY`). Panics in HS256 mode.
    pub fn public_key_pem(&self) -> String {
        let index = self.shared.rsa_index("public_key_pem");
        self.shared.rsa[index].public_pem.to_owned()
    }

    /// Switches to the next test key under a new `kid`; the JWKS then lists only that key, so
    /// tokens signed before no longer verify. Panics in HS256 mode.
    pub fn rotate_signing_key(&self) {
        let mut state = self.shared.lock();
        match &mut state.signing {
            Signing::Rs256 { index, generation } => {
                *index = (*index + 1) % TEST_KEYS.len();
                *generation += 1;
            }
            Signing::Hs256 { .. } => panic!("rotate_signing_key needs an Rs256 fake IdP"),
        }
    }

    /// An access token for `user_id` as the token endpoint would issue it (with the user's
    /// custom claims when the user was added), valid for `lifetime`.
    pub fn mint_access(&self, user_id: i64, lifetime: Duration) -> String {
        let now = unix_now();
        let state = self.shared.lock();
        let mut claims = self.shared.user_claims(&state, user_id, "access", now);
        claims.insert("exp".into(), json!(now + secs(lifetime)));
        self.shared.sign_with(&state, &Value::Object(claims))
    }

    /// An access token that expired an hour ago (beyond any reasonable leeway).
    pub fn mint_access_expired(&self, user_id: i64) -> String {
        let issued = unix_now() - 3600 - secs(self.shared.access_lifetime);
        let state = self.shared.lock();
        let mut claims = self.shared.user_claims(&state, user_id, "access", issued);
        claims.insert(
            "exp".into(),
            json!(issued + secs(self.shared.access_lifetime)),
        );
        self.shared.sign_with(&state, &Value::Object(claims))
    }

    /// Signs exactly `claims` (nothing added) with the current key, algorithm and `kid`.
    pub fn mint_with_claims(&self, claims: Value) -> String {
        self.shared.sign(&claims)
    }

    /// HS256 with an arbitrary secret, e.g. the RSA public PEM for a key-confusion attack. In
    /// RS256 mode the header carries the current `kid`, as the attacker's token would.
    pub fn mint_hs256_with_secret(&self, claims: Value, secret: &[u8]) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = self.shared.current_kid();
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))
            .expect("HS256 signing")
    }

    /// An unsigned token: `{"alg":"none"}` header, the claims, and an empty signature.
    pub fn mint_alg_none(&self, claims: Value) -> String {
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    /// Requests to `/api/token/`, failed ones included.
    pub fn token_calls(&self) -> usize {
        self.shared.token_calls.load(Ordering::SeqCst)
    }

    /// Requests to `/api/token/refresh/`, failed ones included.
    pub fn refresh_calls(&self) -> usize {
        self.shared.refresh_calls.load(Ordering::SeqCst)
    }

    /// Requests to `/.well-known/jwks.json`.
    pub fn jwks_calls(&self) -> usize {
        self.shared.jwks_calls.load(Ordering::SeqCst)
    }

    /// The `X-Forwarded-For` and `User-Agent` of every token and refresh request, in order.
    pub fn seen_requests(&self) -> Vec<SeenRequest> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Blacklists every outstanding refresh token of the user (like flushing them in the admin):
    /// refreshing with any of them then fails with 401. Tokens issued later are not affected.
    pub fn revoke_refresh_tokens(&self, user_id: i64) {
        let mut state = self.shared.lock();
        let jtis: Vec<String> = state
            .outstanding
            .iter()
            .filter(|(_, owner)| **owner == user_id)
            .map(|(jti, _)| jti.clone())
            .collect();
        state.blacklisted.extend(jtis);
    }

    /// Delays every refresh response by `d`. The refresh itself (validation, rotation and
    /// blacklisting) happens on arrival; only the answer is late, which widens the window in
    /// which a client holds a refresh token that is already used up.
    pub fn set_refresh_delay(&self, d: Duration) {
        self.shared.lock().refresh_delay = d;
    }

    /// The next refresh is processed on arrival (the token is rotated and blacklisted) and its
    /// answer is held until the returned gate is released: the window in which a client that
    /// goes away loses the only valid refresh token.
    pub fn hold_next_refresh(&self) -> RefreshGate {
        let inner = Arc::new(Gate {
            released: tokio::sync::watch::channel(false).0,
            reached: tokio::sync::watch::channel(false).0,
        });
        *self
            .shared
            .refresh_gate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(inner.clone());
        RefreshGate { inner }
    }

    /// Both token endpoints answer `outage` (counted, nothing processed, no token spent) until
    /// set back to `None`.
    pub fn set_outage(&self, outage: Option<Outage>) {
        self.shared.lock().outage = outage;
    }
}

impl Drop for FakeIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// State and signing
// ---------------------------------------------------------------------------------------------

struct Shared {
    access_lifetime: Duration,
    refresh_lifetime: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    rotate_refresh: bool,
    blacklist_after_rotation: bool,
    /// Random per instance, so `kid`s never repeat across instances or rotations.
    kid_prefix: String,
    rsa: Vec<RsaKey>,
    state: Mutex<IdpState>,
    token_calls: AtomicUsize,
    refresh_calls: AtomicUsize,
    jwks_calls: AtomicUsize,
    seen: Mutex<Vec<SeenRequest>>,
    refresh_gate: Mutex<Option<Arc<Gate>>>,
}

struct RsaKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
    public_pem: &'static str,
}

struct IdpState {
    users: HashMap<i64, FakeUser>,
    signing: Signing,
    /// Every refresh token issued (`OutstandingToken`): jti → user id.
    outstanding: HashMap<String, i64>,
    /// `BlacklistedToken`: jtis.
    blacklisted: HashSet<String>,
    refresh_delay: Duration,
    outage: Option<Outage>,
}

enum Signing {
    Hs256 {
        secret: String,
    },
    /// `index` into the test keys; `generation` counts rotations and makes the `kid` new.
    Rs256 {
        index: usize,
        generation: u32,
    },
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, IdpState> {
        // A panicking test thread must not make every later call panic too.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, path: &'static str, headers: &HeaderMap) {
        let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let seen = SeenRequest {
            path,
            forwarded_for: headers
                .get_all("x-forwarded-for")
                .iter()
                .map(text)
                .collect(),
            user_agent: headers.get(header::USER_AGENT).map(text),
        };
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seen);
    }

    fn rsa_index(&self, what: &str) -> usize {
        match self.lock().signing {
            Signing::Rs256 { index, .. } => index,
            Signing::Hs256 { .. } => panic!("{what} needs an Rs256 fake IdP"),
        }
    }

    fn kid(&self, generation: u32) -> String {
        format!("{}-{generation}", self.kid_prefix)
    }

    fn current_kid(&self) -> Option<String> {
        match self.lock().signing {
            Signing::Rs256 { generation, .. } => Some(self.kid(generation)),
            Signing::Hs256 { .. } => None,
        }
    }

    /// Signs `claims` with the current key, as PyJWT does (`typ: JWT`, plus `kid` for RS256).
    fn sign(&self, claims: &Value) -> String {
        self.sign_with(&self.lock(), claims)
    }

    /// [`Shared::sign`] for a caller that already holds the state lock.
    fn sign_with(&self, state: &IdpState, claims: &Value) -> String {
        let result = match &state.signing {
            Signing::Hs256 { secret } => jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            ),
            Signing::Rs256 { index, generation } => {
                let mut header = Header::new(Algorithm::RS256);
                header.kid = Some(self.kid(*generation));
                jsonwebtoken::encode(&header, claims, &self.rsa[*index].encoding)
            }
        };
        result.expect("signing a test token")
    }

    /// Decodes a token as `TokenBackend.decode` does: signature with the current key, `exp`
    /// (no leeway), and `iss`/`aud` when configured.
    fn decode(&self, token: &str) -> Option<Map<String, Value>> {
        let (key, alg) = match &self.lock().signing {
            Signing::Hs256 { secret } => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            Signing::Rs256 { index, .. } => (self.rsa[*index].decoding.clone(), Algorithm::RS256),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .ok()
            .map(|data| data.claims)
    }

    /// `token_type`, `iat`, `jti`, `user_id` (a string), the user's custom claims when known,
    /// and `iss`/`aud` when configured. `exp` is left to the caller.
    fn user_claims(
        &self,
        state: &IdpState,
        user_id: i64,
        token_type: &str,
        iat: i64,
    ) -> Map<String, Value> {
        let mut claims = Map::new();
        claims.insert("token_type".into(), json!(token_type));
        claims.insert("iat".into(), json!(iat));
        claims.insert("jti".into(), json!(new_jti()));
        claims.insert("user_id".into(), json!(user_id.to_string()));
        if let Some(user) = state.users.get(&user_id) {
            claims.insert("email".into(), json!(user.email));
            claims.insert("name".into(), json!(user.name));
            claims.insert("groups".into(), json!(user.groups));
        }
        if let Some(iss) = &self.issuer {
            claims.insert("iss".into(), json!(iss));
        }
        if let Some(aud) = &self.audience {
            claims.insert("aud".into(), json!(aud));
        }
        claims
    }

    /// `RefreshToken.access_token`: a new access token that copies every claim of the refresh
    /// token except `token_type`, `exp` and `jti` (`no_copy_claims`). `iat` is not among them,
    /// so, as in SimpleJWT, the access token carries the refresh token's `iat` (the time of the
    /// login or of the previous rotation), not its own issue time.
    fn access_from_refresh(
        &self,
        state: &IdpState,
        refresh: &Map<String, Value>,
        now: i64,
    ) -> String {
        let mut access = Map::new();
        access.insert("token_type".into(), json!("access"));
        access.insert("exp".into(), json!(now + secs(self.access_lifetime)));
        access.insert("iat".into(), json!(now));
        access.insert("jti".into(), json!(new_jti()));
        for (claim, value) in refresh {
            if !matches!(claim.as_str(), "token_type" | "exp" | "jti") {
                access.insert(claim.clone(), value.clone());
            }
        }
        self.sign_with(state, &Value::Object(access))
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

/// `TokenObtainPairView`.
async fn obtain_pair(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.token_calls.fetch_add(1, Ordering::SeqCst);
    shared.record("/api/token/", &headers);
    if let Some(outage) = shared.lock().outage.clone() {
        return outage_response(&outage);
    }
    let data = match parse_data(&headers, &body) {
        Ok(data) => data,
        Err((status, body)) => return drf_json(status, body),
    };
    // The identifier is `USERNAME_FIELD`: `username` by default, `email` in apps that log in
    // by e-mail; either name is accepted here.
    let id_field = if data.contains_key("username") || !data.contains_key("email") {
        "username"
    } else {
        "email"
    };
    let mut errors = Map::new();
    let identifier = char_field(&data, id_field, &mut errors);
    let password = char_field(&data, "password", &mut errors);
    let (Some(identifier), Some(password)) = (identifier, password) else {
        return drf_json(StatusCode::BAD_REQUEST, Value::Object(errors));
    };

    // `authenticate()` with `ModelBackend`: inactive users cannot log in.
    let mut state = shared.lock();
    let user = state
        .users
        .values()
        .find(|u| match id_field {
            "email" => u.email.eq_ignore_ascii_case(&identifier),
            _ => u.username == identifier,
        })
        .filter(|u| u.password == password && u.is_active)
        .map(|u| u.id);
    let Some(user_id) = user else {
        return unauthorized(json!({ "detail": NO_ACTIVE_ACCOUNT }));
    };

    let now = unix_now();
    let claims = shared.user_claims(&state, user_id, "refresh", now);
    let refresh = shared.issue_refresh(&mut state, claims, now);
    let access = shared.access_from_refresh(&state, &refresh.claims, now);
    drf_json(
        StatusCode::OK,
        json!({ "refresh": refresh.token, "access": access }),
    )
}

/// `TokenRefreshView` with the blacklist app installed.
async fn refresh(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.refresh_calls.fetch_add(1, Ordering::SeqCst);
    shared.record("/api/token/refresh/", &headers);
    if let Some(outage) = shared.lock().outage.clone() {
        return outage_response(&outage);
    }
    let response = refresh_now(&shared, &headers, &body);
    let delay = shared.lock().refresh_delay;
    if !delay.is_zero() {
        // Simulated latency, not synchronisation: see `FakeIdp::set_refresh_delay`.
        tokio::time::sleep(delay).await;
    }
    let gate = shared
        .refresh_gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(gate) = gate {
        gate.reached.send_replace(true);
        let mut released = gate.released.subscribe();
        let _ = released.wait_for(|released| *released).await;
    }
    response
}

fn outage_response(outage: &Outage) -> Response {
    match outage {
        Outage::Throttled { retry_after_secs } => {
            let mut response = drf_json(
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "detail": format!(
                    "Request was throttled. Expected available in {retry_after_secs} seconds."
                ) }),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            response
        }
        Outage::ServerError(status) => (
            *status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            "<html><body><h1>Service Unavailable</h1></body></html>",
        )
            .into_response(),
    }
}

fn refresh_now(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let data = match parse_data(headers, body) {
        Ok(data) => data,
        Err((status, body)) => return drf_json(status, body),
    };
    let mut errors = Map::new();
    let Some(token) = char_field(&data, "refresh", &mut errors) else {
        return drf_json(StatusCode::BAD_REQUEST, Value::Object(errors));
    };
    let Some(claims) = shared.decode(&token) else {
        return token_not_valid(TOKEN_INVALID);
    };
    let Some(jti) = claims.get("jti").and_then(Value::as_str).map(str::to_owned) else {
        return token_not_valid(TOKEN_NO_ID);
    };

    // Held from the blacklist check to the new token's registration, so a refresh token works
    // only once and a concurrent `revoke_refresh_tokens` cannot miss the new one.
    let mut state = shared.lock();
    if state.blacklisted.contains(&jti) {
        return token_not_valid(TOKEN_BLACKLISTED);
    }
    if claims.get("token_type").and_then(Value::as_str) != Some("refresh") {
        return token_not_valid(TOKEN_WRONG_TYPE);
    }
    let user_id = claims.get("user_id").and_then(|v| match v {
        Value::String(s) => s.parse::<i64>().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    });
    let active = user_id
        .and_then(|id| state.users.get(&id))
        .is_some_and(|u| u.is_active);
    if !active {
        return unauthorized(json!({ "detail": NO_ACTIVE_ACCOUNT }));
    }
    if shared.rotate_refresh && shared.blacklist_after_rotation {
        state.blacklisted.insert(jti);
    }

    let now = unix_now();
    let access = shared.access_from_refresh(&state, &claims, now);
    if !shared.rotate_refresh {
        return drf_json(StatusCode::OK, json!({ "access": access }));
    }
    // `set_jti()`, `set_exp()`, `set_iat()`, `outstand()`: same claims, new identity and expiry.
    let mut rotated = claims;
    rotated.insert("iat".into(), json!(now));
    rotated.insert("jti".into(), json!(new_jti()));
    let refresh = shared.issue_refresh(&mut state, rotated, now);
    drf_json(
        StatusCode::OK,
        json!({ "access": access, "refresh": refresh.token }),
    )
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Response {
    shared.jwks_calls.fetch_add(1, Ordering::SeqCst);
    let (index, generation) = match shared.lock().signing {
        Signing::Rs256 { index, generation } => (index, generation),
        Signing::Hs256 { .. } => return not_found(),
    };
    let jwk = &shared.rsa[index].jwk;
    let body = json!({
        "keys": [{
            "kty": "RSA",
            "kid": shared.kid(generation),
            "use": "sig",
            "alg": "RS256",
            "n": jwk["n"],
            "e": jwk["e"],
        }]
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

struct IssuedRefresh {
    token: String,
    claims: Map<String, Value>,
}

impl Shared {
    /// Sets `exp`, signs, and records the token as outstanding for its user.
    fn issue_refresh(
        &self,
        state: &mut IdpState,
        mut claims: Map<String, Value>,
        now: i64,
    ) -> IssuedRefresh {
        claims.insert("token_type".into(), json!("refresh"));
        claims.insert("exp".into(), json!(now + secs(self.refresh_lifetime)));
        let token = self.sign_with(state, &Value::Object(claims.clone()));
        let owner = claims
            .get("user_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<i64>().ok());
        let jti = claims.get("jti").and_then(Value::as_str);
        if let (Some(owner), Some(jti)) = (owner, jti) {
            state.outstanding.insert(jti.to_owned(), owner);
        }
        IssuedRefresh { token, claims }
    }
}

// ---------------------------------------------------------------------------------------------
// DRF request parsing and responses
// ---------------------------------------------------------------------------------------------

/// `request.data` with DRF's default parsers (JSON, form, multipart minus files); a body that
/// is not a JSON object is rejected as `Serializer.to_internal_value` does. Errors are the
/// status and body of DRF's answer.
fn parse_data(headers: &HeaderMap, body: &[u8]) -> Result<Map<String, Value>, (StatusCode, Value)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if body.is_empty() {
        // DRF does not run a parser on an empty body: every field is then missing.
        return Ok(Map::new());
    }
    let value = match media_type.as_str() {
        "application/json" => serde_json::from_slice::<Value>(body).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                json!({ "detail": format!("JSON parse error - {e}") }),
            )
        })?,
        "application/x-www-form-urlencoded" => Value::Object(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect(),
        ),
        "" => return Ok(Map::new()),
        other => {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({ "detail": format!("Unsupported media type \"{other}\" in request.") }),
            ))
        }
    };
    match value {
        Value::Object(map) => Ok(map),
        other => Err((
            StatusCode::BAD_REQUEST,
            json!({ "non_field_errors": [format!(
                "Invalid data. Expected a dictionary, but got {}.",
                python_type(&other)
            )] }),
        )),
    }
}

/// A DRF `CharField` (trimmed, not blank, not null); errors go into `errors` under `name`.
fn char_field(
    data: &Map<String, Value>,
    name: &str,
    errors: &mut Map<String, Value>,
) -> Option<String> {
    let result = match data.get(name) {
        None => Err(FIELD_REQUIRED),
        Some(Value::Null) => Err("This field may not be null."),
        Some(Value::String(s)) => Ok(s.trim().to_owned()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err("Not a valid string."),
    };
    let result = result.and_then(|s| {
        if s.is_empty() {
            Err("This field may not be blank.")
        } else {
            Ok(s)
        }
    });
    match result {
        Ok(s) => Some(s),
        Err(message) => {
            errors.insert(name.to_owned(), json!([message]));
            None
        }
    }
}

fn python_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// A DRF `Response` from an `APIView`: JSON, with the `Allow` and `Vary` headers it always sets.
fn drf_json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ALLOW, HeaderValue::from_static("POST, OPTIONS")),
            (header::VARY, HeaderValue::from_static("Accept")),
        ],
        body.to_string(),
    )
        .into_response()
}

fn unauthorized(body: Value) -> Response {
    let mut response = drf_json(StatusCode::UNAUTHORIZED, body);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(WWW_AUTHENTICATE),
    );
    response
}

/// SimpleJWT's `InvalidToken`: `{"detail": <message>, "code": "token_not_valid"}`.
fn token_not_valid(message: &str) -> Response {
    unauthorized(json!({ "detail": message, "code": "token_not_valid" }))
}

async fn method_not_allowed(method: Method) -> Response {
    drf_json(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({ "detail": format!("Method \"{method}\" not allowed.") }),
    )
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        DJANGO_404,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn unix_now() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    secs(since_epoch)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)
}

/// SimpleJWT's jti: `uuid4().hex` (32 hex digits, no dashes).
fn new_jti() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}
