//! Reads: the same queries as the SQLite backend, in PostgreSQL's placeholders and types.

use futures::TryStreamExt;
use hearth_fhir::instant::Micros;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::error::StoreError;
use crate::model::{SearchPage, SearchQuery, Seq, StoredVersion};
use crate::resource_key;

const COLUMNS: &str = "res_type, res_id, version, last_updated, seq, deleted, body";

fn stored_version(row: &PgRow) -> Result<StoredVersion, sqlx::Error> {
    Ok(StoredVersion {
        resource_type: row.try_get(0)?,
        id: row.try_get(1)?,
        version: row.try_get::<i64, _>(2)? as u64,
        last_updated: row.try_get(3)?,
        seq: row.try_get(4)?,
        deleted: row.try_get(5)?,
        body: row.try_get(6)?,
    })
}

pub(super) async fn current(
    pool: &PgPool,
    resource_type: &str,
    id: &str,
) -> Result<Option<StoredVersion>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM resource_version WHERE id_key = $3 AND res_type = $1 AND res_id = $2
         ORDER BY version DESC LIMIT 1"
    )))
    .bind(resource_type)
    .bind(id)
    .bind(resource_key(resource_type, id))
    .fetch_optional(pool)
    .await?;
    Ok(row.as_ref().map(stored_version).transpose()?)
}

pub(super) async fn version(
    pool: &PgPool,
    resource_type: &str,
    id: &str,
    version: u64,
) -> Result<Option<StoredVersion>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM resource_version
         WHERE id_key = $4 AND version = $3 AND res_type = $1 AND res_id = $2"
    )))
    .bind(resource_type)
    .bind(id)
    .bind(version as i64)
    .bind(resource_key(resource_type, id))
    .fetch_optional(pool)
    .await?;
    Ok(row.as_ref().map(stored_version).transpose()?)
}

pub(super) async fn history(
    pool: &PgPool,
    resource_type: &str,
    id: &str,
    before_version: Option<u64>,
    count: usize,
) -> Result<Vec<StoredVersion>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM resource_version
         WHERE id_key = $5 AND version < $3 AND res_type = $1 AND res_id = $2
         ORDER BY version DESC LIMIT $4"
    )))
    .bind(resource_type)
    .bind(id)
    .bind(before_version.map_or(i64::MAX, |v| v as i64))
    .bind(count as i64)
    .bind(resource_key(resource_type, id))
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(stored_version).collect::<Result<_, _>>()?)
}

/// The last sequence number whose `lastUpdated` is at or before `instant` (0 if none).
///
/// `lastUpdated` grows strictly with `seq`, so a binary search over the primary key answers
/// without an index on time.
pub(super) async fn seq_at(pool: &PgPool, instant: Micros) -> Result<Seq, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut probe = async |seq: Seq| -> Result<Option<(Seq, Micros)>, StoreError> {
        let row = sqlx::query(
            "SELECT seq, last_updated FROM resource_version WHERE seq <= $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(seq)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(match row {
            Some(row) => Some((row.try_get(0)?, row.try_get(1)?)),
            None => None,
        })
    };
    let Some((last_seq, last_updated)) = probe(Seq::MAX).await? else {
        return Ok(0);
    };
    if last_updated <= instant {
        return Ok(last_seq);
    }
    // Invariant: the answer is in [low, high), and the row at or before `high` is too late.
    let (mut low, mut high) = (0, last_seq);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        match probe(mid).await? {
            Some((_, updated)) if updated > instant => high = mid,
            _ => low = mid,
        }
    }
    Ok(probe(low).await?.map_or(0, |(seq, _)| seq))
}

pub(super) async fn search(pool: &PgPool, query: &SearchQuery) -> Result<SearchPage, StoreError> {
    // Time windows become sequence bounds: `lastUpdated > t` is `seq > seq_at(t)`.
    let filter_low = match query.updated_after {
        Some(after) => seq_at(pool, after).await?,
        None => 0,
    };
    let high = match query.updated_before {
        Some(before) => seq_at(pool, before - 1).await?,
        None => Seq::MAX,
    };
    let low = query.after_seq.max(filter_low);
    let keys: Vec<i64> = query
        .ids
        .iter()
        .map(|id| resource_key(&query.resource_type, id))
        .collect();
    let mut conditions = String::from(
        "res_type = $1 AND seq > $2 AND seq <= $3 AND superseded_by IS NULL AND NOT deleted",
    );
    if !keys.is_empty() {
        // The id index narrows to a handful of rows; the text comparison rules out collisions.
        conditions.push_str(" AND id_key = ANY($4) AND res_id = ANY($5)");
    }
    let bind = |sql: String, low: Seq| {
        let query_ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(query.resource_type.as_str())
            .bind(low)
            .bind(high);
        if keys.is_empty() {
            query_
        } else {
            query_.bind(keys.as_slice()).bind(query.ids.as_slice())
        }
    };

    if let Some(filter) = &query.filter {
        // Parameters the indexes do not cover: read the type's current resources in
        // change-sequence order and test each, so paging stays keyset.
        let start = if query.total { filter_low } else { low };
        let sql = format!("SELECT {COLUMNS} FROM resource_version WHERE {conditions} ORDER BY seq");
        let mut rows = bind(sql, start).fetch(pool);
        let mut resources = Vec::new();
        let mut next_after_seq = None;
        let mut total = 0u64;
        while let Some(row) = rows.try_next().await? {
            let body: &[u8] = row.try_get(6)?;
            if !filter.matches_bytes(body) {
                continue;
            }
            total += 1;
            let seq: Seq = row.try_get(4)?;
            if seq > query.after_seq && query.count > 0 {
                if resources.len() < query.count {
                    resources.push(stored_version(&row)?);
                } else if next_after_seq.is_none() {
                    next_after_seq = resources.last().map(|r: &StoredVersion| r.seq);
                    if !query.total {
                        break;
                    }
                }
            }
        }
        return Ok(SearchPage {
            resources,
            total: query.total.then_some(total),
            next_after_seq,
        });
    }

    let total = if query.total {
        let sql = format!("SELECT COUNT(*) FROM resource_version WHERE {conditions}");
        let count: i64 = bind(sql, filter_low).fetch_one(pool).await?.try_get(0)?;
        Some(count as u64)
    } else {
        None
    };
    let mut resources = Vec::new();
    let mut next_after_seq = None;
    if query.count > 0 {
        let sql = format!(
            "SELECT {COLUMNS} FROM resource_version WHERE {conditions} ORDER BY seq LIMIT {}",
            query.count + 1
        );
        let rows = bind(sql, low).fetch_all(pool).await?;
        for row in &rows {
            resources.push(stored_version(row)?);
        }
        if resources.len() > query.count {
            resources.truncate(query.count);
            next_after_seq = resources.last().map(|r| r.seq);
        }
    }
    Ok(SearchPage {
        resources,
        total,
        next_after_seq,
    })
}
