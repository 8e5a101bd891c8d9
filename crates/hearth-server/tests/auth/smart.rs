//! Hearth as its own SMART Backend Services authorization server: discovery, the token
//! endpoint's success and every OAuth error case, scopes v1 and v2, JWKS URLs.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn discovery_names_the_token_endpoint_and_capabilities() {
    let server = spawn_smart().await;
    let response = server.get("/.well-known/smart-configuration", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let config: Value = response.json().await.unwrap();
    assert_eq!(config["token_endpoint"], server.token_url());
    assert_eq!(
        config["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert_eq!(
        config["token_endpoint_auth_signing_alg_values_supported"],
        json!(["RS384", "ES384"])
    );
    assert_eq!(
        config["grant_types_supported"],
        json!(["client_credentials"])
    );
    assert!(config["scopes_supported"].as_array().unwrap().len() >= 2);
    let capabilities = config["capabilities"].as_array().unwrap();
    for capability in [
        "client-confidential-asymmetric",
        "permission-v1",
        "permission-v2",
    ] {
        assert!(capabilities.contains(&json!(capability)), "{capability}");
    }
    assert_eq!(config["code_challenge_methods_supported"], json!(["S256"]));

    // The CapabilityStatement carries the oauth-uris extension (bdt checks it), no token needed.
    let metadata: Value = server.get("/metadata", None).await.json().await.unwrap();
    let security = &metadata["rest"][0]["security"];
    let extension = security["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
        })
        .expect("the oauth-uris extension");
    assert_eq!(extension["extension"][0]["url"], "token");
    assert_eq!(extension["extension"][0]["valueUri"], server.token_url());
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
}

