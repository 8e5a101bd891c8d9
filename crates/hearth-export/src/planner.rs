//! Splitting a job into work units, largest first:
//! - system and `Patient/$export`: resource type × change-sequence range (the latter only
//!   resources in some patient's compartment);
//! - Group and `patient`: batches of patients × compartment types, driven by the compartment
//!   index (one query per batch, never one per patient);
//! - `organizeOutputBy=Patient`, at every level: batches of patients × compartment types,
//!   scanned block by block; at system and Patient level the patients are every Patient
//!   current at the snapshot. Deletions are planned as without it.

use hearth_fhir::compartment::{is_patient_compartment_type, patient_id_from_reference};
use hearth_fhir::instant::{Micros, parse_instant};
use hearth_fhir::resource_type::resource_types;
use hearth_store::jobs::{Snapshot, UnitKind, UnitPlan, UnitScope};
use hearth_store::{Backend, Seq, StoreError, StoredVersion};
use serde::Deserialize;

use crate::request::{ExportRequest, IgnoredParameter, Level};

/// Patients per unit of a Group or `patient` export.
pub const PATIENTS_PER_UNIT: usize = 500;

/// The units of a job and an upper bound on the resources it will write.
pub struct Plan {
    pub units: Vec<UnitPlan>,
    pub estimated_resources: u64,
    /// The change sequence number the export reads as of: the snapshot's, or earlier with
    /// `_until` (the versions current just before that instant).
    pub visible_seq: Seq,
    /// The patients a Group or `patient` export covers (empty otherwise).
    pub patients: Vec<String>,
    /// Reported in the manifest's `error` files (unknown patients, non-members).
    pub problems: Vec<IgnoredParameter>,
}

/// Why a job cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    GroupNotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The version of a resource that was current at `seq` (none if absent or deleted then).
async fn version_at(
    backend: &dyn Backend,
    resource_type: &str,
    id: &str,
    seq: Seq,
) -> Result<Option<StoredVersion>, StoreError> {
    let Some(newest) = backend.read(resource_type, id).await? else {
        return Ok(None);
    };
    let version = if newest.seq <= seq {
        Some(newest)
    } else {
        backend
            .history(resource_type, id, Some(newest.version), 1000)
            .await?
            .into_iter()
            .find(|v| v.seq <= seq)
    };
    Ok(version.filter(|v| !v.deleted))
}

#[derive(Deserialize)]
struct GroupMembers {
    #[serde(default)]
    member: Vec<Member>,
}

#[derive(Deserialize)]
struct Member {
    entity: Option<Reference>,
    #[serde(default)]
    inactive: bool,
    period: Option<Period>,
}

