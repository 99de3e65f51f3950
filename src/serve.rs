//! `serve`: bind, log what runs, answer until SIGINT/SIGTERM, then drain.

use std::{net::SocketAddr, path::Path, time::Duration};

use std::future::IntoFuture;

use tokio::{net::TcpListener, sync::watch};

use crate::{
    app::{router, AppState, StartupError},
    config::{Config, SessionStoreKind},
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
    let metrics_state = state.clone();
    let app = router(state);
    let mut server_stop = stop_rx.clone();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = server_stop.wait_for(|stop| *stop).await;
    });
    let metrics_server = match state_metrics_listener(&metrics_state).await? {
        Some((listener, app)) => {
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
            }))
        }
        None => None,
    };
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // Graceful: the server stops accepting at once and waits for open connections; streams
    // still open after the drain timeout are cut.
    let drain = Duration::from_secs(metrics_state.config.server.drain_timeout_secs);
    let mut server = tokio::spawn(server.into_future());
    let mut stopped = stop_rx.clone();
    let result = tokio::select! {
        r = &mut server => r.unwrap_or(Ok(())),
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!(secs = drain.as_secs(), "drain timeout: closing the connections still open");
            server.abort();
            Ok(())
        }
    };
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
    result?;
    tracing::info!("stopped");
    Ok(())
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