#[tokio::test]
async fn rs384_and_es384_assertions_get_tokens() {
    let server = spawn_smart().await;
    for key in [TestKey::rsa("rsa-1"), TestKey::ec("ec-1")] {
        let client = format!("client-{}", key.alg());
        server
            .register(&client, None, Some(&jwks(&[&key])), None)
            .await;
        let (status, body) = server
            .request_token(&server.assertion(&key, &client), "system/*.read")
            .await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", key.alg());
        assert!(!body["access_token"].as_str().unwrap().is_empty());
        assert_eq!(body["token_type"], "bearer");
        let expires_in = body["expires_in"].as_u64().unwrap();
        assert!((1..=300).contains(&expires_in), "{expires_in}");
        assert_eq!(body["scope"], "system/*.read");
        assert!(body.get("refresh_token").is_none());
        // The token works.
        let token = body["access_token"].as_str().unwrap();
        assert_eq!(
            server.get("/Patient/p1", Some(token)).await.status(),
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn malformed_token_requests_are_oauth_errors() {
    let server = spawn_smart().await;
    let key = TestKey::ec("k");
    server.register("c", None, Some(&jwks(&[&key])), None).await;
    let assertion = server.assertion(&key, "c");
    let good = [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", ASSERTION_TYPE),
        ("client_assertion", assertion.as_str()),
        ("scope", "system/*.read"),
    ];
    let without = |name: &str| -> Vec<(&str, &str)> {
        good.iter().filter(|(k, _)| *k != name).copied().collect()
    };
    let with = |name: &str, value: &'static str| -> Vec<(&str, &str)> {
        good.iter()
            .map(|(k, v)| if *k == name { (*k, value) } else { (*k, *v) })
            .collect()
    };
    let bad = StatusCode::BAD_REQUEST;
    let unauthorized = StatusCode::UNAUTHORIZED;
    for (form, status, error) in [
        (without("grant_type"), bad, "invalid_request"),
        (
            with("grant_type", "not_a_grant_type"),
            bad,
            "unsupported_grant_type",
        ),
        (
            with("grant_type", "invalid test value"),
            bad,
            "unsupported_grant_type",
        ),
        (without("client_assertion_type"), bad, "invalid_request"),
        (
            with("client_assertion_type", "not_an_assertion_type"),
            unauthorized,
            "invalid_client",
        ),
        (without("client_assertion"), bad, "invalid_request"),
        (
            with("client_assertion", "invalid test value"),
            unauthorized,
            "invalid_client",
        ),
        (without("scope"), bad, "invalid_request"),
        (with("scope", "invalid test value"), bad, "invalid_scope"),
    ] {
        let answer = server.token_request(&form).await;
        assert_oauth_error(&answer, status, error);
    }

    // A JSON body instead of a form.
    let response = server
        .client
        .post(server.token_url())
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    // Token responses are never cached.
    let response = server
        .client
        .post(server.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=password")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store");
}

#[tokio::test]
async fn bad_assertions_are_invalid_client() {
    let server = spawn_smart().await;
    let key = TestKey::rsa("good");
    let stranger = TestKey::ec("good"); // same kid, other key
    let unknown = TestKey::ec("unknown");
    let jwks_server = JwksServer::start(jwks(&[&key])).await;
    server
        .register("c", Some(&jwks_server.url), None, None)
        .await;
    let claims = server.claims("c");
    let with_claim = |name: &str, value: Value| {
        let mut claims = claims.clone();
        // Every case its own jti, so none is refused as a replay instead.
        claims["jti"] = json!(uuid::Uuid::new_v4().to_string());
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value;
        }
        claims
    };
    let now = unix_now();
    let cases: Vec<(&str, String)> = vec![
        (
            "unknown client",
            key.sign(
                json!({}),
                &with_claim("iss", json!("nobody")).tap_sub("nobody"),
            ),
        ),
        (
            "iss differs from sub",
            key.sign(json!({}), &with_claim("sub", json!("someone-else"))),
        ),
        (
            "bad iss",
            key.sign(json!({}), &with_claim("iss", json!("bad-iss"))),
        ),
        (
            "no iss",
            key.sign(json!({}), &with_claim("iss", Value::Null)),
        ),
        (
            "bad aud",
            key.sign(
                json!({}),
                &with_claim("aud", json!("https://elsewhere/token")),
            ),
        ),
        (
            "no aud",
            key.sign(json!({}), &with_claim("aud", Value::Null)),
        ),
        (
            "expired",
            key.sign(json!({}), &with_claim("exp", json!(now - 600))),
        ),
        (
            "exp over 5 minutes ahead",
            key.sign(json!({}), &with_claim("exp", json!(now + 3600))),
        ),
        (
            "no exp",
            key.sign(json!({}), &with_claim("exp", Value::Null)),
        ),
        (
            "no jti",
            key.sign(json!({}), &with_claim("jti", Value::Null)),
        ),
        (
            "no kid",
            key.sign(json!({"kid": null}), &with_claim("x", Value::Null)),
        ),
        (
            "unknown kid",
            unknown.sign(json!({}), &with_claim("x", Value::Null)),
        ),
        (
            "wrong key, same kid",
            stranger.sign(json!({"alg": "RS384"}), &with_claim("x", Value::Null)),
        ),
        (
            "signed by an unknown ES384 key",
            stranger.sign(json!({}), &with_claim("x", Value::Null)),
        ),
        (
            "RS256",
            key.sign(json!({"alg": "RS256"}), &with_claim("x", Value::Null)),
        ),
        (
            "bad jku",
            key.sign(
                json!({"jku": "test-bad-jku"}),
                &with_claim("x", Value::Null),
            ),
        ),
        (
            "foreign jku",
            key.sign(
                json!({"jku": "https://attacker.example/jwks.json"}),
                &with_claim("x", Value::Null),
            ),
        ),
        ("unsigned", {
            let signed = server.assertion(&key, "c");
            let (head_and_claims, _) = signed.rsplit_once('.').unwrap();
            format!("{head_and_claims}.")
        }),
    ];
    for (case, assertion) in cases {
        let answer = server.request_token(&assertion, "system/*.read").await;
        assert_eq!(answer.0, StatusCode::UNAUTHORIZED, "{case}: {}", answer.1);
        assert_eq!(answer.1["error"], "invalid_client", "{case}: {}", answer.1);
    }
    // jku naming the registered URL is fine.
    let assertion = key.sign(json!({"jku": jwks_server.url}), &server.claims("c"));
    let answer = server.request_token(&assertion, "system/*.read").await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
}

/// `claims.tap_sub(x)`: the same claims with `sub` set too.
trait TapSub {
    fn tap_sub(self, sub: &str) -> Value;
}

impl TapSub for Value {
    fn tap_sub(mut self, sub: &str) -> Value {
        self["sub"] = json!(sub);
        self
    }
}

#[tokio::test]
async fn a_replayed_assertion_is_refused() {
    let server = spawn_smart().await;
    let key = TestKey::ec("k");
    server.register("c", None, Some(&jwks(&[&key])), None).await;
    let assertion = server.assertion(&key, "c");
    let first = server.request_token(&assertion, "system/*.read").await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    let replay = server.request_token(&assertion, "system/*.read").await;
    assert_oauth_error(&replay, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(
        replay.1["error_description"]
            .as_str()
            .unwrap()
            .contains("jti")
    );

    // A request refused for its scope does not use up the assertion.
    let assertion = server.assertion(&key, "c");
    let refused = server
        .request_token(&assertion, "system/Patient.write")
        .await;
    assert_oauth_error(&refused, StatusCode::BAD_REQUEST, "invalid_scope");
    let retried = server.request_token(&assertion, "system/*.read").await;
    assert_eq!(retried.0, StatusCode::OK, "{}", retried.1);
}

#[tokio::test]
async fn scopes_are_granted_read_only_in_the_clients_syntax() {
    let server = spawn_smart().await;
    let key = TestKey::rsa("k");
    server.register("c", None, Some(&jwks(&[&key])), None).await;
    let grant = |scope: &'static str| {
        let server = &server;
        let key = &key;
        async move {
            server
                .request_token(&server.assertion(key, "c"), scope)
                .await
        }
    };
    for (requested, granted) in [
        ("system/*.read", "system/*.read"),
        ("system/*.*", "system/*.read"),
        ("system/Patient.*", "system/Patient.read"),
        ("system/Patient.read", "system/Patient.read"),
        ("system/*.rs", "system/*.rs"),
        ("system/*.cruds", "system/*.rs"),
        ("system/Patient.cruds", "system/Patient.rs"),
        ("system/Patient.rs", "system/Patient.rs"),
        (
            "system/Patient.read system/Observation.rs",
            "system/Patient.read system/Observation.rs",
        ),
        ("launch system/Patient.read", "system/Patient.read"),
        (
            "system/Patient.rs?gender=female system/Observation.rs",
            "system/Patient.rs?gender=female system/Observation.rs",
        ),
    ] {
        let (status, body) = grant(requested).await;
        assert_eq!(status, StatusCode::OK, "{requested}: {body}");
        assert_eq!(body["scope"], granted, "{requested}");
    }
    for requested in [
        "",
        "launch fhirUser",
        "system/Patient.write",
        "system/Patient.c",
        "system/Patient.cu",
        "system/Patient.cd",
        "system/Patient.cud",
        "system/Patient.ud",
        "system/Patient.d",
        "system/Patient.u",
        "system/Patient.unknownAction",
        "system/Patient.xyz",
        "system/UnknownResource.read",
        "system/UnknownResource.r",
        "system/Patient.rs?a=b",
        "patient/*.read",
    ] {
        let answer = grant(requested).await;
        assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "invalid_scope");
    }
}

