//! Start-up: builds the application once — configuration, clients, stores, background tasks —
//! into [`AppState`]. `serve`, `worker`, the CLI and the tests all build it here. Handlers never
//! see `AppState`: each takes the narrow state of its own module (`FromRef` below).

use std::{ops::Deref, sync::Arc, time::Duration};

use axum::{extract::FromRef, http::HeaderValue};

use crate::{
    admin::Ops,
    clock::{Clock, SystemClock},
    config::{Config, ConfigError, SessionStoreKind},
    credentials::{vault::CredentialVault, CryptoError, KeyRing},
    end_user::EndUsers,
    extract::BodyDeadline,
    identity::{IdentityClient, IdentityVerifier},
    librechat::{service_account::ServiceAccount, LibreChatClient, TokenManager},
    probes::Probes,
    provisioner::Provisioner,
    proxy::{Proxy, Upstream},
    redis_conn::RedisHandle,
    session::{
        csrf::CsrfPolicy, routes::SignIn, store::MemorySessionStore, Authenticator,
        BffSessionStore, RedisSessionStore, SessionRegistry,
    },
    telemetry::metrics::Metrics,
    throttle::LoginThrottle,
    ui::Ui,
};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("fernet key ring: {0}")]
    Crypto(#[from] CryptoError),
}

/// The application, built once: the services (shared with the per-module states) and the
/// per-module states the router hands to handlers.
pub struct AppInner {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub keyring: Arc<KeyRing>,
    pub verifier: Arc<IdentityVerifier>,
    pub sessions: Arc<SessionRegistry>,
    /// Redis: credentials, LibreChat logins, locks, jobs — and sessions when configured.
    pub redis: RedisHandle,
    pub vault: CredentialVault,
    pub tokens: Arc<TokenManager>,
    pub provisioner: Provisioner,
    pub metrics: Arc<Metrics>,
    /// Who is calling (cookie session or identity JWT): sessions, identity, CSRF.
    pub auth: Arc<Authenticator>,
    /// `/auth/login`, `/auth/session`.
    pub sign_in: Arc<SignIn>,
    /// `/api/chat/*`.
    pub proxy: Arc<Proxy>,
    /// LibreChat's web UI under `ui.mount_path` (routed only when `ui.enabled`).
    pub ui: Arc<Ui>,
    /// `/admin/*`, `/hooks/users` and the CLI.
    pub ops: Arc<Ops>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub probes: Arc<Probes>,
    pub body_deadline: BodyDeadline,
    /// Tasks that live as long as the state (ended when it is dropped).
    background: Vec<tokio::task::AbortHandle>,
}

