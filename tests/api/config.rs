//! Configuration: layering, validation messages that name the key, and `check-config`.

use std::process::Command;

use librechat_bff::config::{Config, ConfigError, SessionStoreKind};

fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load_with_env(
        None,
        env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

fn load_file(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bff.toml");
    std::fs::write(&path, toml).expect("write");
    Config::load_with_env(
        Some(&path),
        env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

fn error_text(r: Result<Config, ConfigError>) -> String {
    r.expect_err("config must be rejected").to_string()
}

#[test]
fn defaults_load_and_are_zero_config() {
    let cfg = load(&[]).expect("defaults");
    assert_eq!(cfg.server.listen, "127.0.0.1:8080");
    assert_eq!(cfg.session.store, SessionStoreKind::Memory);
    assert_eq!(cfg.cookie_name(), "__Host-bff");
    assert_eq!(cfg.identity.jwt.jwks_max_age_secs, 600);
    assert_eq!(cfg.session.memory_cleanup_interval_secs, 60);
}

#[test]
fn file_then_env_layering() {
    let cfg = load_file(
        "[server]\nlisten = \"127.0.0.1:9000\"\n[session]\nidle_timeout_secs = 600\n",
        &[("BFF__SESSION__IDLE_TIMEOUT_SECS", "900")],
    )
    .expect("valid");
    assert_eq!(
        cfg.server.listen, "127.0.0.1:9000",
        "file overrides defaults"
    );
    assert_eq!(cfg.session.idle_timeout_secs, 900, "env overrides the file");
    let cfg = load(&[(
        "BFF__CSRF__ALLOWED_ORIGINS",
        "https://a.example.com,https://b.example.com",
    )])
    .expect("list from env");
    assert_eq!(cfg.csrf.allowed_origins.len(), 2);
}

#[test]
fn unknown_keys_and_sections_are_errors_that_name_them() {
    let msg = error_text(load_file("[session]\nidle_timout_secs = 5\n", &[]));
    assert!(msg.contains("idle_timout_secs"), "{msg}");
    let msg = error_text(load_file("[sesion]\nstore = \"redis\"\n", &[]));
    assert!(msg.contains("sesion"), "{msg}");
    let msg = error_text(load(&[("BFF__SESSION__STOR", "redis")]));
    assert!(msg.contains("stor"), "{msg}");
}

#[test]
fn bad_values_name_the_key_and_the_reason() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("BFF__SERVER__LISTEN", "nonsense")], "server.listen"),
        (&[("BFF__SESSION__STORE", "redis")], "crypto.fernet_keys"),
        (
            &[("BFF__CRYPTO__FERNET_KEYS", "not-a-key")],
            "crypto.fernet_keys[0]",
        ),
        (
            &[
                ("BFF__SESSION__COOKIE_SECURE", "false"),
                ("BFF__SESSION__COOKIE_NAME", "__Host-x"),
            ],
            "session.cookie_name",
        ),
        (
            &[("BFF__IDENTITY__JWT__ALGORITHMS", "HS256,RS256")],
            "identity.jwt.algorithms",
        ),
        (
            &[("BFF__IDENTITY__JWT__ALGORITHMS", "none")],
            "identity.jwt.algorithms",
        ),
        (
            &[("BFF__IDENTITY__JWT__ALGORITHMS", "RS256")],
            "identity.jwt.jwks_url",
        ),
        (
            &[("BFF__CSRF__ALLOWED_ORIGINS", "https://app.example.com/path")],
            "csrf.allowed_origins",
        ),
        (
            &[("BFF__SERVER__TRUSTED_PROXIES", "10.0.0.0/33")],
            "server.trusted_proxies",
        ),
        (
            &[("BFF__SESSION__IDLE_TIMEOUT_SECS", "0")],
            "session.idle_timeout_secs",
        ),
        (&[("BFF__REDIS__URL", "http://localhost")], "redis.url"),
        (
            &[("BFF__IDENTITY__JWT__JWKS_MAX_AGE_SECS", "0")],
            "identity.jwt.jwks_max_age_secs",
        ),
        (
            &[("BFF__SESSION__MEMORY_CLEANUP_INTERVAL_SECS", "0")],
            "session.memory_cleanup_interval_secs",
        ),
        (
            &[("BFF__CSRF__HEADER_NAME", "X Requested By")],
            "csrf.header_name",
        ),
        (
            &[("BFF__REDIS__URL", "redis+cluster://10.0.0.1")],
            "redis.url",
        ),
        (
            &[(
                "BFF__REDIS__URL",
                "rediss://cache.example.com:6380/#insecure",
            )],
            "redis.url",
        ),
        (
            &[("BFF__REDIS__TLS_CA_FILE", "/etc/ca.pem")],
            "redis.tls_ca_file",
        ),
        (
            &[
                ("BFF__REDIS__URL", "rediss://cache.example.com:6380"),
                ("BFF__REDIS__TLS_CERT_FILE", "/etc/client.pem"),
            ],
            "redis.tls_cert_file",
        ),
        (
            &[("BFF__LIBRECHAT__TLS_CA_FILE", "/etc/ca.pem")],
            "librechat.tls_ca_file",
        ),
        (
            &[("BFF__IDENTITY__TLS_CA_FILE", "/etc/ca.pem")],
            "identity.tls_ca_file",
        ),
        (
            &[
                ("BFF__UI__ENABLED", "true"),
                ("BFF__UI__MOUNT_PATH", "/api"),
            ],
            "ui.mount_path",
        ),
        (
            &[("BFF__UI__ENABLED", "true"), ("BFF__UI__MOUNT_PATH", "/")],
            "ui.mount_path",
        ),
        (
            &[
                ("BFF__UI__ENABLED", "true"),
                ("BFF__UI__MOUNT_PATH", "/chat/../admin"),
            ],
            "ui.mount_path",
        ),
        (
            &[
                ("BFF__UI__ENABLED", "true"),
                ("BFF__UI__LOGIN_URL", "javascript:alert(1)"),
            ],
            "ui.login_url",
        ),
        (
            &[
                ("BFF__UI__ENABLED", "true"),
                ("BFF__UI__AFTER_LOGOUT_URL", "//evil.example"),
            ],
            "ui.after_logout_url",
        ),
        (
            &[
                ("BFF__UI__ENABLED", "true"),
                ("BFF__UI__PUBLIC_ORIGIN", "https://app.example.com/x"),
            ],
            "ui.public_origin",
        ),
        (
            &[
                ("BFF__UI__ENABLED", "true"),
                ("BFF__UI__RETURN_PARAM", "a&b"),
            ],
            "ui.return_param",
        ),
    ];
    for (env, key) in cases {
        let msg = error_text(load(env));
        assert!(msg.contains(key), "expected `{key}` in: {msg}");
    }
    let msg = error_text(load(&[("BFF__SESSION__IDLE_TIMEOUT_SECS", "soon")]));
    assert!(msg.contains("idle_timeout_secs"), "{msg}");
    // Every topology's URL syntax loads (TLS included).
    for url in [
        "rediss://:pw@cache.example.com:6380/0",
        "unix:///run/redis.sock",
        "rediss+sentinel://:pw@s1:26379,s2:26379/mymaster/0",
        "redis+cluster://n1:6379,n2:6379",
        "rediss+cluster://user:pw@n1:6379",
    ] {
        load(&[("BFF__REDIS__URL", url)]).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn secrets_can_come_from_files_but_not_both_ways() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "from-a-file\n").expect("write");
    let path = secret.display().to_string();
    let cfg = load(&[("BFF__IDENTITY__JWT__HS_SECRET_FILE", &path)]).expect("file secret");
    assert_eq!(cfg.identity.jwt.hs_secret.expose(), "from-a-file");
    let msg = error_text(load(&[
        ("BFF__IDENTITY__JWT__HS_SECRET_FILE", &path),
        ("BFF__IDENTITY__JWT__HS_SECRET", "inline"),
    ]));
    assert!(msg.contains("hs_secret_file"), "{msg}");
    let msg = error_text(load(&[(
        "BFF__IDENTITY__JWT__HS_SECRET_FILE",
        "/nonexistent/x",
    )]));
    assert!(msg.contains("identity.jwt.hs_secret_file"), "{msg}");
}

