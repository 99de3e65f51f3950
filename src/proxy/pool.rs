//! Keep-alive HTTP/1 connections to LibreChat, pooled per core runtime.
//!
//! Why not hyper-util's pool: it serves any number of destinations, so every checkout and
//! every return hashes a (scheme, authority) key, and it spawns a task per request to notice
//! when the connection is ready again. There is one destination here: a pool is a stack of idle
//! connections per core (see `per_core`), taken from and given back to on the thread that uses
//! it, and a connection goes back the moment its response body has been read to the end
//! (issue 12: fewer instructions and one task less per proxied request).
//!
//! A connection is only reused when hyper finished its response cleanly; one whose response was
//! dropped half-read is closed with its last handle. Idle connections close after
//! `librechat.pool_idle_timeout_secs`, and at most [`MAX_IDLE_PER_CORE`] are kept per core.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    http::{uri::Authority, uri::Scheme, HeaderValue, Request, Response, Uri},
};
use futures_util::FutureExt;
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use tokio::net::TcpStream;
use tower::ServiceExt;

/// Idle connections kept per core: more than the busiest moment needs is only open sockets.
pub const MAX_IDLE_PER_CORE: usize = 512;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request to LibreChat got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to LibreChat")]
    Connect(#[source] BoxError),
    #[error("HTTP/1 handshake with LibreChat failed")]
    Handshake(#[source] hyper::Error),
    #[error("LibreChat request failed")]
    Request(#[source] hyper::Error),
    #[error("no Tokio runtime to run the LibreChat connection on")]
    NoRuntime,
}

pub struct Pool {
    /// TLS to an https:// LibreChat, plain TCP to an http:// one (with the connect timeout).
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: where the connector connects.
    target: Uri,
    /// The `Host` header of every request.
    host: HeaderValue,
    /// Idle connections per core runtime (index 0: any other thread), most recent last.
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// Whether a core's idle reaper runs.
    reaping: Box<[AtomicBool]>,
    idle_timeout: Duration,
    max_idle: usize,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// A connection checked out for one request.
struct Conn {
    sender: SendRequest<Body>,
    slot: usize,
    /// Taken from the pool (it may have been closed by LibreChat meanwhile) rather than new.
    reused: bool,
}

impl Pool {
    /// `slots`: one per core runtime plus one for other threads.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        scheme: &Scheme,
        authority: &Authority,
        slots: usize,
        idle_timeout: Duration,
    ) -> Result<Self, axum::http::Error> {
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        // The default port is left out, as clients do.
        let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p == default_port => HeaderValue::from_str(authority.host())?,
            _ => HeaderValue::from_str(authority.as_str())?,
        };
        Ok(Self {
            connector,
            target,
            host,
            idle: (0..slots.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            reaping: (0..slots.max(1)).map(|_| AtomicBool::new(false)).collect(),
            idle_timeout,
            max_idle: MAX_IDLE_PER_CORE,
        })
    }

    /// Sends `req` (origin-form URI; `Host` is set here) on a pooled connection, or a new one.
    /// A pooled connection that LibreChat closed before taking the request is skipped: the
    /// request goes out again on the next one (it was not sent, so this is safe for any method).
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        req.headers_mut()
            .insert(axum::http::header::HOST, self.host.clone());
        loop {
            let mut conn = self.checkout().await?;
            match conn.sender.try_send_request(req).await {
                Ok(res) => {
                    return Ok(res.map(|body| PooledBody {
                        inner: body,
                        ended: false,
                        conn: Some(conn),
                        pool: Arc::downgrade(self),
                    }))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if conn.reused => {
                        tracing::debug!(error = %e.error(), "pooled LibreChat connection closed; retrying");
                        req = unsent;
                    }
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    fn slot(&self) -> usize {
        crate::per_core::current() % self.idle.len()
    }

    async fn checkout(self: &Arc<Self>) -> Result<Conn, SendError> {
        let slot = self.slot();
        loop {
            let taken = {
                let mut idle = self.idle[slot].lock().unwrap_or_else(|p| p.into_inner());
                idle.pop()
            };
            let Some(Idle { mut sender, since }) = taken else {
                break;
            };
            if since.elapsed() >= self.idle_timeout || sender.is_closed() {
                continue; // Dropping the last handle closes the connection.
            }
            // Given back when its response ended, the connection may not have asked for the
            // next request yet (it runs on this thread, next): it will, or it closes.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok(Conn {
                    sender,
                    slot,
                    reused: true,
                });
            }
        }
        self.connect(slot).await
    }

    async fn connect(self: &Arc<Self>, slot: usize) -> Result<Conn, SendError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SendError::NoRuntime)?;
        let io = match self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await
            .map_err(SendError::Connect)?
        {
            MaybeHttpsStream::Http(tcp) => Io::Plain(tcp),
            tls @ MaybeHttpsStream::Https(_) => Io::Tls(Box::new(tls)),
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(SendError::Handshake)?;
        // The connection runs on this core, next to the requests that use it. (`map`, not an
        // async block: that would hold the connection twice in the task, measured +1.7 KB.)
        runtime.spawn(connection.map(|ended| {
            if let Err(error) = ended {
                tracing::debug!(%error, "LibreChat connection ended");
            }
        }));
        if !self.reaping[slot].swap(true, Ordering::Relaxed) {
            let reaping = Reaping {
                pool: Arc::downgrade(self),
                slot,
            };
            runtime.spawn(reap(reaping));
        }
        Ok(Conn {
            sender,
            slot,
            reused: false,
        })
    }

    fn give_back(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle[conn.slot]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender: conn.sender,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections in all slots (for tests and the pool's own checks).
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// A connection's socket. TLS state is boxed: inline, it would make every plain-TCP connection
/// (the usual private-network case) 1.1 KB larger for as long as it lives.
enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(Box<MaybeHttpsStream<TokioIo<TcpStream>>>),
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

/// A slot's reaper while it runs: when its task ends, also by its runtime going away (a test's,
/// or the "other threads" slot's), the next connection made for the slot starts another.
struct Reaping {
    pool: Weak<Pool>,
    slot: usize,
}

impl Drop for Reaping {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.reaping[self.slot].store(false, Ordering::Relaxed);
        }
    }
}

/// Closes a slot's connections that have been idle too long, until the pool is gone.
async fn reap(reaping: Reaping) {
    let period = match reaping.pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = reaping.pool.upgrade() else {
            return;
        };
        let expired: Vec<Idle> = {
            let mut idle = pool.idle[reaping.slot]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let timeout = pool.idle_timeout;
            let (keep, expired) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
            *idle = keep;
            expired
        };
        // Closed outside the lock.
        drop(expired);
    }
}

/// LibreChat's response body; its connection goes back to the pool when the body has been read
/// to the end (a body dropped before that closes the connection instead).
pub struct PooledBody {
    inner: Incoming,
    ended: bool,
    conn: Option<Conn>,
    pool: Weak<Pool>,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if !(self.ended || http_body::Body::is_end_stream(&self.inner)) {
            return;
        }
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade()) {
            pool.give_back(conn);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
    };

    /// A LibreChat stand-in speaking raw HTTP/1.1, so what happens to connections is visible:
    /// it counts accepted connections, reports each one that ends, records request heads.
    struct Upstream {
        port: u16,
        accepted: Arc<AtomicUsize>,
        closed: mpsc::UnboundedReceiver<()>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    async fn upstream(close_after_each: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let (a, h) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (h, closed_tx) = (h.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            h.lock().expect("heads").push(head);
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if socket.write_all(answer).await.is_err() {
                                break;
                            }
                            if close_after_each {
                                // Keep-alive as far as the client knows: then gone, as an idle
                                // Node server closes after its keepAliveTimeout.
                                let _ = closed_tx.send(());
                                return;
                            }
                        }
                    }
                    let _ = closed_tx.send(());
                });
            }
        });
        Upstream {
            port,
            accepted,
            closed,
            heads,
        }
    }

    fn pool(port: u16, idle_timeout: Duration) -> Arc<Pool> {
        let tls = crate::tls::http_client_config("librechat.tls_ca_file", None).expect("tls");
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector({
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http
            });
        let authority = Authority::try_from(format!("127.0.0.1:{port}")).expect("authority");
        Arc::new(Pool::new(connector, &Scheme::HTTP, &authority, 1, idle_timeout).expect("pool"))
    }

    /// With the client's `Host` (twice), as the proxy hands requests over: the pool replaces it.
    fn get() -> Request<Body> {
        Request::builder()
            .uri("/api/convos")
            .header("host", "bff.example")
            .header("host", "evil.example")
            .body(Body::empty())
            .expect("request")
    }

    async fn get_to_end(pool: &Arc<Pool>) -> Bytes {
        let res = pool.send(get()).await.expect("response");
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.expect("body").to_bytes()
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn requests_read_to_the_end_reuse_one_connection_and_a_half_read_one_is_closed() {
        let mut up = upstream(false).await;
        let pool = pool(up.port, LONG);
        for _ in 0..10 {
            assert_eq!(get_to_end(&pool).await, "hello");
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
        let heads = up.heads.lock().expect("heads").clone();
        assert_eq!(heads.len(), 10);
        assert!(
            heads[0].starts_with("GET /api/convos HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        let host = format!("host: 127.0.0.1:{}", up.port);
        let head = heads[0].to_ascii_lowercase();
        assert!(head.contains(&host), "{head}");
        assert_eq!(head.matches("host:").count(), 1, "{head}");

        // A response dropped before its end: its connection cannot carry another request.
        let res = pool.send(get()).await.expect("response");
        drop(res);
        assert_eq!(pool.idle_count(), 0);
        tokio::time::timeout(LONG, up.closed.recv())
            .await
            .expect("the half-read connection is closed");
        assert_eq!(get_to_end(&pool).await, "hello");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_librechat_closed_while_idle_cost_no_request() {
        let up = upstream(true).await;
        let pool = pool(up.port, LONG);
        // Each request finds the previous connection closed by the server, noticed or not yet.
        for _ in 0..50 {
            assert_eq!(get_to_end(&pool).await, "hello");
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 50);
    }

    #[tokio::test]
    async fn a_request_queued_on_a_pooled_connection_that_dies_unsent_goes_out_on_a_new_one() {
        let up = upstream(false).await;
        let pool = pool(up.port, LONG);
        // A pooled connection whose task the test drives: polled once, it asks for a request.
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", up.port))
            .await
            .expect("connect");
        let (sender, mut connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        assert!(futures_util::poll!(&mut connection).is_pending());
        assert!(sender.is_ready());
        pool.give_back(Conn {
            sender,
            slot: 0,
            reused: true,
        });
        // The request is queued on it; then the connection dies before writing it.
        let (res, ()) = tokio::join!(pool.send(get()), async {
            tokio::task::yield_now().await;
            drop(connection);
        });
        let res = res.expect("sent again on a new connection");
        assert_eq!(res.status(), 200);
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(up.heads.lock().expect("heads").len(), 1);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let mut up = upstream(false).await;
        let pool = pool(up.port, Duration::from_millis(300));
        assert_eq!(get_to_end(&pool).await, "hello");
        assert_eq!(pool.idle_count(), 1);
        tokio::time::timeout(LONG, up.closed.recv())
            .await
            .expect("the idle connection is closed");
        assert_eq!(pool.idle_count(), 0);
    }

    /// The "other threads" slot serves whichever runtime calls: when the runtime its reaper ran
    /// on is gone, the next connection made for the slot starts another reaper.
    #[test]
    fn a_reaper_gone_with_its_runtime_is_started_again() {
        let server = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        let mut up = server.block_on(upstream(false));
        let pool = pool(up.port, Duration::from_millis(300));
        let caller = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        let first = caller();
        assert_eq!(first.block_on(get_to_end(&pool)), "hello");
        // Its connection and its reaper go with it.
        drop(first);
        caller().block_on(async {
            tokio::time::timeout(LONG, up.closed.recv())
                .await
                .expect("the first runtime's connection is closed");
            assert_eq!(get_to_end(&pool).await, "hello");
            assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
            tokio::time::timeout(Duration::from_secs(10), up.closed.recv())
                .await
                .expect("the idle connection is reaped on this runtime");
            assert_eq!(pool.idle_count(), 0);
        });
    }

    #[tokio::test]
    async fn idle_connections_are_bounded() {
        let mut up = upstream(false).await;
        let mut pool = pool(up.port, LONG);
        Arc::get_mut(&mut pool).expect("sole owner").max_idle = 2;
        // Four at once: four connections, of which two are kept.
        let bodies = futures_util::future::join_all((0..4).map(|_| get_to_end(&pool))).await;
        assert!(bodies.iter().all(|b| b == "hello"));
        assert_eq!(up.accepted.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle_count(), 2);
        for _ in 0..2 {
            tokio::time::timeout(LONG, up.closed.recv())
                .await
                .expect("a connection over the bound is closed");
        }
    }

    #[test]
    fn the_host_header_leaves_out_the_default_port() {
        let tls = crate::tls::http_client_config("x", None).expect("tls");
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(HttpConnector::new());
        let host = |scheme: &Scheme, authority: &'static str| {
            let authority = Authority::from_static(authority);
            Pool::new(connector.clone(), scheme, &authority, 1, LONG)
                .expect("pool")
                .host
        };
        assert_eq!(host(&Scheme::HTTP, "librechat:80"), "librechat");
        assert_eq!(host(&Scheme::HTTPS, "librechat:443"), "librechat");
        assert_eq!(host(&Scheme::HTTP, "librechat:3080"), "librechat:3080");
        assert_eq!(host(&Scheme::HTTPS, "chat.example"), "chat.example");
    }
}
