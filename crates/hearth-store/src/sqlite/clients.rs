//! [`ClientStore`] for SQLite: writes go through the single writer, reads through the pool.

use async_trait::async_trait;
use hearth_fhir::instant::Micros;
use rusqlite::{OptionalExtension, Row, params};

use super::SqliteStore;
use crate::clients::{ClientRecord, ClientStore};
use crate::error::StoreError;

const CLIENT_COLUMNS: &str = "id, jwks_url, jwks, scope, created_at";

fn client_record(row: &Row<'_>) -> rusqlite::Result<ClientRecord> {
    Ok(ClientRecord {
        id: row.get(0)?,
        jwks_url: row.get(1)?,
        jwks: row.get(2)?,
        scope: row.get(3)?,
        created_at: row.get(4)?,
    })
}

#[async_trait]
impl ClientStore for SqliteStore {
    async fn put_client(&self, client: ClientRecord) -> Result<bool, StoreError> {
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                let existed = tx
                    .prepare_cached("SELECT 1 FROM auth_client WHERE id = ?1")?
                    .exists([&client.id])?;
                tx.execute(
                    "INSERT OR REPLACE INTO auth_client (id, jwks_url, jwks, scope, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        client.id,
                        client.jwks_url,
                        client.jwks,
                        client.scope,
                        client.created_at
                    ],
                )?;
                tx.commit()?;
                Ok(existed)
            })
            .await
    }

    async fn client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        let id = id.to_owned();
        self.with_reader(move |conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {CLIENT_COLUMNS} FROM auth_client WHERE id = ?1"
                ))?
                .query_row([id], client_record)
                .optional()?)
        })
        .await
    }

    async fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CLIENT_COLUMNS} FROM auth_client ORDER BY id"
            ))?;
            let rows = stmt.query_map([], client_record)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn remove_client(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                let removed = tx.execute("DELETE FROM auth_client WHERE id = ?1", [&id])? > 0;
                tx.execute("DELETE FROM auth_jti WHERE client_id = ?1", [&id])?;
                tx.commit()?;
                Ok(removed)
            })
            .await
    }

    async fn record_jti(
        &self,
        client_id: &str,
        jti: &str,
        expires_at: Micros,
        now: Micros,
    ) -> Result<bool, StoreError> {
        let (client_id, jti) = (client_id.to_owned(), jti.to_owned());
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                // Assertions live at most minutes, so the table stays tiny without a sweeper.
                tx.execute("DELETE FROM auth_jti WHERE expires_at < ?1", [now])?;
                let fresh = tx.execute(
                    "INSERT OR IGNORE INTO auth_jti (client_id, jti, expires_at) VALUES (?1, ?2, ?3)",
                    params![client_id, jti, expires_at],
                )? == 1;
                tx.commit()?;
                Ok(fresh)
            })
            .await
    }

    async fn signing_secret(&self, fresh: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.inner
            .writer
            .run(move |state| {
                let tx = state.conn.transaction()?;
                tx.execute(
                    "INSERT OR IGNORE INTO auth_secret (name, secret) VALUES ('access-token', ?1)",
                    [&fresh],
                )?;
                let secret: Vec<u8> = tx.query_row(
                    "SELECT secret FROM auth_secret WHERE name = 'access-token'",
                    [],
                    |row| row.get(0),
                )?;
                tx.commit()?;
                Ok(secret)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    fn client(id: &str) -> ClientRecord {
        ClientRecord {
            id: id.to_owned(),
            jwks_url: Some("https://example.org/jwks.json".into()),
            jwks: None,
            scope: Some("system/*.rs".into()),
            created_at: 1,
        }
    }

    #[tokio::test]
    async fn clients_are_added_replaced_listed_and_removed() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert!(!store.put_client(client("b")).await.unwrap());
        assert!(!store.put_client(client("a")).await.unwrap());
        let mut changed = client("a");
        changed.scope = None;
        assert!(store.put_client(changed.clone()).await.unwrap());
        assert_eq!(store.client("a").await.unwrap(), Some(changed));
        let ids: Vec<String> = store
            .clients()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(store.remove_client("a").await.unwrap());
        assert!(!store.remove_client("a").await.unwrap());
        assert_eq!(store.client("a").await.unwrap(), None);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_jti_counts_once_until_it_expires() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert!(store.record_jti("a", "j1", 100, 0).await.unwrap());
        assert!(!store.record_jti("a", "j1", 100, 50).await.unwrap());
        // Another client may pick the same jti.
        assert!(store.record_jti("b", "j1", 100, 50).await.unwrap());
        // Past its expiry the entry is gone, and the jti is usable again.
        assert!(store.record_jti("a", "j1", 300, 200).await.unwrap());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn the_signing_secret_is_kept_once() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let first = store.signing_secret(vec![1; 32]).await.unwrap();
        let second = store.signing_secret(vec![2; 32]).await.unwrap();
        assert_eq!(first, vec![1; 32]);
        assert_eq!(second, first);
        store.close().await.unwrap();
    }
}
