//! Verifies the identity service's access JWTs.
//!
//! Only the configured algorithms are accepted and the key family is fixed by config, so neither
//! `alg: none` nor HS/RS key confusion can pass. Keys come from a shared secret (HS*), a PEM file,
//! or a JWKS URL (see [`JwksCache`]: cached for at most `jwks_max_age_secs`, refreshed in the
//! background before that, refetched on an unknown `kid` at most once per
//! `jwks_min_refetch_secs`; a key source that cannot be read is "unavailable", never "bad token").
//!
//! A token that verified is remembered ([`VerifiedTokens`]) until its `exp`, at most
//! `VERIFIED_TTL`: a mobile app sends the same token on every call, and decoding and checking it
//! again was a tenth of a proxied request's CPU (issue 12). Only the exact token string hits, so
//! a tampered copy is decoded (and refused) like any other.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
};

use jsonwebtoken::{
    decode, decode_header,
    errors::ErrorKind,
    jwk::{Jwk, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::{
    clock::{Clock, SystemClock},
    config::{family, parse_algorithms, ClaimsConfig, ConfigError, Family, JwtConfig},
};

/// Who a verified token says the user is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifiedIdentity {
    pub user_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<String>,
    /// `exp` of the token (unix seconds).
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("token is malformed")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("signature does not verify")]
    BadSignature,
    #[error("algorithm {0} is not accepted")]
    AlgorithmNotAllowed(String),
    #[error("issuer is not the configured one")]
    WrongIssuer,
    #[error("audience is not the configured one")]
    WrongAudience,
    #[error("signing key is unknown")]
    UnknownKey,
    #[error("no user id claim")]
    MissingUserId,
    #[error("identity token verification is not configured")]
    NotConfigured,
    /// The JWKS could not be read (unreachable, an error status, not a key set) and no trusted
    /// key fits the token: the token may well be good; retry after `retry_after_secs`.
    #[error("signing keys cannot be fetched: {reason}")]
    KeysUnavailable {
        reason: String,
        retry_after_secs: u64,
    },
    #[error("token is larger than {0} bytes")]
    TooLarge(usize),
    #[error("token type is not `{0}`")]
    WrongTokenType(String),
    #[error("claim `{0}` holds control characters or is too long")]
    BadClaim(String),
}

enum KeySource {
    /// HS* with no secret configured: every token is rejected.
    Unconfigured,
    Static(DecodingKey),
    Jwks(Arc<JwksCache>),
}

type KeyMap = HashMap<String, (Arc<DecodingKey>, Family)>;

/// The identity service's JWKS, cached with a bounded age.
///
/// - Keys fetched less than `max_age` ago are trusted; older ones never are (a key removed from
///   the JWKS stops verifying within `max_age`).
/// - From half of `max_age` on, a read refreshes the set in the background (single-flight), so
///   keys normally never age out while the identity service answers.
/// - An unknown `kid` refetches at once, at most once per `min_refetch`.
/// - A fetch that fails (unreachable, non-2xx, not a key set) is [`VerifyError::KeysUnavailable`]
///   — "retry later" (503), never "bad token" (401) — and is retried at most once per
///   `min_refetch`.
struct JwksCache {
    url: String,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    min_refetch: time::Duration,
    max_age: time::Duration,
    state: RwLock<JwksState>,
    /// Serialises fetches (single-flight).
    fetching: tokio::sync::Mutex<()>,
    /// A background refresh is queued or running.
    refreshing: AtomicBool,
}

#[derive(Default)]
struct JwksState {
    keys: KeyMap,
    /// When the current keys were fetched (the last successful fetch).
    fetched_at: Option<OffsetDateTime>,
    /// When the last fetch was attempted, and why it failed (`None`: it succeeded).
    attempted_at: Option<OffsetDateTime>,
    failure: Option<String>,
}

pub struct IdentityVerifier {
    verified: VerifiedTokens,
    algorithms: Vec<Algorithm>,
    keys: KeySource,
    validation: Validation,
    claims: ClaimsConfig,
    token_type: TokenTypeRule,
    max_token_bytes: usize,
}

/// SimpleJWT marks its tokens `token_type: "access"` / `"refresh"`: a refresh token (24 h, and
/// still valid after it is blacklisted at the identity service) must never open a session.
#[derive(Debug, Clone)]
struct TokenTypeRule {
    claim: String,
    expected: String,
    required: bool,
}

