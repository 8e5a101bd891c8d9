//! The shared Organizations and Practitioners.
//!
//! Their attributes come from a hash of `(seed, index)` rather than from an
//! RNG stream, so a patient's encounter can cite "Dr. X at Y Medical Center"
//! with the right display text without the pool being held in memory.

use crate::codes::{
    CITIES, FAMILY, GIVEN_FEMALE, GIVEN_MALE, ORG_KINDS, ORG_PLACES, SPECIALTIES, STREETS,
};
use crate::fhir::{begin, coding, concept_no_text};
use crate::ids::mix64;
use crate::json::{Id, JsonBuf};
use crate::{Ctx, Rt};

const ORG_PROFILE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-organization";
const PRAC_PROFILE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-practitioner";

/// Picks `list[bits % len]`; lists are non-empty constants.
fn sel<T: Copy, const N: usize>(list: &[T; N], bits: u64) -> T {
    list[(bits % N as u64) as usize]
}

#[derive(Clone, Copy)]
pub(crate) struct Org {
    pub(crate) id: Id,
    pub(crate) place: &'static str,
    pub(crate) kind: (&'static str, &'static str, &'static str),
    pub(crate) city: (&'static str, &'static str, i64, i64),
    street: &'static str,
    number: u64,
    phone: u64,
}

pub(crate) fn org(ctx: &Ctx, k: u64) -> Org {
    let h = mix64(ctx.attr_key ^ mix64(k.wrapping_mul(2).wrapping_add(1)));
    Org {
        id: ctx.id(Rt::Organization, k),
        place: sel(&ORG_PLACES, h),
        kind: sel(&ORG_KINDS, h >> 8),
        city: sel(&CITIES, h >> 16),
        street: sel(&STREETS, h >> 24),
        number: (h >> 32) % 899 + 1,
        phone: (h >> 42) % 9_000_000 + 1_000_000,
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Prac {
    pub(crate) id: Id,
    pub(crate) male: bool,
    pub(crate) given: &'static str,
    pub(crate) family: &'static str,
    specialty: (&'static str, &'static str),
}

pub(crate) fn prac(ctx: &Ctx, k: u64) -> Prac {
    let h = mix64(ctx.attr_key ^ mix64(k.wrapping_mul(2)));
    let male = h & 1 == 1;
    Prac {
        id: ctx.id(Rt::Practitioner, k),
        male,
        given: if male {
            sel(&GIVEN_MALE, h >> 8)
        } else {
            sel(&GIVEN_FEMALE, h >> 8)
        },
        family: sel(&FAMILY, h >> 16),
        specialty: sel(&SPECIALTIES, h >> 24),
    }
}

/// `{"reference":"Organization/..","display":".."}`
pub(crate) fn org_ref(b: &mut Vec<u8>, o: &Org) {
    b.raw(b"{\"reference\":\"Organization/");
    b.raw(&o.id);
    b.raw(b"\",\"display\":\"");
    org_name(b, o);
    b.raw(b"\"}");
}

fn org_name(b: &mut Vec<u8>, o: &Org) {
    b.str_inner(o.place);
    b.push(b' ');
    b.str_inner(o.kind.0);
}

/// `{"reference":"Practitioner/..","display":"Dr. .."}`
pub(crate) fn prac_ref(b: &mut Vec<u8>, p: &Prac) {
    b.raw(b"{\"reference\":\"Practitioner/");
    b.raw(&p.id);
    b.raw(b"\",\"display\":\"Dr. ");
    b.str_inner(p.given);
    b.push(b' ');
    b.str_inner(p.family);
    b.raw(b"\"}");
}

fn address(b: &mut Vec<u8>, o: &Org) {
    b.raw(b"[{\"line\":[\"");
    b.uint(o.number);
    b.push(b' ');
    b.str_inner(o.street);
    b.raw(b"\"],\"city\":");
    b.str(o.city.0);
    b.raw(b",\"state\":\"MA\",\"postalCode\":");
    b.str(o.city.1);
    b.raw(b",\"country\":\"US\"}]");
}

pub(crate) fn organization(ctx: &Ctx, k: u64, b: &mut Vec<u8>) {
    let o = org(ctx, k);
    begin(b, Rt::Organization, &o.id, ORG_PROFILE);
    b.raw(b",\"identifier\":[{\"system\":\"http://hl7.org/fhir/sid/us-npi\",\"value\":\"");
    // NPIs must be unique across the pool: derive them from the index.
    b.uint(1_000_000_000 + k % 1_000_000_000);
    b.raw(b"\"},{\"system\":\"https://hearth.example.org/synth\",\"value\":\"");
    b.raw(&o.id);
    b.raw(b"\"}],\"active\":true,\"type\":[");
    concept_no_text(
        b,
        "http://terminology.hl7.org/CodeSystem/organization-type",
        o.kind.1,
        o.kind.2,
    );
    b.raw(b"],\"name\":\"");
    org_name(b, &o);
    b.raw(b"\",\"telecom\":[{\"system\":\"phone\",\"value\":\"");
    b.uint(9_780_000_000 + o.phone);
    b.raw(b"\"}],\"address\":");
    address(b, &o);
    b.push(b'}');
}

pub(crate) fn practitioner(ctx: &Ctx, k: u64, b: &mut Vec<u8>) {
    let p = prac(ctx, k);
    let o = org(ctx, k);
    begin(b, Rt::Practitioner, &p.id, PRAC_PROFILE);
    b.raw(b",\"identifier\":[{\"system\":\"http://hl7.org/fhir/sid/us-npi\",\"value\":\"");
    b.uint(2_000_000_000 + k % 1_000_000_000);
    b.raw(b"\"}],\"active\":true,\"name\":[{\"family\":");
    b.str(p.family);
    b.raw(b",\"given\":[");
    b.str(p.given);
    b.raw(b"],\"prefix\":[\"Dr.\"]}],\"telecom\":[{\"system\":\"email\",\"value\":\"");
    b.str_inner(p.given);
    b.push(b'.');
    // Apostrophes are legal in email local parts but odd; drop them.
    for ch in p.family.bytes().filter(|c| c.is_ascii_alphabetic()) {
        b.push(ch);
    }
    b.push(b'.');
    b.uint(k);
    b.raw(b"@example.org\",\"use\":\"work\"}],\"address\":");
    address(b, &o);
    b.raw(b",\"gender\":");
    b.raw(if p.male { b"\"male\"" } else { b"\"female\"" });
    b.raw(b",\"qualification\":[{\"identifier\":[{\"system\":\"http://example.org/board-certification\",\"value\":\"");
    b.raw(&p.id[..8]);
    b.raw(b"\"}],\"code\":{\"coding\":[");
    coding(
        b,
        "http://nucc.org/provider-taxonomy",
        p.specialty.0,
        p.specialty.1,
    );
    b.raw(b"],\"text\":");
    b.str(p.specialty.1);
    b.raw(b"},\"issuer\":");
    org_ref(b, &o);
    b.raw(b"}]}");
}
