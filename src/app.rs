//! Where a request goes: [`app`] lists the layers every request passes and the warm lane of
//! `/api/chat/*`; [`router`] below it, read top to bottom, has every route. Routes are grouped by
//! who calls them.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, HeaderName, HeaderValue, Request, Response},
    middleware,
    routing::{any, delete, get, on, post},
    Router,
};
use tower::{util::Either, Service, ServiceBuilder};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};
use tower_sessions::{cookie::SameSite, SessionManagerLayer};

pub use crate::startup::{AppState, StartupError};
use crate::{
    admin, edge, error, probes,
    proxy::{
        self,
        lane::{ChatLane, ChatLaneLayer},
    },
    session::{self, csrf::CsrfPolicy, BffSessionStore},
    ui,
};

/// The main listener's service. Outside in: the edge (panics as a JSON 500, request id, log span,
/// metrics, JSON problem shape); CORS, when origins are allowed (`csrf.allowed_origins`); the
/// warm lane of `/api/chat/*` (src/proxy/lane.rs: callers known without a session read are
/// forwarded from there, everyone else continues); the router below. Built for each connection
/// ([`MainApp::for_peer`]): the lane knows the peer without a per-request extension, and puts
/// it on what it hands to the router (`ConnectInfo`).
pub fn app(state: AppState) -> MainApp {
    MainApp {
        edge: edge::EdgeLayer::new(state.metrics.clone()),
        cors: cors_layer(&state.auth.csrf, &state.config.csrf.header_name),
        lane: ChatLaneLayer::new(state.proxy.clone(), &state.config.cookie_name()),
        router: router(state),
    }
}

/// The layers of [`app`] and the router, put together per connection.
#[derive(Clone)]
pub struct MainApp {
    edge: edge::EdgeLayer,
    cors: Option<CorsLayer>,
    lane: ChatLaneLayer,
    router: Router,
}

/// The service [`app`] builds for a connection.
pub type App = edge::Edge<Either<Cors<ChatLane<Router>>, ChatLane<Router>>>;

impl ConnectionApp<Body> for MainApp {
    type Service = App;

    fn for_peer(&self, peer: SocketAddr) -> App {
        ServiceBuilder::new()
            .layer(self.edge.clone())
            .option_layer(self.cors.clone())
            .layer(self.lane.for_peer(peer))
            .service(self.router.clone())
    }
}

pub fn router(state: AppState) -> Router {
    // Serving: a request never waits for Redis to connect (503 meanwhile).
    state.redis.fail_fast();
    // Operators only: the whole group sits behind one guard (src/admin/mod.rs).
    let ops = Router::new()
        .route("/admin/users", post(admin::add_user))
        .route("/admin/users/{id}", get(admin::show_user))
        .route("/admin/users/{id}/sessions", delete(admin::revoke_sessions))
        .route("/admin/users/{id}/deactivate", post(admin::deactivate_user))
        .route("/admin/jobs", get(admin::list_jobs))
        .route("/admin/jobs/{id}/retry", post(admin::retry_job))
        .route_layer(middleware::from_fn_with_state(
            state.ops.clone(),
            admin::require_operator,
        ));
    let mut app = Router::new()
        // Probes (src/probes.rs).
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        // The web app: sign-in, sign-out, who am I (src/session/routes.rs); mobile apps may
        // call /auth/me with their identity JWT too.
        .route("/auth/login", post(session::routes::login))
        .route("/auth/session", post(session::routes::exchange))
        .route("/auth/logout", post(session::routes::logout))
        .route("/auth/me", get(session::routes::me))
        // Web (cookie) and mobile (Bearer): LibreChat's /api/* as the signed-in user
        // (src/proxy/mod.rs). Only `proxy::FORWARDED_METHODS` are (GET covers HEAD). Warm
        // callers were already forwarded by the lane in front (see `app`).
        .route(
            "/api/chat/{*path}",
            on(proxy::forwarded_filter(), proxy::forward),
        )
        // Ops: the admin API (above) and the identity service's signed webhook.
        .merge(ops)
        .route("/hooks/users", post(admin::hooks::users))
        // Anything else: JSON 404.
        .fallback(error::not_found);
    if state.config.telemetry.metrics_on_main_listener {
        app = app.route("/metrics", get(probes::metrics));
    }
    // LibreChat's own web UI, signed in through the session (src/ui/mod.rs).
    if state.config.ui.enabled {
        app = app.merge(web_ui(state.config.ui.mount()));
        if state.config.ui.root_images {
            // Avatars ignore the UI's base path.
            app = app.route("/images/{*path}", get(ui::images));
        }
    }
    app
        // A known route, another method: JSON 405 (axum adds `Allow`). After every route.
        .method_not_allowed_fallback(method_not_allowed)
        // Cookie sessions (loaded lazily: only routes that read the session touch the store).
        .layer(session_layer(&state))
        .with_state(state)
}