impl TokenTypeRule {
    fn check(&self, claims: &Map<String, Value>) -> Result<(), VerifyError> {
        if self.claim.is_empty() {
            return Ok(());
        }
        match claims.get(&self.claim) {
            None if !self.required => Ok(()),
            Some(Value::String(t)) if *t == self.expected => Ok(()),
            _ => Err(VerifyError::WrongTokenType(self.expected.clone())),
        }
    }
}

/// Tokens that verified, by their exact text, with what they said. Bounded in count; an entry is
/// used only before its token's `exp` (without the leeway), for at most `VERIFIED_TTL`, and (JWKS)
/// only while the key that verified it is still the key set's (see `IdentityVerifier::verify`).
struct VerifiedTokens {
    tokens: moka::sync::Cache<String, Arc<Verified>, SignatureTail>,
    misses: std::sync::atomic::AtomicU64,
}

struct Verified {
    identity: VerifiedIdentity,
    jwks_key: Option<UsedKey>,
}

/// The JWKS key a token verified with.
struct UsedKey {
    kid: Option<String>,
    alg: Algorithm,
    key: Arc<DecodingKey>,
}

const VERIFIED_CAPACITY: u64 = 10_000;
const VERIFIED_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl VerifiedTokens {
    fn new() -> Self {
        Self {
            tokens: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build_with_hasher(SignatureTail::default()),
            misses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn get(&self, token: &str, now: i64) -> Option<Arc<Verified>> {
        self.tokens
            .get(token)
            .filter(|hit| now < hit.identity.expires_at)
    }

    fn insert(
        &self,
        token: &str,
        identity: &VerifiedIdentity,
        jwks_key: Option<UsedKey>,
        now: i64,
    ) {
        if now < identity.expires_at {
            let entry = Verified {
                identity: identity.clone(),
                jwks_key,
            };
            self.tokens.insert(token.to_owned(), Arc::new(entry));
        }
    }
}

/// Hashes a token by its last [`SignatureTail::BYTES`] bytes only (a keyed SipHash, as
/// `std`'s maps): hashing a whole ~400-byte JWT was most of a Bearer request's cache lookup.
/// A hit still needs the whole token to be equal (the map compares keys), and only tokens that
/// verified are stored, so tails an attacker makes collide cost one bucket, nothing more. The
/// tail is inside the signature, which is what differs between tokens.
#[derive(Clone, Default)]
struct SignatureTail(std::hash::RandomState);

impl SignatureTail {
    const BYTES: usize = 32;
}

impl std::hash::BuildHasher for SignatureTail {
    type Hasher = TailHasher;

    fn build_hasher(&self) -> TailHasher {
        TailHasher(self.0.build_hasher())
    }
}

struct TailHasher(std::hash::DefaultHasher);

impl std::hash::Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0
            .write(&bytes[bytes.len().saturating_sub(SignatureTail::BYTES)..]);
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// Longest user id / email / name a token may carry (LibreChat caps names at 80, emails at 254).
const MAX_CLAIM_CHARS: usize = 320;

/// A claim value the BFF will use as a key, a header or an account field: no control
/// characters (NUL, CR/LF, ...), bounded length.
fn sane_claim(value: &str) -> bool {
    value.chars().count() <= MAX_CLAIM_CHARS && !value.chars().any(char::is_control)
}

impl std::fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityVerifier")
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

impl IdentityVerifier {
    pub fn new(
        cfg: &JwtConfig,
        claims: &ClaimsConfig,
        http: reqwest::Client,
    ) -> Result<Self, ConfigError> {
        Self::with_clock(cfg, claims, http, Arc::new(SystemClock))
    }

    /// As [`IdentityVerifier::new`], with the clock that ages the cached JWKS.
    pub fn with_clock(
        cfg: &JwtConfig,
        claims: &ClaimsConfig,
        http: reqwest::Client,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ConfigError> {
        let algorithms = parse_algorithms(cfg)?;
        let hmac = family(algorithms[0]) == Some(Family::Hmac);
        let keys = if hmac {
            if cfg.hs_secret.is_empty() {
                KeySource::Unconfigured
            } else {
                KeySource::Static(DecodingKey::from_secret(cfg.hs_secret.expose().as_bytes()))
            }
        } else if !cfg.public_key_pem_file.is_empty() {
            let pem =
                std::fs::read(&cfg.public_key_pem_file).map_err(|e| ConfigError::Invalid {
                    key: "identity.jwt.public_key_pem_file".into(),
                    reason: format!("cannot read {}: {e}", cfg.public_key_pem_file),
                })?;
            let fam = family(algorithms[0]);
            let key = match fam {
                Some(Family::Ec) => DecodingKey::from_ec_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            }
            .map_err(|e| ConfigError::Invalid {
                key: "identity.jwt.public_key_pem_file".into(),
                reason: format!("not a PEM public key for {:?}: {e}", algorithms[0]),
            })?;
            if algorithms.iter().any(|a| family(*a) != fam) {
                return Err(ConfigError::Invalid {
                    key: "identity.jwt.algorithms".into(),
                    reason: "one PEM key serves one family: do not mix RS*/PS* with ES*".into(),
                });
            }
            KeySource::Static(key)
        } else {
            KeySource::Jwks(Arc::new(JwksCache {
                url: cfg.jwks_url.clone(),
                http,
                clock,
                min_refetch: secs(cfg.jwks_min_refetch_secs),
                max_age: secs(cfg.jwks_max_age_secs.max(1)),
                state: RwLock::new(JwksState::default()),
                fetching: tokio::sync::Mutex::new(()),
                refreshing: AtomicBool::new(false),
            }))
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.clone();
        validation.leeway = cfg.leeway_secs;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        // A configured iss/aud must be present, not merely correct when present.
        validation.set_required_spec_claims(&["exp"]);
        if cfg.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[cfg.issuer.as_str()]);
            validation.required_spec_claims.insert("iss".into());
        }
        if cfg.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[cfg.audience.as_str()]);
            validation.required_spec_claims.insert("aud".into());
        }
        Ok(Self {
            verified: VerifiedTokens::new(),
            algorithms,
            keys,
            validation,
            claims: claims.clone(),
            token_type: TokenTypeRule {
                claim: cfg.token_type_claim.clone(),
                expected: cfg.token_type.clone(),
                required: cfg.require_token_type,
            },
            max_token_bytes: cfg.max_token_bytes,
        })
    }

    /// Whether any token can verify at all (false: HS* with no secret).
    pub fn is_configured(&self) -> bool {
        !matches!(self.keys, KeySource::Unconfigured)
    }

    pub async fn verify(&self, token: &str) -> Result<VerifiedIdentity, VerifyError> {
        // Oversized tokens are refused before any parsing.
        if token.len() > self.max_token_bytes {
            return Err(VerifyError::TooLarge(self.max_token_bytes));
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if let Some(hit) = self.verified.get(token, now) {
            // A JWKS key counts only while the key set still trusts it (max age, rotation).
            let trusted = match (&self.keys, &hit.jwks_key) {
                (KeySource::Static(_), None) => true,
                (KeySource::Jwks(cache), Some(used)) => {
                    JwksCache::key_for(cache, used.kid.as_deref(), used.alg)
                        .await
                        .is_ok_and(|key| Arc::ptr_eq(&key, &used.key))
                }
                _ => false,
            };
            if trusted {
                return Ok(hit.identity.clone());
            }
        }
        let (identity, jwks_key) = self.verify_uncached(token).await?;
        self.verified.insert(token, &identity, jwks_key, now);
        Ok(identity)
    }

    /// Full verifications done (the others were answered from [`VerifiedTokens`]).
    pub fn decodes(&self) -> u64 {
        self.verified.misses.load(Ordering::Relaxed)
    }

    /// Verifies `token` from scratch; also says which JWKS key verified it.
    async fn verify_uncached(
        &self,
        token: &str,
    ) -> Result<(VerifiedIdentity, Option<UsedKey>), VerifyError> {
        self.verified.misses.fetch_add(1, Ordering::Relaxed);
        let header = decode_header(token).map_err(|_| VerifyError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(VerifyError::AlgorithmNotAllowed(format!(
                "{:?}",
                header.alg
            )));
        }
        let (claims, used) = match &self.keys {
            KeySource::Unconfigured => return Err(VerifyError::NotConfigured),
            KeySource::Static(key) => (self.decode(token, key)?, None),
            KeySource::Jwks(cache) => {
                let key = JwksCache::key_for(cache, header.kid.as_deref(), header.alg).await?;
                let claims = self.decode(token, &key)?;
                (
                    claims,
                    Some(UsedKey {
                        kid: header.kid,
                        alg: header.alg,
                        key,
                    }),
                )
            }
        };
        self.token_type.check(&claims)?;
        Ok((self.map_claims(&claims)?, used))
    }

    fn decode(&self, token: &str, key: &DecodingKey) -> Result<Map<String, Value>, VerifyError> {
        decode::<Map<String, Value>>(token, key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => VerifyError::Expired,
                ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
                ErrorKind::InvalidSignature => VerifyError::BadSignature,
                ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
                ErrorKind::InvalidAudience => VerifyError::WrongAudience,
                ErrorKind::InvalidAlgorithm => VerifyError::AlgorithmNotAllowed("mismatch".into()),
                ErrorKind::MissingRequiredClaim(c) if c == "iss" => VerifyError::WrongIssuer,
                ErrorKind::MissingRequiredClaim(c) if c == "aud" => VerifyError::WrongAudience,
                _ => VerifyError::Malformed,
            })
    }

    fn map_claims(&self, claims: &Map<String, Value>) -> Result<VerifiedIdentity, VerifyError> {
        let user_id = self
            .claims
            .user_id
            .iter()
            .find_map(|name| match claims.get(name) {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .ok_or(VerifyError::MissingUserId)?;
        if !sane_claim(&user_id) {
            return Err(VerifyError::BadClaim("user id".into()));
        }
        let text = |name: &str| match claims.get(name) {
            Some(Value::String(s)) if !s.is_empty() => {
                if sane_claim(s) {
                    Ok(Some(s.clone()))
                } else {
                    Err(VerifyError::BadClaim(name.to_owned()))
                }
            }
            _ => Ok(None),
        };
        let groups = match claims.get(&self.claims.groups) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect(),
            Some(Value::String(s)) => s
                .split([' ', ','])
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        let expires_at = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        Ok(VerifiedIdentity {
            user_id,
            email: text(&self.claims.email)?,
            name: text(&self.claims.name)?,
            groups,
            expires_at,
        })
    }
}

fn secs(n: u64) -> time::Duration {
    time::Duration::seconds(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Whole seconds until `d` has passed, at least 1 (a `Retry-After`).
fn ceil_secs(d: time::Duration) -> u64 {
    let ms = d.whole_milliseconds().max(0);
    u64::try_from((ms + 999) / 1000).unwrap_or(u64::MAX).max(1)
}

/// What the cache can say about a token's key without fetching.
enum Lookup {
    Trusted(Arc<DecodingKey>),
    /// The key is trusted but past half its age: use it, and refresh in the background.
    TrustedRefresh(Arc<DecodingKey>),
    Miss,
}

impl JwksCache {
    async fn key_for(
        this: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<DecodingKey>, VerifyError> {
        let kid = kid.unwrap_or("");
        let fam = family(alg).ok_or(VerifyError::AlgorithmNotAllowed(format!("{alg:?}")))?;
        match this.lookup(kid, fam) {
            Lookup::Trusted(key) => return Ok(key),
            Lookup::TrustedRefresh(key) => {
                Self::refresh_in_background(this);
                return Ok(key);
            }
            Lookup::Miss => {}
        }
        // Unknown kid, or no trusted keys: fetch (single-flight), but at most once per
        // `min_refetch` so junk tokens cannot make us hammer the identity service.
        let _fetching = this.fetching.lock().await;
        if let Lookup::Trusted(key) | Lookup::TrustedRefresh(key) = this.lookup(kid, fam) {
            return Ok(key);
        }
        let now = this.clock.now();
        let (recent_attempt, failure, fresh) = {
            let state = this.read();
            (
                state
                    .attempted_at
                    .map(|t| now - t)
                    .filter(|since| *since < this.min_refetch),
                state.failure.clone(),
                state.fetched_at.is_some_and(|t| now - t < this.max_age),
            )
        };
        if let Some(since) = recent_attempt {
            match failure {
                // The source is failing: the token may be good, the keys are what is missing.
                Some(reason) => {
                    return Err(VerifyError::KeysUnavailable {
                        reason,
                        retry_after_secs: ceil_secs(this.min_refetch - since),
                    })
                }
                // A set fetched moments ago does not have this kid.
                None if fresh => return Err(VerifyError::UnknownKey),
                None => {}
            }
        }
        this.fetch_and_store().await?;
        match this.lookup(kid, fam) {
            Lookup::Trusted(key) | Lookup::TrustedRefresh(key) => Ok(key),
            Lookup::Miss => Err(VerifyError::UnknownKey),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, JwksState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The key for `kid` if the set is younger than `max_age` and the key's type fits the
    /// token's algorithm family (no confusion).
    fn lookup(&self, kid: &str, fam: Family) -> Lookup {
        let now = self.clock.now();
        let state = self.read();
        let Some(age) = state.fetched_at.map(|t| now - t) else {
            return Lookup::Miss;
        };
        if age >= self.max_age {
            return Lookup::Miss;
        }
        let keys = &state.keys;
        let found = keys.get(kid).or_else(|| {
            // A token without `kid` is accepted only when the set has exactly one key.
            (kid.is_empty() && keys.len() == 1)
                .then(|| keys.values().next())
                .flatten()
        });
        match found {
            Some((key, f)) if *f == fam => {
                let refresh_due = age >= self.max_age / 2
                    && state
                        .attempted_at
                        .is_none_or(|t| now - t >= self.min_refetch);
                if refresh_due {
                    Lookup::TrustedRefresh(key.clone())
                } else {
                    Lookup::Trusted(key.clone())
                }
            }
            _ => Lookup::Miss,
        }
    }

    /// Refetches the set without making the caller wait; one refresh at a time.
    fn refresh_in_background(this: &Arc<Self>) {
        if this.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let cache = this.clone();
        tokio::spawn(async move {
            {
                let _fetching = cache.fetching.lock().await;
                // Someone may have fetched while this task waited.
                let now = cache.clock.now();
                let due = cache
                    .read()
                    .attempted_at
                    .is_none_or(|t| now - t >= cache.min_refetch);
                if due {
                    if let Err(e) = cache.fetch_and_store().await {
                        tracing::warn!(
                            error = %e,
                            "identity JWKS refresh failed; the cached keys stay trusted until they are jwks_max_age_secs old"
                        );
                    }
                }
            }
            cache.refreshing.store(false, Ordering::SeqCst);
        });
    }

    /// Fetches the set and records the outcome; the caller holds `fetching`.
    async fn fetch_and_store(&self) -> Result<(), VerifyError> {
        let now = self.clock.now();
        match self.fetch().await {
            Ok(set) => {
                let mut fresh = HashMap::new();
                for jwk in &set.keys {
                    if let Some((key, fam)) = decoding_key(jwk) {
                        let id = jwk.common.key_id.clone().unwrap_or_default();
                        fresh.insert(id, (Arc::new(key), fam));
                    }
                }
                tracing::info!(keys = fresh.len(), url = %self.url, "fetched identity JWKS");
                let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                state.keys = fresh;
                state.fetched_at = Some(now);
                state.attempted_at = Some(now);
                state.failure = None;
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(error = %reason, url = %self.url, "identity JWKS fetch failed");
                let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                state.attempted_at = Some(now);
                state.failure = Some(reason.clone());
                Err(VerifyError::KeysUnavailable {
                    reason,
                    retry_after_secs: ceil_secs(self.min_refetch),
                })
            }
        }
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let res = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| crate::tls::error_chain(&e.without_url()))?;
        if !res.status().is_success() {
            return Err(format!("JWKS answered {}", res.status()));
        }
        res.json::<JwkSet>()
            .await
            .map_err(|e| format!("JWKS is not a key set: {e}"))
    }
}

/// RSA and EC keys of a JWKS, tagged with their family; anything else is ignored.
fn decoding_key(jwk: &Jwk) -> Option<(DecodingKey, Family)> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    let fam = match &jwk.algorithm {
        P::RSA(_) => Family::Rsa,
        P::EllipticCurve(_) => Family::Ec,
        _ => return None,
    };
    DecodingKey::from_jwk(jwk).ok().map(|k| (k, fam))
}
