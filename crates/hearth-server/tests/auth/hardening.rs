//! Hardening: HTTPS with TLS 1.2/1.3 only (a certificate generated per test), header size and
//! header time limits, the request deadline, the poll rate per job, the audit log, and that
//! authorization stays off by default.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_server::{AuthSettings, ServeOptions};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::helpers::*;

/// A self-signed certificate for localhost, written as PEM files into `dir`.
fn certificate(dir: &std::path::Path) -> (String, Arc<rustls::ServerConfig>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let config = hearth_server::load_tls(&cert_path, &key_path).expect("the certificate loads");
    (cert_pem, config)
}

fn open_options() -> Options {
    Options {
        auth: AuthSettings::default(),
        ..Options::default()
    }
}

async fn spawn_tls() -> (TestServer, String, tempfile::TempDir) {
    let dir = tempfile::TempDir::new().unwrap();
    let (cert_pem, config) = certificate(dir.path());
    let server = spawn(Options {
        serve: ServeOptions {
            tls: Some(config),
            ..ServeOptions::default()
        },
        ..Options::default()
    })
    .await;
    (server, cert_pem, dir)
}

fn https_client(cert_pem: &str, max: Option<reqwest::tls::Version>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
        .timeout(DEADLINE);
    if let Some(max) = max {
        builder = builder.tls_version_max(max);
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn https_serves_the_whole_flow_with_https_urls() {
    let (mut server, cert_pem, _dir) = spawn_tls().await;
    assert!(server.base.starts_with("https://localhost:"));
    server.client = https_client(&cert_pem, None);
    let (_, token) = server.client_with_token("tls-client", "system/*.rs").await;
    let status_url = server.start_export("?_type=Patient", &token).await;
    assert!(status_url.starts_with("https://"), "{status_url}");
    let manifest = server.manifest(&status_url, &token).await;
    for (_, url) in outputs(&manifest) {
        assert!(url.starts_with("https://"), "{url}");
        assert_eq!(
            server.get(&url, Some(&token)).await.status(),
            StatusCode::OK
        );
    }
    // Over TLS 1.2 as well.
    let tls12 = https_client(&cert_pem, Some(reqwest::tls::Version::TLS_1_2));
    let response = tls12.get(server.url("/metadata")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Plain HTTP on the HTTPS port gets nowhere.
    let plain = reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .unwrap();
    let http_url = server.url("/metadata").replacen("https://", "http://", 1);
    assert!(plain.get(http_url).send().await.is_err());
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_negotiated_and_older_versions_refused() {
    let (server, cert_pem, _dir) = spawn_tls().await;
    let address = server.origin.trim_start_matches("https://").to_owned();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    for (versions, expected) in [
        (
            vec![&rustls::version::TLS12],
            rustls::ProtocolVersion::TLSv1_2,
        ),
        (
            vec![&rustls::version::TLS13],
            rustls::ProtocolVersion::TLSv1_3,
        ),
        (
            vec![&rustls::version::TLS13, &rustls::version::TLS12],
            rustls::ProtocolVersion::TLSv1_3,
        ),
    ] {
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .expect("the handshake succeeds");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
    }

    // A TLS 1.1 ClientHello (legacy version 3.2, no supported_versions extension).
    let mut hello = vec![0x03, 0x02];
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x14, 0x00, 0x2f]); // two CBC suites
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x02, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer)).await;
    assert!(
        answer.first() != Some(&0x16),
        "the server must not answer a TLS 1.1 hello with a ServerHello: {answer:02x?}"
    );
    if let Some(first) = answer.first() {
        assert_eq!(*first, 0x15, "an alert record");
    }
}

/// Sends raw bytes to the server and reads until it closes (bounded).
async fn raw_exchange(server: &TestServer, request: &[u8]) -> (Vec<u8>, Duration) {
    let address = server.origin.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer)).await;
    (answer, started.elapsed())
}