#[derive(Deserialize)]
struct Reference {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct Period {
    start: Option<String>,
    end: Option<String>,
}

/// The Group's active Patient members at `at` (`member.inactive` and `member.period` honoured;
/// members that are not Patients are skipped).
fn active_patient_members(group: &[u8], at: Micros) -> Vec<String> {
    let Ok(parsed) = serde_json::from_slice::<GroupMembers>(group) else {
        return Vec::new();
    };
    let bound = |value: &Option<String>, end: bool| -> Option<Micros> {
        let value = value.as_deref()?;
        parse_instant(value).ok().or_else(|| {
            hearth_fhir::instant::parse_date_range(value)
                .ok()
                .map(|r| if end { r.end } else { r.start })
        })
    };
    let mut members = Vec::new();
    for member in parsed.member {
        if member.inactive {
            continue;
        }
        if let Some(period) = &member.period {
            if bound(&period.start, false).is_some_and(|start| start > at) {
                continue;
            }
            if bound(&period.end, true).is_some_and(|end| end <= at) {
                continue;
            }
        }
        let id = member
            .entity
            .and_then(|e| e.reference)
            .and_then(|r| patient_id_from_reference(&r).map(str::to_owned));
        if let Some(id) = id
            && !members.contains(&id)
        {
            members.push(id);
        }
    }
    members
}

/// Whether `_type` asks for Provenance (or leaves it out, which asks for every type).
fn provenance_requested(request: &ExportRequest) -> bool {
    request.types.is_empty() || request.types.iter().any(|t| t == "Provenance")
}

/// Whether the job picks its Provenance by target after the other units (see
/// `UnitKind::Provenance`). Never for organized output: Provenance there is what each
/// patient's compartment holds (its target is the patient), inside the patient's block.
pub fn provenance_by_target(request: &ExportRequest) -> bool {
    if request.organize_output_by.is_some() {
        return false;
    }
    let provenance_requested = provenance_requested(request);
    let compartment_level = request.level != Level::System;
    if compartment_level {
        provenance_requested || request.relevant_provenance || request.latest_provenance
    } else {
        // Latest leaves out the Provenance that is not the latest of an exported resource, so
        // even a system export that asks for Provenance picks it by target then.
        request.latest_provenance || request.relevant_provenance && !provenance_requested
    }
}

/// Whether a `Patient/$export` of every patient that asks for Provenance exports the
/// Provenance in the compartments as a compartment type, in parallel with the rest (see
/// `RowPolicy`), rather than after everything else by its targets: such a Provenance is in a
/// compartment because it targets that Patient, and every existing Patient's compartment is
/// exported (no `_since` or `_until`, no filter on Patient, not only the latest Provenance), so
/// it only has to target one that exists.
pub fn compartment_provenance_exported(request: &ExportRequest) -> bool {
    let filters_patient = |queries: &[String]| queries.iter().any(|q| q.starts_with("Patient?"));
    provenance_requested(request)
        && provenance_by_target(request)
        && request.level == Level::Patient
        && request.patients.is_empty()
        && request.since.is_none()
        && request.until.is_none()
        && !request.latest_provenance
        && !filters_patient(&request.type_filters)
        && !filters_patient(&request.scope_filters)
}

/// Plans `request` against `snapshot`.
pub async fn plan(
    backend: &dyn Backend,
    request: &ExportRequest,
    snapshot: Snapshot,
    rows_per_unit: u64,
) -> Result<Plan, PlanError> {
    let since_seq = match request.since {
        Some(since) => backend.seq_at(since).await?.min(snapshot.seq),
        None => 0,
    };
    let upto = match request.until {
        Some(until) => backend.seq_at(until - 1).await?.min(snapshot.seq),
        None => snapshot.seq,
    };
    let mut problems = Vec::new();

    // The patients of a Group or `patient` export.
    let patients: Option<Vec<String>> = match &request.level {
        Level::System => None,
        Level::Patient if request.patients.is_empty() => None,
        Level::Patient => {
            let mut found = Vec::new();
            for id in &request.patients {
                if version_at(backend, "Patient", id, snapshot.seq)
                    .await?
                    .is_some()
                {
                    found.push(id.clone());
                } else {
                    problems.push(IgnoredParameter {
                        name: "patient".into(),
                        reason: format!("Patient/{id} does not exist; it was left out"),
                    });
                }
            }
            Some(found)
        }
        Level::Group(group_id) => {
            let group = version_at(backend, "Group", group_id, snapshot.seq)
                .await?
                .ok_or_else(|| {
                    PlanError::GroupNotFound(format!("Group/{group_id} does not exist"))
                })?;
            let members = active_patient_members(&group.body, snapshot.transaction_time);
            if request.patients.is_empty() {
                Some(members)
            } else {
                let mut chosen = Vec::new();
                for id in &request.patients {
                    if members.contains(id) {
                        chosen.push(id.clone());
                    } else {
                        problems.push(IgnoredParameter {
                            name: "patient".into(),
                            reason: format!("Patient/{id} is not an active member of Group/{group_id}; it was left out"),
                        });
                    }
                }
                Some(chosen)
            }
        }
    };

    let organized = request.organize_output_by.is_some();
    let compartment_level = request.level != Level::System;
    let mut types: Vec<String> = if request.types.is_empty() {
        backend.types_present(since_seq, upto).await?
    } else {
        request.types.clone()
    };
    if organized && request.relevant_provenance && !types.iter().any(|t| t == "Provenance") {
        types.push("Provenance".to_owned());
    }
    if compartment_level || organized {
        types.retain(|t| is_patient_compartment_type(t));
    }
    // Provenance that belongs with exported resources is chosen after them, by target (see
    // `UnitKind::Provenance`): for Patient and Group exports by default (the IG's "Provenance
    // whose target is in the compartment"), and whenever RelevantProvenanceResources is asked
    // for and `_type` does not export Provenance whole anyway.
    let provenance_by_target = provenance_by_target(request);
    let compartment_provenance_exported = compartment_provenance_exported(request);
    if provenance_by_target {
        types.retain(|t| t != "Provenance");
        if compartment_provenance_exported {
            types.push("Provenance".to_owned());
        }
    }

    let mut work = Work::default();
    if !types.is_empty() && upto > since_seq {
        let window = (since_seq, upto);
        let with_deletions = request.since.is_some();
        match &patients {
            Some(patients) => {
                // Types present at all keep the IN list short.
                let present = backend.types_present(since_seq, upto).await?;
                types.retain(|t| present.contains(t));
                work.patient_batches(backend, patients, &types, window, organized, with_deletions)
                    .await?;
            }
            None if organized => {
                let everyone = backend.current_ids("Patient", upto).await?;
                let present = backend.types_present(since_seq, upto).await?;
                let present_types: Vec<String> = types
                    .iter()
                    .filter(|t| present.contains(t))
                    .cloned()
                    .collect();
                work.patient_batches(backend, &everyone, &present_types, window, true, false)
                    .await?;
                if with_deletions {
                    // As without organizeOutputBy: the compartments' deletions by type.
                    work.type_ranges(
                        backend,
                        &types,
                        UnitScope::Compartment,
                        window,
                        rows_per_unit,
                        false,
                        true,
                    )
                    .await?;
                }
            }
            None => {
                let scope = if compartment_level {
                    UnitScope::Compartment
                } else {
                    UnitScope::All
                };
                work.type_ranges(
                    backend,
                    &types,
                    scope,
                    window,
                    rows_per_unit,
                    true,
                    with_deletions,
                )
                .await?;
            }
        }
    }
    let Work {
        mut sized,
        deletions,
        mut estimated_resources,
    } = work;
    // Largest first, so the last unit to finish is a small one.
    sized.sort_by_key(|(rows, _)| std::cmp::Reverse(*rows));
    let mut units: Vec<UnitPlan> = sized.into_iter().map(|(_, unit)| unit).collect();
    units.extend(deletions);
    if provenance_by_target && !units.is_empty() {
        let (count, first, last) = backend.type_range("Provenance", 0, upto).await?;
        let provenance_range = |scope: UnitScope, count: u64| {
            // Split like any type, so every worker takes a part.
            let pieces = count.div_ceil(rows_per_unit.max(1)).max(1) as i64;
            let start = first - 1;
            let width = last - start;
            (0..pieces).map(move |piece| UnitPlan {
                resource_type: "Provenance".to_owned(),
                kind: UnitKind::Provenance,
                scope: scope.clone(),
                seq_after: start + width * piece / pieces,
                seq_upto: start + width * (piece + 1) / pieces,
            })
        };
        match &patients {
            _ if count == 0 => {}
            // The latest Provenance of a resource is known only after seeing all of its
            // Provenance: one unit that reads the type twice (see `RowPolicy`).
            _ if request.latest_provenance => {
                estimated_resources += count;
                units.extend(provenance_range(UnitScope::All, 1));
            }
            // A Provenance whose target is one of the job's resources is in that patient's
            // compartment when it also targets the patient (as Synthea's and most systems'
            // do), or else usually in no compartment at all: look in those two places, so the
            // work follows the job's patients rather than the store's size.
            // The compartments' Provenance is exported like any compartment type: only the
            // Provenance outside every compartment needs its targets checked.
            None if compartment_provenance_exported => {
                units.extend(provenance_range(UnitScope::Outside, 1));
            }
            Some(patients) => {
                for batch in patients.chunks(PATIENTS_PER_UNIT) {
                    units.push(UnitPlan {
                        resource_type: "Provenance".to_owned(),
                        kind: UnitKind::Provenance,
                        scope: UnitScope::Patients(batch.to_vec()),
                        seq_after: 0,
                        seq_upto: upto,
                    });
                }
                // (Their Provenance is already counted in the batches' compartment rows.)
                units.extend(provenance_range(UnitScope::Outside, 1));
            }
            None => {
                estimated_resources += count;
                units.extend(provenance_range(UnitScope::All, count));
            }
        }
    }
    Ok(Plan {
        units,
        estimated_resources,
        visible_seq: upto,
        patients: patients.unwrap_or_default(),
        problems,
    })
}

/// Units being planned: output units with their estimated size, then deletion units.
#[derive(Default)]
struct Work {
    sized: Vec<(u64, UnitPlan)>,
    deletions: Vec<UnitPlan>,
    estimated_resources: u64,
}

impl Work {
    /// Batches of patients × `types`, one compartment-index count per batch. `blocks`: the
    /// output units are scanned block by block (organized output).
    async fn patient_batches(
        &mut self,
        backend: &dyn Backend,
        patients: &[String],
        types: &[String],
        (since_seq, upto): (Seq, Seq),
        blocks: bool,
        with_deletions: bool,
    ) -> Result<(), StoreError> {
        if types.is_empty() || patients.is_empty() {
            return Ok(());
        }
        let type_list = types.join(",");
        for batch in patients.chunks(PATIENTS_PER_UNIT) {
            let estimate = backend.compartment_rows(batch, since_seq, upto).await?;
            self.estimated_resources += estimate;
            let scope = if blocks {
                UnitScope::PatientBlocks(batch.to_vec())
            } else {
                UnitScope::Patients(batch.to_vec())
            };
            self.sized.push((
                estimate,
                UnitPlan {
                    resource_type: type_list.clone(),
                    kind: UnitKind::Output,
                    scope,
                    seq_after: since_seq,
                    seq_upto: upto,
                },
            ));
            if with_deletions {
                self.deletions.push(UnitPlan {
                    resource_type: type_list.clone(),
                    kind: UnitKind::Deleted,
                    scope: UnitScope::Patients(batch.to_vec()),
                    seq_after: since_seq,
                    seq_upto: upto,
                });
            }
        }
        Ok(())
    }

