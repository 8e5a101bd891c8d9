//! `hearth clients add|list|remove`, and `hearth serve` with `--auth` and `--tls-*`, as a user
//! runs them.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, hearth, hearth_command};
use tempfile::TempDir;

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A public RSA JWK (no private parts: nothing secret in this file).
fn public_jwks() -> serde_json::Value {
    serde_json::json!({"keys": [{
        "kty": "RSA", "kid": "k1", "alg": "RS384", "e": "AQAB",
        "n": "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw"
    }]})
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[test]
fn clients_are_added_listed_and_removed() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let jwks_file = dir.path().join("client.jwks.json");
    std::fs::write(&jwks_file, public_jwks().to_string()).unwrap();

    let added = hearth(&[
        "clients",
        "add",
        "--data",
        path(&data),
        "--id",
        "inline-client",
        "--jwks-file",
        path(&jwks_file),
        "--scope",
        "system/Patient.rs",
        "--scope",
        "system/Observation.read",
    ]);
    assert!(added.status.success(), "{}", text(&added));
    let added = hearth(&[
        "clients",
        "add",
        "--data",
        path(&data),
        "--id",
        "url-client",
        "--jwks-url",
        "https://client.example/jwks.json",
    ]);
    assert!(added.status.success(), "{}", text(&added));

    let listed = hearth(&["clients", "list", "--data", path(&data)]);
    let listing = text(&listed);
    assert!(listed.status.success(), "{listing}");
    assert!(listing.contains("inline-client"), "{listing}");
    assert!(
        listing.contains("system/Patient.rs system/Observation.read"),
        "{listing}"
    );
    assert!(listing.contains("inline JWKS (1 keys)"), "{listing}");
    assert!(listing.contains("url-client") && listing.contains("https://client.example/jwks.json"));

    let removed = hearth(&[
        "clients",
        "remove",
        "--data",
        path(&data),
        "--id",
        "url-client",
    ]);
    assert!(removed.status.success(), "{}", text(&removed));
    let again = hearth(&[
        "clients",
        "remove",
        "--data",
        path(&data),
        "--id",
        "url-client",
    ]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    let listed = text(&hearth(&["clients", "list", "--data", path(&data)]));
    assert!(!listed.contains("url-client"), "{listed}");
}

#[test]
fn bad_registrations_are_refused() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let private = dir.path().join("private.json");
    let mut jwks = public_jwks();
    jwks["keys"][0]["d"] = serde_json::json!("c2VjcmV0");
    std::fs::write(&private, jwks.to_string()).unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys":[]}"#).unwrap();
    let public = dir.path().join("public.json");
    std::fs::write(&public, public_jwks().to_string()).unwrap();
    for (args, why) in [
        (
            vec!["--id", "c", "--jwks-file", path(&private)],
            "private key material",
        ),
        (
            vec!["--id", "c", "--jwks-file", path(&empty)],
            "not a usable JWKS",
        ),
        (vec!["--id", "c", "--jwks-url", "ftp://x/jwks"], "http(s)"),
        (
            vec![
                "--id",
                "c",
                "--jwks-file",
                path(&public),
                "--scope",
                "system/Patient.write",
            ],
            "nothing in",
        ),
        (
            vec![
                "--id",
                "c",
                "--jwks-file",
                path(&public),
                "--jwks-url",
                "https://x/j",
            ],
            "cannot be used with",
        ),
        (vec!["--id", "c"], "--jwks-url"),
        (
            vec!["--id", "has space", "--jwks-file", path(&public)],
            "--id",
        ),
    ] {
        let mut full = vec!["clients", "add", "--data", path(&data)];
        full.extend(args);
        let output = hearth(&full);
        assert!(!output.status.success(), "{full:?} was accepted");
        assert!(text(&output).contains(why), "{full:?}: {}", text(&output));
    }
}

#[test]
fn serve_refuses_inconsistent_auth_flags() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    for (args, why) in [
        (vec!["--auth", "oidc"], "--trusted-issuer"),
        (
            vec!["--auth", "smart", "--audience", "x"],
            "--auth oidc only",
        ),
        (
            vec!["--auth", "smart", "--token-lifetime", "1h"],
            "--token-lifetime",
        ),
        (vec!["--tls-cert", "cert.pem"], "--tls-key"),
        (
            vec![
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
            ],
            "TLS certificate",
        ),
    ] {
        let mut full = vec!["serve", "--addr", "127.0.0.1:0", "--data", path(&data)];
        full.extend(args);
        let output = hearth(&full);
        assert!(!output.status.success(), "{full:?} started");
        assert!(text(&output).contains(why), "{full:?}: {}", text(&output));
    }
}

#[test]
fn serve_with_auth_and_tls_answers_https_discovery() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let base = format!("https://localhost:{port}/fhir");
    let mut child = hearth_command(&[
        "serve",
        "--addr",
        &addr,
        "--data",
        path(&data),
        "--base-url",
        &base,
        "--auth",
        "smart",
        "--tls-cert",
        path(&cert),
        "--tls-key",
        path(&key),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("hearth serve starts");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .tls_certs_only([
                reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
            ])
            .resolve("localhost", addr.parse().unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let started = Instant::now();
        loop {
            match client
                .get(format!("{base}/.well-known/smart-configuration"))
                .send()
                .await
            {
                Ok(response) => break response.json::<serde_json::Value>().await,
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => break Err(e),
            }
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let config = result.expect("discovery answers over HTTPS");
    assert_eq!(config["token_endpoint"], format!("{base}/auth/token"));
}
