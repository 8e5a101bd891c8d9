//! Fresh PostgreSQL databases for tests.
//!
//! Tests call [`fresh_store`]: it creates a database of its own on the server named by
//! `HEARTH_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`). When no server
//! answers, the test is skipped with a visible message, unless `HEARTH_REQUIRE_POSTGRES=1`,
//! where that is a failure.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use super::PgStore;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn admin_url() -> String {
    std::env::var("HEARTH_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

fn required() -> bool {
    std::env::var("HEARTH_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The URL of a new, empty database, or `None` (after printing why) when PostgreSQL is absent
/// and not required.
///
/// # Panics
/// When PostgreSQL is required but cannot be reached or the database cannot be created.
pub async fn fresh_database_url() -> Option<String> {
    let admin = admin_url();
    let mut conn = match PgConnection::connect(&admin).await {
        Ok(conn) => conn,
        Err(e) if !required() => {
            eprintln!(
                "skipped: PostgreSQL is not reachable at {admin} ({e}); set HEARTH_REQUIRE_POSTGRES=1 to make this a failure"
            );
            return None;
        }
        Err(e) => panic!(
            "PostgreSQL is required (HEARTH_REQUIRE_POSTGRES=1) but {admin} is not reachable: {e}"
        ),
    };
    drop_stale_databases(&mut conn).await;
    let name = format!(
        "hearth_test_{}_{}",
        unix_seconds(),
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e}"));
    let _ = conn.close().await;
    let options = PgConnectOptions::from_str(&admin)
        .unwrap_or_else(|e| panic!("HEARTH_TEST_POSTGRES is not a PostgreSQL URL: {e}"))
        .database(&name);
    Some(options.to_url_lossy().to_string())
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Test databases are left behind while their test runs; ones an hour old belong to runs that
/// are over.
async fn drop_stale_databases(conn: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'hearth\\_test\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap_or_default();
    let cutoff = unix_seconds().saturating_sub(3600);
    for name in names {
        let created = name
            .strip_prefix("hearth_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|seconds| seconds.parse::<u64>().ok());
        // Names without a time stamp come from older builds: stale too.
        if created.is_none_or(|created| created < cutoff) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut *conn)
            .await;
        }
    }
}

/// A store on a new, empty database (see [`fresh_database_url`]).
pub async fn fresh_store() -> Option<PgStore> {
    let url = fresh_database_url().await?;
    Some(
        PgStore::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot open the test database: {e}")),
    )
}
