//! `serve`: bind, log what runs, answer until SIGINT/SIGTERM, then drain. The HTTP server is a
//! hand-written accept loop over hyper (header read timeout, connection cap, TCP_NODELAY).

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{Request, Response},
};
use http_body::Body as HttpBody;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tower::{util::Oneshot, ServiceExt};

use crate::{
    app::{app, AppState, ConnectionApp, HttpService, PeerInExtensions, StartupError},
    config::{Config, ServerConfig, SessionStoreKind},
    per_core::{self, CoreRuntimes},
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Logs what the operator needs to know about the configuration in force.
pub fn announce(config: &Config, config_file: Option<&Path>, state: &AppState) {
    match config_file {
        Some(path) => tracing::info!(file = %path.display(), "configuration loaded"),
        None => tracing::info!(
            "no --config given: running on the embedded defaults (config/default.toml)"
        ),
    }
    match config.session.store {
        SessionStoreKind::Memory => tracing::warn!(
            session_store = "memory",
            "session store: MEMORY — sessions vanish on restart and are not shared between \
             replicas; set session.store = \"redis\" for production"
        ),
        SessionStoreKind::Redis => tracing::info!(session_store = "redis", "session store: redis"),
    }
    if state.keyring.is_ephemeral() {
        tracing::warn!(
            "crypto.fernet_keys is empty: using a random key for this process only \
             (run `librechat-bff keys generate` and configure it)"
        );
    }
    if !state.verifier.is_configured() {
        tracing::warn!(
            "identity.jwt.hs_secret is empty: every identity token will be rejected until it is set"
        );
    }
    if !config.session.cookie_secure {
        tracing::warn!("session.cookie_secure = false: only for local plain-http development");
    }
}

pub async fn run(listener: TcpListener, state: AppState) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = state
        .config
        .provisioning
        .workers_in_serve
        .then(|| state.provisioner.spawn_worker(stop_rx.clone()));
    let metrics_server = match state_metrics_listener(&state).await? {
        Some((listener, app)) => {
            let limits = ConnectionLimits::from_config(&state.config.server);
            Some(tokio::spawn(serve_router(
                listener,
                PeerInExtensions(app),
                limits,
                None,
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // Graceful: on the signal the listener closes at once and open connections finish; those
    // still open after the drain timeout are cut (see `serve_router`).
    serve(listener, state, stopped(stop_rx.clone())).await;
    signal.abort();
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    if let Some(worker) = worker {
        // The worker finishes the jobs it holds; anything left is reclaimed by another worker.
        if tokio::time::timeout(Duration::from_secs(30), worker)
            .await
            .is_err()
        {
            tracing::warn!("provisioning worker did not stop in 30 s; its jobs will be reclaimed");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connection hygiene of a listener (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A request head must arrive within this long; also the idle keep-alive timeout.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// After shutdown begins, open connections get this long to finish.
    pub drain_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_config(cfg: &ServerConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(cfg.header_read_timeout_secs),
            max_connections: cfg.max_connections,
            drain_timeout: Duration::from_secs(cfg.drain_timeout_secs),
        }
    }
}

/// The production HTTP server: the BFF's router on `listener` until `shutdown` resolves, then
/// the drain. `serve` (the binary) and the integration tests both run this.
pub async fn serve<F>(listener: TcpListener, state: AppState, shutdown: F)
where
    F: Future<Output = ()> + Send,
{
    let limits = ConnectionLimits::from_config(&state.config.server);
    let cores = match CoreRuntimes::start(per_core::count(state.config.server.worker_threads)) {
        Ok(cores) => Some(cores),
        Err(e) => {
            // Still serves, on the caller's runtime.
            tracing::error!(error = %e, "cannot start the per-core runtimes; serving on one");
            None
        }
    };
    serve_router(listener, app(state), limits, cores.as_ref(), shutdown).await;
}

/// Accept loop over hyper's HTTP/1 server:
/// - a connection slot (`max_connections`) is taken *before* accepting, so beyond the cap new
///   connections wait in the kernel's backlog and are served once a slot frees;
/// - every connection gets `TCP_NODELAY`, its own service knowing the peer
///   ([`ConnectionApp::for_peer`], called in place for each request: `InPlace`), and the header
///   read timeout (which hyper also applies to idle keep-alive connections);
/// - with `cores`, each connection is served on the core runtime with the fewest open
///   connections (see [`per_core`]); without, on the caller's runtime;
/// - when `shutdown` resolves the listener is closed at once (new connections are refused), idle
///   connections close, in-flight requests and streams may finish for `drain_timeout`; whatever
///   is still open then is cut.
pub async fn serve_router<A, B, F>(
    listener: TcpListener,
    app: A,
    limits: ConnectionLimits,
    cores: Option<&CoreRuntimes>,
    shutdown: F,
) where
    A: ConnectionApp<B>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    F: Future<Output = ()> + Send,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut saturated = false;
    tokio::pin!(shutdown);
    loop {
        if slots.available_permits() == 0 && !saturated {
            tracing::warn!(
                max_connections = limits.max_connections,
                "connection limit reached: new connections wait until one closes"
            );
        }
        saturated = slots.available_permits() == 0;
        let next = async {
            let slot = slots.clone().acquire_owned().await;
            (slot, listener.accept().await)
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            (slot, accepted) = next => {
                // The semaphore is never closed.
                let Ok(slot) = slot else { break };
                match accepted {
                    Ok((stream, peer)) => {
                        let conn = Connection {
                            peer,
                            app: app.for_peer(peer),
                            header_read_timeout: limits.header_read_timeout,
                            stopping: stopping_rx.clone(),
                            _slot: slot,
                        };
                        match cores.and_then(CoreRuntimes::place) {
                            None => {
                                connections.spawn(conn.serve(stream));
                            }
                            // The socket moves to the core's own reactor.
                            Some((core, placement)) => match stream.into_std() {
                                Ok(stream) => {
                                    connections.spawn_on(
                                        async move {
                                            let _placement = placement;
                                            match TcpStream::from_std(stream) {
                                                Ok(stream) => conn.serve(stream).await,
                                                Err(e) => tracing::debug!(error = %e, "cannot move a connection to its core"),
                                            }
                                        },
                                        &core,
                                    );
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "cannot move a connection to its core");
                                }
                            },
                        }
                    }
                    Err(e) if is_per_connection(&e) => {
                        tracing::debug!(error = %e, "accept: connection failed before it was accepted");
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::error!(error = %e, "accept failed; retrying in 100 ms");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                }
            }
        }
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            secs = limits.drain_timeout.as_secs(),
            open = connections.len(),
            "drain timeout: closing the connections still open"
        );
        connections.shutdown().await;
    }
}

fn is_per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// One accepted HTTP/1 connection; `_slot` is its place under `max_connections`, freed when it
/// ends.
struct Connection<A> {
    peer: SocketAddr,
    app: A,
    header_read_timeout: Duration,
    stopping: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
}

impl<A> Connection<A> {
    async fn serve<B>(self, stream: TcpStream)
    where
        A: HttpService<B>,
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Connection {
            peer,
            app,
            header_read_timeout,
            mut stopping,
            _slot,
        } = self;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = InPlace {
            app: std::sync::Mutex::new(app),
            body: std::marker::PhantomData,
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(true);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let shutdown_requested = async {
            if stopping.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = shutdown_requested => {
                // Idle: closes now; mid-request: after the response (no more keep-alive).
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            // Header timeouts, clients gone mid-request, malformed requests: the client's business.
            tracing::debug!(error = %e, %peer, "connection ended with an error");
        }
    }
}

/// hyper's service for one connection: the connection's app called in place when it is ready
/// (the BFF's stack always is) — no clone of the stack and no `Oneshot` per request (with CORS
/// configured, a clone copied its origin list). hyper calls one request at a time per HTTP/1
/// connection; the lock is never contended.
struct InPlace<A, B> {
    app: std::sync::Mutex<A>,
    /// The response body type `A` answers with.
    body: std::marker::PhantomData<fn() -> B>,
}

impl<A, B> hyper::service::Service<hyper::Request<Incoming>> for InPlace<A, B>
where
    A: HttpService<B>,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = futures_util::future::Either<A::Future, Oneshot<A, Request<Body>>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        use futures_util::future::Either;
        let req = req.map(Body::new);
        let mut app = self
            .app
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut cx = Context::from_waker(Waker::noop());
        match app.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Either::Left(app.call(req)),
            Poll::Ready(Err(never)) => match never {},
            // Not ready: a clone waits for readiness, as tower's contract asks.
            Poll::Pending => Either::Right(app.clone().oneshot(req)),
        }
    }
}

/// The separate metrics listener, when `telemetry.metrics_addr` is set.
async fn state_metrics_listener(
    state: &AppState,
) -> Result<Option<(TcpListener, axum::Router)>, ServeError> {
    let addr = &state.config.telemetry.metrics_addr;
    if addr.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = addr.parse().map_err(|_| {
        StartupError::Config(crate::config::ConfigError::Invalid {
            key: "telemetry.metrics_addr".into(),
            reason: "not an address".into(),
        })
    })?;
    let listener = bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    Ok(Some((listener, crate::app::metrics_router(state.clone()))))
}

/// `librechat-bff worker`: provisioning workers only, until SIGINT/SIGTERM.
pub async fn run_worker(state: AppState) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = state.provisioner.spawn_worker(stop_rx);
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = worker.await;
    tracing::info!("worker stopped");
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        future::{ready, Ready},
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::{Context, Poll},
        time::Duration,
    };

    use axum::{
        body::Body,
        http::{Request, Response},
    };
    use tokio::net::TcpListener;

    use super::{serve_router, ConnectionLimits};
    use crate::app::PeerInExtensions;

    /// Counts its clones; not ready at its first `poll_ready` when `pending_first`.
    struct Counted {
        clones: Arc<AtomicUsize>,
        pending_first: bool,
    }

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Self {
                clones: self.clones.clone(),
                pending_first: self.pending_first,
            }
        }
    }

    impl tower::Service<Request<Body>> for Counted {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if std::mem::take(&mut self.pending_first) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<Body>) -> Self::Future {
            ready(Ok(Response::new(Body::from("ok"))))
        }
    }

    /// Serves `app`, sends three requests on one keep-alive connection, returns the clones made.
    async fn clones_for_three_requests(pending_first: bool) -> usize {
        let clones = Arc::new(AtomicUsize::new(0));
        let app = PeerInExtensions(Counted {
            clones: clones.clone(),
            pending_first,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10,
            drain_timeout: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_router(listener, app, limits, None, async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        for _ in 0..3 {
            let res = tokio::time::timeout(
                Duration::from_secs(10),
                client.get(format!("http://{addr}/")).send(),
            )
            .await
            .expect("answered in time")
            .expect("response");
            assert_eq!(res.text().await.expect("body"), "ok");
        }
        let _ = stop.send(());
        server.await.expect("server");
        clones.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_ready_app_is_called_in_place_without_a_clone_per_request() {
        // One clone: the connection's own app (`for_peer`); none per request.
        assert_eq!(clones_for_three_requests(false).await, 1);
    }

    #[tokio::test]
    async fn an_app_not_ready_is_waited_for_through_a_clone() {
        // The connection's app, then one clone for the request that found it not ready.
        assert_eq!(clones_for_three_requests(true).await, 2);
    }
}
