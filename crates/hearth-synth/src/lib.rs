//! Deterministic synthetic FHIR R4 populations for demos and benchmarks.
//!
//! [`generate`] streams a Synthea-like population resource by resource:
//! first the shared Organizations and Practitioners, then each patient with
//! all of their clinical resources, then a few Groups. Nothing about the
//! population is kept in memory beyond the patient currently being written,
//! so millions of resources cost the same memory as ten.
//!
//! Output is a pure function of [`SynthConfig`]: patient `i` is generated
//! from its own ChaCha8 stream keyed by `(seed, i)`, and every id is a keyed
//! bijection of a per-type ordinal (see `ids`), so runs are byte-identical
//! across platforms and any patient's id can be recomputed on demand.

mod codes;
mod fhir;
mod groups;
mod ids;
mod json;
mod patient;
mod pool;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use ids::IdKey;
use json::Id;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthConfig {
    /// Number of patients (each brings ~300 resources on average).
    pub patients: u64,
    /// Seed; the same config always produces byte-identical output.
    pub seed: u64,
}

/// Counts of what was generated.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Resources per resource type.
    pub by_type: BTreeMap<&'static str, u64>,
    /// Total number of resources.
    pub resources: u64,
    /// From [`generate`]: total JSON bytes passed to `emit`. From
    /// [`write_ndjson_dir`]: bytes written to the files (including newlines).
    pub bytes: u64,
}

/// Calls `emit(resource_type, json)` once per resource; `json` is one compact JSON object (no newline).
///
/// Order: Organizations, Practitioners, then each patient's resources
/// (Patient first, referenced resources before the resources that cite
/// them), then Groups.
///
/// # Errors
///
/// The first error returned by `emit` stops generation and is returned.
pub fn generate(
    config: &SynthConfig,
    emit: &mut dyn FnMut(&'static str, &[u8]) -> io::Result<()>,
) -> io::Result<Summary> {
    let ctx = Ctx::new(config);
    let mut sink = Sink {
        emit,
        counts: [0; Rt::COUNT],
        bytes: 0,
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    for k in 0..ctx.pool {
        buf.clear();
        pool::organization(&ctx, k, &mut buf);
        sink.put(Rt::Organization, &buf)?;
    }
    for k in 0..ctx.pool {
        buf.clear();
        pool::practitioner(&ctx, k, &mut buf);
        sink.put(Rt::Practitioner, &buf)?;
    }
    let mut patients = patient::PatientGen::new(&ctx);
    for i in 0..ctx.patients {
        patients.generate(i, &mut buf, &mut sink)?;
    }
    groups::emit(&ctx, &mut buf, &mut sink)?;
    Ok(sink.summary())
}

/// Writes `<Type>.ndjson` files (one compact resource per line, `\n` ends) into `dir` (created if missing), buffered.
///
/// Only types that occur get a file; an existing file of the same name is
/// replaced.
///
/// # Errors
///
/// Any error creating the directory or creating, writing or flushing a file.
pub fn write_ndjson_dir(config: &SynthConfig, dir: &Path) -> io::Result<Summary> {
    fs::create_dir_all(dir)?;
    // At most 13 types: a linear scan beats hashing the name per resource.
    let mut files: Vec<(&'static str, BufWriter<File>)> = Vec::with_capacity(Rt::COUNT);
    let mut summary = generate(config, &mut |rt, json| {
        let idx = match files.iter().position(|(name, _)| *name == rt) {
            Some(idx) => idx,
            None => {
                let file = File::create(dir.join(format!("{rt}.ndjson")))?;
                files.push((rt, BufWriter::with_capacity(256 * 1024, file)));
                files.len() - 1
            }
        };
        let (_, out) = &mut files[idx];
        out.write_all(json)?;
        out.write_all(b"\n")
    })?;
    // Flush explicitly: BufWriter's drop would swallow a late write error.
    for (_, mut out) in files {
        out.flush()?;
    }
    summary.bytes += summary.resources;
    Ok(summary)
}

/// Resource types the generator emits; the discriminant indexes counters
/// and id keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rt {
    Organization,
    Practitioner,
    Patient,
    Encounter,
    Condition,
    Observation,
    DiagnosticReport,
    Procedure,
    MedicationRequest,
    Immunization,
    DocumentReference,
    Provenance,
    Group,
}

impl Rt {
    const COUNT: usize = 13;
    const ALL: [Rt; Rt::COUNT] = [
        Rt::Organization,
        Rt::Practitioner,
        Rt::Patient,
        Rt::Encounter,
        Rt::Condition,
        Rt::Observation,
        Rt::DiagnosticReport,
        Rt::Procedure,
        Rt::MedicationRequest,
        Rt::Immunization,
        Rt::DocumentReference,
        Rt::Provenance,
        Rt::Group,
    ];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Rt::Organization => "Organization",
            Rt::Practitioner => "Practitioner",
            Rt::Patient => "Patient",
            Rt::Encounter => "Encounter",
            Rt::Condition => "Condition",
            Rt::Observation => "Observation",
            Rt::DiagnosticReport => "DiagnosticReport",
            Rt::Procedure => "Procedure",
            Rt::MedicationRequest => "MedicationRequest",
            Rt::Immunization => "Immunization",
            Rt::DocumentReference => "DocumentReference",
            Rt::Provenance => "Provenance",
            Rt::Group => "Group",
        }
    }
}