impl Drop for AppInner {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
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
        let http = IdentityClient::http_client(&config.identity)?;
        let verifier = IdentityVerifier::with_clock(
            &config.identity.jwt,
            &config.identity.claims,
            http.clone(),
            clock.clone(),
        )?;
        let identity = IdentityClient::new(&config.identity, http);
        let redis = RedisHandle::from_config(&config.redis)?;
        let runtime = tokio::runtime::Handle::try_current().is_ok();
        // Connecting never blocks start-up or a request (see src/redis_conn.rs).
        if runtime {
            redis.connect_in_background();
        }
        let mut background = Vec::new();
        let store = match config.session.store {
            SessionStoreKind::Redis => {
                let store = RedisSessionStore::new(redis.clone());
                // Sessions ended on any replica leave this one's copies within moments.
                if runtime {
                    background.push(store.follow_ended().abort_handle());
                }
                BffSessionStore::Redis(store)
            }
            SessionStoreKind::Memory => {
                let store = MemorySessionStore::default();
                // Abandoned sessions expire; this deletes them (Redis does it by itself).
                if runtime {
                    background.push(spawn_session_cleanup(
                        store.clone(),
                        Duration::from_secs(config.session.memory_cleanup_interval_secs),
                    ));
                }
                BffSessionStore::Memory(store)
            }
        };
        let sessions = Arc::new(SessionRegistry::new(store, redis.clone(), keyring.clone()));
        let vault = CredentialVault::new(redis.clone(), keyring.clone(), clock.clone());
        let librechat = LibreChatClient::new(&config.librechat)?;
        let tokens = Arc::new(TokenManager::new(
            librechat.clone(),
            vault.clone(),
            redis.clone(),
            keyring.clone(),
            clock.clone(),
            Duration::from_secs(config.librechat.token_refresh_skew_secs),
            metrics.clone(),
        ));
        // Revocations published by any replica reach this one's token cache within moments.
        if runtime {
            background.push(tokens.listen_for_revocations().abort_handle());
        }
        let upstream = Arc::new(
            Upstream::new(
                &config.librechat,
                crate::per_core::count(config.server.worker_threads),
            )?
            .with_csrf_header(&config.csrf.header_name)?,
        );
        let browser_user_agent = HeaderValue::from_str(&config.librechat.browser_user_agent)
            .map_err(|_| ConfigError::Invalid {
                key: "librechat.browser_user_agent".into(),
                reason: "not a header value".into(),
            })?;
        let service_account = Arc::new(ServiceAccount::new(
            redis.clone(),
            keyring.clone(),
            vault.clone(),
            &config.provisioning.service_account_email,
        ));
        let provisioner = Provisioner::new(
            &config,
            redis.clone(),
            vault.clone(),
            librechat,
            browser_user_agent.clone(),
            metrics.clone(),
            service_account,
        );
        let verifier = Arc::new(verifier);
        let auth = Arc::new(Authenticator {
            clock: clock.clone(),
            verifier: verifier.clone(),
            identity,
            sessions: sessions.clone(),
            csrf: Arc::new(CsrfPolicy::new(&config.csrf)),
            metrics: metrics.clone(),
            end_users: Arc::new(EndUsers::new(config.trusted_proxies()?, browser_user_agent)),
            session_cfg: config.session.clone(),
            refresh_skew_secs: config.identity.refresh_skew_secs as i64,
        });
        let sign_in = Arc::new(SignIn {
            auth: auth.clone(),
            throttle: Arc::new(LoginThrottle::new(
                &config.login_throttle,
                config.session.store,
                redis.clone(),
                clock.clone(),
            )),
            vault: vault.clone(),
            provisioner: provisioner.clone(),
        });
        let proxy = Arc::new(Proxy {
            auth: auth.clone(),
            tokens: tokens.clone(),
            provisioner: provisioner.clone(),
            upstream,
            metrics: metrics.clone(),
            body_idle_timeout: Duration::from_secs(config.server.request_body_idle_timeout_secs),
        });
        let ui = Arc::new(Ui::new(proxy.clone(), config.ui.clone(), &keyring));
        let ops = Arc::new(Ops {
            auth: auth.clone(),
            vault: vault.clone(),
            provisioner: provisioner.clone(),
            sessions: sessions.clone(),
            tokens: tokens.clone(),
            keyring: keyring.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            redis: redis.clone(),
            admin_cfg: config.admin.clone(),
            hooks_cfg: config.hooks.clone(),
        });
        let probes = Arc::new(Probes {
            session_redis: (config.session.store == SessionStoreKind::Redis).then(|| redis.clone()),
            queue: provisioner.queue.clone(),
            metrics: metrics.clone(),
        });
        let body_deadline = BodyDeadline(Duration::from_secs(
            config.server.request_body_idle_timeout_secs,
        ));
        Ok(Self(Arc::new(AppInner {
            config,
            clock,
            keyring,
            verifier,
            sessions,
            redis,
            vault,
            tokens,
            provisioner,
            metrics,
            auth,
            sign_in,
            proxy,
            ui,
            ops,
            probes,
            body_deadline,
            background,
        })))
    }
}

/// Deletes expired in-memory sessions every `every`.
fn spawn_session_cleanup(store: MemorySessionStore, every: Duration) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let deleted = store.delete_expired();
            if deleted > 0 {
                tracing::debug!(deleted, left = store.len(), "expired sessions deleted");
            }
        }
    })
    .abort_handle()
}

macro_rules! sub_state {
    ($ty:ty, $field:ident) => {
        impl FromRef<AppState> for $ty {
            fn from_ref(state: &AppState) -> Self {
                state.$field.clone()
            }
        }
    };
}

sub_state!(Arc<Authenticator>, auth);
sub_state!(Arc<SignIn>, sign_in);
sub_state!(Arc<Proxy>, proxy);
sub_state!(Arc<Ui>, ui);
sub_state!(Arc<Ops>, ops);
sub_state!(Arc<Probes>, probes);
sub_state!(Arc<Metrics>, metrics);
sub_state!(BodyDeadline, body_deadline);
