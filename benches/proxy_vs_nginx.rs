//! `cargo bench --bench proxy_vs_nginx [-- OPTIONS]`: the proxied request and the held SSE stream,
//! librechat-bff against nginx, side by side in one run with alternating rounds (issue 12).
//!
//! Three modes (all by default; `--modes throughput,sse,held` picks some):
//!
//! - **throughput**: `GET /api/chat/convos` loaded by `wrk -t1 --latency` at each of
//!   `--connections` (8,64,256), `--rounds` times, the targets alternating within each round:
//!   the upstream itself (nginx `return 200` with a LibreChat-like JSON: the limit), nginx
//!   `proxy_pass` with a keep-alive upstream pool, a bare hyper proxy (this binary run with
//!   `--bare-proxy LISTEN ORIGIN`: hyper's server and hyper-util's pooled client on one
//!   current-thread runtime per core like the BFF, but hyper-util's pool rather than the BFF's,
//!   glibc's malloc, and no auth, logging or metrics: the floor of the BFF's stack), the BFF with a cookie session in a real Redis
//!   (read once, then from the replica's in-process copy), and the BFF with a Bearer identity JWT. Per run:
//!   req/s, p50/p99, the server's CPU per request (utime+stime of every thread, from
//!   `/proc/PID/stat`) and its context switches per request (voluntary + involuntary, summed over
//!   `/proc/PID/task/*/status`).
//! - **sse**: an SSE emitter inside this process stamps each frame with its emit time; a client
//!   reads the frames directly, through nginx and through the BFF; per-frame latency
//!   (median/p99) and what each proxy adds over direct.
//! - **held**: `--streams` (5,000) idle SSE streams held open through nginx, then through the
//!   BFF (`--bursts` times): RSS per stream, and RSS after they close against the start.
//!
//! The upstream for `/api/auth/*` is always the fake LibreChat (the BFF signs in there), through
//! nginx's `proxy_pass` in the throughput mode and through the emitter in the others.
//!
//! Options (also as environment variables: `--rounds` is `BENCH_ROUNDS`, and so on):
//! `--smoke` (every mode, tiny: 1 round of 1 s, 50 streams; exits non-zero when anything fails;
//! what `cargo test --all-targets` runs, with the debug binary, so `scripts/test.sh` runs it), `--modes`, `--rounds N`, `--secs N`, `--connections 8,64,256`,
//! `--streams N`, `--bursts N`, `--settle-secs N` (RSS again this long after the close),
//! `--sse-frames N`, `--sse-interval-ms N`, `--sse-streams N` (concurrent streams per path), `--held-auth cookie|bearer`,
//! `--bff-bin PATH` (another build of the binary, for A/B), `--bff-env 'K=V K=V'` (extra
//! environment for the BFF, e.g. `LD_PRELOAD=...` or `MALLOC_ARENA_MAX=2`). `PERF_OUT=FILE`
//! records a `perf` profile of the BFF during each of its throughput runs (`FILE.cookie.c64.r1`...).
//!
//! Needs `nginx`, `wrk` and `redis-server`; when one is missing it runs
//! `scripts/bench-deps.sh`, which installs them from Debian.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    Request, Response, StatusCode,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use librechat_bff::{
    app::AppState,
    config::Config,
    credentials::{
        vault::{CredentialStatus, Password},
        KeyRing,
    },
};
use support::{
    bff::Browser,
    fake_idp::{FakeIdp, FakeIdpOptions, FakeUser},
    fake_librechat::{FakeLibreChat, FakeLibreChatOptions},
    redis::RedisServer,
    wait::{eventually, free_port},
    world::{BROWSER_UA, ID_PASSWORD},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Throughput,
    Sse,
    Held,
}

#[derive(Clone, Debug)]
struct Opts {
    smoke: bool,
    modes: Vec<Mode>,
    rounds: usize,
    secs: u32,
    connections: Vec<u32>,
    streams: usize,
    bursts: usize,
    settle_secs: u64,
    sse_frames: usize,
    sse_interval_ms: u64,
    sse_streams: usize,
    /// Held streams through the BFF signed in with the session cookie (default) or Bearer.
    held_bearer: bool,
    bff_bin: PathBuf,
    bff_env: Vec<(String, String)>,
}

impl Opts {
    fn parse() -> Opts {
        let mut given: HashMap<String, String> = HashMap::new();
        let mut smoke = false;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => {}
                "--smoke" => smoke = true,
                "--help" | "-h" => {
                    println!("see the module documentation of benches/proxy_vs_nginx.rs");
                    std::process::exit(0);
                }
                a if a.starts_with("--") => {
                    let (key, value) = match a.split_once('=') {
                        Some((k, v)) => (k.to_owned(), v.to_owned()),
                        None => (
                            a.to_owned(),
                            args.next()
                                .unwrap_or_else(|| die(&format!("{a} needs a value"))),
                        ),
                    };
                    given.insert(key.trim_start_matches("--").replace('-', "_"), value);
                }
                // `cargo bench` may pass a name filter: ignored.
                _ => {}
            }
        }
        smoke |= std::env::var("BENCH_SMOKE").is_ok_and(|v| v == "1");
        // `cargo test --all-targets` runs a bench without `--bench`: the smoke run, with the
        // test profile's (debug) binary, so CI needs no release build to keep this from rotting.
        smoke |= !std::env::args().any(|a| a == "--bench");
        let get = |key: &str| -> Option<String> {
            given
                .get(key)
                .cloned()
                .or_else(|| std::env::var(format!("BENCH_{}", key.to_uppercase())).ok())
        };
        fn num<T: std::str::FromStr>(key: &str, v: Option<String>, default: T) -> T {
            match v {
                Some(s) => s
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| die(&format!("--{key}: not a number: {s}"))),
                None => default,
            }
        }
        let modes = match get("modes") {
            Some(list) => list
                .split(',')
                .map(|m| match m.trim() {
                    "throughput" => Mode::Throughput,
                    "sse" => Mode::Sse,
                    "held" => Mode::Held,
                    other => die(&format!("unknown mode {other:?} (throughput, sse, held)")),
                })
                .collect(),
            None => vec![Mode::Throughput, Mode::Sse, Mode::Held],
        };
        let connections = match get("connections") {
            Some(list) => list
                .split(',')
                .map(|c| num("connections", Some(c.to_owned()), 0u32))
                .collect(),
            None if smoke => vec![8],
            None => vec![8, 64, 256],
        };
        let bff_env = get("bff_env")
            .map(|s| {
                s.split_whitespace()
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => (k.to_owned(), v.to_owned()),
                        None => die(&format!("--bff-env: {kv:?} is not KEY=VALUE")),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Opts {
            smoke,
            modes,
            rounds: num("rounds", get("rounds"), if smoke { 1 } else { 3 }),
            secs: num("secs", get("secs"), if smoke { 1 } else { 8 }),
            connections,
            streams: num("streams", get("streams"), if smoke { 50 } else { 5_000 }),
            bursts: num("bursts", get("bursts"), if smoke { 1 } else { 2 }),
            settle_secs: num("settle_secs", get("settle_secs"), if smoke { 0 } else { 5 }),
            sse_frames: num(
                "sse_frames",
                get("sse_frames"),
                if smoke { 20 } else { 200 },
            ),
            sse_interval_ms: num("sse_interval_ms", get("sse_interval_ms"), 5),
            sse_streams: num("sse_streams", get("sse_streams"), if smoke { 2 } else { 4 }),
            held_bearer: match get("held_auth").as_deref() {
                None | Some("cookie") => false,
                Some("bearer") => true,
                Some(other) => die(&format!("--held-auth: cookie or bearer, not {other:?}")),
            },
            bff_bin: get("bff_bin")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_librechat-bff"))),
            bff_env,
        }
    }
}

