//! Reads on a pooled reader connection.

use hearth_fhir::instant::Micros;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};

use crate::error::StoreError;
use crate::model::{SearchPage, SearchQuery, Seq, StoredVersion};
use crate::sqlite::resource_key;

const COLUMNS: &str = "res_type, res_id, version, last_updated, seq, deleted, body";

fn stored_version(row: &Row<'_>) -> rusqlite::Result<StoredVersion> {
    Ok(StoredVersion {
        resource_type: row.get(0)?,
        id: row.get(1)?,
        version: row.get::<_, i64>(2)? as u64,
        last_updated: row.get(3)?,
        seq: row.get(4)?,
        deleted: row.get(5)?,
        body: row.get(6)?,
    })
}

pub(crate) fn current(
    conn: &Connection,
    resource_type: &str,
    id: &str,
) -> Result<Option<StoredVersion>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM resource_version WHERE id_key = ?3 AND res_type = ?1 AND res_id = ?2
         ORDER BY version DESC LIMIT 1"
    ))?;
    let key = resource_key(resource_type, id);
    Ok(stmt
        .query_row(params![resource_type, id, key], stored_version)
        .optional()?)
}

pub(crate) fn version(
    conn: &Connection,
    resource_type: &str,
    id: &str,
    version: u64,
) -> Result<Option<StoredVersion>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM resource_version
         WHERE id_key = ?4 AND version = ?3 AND res_type = ?1 AND res_id = ?2"
    ))?;
    let key = resource_key(resource_type, id);
    Ok(stmt
        .query_row(
            params![resource_type, id, version as i64, key],
            stored_version,
        )
        .optional()?)
}

pub(crate) fn history(
    conn: &Connection,
    resource_type: &str,
    id: &str,
    before_version: Option<u64>,
    count: usize,
) -> Result<Vec<StoredVersion>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM resource_version
         WHERE id_key = ?5 AND version < ?3 AND res_type = ?1 AND res_id = ?2
         ORDER BY version DESC LIMIT ?4"
    ))?;
    let before = before_version.map_or(i64::MAX, |v| v as i64);
    let key = resource_key(resource_type, id);
    let rows = stmt.query_map(
        params![resource_type, id, before, count as i64, key],
        stored_version,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The last sequence number whose `lastUpdated` is at or before `instant` (0 if none).
///
/// `lastUpdated` grows strictly with `seq`, so a binary search over the primary key answers
/// without an index on time.
pub(crate) fn seq_at(conn: &Connection, instant: Micros) -> Result<Seq, StoreError> {
    let mut at_or_before = conn.prepare_cached(
        "SELECT seq, last_updated FROM resource_version WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1",
    )?;
    let mut probe = |seq: Seq| -> Result<Option<(Seq, Micros)>, StoreError> {
        Ok(at_or_before
            .query_row([seq], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?)
    };
    let Some((last_seq, last_updated)) = probe(Seq::MAX)? else {
        return Ok(0);
    };
    if last_updated <= instant {
        return Ok(last_seq);
    }
    // Invariant: the answer is in [low, high), and the row at or before `high` is too late.
    let (mut low, mut high) = (0, last_seq);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        match probe(mid)? {
            Some((_, updated)) if updated > instant => high = mid,
            _ => low = mid,
        }
    }
    Ok(probe(low)?.map_or(0, |(seq, _)| seq))
}

pub(crate) fn search(conn: &Connection, query: &SearchQuery) -> Result<SearchPage, StoreError> {
    let tx = conn.unchecked_transaction()?;
    // Time windows become sequence bounds: `lastUpdated > t` is `seq > seq_at(t)`.
    let mut low = query.after_seq;
    let mut filter_low = 0;
    if let Some(after) = query.updated_after {
        filter_low = seq_at(&tx, after)?;
    }
    let high = match query.updated_before {
        Some(before) => seq_at(&tx, before - 1)?,
        None => Seq::MAX,
    };
    low = low.max(filter_low);

    let mut conditions = String::from(
        "res_type = ? AND seq > ? AND seq <= ? AND superseded_by IS NULL AND deleted = 0",
    );
    let mut values: Vec<Value> = vec![
        Value::Text(query.resource_type.clone()),
        Value::Integer(low),
        Value::Integer(high),
    ];
    if !query.ids.is_empty() {
        // The id index narrows to a handful of rows; the text comparison rules out collisions.
        conditions.push_str(" AND id_key IN (");
        for (i, id) in query.ids.iter().enumerate() {
            conditions.push_str(if i == 0 { "?" } else { ",?" });
            values.push(Value::Integer(resource_key(&query.resource_type, id)));
        }
        conditions.push_str(") AND res_id IN (");
        for (i, id) in query.ids.iter().enumerate() {
            conditions.push_str(if i == 0 { "?" } else { ",?" });
            values.push(Value::Text(id.clone()));
        }
        conditions.push(')');
    }

    if let Some(filter) = &query.filter {
        return filtered_search(&tx, query, filter, &conditions, values, filter_low);
    }

    let total = if query.total {
        let mut count_values = values.clone();
        count_values[1] = Value::Integer(filter_low);
        let sql = format!("SELECT COUNT(*) FROM resource_version WHERE {conditions}");
        Some(
            tx.prepare_cached(&sql)?
                .query_row(params_from_iter(count_values), |row| row.get::<_, i64>(0))?
                as u64,
        )
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
        let mut stmt = tx.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(values), stored_version)?;
        for row in rows {
            resources.push(row?);
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

/// Search with parameters the SQL indexes do not cover: the type's current resources are read in
/// change-sequence order and tested by the search engine, so paging stays keyset.
fn filtered_search(
    tx: &Connection,
    query: &SearchQuery,
    filter: &hearth_fhir::search::Filter,
    conditions: &str,
    mut values: Vec<Value>,
    filter_low: Seq,
) -> Result<SearchPage, StoreError> {
    // With a total the scan starts at the window's beginning and counts every match; the page
    // is the matches after the cursor.
    let cursor = query.after_seq;
    if query.total {
        values[1] = Value::Integer(filter_low);
    }
    let sql = format!("SELECT {COLUMNS} FROM resource_version WHERE {conditions} ORDER BY seq");
    let mut stmt = tx.prepare(&sql)?;
    let mut rows = stmt.query(params_from_iter(values))?;
    let mut resources = Vec::new();
    let mut next_after_seq = None;
    let mut total = 0u64;
    while let Some(row) = rows.next()? {
        let body = row.get_ref(6)?.as_blob().map_err(rusqlite::Error::from)?;
        if !filter.matches_bytes(body) {
            continue;
        }
        total += 1;
        let seq: Seq = row.get(4)?;
        if seq > cursor && query.count > 0 {
            if resources.len() < query.count {
                resources.push(stored_version(row)?);
            } else if next_after_seq.is_none() {
                next_after_seq = resources.last().map(|r: &StoredVersion| r.seq);
                if !query.total {
                    break;
                }
            }
        }
    }
    Ok(SearchPage {
        resources,
        total: query.total.then_some(total),
        next_after_seq,
    })
}
