//! The single writer: a dedicated thread that owns the writing connection.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, bounded};
use hearth_fhir::envelope::compartment_of_body;
use hearth_fhir::instant::{Micros, now_micros};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::error::{StoreError, WriteError};
use crate::model::{BatchMode, PendingWrite, Seq, WriteKind, WriteOp, Written, check_if_match};
use crate::sqlite::resource_key;

type BatchResults = Vec<Result<Written, WriteError>>;
type WriteResults = Result<BatchResults, StoreError>;

enum Command {
    Run(Box<dyn FnOnce(&mut WriterState) + Send>),
    /// A batch of independent writes that may share one commit with the batches queued behind
    /// it. Each commit rewrites every index page the transaction dirtied into the WAL; with
    /// random ids that is most of the id index, so on a large store a load of small commits
    /// wrote many times its own size (2M into a 1M store: 23.9k/s at 8 MB commits, 43.4k/s at
    /// 70 MB). Grouping gives large commits while each loader batch stays small in memory.
    Grouped {
        ops: Vec<WriteOp>,
        reply: oneshot::Sender<WriteResults>,
        /// Told once the batch is applied (bulk loads): the caller sends its next batch
        /// without waiting for the commit.
        applied: Option<oneshot::Sender<()>>,
    },
}

/// How long an open bulk group waits for the loader's next batch before it commits.
const BULK_GROUP_PATIENCE: Duration = Duration::from_millis(10);

/// Resources after which a group commits even if more batches are queued.
const GROUP_RESOURCES: usize = 50_000;

/// Batches applied in the open transaction, answered when it commits.
struct Group {
    replies: Vec<(oneshot::Sender<WriteResults>, BatchResults)>,
    resources: usize,
    clock_before: (Seq, Micros),
    /// A bulk load feeds this group: worth waiting a moment for its next batch.
    bulk: bool,
}

/// The only source of change sequence numbers and `lastUpdated` values.
pub(crate) struct Clock {
    next_seq: Seq,
    last_updated: Micros,
}

impl Clock {
    /// The last committed sequence number and a time stamp no earlier write exceeds; every
    /// later write is stamped after it.
    pub(crate) fn snapshot(&mut self) -> (Seq, Micros) {
        self.last_updated = now_micros().max(self.last_updated);
        (self.next_seq - 1, self.last_updated)
    }

    /// The next sequence number and a `lastUpdated` later than every one handed out before,
    /// even if the system clock stepped back.
    fn tick(&mut self) -> (Seq, Micros) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_updated = now_micros().max(self.last_updated + 1);
        (seq, self.last_updated)
    }
}

pub(crate) struct WriterState {
    pub(crate) conn: Connection,
    pub(crate) clock: Clock,
}

