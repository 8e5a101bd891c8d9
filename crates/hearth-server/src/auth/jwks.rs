//! JSON Web Key Sets: parsing them, picking the one key a JWT names, and fetching registered
//! JWKS URLs with a cache that honours `Cache-Control` and is refreshed when a token names a
//! key it does not hold (the client or provider rotated its keys).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// A JWKS document larger than this is refused rather than read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long a fetched JWKS is used when its response says nothing about caching.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// The longest a fetched JWKS is trusted, whatever `Cache-Control` says: key revocation must
/// reach Hearth within a day.
const LONGEST_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Why no key could be found for a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the key set is not a JWKS document: {0}")]
    Invalid(String),
    #[error("the key set has no usable RS384 or ES384 public key")]
    NoUsableKey,
    #[error("cannot fetch the key set from {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("the key set has no {alg:?} key with kid '{kid}'")]
    UnknownKid { kid: String, alg: Algorithm },
    #[error("the key set has several {alg:?} keys with kid '{kid}'")]
    AmbiguousKid { kid: String, alg: Algorithm },
    #[error("the token names no kid and the key set has not exactly one {0:?} key")]
    NoKid(Algorithm),
    #[error("the key with kid '{0}' cannot be used: {1}")]
    BadKey(String, String),
}

/// The keys of a JWKS document. Keys Hearth cannot use (other types, private-only, broken) are
/// skipped one by one, so one odd key does not make a client's whole set unusable.
pub fn parse_jwks(text: &[u8]) -> Result<Vec<Jwk>, JwksError> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(text).map_err(|e| JwksError::Invalid(e.to_string()))?;
    Ok(set
        .keys
        .into_iter()
        .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
        .collect())
}

/// Checks a JWKS for registration: at least one key an assertion can be verified with.
pub fn check_client_jwks(text: &[u8]) -> Result<usize, JwksError> {
    let keys = parse_jwks(text)?;
    let usable = keys
        .iter()
        .filter(|key| {
            key.common.key_id.is_some()
                && [Algorithm::RS384, Algorithm::ES384]
                    .iter()
                    .any(|alg| fits(key, *alg))
        })
        .count();
    if usable == 0 {
        return Err(JwksError::NoUsableKey);
    }
    Ok(usable)
}

/// Whether `key` may verify a signature made with `alg`: its type (and curve) match, and it
/// does not say it is for something else.
fn fits(key: &Jwk, alg: Algorithm) -> bool {
    if matches!(key.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return false;
    }
    if let Some(declared) = key.common.key_algorithm
        && key_algorithm(declared) != Some(alg)
    {
        return false;
    }
    match (&key.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        _ => false,
    }
}

fn key_algorithm(declared: KeyAlgorithm) -> Option<Algorithm> {
    Some(match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        _ => return None,
    })
}

