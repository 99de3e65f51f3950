//! A real `redis-server` for the integration tests, one per test, never a mock.
//!
//! Each instance runs in a fresh temporary directory on its own loopback port, so tests run in
//! parallel without sharing state. Without a local `redis-server` the harness falls back to the
//! Redis named by `REDIS_URL` (tests then isolate themselves with [`RedisServer::key_prefix`]);
//! with neither, it panics: a test that needs Redis fails rather than silently skipping.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rand::RngExt as _;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::{interval, timeout, Instant, MissedTickBehavior};

/// How long a start, restart or stop may take before the harness gives up.
const DEADLINE: Duration = Duration::from_secs(10);
/// Pause between readiness probes.
const POLL: Duration = Duration::from_millis(20);
/// Ports taken by live instances of this process, so two tests never pick the same one (a
/// stopped instance keeps its port reserved for its restart).
static RESERVED_PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();

const INSTALL_HINT: &str = "redis-server was not found on PATH (nor /usr/bin/redis-server) and \
    REDIS_URL is not set. These tests need a real Redis: install it with \
    `apt-get update && apt-get install -y redis-server`, or set REDIS_URL=redis://host:port/, or \
    run scripts/test.sh, which installs it.";

pub struct RedisServer {
    backend: Backend,
    key_prefix: String,
}

/// How a local `redis-server` runs beyond the defaults (loopback, no persistence).
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Append-only file fsynced on every write.
    pub aof: bool,
    /// `requirepass`: the URL then carries it.
    pub password: Option<String>,
    /// TLS only (`--port 0 --tls-port P`).
    pub tls: Option<ServerTls>,
    /// A cluster node (`cluster-enabled yes`) with this node timeout; its bus port is reserved
    /// next to its port.
    pub cluster_node_timeout_ms: Option<u64>,
    /// Also listen on a unix socket in the server's directory ([`RedisServer::unix_url`]).
    pub unix_socket: bool,
}

/// A TLS server's files (from a [`crate::tls::TestCa`]).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: crate::tls::CertFiles,
    pub ca_file: PathBuf,
    /// `tls-auth-clients yes`: clients must present a certificate of the CA.
    pub require_client_cert: bool,
    /// The certificate the harness's own connections present.
    pub client: crate::tls::CertFiles,
}

impl ServerTls {
    /// Server and harness-client certificates from `ca`.
    pub fn from_ca(ca: &crate::tls::TestCa, require_client_cert: bool) -> ServerTls {
        ServerTls {
            cert: ca.issue("redis"),
            ca_file: ca.ca_file().to_owned(),
            require_client_cert,
            client: ca.issue("harness"),
        }
    }

    /// `TlsCertificates` for a client trusting the CA and presenting `client`.
    pub fn certificates(&self, client: Option<&crate::tls::CertFiles>) -> redis::TlsCertificates {
        let read =
            |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        redis::TlsCertificates {
            client_tls: client.map(|c| redis::ClientTlsConfig {
                client_cert: read(&c.cert),
                client_key: read(&c.key),
            }),
            root_cert: Some(read(&self.ca_file)),
        }
    }
}

enum Backend {
    /// A `redis-server` child process owned by this instance.
    Local(Box<Local>),
    /// An externally managed Redis from `REDIS_URL`.
    External { url: String },
}

struct Local {
    binary: PathBuf,
    port: u16,
    /// The cluster bus port (cluster nodes only).
    bus_port: Option<u16>,
    opts: ServerOptions,
    /// `None` while stopped.
    child: Option<Child>,
    /// Dropped last (field order), after the child is killed.
    dir: TempDir,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port in a fresh temp dir, without persistence.
    /// A local `redis-server` is preferred over `REDIS_URL`.
    pub async fn start() -> RedisServer {
        Self::launch(false).await
    }

    /// Starts `redis-server` with an append-only file fsynced on every write, so the data
    /// survives [`stop`](Self::stop) and [`restart`](Self::restart).
    pub async fn start_with_aof() -> RedisServer {
        Self::launch(true).await
    }

    /// A Redis (or cluster) the test runs itself, known by its URL (e.g. a [`RedisCluster`]'s
    /// `redis+cluster://…`), with a fresh key prefix. It cannot be stopped through this handle.
    ///
    /// [`RedisCluster`]: crate::redis_cluster::RedisCluster
    pub fn external(url: String) -> RedisServer {
        RedisServer {
            backend: Backend::External { url },
            key_prefix: format!("t-{:016x}", rand::rng().random::<u64>()),
        }
    }

    /// A local `redis-server` with `opts` (TLS, password, cluster mode need a local binary).
    pub async fn start_with(opts: ServerOptions) -> RedisServer {
        let key_prefix = format!("t-{:016x}", rand::rng().random::<u64>());
        let Some(binary) = find_redis_server() else {
            panic!("{INSTALL_HINT}");
        };
        Self::launch_local(binary, opts, key_prefix).await
    }

    /// `redis://127.0.0.1:PORT/` (or `REDIS_URL` for an external Redis); `rediss://` with TLS,
    /// with `:password@` when one is required.
    pub fn url(&self) -> String {
        match &self.backend {
            Backend::Local(local) => local.url(),
            Backend::External { url } => url.clone(),
        }
    }

