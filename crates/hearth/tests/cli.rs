//! The `hearth` binary as a user runs it: `hearth load`, and `hearth serve` refusing a bad
//! combination of flags.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use common::hearth;
use hearth_store::{SqliteStore, Store};
use tempfile::TempDir;

fn load(input: &Path, data: &Path) -> Output {
    hearth(&[
        "load".as_ref(),
        input.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
    ])
}

async fn stored(data: &Path, resource_type: &str, id: &str) -> bool {
    let store = Arc::new(SqliteStore::open(data).expect("the data directory opens"));
    let found = store
        .read(resource_type, id)
        .await
        .expect("a read")
        .is_some_and(|v| !v.deleted);
    store.close().await.expect("close");
    found
}

#[tokio::test]
async fn load_with_a_bad_line_exits_non_zero_and_names_file_and_line() {
    let input = TempDir::new().unwrap();
    let data = TempDir::new().unwrap();
    let file = input.path().join("patients.ndjson");
    std::fs::write(
        &file,
        concat!(
            r#"{"resourceType":"Patient","id":"cli-1"}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"cli-broken""#,
            "\n",
            r#"{"resourceType":"Patient","id":"cli-3"}"#,
            "\n",
        ),
    )
    .unwrap();
    let data_dir = data.path().join("db");

    let output = load(input.path(), &data_dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let expected = format!("{}:2:", file.display());
    assert!(
        stderr.contains(&expected),
        "stderr does not name {expected}: {stderr}"
    );
    assert!(
        !stderr.contains(&format!("{}:1:", file.display()))
            && !stderr.contains(&format!("{}:3:", file.display())),
        "a good line was reported: {stderr}"
    );

    // The good lines were loaded all the same.
    assert!(stored(&data_dir, "Patient", "cli-1").await);
    assert!(stored(&data_dir, "Patient", "cli-3").await);
}

#[tokio::test]
async fn load_of_clean_input_exits_0() {
    let input = TempDir::new().unwrap();
    let data = TempDir::new().unwrap();
    std::fs::write(
        input.path().join("clean.ndjson"),
        concat!(
            r#"{"resourceType":"Patient","id":"clean-1"}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"clean-2","status":"final","code":{"text":"x"}}"#,
            "\n",
        ),
    )
    .unwrap();
    let data_dir = data.path().join("db");

    let output = load(input.path(), &data_dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("loaded 2 resources"), "stdout: {stdout}");
    assert!(stored(&data_dir, "Patient", "clean-1").await);
    assert!(stored(&data_dir, "Observation", "clean-2").await);

    // Loading it again is just as clean.
    let again = load(input.path(), &data_dir);
    assert_eq!(
        again.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn serve_refuses_presigned_urls_without_object_storage() {
    let data = TempDir::new().unwrap();
    let output = hearth(&[
        "serve".as_ref(),
        "--presigned-urls".as_ref(),
        "--addr".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data".as_ref(),
        data.path().join("db").as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("presigned URLs need object storage output (--output s3://"),
        "stderr: {stderr}"
    );
}
