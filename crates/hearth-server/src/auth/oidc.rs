//! Bearer tokens issued by a trusted OpenID Connect provider (Keycloak and the like, as in the
//! Danish eHealth infrastructure): signature from the provider's JWKS, `iss`, `aud`, `exp`,
//! then permissions from SMART scopes in `scope` and/or roles in `realm_access.roles` (and in
//! `resource_access.<audience>.roles`, Keycloak's client roles).

use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::grants::Grants;
use super::jwks::JwksCache;
use super::scopes::system_scopes;
use super::tokens::TokenError;

/// The provider and what its tokens must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcSettings {
    /// The `iss` of accepted tokens.
    pub issuer: String,
    /// Where the provider publishes its signing keys.
    pub jwks_url: String,
    /// An `aud` every accepted token must carry.
    pub audience: String,
}

/// Signature algorithms accepted from a provider: asymmetric only (an HMAC token would need a
/// secret shared with the provider).
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Clock skew allowed between the provider and Hearth.
const LEEWAY_SECS: u64 = 30;

/// Checks a provider's token and maps its permissions.
pub async fn verify(
    settings: &OidcSettings,
    jwks: &JwksCache,
    token: &str,
) -> Result<Grants, TokenError> {
    let header = jsonwebtoken::decode_header(token)?;
    if !ALGORITHMS.contains(&header.alg) {
        return Err(TokenError::Invalid(format!(
            "tokens signed with {:?} are not accepted",
            header.alg
        )));
    }
    let key = jwks
        .key(&settings.jwks_url, header.kid.as_deref(), header.alg)
        .await
        .map_err(|e| TokenError::Invalid(e.to_string()))?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[&settings.issuer]);
    validation.set_audience(&[&settings.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECS;
    let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)?.claims;
    grants_of(&claims, &settings.audience)
}

/// The permissions a provider's claims carry.
pub fn grants_of(claims: &Map<String, Value>, audience: &str) -> Result<Grants, TokenError> {
    // Jobs belong to the subject; eHealth's tokens name the user in `user_id`, Keycloak
    // service accounts carry `azp`/`client_id` too.
    let client = ["sub", "user_id", "azp", "client_id"]
        .iter()
        .find_map(|name| claims.get(*name).and_then(Value::as_str))
        .filter(|id| !id.is_empty())
        .ok_or_else(|| TokenError::Invalid("the token names no subject".into()))?;
    let mut grants = Grants::none(client);
    if let Some(scope) = claims.get("scope").and_then(Value::as_str) {
        grants.add_scopes(&system_scopes(scope));
    }
    let realm_roles = claims
        .get("realm_access")
        .and_then(|realm| realm.get("roles"));
    let client_roles = claims
        .get("resource_access")
        .and_then(|access| access.get(audience))
        .and_then(|access| access.get("roles"));
    for roles in [realm_roles, client_roles].into_iter().flatten() {
        if let Some(roles) = roles.as_array() {
            grants.add_roles(roles.iter().filter_map(Value::as_str));
        }
    }
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn ehealth_roles_and_smart_scopes_both_count() {
        let grants = grants_of(
            &claims(json!({
                "user_id": "u-1",
                "realm_access": {"roles": ["Task.search", "ClinicalImpression.search", "$bulk-export", "Binary.read"]},
                "user_type": "SYSTEM"
            })),
            "hearth",
        )
        .unwrap();
        assert_eq!(grants.client, "u-1");
        assert!(grants.may_export() && grants.may_download());
        assert!(grants.covers("Task") && grants.covers("ClinicalImpression"));
        assert!(!grants.covers("Patient"));

        let grants = grants_of(
            &claims(json!({"sub": "svc", "scope": "openid system/Patient.rs"})),
            "hearth",
        )
        .unwrap();
        assert!(grants.may_export() && grants.covers("Patient"));

        let grants = grants_of(
            &claims(json!({"sub": "svc", "resource_access": {"hearth": {"roles": ["$bulk-export", "Patient.search"]}}})),
            "hearth",
        )
        .unwrap();
        assert!(grants.may_export() && grants.covers("Patient"));
    }

    #[test]
    fn a_token_without_subject_is_refused() {
        assert!(grants_of(&claims(json!({"scope": "system/*.rs"})), "a").is_err());
    }
}
