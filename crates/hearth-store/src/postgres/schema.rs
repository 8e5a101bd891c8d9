//! The PostgreSQL schema and its migrations, applied in order under an advisory lock so that
//! several Hearth processes starting together migrate once.

use sqlx::PgPool;

use crate::error::StoreError;

/// Each entry moves the schema from version `index` to `index + 1`. Same tables as the SQLite
/// schema, in PostgreSQL's types; times are epoch microseconds in both. Text compares byte by
/// byte (`COLLATE "C"`), as in SQLite, so ordered results are the same on both backends.
const MIGRATIONS: &[&str] = &[
    // 1: resources, their versions, the Patient compartment index, and the change clock.
    r#"
    -- The only source of change sequence numbers and lastUpdated values. Every writing
    -- transaction locks this row first and commits before the next one can take numbers, so
    -- sequence numbers become visible in commit order: an export whose snapshot is seq S sees
    -- every write up to S (a sequence object would let S+1 commit before S).
    CREATE TABLE store_clock (
        id           INTEGER PRIMARY KEY CHECK (id = 1),
        next_seq     BIGINT NOT NULL,
        last_updated BIGINT NOT NULL
    );
    INSERT INTO store_clock (id, next_seq, last_updated) VALUES (1, 1, 0);

    CREATE TABLE resource_version (
        seq              BIGINT  PRIMARY KEY,
        res_type         TEXT COLLATE "C"    NOT NULL,
        res_id           TEXT COLLATE "C"    NOT NULL,
        id_key           BIGINT  NOT NULL,
        version          BIGINT  NOT NULL,
        last_updated     BIGINT  NOT NULL,
        superseded_by    BIGINT,
        deleted          BOOLEAN NOT NULL,
        compartment_size INTEGER NOT NULL DEFAULT 0,
        content_hash     BYTEA   NOT NULL,
        -- lz4 decompresses several times faster than the default pglz on export scans.
        body             BYTEA   COMPRESSION lz4 NOT NULL
    );
    CREATE INDEX resource_version_by_key ON resource_version (id_key, version);
    CREATE INDEX resource_version_by_type ON resource_version (res_type, seq);

    CREATE TABLE compartment_member (
        patient_key BIGINT NOT NULL,
        seq         BIGINT NOT NULL,
        PRIMARY KEY (patient_key, seq)
    );
    "#,
    // 2: durable export jobs, their work units and their files.
    r#"
    CREATE TABLE export_job (
        id                  TEXT COLLATE "C" PRIMARY KEY,
        client              TEXT COLLATE "C"    NOT NULL,
        status              TEXT COLLATE "C"    NOT NULL,
        request             TEXT COLLATE "C"    NOT NULL,
        request_url         TEXT COLLATE "C"    NOT NULL,
        snapshot_seq        BIGINT  NOT NULL,
        transaction_time    BIGINT  NOT NULL,
        created_at          BIGINT  NOT NULL,
        started_at          BIGINT,
        completed_at        BIGINT,
        expires_at          BIGINT,
        polls               BIGINT  NOT NULL DEFAULT 0,
        manifest_shown      BOOLEAN NOT NULL DEFAULT FALSE,
        estimated_resources BIGINT  NOT NULL,
        done_resources      BIGINT  NOT NULL DEFAULT 0,
        manifest            TEXT,
        error               TEXT
    );
    CREATE INDEX export_job_by_client ON export_job (client, status);

    CREATE TABLE export_unit (
        job_id      TEXT COLLATE "C"    NOT NULL REFERENCES export_job (id) ON DELETE CASCADE,
        unit_no     BIGINT  NOT NULL,
        res_type    TEXT COLLATE "C"    NOT NULL,
        kind        TEXT COLLATE "C"    NOT NULL,
        seq_after   BIGINT  NOT NULL,
        seq_upto    BIGINT  NOT NULL,
        scope       TEXT COLLATE "C"    NOT NULL DEFAULT 'all',
        patients    TEXT,
        status      TEXT COLLATE "C"    NOT NULL DEFAULT 'pending',
        lease_owner TEXT,
        lease_until BIGINT,
        attempt     BIGINT  NOT NULL DEFAULT 0,
        resources   BIGINT  NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, unit_no)
    );
    CREATE INDEX export_unit_open ON export_unit (status) WHERE status <> 'done';

    CREATE TABLE export_file (
        id       TEXT COLLATE "C" PRIMARY KEY,
        job_id   TEXT COLLATE "C"    NOT NULL REFERENCES export_job (id) ON DELETE CASCADE,
        unit_no  BIGINT  NOT NULL,
        part     BIGINT  NOT NULL,
        res_type TEXT COLLATE "C"    NOT NULL,
        kind     TEXT COLLATE "C"    NOT NULL,
        path     TEXT COLLATE "C"    NOT NULL,
        count    BIGINT  NOT NULL,
        bytes    BIGINT  NOT NULL
    );
    CREATE INDEX export_file_by_job ON export_file (job_id, res_type, unit_no, part);
    "#,
    // 3: the authorization server: registered clients, used assertion ids, the token secret.
    r#"
    CREATE TABLE auth_client (
        id         TEXT COLLATE "C" PRIMARY KEY,
        jwks_url   TEXT,
        jwks       TEXT,
        scope      TEXT,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE auth_jti (
        client_id  TEXT COLLATE "C"   NOT NULL,
        jti        TEXT COLLATE "C"   NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (client_id, jti)
    );
    CREATE TABLE auth_secret (
        name   TEXT COLLATE "C" PRIMARY KEY,
        secret BYTEA NOT NULL
    );
    "#,
    // 4: output organized in blocks (organizeOutputBy): a file whose last block goes on in
    // the unit's next part.
    r#"
    ALTER TABLE export_file ADD COLUMN continues BOOLEAN NOT NULL DEFAULT FALSE;
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

/// An arbitrary constant naming Hearth's migration lock among the database's advisory locks.
const MIGRATION_LOCK: i64 = 0x4865_6172_7468;

/// Brings a fresh or older database up to [`SCHEMA_VERSION`].
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS hearth_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let found: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM hearth_schema")
        .fetch_one(&mut *tx)
        .await?;
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO hearth_schema (version) VALUES ($1)")
            .bind(index as i64 + 1)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