    /// Resource type × change-sequence range units, split to about `rows_per_unit` each.
    #[allow(clippy::too_many_arguments)]
    async fn type_ranges(
        &mut self,
        backend: &dyn Backend,
        types: &[String],
        scope: UnitScope,
        (since_seq, upto): (Seq, Seq),
        rows_per_unit: u64,
        with_output: bool,
        with_deletions: bool,
    ) -> Result<(), StoreError> {
        for resource_type in types {
            let (count, first, last) = backend.type_range(resource_type, since_seq, upto).await?;
            if count == 0 {
                continue;
            }
            let start = first - 1;
            if with_output {
                self.estimated_resources += count;
                let pieces = count.div_ceil(rows_per_unit.max(1)) as i64;
                let width = last - start;
                for piece in 0..pieces {
                    self.sized.push((
                        count / pieces as u64,
                        UnitPlan {
                            resource_type: resource_type.clone(),
                            kind: UnitKind::Output,
                            scope: scope.clone(),
                            seq_after: start + width * piece / pieces,
                            seq_upto: start + width * (piece + 1) / pieces,
                        },
                    ));
                }
            }
            if with_deletions {
                self.deletions.push(UnitPlan {
                    resource_type: resource_type.clone(),
                    kind: UnitKind::Deleted,
                    scope: scope.clone(),
                    seq_after: start,
                    seq_upto: last,
                });
            }
        }
        Ok(())
    }
}

/// Every R4 type whose resources can be in a patient's compartment.
pub fn compartment_types() -> impl Iterator<Item = &'static str> {
    resource_types()
        .iter()
        .copied()
        .filter(|t| is_patient_compartment_type(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_members_honour_inactive_and_period() {
        let group = br#"{"resourceType":"Group","member":[
            {"entity":{"reference":"Patient/a"}},
            {"entity":{"reference":"Patient/b"},"inactive":true},
            {"entity":{"reference":"Patient/c"},"period":{"end":"2020-01-01"}},
            {"entity":{"reference":"Patient/d"},"period":{"start":"2030-01-01T00:00:00Z"}},
            {"entity":{"reference":"Practitioner/e"}},
            {"entity":{"reference":"Patient/f"},"period":{"start":"2020-01-01","end":"2030-01-01"}}
        ]}"#;
        let at = parse_instant("2025-06-01T00:00:00Z").unwrap();
        assert_eq!(active_patient_members(group, at), ["a", "f"]);
    }
}