pub(crate) struct WriterHandle {
    /// `None` once the store is closed; dropping the last sender ends the writer's loop.
    commands: Mutex<Option<Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

pub(crate) struct Writer;

impl Writer {
    pub(crate) fn spawn(conn: Connection) -> Result<WriterHandle, StoreError> {
        // The clock restarts past every lastUpdated and every transactionTime handed out, so
        // a `_since` taken from an earlier manifest never misses a later write.
        // lastUpdated grows with seq, so the newest row holds the largest: no table scan.
        let (last_seq, last_updated): (Seq, Micros) = conn.query_row(
            "SELECT COALESCE((SELECT seq FROM resource_version ORDER BY seq DESC LIMIT 1), 0),
                    MAX(COALESCE((SELECT last_updated FROM resource_version ORDER BY seq DESC LIMIT 1), 0),
                        COALESCE((SELECT MAX(transaction_time) FROM export_job), 0))",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let mut state = WriterState {
            conn,
            clock: Clock {
                next_seq: last_seq + 1,
                last_updated,
            },
        };
        // A short queue: callers wait (asynchronously) instead of piling work up in memory.
        let (commands, receiver) = bounded::<Command>(64);
        let thread = std::thread::Builder::new()
            .name("hearth-sqlite-writer".into())
            .spawn(move || {
                let mut group: Option<Group> = None;
                loop {
                    // A group stays open only while more work is already waiting.
                    let patience = match &group {
                        Some(group) if group.bulk => BULK_GROUP_PATIENCE,
                        _ => Duration::ZERO,
                    };
                    let command = match receiver.recv_timeout(patience) {
                        Ok(command) => command,
                        Err(_) => {
                            state.commit_group(group.take());
                            match receiver.recv() {
                                Ok(command) => command,
                                Err(_) => break,
                            }
                        }
                    };
                    match command {
                        Command::Run(work) => {
                            state.commit_group(group.take());
                            work(&mut state);
                        }
                        Command::Grouped {
                            ops,
                            reply,
                            applied,
                        } => {
                            group = state.apply_grouped(group, ops, reply, applied);
                        }
                    }
                }
                state.commit_group(group.take());
                if let Err(e) = state.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
                    tracing::warn!(error = %e, "final checkpoint failed");
                }
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(WriterHandle {
            commands: Mutex::new(Some(commands)),
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl WriterHandle {
    /// Runs `work` on the writer thread and waits for its answer without blocking the runtime.
    pub(crate) async fn run<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut WriterState) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let command = Command::Run(Box::new(move |state| {
            let _ = reply.send(work(state));
        }));
        self.send(command).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn send(&self, command: Command) -> Result<(), StoreError> {
        let commands = self
            .commands
            .lock()
            .ok()
            .and_then(|sender| sender.clone())
            .ok_or(StoreError::Closed)?;
        // The queue is bounded, so sending may wait: do that off the async workers.
        tokio::task::spawn_blocking(move || commands.send(command))
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))?
            .map_err(|_| StoreError::Closed)
    }

    pub(crate) async fn write(&self, ops: Vec<WriteOp>, mode: BatchMode) -> WriteResults {
        match mode {
            BatchMode::Atomic => self.run(move |state| state.apply(ops, mode)).await,
            BatchMode::Independent => {
                let (reply, answer) = oneshot::channel();
                self.send(Command::Grouped {
                    ops,
                    reply,
                    applied: None,
                })
                .await?;
                answer.await.map_err(|_| StoreError::Closed)?
            }
        }
    }

    pub(crate) async fn write_queued(&self, ops: Vec<WriteOp>) -> Result<PendingWrite, StoreError> {
        let (reply, answer) = oneshot::channel();
        let (applied, taken) = oneshot::channel();
        self.send(Command::Grouped {
            ops,
            reply,
            applied: Some(applied),
        })
        .await?;
        // A batch that failed outright is answered without an `applied` signal.
        let _ = taken.await;
        Ok(PendingWrite::waiting(answer))
    }

    /// Stops the writer after the commands already queued, and checkpoints the WAL.
    pub(crate) async fn close(&self) -> Result<(), StoreError> {
        drop(
            self.commands
                .lock()
                .ok()
                .and_then(|mut sender| sender.take()),
        );
        let thread = self.thread.lock().ok().and_then(|mut thread| thread.take());
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))?
                .map_err(|_| StoreError::Internal("the writer thread panicked".into()))?;
        }
        Ok(())
    }
}

impl WriterState {
    /// Applies one independent batch inside the open group, opening one if needed. No
    /// savepoint per batch: SQLite would copy every page a batch first touches into a
    /// statement journal (64 KiB pages, in memory), about 100 MB on a large load. A store
    /// failure (not a per-entry conflict, which is a result) is rare enough to fail the whole
    /// group instead: everything rolls back and every batch of it is told.
    fn apply_grouped(
        &mut self,
        group: Option<Group>,
        ops: Vec<WriteOp>,
        reply: oneshot::Sender<WriteResults>,
        applied: Option<oneshot::Sender<()>>,
    ) -> Option<Group> {
        let mut group = match group {
            Some(group) => group,
            None => match self.conn.execute_batch("BEGIN") {
                Ok(()) => Group {
                    replies: Vec::new(),
                    resources: 0,
                    clock_before: (self.clock.next_seq, self.clock.last_updated),
                    bulk: false,
                },
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return None;
                }
            },
        };
        let count = ops.len();
        match apply_ops(&self.conn, &mut self.clock, ops, BatchMode::Independent) {
            Ok(results) => {
                group.replies.push((reply, results));
                group.resources += count;
                if let Some(applied) = applied {
                    group.bulk = true;
                    let _ = applied.send(());
                }
            }
            Err(e) => {
                let message =
                    format!("a batch of writes failed, and the batches committed with it: {e}");
                let _ = reply.send(Err(e));
                self.abandon_group(group, &message);
                return None;
            }
        }
        if group.resources >= GROUP_RESOURCES {
            self.commit_group(Some(group));
            return None;
        }
        Some(group)
    }

    /// Rolls an open group back and tells each of its batches.
    fn abandon_group(&mut self, group: Group, message: &str) {
        let _ = self.conn.execute_batch("ROLLBACK");
        // Nothing was committed: hand the same numbers out again.
        (self.clock.next_seq, self.clock.last_updated) = group.clock_before;
        for (reply, _) in group.replies {
            let _ = reply.send(Err(StoreError::Internal(message.to_owned())));
        }
    }

    /// Commits an open group and answers its batches.
    fn commit_group(&mut self, group: Option<Group>) {
        let Some(group) = group else { return };
        match self.conn.execute_batch("COMMIT") {
            Ok(()) => {
                for (reply, results) in group.replies {
                    let _ = reply.send(Ok(results));
                }
            }
            Err(e) => {
                let message = format!("committing a group of writes failed: {e}");
                self.abandon_group(group, &message);
            }
        }
    }

    fn apply(
        &mut self,
        ops: Vec<WriteOp>,
        mode: BatchMode,
    ) -> Result<Vec<Result<Written, WriteError>>, StoreError> {
        let saved = (self.clock.next_seq, self.clock.last_updated);
        let result = apply_in_transaction(&mut self.conn, &mut self.clock, ops, mode);
        if result.is_err() {
            // Nothing was committed: hand the same numbers out again, so seq stays gap-free.
            (self.clock.next_seq, self.clock.last_updated) = saved;
        }
        result
    }
}

