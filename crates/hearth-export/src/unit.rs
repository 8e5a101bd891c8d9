//! What a worker does with each row of a unit: choose (de-duplicate, filter), shape
//! (`_elements`), and route it to the file of its type.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use hearth_fhir::envelope::{compartment_of_body, subset_elements};
use hearth_fhir::instant::{Micros, parse_instant, write_instant};
use hearth_fhir::search::Filter;
use hearth_store::jobs::{ClaimedUnit, ScanRow, UnitKind, UnitScope};
use hearth_store::resource_key;
use serde::Deserialize;

use crate::files::{BlockWriter, RollingWriter, WrittenFile};
use crate::request::ExportRequest;

/// Row-level decisions for one unit, derived from the job's request.
pub struct RowPolicy<'a> {
    request: &'a ExportRequest,
    /// Keys of the job's patients (Group and `patient` exports), built when first needed.
    job_patients: Option<HashSet<i64>>,
    /// Rows in several compartments seen in this unit, by seq: the patient key of the route
    /// that writes them.
    first_routes: HashMap<hearth_store::Seq, Option<i64>>,
    /// For a Provenance unit: the keys of every resource the job exported, sorted.
    exported: Option<Vec<i64>>,
    /// Keys of the Patients that exist at the snapshot, for a unit that exports the
    /// compartments' Provenance as a compartment type (see
    /// `planner::compartment_provenance_exported`).
    existing_patients: Option<Vec<i64>>,
    /// `LatestProvenanceResources`: which Provenance are the latest of an exported resource.
    latest_provenance: Option<LatestProvenance>,
    /// `_typeFilter`: per type, the filters of which a resource must match one.
    type_filters: FiltersByType,
    /// The access token's granular scopes: per type, the filters of which a resource must
    /// match one, deletions included.
    scope_filters: FiltersByType,
}

type FiltersByType = HashMap<&'static str, Vec<Filter>>;

/// `Type?params` queries (checked at kick-off) grouped by type. A query that no longer parses
/// selects nothing rather than everything.
fn filters_by_type(queries: &[String]) -> FiltersByType {
    let mut by_type = FiltersByType::new();
    for query in queries {
        match Filter::parse_type_filter(query) {
            Ok((resource_type, filter)) => by_type.entry(resource_type).or_default().push(filter),
            Err(_) => {
                if let Some((type_name, _)) = query.split_once('?')
                    && let Some(resource_type) =
                        hearth_fhir::resource_type::canonical_resource_type(type_name)
                {
                    by_type.entry(resource_type).or_default();
                }
            }
        }
    }
    by_type
}

fn passes(filters: &FiltersByType, resource_type: &str, body: &[u8]) -> bool {
    filters
        .get(resource_type)
        .is_none_or(|any_of| any_of.iter().any(|f| f.matches_bytes(body)))
}

impl<'a> RowPolicy<'a> {
    pub fn new(request: &'a ExportRequest) -> Self {
        Self {
            request,
            job_patients: None,
            first_routes: HashMap::new(),
            exported: None,
            existing_patients: None,
            latest_provenance: request.latest_provenance.then(LatestProvenance::default),
            type_filters: filters_by_type(&request.type_filters),
            scope_filters: filters_by_type(&request.scope_filters),
        }
    }

    /// Whether the row belongs in the output of this unit.
    pub fn keep(&mut self, unit: &ClaimedUnit, row: &ScanRow<'_>) -> bool {
        if !self.selects(unit, row) {
            return false;
        }
        match &self.latest_provenance {
            Some(latest) if unit.kind == UnitKind::Provenance => latest.winners.contains(&row.seq),
            _ => true,
        }
    }

    /// [`RowPolicy::keep`] before the choice of the latest Provenance.
    fn selects(&mut self, unit: &ClaimedUnit, row: &ScanRow<'_>) -> bool {
        if let UnitScope::Patients(_) = unit.scope
            && row.compartment_size > 1
            && !self.is_first_route(row)
        {
            return false;
        }
        if !passes(&self.scope_filters, row.resource_type, row.body) {
            return false;
        }
        if unit.kind != UnitKind::Deleted
            && !passes(&self.type_filters, row.resource_type, row.body)
        {
            return false;
        }
        if unit.kind == UnitKind::Provenance {
            return self
                .exported
                .as_ref()
                .is_some_and(|exported| provenance_targets_any(row.body, exported));
        }
        if let Some(patients) = &self.existing_patients
            && row.resource_type == "Provenance"
        {
            return names_a_patient_of(row.body, patients);
        }
        true
    }

