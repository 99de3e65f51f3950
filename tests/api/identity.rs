//! Identity JWT verification against the fake identity service's real tokens and JWKS.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use librechat_bff::{
    clock::ManualClock,
    config::Config,
    error::ApiError,
    identity::{verifier::VerifyError, IdentityVerifier},
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{
    bff::{config, TestBff},
    fake_idp::{FakeIdp, FakeIdpOptions, IdpSigning},
    wait::eventually,
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
async fn a_token_is_decoded_once_then_remembered_but_a_tampered_copy_is_not() {
    let idp = hs_idp(None, None).await;
    let v = verifier(&hs_config(&idp, &[]));
    let token = idp.mint_access(42, Duration::from_secs(300));
    for _ in 0..50 {
        assert_eq!(v.verify(&token).await.expect("valid").user_id, "42");
    }
    assert_eq!(
        v.decodes(),
        1,
        "the same token verified 50 times is decoded once"
    );

    // Same header and payload, another signature: a different string, decoded and refused.
    let (unsigned, _) = token.rsplit_once('.').expect("three parts");
    let tampered = format!("{unsigned}.AAAA{}", &token[token.len() - 10..]);
    for _ in 0..3 {
        assert!(matches!(
            v.verify(&tampered).await,
            Err(VerifyError::BadSignature | VerifyError::Malformed)
        ));
    }
    assert_eq!(v.decodes(), 4, "a refused token is never remembered");

    // The remembered token's own signature under another payload: the same tail (the cache
    // hashes only the tail) but not the same token, so decoded and refused.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({"user_id": "1", "exp": now() + 300}).to_string(),
    );
    let same_tail = parts.join(".");
    assert_eq!(same_tail[same_tail.len() - 32..], token[token.len() - 32..]);
    assert!(matches!(
        v.verify(&same_tail).await,
        Err(VerifyError::BadSignature)
    ));
    assert_eq!(
        v.decodes(),
        5,
        "a token sharing a remembered tail is decoded"
    );

    let other = idp.mint_access(43, Duration::from_secs(300));
    assert_eq!(v.verify(&other).await.expect("valid").user_id, "43");
    assert_eq!(v.verify(&token).await.expect("still").user_id, "42");
    assert_eq!(v.decodes(), 6);
}

