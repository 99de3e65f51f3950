//! `cargo bench --bench proxy_vs_nginx`: `/api/chat/*` through the BFF (release binary, warm
//! path: Bearer JWT verification, in-process LibreChat token, pooled upstream connection) against
//! nginx `proxy_pass` to the same upstream, both loaded by `wrk` on this machine. The upstream is
//! the fake LibreChat; nginx gets a LibreChat token injected so both do the same upstream work.
//! Needs `nginx` and `wrk` (`apt-get install -y nginx-light wrk`).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use librechat_bff::{
    app::AppState,
    config::Config,
    credentials::{
        vault::{CredentialStatus, Password},
        KeyRing,
    },
};
use serde_json::{json, Value};
use support::{
    fake_idp::{FakeIdp, FakeIdpOptions},
    fake_librechat::{FakeLibreChat, FakeLibreChatOptions},
    redis::RedisServer,
    wait::free_port,
};

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_ok(url: &str, bearer: Option<&str>) {
    let client = reqwest::Client::new();
    for _ in 0..400 {
        let mut req = client.get(url);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Ok(r) = req.send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} never answered 200");
}

/// utime+stime (clock ticks) of `pid` and its direct children.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = |p: &str| -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // Fields after the parenthesised command name; ppid is the 2nd, utime/stime the 12th/13th.
        let rest = text.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            f.get(1)?.parse().ok()?,
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    };
    let mut total = stat(&pid.to_string()).map_or(0, |s| s.1);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((ppid, ticks)) = stat(&name) {
                if ppid == pid {
                    total += ticks;
                }
            }
        }
    }
    total
}

struct WrkResult {
    rps: f64,
    p50: String,
    p99: String,
    /// Server CPU time per request (µs): user + system of the server's processes.
    cpu_us: f64,
}