#[test]
fn check_config_redacts_secrets_and_fails_on_bad_config() {
    let bin = env!("CARGO_BIN_EXE_librechat-bff");
    let key = librechat_bff::credentials::KeyRing::generate_key();
    let out = Command::new(bin)
        .arg("check-config")
        .env("BFF__IDENTITY__JWT__HS_SECRET", "super-secret-value")
        .env("BFF__CRYPTO__FERNET_KEYS", &key)
        .env("BFF__REDIS__URL", "redis://:hunter2@127.0.0.1:6379")
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("[identity.jwt]"),
        "prints the effective config: {stdout}"
    );
    for secret in ["super-secret-value", key.as_str(), "hunter2"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "secret printed"
        );
    }
    assert!(stdout.contains("<redacted>"));

    let out = Command::new(bin)
        .arg("check-config")
        .env("BFF__SESSION__IDLE_TIMOUT_SECS", "3")
        .output()
        .expect("run check-config");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("idle_timout_secs"), "{stderr}");
}

#[test]
fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().expect("tmp");
    let secrets = dir.path().display().to_string();
    std::fs::write(dir.path().join("redis_url"), "redis://:pw@redis:6379/0\n").expect("write");
    std::fs::write(
        dir.path().join("bff_fernet_keys"),
        format!(
            "{}\n{}\n",
            librechat_bff::credentials::KeyRing::generate_key(),
            librechat_bff::credentials::KeyRing::generate_key()
        ),
    )
    .expect("write");
    std::fs::write(dir.path().join("identity_jwt_secret"), "s3cret\n").expect("write");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
            .expect("example.toml")
            .replace("/run/secrets", &secrets);
    let cfg = load_file(&example, &[]).expect("example.toml is valid");
    assert_eq!(cfg.session.store, SessionStoreKind::Redis);
    assert_eq!(cfg.crypto.fernet_keys.len(), 2);
    assert_eq!(cfg.identity.jwt.hs_secret.expose(), "s3cret");
}