#[tokio::test]
async fn a_remembered_token_stops_verifying_at_its_exp() {
    let idp = hs_idp(None, None).await;
    let v = verifier(&hs_config(
        &idp,
        &[("BFF__IDENTITY__JWT__LEEWAY_SECS", "0".into())],
    ));
    let token = idp.mint_with_claims(json!({"user_id": "42", "exp": now() + 2}));
    v.verify(&token).await.expect("valid for two seconds");
    eventually(10, "the remembered token to expire", || async {
        matches!(v.verify(&token).await, Err(VerifyError::Expired)).then_some(())
    })
    .await;
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
        Err(VerifyError::KeysUnavailable { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// JWKS failure semantics: a key source that cannot be read is 503 (retry), never 401 (which a
// mobile app takes as "signed out"); cached keys are trusted for at most jwks_max_age_secs.
// ---------------------------------------------------------------------------------------------

/// The test RSA keys (`tests/fixtures/keys/`): private PEM and public JWK.
const KEYS: [(&str, &str); 2] = [
    (
        include_str!("../fixtures/keys/idp-rsa-1.pem"),
        include_str!("../fixtures/keys/idp-rsa-1.jwk.json"),
    ),
    (
        include_str!("../fixtures/keys/idp-rsa-2.pem"),
        include_str!("../fixtures/keys/idp-rsa-2.jwk.json"),
    ),
];

fn kid(key: usize) -> String {
    format!("test-key-{key}")
}

/// A JWKS endpoint whose contents the test sets: some of [`KEYS`], or failing (503).
struct JwksServer {
    url: String,
    shared: Arc<JwksShared>,
    task: tokio::task::JoinHandle<()>,
}

struct JwksShared {
    /// `None`: the endpoint answers 503.
    listed: Mutex<Option<Vec<usize>>>,
    calls: AtomicUsize,
}

impl JwksServer {
    async fn start(listed: Option<Vec<usize>>) -> JwksServer {
        let shared = Arc::new(JwksShared {
            listed: Mutex::new(listed),
            calls: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/jwks.json", axum::routing::get(serve_jwks))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        JwksServer {
            url: format!("http://{addr}/jwks.json"),
            shared,
            task,
        }
    }

    fn set(&self, listed: Option<Vec<usize>>) {
        *self.shared.listed.lock().expect("lock") = listed;
    }

    fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(
    axum::extract::State(shared): axum::extract::State<Arc<JwksShared>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    shared.calls.fetch_add(1, Ordering::SeqCst);
    let listed = shared.listed.lock().expect("lock").clone();
    let Some(listed) = listed else {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
    };
    let keys: Vec<Value> = listed
        .iter()
        .map(|&i| {
            let jwk: Value = serde_json::from_str(KEYS[i].1).expect("jwk");
            json!({"kty": "RSA", "kid": kid(i), "use": "sig", "alg": "RS256", "n": jwk["n"], "e": jwk["e"]})
        })
        .collect();
    axum::Json(json!({ "keys": keys })).into_response()
}

/// An access token for `user_id` signed with test key `key` (its `kid` in the header).
fn mint(key: usize, user_id: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid(key));
    let claims = json!({"user_id": user_id, "token_type": "access", "exp": now() + 3600});
    let signing =
        jsonwebtoken::EncodingKey::from_rsa_pem(KEYS[key].0.as_bytes()).expect("test key");
    jsonwebtoken::encode(&header, &claims, &signing).expect("sign")
}

fn jwks_env(url: &str, min_refetch: u64, max_age: u64) -> Vec<(&'static str, String)> {
    vec![
        ("BFF__IDENTITY__JWT__ALGORITHMS", "RS256".into()),
        ("BFF__IDENTITY__JWT__JWKS_URL", url.to_owned()),
        (
            "BFF__IDENTITY__JWT__JWKS_MIN_REFETCH_SECS",
            min_refetch.to_string(),
        ),
        ("BFF__IDENTITY__JWT__JWKS_MAX_AGE_SECS", max_age.to_string()),
    ]
}

fn clocked_verifier(cfg: &Config, clock: &ManualClock) -> IdentityVerifier {
    IdentityVerifier::with_clock(
        &cfg.identity.jwt,
        &cfg.identity.claims,
        reqwest::Client::new(),
        Arc::new(clock.clone()),
    )
    .expect("verifier")
}

async fn me(bff: &TestBff, bearer: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let res = reqwest::Client::new()
        .get(format!("{}/auth/me", bff.base_url))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("request reaches the BFF");
    let status = res.status();
    let headers = res.headers().clone();
    (status, headers, res.json().await.unwrap_or(Value::Null))
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("a Retry-After in seconds")
}

#[tokio::test]
async fn jwks_down_at_start_is_503_with_retry_after_not_401_then_recovers() {
    let jwks = JwksServer::start(None).await;
    let bff = TestBff::start(config(&jwks_env(&jwks.url, 30, 600))).await;
    let token = mint(0, "42");

    let (status, headers, body) = me(&bff, &token).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "identity_keys_unavailable");
    let wait = retry_after(&headers);
    assert!((1..=30).contains(&wait), "Retry-After {wait}");
    assert_eq!(jwks.calls(), 1);

    // Within jwks_min_refetch_secs the source is not asked again, and the answer stays 503.
    let (status, _, body) = me(&bff, &token).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "identity_keys_unavailable");
    assert_eq!(jwks.calls(), 1, "a failing JWKS is not hammered");

    // The identity service is back; once the retry interval has passed, the same token works.
    jwks.set(Some(vec![0]));
    bff.clock.advance(Duration::from_secs(31));
    let (status, _, body) = me(&bff, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], "42");
    assert_eq!(jwks.calls(), 2);
}

#[tokio::test]
async fn jwks_down_between_calls_keeps_cached_keys_and_a_new_kid_is_503() {
    let jwks = JwksServer::start(Some(vec![0])).await;
    let clock = ManualClock::default();
    let v = clocked_verifier(&config(&jwks_env(&jwks.url, 30, 600)), &clock);
    let known = mint(0, "42");
    v.verify(&known).await.expect("key 0 is listed");
    assert_eq!(jwks.calls(), 1);

    jwks.set(None);
    // Past half the max age a read refreshes in the background; that refresh fails, and the
    // cached key goes on working meanwhile.
    clock.advance(Duration::from_secs(301));
    v.verify(&known).await.expect("cached key still trusted");
    eventually(10, "the background refresh attempt", || async {
        (jwks.calls() == 2).then_some(())
    })
    .await;
    v.verify(&known).await.expect("cached key still trusted");

    // A kid the cache does not know cannot be checked: "retry later", not "bad token".
    let rotated = mint(1, "42");
    let err = v.verify(&rotated).await.expect_err("unverifiable");
    let VerifyError::KeysUnavailable {
        retry_after_secs, ..
    } = &err
    else {
        panic!("expected KeysUnavailable, got {err:?}");
    };
    assert!((1..=30).contains(retry_after_secs), "{retry_after_secs}");
    assert_eq!(
        ApiError::from(err).status(),
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(jwks.calls(), 2, "the failed refresh was moments ago");

    // Past the max age the cached key is no longer trusted either; still 503, never 401.
    clock.advance(Duration::from_secs(300));
    let err = v.verify(&known).await.expect_err("keys aged out");
    assert!(
        matches!(err, VerifyError::KeysUnavailable { .. }),
        "{err:?}"
    );
    assert_eq!(jwks.calls(), 3);

    // Back up: both keys verify again.
    jwks.set(Some(vec![0, 1]));
    clock.advance(Duration::from_secs(31));
    v.verify(&known).await.expect("recovered");
    v.verify(&rotated).await.expect("recovered, new kid");
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_verifying_within_the_max_age() {
    let jwks = JwksServer::start(Some(vec![0, 1])).await;
    let clock = ManualClock::default();
    let cfg = config(&jwks_env(&jwks.url, 30, 600));
    let removed = mint(0, "42");
    let kept = mint(1, "43");

    // Read after half the max age: the refresh happens in the background.
    let v = clocked_verifier(&cfg, &clock);
    v.verify(&removed).await.expect("listed");
    jwks.set(Some(vec![1]));
    clock.advance(Duration::from_secs(301));
    v.verify(&removed)
        .await
        .expect("still trusted: younger than the max age");
    eventually(10, "the removed key to stop verifying", || async {
        matches!(v.verify(&removed).await, Err(VerifyError::UnknownKey)).then_some(())
    })
    .await;
    assert_eq!(v.verify(&kept).await.expect("kept").user_id, "43");
    assert_eq!(jwks.calls(), 2);

    // No read in between: at the max age the keys are refetched before any is trusted.
    jwks.set(Some(vec![0, 1]));
    let clock = ManualClock::default();
    let v = clocked_verifier(&cfg, &clock);
    v.verify(&removed).await.expect("listed");
    jwks.set(Some(vec![1]));
    clock.advance(Duration::from_secs(600));
    assert!(matches!(
        v.verify(&removed).await,
        Err(VerifyError::UnknownKey)
    ));
    assert_eq!(v.verify(&kept).await.expect("kept").user_id, "43");
}
