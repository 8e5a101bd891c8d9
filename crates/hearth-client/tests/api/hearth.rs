//! Against a real Hearth: a full export, incremental exports that pick up changes and
//! deletions, a refused kick-off, a cancelled job, a Patient-level export with `patient`,
//! `_typeFilter` and `_elements`, and SMART Backend Services with Hearth's own token endpoint.

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

/// SMART Backend Services with Hearth as the authorization server: the client registered with
/// its public key, the token URL discovered, tokens that live one second (so the export
/// outlives several), and files that need a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_services_against_hearths_own_authorization_server() {
    use hearth_client::ClientOptions;
    use hearth_client::auth::{BackendServices, Credentials, SigningKey};
    use hearth_store::clients::{ClientRecord, ClientStore};

    let mut auth = hearth_server::AuthSettings::smart();
    auth.token_lifetime = std::time::Duration::from_secs(1);
    let hearth = start_hearth_with(None, auth).await;
    let key = crate::auth::ec_key();
    hearth
        .store
        .put_client(ClientRecord {
            id: "bulk-client".into(),
            jwks_url: None,
            jwks: Some(json!({"keys": [key.jwk]}).to_string()),
            scope: None,
            created_at: 0,
        })
        .await
        .expect("the client is registered");
    let options = ClientOptions {
        credentials: Credentials::BackendServices(BackendServices {
            client_id: "bulk-client".into(),
            key: SigningKey::from_pem(key.pem.as_bytes(), None).unwrap(),
            token_url: None,
            scope: "system/*.read".into(),
        }),
        ..fast_options()
    };
    let client = BulkClient::new(&hearth.base, options).unwrap();
    let out = TempDir::new().unwrap();
    let mut job = system_job(out.path());
    job.release = false;

    let summary = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect("the authorized export succeeds");

    assert_eq!(summary.resources, SYNTHEA_RESOURCES);
    let manifest =
        Manifest::parse(&std::fs::read(out.path().join(MANIFEST_FILE)).unwrap()).unwrap();
    assert!(manifest.requires_access_token);
    // Authorization was on: without a token the job and its files are refused.
    assert_eq!(hearth.status_of(&summary.status_url).await, 401);
    assert_eq!(hearth.status_of(&summary.files[0].url).await, 401);
}

/// Patient level with `patient` (a POST kick-off), `_typeFilter` and `_elements`, now that
/// Hearth answers them: exactly the chosen patient, only matching Observations, trimmed and
/// tagged SUBSETTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_level_with_patient_type_filter_and_elements() {
    let hearth = hearth_with_synthea().await;
    let out = TempDir::new().unwrap();
    let client = BulkClient::new(&hearth.base, fast_options()).unwrap();
    let patient_id = synthea_ids("Patient").into_iter().next().unwrap();
    let mut job = system_job(out.path());
    job.request.level = Level::Patient;
    job.request.patients = vec![patient_id.clone()];
    job.request.types = vec!["Patient".into(), "Observation".into()];
    job.request.type_filters = vec!["Observation?status=final".into()];
    job.request.elements = vec!["id".into(), "Observation.status".into()];

    let summary = bounded(export::run(&client, &job, Recorder::new()))
        .await
        .expect("the patient export succeeds");

    let patients = lines(&out.path().join("Patient.1.ndjson"));
    assert_eq!(patients.len(), 1);
    assert_eq!(id_of_line(&patients[0]), patient_id);
    let observations = lines(&out.path().join("Observation.1.ndjson"));
    // Exactly that patient's final Observations from the data set.
    let expected: BTreeSet<String> = synthea_lines("Observation")
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|o| {
            o["status"] == "final"
                && o["subject"]["reference"]
                    .as_str()
                    .is_some_and(|r| r.ends_with(&patient_id))
        })
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect();
    let got: BTreeSet<String> = observations.iter().map(|l| id_of_line(l)).collect();
    assert!(!expected.is_empty());
    assert_eq!(got, expected);
    assert_eq!(summary.resources, 1 + observations.len() as u64);
    for line in &observations {
        let observation: Value = serde_json::from_str(line).unwrap();
        assert_eq!(observation["status"], "final");
        // Elements not asked for are gone; mandatory ones (code) stay, as the IG says.
        for trimmed in ["subject", "encounter", "effectiveDateTime", "valueQuantity"] {
            assert!(observation.get(trimmed).is_none(), "{trimmed} in {line}");
        }
        assert!(observation.get("code").is_some());
        let tags = observation["meta"]["tag"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(tags.iter().any(|t| t["code"] == "SUBSETTED"), "{line}");
    }
}
