//! `--auth oidc`: bearer tokens of a trusted OpenID Connect provider (a Keycloak-like issuer
//! simulated here: its signing key made per test, its JWKS served over loopback), with
//! eHealth-style roles or SMART scopes.

use std::collections::BTreeSet;

use hearth_server::AuthSettings;
use hearth_server::auth::OidcSettings;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

const ISSUER: &str = "https://idp.example/realms/ehealth";
const AUDIENCE: &str = "hearth";

/// The provider's public key as published (Keycloak's JWKS carry RS256 keys).
fn provider_jwks(keys: &[&TestKey]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|key| {
            let mut jwk = key.jwk();
            jwk.as_object_mut().unwrap().remove("alg");
            jwk
        })
        .collect();
    json!({ "keys": keys })
}

struct Provider {
    key: TestKey,
    jwks: JwksServer,
}

impl Provider {
    async fn start() -> Self {
        let key = TestKey::rsa("idp-1");
        let jwks = JwksServer::start(provider_jwks(&[&key])).await;
        Self { key, jwks }
    }

    /// A token with these claims on top of valid `iss`, `aud` and `exp`.
    fn token(&self, claims: Value) -> String {
        self.token_with(&self.key, claims)
    }

    fn token_with(&self, key: &TestKey, claims: Value) -> String {
        let mut full = json!({
            "iss": ISSUER,
            "aud": [AUDIENCE, "account"],
            "exp": unix_now() + 300,
            "iat": unix_now(),
        });
        for (name, value) in claims.as_object().cloned().unwrap_or_default() {
            if value.is_null() {
                full.as_object_mut().unwrap().remove(&name);
            } else {
                full[name] = value;
            }
        }
        key.sign(json!({"alg": "RS256"}), &full)
    }
}

async fn spawn_oidc(provider: &Provider) -> TestServer {
    let mut auth = AuthSettings::oidc(OidcSettings {
        issuer: ISSUER.into(),
        jwks_url: provider.jwks.url.clone(),
        audience: AUDIENCE.into(),
    });
    auth.jwks_min_refetch = std::time::Duration::ZERO;
    spawn(Options {
        auth,
        ..Options::default()
    })
    .await
}

/// An eHealth token: the user in `user_id`, permissions as realm roles.
fn ehealth(user: &str, roles: &[&str]) -> Value {
    json!({"user_id": user, "user_type": "SYSTEM", "realm_access": {"roles": roles}})
}

#[tokio::test]
async fn ehealth_roles_grant_export_types_and_downloads() {
    let provider = Provider::start().await;
    let server = spawn_oidc(&provider).await;
    let token = provider.token(ehealth(
        "u-1",
        &[
            "Patient.search",
            "Condition.search",
            "$bulk-export",
            "Binary.read",
        ],
    ));

    // No _type: the covered types only.
    let status_url = server.start_export("", &token).await;
    let manifest = server.manifest(&status_url, &token).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let files = outputs(&manifest);
    let types: BTreeSet<&str> = files.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, BTreeSet::from(["Condition", "Patient"]));
    for (_, url) in &files {
        assert_eq!(server.get(url, Some(&token)).await.status(), StatusCode::OK);
    }

    // A type without its role: 403.
    assert_outcome(
        server.kick_off("?_type=Observation", Some(&token)).await,
        StatusCode::FORBIDDEN,
    )
    .await;

    // Without Binary.read the same user cannot download.
    let no_download = provider.token(ehealth("u-1", &["Patient.search", "$bulk-export"]));
    assert_outcome(
        server.get(&files[0].1, Some(&no_download)).await,
        StatusCode::FORBIDDEN,
    )
    .await;

    // Without $bulk-export no export starts, even with types.
    let no_export = provider.token(ehealth("u-1", &["Patient.search", "Binary.read"]));
    assert_outcome(
        server.kick_off("?_type=Patient", Some(&no_export)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    // But the search role allows searching.
    assert_eq!(
        server.get("/Patient", Some(&no_export)).await.status(),
        StatusCode::OK
    );

    // Another user does not see the job.
    let other = provider.token(ehealth(
        "u-2",
        &[
            "Patient.search",
            "Condition.search",
            "$bulk-export",
            "Binary.read",
        ],
    ));
    assert_outcome(
        server.get(&status_url, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_outcome(
        server.get(&files[0].1, Some(&other)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn smart_scopes_in_a_provider_token_count() {
    let provider = Provider::start().await;
    let server = spawn_oidc(&provider).await;
    let token = provider.token(json!({"sub": "svc-1", "scope": "openid system/Observation.rs"}));
    let status_url = server.start_export("", &token).await;
    let manifest = server.manifest(&status_url, &token).await;
    let types: BTreeSet<String> = outputs(&manifest).into_iter().map(|(t, _)| t).collect();
    assert_eq!(types, BTreeSet::from(["Observation".to_owned()]));
}

#[tokio::test]
async fn provider_tokens_are_checked() {
    let provider = Provider::start().await;
    let server = spawn_oidc(&provider).await;
    let roles = ehealth("u-1", &["Patient.search", "$bulk-export"]);
    let with = |name: &str, value: Value| {
        let mut claims = roles.clone();
        claims[name] = value;
        claims
    };
    let stranger = TestKey::rsa("idp-1");
    let unknown_kid = TestKey::rsa("not-published");
    let cases = vec![
        (
            "another issuer",
            provider.token(with("iss", json!("https://evil.example"))),
        ),
        (
            "another audience",
            provider.token(with("aud", json!("someone-else"))),
        ),
        ("no audience", provider.token(with("aud", Value::Null))),
        (
            "expired",
            provider.token(with("exp", json!(unix_now() - 3600))),
        ),
        (
            "not yet valid",
            provider.token(with("nbf", json!(unix_now() + 3600))),
        ),
        (
            "signed by another key",
            provider.token_with(&stranger, roles.clone()),
        ),
        (
            "unknown kid",
            provider.token_with(&unknown_kid, roles.clone()),
        ),
        ("no subject", provider.token(with("user_id", Value::Null))),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (case, token) in cases {
        let response = server.get("/Patient", Some(&token)).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        assert_unauthorized(response).await;
    }
    // HS256 (a shared secret) is never accepted from a provider.
    let header = base64_url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = base64_url(roles.to_string().as_bytes());
    let token = format!("{header}.{body}.c2lnbmF0dXJl");
    assert_unauthorized(server.get("/Patient", Some(&token)).await).await;
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn a_rotated_provider_key_is_picked_up() {
    let provider = Provider::start().await;
    let server = spawn_oidc(&provider).await;
    let roles = ehealth("u-1", &["Patient.search"]);
    assert_eq!(
        server
            .get("/Patient", Some(&provider.token(roles.clone())))
            .await
            .status(),
        StatusCode::OK
    );
    let next = TestKey::rsa("idp-2");
    provider
        .jwks
        .publish(provider_jwks(&[&provider.key, &next]));
    assert_eq!(
        server
            .get("/Patient", Some(&provider.token_with(&next, roles)))
            .await
            .status(),
        StatusCode::OK
    );
}