fn die(msg: &str) -> ! {
    eprintln!("proxy_vs_nginx: {msg}");
    std::process::exit(2)
}

// ---------------------------------------------------------------------------------------------
// /proc and the process limits
// ---------------------------------------------------------------------------------------------

/// Raises this process's open-file limit to its hard limit (children inherit it); returns it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of the whole process (every thread, live or exited), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the parenthesised command name: state is field 3, utime/stime are fields 14/15.
    let Some((_, rest)) = text.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Voluntary + involuntary context switches summed over the process's threads.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches:")
                || line.starts_with("nonvoluntary_ctxt_switches:")
            {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `kB` line of /proc/PID/status (`VmRSS:`, `RssAnon:`, `RssFile:`).
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// "anon A KiB + file F KiB": what the RSS is made of (file: the binary's and libraries' pages).
fn rss_parts(pid: u32) -> String {
    format!(
        "anon {} + file {} KiB",
        status_kib(pid, "RssAnon:"),
        status_kib(pid, "RssFile:")
    )
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ---------------------------------------------------------------------------------------------
// Processes: nginx and the BFF
// ---------------------------------------------------------------------------------------------

/// A child process, killed when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the tail of its log when the process has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("{} exited ({status}):\n{tail}", self.name);
        }
    }
}

impl Drop for Proc {
    /// SIGTERM (a graceful exit, so e.g. a profiler wrapped around it writes its output), then
    /// SIGKILL if it is still running 10 s later.
    fn drop(&mut self) {
        // SAFETY: a signal to our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &str, mut cmd: Command, dir: &Path, env: &[(String, String)], port: u16) -> Proc {
    let log = dir.join(format!("{}.log", name.replace(' ', "-")));
    let file = std::fs::File::create(&log).expect("log file");
    let child = cmd
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let mut proc = Proc {
        name: name.to_owned(),
        child,
        log,
    };
    // A separate process: nothing to await but its port. Generous: a BFF wrapped in valgrind
    // (`--bff-bin` a script running dhat or massif) takes most of a minute to listen.
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        proc.check_alive();
        assert!(Instant::now() < deadline, "{name} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// `daemon off; master_process off`: one process, so its /proc numbers are the whole server.
fn nginx(name: &str, dir: &Path, port: u16, nofile: u64, http: &str) -> Proc {
    let d = dir.join(name.replace(' ', "-"));
    std::fs::create_dir_all(&d).expect("nginx dir");
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections {nofile}; multi_accept on; }}\n\
         http {{\n access_log off;\n keepalive_requests 1000000;\n keepalive_timeout 300s;\n\
         client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         {http}\n}}\n",
        d = d.display()
    );
    let path = d.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let mut cmd = Command::new("nginx");
    cmd.args([
        "-c",
        &path.display().to_string(),
        "-p",
        &d.display().to_string(),
    ]);
    spawn(name, cmd, dir, &[], port)
}

/// A LibreChat-like `GET /api/convos` answer (~1.3 KB).
fn convos_json() -> String {
    let mut convos = Vec::new();
    for i in 0..5 {
        convos.push(format!(
            "{{\"conversationId\":\"6f1c2d3e-4b5a-4c6d-8e7f-90a1b2c3d4e{i}\",\"title\":\"Bench conversation {i}\",\
             \"user\":\"665f1c2d3e4b5a6c7d8e9f00\",\"endpoint\":\"openAI\",\"model\":\"gpt-4o\",\
             \"isArchived\":false,\"tags\":[],\"createdAt\":\"2025-01-0{}T10:00:00.000Z\",\
             \"updatedAt\":\"2025-01-0{}T10:05:00.000Z\"}}",
            i + 1,
            i + 1
        ));
    }
    format!(
        "{{\"conversations\":[{}],\"nextCursor\":null}}",
        convos.join(",")
    )
}

/// Everything the modes share: Redis, the fake identity service and LibreChat, the SSE
/// emitter, the nginx upstream, the seeded user and the BFF's base environment.
struct World {
    opts: Opts,
    dir: tempfile::TempDir,
    nofile: u64,
    redis: RedisServer,
    _idp: FakeIdp,
    _lc: FakeLibreChat,
    emitter: Emitter,
    origin: Proc,
    origin_port: u16,
    bff_env: Vec<(String, String)>,
    bearer: String,
}

const USER_ID: i64 = 1;