fn wrk(url: &str, bearer: &str, connections: u32, secs: u32, server_pid: u32) -> WrkResult {
    let before = cpu_ticks(server_pid);
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            "-H",
            &format!("Authorization: Bearer {bearer}"),
            "-H",
            &format!("User-Agent: {UA}"),
            url,
        ])
        .output()
        .expect("wrk runs");
    let ticks = cpu_ticks(server_pid).saturating_sub(before);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_owned()
    };
    if text.contains("Non-2xx") {
        eprintln!("warning: non-2xx answers during the run:\n{text}");
    }
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    // Clock ticks are 1/100 s on Linux.
    let cpu_us = if requests > 0.0 {
        ticks as f64 * 10_000.0 / requests
    } else {
        0.0
    };
    WrkResult {
        rps: field("Requests/sec:").parse().unwrap_or(0.0),
        p50: field("50%"),
        p99: field("99%"),
        cpu_us,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "proxy_vs_nginx: a load benchmark; run it with `cargo bench --bench proxy_vs_nginx`"
        );
        return;
    }
    for tool in ["nginx", "wrk"] {
        if Command::new(tool).arg("-v").output().is_err() {
            eprintln!("{tool} is not installed: apt-get install -y nginx-light wrk");
            std::process::exit(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let redis = RedisServer::start().await;
        let idp = FakeIdp::start(FakeIdpOptions::default()).await;
        let lc = FakeLibreChat::start(FakeLibreChatOptions::default()).await;
        let email = "bench@example.com";
        let lc_password = "bench-password-123456";
        lc.create_user(email, lc_password, "Bench");
        let key = KeyRing::generate_key();
        let env = vec![
            ("BFF__SESSION__STORE".to_string(), "redis".to_string()),
            ("BFF__REDIS__URL".into(), redis.url()),
            ("BFF__REDIS__KEY_PREFIX".into(), redis.key_prefix()),
            ("BFF__CRYPTO__FERNET_KEYS".into(), key.clone()),
            ("BFF__IDENTITY__JWT__HS_SECRET".into(), idp.hs_secret().expect("hs")),
            ("BFF__LIBRECHAT__URL".into(), lc.base_url.clone()),
            ("BFF__PROVISIONING__WORKERS_IN_SERVE".into(), "false".into()),
        ];
        let state = AppState::new(Config::load_with_env(None, env.clone()).expect("config"))
            .expect("state");
        let record = state.vault.new_record(
            "1",
            email,
            None,
            &Password::new(lc_password),
            CredentialStatus::Ready,
        );
        state.vault.put(&record).await.expect("seed vault");
        let bearer = idp.mint_access(1, Duration::from_secs(3600));

        let bff_port = free_port();
        let bff = Killed(
            Command::new(env!("CARGO_BIN_EXE_librechat-bff"))
                .arg("serve")
                .envs(env.iter().cloned())
                .env("BFF__SERVER__LISTEN", format!("127.0.0.1:{bff_port}"))
                .env("RUST_LOG", "error")
                .envs(std::env::var("TOKIO_WORKER_THREADS").ok().map(|t| ("TOKIO_WORKER_THREADS", t)))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("bff"),
        );

        // nginx gets the same user's LibreChat token, obtained the way the BFF does.
        let login: Value = reqwest::Client::new()
            .post(format!("{}/api/auth/login", lc.base_url))
            .header("User-Agent", UA)
            .json(&json!({ "email": email, "password": lc_password }))
            .send()
            .await
            .expect("login")
            .json()
            .await
            .expect("json");
        let lc_token = login["token"].as_str().expect("token").to_owned();
        let nginx_port = free_port();
        let dir = tempfile::tempdir().expect("tmp");
        let upstream = lc.base_url.trim_start_matches("http://");
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d};\n proxy_temp_path {d};\n\
             upstream lc {{ server {upstream}; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:{nginx_port};\n  location /api/chat/ {{\n\
               proxy_pass http://lc/api/;\n   proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n\
               proxy_set_header Authorization \"Bearer {lc_token}\";\n\
               proxy_set_header X-Forwarded-For $remote_addr;\n   proxy_buffering off;\n  }}\n }}\n}}\n",
            d = dir.path().display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("conf");
        let nginx = Killed(
            Command::new("nginx")
                .args(["-c", &conf_path.display().to_string(), "-p", &dir.path().display().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx"),
        );
        let bff_url = format!("http://127.0.0.1:{bff_port}/api/chat/convos");
        let nginx_url = format!("http://127.0.0.1:{nginx_port}/api/chat/convos");
        wait_ok(&bff_url, Some(&bearer)).await;
        wait_ok(&nginx_url, None).await;

        // wrk blocks: run it off the runtime that serves the fakes.
        let (bff_pid, nginx_pid) = (bff.0.id(), nginx.0.id());
        let results = tokio::task::spawn_blocking(move || {
            let mut rows = Vec::new();
            for c in [8, 32] {
                let n = wrk(&nginx_url, "unused", c, 8, nginx_pid);
                // PERF_OUT=<file>: profile the BFF during its runs (perf record).
                let perf = std::env::var("PERF_OUT").ok().map(|out| {
                    Command::new("perf")
                        .args(["record", "-F", "499", "-g", "-o", &format!("{out}.{c}"), "-p", &bff_pid.to_string(), "--", "sleep", "6"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                });
                let b = wrk(&bff_url, &bearer, c, 8, bff_pid);
                if let Some(Ok(mut p)) = perf {
                    let _ = p.wait();
                }
                rows.push((c, n, b));
            }
            rows
        })
        .await
        .expect("wrk");
        println!("GET /api/chat/convos, 8 s per run, wrk -t2 (same 2-core machine as everything else)");
        println!("connections | nginx rps (p50/p99, CPU/req) | BFF rps (p50/p99, CPU/req) | BFF/nginx rps");
        for (c, n, b) in results {
            println!(
                "{c:>11} | {:.0} ({}/{}, {:.0} µs) | {:.0} ({}/{}, {:.0} µs) | {:.2}",
                n.rps, n.p50, n.p99, n.cpu_us, b.rps, b.p50, b.p99, b.cpu_us,
                if n.rps > 0.0 { b.rps / n.rps } else { 0.0 }
            );
        }
    });
}