    /// A client of this server as the harness connects (TLS: trusting the test CA and
    /// presenting the harness's certificate).
    pub fn client(&self) -> redis::Client {
        match &self.backend {
            Backend::Local(local) => local.client().expect("client of the test redis"),
            Backend::External { url } => redis::Client::open(url.as_str()).expect("REDIS_URL"),
        }
    }

    /// Kills the process at once (SIGKILL: no shutdown, no save), as a crash would. Its port
    /// stays reserved.
    pub async fn kill(&mut self) {
        let local = self.local_mut("kill");
        if let Some(mut child) = local.child.take() {
            let _ = child.kill().await;
        }
    }

    /// `unix:///…/redis.sock` of a server started with [`ServerOptions::unix_socket`].
    pub fn unix_url(&self) -> Option<String> {
        match &self.backend {
            Backend::Local(local) if local.opts.unix_socket => {
                Some(format!("unix://{}", local.socket_path().display()))
            }
            _ => None,
        }
    }

    /// The cluster bus port of a cluster node.
    pub fn bus_port(&self) -> Option<u16> {
        match &self.backend {
            Backend::Local(local) => local.bus_port,
            Backend::External { .. } => None,
        }
    }

    pub fn port(&self) -> u16 {
        match &self.backend {
            Backend::Local(local) => local.port,
            Backend::External { url } => external_port(url),
        }
    }

    /// A prefix unique to this instance (`t-<hex>`), so tests sharing one external Redis do not
    /// see each other's keys.
    pub fn key_prefix(&self) -> String {
        self.key_prefix.clone()
    }

    /// Shuts the server down (`SHUTDOWN NOSAVE`, or a kill if that does not work) and returns
    /// once its port refuses connections. Does nothing if already stopped.
    pub async fn stop(&mut self) {
        let local = self.local_mut("stop");
        let client = local.client().ok();
        let Some(mut child) = local.child.take() else {
            return;
        };
        // The server closes the connection instead of answering, so the result is ignored;
        // the exit of the process below is what counts.
        let _ = timeout(DEADLINE, async {
            let client = client?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("SHUTDOWN")
                .arg("NOSAVE")
                .query_async::<()>(&mut conn)
                .await
                .ok()
        })
        .await;
        if timeout(DEADLINE, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
        let port = local.port;
        let log = local.log_path();
        let deadline = Instant::now() + DEADLINE;
        let mut tick = ticker();
        while tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            if Instant::now() > deadline {
                panic!(
                    "port {port} still accepts connections after redis-server stopped\n{}",
                    read_log(&log)
                );
            }
            tick.tick().await;
        }
    }

    /// Starts the server again on the same port and directory (so an AOF instance gets its
    /// data back) and returns once it answers `PING`. Does nothing if it is running.
    pub async fn restart(&mut self) {
        let local = self.local_mut("restart");
        if local.child.is_some() {
            return;
        }
        local.child = Some(local.spawn());
        if let Err(why) = local.wait_ready().await {
            panic!(
                "redis-server did not come back on port {}: {why}\n{}",
                local.port,
                read_log(&local.log_path())
            );
        }
    }

    async fn launch(aof: bool) -> RedisServer {
        let key_prefix = format!("t-{:016x}", rand::rng().random::<u64>());
        let Some(binary) = find_redis_server() else {
            if let Ok(url) = std::env::var("REDIS_URL") {
                if !url.trim().is_empty() {
                    return RedisServer {
                        backend: Backend::External { url },
                        key_prefix,
                    };
                }
            }
            panic!("{INSTALL_HINT}");
        };
        let opts = ServerOptions {
            aof,
            ..ServerOptions::default()
        };
        Self::launch_local(binary, opts, key_prefix).await
    }

    async fn launch_local(binary: PathBuf, opts: ServerOptions, key_prefix: String) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("bff-redis-")
            .tempdir()
            .expect("create a temp dir for redis-server");
        let mut local = Local {
            binary,
            port: 0,
            bus_port: None,
            opts,
            child: None,
            dir,
        };
        // A port can be taken between probing and redis binding it (by another process); the
        // server then exits at once and another port is tried.
        let mut failures = Vec::new();
        for _ in 0..5 {
            local.port = reserve_port();
            if local.opts.cluster_node_timeout_ms.is_some() {
                local.bus_port = Some(reserve_port());
            }
            local.child = Some(local.spawn());
            match local.wait_ready().await {
                Ok(()) => {
                    return RedisServer {
                        backend: Backend::Local(Box::new(local)),
                        key_prefix,
                    }
                }
                Err(why) => {
                    failures.push(format!("port {}: {why}", local.port));
                    if let Some(mut child) = local.child.take() {
                        let _ = child.kill().await;
                    }
                    release_port(local.port);
                    if let Some(bus) = local.bus_port.take() {
                        release_port(bus);
                    }
                }
            }
        }
        panic!(
            "redis-server ({}) did not start:\n{}\n{}",
            local.binary.display(),
            failures.join("\n"),
            read_log(&local.log_path())
        );
    }

    fn local_mut(&mut self, what: &str) -> &mut Local {
        match &mut self.backend {
            Backend::Local(local) => local,
            Backend::External { url } => panic!(
                "this test needs to {what} Redis, which needs a local redis-server (install it \
                 with `apt-get update && apt-get install -y redis-server`); the external \
                 REDIS_URL={url} cannot be stopped or restarted by the tests"
            ),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Backend::Local(local) = &mut self.backend {
            if let Some(child) = local.child.as_mut() {
                // kill_on_drop would do it too; being explicit documents the intent.
                let _ = child.start_kill();
            }
            release_port(local.port);
            if let Some(bus) = local.bus_port {
                release_port(bus);
            }
        }
    }
}

