//! Identity JWT verification against the fake identity service's real tokens and JWKS.

mod support;

use std::time::Duration;

use librechat_bff::{
    config::Config,
    identity::{verifier::VerifyError, IdentityVerifier},
};
use serde_json::json;
use support::{
    bff::config,
    fake_idp::{FakeIdp, FakeIdpOptions, IdpSigning},
};

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn verifier(cfg: &Config) -> IdentityVerifier {
    IdentityVerifier::new(
        &cfg.identity.jwt,
        &cfg.identity.claims,
        reqwest::Client::new(),
    )
    .expect("verifier")
}

async fn hs_idp(issuer: Option<&str>, audience: Option<&str>) -> FakeIdp {
    FakeIdp::start(FakeIdpOptions {
        signing: IdpSigning::Hs256 {
            secret: "a-long-test-secret-for-hs256-signing".into(),
        },
        issuer: issuer.map(str::to_owned),
        audience: audience.map(str::to_owned),
        ..FakeIdpOptions::default()
    })
    .await
}

fn hs_config(idp: &FakeIdp, extra: &[(&str, String)]) -> Config {
    let mut env = vec![(
        "BFF__IDENTITY__JWT__HS_SECRET",
        idp.hs_secret().expect("hs idp"),
    )];
    env.extend(extra.iter().cloned());
    config(&env)
}

#[tokio::test]
async fn a_simplejwt_token_verifies_and_claims_map() {
    let idp = hs_idp(None, None).await;
    let v = verifier(&hs_config(&idp, &[]));
    let token = idp.mint_access(42, Duration::from_secs(300));
    let id = v.verify(&token).await.expect("valid token");
    // SimpleJWT serialises user_id as a string.
    assert_eq!(id.user_id, "42");
    assert!(id.expires_at > now());

    // A numeric user id and the `sub` fallback are accepted too.
    let numeric = idp.mint_with_claims(json!({"user_id": 7, "exp": now() + 300}));
    assert_eq!(v.verify(&numeric).await.expect("numeric").user_id, "7");
    let sub = idp.mint_with_claims(json!({"sub": "u-9", "exp": now() + 300}));
    assert_eq!(v.verify(&sub).await.expect("sub").user_id, "u-9");
    let none = idp.mint_with_claims(json!({"exp": now() + 300}));
    assert!(matches!(
        v.verify(&none).await,
        Err(VerifyError::MissingUserId)
    ));
}

#[tokio::test]
async fn expired_tampered_and_unsigned_tokens_are_rejected() {
    let idp = hs_idp(None, None).await;
    let v = verifier(&hs_config(&idp, &[]));

    let expired = idp.mint_access_expired(42);
    assert!(matches!(
        v.verify(&expired).await,
        Err(VerifyError::Expired)
    ));

    let token = idp.mint_access(42, Duration::from_secs(300));
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    // Re-encode the payload with another user id, keeping the original signature.
    let forged_payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({"user_id": "1", "exp": now() + 300}).to_string(),
    );
    parts[1] = forged_payload;
    let tampered = parts.join(".");
    assert!(matches!(
        v.verify(&tampered).await,
        Err(VerifyError::BadSignature)
    ));

    let unsigned = idp.mint_alg_none(json!({"user_id": "42", "exp": now() + 300}));
    assert!(
        v.verify(&unsigned).await.is_err(),
        "alg none must never pass"
    );

    let other_secret = idp.mint_hs256_with_secret(
        json!({"user_id": "42", "exp": now() + 300}),
        b"some-other-secret",
    );
    assert!(matches!(
        v.verify(&other_secret).await,
        Err(VerifyError::BadSignature)
    ));
}

#[tokio::test]
async fn not_yet_valid_tokens_are_rejected_beyond_leeway() {
    let idp = hs_idp(None, None).await;
    let v = verifier(&hs_config(
        &idp,
        &[("BFF__IDENTITY__JWT__LEEWAY_SECS", "5".into())],
    ));
    let future =
        idp.mint_with_claims(json!({"user_id": "42", "nbf": now() + 600, "exp": now() + 900}));
    assert!(matches!(
        v.verify(&future).await,
        Err(VerifyError::NotYetValid)
    ));
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let idp = hs_idp(Some("https://id.example.com"), Some("librechat-bff")).await;
    let right = hs_config(
        &idp,
        &[
            (
                "BFF__IDENTITY__JWT__ISSUER",
                "https://id.example.com".into(),
            ),
            ("BFF__IDENTITY__JWT__AUDIENCE", "librechat-bff".into()),
        ],
    );
    let token = idp.mint_access(42, Duration::from_secs(300));
    verifier(&right)
        .verify(&token)
        .await
        .expect("iss and aud match");

    let wrong_iss = hs_config(
        &idp,
        &[(
            "BFF__IDENTITY__JWT__ISSUER",
            "https://other.example.com".into(),
        )],
    );
    assert!(matches!(
        verifier(&wrong_iss).verify(&token).await,
        Err(VerifyError::WrongIssuer)
    ));
    let wrong_aud = hs_config(
        &idp,
        &[("BFF__IDENTITY__JWT__AUDIENCE", "someone-else".into())],
    );
    assert!(matches!(
        verifier(&wrong_aud).verify(&token).await,
        Err(VerifyError::WrongAudience)
    ));
    // A token without iss is refused when an issuer is required.
    let bare =
        idp.mint_with_claims(json!({"user_id": "42", "exp": now() + 300, "aud": "librechat-bff"}));
    assert!(matches!(
        verifier(&right).verify(&bare).await,
        Err(VerifyError::WrongIssuer)
    ));
}

