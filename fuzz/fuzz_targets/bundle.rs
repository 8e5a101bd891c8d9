//! Transaction and batch Bundles through the real HTTP edge (`POST [base]` on the router, over
//! an SQLite store in a temporary directory): every body is answered with a status below 500.
//! A panic in a handler would be turned into a `500` by the panic layer, so a `500` counts as
//! a crash here.

#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hearth_server::{Embedded, ExportSettings, ServerConfig};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::TempDir::new().expect("a temporary directory");
        let router = runtime.block_on(async {
            let embedded = Embedded::open(
                dir.path(),
                ServerConfig {
                    base_url: "http://hearth.example/fhir".to_owned(),
                    max_body_bytes: 1024 * 1024,
                    lenient_headers: false,
                },
                ExportSettings {
                    workers: 1,
                    ..ExportSettings::default()
                },
            )
            .await
            .expect("the embedded stack starts");
            hearth_server::router(embedded.state.clone())
        });
        Harness {
            runtime,
            router,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    let request = Request::post("/fhir")
        .header("content-type", "application/fhir+json")
        .body(Body::from(data.to_vec()))
        .expect("a request");
    let response = harness
        .runtime
        .block_on(harness.router.clone().oneshot(request))
        .expect("the router answers");
    assert!(
        response.status() < StatusCode::INTERNAL_SERVER_ERROR,
        "a Bundle was answered {}",
        response.status()
    );
});
