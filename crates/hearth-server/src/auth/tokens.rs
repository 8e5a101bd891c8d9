//! Hearth's own access tokens: short-lived JWTs signed with HS256.
//!
//! Hearth is both the authorization server and the only resource server that reads these
//! tokens, so a symmetric key is enough: no key pair to publish or rotate through a JWKS. The
//! 256-bit secret lives in the store, so every Hearth process on one database accepts the
//! tokens of the others, and tokens survive a restart for the few minutes they live.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The longest an access token lives (SMART Backend Services: "SHOULD NOT exceed 300 s").
pub const MAX_LIFETIME_SECS: u64 = 300;

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The FHIR base URL: Hearth issued it ...
    pub iss: String,
    /// ... for itself.
    pub aud: String,
    /// The client id.
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
    /// The granted scopes, space-separated.
    pub scope: String,
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is not valid: {0}")]
    Invalid(String),
}

impl From<jsonwebtoken::errors::Error> for TokenError {
    fn from(error: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind;
        match error.kind() {
            ErrorKind::ExpiredSignature => Self::Expired,
            _ => Self::Invalid(error.to_string()),
        }
    }
}

/// Issues and checks access tokens.
pub struct TokenSigner {
    issuer: String,
    encoding: EncodingKey,
    validation: Validation,
    decoding: DecodingKey,
}

impl TokenSigner {
    pub fn new(issuer: &str, secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Hearth checks tokens against its own clock: no skew to allow for.
        validation.leeway = 0;
        Self {
            issuer: issuer.to_owned(),
            encoding: EncodingKey::from_secret(secret),
            validation,
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// A token for `client` with `scope`, valid `lifetime` seconds from `now` (Unix seconds).
    pub fn issue(
        &self,
        client: &str,
        scope: &str,
        now: u64,
        lifetime: u64,
    ) -> Result<String, TokenError> {
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.issuer.clone(),
            sub: client.to_owned(),
            exp: now + lifetime.min(MAX_LIFETIME_SECS),
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scope.to_owned(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }

    /// The claims of a token Hearth issued and that has not expired.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        Ok(jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)?.claims)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_carry_their_scope() {
        let signer = TokenSigner::new("https://h/fhir", &[7; 32]);
        let now = unix_now();
        let token = signer.issue("c1", "system/*.rs", now, 300).unwrap();
        let claims = signer.verify(&token).unwrap();
        assert_eq!(claims.sub, "c1");
        assert_eq!(claims.scope, "system/*.rs");
        assert_eq!(claims.exp, now + 300);
        // Capped at five minutes whatever is asked.
        let long = signer.issue("c1", "x", now, 3600).unwrap();
        assert_eq!(signer.verify(&long).unwrap().exp, now + 300);
    }

    #[test]
    fn foreign_expired_and_garbled_tokens_are_refused() {
        let signer = TokenSigner::new("https://h/fhir", &[7; 32]);
        let other = TokenSigner::new("https://h/fhir", &[8; 32]);
        let elsewhere = TokenSigner::new("https://other/fhir", &[7; 32]);
        let now = unix_now();
        let token = other.issue("c1", "system/*.rs", now, 300).unwrap();
        assert!(matches!(signer.verify(&token), Err(TokenError::Invalid(_))));
        let token = elsewhere.issue("c1", "system/*.rs", now, 300).unwrap();
        assert!(matches!(signer.verify(&token), Err(TokenError::Invalid(_))));
        let token = signer.issue("c1", "system/*.rs", now - 1000, 300).unwrap();
        assert_eq!(signer.verify(&token), Err(TokenError::Expired));
        for garbage in [
            "",
            "invalidToken",
            "a.b.c",
            "..",
            "eyJhbGciOiJub25lIn0.e30.",
        ] {
            assert!(signer.verify(garbage).is_err(), "{garbage}");
        }
    }
}