#[tokio::test]
async fn oversized_headers_are_refused_with_431() {
    let server = spawn(Options {
        serve: ServeOptions {
            max_header_bytes: 8 * 1024,
            ..ServeOptions::default()
        },
        ..open_options()
    })
    .await;
    let big = "x".repeat(16 * 1024);
    let request = format!(
        "GET /fhir/metadata HTTP/1.1\r\nHost: h\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    );
    let (answer, _) = raw_exchange(&server, request.as_bytes()).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    // A normal request still works.
    assert_eq!(server.get("/metadata", None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let server = spawn(Options {
        serve: ServeOptions {
            max_connections: 1,
            ..ServeOptions::default()
        },
        ..open_options()
    })
    .await;
    let address = server.origin.trim_start_matches("http://").to_owned();
    // The one allowed connection: served, then kept open (keep-alive).
    let mut first = tokio::net::TcpStream::connect(&address).await.unwrap();
    first
        .write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(DEADLINE, first.read_exact(&mut head))
        .await
        .expect("the first connection is answered")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // A second one waits while the first is open...
    let mut second = tokio::net::TcpStream::connect(&address).await.unwrap();
    second
        .write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(500), second.read_to_end(&mut answer)).await;
    assert!(
        early.is_err() && answer.is_empty(),
        "a connection beyond the limit was served"
    );
    // ...and is served once it closes.
    drop(first);
    tokio::time::timeout(DEADLINE, second.read_to_end(&mut answer))
        .await
        .expect("the waiting connection is served after the first closes")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let server = spawn(Options {
        serve: ServeOptions {
            header_timeout: Duration::from_millis(300),
            ..ServeOptions::default()
        },
        ..open_options()
    })
    .await;
    let (answer, elapsed) =
        raw_exchange(&server, b"GET /fhir/metadata HTTP/1.1\r\nHost: h\r\n").await;
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "an unfinished request is never served"
    );
}

#[tokio::test]
async fn a_slow_body_gets_408_with_an_operation_outcome() {
    let server = spawn(Options {
        serve: ServeOptions {
            request_timeout: Duration::from_millis(500),
            ..ServeOptions::default()
        },
        ..open_options()
    })
    .await;
    // Announces 1000 bytes and sends 10, then waits.
    let request = b"POST /fhir HTTP/1.1\r\nHost: h\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{\"resourc";
    let (answer, elapsed) = raw_exchange(&server, request).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("OperationOutcome") && text.contains("timeout"),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[tokio::test]
async fn polling_faster_than_retry_after_is_429() {
    let server = spawn(Options {
        throttle_polls: true,
        ..open_options()
    })
    .await;
    let response = server.kick_off("?_type=Patient", None).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned();
    let first = server.get(&status_url, None).await;
    assert_eq!(
        first.status(),
        StatusCode::ACCEPTED,
        "the first poll is 202"
    );
    let told: u64 = first.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(told >= 1);

    let hurried = server.get(&status_url, None).await;
    let retry_after: u64 = hurried.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=told).contains(&retry_after), "{retry_after}");
    let outcome = assert_outcome(hurried, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(outcome["issue"][0]["code"], "throttled");

    // Waiting as told is always fine.
    tokio::time::sleep(Duration::from_secs(told)).await;
    let patient = server.get(&status_url, None).await;
    assert!(
        matches!(patient.status(), StatusCode::OK | StatusCode::ACCEPTED),
        "{}",
        patient.status()
    );
}

#[tokio::test]
async fn authorization_is_off_by_default() {
    let server = spawn(open_options()).await;
    let response = server.kick_off("?_type=Patient", None).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned();
    let manifest: Value = loop {
        let response = server.get(&status_url, None).await;
        if response.status() == StatusCode::OK {
            break response.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(manifest["requiresAccessToken"], false);
    let (_, url) = outputs(&manifest).remove(0);
    assert_eq!(server.get(&url, None).await.status(), StatusCode::OK);
    assert_eq!(
        server.get("/Patient/p1", None).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn audit_events_name_clients_and_jobs_but_never_tokens() {
    let server = spawn_smart().await;
    let key = TestKey::ec("audit-key");
    server
        .register("audit-client", None, Some(&jwks(&[&key])), None)
        .await;
    let assertion = server.assertion(&key, "audit-client");
    let (_, body) = server.request_token(&assertion, "system/*.rs").await;
    let token = body["access_token"].as_str().unwrap().to_owned();
    let status_url = server.start_export("?_type=Patient", &token).await;
    let job = status_url.rsplit('=').next().unwrap().to_owned();
    let manifest = server.manifest(&status_url, &token).await;
    let (_, url) = outputs(&manifest).remove(0);
    server.get(&url, Some(&token)).await;
    server.get(&status_url, Some("audit-bad-token")).await;
    server.delete(&status_url, Some(&token)).await;
    // The replayed assertion is an auth failure too.
    server.request_token(&assertion, "system/*.rs").await;

    let log = captured_log();
    let audit: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["target"] == "audit")
        .collect();
    let has = |event: &str, check: &dyn Fn(&Value) -> bool| {
        audit
            .iter()
            .any(|e| e["fields"]["event"] == event && check(&e["fields"]))
    };
    let mine = |fields: &Value| fields["client"] == "audit-client" && fields["job"] == job.as_str();
    assert!(has("auth.token_issued", &|f| f["client"] == "audit-client"));
    assert!(has("export.kick_off", &mine));
    assert!(has("export.status", &mine));
    assert!(has("export.download", &mine));
    assert!(has("export.cancel", &mine));
    assert!(has("auth.token_rejected", &|f| f["outcome"] == "401"));
    assert!(has("auth.token", &|f| f["outcome"] == "invalid_client"));
    // No secret ever reaches the log.
    for secret in [token.as_str(), assertion.as_str(), "audit-bad-token"] {
        assert!(!log.contains(secret), "a token was logged");
    }
    let signature = token.rsplit('.').next().unwrap();
    assert!(!log.contains(signature));
}
