//! A real S3-compatible server for object storage tests: `moto_server` (PyPI `moto[server]`) on
//! a free loopback port, one per test, killed when dropped. Here rather than in a test crate
//! because the in-process API tests (hearth-server) and the multi-process tests (hearth) both
//! need it; built only with the `testing` feature, which those crates enable as dev-dependency.
//!
//! Without `moto_server` the tests say so on stderr and pass, unless `HEARTH_REQUIRE_S3=1`
//! (as CI sets it), when they fail.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectMeta;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;

use crate::OutputSettings;

/// Multipart parts may be this small on the test server (S3 itself wants 5 MiB), so a test
/// file of a few hundred KiB already takes several parts.
pub const MIN_PART_SIZE: usize = 16 * 1024;

/// The credentials and region clients of the test server use (moto accepts any).
pub const ACCESS_KEY: &str = "hearth-test";
pub const SECRET_KEY: &str = "hearth-test-secret";
pub const REGION: &str = "us-east-1";

/// A running `moto_server`.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn required() -> bool {
    std::env::var("HEARTH_REQUIRE_S3").is_ok_and(|v| v == "1")
}

fn skip(test: &str, why: &str) -> Option<Moto> {
    assert!(
        !required(),
        "{test}: {why}, and HEARTH_REQUIRE_S3=1 says S3 tests must run"
    );
    // Straight to the process's stderr: libtest would swallow eprintln! of a passing test.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Moto {
    /// Starts moto and creates `bucket`; `None` (after saying "skipped") when moto_server is
    /// not installed.
    pub async fn start(test: &str, bucket: &str) -> Option<Moto> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        // Another process may take the port between our probe and moto's bind: try again.
        for _ in 0..3 {
            let port = free_port();
            let spawned = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("S3_UPLOAD_PART_MIN_SIZE", MIN_PART_SIZE.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return skip(test, "moto_server not installed");
                }
                Err(e) => panic!("{test}: cannot start moto_server: {e}"),
            };
            let mut moto = Moto {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(status)) = moto.child.try_wait() {
                    // A pyenv or pipx shim without moto behind it exits 127.
                    if status.code() == Some(127) {
                        return skip(test, "moto_server not installed");
                    }
                    break;
                }
                if client.get(&moto.endpoint).send().await.is_ok() {
                    moto.create_bucket(&client, bucket).await;
                    return Some(moto);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("{test}: moto_server did not answer on loopback");
    }

    async fn create_bucket(&self, client: &reqwest::Client, bucket: &str) {
        let response = client
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .expect("moto answers the bucket creation");
        assert!(
            response.status().is_success(),
            "creating bucket {bucket}: {}",
            response.status()
        );
    }

    /// Output settings for `s3://<bucket>/<prefix>` on this server.
    pub fn output(&self, bucket: &str, prefix: &str) -> OutputSettings {
        OutputSettings {
            location: Some(format!("s3://{bucket}/{prefix}")),
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.into()),
            allow_http: true,
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            ..OutputSettings::default()
        }
    }

    /// A client of its own, to look into the bucket.
    pub fn store(&self, bucket: &str) -> Arc<AmazonS3> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(&self.endpoint)
                .with_region(REGION)
                .with_allow_http(true)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()
                .expect("a client of the test bucket"),
        )
    }
}

/// Every object under `prefix`, sorted by key.
pub async fn objects(store: &AmazonS3, prefix: &str) -> Vec<ObjectMeta> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let prefix = Path::from(prefix);
    let mut listed: Vec<ObjectMeta> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .expect("the bucket lists");
    listed.sort_by(|a, b| a.location.cmp(&b.location));
    listed
}