impl Local {
    fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .opts
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/", self.port)
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.opts.tls {
            Some(tls) => redis::Client::build_with_tls(
                self.url().as_str(),
                tls.certificates(Some(&tls.client)),
            ),
            None => redis::Client::open(self.url().as_str()),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&self) -> Child {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the redis-server log file");
        let log_err = log.try_clone().expect("clone the log file handle");
        let mut cmd = Command::new(&self.binary);
        match &self.opts.tls {
            Some(tls) => {
                cmd.args(["--port", "0"])
                    .arg("--tls-port")
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.cert.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.cert.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca_file)
                    .args([
                        "--tls-auth-clients",
                        if tls.require_client_cert { "yes" } else { "no" },
                    ])
                    // Replicas and the cluster bus speak TLS too.
                    .args(["--tls-replication", "yes"]);
                if self.opts.cluster_node_timeout_ms.is_some() {
                    cmd.args(["--tls-cluster", "yes"]);
                }
            }
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
        }
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--protected-mode", "no"]);
        if self.opts.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        }
        if self.opts.unix_socket {
            cmd.arg("--unixsocket")
                .arg(self.socket_path())
                .args(["--unixsocketperm", "700"]);
        }
        if let Some(password) = &self.opts.password {
            // Replicas authenticate to their master with it too.
            cmd.args(["--requirepass", password, "--masterauth", password]);
        }
        if let Some(timeout_ms) = self.opts.cluster_node_timeout_ms {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .arg("--cluster-node-timeout")
                .arg(timeout_ms.to_string())
                // A replica may always take over (the test kills masters on purpose).
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--cluster-port")
                .arg(self.bus_port.unwrap_or(0).to_string())
                // Replicas sync at once (the default waits 5 s to batch them).
                .args(["--repl-diskless-sync-delay", "0"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()))
    }

    /// Polls `PING` until it answers, the process exits, or the deadline passes.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = self
            .client()
            .map_err(|e| format!("bad url {}: {e}", self.url()))?;
        let deadline = Instant::now() + DEADLINE;
        let mut tick = ticker();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("redis-server exited with {status}"));
                }
            }
            let ping = timeout(Duration::from_secs(1), async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            })
            .await;
            let last_error = match ping {
                Ok(Ok(pong)) if pong == "PONG" => return Ok(()),
                Ok(Ok(other)) => format!("PING answered {other:?}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "PING timed out".to_owned(),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "no PONG within {DEADLINE:?} (last error: {last_error})"
                ));
            }
            tick.tick().await;
        }
    }
}

fn ticker() -> tokio::time::Interval {
    let mut tick = interval(POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

fn find_redis_server() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("redis-server"));
    on_path
        .chain([PathBuf::from("/usr/bin/redis-server")])
        .find(|p| p.is_file())
}

/// Picks a free loopback port below the kernel's ephemeral range.
///
/// Binding port 0 would hand out a port from the ephemeral range, which outgoing connections
/// also use as source ports. While an instance is stopped, a client reconnecting to it (or our
/// own "is it down yet" probe) could then be given that very port as its source and connect to
/// itself (TCP simultaneous open), holding the port and making `restart` fail. Ports below the
/// range are never chosen as source ports, so that cannot happen.
fn reserve_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = if ephemeral_low > 11000 {
        (10000, ephemeral_low)
    } else {
        (ephemeral_low.saturating_add(30000).min(60000), 65000)
    };
    let reserved = RESERVED_PORTS.get_or_init(Default::default);
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(low..high);
        let mut taken = reserved.lock().unwrap_or_else(|e| e.into_inner());
        if taken.contains(&port) {
            continue;
        }
        // Binding and dropping at once proves the port is free now; the listener is closed
        // before redis-server binds it.
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free loopback port found in {low}..{high}");
}

fn release_port(port: u16) {
    if let Some(reserved) = RESERVED_PORTS.get() {
        reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port);
    }
}

fn read_log(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) => format!("--- {} ---\n{log}", path.display()),
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

fn external_port(url: &str) -> u16 {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .unwrap_or_else(|e| panic!("REDIS_URL={url} is not a valid Redis URL: {e}"));
    match info.addr() {
        redis::ConnectionAddr::Tcp(_, port) => *port,
        redis::ConnectionAddr::TcpTls { port, .. } => *port,
        other => panic!("REDIS_URL={url} has no TCP port ({other:?})"),
    }
}
