//! The SQLite schema and its migrations, applied in order by `PRAGMA user_version`.

use rusqlite::Connection;

use crate::error::StoreError;

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: resources, their versions and the Patient compartment index.
    r#"
    -- Every version of every resource, in change-sequence order. The row id *is* the change
    -- sequence number, so an export scan of one type walks (res_type, seq) and reads bodies
    -- in table order.
    CREATE TABLE resource_version (
        seq           INTEGER PRIMARY KEY,
        res_type      TEXT    NOT NULL,
        res_id        TEXT    NOT NULL,
        -- A 64-bit hash of "type/id" (see `resource_key`): the id index stays a fifth of the
        -- size of one on the text, so it fits in cache and large loads keep their speed.
        id_key        INTEGER NOT NULL,
        version       INTEGER NOT NULL,
        -- Microseconds since the epoch; strictly increasing with seq.
        last_updated  INTEGER NOT NULL,
        -- The seq of the version that replaced this one; NULL while this one is current.
        -- "Visible at snapshot S" is: seq <= S AND (superseded_by IS NULL OR superseded_by > S).
        superseded_by INTEGER,
        deleted       INTEGER NOT NULL,
        -- How many patients' compartments hold this version (a tombstone keeps its last
        -- version's): 0 leaves it out of Patient exports; above 1 asks for de-duplication.
        compartment_size INTEGER NOT NULL DEFAULT 0,
        -- Hash of the content without server-set meta fields, to skip no-op updates.
        content_hash  BLOB    NOT NULL,
        -- Compact JSON exactly as exported; empty for tombstones.
        body          BLOB    NOT NULL
    );
    CREATE INDEX resource_version_by_key ON resource_version (id_key, version);
    CREATE INDEX resource_version_by_type ON resource_version (res_type, seq);

    -- Which patients' compartments each version belongs to (R4 Patient CompartmentDefinition),
    -- by the patient's `resource_key("Patient", id)`.
    CREATE TABLE compartment_member (
        patient_key INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (patient_key, seq)
    ) WITHOUT ROWID;
    "#,
    // 2: durable export jobs, their work units and their files.
    r#"
    CREATE TABLE export_job (
        id                  TEXT PRIMARY KEY,
        client              TEXT    NOT NULL,
        status              TEXT    NOT NULL,
        request             TEXT    NOT NULL,
        request_url         TEXT    NOT NULL,
        snapshot_seq        INTEGER NOT NULL,
        transaction_time    INTEGER NOT NULL,
        created_at          INTEGER NOT NULL,
        started_at          INTEGER,
        completed_at        INTEGER,
        expires_at          INTEGER,
        polls               INTEGER NOT NULL DEFAULT 0,
        manifest_shown      INTEGER NOT NULL DEFAULT 0,
        estimated_resources INTEGER NOT NULL,
        done_resources      INTEGER NOT NULL DEFAULT 0,
        manifest            TEXT,
        error               TEXT
    );
    CREATE INDEX export_job_by_client ON export_job (client, status);

    CREATE TABLE export_unit (
        job_id      TEXT    NOT NULL REFERENCES export_job (id) ON DELETE CASCADE,
        unit_no     INTEGER NOT NULL,
        res_type    TEXT    NOT NULL,
        kind        TEXT    NOT NULL,
        seq_after   INTEGER NOT NULL,
        seq_upto    INTEGER NOT NULL,
        -- all | compartment | patients (see UnitScope)
        scope       TEXT    NOT NULL DEFAULT 'all',
        -- For the patients scope: a JSON array of the patient ids the unit covers.
        patients    TEXT,
        -- pending | running | done
        status      TEXT    NOT NULL DEFAULT 'pending',
        lease_owner TEXT,
        lease_until INTEGER,
        -- Fencing token: a commit must name the attempt it claimed.
        attempt     INTEGER NOT NULL DEFAULT 0,
        resources   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, unit_no)
    ) WITHOUT ROWID;
    CREATE INDEX export_unit_open ON export_unit (status) WHERE status <> 'done';

    CREATE TABLE export_file (
        id       TEXT PRIMARY KEY,
        job_id   TEXT    NOT NULL REFERENCES export_job (id) ON DELETE CASCADE,
        unit_no  INTEGER NOT NULL,
        part     INTEGER NOT NULL,
        res_type TEXT    NOT NULL,
        kind     TEXT    NOT NULL,
        path     TEXT    NOT NULL,
        count    INTEGER NOT NULL,
        bytes    INTEGER NOT NULL
    );
    CREATE INDEX export_file_by_job ON export_file (job_id, res_type, unit_no, part);
    "#,
    // 3: the authorization server: registered clients, used assertion ids, the token secret.
    r#"
    -- SMART Backend Services clients (`hearth clients add`). Exactly one of jwks_url and jwks
    -- is set; scope is the most the client may be granted (NULL: any read scope).
    CREATE TABLE auth_client (
        id         TEXT PRIMARY KEY,
        jwks_url   TEXT,
        jwks       TEXT,
        scope      TEXT,
        created_at INTEGER NOT NULL
    );

    -- Assertion ids already used, kept until the assertion expires: a replay is refused.
    CREATE TABLE auth_jti (
        client_id  TEXT    NOT NULL,
        jti        TEXT    NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (client_id, jti)
    ) WITHOUT ROWID;

    -- The HMAC secret of Hearth's own access tokens, shared by every process on this store.
    CREATE TABLE auth_secret (
        name   TEXT PRIMARY KEY,
        secret BLOB NOT NULL
    );
    "#,
    // 4: output organized in blocks (organizeOutputBy): a file whose last block goes on in
    // the unit's next part.
    r#"
    ALTER TABLE export_file ADD COLUMN continues INTEGER NOT NULL DEFAULT 0;
    "#,
    // 5: versions in no patient's compartment, by type: a Group export looks there for the
    // Provenance of its resources without reading every Provenance in the store.
    r#"
    CREATE INDEX resource_version_outside_compartments ON resource_version (res_type, seq)
        WHERE compartment_size = 0;
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Page cache of the writer, in KiB: index pages of large loads stay in memory.
pub const WRITER_CACHE_KIB: i64 = 65_536;
/// Page cache of each reader, in KiB: scans stream through the OS page cache, so a small one
/// keeps many readers' memory bounded.
pub const READER_CACHE_KIB: i64 = 8_192;

/// Settings every connection gets. 64 KiB pages make scans and loads far faster on this kind
/// of data (a resource is ~1.4 kB); WAL lets readers run beside the one writer.
pub fn configure(conn: &Connection, cache_kib: i64) -> Result<(), StoreError> {
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA temp_store = MEMORY;
         PRAGMA busy_timeout = 10000;
         PRAGMA foreign_keys = ON;",
    )?;
    Ok(())
}

/// Brings a fresh or older database up to [`SCHEMA_VERSION`].
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == 0 {
        // Only effective before the first table exists.
        conn.execute_batch("PRAGMA page_size = 65536; VACUUM;")?;
    }
    configure(conn, WRITER_CACHE_KIB)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