    /// Prepares a unit that exports the compartments' Provenance as a compartment type: a
    /// Provenance is kept when one of its targets is an existing Patient (`keys` sorted).
    pub fn set_existing_patients(&mut self, keys: Vec<i64>) {
        self.existing_patients = Some(keys);
    }

    /// The first of a Provenance unit's two passes under `LatestProvenanceResources`: notes,
    /// for every exported resource this Provenance targets, whether it is the latest seen
    /// (by `recorded`, then by change sequence). The second pass ([`RowPolicy::keep`]) writes
    /// the Provenance that are the latest of some resource.
    pub fn note_latest_provenance(&mut self, unit: &ClaimedUnit, row: &ScanRow<'_>) {
        if !self.selects(unit, row) {
            return;
        }
        let (Some(exported), Some(latest)) = (&self.exported, &mut self.latest_provenance) else {
            return;
        };
        let Ok(parsed) = serde_json::from_slice::<ProvenanceTargets>(row.body) else {
            return;
        };
        let recorded = parsed
            .recorded
            .as_deref()
            .and_then(|r| parse_instant(r).ok())
            .unwrap_or(Micros::MIN);
        let rank = (recorded, row.seq);
        for key in target_keys(&parsed) {
            if exported.binary_search(&key).is_ok() {
                let best = latest.by_target.entry(key).or_insert(rank);
                if rank > *best {
                    *best = rank;
                }
            }
        }
    }

    /// Ends the first pass of [`RowPolicy::note_latest_provenance`].
    pub fn settle_latest_provenance(&mut self) {
        if let Some(latest) = &mut self.latest_provenance {
            latest.winners = latest.by_target.values().map(|&(_, seq)| seq).collect();
            latest.by_target = HashMap::new();
        }
    }

    /// A resource in the compartments of several of the job's patients is found once per
    /// patient, possibly in different units: only the route through the smallest patient key
    /// writes it, so it is exported exactly once.
    fn is_first_route(&mut self, row: &ScanRow<'_>) -> bool {
        let job = self.job_patients.get_or_insert_with(|| {
            self.request
                .resolved_patients
                .iter()
                .map(|p| resource_key("Patient", p))
                .collect()
        });
        // A row in many compartments (a Group lists all its members) comes once per member:
        // work its first route out once.
        let smallest = *self.first_routes.entry(row.seq).or_insert_with(|| {
            // (For a tombstone the store passes the body of the version it ended.)
            compartment_of_body(row.resource_type, row.body)
                .iter()
                .map(|p| resource_key("Patient", p))
                .filter(|key| job.contains(key))
                .min()
        });
        smallest.is_none_or(|key| key == row.via_patient)
    }

    /// The bytes to write: trimmed by `_elements`, or the stored bytes unchanged.
    pub fn shape<'b>(&self, resource_type: &str, body: &'b [u8]) -> std::borrow::Cow<'b, [u8]> {
        if self.request.elements.is_empty() {
            return std::borrow::Cow::Borrowed(body);
        }
        let applies = self.request.elements.iter().any(|e| {
            e.resource_type
                .as_deref()
                .is_none_or(|t| t == resource_type)
        });
        if !applies {
            return std::borrow::Cow::Borrowed(body);
        }
        let keep = |element: &str| {
            self.request.elements.iter().any(|e| {
                e.resource_type
                    .as_deref()
                    .is_none_or(|t| t == resource_type)
                    && (e.element == element || e.element.strip_suffix("[x]") == Some(element))
            })
        };
        match subset_elements(resource_type, body, &keep) {
            Some(trimmed) => std::borrow::Cow::Owned(trimmed),
            None => std::borrow::Cow::Borrowed(body),
        }
    }
}

/// What the Provenance steps read of a Provenance, borrowed from its bytes where they hold no
/// escapes (every Provenance of the store may pass through here).
#[derive(Deserialize)]
struct ProvenanceTargets<'a> {
    #[serde(default, borrow)]
    target: Vec<TargetReference<'a>>,
    #[serde(borrow)]
    recorded: Option<Cow<'a, str>>,
}

/// `LatestProvenanceResources` state of a Provenance unit.
#[derive(Default)]
struct LatestProvenance {
    /// First pass: per exported resource key, the (recorded, seq) of its latest Provenance.
    by_target: HashMap<i64, (Micros, hearth_store::Seq)>,
    /// Second pass: the Provenance to write.
    winners: HashSet<hearth_store::Seq>,
}

/// The resource keys of a Provenance's `target` references (`Type/id`, also absolute).
fn target_keys<'p>(parsed: &'p ProvenanceTargets<'_>) -> impl Iterator<Item = i64> + 'p {
    parsed
        .target
        .iter()
        .filter_map(|t| t.reference.as_deref())
        .filter_map(|reference| {
            let mut segments = reference.rsplit('/');
            let (id, target_type) = (segments.next()?, segments.next()?);
            Some(resource_key(target_type, id))
        })
}