impl World {
    async fn start(opts: Opts, nofile: u64) -> World {
        let dir = tempfile::tempdir().expect("tmp");
        let redis = RedisServer::start().await;
        let idp = FakeIdp::start(FakeIdpOptions::default()).await;
        let lc = FakeLibreChat::start(FakeLibreChatOptions {
            login_max: 1_000_000,
            ban_violations: false,
            ..FakeLibreChatOptions::default()
        })
        .await;
        let email = "bench@example.com";
        idp.add_user(FakeUser {
            id: USER_ID,
            username: "bench".into(),
            email: email.into(),
            password: ID_PASSWORD.into(),
            name: "Bench".into(),
            groups: vec![],
            is_active: true,
        });
        let lc_password = "bench-password-123456";
        lc.create_user(email, lc_password, "Bench");
        let lc_addr: SocketAddr = lc
            .base_url
            .trim_start_matches("http://")
            .parse()
            .expect("fake LibreChat address");
        let emitter = Emitter::start(lc_addr);

        let origin_port = free_port();
        let origin = nginx(
            "nginx upstream",
            dir.path(),
            origin_port,
            nofile,
            &format!(
                " upstream lc {{ server {lc_addr}; keepalive 16; }}\n\
                 server {{\n  listen 127.0.0.1:{origin_port} backlog=4096;\n\
                   location /api/auth/ {{ proxy_pass http://lc; proxy_http_version 1.1; \
                   proxy_set_header Connection \"\"; }}\n\
                   location /api/ {{ default_type application/json; return 200 '{}'; }}\n }}",
                convos_json()
            ),
        );

        let env: Vec<(String, String)> = [
            ("BFF__SESSION__STORE", "redis".to_owned()),
            ("BFF__REDIS__URL", redis.url()),
            ("BFF__REDIS__KEY_PREFIX", redis.key_prefix()),
            ("BFF__CRYPTO__FERNET_KEYS", KeyRing::generate_key()),
            ("BFF__IDENTITY__BASE_URL", idp.base_url.clone()),
            (
                "BFF__IDENTITY__JWT__HS_SECRET",
                idp.hs_secret().expect("HS256 secret"),
            ),
            (
                "BFF__LIBRECHAT__URL",
                format!("http://127.0.0.1:{origin_port}"),
            ),
            ("BFF__LIBRECHAT__STREAM_IDLE_TIMEOUT_SECS", "3600".into()),
            ("BFF__PROVISIONING__WORKERS_IN_SERVE", "false".into()),
            ("BFF__TELEMETRY__LOG_LEVEL", "warn".into()),
            (
                "BFF__SERVER__MAX_CONNECTIONS",
                (4 * opts.streams + 1024).to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        // The vault record the BFF signs in to LibreChat with, written the way the BFF does.
        let state = AppState::new(Config::load_with_env(None, env.clone()).expect("config"))
            .expect("state");
        let record = state.vault.new_record(
            &USER_ID.to_string(),
            email,
            None,
            &Password::new(lc_password),
            CredentialStatus::Ready,
        );
        state.vault.put(&record).await.expect("seed vault");
        drop(state);
        let bearer = idp.mint_access(USER_ID, Duration::from_secs(24 * 3600));
        World {
            opts,
            dir,
            nofile,
            redis,
            _idp: idp,
            _lc: lc,
            emitter,
            origin,
            origin_port,
            bff_env: env,
            bearer,
        }
    }

    /// The BFF with LibreChat at `librechat_url`, signed in: (process, port, cookie header).
    async fn bff(&self, name: &str, librechat_url: &str) -> (Proc, u16, String) {
        let port = free_port();
        let mut env = self.bff_env.clone();
        env.retain(|(k, _)| k != "BFF__LIBRECHAT__URL");
        env.push(("BFF__LIBRECHAT__URL".into(), librechat_url.to_owned()));
        env.push(("BFF__SERVER__LISTEN".into(), format!("127.0.0.1:{port}")));
        env.extend(self.opts.bff_env.iter().cloned());
        let mut cmd = Command::new(&self.opts.bff_bin);
        cmd.arg("serve").env_remove("RUST_LOG");
        let proc = spawn(name, cmd, self.dir.path(), &env, port);
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser::new(&base);
        let res = browser.login("bench", ID_PASSWORD).await;
        assert_eq!(
            res.status,
            StatusCode::OK,
            "{name}: sign-in failed: {}",
            res.body
        );
        let cookie = browser.cookie.clone().expect("session cookie");
        (proc, port, cookie)
    }

    fn nginx_proxy(&self, name: &str) -> (Proc, u16) {
        let port = free_port();
        let proc = nginx(
            name,
            self.dir.path(),
            port,
            self.nofile,
            &format!(
                " upstream origin {{ server 127.0.0.1:{o}; keepalive 64; keepalive_requests 1000000; }}\n\
                 upstream emitter {{ server {e}; keepalive 64; }}\n\
                 server {{\n  listen 127.0.0.1:{port} backlog=4096;\n\
                   location /api/chat/sse/ {{ proxy_pass http://emitter/api/sse/; \
                   proxy_http_version 1.1; proxy_set_header Connection \"\"; \
                   proxy_buffering off; proxy_read_timeout 1h; }}\n\
                   location /api/chat/ {{ proxy_pass http://origin/api/; proxy_http_version 1.1; \
                   proxy_set_header Connection \"\"; \
                   proxy_set_header X-Forwarded-For $remote_addr; }}\n }}",
                o = self.origin_port,
                e = self.emitter.addr,
            ),
        );
        (proc, port)
    }
}

// ---------------------------------------------------------------------------------------------
// The SSE emitter (LibreChat's stand-in for streams) on a thread of its own
// ---------------------------------------------------------------------------------------------

type EmitBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Monotonic nanoseconds since the first call: frames carry their emit time in it.
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// `/api/sse/frames?n=N&ms=M`: N frames M ms apart, each `{"t":<emit ns>,...}`.
/// `/api/sse/idle`: one comment frame, then nothing until the connection closes.
/// `/api/auth/*`: forwarded to the fake LibreChat (so the BFF can sign in).
struct Emitter {
    addr: SocketAddr,
    /// Idle streams open right now.
    idle: watch::Receiver<usize>,
}

struct IdleGuard(watch::Sender<usize>);

impl Drop for IdleGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Emitter {
    fn start(librechat: SocketAddr) -> Emitter {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("emitter bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("emitter addr");
        let (idle_tx, idle) = watch::channel(0usize);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("emitter runtime");
        std::thread::Builder::new()
            .name("sse-emitter".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("emitter listener");
                    let client: Client<HttpConnector, Incoming> =
                        Client::builder(TokioExecutor::new()).build_http();
                    loop {
                        let Ok((socket, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = socket.set_nodelay(true);
                        let client = client.clone();
                        let idle_tx = idle_tx.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                emit(req, client.clone(), librechat, idle_tx.clone())
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(socket), service)
                                .await;
                        });
                    }
                });
            })
            .expect("emitter thread");
        Emitter { addr, idle }
    }

    /// Waits until no idle stream is open (the proxy in front closed them all).
    async fn all_idle_closed(&self, within: Duration) -> Result<(), usize> {
        let mut rx = self.idle.clone();
        let closed = tokio::time::timeout(within, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok());
        if closed {
            Ok(())
        } else {
            Err(*self.idle.borrow())
        }
    }
}

const PAD: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor \
                   incididunt ut labore et dolore magna aliqua.";

