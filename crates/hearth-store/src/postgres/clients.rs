//! [`ClientStore`] for PostgreSQL.

use async_trait::async_trait;
use hearth_fhir::instant::Micros;

use super::PgStore;
use crate::clients::{ClientRecord, ClientStore};
use crate::error::StoreError;

type ClientRow = (String, Option<String>, Option<String>, Option<String>, i64);

fn client_record((id, jwks_url, jwks, scope, created_at): ClientRow) -> ClientRecord {
    ClientRecord {
        id,
        jwks_url,
        jwks,
        scope,
        created_at,
    }
}

#[async_trait]
impl ClientStore for PgStore {
    async fn put_client(&self, client: ClientRecord) -> Result<bool, StoreError> {
        // xmax is non-zero on a row the upsert updated rather than inserted.
        let replaced: bool = sqlx::query_scalar(
            "INSERT INTO auth_client (id, jwks_url, jwks, scope, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET jwks_url = EXCLUDED.jwks_url, jwks = EXCLUDED.jwks,
                 scope = EXCLUDED.scope, created_at = EXCLUDED.created_at
             RETURNING xmax <> 0",
        )
        .bind(&client.id)
        .bind(&client.jwks_url)
        .bind(&client.jwks)
        .bind(&client.scope)
        .bind(client.created_at)
        .fetch_one(&self.pool)
        .await?;
        Ok(replaced)
    }

    async fn client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        let row: Option<ClientRow> = sqlx::query_as(
            "SELECT id, jwks_url, jwks, scope, created_at FROM auth_client WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(client_record))
    }

    async fn clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        let rows: Vec<ClientRow> = sqlx::query_as(
            "SELECT id, jwks_url, jwks, scope, created_at FROM auth_client ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(client_record).collect())
    }

    async fn remove_client(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query("DELETE FROM auth_client WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        sqlx::query("DELETE FROM auth_jti WHERE client_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn record_jti(
        &self,
        client_id: &str,
        jti: &str,
        expires_at: Micros,
        now: Micros,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Assertions live at most minutes, so the table stays tiny without a sweeper.
        sqlx::query("DELETE FROM auth_jti WHERE expires_at < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let fresh = sqlx::query(
            "INSERT INTO auth_jti (client_id, jti, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(client_id)
        .bind(jti)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(fresh)
    }

    async fn signing_secret(&self, fresh: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        sqlx::query(
            "INSERT INTO auth_secret (name, secret) VALUES ('access-token', $1) ON CONFLICT DO NOTHING",
        )
        .bind(&fresh)
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT secret FROM auth_secret WHERE name = 'access-token'")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
