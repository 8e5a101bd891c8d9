//! Writes: one transaction per batch, set-based so that a bulk load costs a handful of round
//! trips per batch, not per resource.
//!
//! The transaction first locks the clock row (see the schema): writers are serialised, sequence
//! numbers are handed out in commit order, and the current versions read next cannot change
//! under the batch. New versions go in with binary `COPY`.

use std::collections::HashMap;

use hearth_fhir::envelope::compartment_of_body;
use hearth_fhir::instant::{Micros, now_micros};
use sqlx::{PgConnection, PgPool, Row};

use super::copy::CopyBuffer;
use crate::error::{StoreError, WriteError};
use crate::model::{BatchMode, Seq, WriteKind, WriteOp, Written, check_if_match};
use crate::resource_key;

/// Sequence numbers and `lastUpdated` values of one transaction, taken from the locked clock row.
pub(super) struct Clock {
    pub(super) next_seq: Seq,
    pub(super) last_updated: Micros,
}

impl Clock {
    /// Locks the clock row until the transaction ends.
    pub(super) async fn lock(conn: &mut PgConnection) -> Result<Self, StoreError> {
        let row =
            sqlx::query("SELECT next_seq, last_updated FROM store_clock WHERE id = 1 FOR UPDATE")
                .fetch_one(conn)
                .await?;
        Ok(Self {
            next_seq: row.try_get(0)?,
            last_updated: row.try_get(1)?,
        })
    }

    /// The next sequence number and a `lastUpdated` later than every one handed out before,
    /// even if this host's clock is behind another instance's.
    fn tick(&mut self) -> (Seq, Micros) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_updated = now_micros().max(self.last_updated + 1);
        (seq, self.last_updated)
    }

    pub(super) async fn store(&self, conn: &mut PgConnection) -> Result<(), StoreError> {
        sqlx::query("UPDATE store_clock SET next_seq = $1, last_updated = $2 WHERE id = 1")
            .bind(self.next_seq)
            .bind(self.last_updated)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// The newest version of a resource as the batch sees it.
#[derive(Clone)]
struct Current {
    seq: Seq,
    version: u64,
    deleted: bool,
    content_hash: Vec<u8>,
    last_updated: Micros,
    /// Written by this batch (its row is not in the table yet).
    new_row: Option<usize>,
}

/// A version to insert.
struct NewRow {
    seq: Seq,
    resource_type: &'static str,
    id: String,
    version: u64,
    last_updated: Micros,
    superseded_by: Option<Seq>,
    deleted: bool,
    compartment_size: i32,
    content_hash: Vec<u8>,
    body: Vec<u8>,
}

const VERSION_COPY: &str =
    "COPY resource_version (seq, res_type, res_id, id_key, version, last_updated,
    superseded_by, deleted, compartment_size, content_hash, body) FROM STDIN (FORMAT binary)";
const MEMBER_COPY: &str = "COPY compartment_member (patient_key, seq) FROM STDIN (FORMAT binary)";

