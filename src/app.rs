//! The router: read top to bottom to see where a request goes.

use std::{ops::Deref, sync::Arc, time::Duration};

use axum::{
    http::{header, HeaderName, HeaderValue, Method},
    middleware,
    routing::{any, delete, get, post},
    Router,
};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
};
use tower_sessions::{cookie::SameSite, MemoryStore, SessionManagerLayer};

use crate::{
    admin,
    clock::{Clock, SystemClock},
    config::{Config, ConfigError, SessionStoreKind},
    credentials::{vault::CredentialVault, CryptoError, KeyRing},
    error, health,
    identity::{IdentityClient, IdentityVerifier},
    librechat::{LibreChatClient, TokenManager},
    provision::Provisioner,
    proxy::{self, Upstream},
    redis_conn::RedisHandle,
    session::{self, csrf::CsrfPolicy, BffSessionStore, RedisSessionStore, SessionRegistry},
    telemetry::{self, metrics::Metrics},
};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("fernet key ring: {0}")]
    Crypto(#[from] CryptoError),
}

/// Everything a request handler may need, built once at start-up.
pub struct AppInner {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub keyring: Arc<KeyRing>,
    pub verifier: IdentityVerifier,
    pub identity: IdentityClient,
    pub sessions: SessionRegistry,
    pub csrf: CsrfPolicy,
    /// Redis: credentials, LibreChat logins, locks, jobs — and sessions when configured.
    pub redis: RedisHandle,
    pub vault: CredentialVault,
    pub tokens: TokenManager,
    pub upstream: Upstream,
    pub provisioner: Provisioner,
    pub metrics: Arc<Metrics>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub browser_user_agent: HeaderValue,
}

#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: Config) -> Result<Self, StartupError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartupError> {
        let keyring = Arc::new(KeyRing::from_config(&config.crypto)?);
        let metrics = Arc::new(Metrics::new());
        let http = IdentityClient::http_client(&config.identity);
        let verifier =
            IdentityVerifier::new(&config.identity.jwt, &config.identity.claims, http.clone())?;
        let identity = IdentityClient::new(&config.identity, http);
        let redis = RedisHandle::new(config.redis.url.expose(), &config.redis.key_prefix)?;
        let store = match config.session.store {
            SessionStoreKind::Redis => {
                BffSessionStore::Redis(RedisSessionStore::new(redis.clone()))
            }
            SessionStoreKind::Memory => BffSessionStore::Memory(MemoryStore::default()),
        };
        let sessions = SessionRegistry::new(store, redis.clone(), keyring.clone());
        let vault = CredentialVault::new(redis.clone(), keyring.clone(), clock.clone());
        let tokens = TokenManager::new(
            LibreChatClient::new(&config.librechat),
            vault.clone(),
            redis.clone(),
            keyring.clone(),
            clock.clone(),
            Duration::from_secs(config.librechat.token_refresh_skew_secs),
            metrics.clone(),
        );
        let upstream = Upstream::new(&config.librechat)?;
        let browser_user_agent = HeaderValue::from_str(&config.librechat.browser_user_agent)
            .map_err(|_| ConfigError::Invalid {
                key: "librechat.browser_user_agent".into(),
                reason: "not a header value".into(),
            })?;
        let provisioner = Provisioner::new(
            &config,
            redis.clone(),
            vault.clone(),
            LibreChatClient::new(&config.librechat),
            browser_user_agent.clone(),
            metrics.clone(),
        );
        let csrf = CsrfPolicy::new(&config.csrf);
        let trusted_proxies = config.trusted_proxies()?;
        Ok(Self(Arc::new(AppInner {
            config,
            clock,
            keyring,
            verifier,
            identity,
            sessions,
            csrf,
            redis,
            vault,
            tokens,
            upstream,
            provisioner,
            metrics,
            trusted_proxies,
            browser_user_agent,
        })))
    }
}

pub fn router(state: AppState) -> Router {
    let mut app = Router::new()
        // Liveness and readiness.
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        // Sign-in, sign-out and the current user (src/session/routes.rs).
        .route("/auth/login", post(session::routes::login))
        .route("/auth/session", post(session::routes::exchange))
        .route("/auth/logout", post(session::routes::logout))
        .route("/auth/me", get(session::routes::me))
        // Operations (src/admin/): provisioning, jobs, session revocation; identity webhook.
        .route("/admin/users", post(admin::add_user))
        .route("/admin/users/{id}", get(admin::show_user))
        .route("/admin/users/{id}/sessions", delete(admin::revoke_sessions))
        .route("/admin/jobs", get(admin::list_jobs))
        .route("/admin/jobs/{id}/retry", post(admin::retry_job))
        .route("/hooks/users", post(admin::hooks::users))
        // The product: LibreChat's /api/* as the signed-in user (src/proxy/mod.rs).
        .route("/api/chat/{*path}", any(proxy::forward))
        // Anything else: JSON 404.
        .fallback(error::not_found);
    if state.config.telemetry.metrics_on_main_listener {
        app = app.route("/metrics", get(health::metrics));
    }
    app
        // Cookie sessions (loaded lazily: only routes that read the session touch the store).
        .layer(session_layer(&state))
        .layer(cors_layer(&state.csrf))
        // Request id, log span and request metrics for everything above.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            telemetry::middleware::observe,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(error::ApiError::Internal)
        }))
        .with_state(state)
}

/// The metrics-only router for `telemetry.metrics_addr`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .with_state(state)
}

fn session_layer(state: &AppState) -> SessionManagerLayer<BffSessionStore> {
    let cfg = &state.config;
    SessionManagerLayer::new(state.sessions.store().clone())
        .with_name(cfg.cookie_name())
        .with_http_only(true)
        .with_secure(cfg.session.cookie_secure)
        .with_same_site(SameSite::Lax)
        .with_path("/")
}

/// Credentialed CORS for the allowlisted origins only; none configured → no CORS headers.
fn cors_layer(csrf: &CsrfPolicy) -> CorsLayer {
    let origins: Vec<HeaderValue> = csrf
        .allowed_origins()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return CorsLayer::new();
    }
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_credentials(true)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            HeaderName::from_static("x-csrf"),
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600))
}