async fn emit(
    req: Request<Incoming>,
    client: Client<HttpConnector, Incoming>,
    librechat: SocketAddr,
    idle: watch::Sender<usize>,
) -> Result<Response<EmitBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let sse = |body: EmitBody| {
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(body)
            .expect("response")
    };
    if path.starts_with("/api/auth/") {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = format!("http://{librechat}{pq}").parse().expect("uri");
        return Ok(
            match client.request(Request::from_parts(parts, body)).await {
                Ok(res) => res.map(|b| b.map_err(Into::into).boxed()),
                Err(e) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(
                        http_body_util::Full::new(Bytes::from(e.to_string()))
                            .map_err(Into::into)
                            .boxed(),
                    )
                    .expect("response"),
            },
        );
    }
    if path == "/api/sse/frames" {
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str, default: u64| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let n = param("n", 100);
        let gap = Duration::from_millis(param("ms", 5));
        let mut interval = tokio::time::interval(gap);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let frames = stream::unfold((0u64, interval), move |(i, mut interval)| async move {
            if i >= n {
                return None;
            }
            interval.tick().await;
            let frame = format!(
                "event: message\ndata: {{\"t\":{},\"seq\":{i},\"text\":\"{PAD}\"}}\n\n",
                now_ns()
            );
            Some((Ok(Frame::data(Bytes::from(frame))), (i + 1, interval)))
        });
        return Ok(sse(BodyExt::boxed(StreamBody::new(frames))));
    }
    if path == "/api/sse/idle" {
        idle.send_modify(|n| *n += 1);
        let guard = IdleGuard(idle);
        let first = stream::once(async { Ok(Frame::data(Bytes::from_static(b": open\n\n"))) });
        // Never ends by itself: dropped (and counted out) when the connection closes.
        let rest = stream::poll_fn(move |_| {
            let _held = &guard;
            std::task::Poll::Pending
        });
        return Ok(sse(BodyExt::boxed(StreamBody::new(first.chain(rest)))));
    }
    Ok(Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Empty::new().map_err(Into::into).boxed())
        .expect("response"))
}

// ---------------------------------------------------------------------------------------------
// Throughput (wrk)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    csw: f64,
    /// Commands Redis processed during the run, per request (the session store's round trips).
    redis: f64,
}

/// wrk's latency ("301.00us", "1.23ms", "1.01s") in milliseconds.
fn parse_latency(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

/// Commands processed so far by the Redis at `url` (`INFO stats`), less the INFO itself.
fn redis_commands(url: &str) -> Result<u64, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis: {e}"))?;
    let mut con = client.get_connection().map_err(|e| format!("redis: {e}"))?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut con)
        .map_err(|e| format!("redis INFO: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "redis INFO: no total_commands_processed".into())
}

fn wrk(
    url: &str,
    headers: &[String],
    c: u32,
    secs: u32,
    pid: u32,
    redis_url: &str,
) -> Result<Sample, String> {
    let commands = redis_commands(redis_url)?;
    let ticks = cpu_ticks(pid);
    let switches = context_switches(pid);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{c}"), &format!("-d{secs}s"), "--latency"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().map_err(|e| format!("wrk: {e}"))?;
    let ticks = cpu_ticks(pid).saturating_sub(ticks);
    let switches = context_switches(pid).saturating_sub(switches);
    // The INFO that reads the count is one command of its own.
    let commands = redis_commands(redis_url)?.saturating_sub(commands + 1);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    if requests == 0.0 {
        return Err(format!("no request answered:\n{text}"));
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        return Err(format!("{url}: {}\n{text}", line.trim()));
    }
    if let Some(line) = text.lines().find(|l| l.contains("Socket errors")) {
        eprintln!("  note: {url} c={c}: {}", line.trim());
    }
    let latency = |pct: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(pct))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(parse_latency)
            .unwrap_or(f64::NAN)
    };
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok(Sample {
        rps,
        p50_ms: latency("50%"),
        p99_ms: latency("99%"),
        cpu_us: ticks as f64 / clock_ticks_per_sec() * 1e6 / requests,
        csw: switches as f64 / requests,
        redis: commands as f64 / requests,
    })
}

struct Target {
    name: &'static str,
    url: String,
    headers: Vec<String>,
    pid: u32,
}

const T_DIRECT: &str = "upstream direct (the limit)";
const T_NGINX: &str = "nginx `proxy_pass`, keep-alive pool, no auth";
const T_BARE: &str = "bare hyper proxy, no auth (the stack's floor)";
const T_COOKIE: &str = "librechat-bff, cookie session (Redis store)";
const T_BEARER: &str = "librechat-bff, Bearer identity JWT";

