//! The operator CLI end to end: `users add|import|show|retry`, `jobs list|retry` against a real
//! Redis (no LibreChat needed: nothing here runs a worker).

use std::process::Output;

use librechat_bff::credentials::KeyRing;
use serde_json::Value;
use support::redis::RedisServer;

struct Cli {
    redis_url: String,
    prefix: String,
    key: String,
}

impl Cli {
    async fn run(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_librechat-bff"))
            .args(args)
            .env("BFF__REDIS__URL", &self.redis_url)
            .env("BFF__REDIS__KEY_PREFIX", &self.prefix)
            .env("BFF__CRYPTO__FERNET_KEYS", &self.key)
            .output()
            .await
            .expect("run the CLI")
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn users_and_jobs_commands_work_against_redis() {
    let redis = RedisServer::start().await;
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fernet/python-fernet.json"
        ))
        .expect("fixture"),
    )
    .expect("json");
    let cli = Cli {
        redis_url: redis.url(),
        prefix: redis.key_prefix(),
        key: format!(
            "{},{}",
            KeyRing::generate_key(),
            fx["keys"][0].as_str().expect("key")
        ),
    };

    let out = cli
        .run(&[
            "users",
            "add",
            "--user-id",
            "u1",
            "--email",
            "u1@example.com",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).starts_with("enqueued job "),
        "{}",
        stdout(&out)
    );
    let again = cli
        .run(&[
            "users",
            "add",
            "--user-id",
            "u1",
            "--email",
            "u1@example.com",
        ])
        .await;
    assert!(
        stdout(&again).contains("already queued"),
        "{}",
        stdout(&again)
    );

    let bad = cli
        .run(&["users", "add", "--user-id", "u2", "--email", "not-an-email"])
        .await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an email address"));

    let show = cli.run(&["users", "show", "u1"]).await;
    let status: Value = serde_json::from_slice(&show.stdout).expect("JSON");
    assert_eq!(status["state"], "pending");
    let list = cli.run(&["jobs", "list", "--state", "pending"]).await;
    let jobs: Value = serde_json::from_slice(&list.stdout).expect("JSON");
    assert_eq!(jobs.as_array().map(Vec::len), Some(1));

    let dir = tempfile::tempdir().expect("tmp");
    let csv = dir.path().join("users.csv");
    std::fs::write(
        &csv,
        format!(
            "user_id,email,name,librechat_password_encrypted\nu3,u3@example.com,U3,{}\nu4,u4@example.com,,\n",
            fx["tokens"][0]["token"].as_str().expect("token")
        ),
    )
    .expect("write");
    let import = cli
        .run(&["users", "import", &csv.display().to_string()])
        .await;
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    assert!(
        stdout(&import).contains("1 migrated (ready), 1 enqueued"),
        "{}",
        stdout(&import)
    );
    let show = cli.run(&["users", "show", "u3"]).await;
    let status: Value = serde_json::from_slice(&show.stdout).expect("JSON");
    assert_eq!(status["state"], "ready");
    assert!(!stdout(&show).contains(fx["tokens"][0]["plaintext"].as_str().expect("pw")));

    let missing = cli.run(&["users", "show", "nobody"]).await;
    assert!(!missing.status.success());
    let retry = cli.run(&["jobs", "retry", "no-such-job"]).await;
    assert!(!retry.status.success());
}
