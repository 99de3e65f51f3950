//! The credential vault: Python-made Fernet tokens decrypt, rotation re-encrypts everything
//! under the first key, and `credentials rotate` reports counts.

use std::{process::Command, sync::Arc};

use librechat_bff::{
    clock::SystemClock,
    credentials::{
        vault::{CredentialStatus, CredentialVault, Password},
        KeyRing,
    },
    redis_conn::RedisHandle,
};
use serde_json::Value;
use support::redis::RedisServer;

fn python_fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fernet/python-fernet.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

#[test]
fn tokens_made_by_python_cryptography_decrypt() {
    let fx = python_fixture();
    let keys: Vec<String> = fx["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k.as_str().expect("key").to_owned())
        .collect();
    let ring = KeyRing::from_keys(&keys).expect("ring");
    let tokens = fx["tokens"].as_array().expect("tokens");
    assert!(tokens.len() >= 4);
    for t in tokens {
        let plain = ring
            .decrypt(t["token"].as_str().expect("token"))
            .expect("python token decrypts");
        assert_eq!(plain, t["plaintext"].as_str().expect("plaintext"));
    }
    // A ring without the key that made a token cannot read it.
    let only_second = KeyRing::from_keys(&keys[1..]).expect("ring");
    assert!(only_second
        .decrypt(tokens[0]["token"].as_str().expect("token"))
        .is_err());
}

fn vault(redis: &RedisServer, prefix: &str, keys: &[String]) -> CredentialVault {
    let handle = RedisHandle::new(&redis.url(), prefix).expect("redis");
    CredentialVault::new(
        handle,
        Arc::new(KeyRing::from_keys(keys).expect("ring")),
        Arc::new(SystemClock),
    )
}

#[tokio::test]
async fn rotation_re_encrypts_under_the_first_key() {
    let redis = RedisServer::start().await;
    let prefix = redis.key_prefix();
    let old = KeyRing::generate_key();
    let new = KeyRing::generate_key();
    let before = vault(&redis, &prefix, std::slice::from_ref(&old));
    for i in 0..5 {
        let rec = before.new_record(
            &format!("u{i}"),
            &format!("u{i}@example.com"),
            None,
            &Password::new(format!("secret-{i}")),
            CredentialStatus::Ready,
        );
        before.put(&rec).await.expect("put");
    }
    let after = vault(&redis, &prefix, &[new.clone(), old.clone()]);
    let report = after.rotate().await.expect("rotate");
    assert_eq!((report.total, report.rotated, report.failed), (5, 5, 0));
    let again = after.rotate().await.expect("rotate again");
    assert_eq!((again.rotated, again.already_current), (0, 5));

    // The old key can now be dropped.
    let new_only = vault(&redis, &prefix, &[new]);
    let rec = new_only.get("u3").await.expect("get").expect("record");
    assert_eq!(
        new_only.password(&rec).expect("decrypts").expose(),
        "secret-3"
    );
    let stored = format!("{rec:?}");
    assert!(!stored.contains("secret-3"), "no plaintext in the record");
}

#[tokio::test]
async fn the_rotate_command_reports_counts() {
    let redis = RedisServer::start().await;
    let prefix = redis.key_prefix();
    let old = KeyRing::generate_key();
    let new = KeyRing::generate_key();
    let v = vault(&redis, &prefix, std::slice::from_ref(&old));
    let rec = v.new_record(
        "u1",
        "u1@example.com",
        None,
        &Password::new("pw-1"),
        CredentialStatus::Ready,
    );
    v.put(&rec).await.expect("put");

    let out = Command::new(env!("CARGO_BIN_EXE_librechat-bff"))
        .args(["credentials", "rotate"])
        .env("BFF__REDIS__URL", redis.url())
        .env("BFF__REDIS__KEY_PREFIX", &prefix)
        .env("BFF__CRYPTO__FERNET_KEYS", format!("{new},{old}"))
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 total, 1 re-encrypted"), "{stdout}");
    assert!(!stdout.contains("pw-1"));
}