/// The single key of `keys` that a token signed with `alg` under `kid` names. Without a kid
/// (allowed for OpenID providers only) the set must hold exactly one fitting key.
pub fn select_key(
    keys: &[Jwk],
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<DecodingKey, JwksError> {
    let candidates: Vec<&Jwk> = keys
        .iter()
        .filter(|key| fits(key, alg))
        .filter(|key| kid.is_none() || key.common.key_id.as_deref() == kid)
        .collect();
    let key = match (candidates.as_slice(), kid) {
        ([key], _) => *key,
        ([], Some(kid)) => {
            return Err(JwksError::UnknownKid {
                kid: kid.to_owned(),
                alg,
            });
        }
        (_, Some(kid)) => {
            return Err(JwksError::AmbiguousKid {
                kid: kid.to_owned(),
                alg,
            });
        }
        (_, None) => return Err(JwksError::NoKid(alg)),
    };
    DecodingKey::from_jwk(key).map_err(|e| {
        JwksError::BadKey(key.common.key_id.clone().unwrap_or_default(), e.to_string())
    })
}

struct Cached {
    keys: Arc<Vec<Jwk>>,
    fetched: Instant,
    max_age: Duration,
}

/// Fetched key sets by URL.
pub struct JwksCache {
    http: reqwest::Client,
    entries: Mutex<HashMap<String, Cached>>,
    /// A set is fetched again for an unknown kid at most this often: a stream of made-up kids
    /// must not turn Hearth into a request amplifier.
    min_refetch: Duration,
}

impl JwksCache {
    pub fn new(min_refetch: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Self {
            http,
            entries: Mutex::new(HashMap::new()),
            min_refetch,
        }
    }

    /// The key that `kid` names in the set at `url`: from the cache while it is fresh, fetched
    /// again when it is stale or does not hold the kid (at most once per `min_refetch`). A
    /// failed fetch falls back to a stale copy rather than locking every client out.
    pub async fn key(
        &self,
        url: &str,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey, JwksError> {
        let cached = self.cached(url);
        if let Some((keys, fresh, age)) = &cached {
            let found = select_key(keys, kid, alg);
            let may_refetch = *age >= self.min_refetch;
            match found {
                Ok(key) if *fresh => return Ok(key),
                Err(JwksError::UnknownKid { .. } | JwksError::NoKid(_)) if !may_refetch => {
                    return found;
                }
                Err(e @ (JwksError::AmbiguousKid { .. } | JwksError::BadKey(..))) if *fresh => {
                    return Err(e);
                }
                _ => {}
            }
        }
        match self.fetch(url).await {
            Ok(keys) => select_key(&keys, kid, alg),
            Err(error) => match cached {
                Some((keys, _, _)) => {
                    tracing::warn!(target: "audit", event = "auth.jwks_fetch_failed", url, error = %error,
                        "using the cached key set");
                    select_key(&keys, kid, alg)
                }
                None => Err(error),
            },
        }
    }

    fn cached(&self, url: &str) -> Option<(Arc<Vec<Jwk>>, bool, Duration)> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(url)?;
        let age = entry.fetched.elapsed();
        Some((entry.keys.clone(), age < entry.max_age, age))
    }

    async fn fetch(&self, url: &str) -> Result<Arc<Vec<Jwk>>, JwksError> {
        let fail = |reason: String| JwksError::Fetch {
            url: url.to_owned(),
            reason,
        };
        let mut response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("it answered {}", response.status())));
        }
        let max_age = max_age(
            response
                .headers()
                .get_all(reqwest::header::CACHE_CONTROL)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fail(e.to_string()))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(fail(format!("it is larger than {MAX_JWKS_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        let keys = Arc::new(parse_jwks(&body)?);
        if let Ok(mut entries) = self.entries.lock() {
            // Only registered or configured URLs get here, so the map stays small.
            entries.insert(
                url.to_owned(),
                Cached {
                    keys: keys.clone(),
                    fetched: Instant::now(),
                    max_age,
                },
            );
        }
        Ok(keys)
    }
}

/// How long a response may be cached, from its `Cache-Control` values.
fn max_age<'a>(values: impl Iterator<Item = &'a str>) -> Duration {
    let mut age = None;
    for directive in values.flat_map(|v| v.split(',')).map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(seconds) = lower.strip_prefix("max-age=")
            && let Ok(seconds) = seconds.trim_matches('"').parse::<u64>()
        {
            age = Some(Duration::from_secs(seconds));
        }
    }
    age.unwrap_or(DEFAULT_MAX_AGE).min(LONGEST_MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_N: &str = "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw";

    fn rsa_jwk(kid: &str) -> serde_json::Value {
        serde_json::json!({"kty": "RSA", "kid": kid, "n": RSA_N, "e": "AQAB", "alg": "RS384"})
    }

    #[test]
    fn odd_keys_are_skipped_not_fatal() {
        let set = serde_json::json!({"keys": [
            {"kty": "weird"},
            {"kty": "EC", "kid": "broken"},
            rsa_jwk("a"),
        ]});
        assert!(parse_jwks(set.to_string().as_bytes()).is_ok());
        assert_eq!(check_client_jwks(set.to_string().as_bytes()), Ok(1));
        assert!(parse_jwks(b"[]").is_err());
        assert_eq!(
            check_client_jwks(br#"{"keys":[]}"#),
            Err(JwksError::NoUsableKey)
        );
    }

    #[test]
    fn a_key_is_picked_by_kid_and_algorithm() {
        let keys = parse_jwks(
            serde_json::json!({"keys": [rsa_jwk("a"), rsa_jwk("b"), rsa_jwk("b")]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert!(select_key(&keys, Some("a"), Algorithm::RS384).is_ok());
        assert!(matches!(
            select_key(&keys, Some("a"), Algorithm::ES384),
            Err(JwksError::UnknownKid { .. })
        ));
        assert!(matches!(
            select_key(&keys, Some("b"), Algorithm::RS384),
            Err(JwksError::AmbiguousKid { .. })
        ));
        assert!(matches!(
            select_key(&keys, Some("c"), Algorithm::RS384),
            Err(JwksError::UnknownKid { .. })
        ));
        assert!(matches!(
            select_key(&keys, None, Algorithm::RS384),
            Err(JwksError::NoKid(_))
        ));
        // A key declared for RS384 does not verify RS256.
        assert!(select_key(&keys, Some("a"), Algorithm::RS256).is_err());
    }

    #[test]
    fn cache_control_sets_the_lifetime() {
        assert_eq!(max_age(["max-age=60"].into_iter()), Duration::from_secs(60));
        assert_eq!(
            max_age(["public, max-age=120"].into_iter()),
            Duration::from_secs(120)
        );
        assert_eq!(max_age(["no-store"].into_iter()), Duration::ZERO);
        assert_eq!(max_age(std::iter::empty()), DEFAULT_MAX_AGE);
        assert_eq!(max_age(["max-age=99999999"].into_iter()), LONGEST_MAX_AGE);
    }
}
