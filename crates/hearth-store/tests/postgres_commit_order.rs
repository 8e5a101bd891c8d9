//! PostgreSQL hands out change sequence numbers in commit order: an export that reads up to its
//! snapshot, taken while many writers are committing, misses none of the writes at or below it,
//! and the next `_since`-style window picks up exactly the rest.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hearth_fhir::envelope::{IdPolicy, prepare};
use hearth_store::jobs::{ClaimedUnit, JobStore, ScanSource, UnitKind, UnitScope};
use hearth_store::postgres::testing::fresh_store;
use hearth_store::{BatchMode, PgStore, Seq, Store, WriteOp};

const WRITERS: usize = 8;
const WRITES_PER_WRITER: usize = 150;

fn observation(id: &str) -> WriteOp {
    let body = format!(
        r#"{{"resourceType":"Observation","id":"{id}","status":"final","code":{{"text":"x"}},"subject":{{"reference":"Patient/p{}"}}}}"#,
        id.len()
    );
    WriteOp::Put {
        resource: prepare(body.as_bytes(), None, IdPolicy::FromBody).expect("valid resource"),
        if_match: None,
    }
}

/// The ids an export of Observations in `(after, upto]` at snapshot `upto` writes.
async fn exported_ids(store: &Arc<PgStore>, after: Seq, upto: Seq) -> Vec<(Seq, String)> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let unit = ClaimedUnit {
            job_id: "commit-order".into(),
            unit_no: 0,
            resource_type: "Observation".into(),
            kind: UnitKind::Output,
            scope: UnitScope::All,
            seq_after: after,
            seq_upto: upto,
            snapshot_seq: upto,
            request: String::new(),
            attempt: 1,
            owner: String::new(),
        };
        let mut ids = Vec::new();
        store
            .scan_unit(&unit, &mut |row| {
                ids.push((row.seq, row.id.to_owned()));
                Ok(true)
            })
            .expect("the scan runs");
        ids
    })
    .await
    .expect("the scan task ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_never_leave_a_gap_below_an_export_snapshot() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let store = Arc::new(store);
    let done = Arc::new(AtomicBool::new(false));

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for n in 0..WRITES_PER_WRITER {
                let id = format!("w{writer}-{n}");
                let result = store
                    .write(vec![observation(&id)], BatchMode::Independent)
                    .await
                    .expect("the write commits");
                let written_one = result[0].as_ref().expect("the write succeeds");
                written.push((written_one.seq, id));
            }
            written
        }));
    }

    // Exports taken while the writers run: each reads everything up to its snapshot, then the
    // next one reads only what came after (as `_since` would).
    let exporter = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut windows = Vec::new();
            let mut previous = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let snapshot = store.snapshot().await.expect("a snapshot");
                let full = exported_ids(&store, 0, snapshot.seq).await;
                // Every write is a create, so seqs 1..=S are all Observations: a full export at
                // S holds exactly S rows unless a lower seq was still uncommitted.
                assert_eq!(
                    full.len() as Seq,
                    snapshot.seq,
                    "an export at snapshot {} missed committed writes",
                    snapshot.seq
                );
                windows.extend(exported_ids(&store, previous, snapshot.seq).await);
                // The next export asks for `_since` = this one's transactionTime, which the
                // engine maps to a sequence number: it must land exactly on this snapshot.
                previous = store
                    .seq_at(snapshot.transaction_time)
                    .await
                    .expect("seq_at answers");
                assert_eq!(
                    previous, snapshot.seq,
                    "_since = transactionTime maps to the snapshot's sequence number"
                );
                if finished {
                    return (windows, previous);
                }
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
        })
    };

    let mut all_written = BTreeSet::new();
    for writer in writers {
        all_written.extend(writer.await.expect("the writer ends"));
    }
    done.store(true, Ordering::SeqCst);
    let (windows, last) = exporter.await.expect("the exporter ends");

    assert_eq!(last as usize, WRITERS * WRITES_PER_WRITER);
    let from_windows: BTreeSet<(Seq, String)> = windows.iter().cloned().collect();
    assert_eq!(
        windows.len(),
        from_windows.len(),
        "a window repeated a write"
    );
    assert_eq!(
        from_windows, all_written,
        "the incremental exports together hold exactly the committed writes"
    );
    store.close().await.expect("the store closes");
}

/// The mechanism behind the test above, without relying on a race: while a writer holds the
/// clock (it has taken sequence numbers and not committed), a snapshot waits for it instead of
/// handing out a high-water mark above an uncommitted write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_waits_for_a_writer_that_holds_sequence_numbers() {
    use sqlx::{Connection, PgConnection};
    let Some(url) = hearth_store::postgres::testing::fresh_database_url().await else {
        return;
    };
    let store = Arc::new(PgStore::connect(&url).await.expect("the store opens"));
    store
        .write(vec![observation("before")], BatchMode::Independent)
        .await
        .expect("a first write");

    // A writer in the middle of its transaction, as `Store::write` leaves it between taking
    // numbers and committing.
    let mut writer = PgConnection::connect(&url)
        .await
        .expect("a second connection");
    let mut transaction = writer.begin().await.expect("begin");
    sqlx::query("SELECT next_seq FROM store_clock WHERE id = 1 FOR UPDATE")
        .execute(&mut *transaction)
        .await
        .expect("the clock row is taken");

    let snapshot = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.snapshot().await.expect("a snapshot") }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !snapshot.is_finished(),
        "a snapshot was taken while a writer held uncommitted sequence numbers"
    );
    transaction.commit().await.expect("the writer commits");
    let snapshot = tokio::time::timeout(std::time::Duration::from_secs(5), snapshot)
        .await
        .expect("the snapshot follows the commit")
        .expect("the snapshot task ends");
    assert_eq!(snapshot.seq, 1);
    store.close().await.expect("the store closes");
}
