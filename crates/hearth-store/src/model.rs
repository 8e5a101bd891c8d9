//! What goes into the store and what comes out of it.

use hearth_fhir::envelope::PreparedResource;
use hearth_fhir::instant::Micros;

/// A change sequence number: the position of a write in the store's total order.
pub type Seq = i64;

/// One write.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Create or update. An update whose content equals the current version writes nothing.
    Put {
        resource: PreparedResource,
        /// `If-Match`: the version the client believes is current.
        if_match: Option<u64>,
    },
    /// Write a tombstone version, unless the resource is absent or already deleted.
    Delete {
        resource_type: &'static str,
        id: String,
        if_match: Option<u64>,
    },
}

/// How a batch of operations commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// All or nothing (FHIR `transaction`).
    Atomic,
    /// Each operation on its own (FHIR `batch`, bulk load).
    Independent,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Created,
    Updated,
    /// The content equalled the current version; nothing was written.
    Unchanged,
    Deleted,
    /// Delete of a resource that does not exist or is already deleted.
    NotPresent,
}

/// The result of one successful write operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub resource_type: &'static str,
    pub id: String,
    pub kind: WriteKind,
    /// The version now current (0 when `NotPresent` and the resource never existed).
    pub version: u64,
    pub last_updated: Micros,
    pub seq: Seq,
}

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    pub last_updated: Micros,
    pub seq: Seq,
    pub deleted: bool,
    /// The resource as stored (empty for a tombstone).
    pub body: Vec<u8>,
}

/// A search over the current resources of one type, paged by change sequence (keyset).
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    pub resource_type: String,
    /// `_id`: any of these ids (empty: no restriction).
    pub ids: Vec<String>,
    /// Only resources whose `lastUpdated` is later than this.
    pub updated_after: Option<Micros>,
    /// Only resources whose `lastUpdated` is earlier than this.
    pub updated_before: Option<Micros>,
    /// Keyset cursor: only resources written after this sequence number.
    pub after_seq: Seq,
    /// Page size; 0 asks for the total only.
    pub count: usize,
    /// Count all matches as well.
    pub total: bool,
    /// Search parameters beyond `_id` and `_lastUpdated`, evaluated on each resource.
    pub filter: Option<std::sync::Arc<hearth_fhir::search::Filter>>,
}

/// One page of search results.
#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    pub resources: Vec<StoredVersion>,
    pub total: Option<u64>,
    /// The cursor for the next page, when there is one.
    pub next_after_seq: Option<Seq>,
}

/// The outcome of a write that a store has taken but may not have committed yet (see
/// [`crate::Store::write_queued`]).
pub struct PendingWrite(
    tokio::sync::oneshot::Receiver<
        Result<Vec<Result<Written, crate::WriteError>>, crate::StoreError>,
    >,
);

impl PendingWrite {
    /// A write that is already decided.
    pub fn done(
        result: Result<Vec<Result<Written, crate::WriteError>>, crate::StoreError>,
    ) -> Self {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let _ = sender.send(result);
        Self(receiver)
    }

    pub(crate) fn waiting(
        receiver: tokio::sync::oneshot::Receiver<
            Result<Vec<Result<Written, crate::WriteError>>, crate::StoreError>,
        >,
    ) -> Self {
        Self(receiver)
    }

    /// Waits for the commit: the results of [`crate::Store::write`] in
    /// [`BatchMode::Independent`].
    pub async fn committed(
        self,
    ) -> Result<Vec<Result<Written, crate::WriteError>>, crate::StoreError> {
        self.0.await.map_err(|_| crate::StoreError::Closed)?
    }
}

/// The `If-Match` rule both backends apply: the expected version must be the live (not deleted)
/// current one.
pub(crate) fn check_if_match(
    expected: Option<u64>,
    live: Option<u64>,
) -> Result<(), crate::WriteError> {
    match expected {
        Some(expected) if live != Some(expected) => Err(crate::WriteError::VersionConflict {
            expected,
            current: live,
        }),
        _ => Ok(()),
    }
}