fn apply_in_transaction(
    conn: &mut Connection,
    clock: &mut Clock,
    ops: Vec<WriteOp>,
    mode: BatchMode,
) -> Result<Vec<Result<Written, WriteError>>, StoreError> {
    let tx = conn.transaction()?;
    let results = apply_ops(&tx, clock, ops, mode)?;
    tx.commit()?;
    Ok(results)
}

/// Applies `ops` in the caller's transaction (nothing is committed here).
fn apply_ops(
    tx: &Connection,
    clock: &mut Clock,
    ops: Vec<WriteOp>,
    mode: BatchMode,
) -> Result<Vec<Result<Written, WriteError>>, StoreError> {
    let count = ops.len();
    let mut order: Vec<usize> = (0..count).collect();
    if mode == BatchMode::Independent {
        // Visiting the id index in key order reads and dirties each of its pages once per
        // batch instead of once per resource: random ids otherwise make large stores
        // load many times slower. The sort is stable, so versions of one resource keep
        // their order.
        order.sort_by(|&a, &b| op_key(&ops[a]).cmp(&op_key(&ops[b])));
    }
    let mut slots: Vec<Option<WriteOp>> = ops.into_iter().map(Some).collect();
    let mut results: Vec<Option<Result<Written, WriteError>>> = vec![None; count];
    let mut members: Vec<(i64, Seq)> = Vec::new();
    for index in order {
        let Some(op) = slots[index].take() else {
            continue;
        };
        let result = apply_one(tx, clock, op, &mut members)?;
        if let (BatchMode::Atomic, Err(error)) = (mode, &result) {
            return Err(StoreError::Entry {
                index,
                error: error.clone(),
            });
        }
        results[index] = Some(result);
    }
    members.sort_unstable();
    let mut member = tx.prepare_cached(
        "INSERT OR IGNORE INTO compartment_member (patient_key, seq) VALUES (?1, ?2)",
    )?;
    for (patient, seq) in &members {
        member.execute(params![patient, seq])?;
    }
    Ok(results.into_iter().flatten().collect())
}

fn op_key(op: &WriteOp) -> (&str, &str) {
    match op {
        WriteOp::Put { resource, .. } => (resource.resource_type, resource.id.as_str()),
        WriteOp::Delete {
            resource_type, id, ..
        } => (resource_type, id.as_str()),
    }
}

struct Current {
    seq: Seq,
    version: u64,
    deleted: bool,
    content_hash: Vec<u8>,
    last_updated: Micros,
}

fn current(tx: &Connection, resource_type: &str, id: &str) -> Result<Option<Current>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT seq, version, deleted, content_hash, last_updated FROM resource_version
         WHERE id_key = ?1 AND res_type = ?2 AND res_id = ?3 ORDER BY version DESC LIMIT 1",
    )?;
    let key = resource_key(resource_type, id);
    Ok(stmt
        .query_row(params![key, resource_type, id], |row| {
            Ok(Current {
                seq: row.get(0)?,
                version: row.get::<_, i64>(1)? as u64,
                deleted: row.get(2)?,
                content_hash: row.get(3)?,
                last_updated: row.get(4)?,
            })
        })
        .optional()?)
}