async fn rs_idp() -> FakeIdp {
    FakeIdp::start(FakeIdpOptions {
        signing: IdpSigning::Rs256,
        ..FakeIdpOptions::default()
    })
    .await
}

fn jwks_config(idp: &FakeIdp, min_refetch: u64) -> Config {
    config(&[
        ("BFF__IDENTITY__JWT__ALGORITHMS", "RS256".into()),
        ("BFF__IDENTITY__JWT__JWKS_URL", idp.jwks_url()),
        (
            "BFF__IDENTITY__JWT__JWKS_MIN_REFETCH_SECS",
            min_refetch.to_string(),
        ),
    ])
}

#[tokio::test]
async fn rs256_via_jwks_and_key_rotation_is_picked_up() {
    let idp = rs_idp().await;
    let v = verifier(&jwks_config(&idp, 0));
    let before = idp.mint_access(42, Duration::from_secs(300));
    v.verify(&before).await.expect("first key");
    v.verify(&before).await.expect("cached key");
    assert_eq!(idp.jwks_calls(), 1, "the JWKS is cached");

    idp.rotate_signing_key();
    let after = idp.mint_access(42, Duration::from_secs(300));
    v.verify(&after).await.expect("new kid triggers a refetch");
    assert_eq!(idp.jwks_calls(), 2);
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let idp = rs_idp().await;
    let v = verifier(&jwks_config(&idp, 3600));
    v.verify(&idp.mint_access(42, Duration::from_secs(300)))
        .await
        .expect("valid");
    idp.rotate_signing_key();
    let rotated = idp.mint_access(42, Duration::from_secs(300));
    // The last fetch was just now: no refetch yet, so the new kid is unknown.
    assert!(matches!(
        v.verify(&rotated).await,
        Err(VerifyError::UnknownKey)
    ));
    assert!(matches!(
        v.verify(&rotated).await,
        Err(VerifyError::UnknownKey)
    ));
    assert_eq!(
        idp.jwks_calls(),
        1,
        "junk kids cannot hammer the JWKS endpoint"
    );
}

#[tokio::test]
async fn hs_rs_key_confusion_is_rejected() {
    let idp = rs_idp().await;
    let v = verifier(&jwks_config(&idp, 0));
    // The classic attack: HMAC-sign with the RSA public key as the secret.
    let pem = idp.public_key_pem();
    let forged =
        idp.mint_hs256_with_secret(json!({"user_id": "42", "exp": now() + 300}), pem.as_bytes());
    assert!(matches!(
        v.verify(&forged).await,
        Err(VerifyError::AlgorithmNotAllowed(_))
    ));
    let unsigned = idp.mint_alg_none(json!({"user_id": "42", "exp": now() + 300}));
    assert!(v.verify(&unsigned).await.is_err());

    // And with a PEM file instead of a JWKS.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("pub.pem");
    std::fs::write(&path, &pem).expect("write pem");
    let cfg = config(&[
        ("BFF__IDENTITY__JWT__ALGORITHMS", "RS256".into()),
        (
            "BFF__IDENTITY__JWT__PUBLIC_KEY_PEM_FILE",
            path.display().to_string(),
        ),
    ]);
    let v = verifier(&cfg);
    v.verify(&idp.mint_access(42, Duration::from_secs(300)))
        .await
        .expect("PEM verifies RS256");
    assert!(matches!(
        v.verify(&forged).await,
        Err(VerifyError::AlgorithmNotAllowed(_))
    ));
}

#[tokio::test]
async fn jwks_unreachable_is_a_distinct_error() {
    let cfg = config(&[
        ("BFF__IDENTITY__JWT__ALGORITHMS", "RS256".into()),
        (
            "BFF__IDENTITY__JWT__JWKS_URL",
            "http://127.0.0.1:9/.well-known/jwks.json".into(),
        ),
    ]);
    let idp = rs_idp().await;
    let v = verifier(&cfg);
    let token = idp.mint_access(42, Duration::from_secs(300));
    assert!(matches!(
        v.verify(&token).await,
        Err(VerifyError::KeysUnavailable(_))
    ));
}