pub(super) async fn apply(
    pool: &PgPool,
    ops: Vec<WriteOp>,
    mode: BatchMode,
) -> Result<Vec<Result<Written, WriteError>>, StoreError> {
    let mut tx = pool.begin().await?;
    let mut clock = Clock::lock(&mut tx).await?;
    let mut current = current_versions(&mut tx, &ops).await?;

    let mut results = Vec::with_capacity(ops.len());
    let mut rows: Vec<NewRow> = Vec::new();
    let mut superseded: (Vec<Seq>, Vec<Seq>) = (Vec::new(), Vec::new());
    let mut members: Vec<(i64, Seq)> = Vec::new();
    for (index, op) in ops.into_iter().enumerate() {
        let result = match op {
            WriteOp::Put { resource, if_match } => {
                let key = (resource.resource_type, resource.id.clone());
                let found = current.get(&key).cloned();
                match check_if_match(if_match, live_version(&found)) {
                    Err(conflict) => Err(conflict),
                    Ok(()) => {
                        let hash = resource.content_hash.to_be_bytes().to_vec();
                        match &found {
                            Some(c) if !c.deleted && c.content_hash == hash => Ok(Written {
                                resource_type: resource.resource_type,
                                id: resource.id,
                                kind: WriteKind::Unchanged,
                                version: c.version,
                                last_updated: c.last_updated,
                                seq: c.seq,
                            }),
                            _ => {
                                let (seq, last_updated) = clock.tick();
                                let version = found.as_ref().map_or(1, |c| c.version + 1);
                                if let Some(c) = &found {
                                    supersede(c, seq, &mut rows, &mut superseded);
                                }
                                members.extend(
                                    resource
                                        .compartment
                                        .iter()
                                        .map(|patient| (resource_key("Patient", patient), seq)),
                                );
                                let kind = match &found {
                                    Some(c) if !c.deleted => WriteKind::Updated,
                                    _ => WriteKind::Created,
                                };
                                current.insert(
                                    key,
                                    Current {
                                        seq,
                                        version,
                                        deleted: false,
                                        content_hash: hash.clone(),
                                        last_updated,
                                        new_row: Some(rows.len()),
                                    },
                                );
                                rows.push(NewRow {
                                    seq,
                                    resource_type: resource.resource_type,
                                    id: resource.id.clone(),
                                    version,
                                    last_updated,
                                    superseded_by: None,
                                    deleted: false,
                                    compartment_size: resource.compartment.len() as i32,
                                    content_hash: hash,
                                    body: resource.render(version, last_updated),
                                });
                                Ok(Written {
                                    resource_type: resource.resource_type,
                                    id: resource.id,
                                    kind,
                                    version,
                                    last_updated,
                                    seq,
                                })
                            }
                        }
                    }
                }
            }
            WriteOp::Delete {
                resource_type,
                id,
                if_match,
            } => {
                let key = (resource_type, id.clone());
                let found = current.get(&key).cloned();
                match check_if_match(if_match, live_version(&found)) {
                    Err(conflict) => Err(conflict),
                    Ok(()) => match found.filter(|c| !c.deleted) {
                        None => Ok(Written {
                            resource_type,
                            id,
                            kind: WriteKind::NotPresent,
                            version: 0,
                            last_updated: 0,
                            seq: 0,
                        }),
                        Some(live) => {
                            // A tombstone stays in the compartments of the version it ends, so
                            // Patient and Group exports can list the deletion.
                            let ended = match live.new_row {
                                Some(row) => compartment_of_body(resource_type, &rows[row].body),
                                None => {
                                    let body: Vec<u8> = sqlx::query_scalar(
                                        "SELECT body FROM resource_version WHERE seq = $1",
                                    )
                                    .bind(live.seq)
                                    .fetch_one(&mut *tx)
                                    .await?;
                                    compartment_of_body(resource_type, &body)
                                }
                            };
                            let (seq, last_updated) = clock.tick();
                            let version = live.version + 1;
                            supersede(&live, seq, &mut rows, &mut superseded);
                            members.extend(
                                ended
                                    .iter()
                                    .map(|patient| (resource_key("Patient", patient), seq)),
                            );
                            current.insert(
                                key,
                                Current {
                                    seq,
                                    version,
                                    deleted: true,
                                    content_hash: Vec::new(),
                                    last_updated,
                                    new_row: Some(rows.len()),
                                },
                            );
                            rows.push(NewRow {
                                seq,
                                resource_type,
                                id: id.clone(),
                                version,
                                last_updated,
                                superseded_by: None,
                                deleted: true,
                                compartment_size: ended.len() as i32,
                                content_hash: Vec::new(),
                                body: Vec::new(),
                            });
                            Ok(Written {
                                resource_type,
                                id,
                                kind: WriteKind::Deleted,
                                version,
                                last_updated,
                                seq,
                            })
                        }
                    },
                }
            }
        };
        if let (BatchMode::Atomic, Err(error)) = (mode, &result) {
            // Nothing has been written yet; dropping the transaction releases the clock.
            return Err(StoreError::Entry {
                index,
                error: error.clone(),
            });
        }
        results.push(result);
    }

    if !rows.is_empty() {
        copy_versions(&mut tx, &rows).await?;
        if !superseded.0.is_empty() {
            sqlx::query(
                "UPDATE resource_version rv SET superseded_by = s.new_seq
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS s(old_seq, new_seq)
                 WHERE rv.seq = s.old_seq",
            )
            .bind(&superseded.0)
            .bind(&superseded.1)
            .execute(&mut *tx)
            .await?;
        }
        members.sort_unstable();
        members.dedup();
        if !members.is_empty() {
            copy_members(&mut tx, &members).await?;
        }
        clock.store(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(results)
}

/// Ends `old` at `new_seq`: in place when `old` is a row of this batch, else by an update.
fn supersede(
    old: &Current,
    new_seq: Seq,
    rows: &mut [NewRow],
    superseded: &mut (Vec<Seq>, Vec<Seq>),
) {
    match old.new_row {
        Some(row) => rows[row].superseded_by = Some(new_seq),
        None => {
            superseded.0.push(old.seq);
            superseded.1.push(new_seq);
        }
    }
}

/// The version `If-Match` compares with: the current one unless it is a tombstone.
fn live_version(current: &Option<Current>) -> Option<u64> {
    current.as_ref().filter(|c| !c.deleted).map(|c| c.version)
}

type ResourceKey = (&'static str, String);

/// The newest stored version of every resource the batch touches, in one query.
async fn current_versions(
    conn: &mut PgConnection,
    ops: &[WriteOp],
) -> Result<HashMap<ResourceKey, Current>, StoreError> {
    let mut wanted: HashMap<(&str, &str), &'static str> = HashMap::with_capacity(ops.len());
    let mut keys: Vec<i64> = Vec::with_capacity(ops.len());
    for op in ops {
        let (resource_type, id) = match op {
            WriteOp::Put { resource, .. } => (resource.resource_type, resource.id.as_str()),
            WriteOp::Delete {
                resource_type, id, ..
            } => (*resource_type, id.as_str()),
        };
        if wanted.insert((resource_type, id), resource_type).is_none() {
            keys.push(resource_key(resource_type, id));
        }
    }
    let mut found = HashMap::new();
    if keys.is_empty() {
        return Ok(found);
    }
    let rows = sqlx::query(
        "SELECT DISTINCT ON (res_type, res_id) res_type, res_id, seq, version, deleted, content_hash, last_updated
         FROM resource_version WHERE id_key = ANY($1)
         ORDER BY res_type, res_id, version DESC",
    )
    .bind(&keys)
    .fetch_all(conn)
    .await?;
    for row in rows {
        let resource_type: &str = row.try_get(0)?;
        let id: &str = row.try_get(1)?;
        // The key is a hash: rows of other resources that share it are skipped here.
        let Some(&static_type) = wanted.get(&(resource_type, id)) else {
            continue;
        };
        found.insert(
            (static_type, id.to_owned()),
            Current {
                seq: row.try_get(2)?,
                version: row.try_get::<i64, _>(3)? as u64,
                deleted: row.try_get(4)?,
                content_hash: row.try_get(5)?,
                last_updated: row.try_get(6)?,
                new_row: None,
            },
        );
    }
    Ok(found)
}

async fn copy_versions(conn: &mut PgConnection, rows: &[NewRow]) -> Result<(), StoreError> {
    let mut copy = conn.copy_in_raw(VERSION_COPY).await?;
    let mut buffer = CopyBuffer::new();
    for row in rows {
        buffer.tuple(11);
        buffer.int8(row.seq);
        buffer.text(row.resource_type);
        buffer.text(&row.id);
        buffer.int8(resource_key(row.resource_type, &row.id));
        buffer.int8(row.version as i64);
        buffer.int8(row.last_updated);
        buffer.optional_int8(row.superseded_by);
        buffer.boolean(row.deleted);
        buffer.int4(row.compartment_size);
        buffer.bytes(&row.content_hash);
        buffer.bytes(&row.body);
        if buffer.is_full() {
            copy.send(buffer.take()).await?;
        }
    }
    copy.send(buffer.finish()).await?;
    copy.finish().await?;
    Ok(())
}

async fn copy_members(conn: &mut PgConnection, members: &[(i64, Seq)]) -> Result<(), StoreError> {
    let mut copy = conn.copy_in_raw(MEMBER_COPY).await?;
    let mut buffer = CopyBuffer::new();
    for &(patient_key, seq) in members {
        buffer.tuple(2);
        buffer.int8(patient_key);
        buffer.int8(seq);
        if buffer.is_full() {
            copy.send(buffer.take()).await?;
        }
    }
    copy.send(buffer.finish()).await?;
    copy.finish().await?;
    Ok(())
}
