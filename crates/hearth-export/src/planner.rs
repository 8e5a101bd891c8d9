//! Splitting a job into work units: (resource type × change-sequence range), largest first.

use hearth_store::jobs::{Snapshot, UnitKind, UnitPlan};
use hearth_store::{Backend, Seq, StoreError};

use crate::request::ExportRequest;

/// The units of a job and an upper bound on the resources it will write.
pub struct Plan {
    pub units: Vec<UnitPlan>,
    pub estimated_resources: u64,
    /// The change sequence number the export reads as of: the snapshot's, or earlier with
    /// `_until` (the versions current just before that instant).
    pub visible_seq: Seq,
}

/// Plans `request` against `snapshot`. Ranges are cut from the index counts, so units of one
/// type run in parallel and a crash redoes one unit, not the type.
pub async fn plan(
    backend: &dyn Backend,
    request: &ExportRequest,
    snapshot: Snapshot,
    rows_per_unit: u64,
) -> Result<Plan, StoreError> {
    let since_seq = match request.since {
        Some(since) => backend.seq_at(since).await?.min(snapshot.seq),
        None => 0,
    };
    let upto = match request.until {
        Some(until) => backend.seq_at(until - 1).await?.min(snapshot.seq),
        None => snapshot.seq,
    };
    let types = if request.types.is_empty() {
        backend.types_present(since_seq, upto).await?
    } else {
        request.types.clone()
    };

    let mut sized = Vec::new();
    let mut deletions = Vec::new();
    let mut estimated_resources = 0;
    for resource_type in types {
        if upto <= since_seq {
            break;
        }
        let (count, first, last) = backend.type_range(&resource_type, since_seq, upto).await?;
        if count == 0 {
            continue;
        }
        estimated_resources += count;
        let pieces = count.div_ceil(rows_per_unit.max(1)) as i64;
        let start = first - 1;
        let width = last - start;
        for piece in 0..pieces {
            let after = start + width * piece / pieces;
            let upto_piece = start + width * (piece + 1) / pieces;
            sized.push((
                count / pieces as u64,
                UnitPlan {
                    resource_type: resource_type.clone(),
                    kind: UnitKind::Output,
                    seq_after: after,
                    seq_upto: upto_piece,
                },
            ));
        }
        if request.since.is_some() {
            deletions.push(UnitPlan {
                resource_type,
                kind: UnitKind::Deleted,
                seq_after: start,
                seq_upto: last,
            });
        }
    }
    // Largest first, so the last unit to finish is a small one.
    sized.sort_by_key(|(rows, _)| std::cmp::Reverse(*rows));
    let mut units: Vec<UnitPlan> = sized.into_iter().map(|(_, unit)| unit).collect();
    units.extend(deletions);
    Ok(Plan {
        units,
        estimated_resources,
        visible_seq: upto,
    })
}
