//! Against a real Hearth: a full export, and incremental exports that pick up changes and
//! deletions.

use std::collections::BTreeSet;

use hearth_client::export::{self, MANIFEST_FILE};
use hearth_client::state::{IncrementalState, STATE_FILE};
use hearth_client::{BulkClient, Error, ExportJob, ExportRequest, FileKind, Level, Manifest};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::*;

fn system_job(out: &std::path::Path) -> ExportJob {
    ExportJob {
        request: ExportRequest::new(Level::System),
        out_dir: out.to_owned(),
        incremental: false,
        resume: None,
        release: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_export_saves_every_file_verified_and_the_manifest() {
    let hearth = hearth_with_synthea().await;
    let out = TempDir::new().unwrap();
    let client = BulkClient::new(&hearth.base, fast_options()).unwrap();
    let recorder = Recorder::new();

    let summary = bounded(export::run(
        &client,
        &system_job(out.path()),
        recorder.clone(),
    ))
    .await
    .expect("the export succeeds");

    assert_eq!(summary.resources, SYNTHEA_RESOURCES);
    assert_eq!(summary.directory, out.path());
    // The manifest is saved as the server sent it, and every output file is there with the
    // manifest's count.
    let saved = std::fs::read(out.path().join(MANIFEST_FILE)).unwrap();
    let manifest = Manifest::parse(&saved).unwrap();
    assert_eq!(manifest.transaction_time, summary.transaction_time);
    assert_eq!(manifest.output.len(), summary.files.len());
    for (item, file) in manifest.output.iter().zip(&summary.files) {
        assert_eq!(file.kind, FileKind::Output);
        assert_eq!(Some(&file.url), item.url.as_ref());
        assert_eq!(item.count, Some(file.resources));
        assert_eq!(lines(&file.path).len() as u64, file.resources);
        assert!(
            file.wire_bytes < file.bytes,
            "{}: gzip on the wire",
            file.url
        );
    }
    // The content is the data set, type by type.
    for resource_type in ["Patient", "Observation", "Encounter"] {
        let path = out.path().join(format!("{resource_type}.1.ndjson"));
        let ids: BTreeSet<String> = lines(&path).iter().map(|l| id_of_line(l)).collect();
        assert_eq!(ids, synthea_ids(resource_type), "{resource_type}");
    }
    assert!(leftover_parts(out.path()).is_empty());

    // The progress callbacks saw the job: its URL, the server's first 202 with X-Progress,
    // the manifest and every file.
    let events = recorder.events();
    assert_eq!(events[0], Event::KickedOff(summary.status_url.clone()));
    assert!(summary.status_url.contains("$export-poll-status?_jobId="));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Polled(Some(text)) if text.contains('%'))),
        "{events:?}"
    );
    assert!(events.contains(&Event::Manifest(summary.files.len())));
    let finished = events
        .iter()
        .filter(|e| matches!(e, Event::Finished(..)))
        .count();
    assert_eq!(finished, summary.files.len());

    // The finished job was released: the server no longer knows it.
    assert_eq!(hearth.status_of(&summary.status_url).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_exports_pick_up_changes_and_deletions() {
    let hearth = hearth_with_synthea().await;
    let out = TempDir::new().unwrap();
    let client = BulkClient::new(&hearth.base, fast_options()).unwrap();
    let job = ExportJob {
        incremental: true,
        ..system_job(out.path())
    };

    // The first run has no position yet: everything, in a directory named after its time.
    let first = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect("the first run succeeds");
    assert_eq!(first.since, None);
    assert_eq!(first.resources, SYNTHEA_RESOURCES);
    assert_eq!(first.directory.parent(), Some(out.path()));
    let state = IncrementalState::load(out.path()).unwrap();
    let checkpoint = state.exports.values().next().expect("a checkpoint");
    assert_eq!(checkpoint.transaction_time, first.transaction_time);
    assert!(out.path().join(STATE_FILE).exists());

    // Changes: one patient updated, one observation added, one encounter deleted.
    let patient_id = synthea_ids("Patient").into_iter().next().unwrap();
    let encounter_id = synthea_ids("Encounter").into_iter().next().unwrap();
    hearth
        .put(&json!({"resourceType": "Patient", "id": patient_id, "active": false}))
        .await;
    hearth
        .put(
            &json!({"resourceType": "Observation", "id": "incremental-new",
            "status": "final", "code": {"text": "new"}}),
        )
        .await;
    hearth.delete("Encounter", &encounter_id).await;

    let second = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect("the second run succeeds");
    // It asked for what changed since the first run's transactionTime, and got exactly that.
    assert_eq!(
        second.since.as_deref(),
        Some(first.transaction_time.as_str())
    );
    let manifest =
        Manifest::parse(&std::fs::read(second.directory.join(MANIFEST_FILE)).unwrap()).unwrap();
    let request = manifest.request.clone().unwrap_or_default();
    assert!(request.contains("_since="), "{request}");
    assert_ne!(second.directory, first.directory);
    assert_eq!(second.resources, 2);
    let patient = lines(&second.directory.join("Patient.1.ndjson"));
    assert_eq!(patient.len(), 1);
    let patient: Value = serde_json::from_str(&patient[0]).unwrap();
    assert_eq!(patient["id"], patient_id.as_str());
    assert_eq!(patient["active"], false);
    let observation = lines(&second.directory.join("Observation.1.ndjson"));
    assert_eq!(observation.len(), 1);
    assert_eq!(id_of_line(&observation[0]), "incremental-new");
    // The deletion is saved as a transaction Bundle a downstream copy can apply.
    let deleted: Vec<_> = second
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Deleted)
        .collect();
    assert_eq!(deleted.len(), 1, "{:?}", second.files);
    assert!(
        deleted[0]
            .path
            .starts_with(second.directory.join("deleted"))
    );
    let bundles = lines(&deleted[0].path);
    let urls: Vec<String> = bundles
        .iter()
        .flat_map(|line| {
            let bundle: Value = serde_json::from_str(line).unwrap();
            assert_eq!(bundle["type"], "transaction");
            bundle["entry"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|e| {
                    assert_eq!(e["request"]["method"], "DELETE");
                    e["request"]["url"].as_str().unwrap().to_owned()
                })
        })
        .collect();
    assert_eq!(urls, vec![format!("Encounter/{encounter_id}")]);
    // The first run's files are untouched, and the position moved on.
    assert_eq!(
        lines(&first.directory.join("Patient.1.ndjson")).len(),
        synthea_ids("Patient").len()
    );
    let state = IncrementalState::load(out.path()).unwrap();
    assert_eq!(state.exports.len(), 1);
    let checkpoint = state.exports.values().next().unwrap();
    assert_eq!(checkpoint.transaction_time, second.transaction_time);

    // Nothing changed since: the third run is empty.
    let third = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect("the third run succeeds");
    assert_eq!(
        third.since.as_deref(),
        Some(second.transaction_time.as_str())
    );
    assert_eq!(third.resources, 0);
    assert!(third.files.is_empty(), "{:?}", third.files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_kick_off_reports_the_servers_outcome() {
    let hearth = hearth_with_synthea().await;
    let out = TempDir::new().unwrap();
    let client = BulkClient::new(&hearth.base, fast_options()).unwrap();
    let mut job = system_job(out.path());
    job.request.types = vec!["NoSuchType".into()];

    let error = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect_err("an unknown type is refused");

    match &error {
        Error::KickOffRefused { status, message } => {
            assert_eq!(*status, 400);
            assert!(message.contains("NoSuchType"), "{message}");
        }
        other => panic!("not a refused kick-off: {other:?}"),
    }
    // One line, with the server's words.
    assert!(!error.to_string().contains('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_is_gone_and_waiting_for_it_says_so() {
    let hearth = hearth_with_synthea().await;
    let client = BulkClient::new(&hearth.base, fast_options()).unwrap();
    let status_url =
        bounded(client.kick_off(&ExportRequest::new(Level::System), &hearth_client::Silent))
            .await
            .expect("kick-off");

    assert_eq!(
        bounded(client.cancel(&status_url)).await.unwrap(),
        hearth_client::Cancelled::Accepted
    );

    assert_eq!(hearth.status_of(status_url.as_str()).await, 404);
    let error = bounded(client.wait(&status_url, &hearth_client::Silent))
        .await
        .expect_err("the job is gone");
    assert!(
        matches!(error, Error::JobGone { status: 404, .. }),
        "{error:?}"
    );
}
