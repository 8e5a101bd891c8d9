//! Registered SMART Backend Services clients, the `jti` replay cache of their assertions, and
//! the secret Hearth signs its own access tokens with.
//!
//! All three live in the store rather than in memory so that several Hearth processes on one
//! database (and a restarted one) agree: a client registered with `hearth clients add` is seen
//! at once, an assertion replayed to another instance is still refused, and a token issued by
//! one instance is accepted by the others.

use async_trait::async_trait;
use hearth_fhir::instant::Micros;

use crate::error::StoreError;

/// A client allowed to ask for access tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    /// The `client_id`: the `iss` and `sub` of its assertions.
    pub id: String,
    /// Where its public keys are published (preferred: allows key rotation).
    pub jwks_url: Option<String>,
    /// Its public keys as a JWKS document, for clients without a URL.
    pub jwks: Option<String>,
    /// The most it may be granted (space-separated SMART scopes); `None`: any read scope.
    pub scope: Option<String>,
    pub created_at: Micros,
}

/// Persistence for the authorization server.
#[async_trait]
pub trait ClientStore: Send + Sync + 'static {
    /// Registers a client, or replaces the registration with the same id; true if it replaced
    /// one.
    async fn put_client(&self, client: ClientRecord) -> Result<bool, StoreError>;

    async fn client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError>;

    /// Every registered client, by id.
    async fn clients(&self) -> Result<Vec<ClientRecord>, StoreError>;

    /// Removes a registration; false if there was none.
    async fn remove_client(&self, id: &str) -> Result<bool, StoreError>;

    /// Records that client `client_id` used assertion id `jti`, which it may not use again
    /// before `expires_at`. False if it already did (a replay). Entries past their expiry are
    /// dropped on the way.
    async fn record_jti(
        &self,
        client_id: &str,
        jti: &str,
        expires_at: Micros,
        now: Micros,
    ) -> Result<bool, StoreError>;

    /// The access-token signing secret: the stored one, or `fresh` stored now if there is none
    /// yet. Every caller (and every process on the store) gets the same bytes.
    async fn signing_secret(&self, fresh: Vec<u8>) -> Result<Vec<u8>, StoreError>;
}