/// Everything derived from the config that generation of any part needs.
pub(crate) struct Ctx {
    pub(crate) seed: u64,
    pub(crate) patients: u64,
    /// Number of Organizations, and of Practitioners (one per organization).
    pub(crate) pool: u64,
    keys: [IdKey; Rt::COUNT],
    /// Key for hash-derived attributes of pooled resources, which patients
    /// need (names for reference displays) without generating the resource.
    pub(crate) attr_key: u64,
}

impl Ctx {
    fn new(config: &SynthConfig) -> Self {
        let seed = config.seed;
        let patients = config.patients;
        let pool = if patients == 0 {
            0
        } else {
            patients.div_ceil(10)
        };
        Self {
            seed,
            patients,
            pool,
            keys: Rt::ALL.map(|rt| IdKey::new(seed, rt as u64 + 1)),
            attr_key: ids::mix64(seed ^ 0x6a09_e667_f3bc_c908),
        }
    }

    #[inline]
    pub(crate) fn id(&self, rt: Rt, ordinal: u64) -> Id {
        self.keys[rt as usize].id(ordinal)
    }
}

/// Counts resources on their way to the caller's `emit`.
pub(crate) struct Sink<'a> {
    emit: &'a mut dyn FnMut(&'static str, &[u8]) -> io::Result<()>,
    counts: [u64; Rt::COUNT],
    bytes: u64,
}

impl Sink<'_> {
    #[inline]
    pub(crate) fn put(&mut self, rt: Rt, json: &[u8]) -> io::Result<()> {
        self.counts[rt as usize] += 1;
        self.bytes += json.len() as u64;
        (self.emit)(rt.name(), json)
    }

    fn summary(&self) -> Summary {
        let by_type: BTreeMap<&'static str, u64> = Rt::ALL
            .iter()
            .zip(self.counts)
            .filter(|(_, n)| *n > 0)
            .map(|(rt, n)| (rt.name(), n))
            .collect();
        Summary {
            resources: self.counts.iter().sum(),
            bytes: self.bytes,
            by_type,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient_block(
        generator: &mut patient::PatientGen<'_>,
        index: u64,
    ) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let mut emit = |rt: &'static str, json: &[u8]| {
            out.push((rt, json.to_vec()));
            Ok(())
        };
        let mut sink = Sink {
            emit: &mut emit,
            counts: [0; Rt::COUNT],
            bytes: 0,
        };
        let mut buf = Vec::new();
        generator
            .generate(index, &mut buf, &mut sink)
            .expect("in-memory emit cannot fail");
        out
    }

    #[test]
    fn a_patient_does_not_depend_on_generation_order() {
        let ctx = Ctx::new(&SynthConfig {
            patients: 10,
            seed: 99,
        });
        let mut in_order = patient::PatientGen::new(&ctx);
        let mut blocks = Vec::new();
        for i in 0..10 {
            blocks.push(patient_block(&mut in_order, i));
        }
        let mut fresh = patient::PatientGen::new(&ctx);
        for i in (0..10).rev() {
            assert_eq!(patient_block(&mut fresh, i), blocks[i as usize]);
        }
    }
}