async fn throughput(world: &World, report: &mut Report) {
    let o = &world.opts;
    let (mut nginx, nginx_port) = world.nginx_proxy("nginx proxy");
    let bare_port = free_port();
    let mut bare = spawn(
        "bare proxy",
        {
            let mut cmd = Command::new(std::env::current_exe().expect("this binary"));
            cmd.arg("--bare-proxy")
                .arg(format!("127.0.0.1:{bare_port}"))
                .arg(format!("127.0.0.1:{}", world.origin_port));
            cmd
        },
        world.dir.path(),
        &[],
        bare_port,
    );
    let (mut bff, bff_port, cookie) = world
        .bff(
            "bff (throughput)",
            &format!("http://127.0.0.1:{}", world.origin_port),
        )
        .await;
    let ua = format!("User-Agent: {BROWSER_UA}");
    let targets = vec![
        Target {
            name: T_DIRECT,
            url: format!("http://127.0.0.1:{}/api/convos", world.origin_port),
            headers: vec![ua.clone()],
            pid: world.origin.pid(),
        },
        Target {
            name: T_NGINX,
            url: format!("http://127.0.0.1:{nginx_port}/api/chat/convos"),
            headers: vec![ua.clone()],
            pid: nginx.pid(),
        },
        Target {
            name: T_BARE,
            url: format!("http://127.0.0.1:{bare_port}/api/chat/convos"),
            headers: vec![ua.clone()],
            pid: bare.pid(),
        },
        Target {
            name: T_COOKIE,
            url: format!("http://127.0.0.1:{bff_port}/api/chat/convos"),
            headers: vec![ua.clone(), format!("Cookie: {cookie}"), "X-CSRF: 1".into()],
            pid: bff.pid(),
        },
        Target {
            name: T_BEARER,
            url: format!("http://127.0.0.1:{bff_port}/api/chat/convos"),
            headers: vec![
                ua.clone(),
                format!("Authorization: Bearer {}", world.bearer),
            ],
            pid: bff.pid(),
        },
    ];
    let (rounds, secs, conns, smoke) = (o.rounds, o.secs, o.connections.clone(), o.smoke);
    let redis_url = world.redis.url();
    // wrk blocks: run it off the runtime that serves the fakes and the emitter's auth.
    let results = tokio::task::spawn_blocking(move || {
        let mut results: Vec<(usize, u32, &'static str, Result<Sample, String>)> = Vec::new();
        if !smoke {
            eprintln!("warm-up: 1 s per target");
            for t in &targets {
                let _ = wrk(&t.url, &t.headers, 64, 1, t.pid, &redis_url);
            }
        }
        for round in 0..rounds {
            for &c in &conns {
                // Alternate the order from round to round.
                let order: Vec<&Target> = if round % 2 == 0 {
                    targets.iter().collect()
                } else {
                    targets.iter().rev().collect()
                };
                for t in order {
                    // PERF_OUT=<file>: a `perf record` profile of the BFF during its runs.
                    let perf = std::env::var("PERF_OUT")
                        .ok()
                        .filter(|_| t.name.starts_with("librechat-bff"))
                        .and_then(|out| {
                            let kind = if t.name.contains("cookie") { "cookie" } else { "bearer" };
                            Command::new("perf")
                                .args(["record", "-F", "499", "-g", "-o"])
                                .arg(format!("{out}.{kind}.c{c}.r{}", round + 1))
                                .args(["-p", &t.pid.to_string(), "--", "sleep"])
                                .arg(secs.saturating_sub(1).max(1).to_string())
                                .stdout(Stdio::null())
                                .stderr(Stdio::null())
                                .spawn()
                                .ok()
                        });
                    let s = wrk(&t.url, &t.headers, c, secs, t.pid, &redis_url);
                    if let Some(mut p) = perf {
                        let _ = p.wait();
                    }
                    match &s {
                        Ok(s) => eprintln!(
                            "round {} c={c:<3} {:<46} {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  CPU {:.1} µs/req  {:.3} cs/req  {:.2} Redis cmds/req",
                            round + 1, t.name, s.rps, s.p50_ms, s.p99_ms, s.cpu_us, s.csw, s.redis
                        ),
                        Err(e) => eprintln!("round {} c={c} {}: FAILED: {e}", round + 1, t.name),
                    }
                    results.push((round, c, t.name, s));
                }
            }
        }
        results
    })
    .await
    .expect("wrk thread");
    nginx.check_alive();
    bare.check_alive();
    bff.check_alive();
    for (round, c, name, r) in results {
        match r {
            Ok(s) => report.samples.push((round, c, name, s)),
            Err(e) => report.fail(format!("throughput {name} c={c}: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SSE per-frame latency
// ---------------------------------------------------------------------------------------------

/// Reads one SSE stream; returns each frame's latency (receive − emit) in microseconds.
async fn sse_stream(
    addr: SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
) -> Result<Vec<f64>, String> {
    let socket = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = socket.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(socket))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::get(path.as_str()).header("host", addr.to_string());
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let res = sender
        .send_request(req.body(Empty::<Bytes>::new()).expect("request"))
        .await
        .map_err(|e| format!("request: {e}"))?;
    if res.status() != StatusCode::OK {
        return Err(format!("{addr}{path}: HTTP {}", res.status()));
    }
    let mut body = res.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut latencies = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let received = now_ns();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 2);
            let t = event
                .split("\"t\":")
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| format!("frame without a timestamp: {event}"))?;
            latencies.push(received.saturating_sub(t) as f64 / 1000.0);
        }
    }
    Ok(latencies)
}

/// (name, address, path and query, extra request headers).
type SsePath = (&'static str, SocketAddr, String, Vec<(String, String)>);

const P_DIRECT: &str = "direct (emitter)";
const P_NGINX: &str = "nginx `proxy_pass`";
const P_BFF: &str = "librechat-bff (cookie)";

async fn sse(world: &World, report: &mut Report) {
    let o = &world.opts;
    let (mut nginx, nginx_port) = world.nginx_proxy("nginx proxy (sse)");
    let (mut bff, bff_port, cookie) = world
        .bff("bff (sse)", &format!("http://{}", world.emitter.addr))
        .await;
    let query = format!("n={}&ms={}", o.sse_frames, o.sse_interval_ms);
    let paths: Vec<SsePath> = vec![
        (
            P_DIRECT,
            world.emitter.addr,
            format!("/api/sse/frames?{query}"),
            vec![],
        ),
        (
            P_NGINX,
            ([127, 0, 0, 1], nginx_port).into(),
            format!("/api/chat/sse/frames?{query}"),
            vec![],
        ),
        (
            P_BFF,
            ([127, 0, 0, 1], bff_port).into(),
            format!("/api/chat/sse/frames?{query}"),
            vec![
                ("cookie".into(), cookie.clone()),
                ("x-csrf".into(), "1".into()),
            ],
        ),
    ];
    let mut all: HashMap<&'static str, Vec<f64>> = HashMap::new();
    for round in 0..o.rounds {
        let order: Vec<_> = if round % 2 == 0 {
            paths.iter().collect()
        } else {
            paths.iter().rev().collect()
        };
        for (name, addr, path, headers) in order {
            let streams = (0..o.sse_streams).map(|_| {
                let mut headers = headers.clone();
                headers.push(("user-agent".into(), BROWSER_UA.into()));
                headers.push(("accept".into(), "text/event-stream".into()));
                tokio::spawn(sse_stream(*addr, path.clone(), headers))
            });
            let mut got = Vec::new();
            for s in futures_util::future::join_all(streams).await {
                match s.expect("sse task") {
                    Ok(l) => {
                        if l.len() != o.sse_frames {
                            report.fail(format!(
                                "sse {name}: {} frames of {}",
                                l.len(),
                                o.sse_frames
                            ));
                        }
                        got.extend(l);
                    }
                    Err(e) => report.fail(format!("sse {name}: {e}")),
                }
            }
            eprintln!(
                "round {} sse {:<24} {} frames  median {:.3} ms  p99 {:.3} ms",
                round + 1,
                name,
                got.len(),
                percentile(&got, 50.0) / 1000.0,
                percentile(&got, 99.0) / 1000.0
            );
            all.entry(name).or_default().extend(got);
        }
    }
    nginx.check_alive();
    bff.check_alive();
    report.sse = [P_DIRECT, P_NGINX, P_BFF]
        .iter()
        .map(|n| (*n, all.remove(n).unwrap_or_default()))
        .collect();
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// Held idle streams: memory
// ---------------------------------------------------------------------------------------------

/// Opens one idle SSE stream and waits for its first frame, so it is open end to end.
async fn open_idle(addr: SocketAddr, request: Arc<Vec<u8>>) -> Result<TcpStream, String> {
    let mut socket = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = socket.set_nodelay(true);
    socket
        .write_all(&request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = socket
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "closed before the first frame: {}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 200") {
                let head = String::from_utf8_lossy(&buf).into_owned();
                return Err(format!("not 200: {head}"));
            }
            if buf.windows(6).any(|w| w == b": open") {
                return Ok(socket);
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Held {
    target: &'static str,
    burst: usize,
    streams: usize,
    start_kib: u64,
    held_kib: u64,
    closed_kib: u64,
    settled_kib: u64,
}

const H_NGINX: &str = "nginx `proxy_pass`";
const H_BFF: &str = "librechat-bff";

async fn held(world: &World, report: &mut Report) {
    let o = &world.opts;
    let (mut nginx, nginx_port) = world.nginx_proxy("nginx proxy (held)");
    let (mut bff, bff_port, cookie) = world
        .bff("bff (held)", &format!("http://{}", world.emitter.addr))
        .await;
    let request = |path: &str, extra: &str| {
        Arc::new(
            format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: {BROWSER_UA}\r\n\
                 Accept: text/event-stream\r\n{extra}\r\n"
            )
            .into_bytes(),
        )
    };
    let targets: Vec<(&'static str, SocketAddr, Arc<Vec<u8>>, u32)> = vec![
        (
            H_NGINX,
            ([127, 0, 0, 1], nginx_port).into(),
            request("/api/chat/sse/idle", ""),
            nginx.pid(),
        ),
        (
            H_BFF,
            ([127, 0, 0, 1], bff_port).into(),
            request(
                "/api/chat/sse/idle",
                &if o.held_bearer {
                    format!("Authorization: Bearer {}\r\n", world.bearer)
                } else {
                    format!("Cookie: {cookie}\r\nX-CSRF: 1\r\n")
                },
            ),
            bff.pid(),
        ),
    ];
    // Warm-up: one stream through each, so lazy start-up work is in the baseline.
    let mut start: HashMap<&'static str, (u64, usize)> = HashMap::new();
    for (name, addr, req, pid) in &targets {
        match open_idle(*addr, req.clone()).await {
            Ok(s) => drop(s),
            Err(e) => report.fail(format!("held {name}: warm-up stream: {e}")),
        }
        if world
            .emitter
            .all_idle_closed(Duration::from_secs(10))
            .await
            .is_err()
        {
            report.fail(format!(
                "held {name}: the warm-up stream was not closed upstream"
            ));
        }
        let fds = wait_fds(*pid, usize::MAX, Duration::ZERO).await;
        start.insert(name, (rss_kib(*pid), fds));
        eprintln!("held {name}: start RSS {}", rss_parts(*pid));
    }
    for burst in 0..o.bursts {
        let order: Vec<_> = if burst % 2 == 0 {
            targets.iter().collect()
        } else {
            targets.iter().rev().collect()
        };
        for (name, addr, req, pid) in order {
            let (start_kib, start_fds) = start[name];
            let opened: Vec<Result<TcpStream, String>> = stream::iter(0..o.streams)
                .map(|_| open_idle(*addr, req.clone()))
                .buffer_unordered(128)
                .collect()
                .await;
            let mut streams = Vec::with_capacity(opened.len());
            let mut errors = Vec::new();
            for r in opened {
                match r {
                    Ok(s) => streams.push(s),
                    Err(e) => errors.push(e),
                }
            }
            if let Some(e) = errors.first() {
                report.fail(format!(
                    "held {name}: {} of {} streams failed, e.g. {e}",
                    errors.len(),
                    o.streams
                ));
            }
            let held_kib = rss_kib(*pid);
            let n = streams.len();
            drop(streams);
            // The proxy has closed every upstream stream: an event the emitter sees.
            if let Err(left) = world.emitter.all_idle_closed(Duration::from_secs(60)).await {
                report.fail(format!(
                    "held {name}: {left} upstream streams still open after the clients left"
                ));
            }
            // And its own sockets are gone (nothing to await in another process: poll).
            let fds = wait_fds(*pid, start_fds + 4, Duration::from_secs(30)).await;
            if fds > start_fds + 4 {
                report.fail(format!(
                    "held {name}: {fds} fds open after close (start {start_fds})"
                ));
            }
            let closed_kib = rss_kib(*pid);
            if o.settle_secs > 0 {
                tokio::time::sleep(Duration::from_secs(o.settle_secs)).await;
            }
            let settled_kib = rss_kib(*pid);
            eprintln!(
                "held {name}: RSS after the close and {} s: {}",
                o.settle_secs,
                rss_parts(*pid)
            );
            let h = Held {
                target: name,
                burst: burst + 1,
                streams: n,
                start_kib,
                held_kib,
                closed_kib,
                settled_kib,
            };
            eprintln!(
                "burst {} held {:<24} {} streams: RSS {} → {} KiB ({:.1} KiB/stream), after close {} KiB, +{}s {} KiB",
                h.burst,
                name,
                n,
                start_kib,
                held_kib,
                per_stream(&h),
                closed_kib,
                o.settle_secs,
                settled_kib
            );
            report.held.push(h);
        }
    }
    nginx.check_alive();
    bff.check_alive();
}

/// Polls the process's fd count until it is at most `target` or `within` has passed.
async fn wait_fds(pid: u32, target: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = open_fds(pid);
        if n <= target || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn per_stream(h: &Held) -> f64 {
    if h.streams == 0 {
        return f64::NAN;
    }
    h.held_kib.saturating_sub(h.start_kib) as f64 / h.streams as f64
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    samples: Vec<(usize, u32, &'static str, Sample)>,
    sse: Vec<(&'static str, Vec<f64>)>,
    held: Vec<Held>,
    failures: Vec<String>,
}

impl Report {
    fn fail(&mut self, what: String) {
        eprintln!("FAILED: {what}");
        self.failures.push(what);
    }

    fn of(&self, c: u32, name: &str) -> Vec<(usize, &Sample)> {
        self.samples
            .iter()
            .filter(|(_, cc, n, _)| *cc == c && *n == name)
            .map(|(r, _, _, s)| (*r, s))
            .collect()
    }

    /// Per-round ratio `f(a) / f(b)` (same round), median over rounds.
    fn ratio(&self, c: u32, a: &str, b: &str, f: impl Fn(&Sample) -> f64) -> f64 {
        let bs = self.of(c, b);
        let ratios: Vec<f64> = self
            .of(c, a)
            .iter()
            .filter_map(|(r, sa)| {
                let sb = bs.iter().find(|(rb, _)| rb == r)?.1;
                Some(f(sa) / f(sb))
            })
            .collect();
        percentile(&ratios, 50.0)
    }

    fn diff(&self, c: u32, a: &str, b: &str, f: impl Fn(&Sample) -> f64) -> f64 {
        let bs = self.of(c, b);
        let diffs: Vec<f64> = self
            .of(c, a)
            .iter()
            .filter_map(|(r, sa)| {
                let sb = bs.iter().find(|(rb, _)| rb == r)?.1;
                Some(f(sa) - f(sb))
            })
            .collect();
        percentile(&diffs, 50.0)
    }

    fn markdown(&self, o: &Opts) -> String {
        let mut md = String::new();
        let machine = machine();
        if !self.samples.is_empty() {
            let _ = writeln!(
                md,
                "### Proxied `GET /api/chat/convos`: wrk -t1 --latency, {} s per run, {} alternating round(s)\n\n\
                 {machine}. Each cell: median of the rounds (min–max). CPU and context switches are the \
                 server process's own (all threads), per request.\n",
                o.secs, o.rounds
            );
            md.push_str("| target | conns | req/s | p50 | p99 | server CPU per request | context switches per request | Redis commands per request |\n|---|---|---|---|---|---|---|---|\n");
            for &c in &o.connections {
                for name in [T_DIRECT, T_NGINX, T_BARE, T_COOKIE, T_BEARER] {
                    let s = self.of(c, name);
                    if s.is_empty() {
                        continue;
                    }
                    let col = |f: &dyn Fn(&Sample) -> f64, fmt: &dyn Fn(f64) -> String| {
                        let v: Vec<f64> = s.iter().map(|(_, x)| f(x)).collect();
                        if v.len() == 1 {
                            fmt(v[0])
                        } else {
                            format!(
                                "{} ({}–{})",
                                fmt(percentile(&v, 50.0)),
                                fmt(percentile(&v, 0.0)),
                                fmt(percentile(&v, 100.0))
                            )
                        }
                    };
                    let _ = writeln!(
                        md,
                        "| {name} | {c} | {} | {} | {} | {} | {} | {} |",
                        col(&|x| x.rps, &|v| format!("{:.0}", v)),
                        col(&|x| x.p50_ms, &|v| format!("{v:.2} ms")),
                        col(&|x| x.p99_ms, &|v| format!("{v:.2} ms")),
                        col(&|x| x.cpu_us, &|v| format!("{v:.1} µs")),
                        col(&|x| x.csw, &|v| format!("{v:.3}")),
                        col(&|x| x.redis, &|v| format!("{v:.2}")),
                    );
                }
            }
            md.push_str("\nRatios against nginx `proxy_pass` (per round, median; goal at 64 connections: req/s ≥ 0.80×, p99 ≤ nginx + 1 ms, CPU ≤ 1.5×); the bare hyper proxy's, the floor of the BFF's stack, alongside:\n\n");
            md.push_str("| conns | cookie req/s | Bearer req/s | bare req/s | cookie p99 − nginx | Bearer p99 − nginx | bare p99 − nginx | cookie CPU/req | Bearer CPU/req | bare CPU/req |\n|---|---|---|---|---|---|---|---|---|---|\n");
            for &c in &o.connections {
                let _ = writeln!(
                    md,
                    "| {c} | {:.2}× | {:.2}× | {:.2}× | {:+.2} ms | {:+.2} ms | {:+.2} ms | {:.2}× | {:.2}× | {:.2}× |",
                    self.ratio(c, T_COOKIE, T_NGINX, |s| s.rps),
                    self.ratio(c, T_BEARER, T_NGINX, |s| s.rps),
                    self.ratio(c, T_BARE, T_NGINX, |s| s.rps),
                    self.diff(c, T_COOKIE, T_NGINX, |s| s.p99_ms),
                    self.diff(c, T_BEARER, T_NGINX, |s| s.p99_ms),
                    self.diff(c, T_BARE, T_NGINX, |s| s.p99_ms),
                    self.ratio(c, T_COOKIE, T_NGINX, |s| s.cpu_us),
                    self.ratio(c, T_BEARER, T_NGINX, |s| s.cpu_us),
                    self.ratio(c, T_BARE, T_NGINX, |s| s.cpu_us),
                );
            }
            let redis = |name: &str| {
                let v: Vec<f64> = self
                    .samples
                    .iter()
                    .filter(|(_, _, n, _)| *n == name)
                    .map(|(_, _, _, s)| s.redis)
                    .collect();
                percentile(&v, 100.0)
            };
            let _ = writeln!(
                md,
                "\nRedis commands per request, most of any run: cookie {:.2}, Bearer {:.2} (goal: at most 1 and 0 on the warm path)\n",
                redis(T_COOKIE),
                redis(T_BEARER)
            );
        }
        if !self.sse.is_empty() {
            let _ = writeln!(
                md,
                "### SSE per-frame latency: {} streams × {} frames every {} ms per path and round, {} round(s)\n",
                o.sse_streams, o.sse_frames, o.sse_interval_ms, o.rounds
            );
            md.push_str("| path | frames | median | p99 | added median vs direct | added p99 vs direct |\n|---|---|---|---|---|---|\n");
            let direct = self
                .sse
                .iter()
                .find(|(n, _)| *n == P_DIRECT)
                .map(|(_, v)| v);
            let (d50, d99) = direct.map_or((f64::NAN, f64::NAN), |v| {
                (percentile(v, 50.0), percentile(v, 99.0))
            });
            let mut added = HashMap::new();
            for (name, v) in &self.sse {
                let (m, p) = (percentile(v, 50.0), percentile(v, 99.0));
                added.insert(*name, m - d50);
                let _ = writeln!(
                    md,
                    "| {name} | {} | {:.3} ms | {:.3} ms | {} | {} |",
                    v.len(),
                    m / 1000.0,
                    p / 1000.0,
                    if *name == P_DIRECT {
                        "—".into()
                    } else {
                        format!("{:+.3} ms", (m - d50) / 1000.0)
                    },
                    if *name == P_DIRECT {
                        "—".into()
                    } else {
                        format!("{:+.3} ms", (p - d99) / 1000.0)
                    },
                );
            }
            if let (Some(b), Some(n)) = (added.get(P_BFF), added.get(P_NGINX)) {
                let _ = writeln!(
                    md,
                    "\nBFF added median − nginx added median: {:+.3} ms (goal ≤ +0.1 ms)\n",
                    (b - n) / 1000.0
                );
            }
        }
        if !self.held.is_empty() {
            let _ = writeln!(
                md,
                "### Held idle SSE streams: {} per burst, {} burst(s), the BFF's signed in with {}; RSS of the proxy process\n",
                o.streams, o.bursts, if o.held_bearer { "a Bearer JWT" } else { "the session cookie" }
            );
            let _ = writeln!(md, "| target | burst | streams | RSS start | RSS held | per stream | RSS after close | after close vs start | +{} s | vs start |\n|---|---|---|---|---|---|---|---|---|---|", o.settle_secs);
            for h in &self.held {
                let rel = |kib: u64| (kib as f64 / h.start_kib.max(1) as f64 - 1.0) * 100.0;
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB | {:+.0} % | {:.1} MiB | {:+.0} % |",
                    h.target,
                    h.burst,
                    h.streams,
                    h.start_kib as f64 / 1024.0,
                    h.held_kib as f64 / 1024.0,
                    per_stream(h),
                    h.closed_kib as f64 / 1024.0,
                    rel(h.closed_kib),
                    h.settled_kib as f64 / 1024.0,
                    rel(h.settled_kib),
                );
            }
            let avg = |name: &str| {
                let v: Vec<f64> = self
                    .held
                    .iter()
                    .filter(|h| h.target == name)
                    .map(per_stream)
                    .collect();
                percentile(&v, 50.0)
            };
            let _ = writeln!(
                md,
                "\nper stream, BFF/nginx: {:.2}× (goal: BFF ≤ 13 KiB per stream, RSS after close within 10 % of the start)\n",
                avg(H_BFF) / avg(H_NGINX)
            );
        }
        md
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores ({cpu}), everything (wrk, upstream, proxies, Redis) on the same machine")
}

// ---------------------------------------------------------------------------------------------

fn ensure_tools() {
    let missing = |tool: &str| {
        Command::new(tool)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
    };
    if ["nginx", "wrk", "redis-server"].iter().any(|t| missing(t)) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-deps.sh");
        eprintln!("installing the bench's tools: {}", script.display());
        let ok = Command::new("bash")
            .arg(&script)
            .status()
            .is_ok_and(|s| s.success());
        if !ok || missing("nginx") || missing("wrk") {
            die("nginx and wrk are needed: run scripts/bench-deps.sh (apt-get install nginx wrk)");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--bare-proxy") {
        match (args.get(2), args.get(3)) {
            (Some(listen), Some(origin)) => bare_proxy(listen, origin),
            _ => die("--bare-proxy LISTEN ORIGIN"),
        }
    }
    let opts = Opts::parse();
    let benching = std::env::args().any(|a| a == "--bench");
    if !benching && std::env::var("SKIP_BENCH_SMOKE").is_ok_and(|v| v == "1") {
        println!("proxy_vs_nginx: smoke run skipped (SKIP_BENCH_SMOKE=1)");
        return;
    }
    ensure_tools();
    let nofile = raise_nofile();
    let needed = 2 * opts.streams as u64 + 1024;
    if opts.modes.contains(&Mode::Held) && nofile < needed {
        die(&format!(
            "the open-file limit is {nofile}; {} held streams need {needed} (ulimit -Hn)",
            opts.streams
        ));
    }
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (report, opts) = runtime.block_on(async move {
        let world = World::start(opts.clone(), nofile).await;
        // The fake LibreChat is reachable through the emitter before anything relies on it.
        eventually(10, "the emitter's /api/auth forwarding", || async {
            let r = reqwest::Client::new()
                .post(format!("http://{}/api/auth/refresh", world.emitter.addr))
                .send()
                .await
                .ok()?;
            (r.status() != StatusCode::BAD_GATEWAY).then_some(())
        })
        .await;
        let mut report = Report::default();
        for mode in &opts.modes {
            match mode {
                Mode::Throughput => throughput(&world, &mut report).await,
                Mode::Sse => sse(&world, &mut report).await,
                Mode::Held => held(&world, &mut report).await,
            }
        }
        (report, opts)
    });
    println!("\n{}", report.markdown(&opts));
    println!(
        "command: cargo bench --bench proxy_vs_nginx -- {}; BFF binary {}{}; took {:.0} s",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" "),
        opts.bff_bin.display(),
        if opts.bff_env.is_empty() {
            String::new()
        } else {
            format!(" with {:?}", opts.bff_env)
        },
        started.elapsed().as_secs_f64()
    );
    if !report.failures.is_empty() {
        eprintln!("{} failure(s):", report.failures.len());
        for f in &report.failures {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// The floor: a bare hyper proxy
// ---------------------------------------------------------------------------------------------

/// `--bare-proxy LISTEN ORIGIN`: `/api/chat/{rest}` → `http://ORIGIN/api/{rest}` with hyper's
/// HTTP/1 server and hyper-util's pooled client, one current-thread runtime per core (as the BFF
/// runs), connections handed out round-robin; `Cookie` and `Host` dropped, an `Authorization`
/// added; no auth, logging or metrics. What the BFF's stack costs before the BFF does anything.
fn bare_proxy(listen: &str, origin: &str) -> ! {
    let listener = std::net::TcpListener::bind(listen).unwrap_or_else(|e| die(&format!("{e}")));
    listener.set_nonblocking(true).expect("nonblocking");
    let origin: &'static str = Box::leak(origin.to_owned().into_boxed_str());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut queues = Vec::new();
    for _ in 0..cores {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        queues.push(tx);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut http = HttpConnector::new();
                http.set_nodelay(true);
                let client: Client<HttpConnector, Incoming> =
                    Client::builder(TokioExecutor::new()).build(http);
                while let Some(socket) = rx.recv().await {
                    let _ = socket.set_nodelay(true);
                    let Ok(socket) = tokio::net::TcpStream::from_std(socket) else {
                        continue;
                    };
                    let client = client.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let client = client.clone();
                            async move {
                                let (mut parts, body) = req.into_parts();
                                let rest =
                                    parts.uri.path().strip_prefix("/api/chat/").unwrap_or("");
                                let mut pq = String::with_capacity(rest.len() + 5);
                                pq.push_str("/api/");
                                pq.push_str(rest);
                                parts.uri = hyper::Uri::builder()
                                    .scheme("http")
                                    .authority(origin)
                                    .path_and_query(pq)
                                    .build()
                                    .expect("uri");
                                parts.headers.remove(hyper::header::COOKIE);
                                parts.headers.remove(hyper::header::HOST);
                                parts.headers.insert(
                                    hyper::header::AUTHORIZATION,
                                    hyper::header::HeaderValue::from_static("Bearer x"),
                                );
                                let res = client.request(Request::from_parts(parts, body)).await;
                                Ok::<_, Infallible>(match res {
                                    Ok(r) => r.map(|b| b.boxed()),
                                    Err(_) => Response::builder()
                                        .status(502)
                                        .body(Empty::new().map_err(|never| match never {}).boxed())
                                        .expect("502"),
                                })
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(socket), service)
                            .await;
                    });
                }
            });
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let mut next = 0usize;
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let Ok(socket) = socket.into_std() else {
                continue;
            };
            let _ = socket.set_nonblocking(true);
            let _ = queues[next % queues.len()].send(socket);
            next += 1;
        }
    })
}
