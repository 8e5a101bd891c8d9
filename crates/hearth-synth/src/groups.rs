//! Cohort Groups for Group-level `$export`.
//!
//! Membership is a deterministic stride over the patient indices (rotated by
//! a seed-derived offset), and members' ids are recomputed from their index,
//! so even the all-patients group needs no memory beyond its own JSON.

use std::io;

use crate::fhir::{begin, begin_narrative, end_narrative};
use crate::ids::mix64;
use crate::json::{JsonBuf, days_from_civil};
use crate::{Ctx, Rt, Sink, pool};

const PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/Group";

/// Sized cohorts; ids are `group-<size>`.
const SIZES: [u64; 3] = [10, 100, 1000];

pub(crate) fn emit(ctx: &Ctx, b: &mut Vec<u8>, sink: &mut Sink<'_>) -> io::Result<()> {
    if ctx.patients == 0 {
        return Ok(());
    }
    for (n, size) in SIZES.into_iter().enumerate() {
        // The smallest cohort is kept (capped) even for tiny populations so
        // that Group export always has a sized group to work on.
        if size > ctx.patients && n > 0 {
            continue;
        }
        b.clear();
        sized(ctx, size, b);
        sink.put(Rt::Group, b)?;
    }
    b.clear();
    all_patients(ctx, b);
    sink.put(Rt::Group, b)
}

fn header(ctx: &Ctx, b: &mut Vec<u8>, id: &str, name: &str, count: u64) {
    begin(b, Rt::Group, id.as_bytes(), PROFILE);
    begin_narrative(b);
    b.str_inner(name);
    end_narrative(b);
    b.raw(b",\"identifier\":[{\"system\":\"urn:hearth:synth:group\",\"value\":");
    b.str(id);
    b.raw(b"}],\"active\":true,\"type\":\"person\",\"actual\":true,\"name\":");
    b.str(name);
    b.raw(b",\"quantity\":");
    b.uint(count);
    b.raw(b",\"managingEntity\":");
    pool::org_ref(b, &pool::org(ctx, 0));
}

fn sized(ctx: &Ctx, size: u64, b: &mut Vec<u8>) {
    let n = size.min(ctx.patients);
    let id = format!("group-{size}");
    let name = format!("Synthetic cohort of {n} patients");
    header(ctx, b, &id, &name, n);
    let offset = mix64(ctx.seed ^ size) % ctx.patients;
    let epoch = days_from_civil(2020, 1, 1) * 86_400;
    b.raw(b",\"member\":[");
    for k in 0..n {
        if k > 0 {
            b.push(b',');
        }
        // k·N/n is strictly increasing in k for n ≤ N, so members are distinct.
        let idx = (u128::from(k) * u128::from(ctx.patients) / u128::from(n)) as u64;
        let patient = (idx + offset) % ctx.patients;
        b.raw(b"{\"entity\":");
        b.reference(Rt::Patient.name(), &ctx.id(Rt::Patient, patient));
        let start = epoch + (mix64(ctx.seed ^ patient) % 1500) as i64 * 86_400;
        match k % 7 {
            // Former members: shows consumers that membership has a history.
            3 => {
                b.raw(b",\"period\":{\"start\":");
                b.datetime(start);
                b.raw(b",\"end\":");
                b.datetime(start + 180 * 86_400);
                b.raw(b"},\"inactive\":true");
            }
            1 | 5 => {
                b.raw(b",\"period\":{\"start\":");
                b.datetime(start);
                b.push(b'}');
            }
            _ => {}
        }
        b.push(b'}');
    }
    b.raw(b"]}");
}

fn all_patients(ctx: &Ctx, b: &mut Vec<u8>) {
    header(
        ctx,
        b,
        "all-patients",
        "All synthetic patients",
        ctx.patients,
    );
    b.reserve(ctx.patients.min(1 << 24) as usize * 60);
    b.raw(b",\"member\":[");
    for i in 0..ctx.patients {
        if i > 0 {
            b.push(b',');
        }
        b.raw(b"{\"entity\":");
        b.reference(Rt::Patient.name(), &ctx.id(Rt::Patient, i));
        b.push(b'}');
    }
    b.raw(b"]}");
}