#[derive(Deserialize)]
struct TargetReference<'a> {
    #[serde(borrow)]
    reference: Option<Cow<'a, str>>,
}

/// Whether a Provenance in some patient's compartment (so with a Patient among its targets)
/// references one of `patients` (sorted keys). Every Provenance of a `Patient/$export` passes
/// here, so the references are found in the bytes rather than by parsing the resource; one
/// with escaped slashes is parsed.
fn names_a_patient_of(body: &[u8], patients: &[i64]) -> bool {
    const PATIENT: &[u8] = b"Patient/";
    if memchr::memmem::find(body, b"\\/").is_some() {
        return provenance_targets_any(body, patients);
    }
    memchr::memmem::find_iter(body, PATIENT).any(|at| {
        let rest = &body[at + PATIENT.len()..];
        let end = rest
            .iter()
            .position(|&b| b == b'"' || b == b'/')
            .unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end])
            .is_ok_and(|id| patients.binary_search(&resource_key("Patient", id)).is_ok())
    })
}

fn provenance_targets_any(body: &[u8], exported: &[i64]) -> bool {
    let Ok(parsed) = serde_json::from_slice::<ProvenanceTargets>(body) else {
        return false;
    };
    target_keys(&parsed).any(|key| exported.binary_search(&key).is_ok())
}