/// The version `If-Match` compares with: the current one unless it is a tombstone.
fn live_version(current: &Option<Current>) -> Option<u64> {
    current.as_ref().filter(|c| !c.deleted).map(|c| c.version)
}

/// Applies one operation; compartment rows are collected into `members` and written in key
/// order by the caller.
fn apply_one(
    tx: &Connection,
    clock: &mut Clock,
    op: WriteOp,
    members: &mut Vec<(i64, Seq)>,
) -> Result<Result<Written, WriteError>, StoreError> {
    match op {
        WriteOp::Put { resource, if_match } => {
            let current = current(tx, resource.resource_type, &resource.id)?;
            if let Err(conflict) = check_if_match(if_match, live_version(&current)) {
                return Ok(Err(conflict));
            }
            let hash = resource.content_hash.to_be_bytes();
            if let Some(c) = &current
                && !c.deleted
                && c.content_hash == hash
            {
                return Ok(Ok(Written {
                    resource_type: resource.resource_type,
                    id: resource.id,
                    kind: WriteKind::Unchanged,
                    version: c.version,
                    last_updated: c.last_updated,
                    seq: c.seq,
                }));
            }
            let (seq, last_updated) = clock.tick();
            let version = current.as_ref().map_or(1, |c| c.version + 1);
            let body = resource.render(version, last_updated);
            tx.prepare_cached(
                "INSERT INTO resource_version
                 (seq, res_type, res_id, version, last_updated, superseded_by, deleted, content_hash, body, id_key, compartment_size)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL, 0, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                seq,
                resource.resource_type,
                resource.id,
                version as i64,
                last_updated,
                &hash[..],
                body,
                resource_key(resource.resource_type, &resource.id),
                resource.compartment.len() as i64
            ])?;
            if let Some(c) = &current {
                supersede(tx, c.seq, seq)?;
            }
            members.extend(
                resource
                    .compartment
                    .iter()
                    .map(|patient| (resource_key("Patient", patient), seq)),
            );
            let kind = match &current {
                Some(c) if !c.deleted => WriteKind::Updated,
                _ => WriteKind::Created,
            };
            Ok(Ok(Written {
                resource_type: resource.resource_type,
                id: resource.id,
                kind,
                version,
                last_updated,
                seq,
            }))
        }
        WriteOp::Delete {
            resource_type,
            id,
            if_match,
        } => {
            let current = current(tx, resource_type, &id)?;
            if let Err(conflict) = check_if_match(if_match, live_version(&current)) {
                return Ok(Err(conflict));
            }
            let Some(live) = current.filter(|c| !c.deleted) else {
                return Ok(Ok(Written {
                    resource_type,
                    id,
                    kind: WriteKind::NotPresent,
                    version: 0,
                    last_updated: 0,
                    seq: 0,
                }));
            };
            let (seq, last_updated) = clock.tick();
            let version = live.version + 1;
            // A tombstone stays in the compartments of the version it ends, so Patient and
            // Group exports can list the deletion.
            let members_before: Vec<String> = {
                let body: Vec<u8> = tx
                    .prepare_cached("SELECT body FROM resource_version WHERE seq = ?1")?
                    .query_row([live.seq], |row| row.get(0))?;
                compartment_of_body(resource_type, &body)
            };
            members.extend(
                members_before
                    .iter()
                    .map(|patient| (resource_key("Patient", patient), seq)),
            );
            tx.prepare_cached(
                "INSERT INTO resource_version
                 (seq, res_type, res_id, version, last_updated, superseded_by, deleted, content_hash, body, id_key, compartment_size)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL, 1, x'', x'', ?6, ?7)",
            )?
            .execute(params![seq, resource_type, id, version as i64, last_updated, resource_key(resource_type, &id), members_before.len() as i64])?;
            supersede(tx, live.seq, seq)?;
            Ok(Ok(Written {
                resource_type,
                id,
                kind: WriteKind::Deleted,
                version,
                last_updated,
                seq,
            }))
        }
    }
}

fn supersede(tx: &Connection, old: Seq, new: Seq) -> Result<(), StoreError> {
    tx.prepare_cached("UPDATE resource_version SET superseded_by = ?2 WHERE seq = ?1")?
        .execute(params![old, new])?;
    Ok(())
}