/// The web UI's routes under `mount`: its auth calls answered here, its API as the user,
/// images with the user's LibreChat cookie, the product's login instead of LibreChat's, and the
/// rest (static files, SPA pages) from LibreChat.
fn web_ui(mount: &str) -> Router<AppState> {
    let at = |path: &str| format!("{mount}{path}");
    let api_methods = || {
        get(ui::api)
            .post(ui::api)
            .put(ui::api)
            .patch(ui::api)
            .delete(ui::api)
            .options(ui::api)
    };
    Router::new()
        .route(&at("/api/auth/refresh"), post(ui::refresh))
        .route(&at("/api/auth/logout"), post(ui::logout))
        .route(&at("/api/auth/{*rest}"), any(ui::refused))
        .route(&at("/api/config"), get(ui::config))
        .route(&at("/api/{*path}"), api_methods())
        .route(&at("/images/{*path}"), get(ui::images))
        .route(&at("/login"), get(ui::to_login))
        .route(&at("/login/{*rest}"), get(ui::to_login))
        .route(&at("/oauth/{*rest}"), get(ui::to_login))
        .route(mount, get(ui::to_mount))
        .route(&at("/"), any(ui::page))
        .route(&at("/{*rest}"), any(ui::page))
}

/// The metrics-only router for `telemetry.metrics_addr`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(probes::metrics))
        .fallback(error::not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(edge::problem_shape))
        .with_state(state)
}

async fn method_not_allowed() -> error::ApiError {
    error::ApiError::MethodNotAllowed
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

/// What a listener serves: a tower service answering every request (errors are responses).
pub trait HttpService<B>:
    Service<Request<Body>, Response = Response<B>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// What a listener serves, made once per accepted connection for its peer: the service can
/// carry the peer itself instead of an extensions map being built for it on every request.
pub trait ConnectionApp<B>: Send + Sync + 'static {
    type Service: HttpService<B>;

    fn for_peer(&self, peer: SocketAddr) -> Self::Service;
}

/// A service whose requests get their peer as axum's `ConnectInfo` (for any service that reads
/// it from the request, like the metrics listener's router).
#[derive(Clone)]
pub struct PeerInExtensions<S>(pub S);

impl<S, B> ConnectionApp<B> for PeerInExtensions<S>
where
    S: HttpService<B>,
{
    type Service = WithConnectInfo<S>;

    fn for_peer(&self, peer: SocketAddr) -> WithConnectInfo<S> {
        WithConnectInfo {
            inner: self.0.clone(),
            peer,
        }
    }
}

/// Puts `ConnectInfo(peer)` on every request it passes on.
#[derive(Clone)]
pub struct WithConnectInfo<S> {
    inner: S,
    peer: SocketAddr,
}

impl<S> Service<Request<Body>> for WithConnectInfo<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        self.inner.call(req)
    }
}

/// Credentialed CORS for the allowlisted origins only; none configured → no CORS layer at all (it
/// would only add `Vary` to every response, at a cost on every request). The CSRF header allowed
/// is the configured one (`csrf.header_name`).
fn cors_layer(csrf: &CsrfPolicy, csrf_header: &str) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = csrf
        .allowed_origins()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    // Validated at load (`csrf.header_name`); the default stands in should it ever not parse.
    let csrf_header =
        HeaderName::from_bytes(csrf_header.as_bytes()).unwrap_or(HeaderName::from_static("x-csrf"));
    let layer = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_credentials(true)
        // What `/api/chat/*` forwards (GET covers HEAD); the BFF's own routes use fewer.
        .allow_methods(proxy::FORWARDED_METHODS)
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            csrf_header,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600));
    Some(layer)
}