#[tokio::test]
async fn grants_stay_within_the_registered_scopes() {
    let server = spawn_smart().await;
    let key = TestKey::ec("k");
    server
        .register("c", None, Some(&jwks(&[&key])), Some("system/Patient.rs"))
        .await;
    let (status, body) = server
        .request_token(&server.assertion(&key, "c"), "system/*.read")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["scope"], "system/Patient.read");
    let answer = server
        .request_token(&server.assertion(&key, "c"), "system/Observation.rs")
        .await;
    assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "invalid_scope");
}

#[tokio::test]
async fn jwks_urls_are_cached_and_refreshed_for_a_new_kid() {
    let server = spawn_smart().await;
    let first = TestKey::rsa("first");
    let jwks_server = JwksServer::start(jwks(&[&first])).await;
    jwks_server.set_cache_control("max-age=3600");
    server
        .register("rotating", Some(&jwks_server.url), None, None)
        .await;
    server.token(&first, "rotating", "system/*.rs").await;
    server.token(&first, "rotating", "system/*.rs").await;
    assert_eq!(
        jwks_server.hits(),
        1,
        "the JWKS is fetched once while fresh"
    );

    // The client rotates to a new key: the unknown kid makes Hearth fetch again.
    let second = TestKey::ec("second");
    jwks_server.publish(jwks(&[&second]));
    server.token(&second, "rotating", "system/*.rs").await;
    assert_eq!(jwks_server.hits(), 2);
    // The old key is gone from the set now.
    let answer = server
        .request_token(&server.assertion(&first, "rotating"), "system/*.rs")
        .await;
    assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
}

#[tokio::test]
async fn unknown_kids_do_not_refetch_more_often_than_allowed() {
    let mut options = Options::default();
    options.auth.jwks_min_refetch = Duration::from_secs(60);
    let server = spawn(options).await;
    let key = TestKey::rsa("known");
    let jwks_server = JwksServer::start(jwks(&[&key])).await;
    server
        .register("c", Some(&jwks_server.url), None, None)
        .await;
    server.token(&key, "c", "system/*.rs").await;
    for n in 0..5 {
        let made_up = TestKey::ec(&format!("made-up-{n}"));
        let answer = server
            .request_token(&server.assertion(&made_up, "c"), "system/*.rs")
            .await;
        assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
    }
    assert_eq!(
        jwks_server.hits(),
        1,
        "made-up kids must not trigger fetches"
    );
}

#[tokio::test]
async fn a_client_whose_jwks_url_is_down_cannot_authenticate() {
    let server = spawn_smart().await;
    let key = TestKey::rsa("k");
    // Nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    drop(listener);
    server.register("c", Some(&url), None, None).await;
    let answer = server
        .request_token(&server.assertion(&key, "c"), "system/*.rs")
        .await;
    assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
}

#[tokio::test]
async fn the_token_endpoint_does_not_exist_without_smart() {
    let server = spawn(Options {
        auth: hearth_server::AuthSettings::default(),
        ..Options::default()
    })
    .await;
    for path in ["/auth/token", "/.well-known/smart-configuration"] {
        let response = if path.ends_with("token") {
            server.client.post(server.url(path)).send().await.unwrap()
        } else {
            server.get(path, None).await
        };
        assert_outcome(response, StatusCode::NOT_FOUND).await;
    }
    let metadata: Value = server.get("/metadata", None).await.json().await.unwrap();
    assert!(metadata["rest"][0].get("security").is_none());
}
