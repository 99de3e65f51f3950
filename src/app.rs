//! The router: read top to bottom to see where a request goes. Routes are grouped by who calls
//! them; the layers below the routes run outermost-last (the list reads inside out).

use std::time::Duration;

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
use tower_sessions::{cookie::SameSite, SessionManagerLayer};

pub use crate::startup::{AppState, StartupError};
use crate::{
    admin, error, probes, proxy,
    session::{self, csrf::CsrfPolicy, BffSessionStore},
    telemetry, ui,
};

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
        // (src/proxy/mod.rs). Only these methods are forwarded (GET covers HEAD).
        .route(
            "/api/chat/{*path}",
            get(proxy::forward)
                .post(proxy::forward)
                .put(proxy::forward)
                .patch(proxy::forward)
                .delete(proxy::forward)
                .options(proxy::forward),
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
        .layer(cors_layer(&state.auth.csrf, &state.config.csrf.header_name))
        // Any error the BFF answers itself (axum's rejections too) in the JSON problem shape.
        .layer(middleware::map_response(problem_shape))
        // Request id, log span and request metrics for everything above.
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            telemetry::middleware::observe,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(error::ApiError::Internal)
        }))
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
        .layer(middleware::map_response(problem_shape))
        .with_state(state)
}

async fn method_not_allowed() -> error::ApiError {
    error::ApiError::MethodNotAllowed
}

/// Rewrites an error response the BFF produced without the JSON problem shape (axum's 405 has
/// no body; its body-limit 413 and Query/Path rejections are plain text) into
/// `{"error","message"}`, keeping status and headers (`Allow`, `Retry-After`, ...). LibreChat's
/// own answers (marked [`proxy::Proxied`]) pass as they are.
async fn problem_shape(res: axum::response::Response) -> axum::response::Response {
    let status = res.status();
    let is_json = crate::extract::is_json(res.headers());
    if status.as_u16() < 400 || is_json || res.extensions().get::<proxy::Proxied>().is_some() {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    // A client error's text (axum's rejection) says what was wrong; a server error's stays ours.
    let detail = if status.is_client_error() {
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 1024))
            .await
            .ok()
            .and_then(|c| String::from_utf8(c.to_bytes().to_vec()).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    } else {
        None
    };
    let (code, generic) = problem_code(status);
    let message = detail.unwrap_or_else(|| generic.to_owned());
    let (shaped, body) = error::problem(status, code, &message).into_parts();
    parts.extensions.insert(error::ErrorCause {
        code,
        cause: message,
    });
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &shaped.headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    axum::response::Response::from_parts(parts, body)
}

/// Code and message for an error status the BFF produced without saying more.
fn problem_code(status: axum::http::StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("bad_request", "The request is not valid."),
        401 => ("unauthenticated", "Sign in first."),
        403 => ("forbidden", "This is not allowed."),
        404 => ("not_found", "No such route."),
        405 => (
            "method_not_allowed",
            "This route does not accept that method.",
        ),
        408 => ("request_timeout", "The request did not arrive in time."),
        411 => ("length_required", "The request needs a Content-Length."),
        413 => ("payload_too_large", "The request body is too large."),
        414 => ("uri_too_long", "The request URI is too long."),
        415 => (
            "unsupported_media_type",
            "The request body's Content-Type is not accepted.",
        ),
        422 => (
            "unprocessable_entity",
            "The request body could not be processed.",
        ),
        429 => ("too_many_requests", "Too many requests; retry later."),
        431 => ("headers_too_large", "The request headers are too large."),
        s if s < 500 => ("bad_request", "The request is not acceptable."),
        503 => (
            "service_unavailable",
            "The service is unavailable; try again shortly.",
        ),
        _ => ("internal_error", "Something went wrong on our side."),
    }
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

/// Credentialed CORS for the allowlisted origins only; none configured → no CORS headers. The
/// CSRF header allowed is the configured one (`csrf.header_name`).
fn cors_layer(csrf: &CsrfPolicy, csrf_header: &str) -> CorsLayer {
    let origins: Vec<HeaderValue> = csrf
        .allowed_origins()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return CorsLayer::new();
    }
    // Validated at load (`csrf.header_name`); the default stands in should it ever not parse.
    let csrf_header =
        HeaderName::from_bytes(csrf_header.as_bytes()).unwrap_or(HeaderName::from_static("x-csrf"));
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
            csrf_header,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600))
}