impl RowPolicy<'_> {
    /// Prepares a Provenance unit from the key files the job's output units left (see
    /// [`UnitFiles::record`]).
    pub fn load_exported(&mut self, key_files: &[std::path::PathBuf]) -> std::io::Result<()> {
        use std::io::Read;
        let mut keys = Vec::new();
        for path in key_files {
            let mut reader = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
            let mut key = [0u8; 8];
            loop {
                match reader.read_exact(&mut key) {
                    Ok(()) => keys.push(i64::from_le_bytes(key)),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        self.exported = Some(keys);
        Ok(())
    }
}

/// The files of one unit: one rolling writer per resource type (or one for deletions), or the
/// block files of organized output.
pub struct UnitFiles<'d> {
    dir: &'d Path,
    prefix: String,
    max_bytes: u64,
    writers: BTreeMap<String, RollingWriter>,
    /// Organized output: the group the files are recorded under, and their writer.
    blocks: Option<(String, BlockWriter)>,
    /// The keys of the resources written, when the job later picks Provenance by target:
    /// 8 bytes a resource beside the NDJSON, so that step never re-reads the output.
    keys: Option<std::io::BufWriter<std::fs::File>>,
}

/// The sidecar file of a unit attempt's written resource keys (little-endian `i64`s).
pub fn keys_file_name(unit_no: i64, attempt: i64) -> String {
    format!("u{unit_no}-a{attempt}.keys")
}

impl<'d> UnitFiles<'d> {
    pub fn new(
        dir: &'d Path,
        unit: &ClaimedUnit,
        max_bytes: u64,
        record_keys: bool,
    ) -> std::io::Result<Self> {
        let keys = if record_keys {
            let file = std::fs::File::create(dir.join(keys_file_name(unit.unit_no, unit.attempt)))?;
            Some(std::io::BufWriter::with_capacity(1 << 16, file))
        } else {
            None
        };
        Ok(Self {
            dir,
            prefix: format!("u{}-a{}", unit.unit_no, unit.attempt),
            max_bytes,
            writers: BTreeMap::new(),
            blocks: None,
            keys,
        })
    }

    /// Notes that the resource `resource_type/id` was written.
    pub fn record(&mut self, resource_type: &str, id: &str) -> std::io::Result<()> {
        use std::io::Write;
        match self.keys.as_mut() {
            Some(keys) => keys.write_all(&resource_key(resource_type, id).to_le_bytes()),
            None => Ok(()),
        }
    }

    /// Appends a line to the file of `group` (a resource type, or `Bundle` for deletions).
    pub fn write(&mut self, group: &str, line: &[u8]) -> std::io::Result<()> {
        if !self.writers.contains_key(group) {
            let writer =
                RollingWriter::new(self.dir, format!("{}-{group}", self.prefix), self.max_bytes);
            self.writers.insert(group.to_owned(), writer);
        }
        match self.writers.get_mut(group) {
            Some(writer) => writer.write_line(line),
            None => Ok(()),
        }
    }

    /// Starts a block of organized output in the files of `group` (the organizing type).
    pub fn start_block(&mut self, group: &str, header: &[u8]) -> std::io::Result<()> {
        let (_, writer) = self.blocks.get_or_insert_with(|| {
            let writer =
                BlockWriter::new(self.dir, format!("{}-{group}", self.prefix), self.max_bytes);
            (group.to_owned(), writer)
        });
        writer.start_block(header)
    }

    /// Appends a line to the block [`UnitFiles::start_block`] started last.
    pub fn write_in_block(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self.blocks.as_mut() {
            Some((_, writer)) => writer.write_line(line),
            None => Err(std::io::Error::other(
                "a block line before any block header",
            )),
        }
    }

    /// Every file written, with the group it belongs to.
    pub fn finish(self) -> std::io::Result<Vec<(String, WrittenFile)>> {
        if let Some(keys) = self.keys {
            keys.into_inner().map_err(|e| e.into_error())?;
        }
        let mut files = Vec::new();
        for (group, writer) in self.writers {
            files.extend(writer.finish()?.into_iter().map(|f| (group.clone(), f)));
        }
        if let Some((group, writer)) = self.blocks {
            files.extend(writer.finish()?.into_iter().map(|f| (group.clone(), f)));
        }
        Ok(files)
    }

    pub fn discard(self) {
        drop(self.keys);
        for writer in self.writers.into_values() {
            writer.discard();
        }
        if let Some((_, writer)) = self.blocks {
            writer.discard();
        }
    }
}

/// The header line of the block of `resource_type/id` (`organizeOutputBy`): a `Parameters`
/// whose `header` parameter references the resource.
pub fn block_header(resource_type: &str, id: &str, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(
        br#"{"resourceType":"Parameters","parameter":[{"name":"header","valueReference":{"reference":"#,
    );
    // serde_json escapes whatever an id might hold; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &format!("{resource_type}/{id}"));
    out.extend_from_slice(b"}}]}");
}

/// A `deleted` line: a transaction Bundle with one DELETE entry.
pub fn deletion_bundle(resource_type: &str, id: &str, deleted_at: Micros, out: &mut Vec<u8>) {
    let mut text = String::with_capacity(160);
    text.push_str(r#"{"resourceType":"Bundle","type":"transaction","meta":{"lastUpdated":""#);
    write_instant(deleted_at, &mut text);
    text.push_str(r#""},"entry":[{"request":{"method":"DELETE","url":""#);
    // Types and ids are plain FHIR tokens: nothing to escape.
    text.push_str(resource_type);
    text.push('/');
    text.push_str(id);
    text.push_str(r#""}}]}"#);
    out.clear();
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_lines_are_transaction_bundles() {
        let mut line = Vec::new();
        deletion_bundle("Patient", "p-1", 0, &mut line);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["type"], "transaction");
        assert_eq!(value["entry"][0]["request"]["method"], "DELETE");
        assert_eq!(value["entry"][0]["request"]["url"], "Patient/p-1");
    }

    #[test]
    fn block_headers_reference_the_blocks_resource() {
        let mut line = Vec::new();
        block_header("Patient", "p-1", &mut line);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            r#"{"resourceType":"Parameters","parameter":[{"name":"header","valueReference":{"reference":"Patient/p-1"}}]}"#
        );
    }

    #[test]
    fn compartment_provenance_is_kept_when_it_names_an_existing_patient() {
        let existing = {
            let mut keys = vec![resource_key("Patient", "p1"), resource_key("Patient", "p2")];
            keys.sort_unstable();
            keys
        };
        for (body, kept) in [
            (&br#"{"resourceType":"Provenance","target":[{"reference":"Observation/o"},{"reference":"Patient/p2"}]}"#[..], true),
            (br#"{"resourceType":"Provenance","target":[{"reference":"http://h/fhir/Patient/p1/_history/3"}]}"#, true),
            (br#"{"resourceType":"Provenance","target":[{"reference":"Patient/gone"}]}"#, false),
            (br#"{"resourceType":"Provenance","target":[{"reference":"Patient\/p1"}]}"#, true),
            (br#"{"resourceType":"Provenance","target":[{"reference":"Patient\/gone"}]}"#, false),
        ] {
            assert_eq!(
                names_a_patient_of(body, &existing),
                kept,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn provenance_relevance_reads_target_references() {
        let body = br#"{"resourceType":"Provenance","target":[{"reference":"Encounter/1"},{"reference":"http://x/fhir/Observation/2"}]}"#;
        let mut exported = vec![
            resource_key("Observation", "2"),
            resource_key("Patient", "9"),
        ];
        exported.sort_unstable();
        assert!(provenance_targets_any(body, &exported));
        assert!(!provenance_targets_any(
            body,
            &[resource_key("Observation", "3")]
        ));
    }
}
