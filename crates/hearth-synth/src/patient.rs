//! One patient's record: demographics, then a lifetime of encounters, each
//! with the observations, diagnoses, procedures, prescriptions, vaccines,
//! notes and provenance a Synthea-style simulation would attach to it.
//!
//! Randomness comes from a ChaCha8 stream selected by the patient index, and
//! all arithmetic is integer, so patient `i` is the same bytes whatever else
//! is generated and on whatever platform.

use std::io;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::codes::{self, CVX, Code, LOINC, Lab, Panel, RXNORM, SNOMED};
use crate::fhir::{
    begin, begin_narrative, coding, concept, concept_no_text, end_narrative, period, quantity,
    reference,
};
use crate::ids::scoped;
use crate::json::{Id, JsonBuf, days_from_civil};
use crate::pool::{self, Org, Prac};
use crate::{Ctx, Rt, Sink};

const DAY: i64 = 86_400;
const YEAR: i64 = 31_556_952;
const BIRTH_MIN: i64 = days_from_civil(1925, 1, 1) * DAY;
const BIRTH_MAX: i64 = days_from_civil(2025, 6, 1) * DAY;
/// Last possible encounter start; inpatient stays and resolutions that follow
/// still end well before 2026-01-01, so every date is in the past.
const RECORD_END: i64 = days_from_civil(2025, 12, 1) * DAY;
const COVID_START: i64 = days_from_civil(2020, 3, 1) * DAY;
const COVID_VAX_START: i64 = days_from_civil(2021, 1, 1) * DAY;
const MAX_ENCOUNTERS: u64 = 150;

const P_PATIENT: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient";
const P_ENCOUNTER: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-encounter";
const P_CONDITION: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition";
const P_LAB: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab";
const P_SMOKING: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-smokingstatus";
const P_VITALS: &str = "http://hl7.org/fhir/StructureDefinition/vitalsigns";
const P_BMI: &str = "http://hl7.org/fhir/StructureDefinition/bmi";
const P_HEIGHT: &str = "http://hl7.org/fhir/StructureDefinition/bodyheight";
const P_WEIGHT: &str = "http://hl7.org/fhir/StructureDefinition/bodyweight";
const P_BP: &str = "http://hl7.org/fhir/StructureDefinition/bp";
const P_HR: &str = "http://hl7.org/fhir/StructureDefinition/heartrate";
const P_RR: &str = "http://hl7.org/fhir/StructureDefinition/resprate";
const P_TEMP: &str = "http://hl7.org/fhir/StructureDefinition/bodytemp";
const P_SPO2: &str = "http://hl7.org/fhir/StructureDefinition/oxygensat";
const P_REPORT: &str =
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-diagnosticreport-lab";
const P_PROCEDURE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-procedure";
const P_MEDREQ: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-medicationrequest";
const P_IMMUNIZATION: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-immunization";
const P_DOCREF: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference";
const P_PROVENANCE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-provenance";

const CAT_VITALS: &[u8] = br#"[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs","display":"Vital Signs"}]}]"#;
const CAT_LAB: &[u8] = br#"[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory","display":"Laboratory"}]}]"#;
const CAT_SOCIAL: &[u8] = br#"[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"social-history","display":"Social History"}]}]"#;
const CAT_SURVEY: &[u8] = br#"[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"survey","display":"Survey"}]}]"#;

/// Cumulative share of adult height reached at each age in years (0..=17).
const GROWTH_PERMILLE: [i64; 18] = [
    380, 470, 540, 570, 610, 650, 690, 720, 760, 790, 820, 850, 880, 920, 950, 970, 980, 990,
];

/// Integer-only sampling helpers over ChaCha8 (no floating point, so values
/// are identical on every platform).
struct Rng(ChaCha8Rng);

impl Rng {
    /// Uniform in `0..n` (0 when `n == 0`).
    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.0.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    #[inline]
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below(hi.abs_diff(lo)) as i64
        }
    }

    #[inline]
    fn chance(&mut self, permille: u64) -> bool {
        self.below(1000) < permille
    }

    fn pick<T: Copy, const N: usize>(&mut self, list: &[T; N]) -> T {
        list[self.below(N as u64) as usize]
    }

    fn index<T, const N: usize>(&mut self, _list: &[T; N]) -> usize {
        self.below(N as u64) as usize
    }

    /// Approximately normal with standard deviation `sd` (Irwin–Hall of four
    /// uniforms: bounded at ±3.5 sd, which keeps values plausible).
    fn noise(&mut self, sd: i64) -> i64 {
        let v = self.0.next_u64();
        let sum: i64 = (0..4).map(|k| ((v >> (16 * k)) & 0xffff) as i64).sum();
        // Four U(0, 65536) sum to mean 131072 and standard deviation ≈ 37837.
        (sum - 131_072) * sd / 37_837
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Wellness,
    Sick,
    FollowUp,
    Emergency,
    Inpatient,
}

struct Person {
    id: Id,
    male: bool,
    given: &'static str,
    family: &'static str,
    birth: i64,
    death: Option<i64>,
    org: Org,
    prac: Prac,
    adult_height_mm: i64,
    bmi100: i64,
    smoker: usize,
    race: usize,
    ethnicity: usize,
    marital: usize,
}

impl Person {
    fn age_years(&self, t: i64) -> i64 {
        (t - self.birth) / YEAR
    }
}

struct Enc {
    id: Id,
    kind: Kind,
    start: i64,
    end: i64,
    org: Org,
    prac: Prac,
    age: i64,
}

struct ActiveChronic {
    index: usize,
    id: Id,
}

struct LabResult {
    id: Id,
    display: &'static str,
    value: LabValue,
}

#[derive(Clone, Copy)]
enum LabValue {
    Quantity { value: i64, lab: Lab },
    Coded(Code),
}

#[derive(Clone, Copy)]
enum Plan {
    Condition,
    Procedure,
    Medication,
    Immunization,
}

pub(crate) struct PatientGen<'c> {
    ctx: &'c Ctx,
    rng: Rng,
    patient: u64,
    counters: [u64; Rt::COUNT],
    times: Vec<i64>,
    /// Resources of the current encounter, for its Provenance.
    refs: Vec<(Rt, Id)>,
    labs: Vec<LabResult>,
    chronic: Vec<ActiveChronic>,
    plan: Vec<(Plan, &'static str)>,
    note: Vec<u8>,
    /// Patient display name for references ("Mr. Abdul Koepp").
    display: String,
}

impl<'c> PatientGen<'c> {
    pub(crate) fn new(ctx: &'c Ctx) -> Self {
        Self {
            ctx,
            rng: Rng(ChaCha8Rng::seed_from_u64(ctx.seed)),
            patient: 0,
            counters: [0; Rt::COUNT],
            times: Vec::new(),
            refs: Vec::new(),
            labs: Vec::new(),
            chronic: Vec::new(),
            plan: Vec::new(),
            note: Vec::new(),
            display: String::new(),
        }
    }

    fn next_id(&mut self, rt: Rt) -> Id {
        let n = &mut self.counters[rt as usize];
        let id = self.ctx.id(rt, scoped(self.patient, *n));
        *n += 1;
        id
    }

    /// Emits patient `index` and all of its resources.
    pub(crate) fn generate(
        &mut self,
        index: u64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.ctx.seed);
        rng.set_stream(index);
        self.rng = Rng(rng);
        self.patient = index;
        self.counters = [0; Rt::COUNT];
        self.chronic.clear();

        let p = self.person(index);
        b.clear();
        self.write_patient(&p, b);
        sink.put(Rt::Patient, b)?;

        let last = p.death.unwrap_or(RECORD_END);
        // Encounters per year vary a lot between people; this spread is what
        // gives some patients ~50 resources and others ~1000.
        let rate_permille = match self.rng.below(100) {
            0..25 => 160,
            25..70 => 400,
            70..92 => 800,
            _ => 1500,
        } + self.rng.below(120);
        let span_permille = (last - p.birth).max(0) as u64 * 1000 / YEAR as u64;
        let count = (1 + span_permille * rate_permille / 1_000_000).min(MAX_ENCOUNTERS);
        self.times.clear();
        for _ in 0..count {
            let t = self.rng.between(p.birth + 3 * DAY, last - DAY);
            self.times.push(t);
        }
        self.times.sort_unstable();
        // Taken out so `encounter` can borrow `self` mutably; put back to
        // reuse the allocation for the next patient.
        let times = std::mem::take(&mut self.times);
        let result = times
            .iter()
            .try_for_each(|&start| self.encounter(&p, start, b, sink));
        self.times = times;
        result
    }

    fn person(&mut self, index: u64) -> Person {
        let r = &mut self.rng;
        let male = r.chance(490);
        let birth = r.between(BIRTH_MIN, BIRTH_MAX);
        let age_now = (RECORD_END - birth) / YEAR;
        let death = (age_now > 70 && r.chance(300))
            .then(|| r.between(birth + 70 * YEAR, RECORD_END - 30 * DAY));
        let home = r.below(self.ctx.pool.max(1));
        let given = if male {
            r.pick(&codes::GIVEN_MALE)
        } else {
            r.pick(&codes::GIVEN_FEMALE)
        };
        let family = r.pick(&codes::FAMILY);
        let adult_height_mm = if male { 1760 } else { 1630 } + r.noise(70);
        let bmi100 = 2550 + r.noise(450);
        let p = Person {
            id: self.ctx.id(Rt::Patient, index),
            male,
            given,
            family,
            birth,
            death,
            org: pool::org(self.ctx, home),
            prac: pool::prac(self.ctx, home),
            adult_height_mm,
            bmi100: bmi100.clamp(1750, 4500),
            smoker: r.index(&codes::SMOKING_STATUS),
            race: match r.below(100) {
                0..70 => 0,
                70..82 => 1,
                82..92 => 2,
                92..95 => 3,
                _ => 4,
            },
            ethnicity: usize::from(r.chance(180)),
            marital: r.index(&codes::MARITAL),
        };
        self.display.clear();
        if age_now >= 18 {
            self.display.push_str(match (male, p.marital) {
                (true, _) => "Mr. ",
                (false, 0) => "Mrs. ",
                _ => "Ms. ",
            });
        }
        self.display.push_str(given);
        self.display.push(' ');
        self.display.push_str(family);
        p
    }

    fn patient_ref(&self, b: &mut Vec<u8>, p: &Person) {
        reference(b, Rt::Patient, &p.id, Some(&self.display));
    }

    fn write_patient(&mut self, p: &Person, b: &mut Vec<u8>) {
        let r = &mut self.rng;
        let age_now = p.age_years(p.death.unwrap_or(RECORD_END));
        let (race_code, race) = codes::RACES[p.race];
        let (eth_code, eth) = codes::ETHNICITIES[p.ethnicity];
        let city = r.pick(&codes::CITIES);
        let birth_city = r.pick(&codes::CITIES);

        begin(b, Rt::Patient, &p.id, P_PATIENT);
        begin_narrative(b);
        b.raw(b"Generated by Hearth synth. ");
        b.str_inner(&self.display);
        b.raw(b", born ");
        b.date_inner(p.birth);
        b.raw(b" in ");
        b.str_inner(birth_city.0);
        b.raw(b". Population seed: ");
        b.uint(self.ctx.seed);
        b.raw(b", person index: ");
        b.uint(self.patient);
        end_narrative(b);

        b.raw(b",\"extension\":[{\"url\":\"http://hl7.org/fhir/us/core/StructureDefinition/us-core-race\",\"extension\":[{\"url\":\"ombCategory\",\"valueCoding\":");
        coding(b, "urn:oid:2.16.840.1.113883.6.238", race_code, race);
        b.raw(b"},{\"url\":\"text\",\"valueString\":");
        b.str(race);
        b.raw(b"}]},{\"url\":\"http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity\",\"extension\":[{\"url\":\"ombCategory\",\"valueCoding\":");
        coding(b, "urn:oid:2.16.840.1.113883.6.238", eth_code, eth);
        b.raw(b"},{\"url\":\"text\",\"valueString\":");
        b.str(eth);
        b.raw(b"}]},{\"url\":\"http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName\",\"valueString\":\"");
        b.str_inner(r.pick(&codes::GIVEN_FEMALE));
        b.push(b' ');
        b.str_inner(r.pick(&codes::FAMILY));
        b.raw(b"\"},{\"url\":\"http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex\",\"valueCode\":");
        b.raw(if p.male { b"\"M\"" } else { b"\"F\"" });
        b.raw(b"},{\"url\":\"http://hl7.org/fhir/StructureDefinition/patient-birthPlace\",\"valueAddress\":{\"city\":");
        b.str(birth_city.0);
        b.raw(b",\"state\":\"Massachusetts\",\"country\":\"US\"}},{\"url\":\"http://synthetichealth.github.io/synthea/disability-adjusted-life-years\",\"valueDecimal\":");
        let daly = r.between(0, 40_000);
        b.decimal(daly, 4);
        b.raw(b"},{\"url\":\"http://synthetichealth.github.io/synthea/quality-adjusted-life-years\",\"valueDecimal\":");
        b.decimal((age_now * 10_000 - daly).max(0), 4);
        b.raw(b"}]");

        b.raw(b",\"identifier\":[{\"system\":\"https://hearth.example.org/synth\",\"value\":\"");
        b.raw(&p.id);
        b.raw(b"\"},{\"type\":{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v2-0203\",\"code\":\"MR\",\"display\":\"Medical Record Number\"}],\"text\":\"Medical Record Number\"},\"system\":\"http://hospital.smarthealthit.org\",\"value\":\"");
        b.raw(&p.id);
        b.raw(b"\"},{\"type\":{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v2-0203\",\"code\":\"SS\",\"display\":\"Social Security Number\"}],\"text\":\"Social Security Number\"},\"system\":\"http://hl7.org/fhir/sid/us-ssn\",\"value\":\"999-");
        b.padded(r.below(100), 2);
        b.push(b'-');
        b.padded(r.below(10_000), 4);
        b.raw(b"\"}");
        if age_now >= 16 {
            b.raw(b",{\"type\":{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v2-0203\",\"code\":\"DL\",\"display\":\"Driver's License\"}],\"text\":\"Driver's License\"},\"system\":\"urn:oid:2.16.840.1.113883.4.3.25\",\"value\":\"S99");
            b.padded(r.below(1_000_000), 6);
            b.raw(b"\"}");
            if r.chance(600) {
                b.raw(b",{\"type\":{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v2-0203\",\"code\":\"PPN\",\"display\":\"Passport Number\"}],\"text\":\"Passport Number\"},\"system\":\"http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber\",\"value\":\"X");
                b.padded(r.below(100_000_000), 8);
                b.raw(b"X\"}");
            }
        }
        b.push(b']');

        b.raw(b",\"name\":[{\"use\":\"official\",\"family\":");
        b.str(p.family);
        b.raw(b",\"given\":[");
        b.str(p.given);
        b.push(b']');
        if let Some(prefix) = self
            .display
            .split_once(' ')
            .map(|(pre, _)| pre)
            .filter(|pre| pre.ends_with('.'))
        {
            b.raw(b",\"prefix\":[");
            b.str(prefix);
            b.push(b']');
        }
        b.push(b'}');
        if !p.male && p.marital == 0 && age_now >= 18 {
            b.raw(b",{\"use\":\"maiden\",\"family\":");
            b.str(r.pick(&codes::FAMILY));
            b.raw(b",\"given\":[");
            b.str(p.given);
            b.raw(b"]}");
        }
        b.raw(b"],\"telecom\":[{\"system\":\"phone\",\"value\":\"555-");
        b.padded(r.below(1000), 3);
        b.push(b'-');
        b.padded(r.below(10_000), 4);
        b.raw(b"\",\"use\":\"home\"}]");
        b.raw(b",\"gender\":");
        b.raw(if p.male { b"\"male\"" } else { b"\"female\"" });
        b.raw(b",\"birthDate\":");
        b.date(p.birth);
        if let Some(death) = p.death {
            b.raw(b",\"deceasedDateTime\":");
            b.datetime(death);
        }
        b.raw(b",\"address\":[{\"extension\":[{\"url\":\"http://hl7.org/fhir/StructureDefinition/geolocation\",\"extension\":[{\"url\":\"latitude\",\"valueDecimal\":");
        b.decimal(city.2 + r.noise(15_000), 6);
        b.raw(b"},{\"url\":\"longitude\",\"valueDecimal\":");
        b.decimal(city.3 + r.noise(15_000), 6);
        b.raw(b"}]}],\"line\":[\"");
        b.uint(r.below(998) + 1);
        b.push(b' ');
        b.str_inner(r.pick(&codes::STREETS));
        if r.chance(200) {
            b.raw(b" Suite ");
            b.uint(r.below(90) + 1);
        }
        b.raw(b"\"],\"city\":");
        b.str(city.0);
        b.raw(b",\"state\":\"MA\",\"postalCode\":");
        b.str(city.1);
        b.raw(b",\"country\":\"US\"}]");
        if age_now >= 18 {
            let (code, display) = codes::MARITAL[p.marital];
            b.raw(b",\"maritalStatus\":{\"coding\":[");
            coding(
                b,
                "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                code,
                display,
            );
            b.raw(b"],\"text\":");
            b.str(display);
            b.push(b'}');
        }
        if r.chance(30) {
            b.raw(b",\"multipleBirthInteger\":");
            b.uint(r.below(2) + 1);
        } else {
            b.raw(b",\"multipleBirthBoolean\":false");
        }
        let (lang_code, lang) = if r.chance(800) {
            codes::LANGUAGES[0]
        } else {
            r.pick(&codes::LANGUAGES)
        };
        b.raw(b",\"communication\":[{\"language\":{\"coding\":[");
        coding(b, "urn:ietf:bcp:47", lang_code, lang);
        b.raw(b"],\"text\":");
        b.str(lang);
        b.raw(b"}}],\"generalPractitioner\":[");
        pool::prac_ref(b, &p.prac);
        b.raw(b"],\"managingOrganization\":");
        pool::org_ref(b, &p.org);
        b.push(b'}');
    }

    fn put(&mut self, rt: Rt, id: Id, b: &[u8], sink: &mut Sink<'_>) -> io::Result<()> {
        self.refs.push((rt, id));
        sink.put(rt, b)
    }

    fn kind(&mut self, age: i64) -> Kind {
        let r = self.rng.below(1000);
        if age < 2 {
            match r {
                0..700 => Kind::Wellness,
                700..950 => Kind::Sick,
                _ => Kind::Emergency,
            }
        } else if age < 18 {
            match r {
                0..400 => Kind::Wellness,
                400..850 => Kind::Sick,
                850..970 => Kind::Emergency,
                _ => Kind::Inpatient,
            }
        } else if !self.chronic.is_empty() {
            match r {
                0..280 => Kind::Wellness,
                280..560 => Kind::FollowUp,
                560..820 => Kind::Sick,
                820..940 => Kind::Emergency,
                _ => Kind::Inpatient,
            }
        } else {
            match r {
                0..420 => Kind::Wellness,
                420..800 => Kind::Sick,
                800..940 => Kind::Emergency,
                _ => Kind::Inpatient,
            }
        }
    }

    fn encounter(
        &mut self,
        p: &Person,
        start: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        self.refs.clear();
        self.plan.clear();
        let age = p.age_years(start);
        let kind = self.kind(age);
        let duration = match kind {
            Kind::Wellness | Kind::FollowUp => self.rng.between(15, 46) * 60,
            Kind::Sick => self.rng.between(15, 31) * 60,
            Kind::Emergency => self.rng.between(60, 361) * 60,
            Kind::Inpatient => self.rng.between(2, 7) * DAY + self.rng.between(0, 12) * 3600,
        };
        // Hospital care is often elsewhere than at the patient's own practice.
        let (org, prac) =
            if matches!(kind, Kind::Emergency | Kind::Inpatient) && self.rng.chance(600) {
                let k = self.rng.below(self.ctx.pool.max(1));
                (pool::org(self.ctx, k), pool::prac(self.ctx, k))
            } else {
                (p.org, p.prac)
            };
        let enc = Enc {
            id: self.next_id(Rt::Encounter),
            kind,
            start,
            end: start + duration,
            org,
            prac,
            age,
        };

        // Decide the diagnosis up front: the Encounter cites it as reasonCode.
        let diagnosis = match kind {
            Kind::Sick if self.rng.chance(420) => Some(self.acute_condition(start)),
            Kind::Emergency if self.rng.chance(600) => Some(self.rng.pick(&codes::INJURIES)),
            Kind::Inpatient if self.rng.chance(600) => Some(if self.rng.chance(500) {
                self.rng.pick(&codes::INJURIES)
            } else {
                self.acute_condition(start)
            }),
            _ => None,
        };
        let follow_up = if kind == Kind::FollowUp && !self.chronic.is_empty() {
            let n = self.rng.below(self.chronic.len() as u64) as usize;
            self.chronic.get(n).map(|c| (c.index, c.id))
        } else {
            None
        };

        b.clear();
        self.write_encounter(p, &enc, diagnosis, follow_up, b);
        self.put(Rt::Encounter, enc.id, b, sink)?;

        let condition_id = match diagnosis {
            Some(code) => {
                let id = self.condition(p, &enc, &code, false, b);
                self.put(Rt::Condition, id, b, sink)?;
                self.plan.push((Plan::Condition, code.display));
                Some(id)
            }
            None => None,
        };

        match kind {
            Kind::Wellness => self.wellness(p, &enc, b, sink)?,
            Kind::Sick => {
                let t = enc.start + 5 * 60;
                if self.rng.chance(600) {
                    let fever = diagnosis.is_some() && self.rng.chance(600);
                    self.temperature(p, &enc, t, fever, b, sink)?;
                }
                if self.rng.chance(400) {
                    self.heart_rate(p, &enc, t, b, sink)?;
                }
                if self.rng.chance(150) {
                    self.spo2(p, &enc, t, b, sink)?;
                }
                if self.rng.chance(300) {
                    let code = self.rng.pick(&codes::PROC_SICK);
                    self.procedure(p, &enc, &code, condition_id, b, sink)?;
                }
                // Rapid tests: positive exactly when they confirm the diagnosis.
                if self.rng.chance(450) {
                    let code = diagnosis.map_or("", |d| d.code);
                    let covid_era = enc.start >= COVID_START;
                    if code == "840539006"
                        || (covid_era && !matches!(code, "43878008" | "195662009"))
                    {
                        self.rapid_test(p, &enc, &codes::TEST_COVID, code == "840539006", b, sink)?;
                    } else {
                        self.rapid_test(p, &enc, &codes::TEST_STREP, code == "43878008", b, sink)?;
                    }
                }
                if self.rng.chance(450) {
                    let bacterial = diagnosis
                        .is_some_and(|d| matches!(d.code, "43878008" | "75498004" | "65363002"));
                    let med = if bacterial {
                        self.rng.pick(&codes::ANTIBIOTICS)
                    } else {
                        self.rng.pick(&codes::ANALGESICS)
                    };
                    self.medication(p, &enc, &med, condition_id, false, b, sink)?;
                }
            }
            Kind::FollowUp => {
                let t = enc.start + 5 * 60;
                self.blood_pressure(p, &enc, t, b, sink)?;
                self.body_weight(p, &enc, t, b, sink)?;
                if self.rng.chance(400) {
                    self.heart_rate(p, &enc, t, b, sink)?;
                }
                if let Some((index, cond_id)) = follow_up {
                    if self.rng.chance(450) {
                        let panel = if index == codes::DIABETES {
                            &codes::PANEL_A1C
                        } else {
                            &codes::PANEL_BMP
                        };
                        self.lab_panel(p, &enc, panel, b, sink)?;
                    }
                    let meds = codes::CHRONIC[index].meds;
                    if !meds.is_empty() && self.rng.chance(700) {
                        let n = self.rng.below(meds.len() as u64) as usize;
                        if let Some(med) = meds.get(n) {
                            self.medication(p, &enc, med, Some(cond_id), true, b, sink)?;
                        }
                    }
                    if self.rng.chance(450) {
                        self.procedure(
                            p,
                            &enc,
                            &codes::PROC_MED_RECONCILIATION,
                            Some(cond_id),
                            b,
                            sink,
                        )?;
                    }
                    // Flu shots are offered at any routine visit.
                    if self.rng.chance(300) {
                        self.immunization(p, &enc, &codes::VAX_FLU, b, sink)?;
                    }
                }
            }
            Kind::Emergency => {
                let t = enc.start + 10 * 60;
                self.heart_rate(p, &enc, t, b, sink)?;
                self.blood_pressure(p, &enc, t, b, sink)?;
                if age >= 5 && self.rng.chance(700) {
                    self.pain(p, &enc, t, b, sink)?;
                }
                if self.rng.chance(200) {
                    self.temperature(p, &enc, t, false, b, sink)?;
                }
                for _ in 0..1 + u64::from(self.rng.chance(400)) {
                    let code = self.rng.pick(&codes::PROC_EMERGENCY);
                    self.procedure(p, &enc, &code, condition_id, b, sink)?;
                }
                if self.rng.chance(250) {
                    self.lab_panel(p, &enc, &codes::PANEL_CBC, b, sink)?;
                }
                if self.rng.chance(550) {
                    let med = self.rng.pick(&codes::ANALGESICS);
                    self.medication(p, &enc, &med, condition_id, false, b, sink)?;
                }
            }
            Kind::Inpatient => {
                let days = ((enc.end - enc.start) / DAY).clamp(1, 2);
                for d in 0..days {
                    let t = enc.start + d * DAY + 2 * 3600;
                    self.heart_rate(p, &enc, t, b, sink)?;
                    self.blood_pressure(p, &enc, t, b, sink)?;
                }
                self.temperature(p, &enc, enc.start + 3600, false, b, sink)?;
                if self.rng.chance(800) {
                    let panel = if self.rng.chance(500) {
                        &codes::PANEL_CBC
                    } else {
                        &codes::PANEL_BMP
                    };
                    self.lab_panel(p, &enc, panel, b, sink)?;
                }
                for _ in 0..1 + self.rng.below(3) {
                    let code = self.rng.pick(&codes::PROC_INPATIENT);
                    self.procedure(p, &enc, &code, condition_id, b, sink)?;
                }
                for _ in 0..1 + self.rng.below(2) {
                    let med = self.rng.pick(&codes::ANALGESICS);
                    self.medication(p, &enc, &med, condition_id, false, b, sink)?;
                }
            }
        }

        let note = match kind {
            Kind::Wellness => self.rng.chance(300).then_some(codes::DOC_HISTORY),
            Kind::Sick => self.rng.chance(250).then_some(codes::DOC_PROGRESS),
            Kind::FollowUp => self.rng.chance(300).then_some(codes::DOC_PROGRESS),
            Kind::Emergency => self.rng.chance(600).then_some(codes::DOC_EMERGENCY),
            Kind::Inpatient => Some(codes::DOC_DISCHARGE),
        };
        if let Some(doc_type) = note {
            self.document(p, &enc, &doc_type, b, sink)?;
        }

        b.clear();
        let id = self.next_id(Rt::Provenance);
        self.provenance(p, &enc, id, b);
        sink.put(Rt::Provenance, b)
    }

    fn acute_condition(&mut self, t: i64) -> Code {
        let n = self.rng.index(&codes::ACUTE_CONDITIONS);
        let n = if n == codes::COVID_INDEX && t < COVID_START {
            n % 3
        } else {
            n
        };
        codes::ACUTE_CONDITIONS[n]
    }

    fn wellness(
        &mut self,
        p: &Person,
        enc: &Enc,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let age = enc.age;
        let t = enc.start + 5 * 60;
        self.body_height(p, enc, t, b, sink)?;
        self.body_weight(p, enc, t, b, sink)?;
        if age >= 2 {
            self.bmi(p, enc, t, b, sink)?;
        }
        if age >= 3 {
            self.blood_pressure(p, enc, t, b, sink)?;
        }
        if self.rng.chance(800) {
            self.heart_rate(p, enc, t, b, sink)?;
        }
        if self.rng.chance(250) {
            self.respiratory_rate(p, enc, t, b, sink)?;
        }
        if age >= 12 {
            self.smoking(p, enc, t, b, sink)?;
        }

        // New long-term diagnoses surface at check-ups.
        if age >= 2 && self.chronic.len() < codes::CHRONIC.len() && self.rng.chance(110) {
            let n = self.rng.index(&codes::CHRONIC);
            let known = self.chronic.iter().any(|c| c.index == n);
            if !known && codes::CHRONIC[n].min_age <= age {
                let code = codes::CHRONIC[n].code;
                let id = self.condition(p, enc, &code, true, b);
                self.put(Rt::Condition, id, b, sink)?;
                self.plan.push((Plan::Condition, code.display));
                self.chronic.push(ActiveChronic { index: n, id });
            }
        }

        if age >= 18 && self.rng.chance(420) {
            let diabetic = self.chronic.iter().any(|c| c.index == codes::DIABETES);
            let panel = match self.rng.below(100) {
                0..35 => &codes::PANEL_LIPID,
                35..50 => &codes::PANEL_CBC,
                50..65 => &codes::PANEL_BMP,
                65..80 if diabetic => &codes::PANEL_A1C,
                _ => &codes::PANEL_HH,
            };
            self.lab_panel(p, enc, panel, b, sink)?;
        } else if age < 18 && self.rng.chance(80) {
            self.lab_panel(p, enc, &codes::PANEL_CBC, b, sink)?;
        }

        // Vaccines by age, roughly following the US schedule.
        if age < 2 {
            let first = self.rng.index(&codes::VAX_INFANT);
            for k in 0..2 + self.rng.below(2) as usize {
                let vax = codes::VAX_INFANT[(first + k) % codes::VAX_INFANT.len()];
                self.immunization(p, enc, &vax, b, sink)?;
            }
        } else if age < 18 {
            if self.rng.chance(700) {
                let vax = self.rng.pick(&codes::VAX_CHILD);
                self.immunization(p, enc, &vax, b, sink)?;
            }
            if self.rng.chance(350) {
                self.immunization(p, enc, &codes::VAX_FLU, b, sink)?;
            }
        } else {
            if self.rng.chance(650) {
                self.immunization(p, enc, &codes::VAX_FLU, b, sink)?;
            }
            if enc.start >= COVID_VAX_START && self.rng.chance(300) {
                self.immunization(p, enc, &codes::VAX_COVID, b, sink)?;
            }
            if self.rng.chance(60) {
                self.immunization(p, enc, &codes::VAX_TD, b, sink)?;
            }
            if age >= 50 && self.rng.chance(60) {
                self.immunization(p, enc, &codes::VAX_ZOSTER, b, sink)?;
            }
            if age >= 65 && self.rng.chance(60) {
                self.immunization(p, enc, &codes::VAX_PNEUMO, b, sink)?;
            }
        }

        let screenings = if age >= 18 {
            u64::from(self.rng.chance(750)) + u64::from(self.rng.chance(450))
        } else {
            u64::from(self.rng.chance(300))
        };
        let first = self.rng.index(&codes::PROC_WELLNESS);
        for k in 0..screenings as usize {
            let code = codes::PROC_WELLNESS[(first + k) % codes::PROC_WELLNESS.len()];
            self.procedure(p, enc, &code, None, b, sink)?;
        }
        if age >= 50 && self.rng.chance(40) {
            self.procedure(p, enc, &codes::PROC_COLONOSCOPY, None, b, sink)?;
        }
        if !p.male && age >= 40 && self.rng.chance(150) {
            self.procedure(p, enc, &codes::PROC_MAMMOGRAPHY, None, b, sink)?;
        }
        Ok(())
    }

    // ---- Encounter -------------------------------------------------------

    fn write_encounter(
        &mut self,
        p: &Person,
        enc: &Enc,
        diagnosis: Option<Code>,
        follow_up: Option<(usize, Id)>,
        b: &mut Vec<u8>,
    ) {
        let (class, class_display, type_code) = match enc.kind {
            Kind::Wellness if enc.age < 18 => ("AMB", "ambulatory", codes::ENC_WELL_CHILD),
            Kind::Wellness => ("AMB", "ambulatory", codes::ENC_GENERAL_EXAM),
            Kind::Sick => ("AMB", "ambulatory", codes::ENC_SYMPTOM),
            Kind::FollowUp => ("AMB", "ambulatory", codes::ENC_FOLLOW_UP),
            Kind::Emergency => ("EMER", "emergency", codes::ENC_EMERGENCY),
            Kind::Inpatient => ("IMP", "inpatient encounter", codes::ENC_INPATIENT),
        };
        begin(b, Rt::Encounter, &enc.id, P_ENCOUNTER);
        begin_narrative(b);
        b.str_inner(class_display);
        b.raw(b" encounter: ");
        b.str_inner(type_code.display);
        b.raw(b" on ");
        b.date_inner(enc.start);
        b.raw(b" at ");
        b.str_inner(enc.org.place);
        b.push(b' ');
        b.str_inner(enc.org.kind.0);
        end_narrative(b);
        b.raw(b",\"identifier\":[{\"use\":\"official\",\"system\":\"https://hearth.example.org/synth\",\"value\":\"");
        b.raw(&enc.id);
        b.raw(b"\"}],\"status\":\"finished\",\"class\":{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ActCode\",\"code\":\"");
        b.raw(class.as_bytes());
        b.raw(b"\",\"display\":");
        b.str(class_display);
        b.raw(b"},\"type\":[");
        concept(b, SNOMED, &type_code);
        b.push(b']');
        if enc.kind == Kind::Emergency {
            b.raw(b",\"priority\":");
            concept_no_text(
                b,
                "http://terminology.hl7.org/CodeSystem/v3-ActPriority",
                "EM",
                "emergency",
            );
        }
        b.raw(b",\"subject\":");
        self.patient_ref(b, p);
        b.raw(b",\"participant\":[{\"type\":[{\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-ParticipationType\",\"code\":\"PPRF\",\"display\":\"primary performer\"}],\"text\":\"primary performer\"}],\"period\":");
        period(b, enc.start, enc.end);
        b.raw(b",\"individual\":");
        pool::prac_ref(b, &enc.prac);
        b.raw(b"}],\"period\":");
        period(b, enc.start, enc.end);
        if let Some(code) = diagnosis {
            b.raw(b",\"reasonCode\":[");
            concept(b, SNOMED, &code);
            b.push(b']');
        }
        if let Some((index, id)) = follow_up {
            b.raw(b",\"reasonReference\":[");
            reference(
                b,
                Rt::Condition,
                &id,
                Some(codes::CHRONIC[index].code.display),
            );
            b.push(b']');
        }
        if enc.kind == Kind::Inpatient {
            b.raw(b",\"hospitalization\":{\"admitSource\":");
            concept_no_text(
                b,
                "http://terminology.hl7.org/CodeSystem/admit-source",
                "emd",
                "From accident/emergency department",
            );
            b.raw(b",\"dischargeDisposition\":");
            concept_no_text(
                b,
                "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                "home",
                "Home",
            );
            b.push(b'}');
        }
        b.raw(b",\"serviceProvider\":");
        pool::org_ref(b, &enc.org);
        b.push(b'}');
    }

    // ---- Condition -------------------------------------------------------

    fn condition(
        &mut self,
        p: &Person,
        enc: &Enc,
        code: &Code,
        chronic: bool,
        b: &mut Vec<u8>,
    ) -> Id {
        let id = self.next_id(Rt::Condition);
        b.clear();
        begin(b, Rt::Condition, &id, P_CONDITION);
        if self.rng.chance(500) {
            begin_narrative(b);
            b.str_inner(code.display);
            b.raw(b" (onset ");
            b.date_inner(enc.start);
            b.push(b')');
            end_narrative(b);
        }
        let abatement = (!chronic).then(|| enc.start + self.rng.between(5, 28) * DAY);
        b.raw(b",\"clinicalStatus\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/condition-clinical",
            if abatement.is_some() {
                "resolved"
            } else {
                "active"
            },
            if abatement.is_some() {
                "Resolved"
            } else {
                "Active"
            },
        );
        b.raw(b",\"verificationStatus\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            "confirmed",
            "Confirmed",
        );
        b.raw(b",\"category\":[");
        if chronic {
            concept_no_text(
                b,
                "http://hl7.org/fhir/us/core/CodeSystem/condition-category",
                "health-concern",
                "Health Concern",
            );
        } else {
            concept_no_text(
                b,
                "http://terminology.hl7.org/CodeSystem/condition-category",
                "encounter-diagnosis",
                "Encounter Diagnosis",
            );
        }
        b.raw(b"],\"code\":");
        concept(b, SNOMED, code);
        b.raw(b",\"subject\":");
        self.patient_ref(b, p);
        b.raw(b",\"encounter\":");
        b.reference(Rt::Encounter.name(), &enc.id);
        b.raw(b",\"onsetDateTime\":");
        b.datetime(enc.start);
        if let Some(t) = abatement {
            b.raw(b",\"abatementDateTime\":");
            b.datetime(t);
        }
        b.raw(b",\"recordedDate\":");
        b.datetime(enc.start);
        b.raw(b",\"recorder\":");
        pool::prac_ref(b, &enc.prac);
        b.push(b'}');
        id
    }

    // ---- Observations ----------------------------------------------------

    /// Common Observation head up to and including `"issued"`.
    #[allow(clippy::too_many_arguments)]
    fn obs_head(
        &mut self,
        p: &Person,
        enc: &Enc,
        id: &Id,
        t: i64,
        profile: &str,
        category: &[u8],
        code: &Code,
        b: &mut Vec<u8>,
    ) {
        b.clear();
        begin(b, Rt::Observation, id, profile);
        b.raw(b",\"status\":\"final\",\"category\":");
        b.raw(category);
        b.raw(b",\"code\":");
        concept(b, LOINC, code);
        b.raw(b",\"subject\":");
        self.patient_ref(b, p);
        b.raw(b",\"encounter\":");
        b.reference(Rt::Encounter.name(), &enc.id);
        b.raw(b",\"effectiveDateTime\":");
        b.datetime(t);
        b.raw(b",\"issued\":");
        let millis = self.rng.below(1000) as u32;
        b.instant(t + self.rng.between(0, 1800), millis);
        // Like Synthea, only lab results name a performer: the laboratory.
        if category == CAT_LAB {
            b.raw(b",\"performer\":[");
            pool::org_ref(b, &enc.org);
            b.push(b']');
        }
    }

    /// A vital sign with one quantity value, optionally with a narrative.
    #[allow(clippy::too_many_arguments)]
    fn vital(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        profile: &str,
        code: &Code,
        value: i64,
        scale: u32,
        unit: &str,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let id = self.next_id(Rt::Observation);
        self.obs_head(p, enc, &id, t, profile, CAT_VITALS, code, b);
        b.raw(b",\"valueQuantity\":");
        quantity(b, value, scale, unit);
        if self.rng.chance(350) {
            begin_narrative(b);
            b.raw(b"<p><b>");
            b.str_inner(code.display);
            b.raw(b"</b>: ");
            b.decimal(value, scale);
            b.push(b' ');
            b.str_inner(unit);
            b.raw(b" (");
            b.date_inner(t);
            b.raw(b")</p>");
            end_narrative(b);
        }
        b.push(b'}');
        self.put(Rt::Observation, id, b, sink)
    }

    fn height_mm(&self, p: &Person, age: i64) -> i64 {
        let permille = GROWTH_PERMILLE
            .get(usize::try_from(age).unwrap_or(0))
            .copied()
            .unwrap_or(1000);
        p.adult_height_mm * permille / 1000
    }

    /// Body weight in units of 0.1 kg, consistent with height and BMI.
    fn weight_dg(&mut self, p: &Person, age: i64) -> i64 {
        let h = self.height_mm(p, age);
        let bmi100 = if age < 18 { 1650 } else { p.bmi100 } + self.rng.noise(60);
        (bmi100 * h * h / 10_000_000).max(25)
    }

    fn body_height(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let h = self.height_mm(p, enc.age) + self.rng.noise(3);
        self.vital(p, enc, t, P_HEIGHT, &codes::OBS_HEIGHT, h, 1, "cm", b, sink)
    }

    fn body_weight(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let w = self.weight_dg(p, enc.age);
        self.vital(p, enc, t, P_WEIGHT, &codes::OBS_WEIGHT, w, 1, "kg", b, sink)
    }

    fn bmi(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let h = self.height_mm(p, enc.age).max(400);
        let w = self.weight_dg(p, enc.age);
        let bmi100 = w * 10_000_000 / (h * h);
        self.vital(
            p,
            enc,
            t,
            P_BMI,
            &codes::OBS_BMI,
            bmi100,
            2,
            "kg/m2",
            b,
            sink,
        )
    }

    fn heart_rate(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let base = if enc.age < 10 { 100 } else { 74 };
        let v = (base + self.rng.noise(9)).clamp(45, 180);
        self.vital(
            p,
            enc,
            t,
            P_HR,
            &codes::OBS_HEART_RATE,
            v,
            0,
            "/min",
            b,
            sink,
        )
    }

    fn respiratory_rate(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let base = if enc.age < 10 { 24 } else { 15 };
        let v = (base + self.rng.noise(2)).clamp(10, 40);
        self.vital(
            p,
            enc,
            t,
            P_RR,
            &codes::OBS_RESP_RATE,
            v,
            0,
            "/min",
            b,
            sink,
        )
    }

    fn temperature(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        fever: bool,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let v = if fever {
            self.rng.between(378, 393)
        } else {
            368 + self.rng.noise(3)
        };
        self.vital(p, enc, t, P_TEMP, &codes::OBS_TEMP, v, 1, "Cel", b, sink)
    }

    fn spo2(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let v = (975 + self.rng.noise(12)).min(1000);
        self.vital(p, enc, t, P_SPO2, &codes::OBS_SPO2, v, 1, "%", b, sink)
    }

    fn pain(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let id = self.next_id(Rt::Observation);
        self.obs_head(p, enc, &id, t, P_VITALS, CAT_SURVEY, &codes::OBS_PAIN, b);
        b.raw(b",\"valueQuantity\":");
        quantity(b, self.rng.between(0, 11), 0, "{score}");
        b.push(b'}');
        self.put(Rt::Observation, id, b, sink)
    }

    fn blood_pressure(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let hypertensive = self.chronic.iter().any(|c| c.index == codes::HYPERTENSION);
        let (sys, dia) = if hypertensive { (138, 88) } else { (116, 75) };
        let sys = sys + self.rng.noise(9);
        let dia = dia + self.rng.noise(6);
        let id = self.next_id(Rt::Observation);
        self.obs_head(p, enc, &id, t, P_BP, CAT_VITALS, &codes::OBS_BP, b);
        b.raw(b",\"component\":[{\"code\":");
        concept(b, LOINC, &codes::OBS_DIASTOLIC);
        b.raw(b",\"valueQuantity\":");
        quantity(b, dia, 0, "mm[Hg]");
        b.raw(b"},{\"code\":");
        concept(b, LOINC, &codes::OBS_SYSTOLIC);
        b.raw(b",\"valueQuantity\":");
        quantity(b, sys, 0, "mm[Hg]");
        b.raw(b"}]");
        if self.rng.chance(350) {
            begin_narrative(b);
            b.raw(b"<p><b>Blood pressure</b>: ");
            b.int(sys);
            b.push(b'/');
            b.int(dia);
            b.raw(b" mmHg (");
            b.date_inner(t);
            b.raw(b")</p>");
            end_narrative(b);
        }
        b.push(b'}');
        self.put(Rt::Observation, id, b, sink)
    }

    fn smoking(
        &mut self,
        p: &Person,
        enc: &Enc,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let id = self.next_id(Rt::Observation);
        self.obs_head(
            p,
            enc,
            &id,
            t,
            P_SMOKING,
            CAT_SOCIAL,
            &codes::OBS_SMOKING,
            b,
        );
        b.raw(b",\"valueCodeableConcept\":");
        // Adolescents are recorded as never smokers whatever their adult habit.
        let status = if enc.age < 16 { 0 } else { p.smoker };
        concept(b, SNOMED, &codes::SMOKING_STATUS[status]);
        b.push(b'}');
        self.put(Rt::Observation, id, b, sink)
    }

    /// Lab observations followed by their DiagnosticReport.
    fn lab_panel(
        &mut self,
        p: &Person,
        enc: &Enc,
        panel: &Panel,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let t = enc.start + self.rng.between(10, 40) * 60;
        let diabetic = self.chronic.iter().any(|c| c.index == codes::DIABETES);
        self.labs.clear();
        for lab in panel.members {
            let span = lab.high - lab.low;
            let value = if lab.code.code == "4548-4" && diabetic {
                self.rng.between(65, 96)
            } else if self.rng.chance(120) {
                // Out of range: above or below by up to half the normal span.
                if self.rng.chance(500) {
                    lab.high + 1 + self.rng.between(0, span / 2 + 1)
                } else {
                    (lab.low - 1 - self.rng.between(0, span / 4 + 1)).max(1)
                }
            } else {
                lab.low + self.rng.between(0, span + 1)
            };
            let id = self.next_id(Rt::Observation);
            self.obs_head(p, enc, &id, t, P_LAB, CAT_LAB, &lab.code, b);
            b.raw(b",\"valueQuantity\":");
            quantity(b, value, lab.scale, lab.unit);
            let flag = if value > lab.high {
                Some(("H", "High"))
            } else if value < lab.low {
                Some(("L", "Low"))
            } else {
                None
            };
            if let Some((code, display)) = flag {
                b.raw(b",\"interpretation\":[");
                concept_no_text(
                    b,
                    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    code,
                    display,
                );
                b.push(b']');
            }
            b.raw(b",\"referenceRange\":[{\"low\":");
            quantity(b, lab.low, lab.scale, lab.unit);
            b.raw(b",\"high\":");
            quantity(b, lab.high, lab.scale, lab.unit);
            b.raw(b"}]}");
            self.put(Rt::Observation, id, b, sink)?;
            self.labs.push(LabResult {
                id,
                display: lab.code.display,
                value: LabValue::Quantity { value, lab: *lab },
            });
        }
        self.report(p, enc, &panel.code, t, b, sink)
    }

    /// A point-of-care test with a qualitative result, and its report.
    fn rapid_test(
        &mut self,
        p: &Person,
        enc: &Enc,
        test: &codes::RapidTest,
        positive: bool,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let t = enc.start + self.rng.between(5, 20) * 60;
        let result = if positive {
            test.positive
        } else {
            test.negative
        };
        self.labs.clear();
        let id = self.next_id(Rt::Observation);
        self.obs_head(p, enc, &id, t, P_LAB, CAT_LAB, &test.code, b);
        b.raw(b",\"valueCodeableConcept\":");
        concept(b, SNOMED, &result);
        if positive {
            b.raw(b",\"interpretation\":[");
            concept_no_text(
                b,
                "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                "POS",
                "Positive",
            );
            b.push(b']');
        }
        b.push(b'}');
        self.put(Rt::Observation, id, b, sink)?;
        self.labs.push(LabResult {
            id,
            display: test.code.display,
            value: LabValue::Coded(result),
        });
        self.report(p, enc, &test.code, t, b, sink)
    }

    /// The DiagnosticReport over `self.labs`, then a Provenance naming the
    /// performing laboratory.
    fn report(
        &mut self,
        p: &Person,
        enc: &Enc,
        code: &Code,
        t: i64,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let report = self.next_id(Rt::DiagnosticReport);
        b.clear();
        begin(b, Rt::DiagnosticReport, &report, P_REPORT);
        begin_narrative(b);
        b.raw(b"<p><b>");
        b.str_inner(code.display);
        b.raw(b"</b> (");
        b.date_inner(t);
        b.raw(b")</p><table><tr><th>Test</th><th>Result</th><th>Reference range</th></tr>");
        for r in &self.labs {
            b.raw(b"<tr><td>");
            b.str_inner(r.display);
            b.raw(b"</td><td>");
            match r.value {
                LabValue::Quantity { value, lab } => {
                    b.decimal(value, lab.scale);
                    b.push(b' ');
                    b.str_inner(lab.unit);
                    b.raw(b"</td><td>");
                    b.decimal(lab.low, lab.scale);
                    b.raw(b" - ");
                    b.decimal(lab.high, lab.scale);
                }
                LabValue::Coded(c) => {
                    b.str_inner(c.display);
                    b.raw(b"</td><td>");
                }
            }
            b.raw(b"</td></tr>");
        }
        b.raw(b"</table>");
        end_narrative(b);
        b.raw(b",\"status\":\"final\",\"category\":[");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/v2-0074",
            "LAB",
            "Laboratory",
        );
        b.raw(b"],\"code\":");
        concept(b, LOINC, code);
        b.raw(b",\"subject\":");
        self.patient_ref(b, p);
        b.raw(b",\"encounter\":");
        b.reference(Rt::Encounter.name(), &enc.id);
        b.raw(b",\"effectiveDateTime\":");
        b.datetime(t);
        b.raw(b",\"issued\":");
        let issued = t + self.rng.between(3600, 2 * DAY);
        b.instant(issued, self.rng.below(1000) as u32);
        b.raw(b",\"performer\":[");
        pool::org_ref(b, &enc.org);
        b.raw(b"],\"resultsInterpreter\":[");
        pool::prac_ref(b, &enc.prac);
        b.raw(b"],\"result\":[");
        for (n, r) in self.labs.iter().enumerate() {
            if n > 0 {
                b.push(b',');
            }
            reference(b, Rt::Observation, &r.id, Some(r.display));
        }
        b.raw(b"]}");
        self.put(Rt::DiagnosticReport, report, b, sink)?;

        // The lab's own provenance: it authored the report and its results.
        let prov = self.next_id(Rt::Provenance);
        b.clear();
        begin(b, Rt::Provenance, &prov, P_PROVENANCE);
        b.raw(b",\"target\":[");
        b.reference(Rt::DiagnosticReport.name(), &report);
        for r in &self.labs {
            b.push(b',');
            b.reference(Rt::Observation.name(), &r.id);
        }
        patient_target(b, p);
        b.raw(b"],\"occurredDateTime\":");
        b.datetime(t);
        b.raw(b",\"recorded\":");
        b.instant(issued, 0);
        b.raw(b",\"activity\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "CREATE",
            "create",
        );
        b.raw(b",\"agent\":[{\"type\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
            "performer",
            "Performer",
        );
        b.raw(b",\"who\":");
        pool::org_ref(b, &enc.org);
        b.raw(b"}]}");
        sink.put(Rt::Provenance, b)
    }

    // ---- Procedure, MedicationRequest, Immunization ----------------------

    #[allow(clippy::too_many_arguments)]
    fn procedure(
        &mut self,
        p: &Person,
        enc: &Enc,
        code: &Code,
        reason: Option<Id>,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let id = self.next_id(Rt::Procedure);
        let start = enc.start + self.rng.between(5, 30) * 60;
        let end = start + self.rng.between(10, 90) * 60;
        b.clear();
        begin(b, Rt::Procedure, &id, P_PROCEDURE);
        if self.rng.chance(300) {
            begin_narrative(b);
            b.str_inner(code.display);
            b.raw(b" performed on ");
            b.date_inner(start);
            end_narrative(b);
        }
        b.raw(b",\"status\":\"completed\",\"code\":");
        concept(b, SNOMED, code);
        b.raw(b",\"subject\":");
        self.patient_ref(b, p);
        b.raw(b",\"encounter\":");
        b.reference(Rt::Encounter.name(), &enc.id);
        b.raw(b",\"performedPeriod\":");
        period(b, start, end);
        b.raw(b",\"performer\":[{\"actor\":");
        pool::prac_ref(b, &enc.prac);
        b.raw(b",\"onBehalfOf\":");
        pool::org_ref(b, &enc.org);
        b.raw(b"}]");
        if let Some(reason) = reason {
            b.raw(b",\"reasonReference\":[");
            b.reference(Rt::Condition.name(), &reason);
            b.push(b']');
        }
        if self.rng.chance(200) {
            b.raw(b",\"bodySite\":[");
            let site = self.rng.pick(&codes::BODY_SITES);
            concept(b, SNOMED, &site);
            b.push(b']');
        }
        b.push(b'}');
        self.plan.push((Plan::Procedure, code.display));
        self.put(Rt::Procedure, id, b, sink)
    }

    #[allow(clippy::too_many_arguments)]
    fn medication(
        &mut self,
        p: &Person,
        enc: &Enc,
        med: &Code,
        reason: Option<Id>,
        chronic: bool,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let id = self.next_id(Rt::MedicationRequest);
        let authored = enc.start + self.rng.between(10, 40) * 60;
        let status = if chronic && p.death.is_none() && authored > RECORD_END - YEAR {
            "active"
        } else if self.rng.chance(150) {
            "stopped"
        } else {
            "completed"
        };
        let per_day = 1 + self.rng.below(3);
        let days = if chronic { 90 } else { 5 + self.rng.below(10) };
        b.clear();
        begin(b, Rt::MedicationRequest, &id, P_MEDREQ);
        b.raw(b",\"status\":\"");
        b.raw(status.as_bytes());
        b.raw(b"\",\"intent\":\"order\",\"category\":[");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
            "community",
            "Community",
        );
        b.raw(b"],\"medicationCodeableConcept\":");
        concept(b, RXNORM, med);
        b.raw(b",\"subject\":");
        self.patient_ref(b, p);
        b.raw(b",\"encounter\":");
        b.reference(Rt::Encounter.name(), &enc.id);
        b.raw(b",\"authoredOn\":");
        b.datetime(authored);
        b.raw(b",\"requester\":");
        pool::prac_ref(b, &enc.prac);
        if let Some(reason) = reason {
            b.raw(b",\"reasonReference\":[");
            b.reference(Rt::Condition.name(), &reason);
            b.push(b']');
        }
        b.raw(b",\"dosageInstruction\":[{\"sequence\":1,\"text\":\"Take 1 by mouth ");
        b.uint(per_day);
        b.raw(b" time(s) daily\",\"timing\":{\"repeat\":{\"frequency\":");
        b.uint(per_day);
        b.raw(b",\"period\":1,\"periodUnit\":\"d\"}},\"asNeededBoolean\":");
        b.raw(if chronic { b"false" } else { b"true" });
        b.raw(b",\"doseAndRate\":[{\"type\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/dose-rate-type",
            "ordered",
            "Ordered",
        );
        b.raw(
            b",\"doseQuantity\":{\"value\":1}}]}],\"dispenseRequest\":{\"numberOfRepeatsAllowed\":",
        );
        b.uint(if chronic { 3 } else { 0 });
        b.raw(b",\"quantity\":{\"value\":");
        b.uint(per_day * days);
        b.raw(b",\"unit\":\"{tbl}\",\"system\":\"http://unitsofmeasure.org\",\"code\":\"{tbl}\"},\"expectedSupplyDuration\":{\"value\":");
        b.uint(days);
        b.raw(b",\"unit\":\"days\",\"system\":\"http://unitsofmeasure.org\",\"code\":\"d\"}}}");
        self.plan.push((Plan::Medication, med.display));
        self.put(Rt::MedicationRequest, id, b, sink)
    }

    fn immunization(
        &mut self,
        p: &Person,
        enc: &Enc,
        vaccine: &Code,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        let id = self.next_id(Rt::Immunization);
        let t = enc.start + self.rng.between(10, 40) * 60;
        b.clear();
        begin(b, Rt::Immunization, &id, P_IMMUNIZATION);
        b.raw(b",\"status\":\"completed\",\"vaccineCode\":");
        concept(b, CVX, vaccine);
        b.raw(b",\"patient\":");
        self.patient_ref(b, p);
        b.raw(b",\"encounter\":");
        b.reference(Rt::Encounter.name(), &enc.id);
        b.raw(b",\"occurrenceDateTime\":");
        b.datetime(t);
        b.raw(b",\"recorded\":");
        b.datetime(t);
        b.raw(b",\"primarySource\":true,\"location\":");
        // No Location resources exist; a display-only reference keeps every
        // literal reference resolvable.
        b.raw(b"{\"display\":\"");
        b.str_inner(enc.org.place);
        b.push(b' ');
        b.str_inner(enc.org.kind.0);
        b.raw(b"\"},\"lotNumber\":\"");
        b.padded(self.rng.below(100_000), 5);
        b.push(if self.rng.chance(500) { b'A' } else { b'B' });
        b.raw(b"\",\"site\":");
        let left = self.rng.chance(500);
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/v3-ActSite",
            if left { "LA" } else { "RA" },
            if left { "left arm" } else { "right arm" },
        );
        b.raw(b",\"route\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration",
            "IM",
            "Injection, intramuscular",
        );
        b.raw(b",\"doseQuantity\":");
        quantity(b, 5, 1, "mL");
        b.raw(b",\"performer\":[{\"function\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/v2-0443",
            "AP",
            "Administering Provider",
        );
        b.raw(b",\"actor\":");
        pool::prac_ref(b, &enc.prac);
        b.raw(b"}]}");
        self.plan.push((Plan::Immunization, vaccine.display));
        self.put(Rt::Immunization, id, b, sink)
    }

    // ---- DocumentReference -----------------------------------------------

    fn write_note(&mut self, p: &Person, enc: &Enc, doc_type: &Code) {
        let n = &mut self.note;
        n.clear();
        n.date_inner(enc.start);
        n.raw(b"\n\n# ");
        n.raw(doc_type.display.as_bytes());
        n.raw(b"\n\n# Chief Complaint\n");
        let complaint = self
            .plan
            .iter()
            .find(|(kind, _)| matches!(kind, Plan::Condition));
        match complaint {
            Some((_, c)) => n.raw(c.as_bytes()),
            None => n.raw(b"No complaints."),
        }
        n.raw(b"\n\n# History of Present Illness\n");
        n.raw(p.given.as_bytes());
        n.raw(b" is a ");
        n.uint(enc.age.max(0).unsigned_abs());
        n.raw(b" year-old ");
        n.raw(if p.ethnicity == 1 {
            b"hispanic "
        } else {
            b"non-hispanic "
        });
        lower_into(n, codes::RACES[p.race].1);
        n.raw(if p.male { b" male." } else { b" female." });
        if !self.chronic.is_empty() {
            n.raw(b" Patient has a history of ");
            for (k, c) in self.chronic.iter().enumerate() {
                if k > 0 {
                    n.raw(b", ");
                }
                lower_into(n, codes::CHRONIC[c.index].code.display);
            }
            n.push(b'.');
        }
        n.raw(b"\n\n# Social History\n");
        // Status at the time of the note, not today's.
        let marital = if enc.age < 18 { 1 } else { p.marital };
        let smoker = if enc.age < 16 { 0 } else { p.smoker };
        n.raw(match marital {
            0 => b"Patient is married." as &[u8],
            2 => b"Patient is divorced.",
            3 => b"Patient is widowed.",
            _ => b"Patient has never married.",
        });
        n.raw(match smoker {
            0 => b" Patient has never smoked." as &[u8],
            1 => b" Patient is an ex-smoker.",
            _ => b" Patient is an active smoker.",
        });
        n.raw(b"\nPatient comes from a middle socioeconomic background.\nPatient currently has private insurance.\n\n# Allergies\nNo Known Allergies.\n\n# Medications\n");
        let mut any = false;
        for (kind, d) in &self.plan {
            if matches!(kind, Plan::Medication) {
                n.raw(d.as_bytes());
                n.raw(b"; ");
                any = true;
            }
        }
        if !any {
            n.raw(b"No active medications.");
        }
        n.raw(b"\n\n# Assessment and Plan\nSeen by Dr. ");
        n.raw(enc.prac.given.as_bytes());
        n.push(b' ');
        n.raw(enc.prac.family.as_bytes());
        n.raw(b" at ");
        n.raw(enc.org.place.as_bytes());
        n.push(b' ');
        n.raw(enc.org.kind.0.as_bytes());
        n.raw(b".\n\n## Plan\n");
        for (heading, want) in [
            (&b"The following conditions were diagnosed:\n"[..], 0u8),
            (b"The following procedures were conducted:\n", 1),
            (
                b"The patient was prescribed the following medications:\n",
                2,
            ),
            (b"The patient was given the following immunizations:\n", 3),
        ] {
            let mut first = true;
            for (kind, d) in &self.plan {
                let k = match kind {
                    Plan::Condition => 0u8,
                    Plan::Procedure => 1,
                    Plan::Medication => 2,
                    Plan::Immunization => 3,
                };
                if k == want {
                    if first {
                        n.raw(heading);
                        first = false;
                    }
                    n.raw(b"- ");
                    n.raw(d.as_bytes());
                    n.push(b'\n');
                }
            }
        }
    }

    fn document(
        &mut self,
        p: &Person,
        enc: &Enc,
        doc_type: &Code,
        b: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> io::Result<()> {
        self.write_note(p, enc, doc_type);
        let id = self.next_id(Rt::DocumentReference);
        b.clear();
        begin(b, Rt::DocumentReference, &id, P_DOCREF);
        b.raw(b",\"identifier\":[{\"system\":\"urn:ietf:rfc:3986\",\"value\":\"urn:uuid:");
        b.raw(&id);
        b.raw(b"\"}],\"status\":\"current\",\"type\":{\"coding\":[");
        coding(b, LOINC, doc_type.code, doc_type.display);
        b.raw(b"],\"text\":");
        b.str(doc_type.display);
        b.raw(b"},\"category\":[");
        concept_no_text(
            b,
            "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "clinical-note",
            "Clinical Note",
        );
        b.raw(b"],\"subject\":");
        self.patient_ref(b, p);
        b.raw(b",\"date\":");
        b.instant(enc.end, 0);
        b.raw(b",\"author\":[");
        pool::prac_ref(b, &enc.prac);
        b.raw(b"],\"custodian\":");
        pool::org_ref(b, &enc.org);
        b.raw(b",\"content\":[{\"attachment\":{\"contentType\":\"text/plain; charset=utf-8\",\"data\":\"");
        b.base64(&self.note);
        b.raw(b"\"},\"format\":");
        b.raw(br#"{"system":"http://ihe.net/fhir/ValueSet/IHE.FormatCode.codesystem","code":"urn:ihe:iti:xds:2017:mimeTypeSufficient","display":"mimeType Sufficient"}"#);
        b.raw(b"}],\"context\":{\"encounter\":[");
        b.reference(Rt::Encounter.name(), &enc.id);
        b.raw(b"],\"period\":");
        period(b, enc.start, enc.end);
        b.raw(b"}}");
        self.put(Rt::DocumentReference, id, b, sink)?;

        // Clinical notes carry their own attestation, separate from the
        // encounter's record-keeping provenance.
        let prov = self.next_id(Rt::Provenance);
        b.clear();
        begin(b, Rt::Provenance, &prov, P_PROVENANCE);
        b.raw(b",\"target\":[");
        b.reference(Rt::DocumentReference.name(), &id);
        patient_target(b, p);
        b.raw(b"],\"recorded\":");
        b.instant(enc.end, 0);
        b.raw(b",\"activity\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "CREATE",
            "create",
        );
        b.raw(b",\"agent\":[{\"type\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
            "attester",
            "Attester",
        );
        b.raw(b",\"who\":");
        pool::prac_ref(b, &enc.prac);
        b.raw(b",\"onBehalfOf\":");
        pool::org_ref(b, &enc.org);
        b.raw(b"}],\"signature\":[{\"type\":[");
        coding(
            b,
            "urn:iso-astm:E1762-95:2013",
            "1.2.840.10065.1.12.1.5",
            "Verification Signature",
        );
        b.raw(b"],\"when\":");
        b.instant(enc.end, 0);
        b.raw(b",\"who\":");
        pool::prac_ref(b, &enc.prac);
        b.raw(b"}]}");
        sink.put(Rt::Provenance, b)
    }

    // ---- Provenance ------------------------------------------------------

    /// Who recorded the encounter and everything produced during it.
    fn provenance(&mut self, p: &Person, enc: &Enc, id: Id, b: &mut Vec<u8>) {
        begin(b, Rt::Provenance, &id, P_PROVENANCE);
        b.raw(b",\"target\":[");
        for (n, (rt, target)) in self.refs.iter().enumerate() {
            if n > 0 {
                b.push(b',');
            }
            b.reference(rt.name(), target);
        }
        patient_target(b, p);
        b.raw(b"],\"occurredPeriod\":");
        period(b, enc.start, enc.end);
        b.raw(b",\"recorded\":");
        b.instant(enc.end, 0);
        b.raw(b",\"activity\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "CREATE",
            "create",
        );
        b.raw(b",\"agent\":[{\"type\":");
        concept_no_text(
            b,
            "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
            "author",
            "Author",
        );
        b.raw(b",\"who\":");
        pool::prac_ref(b, &enc.prac);
        b.raw(b",\"onBehalfOf\":");
        pool::org_ref(b, &enc.org);
        b.raw(b"},{\"type\":");
        concept_no_text(
            b,
            "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type",
            "transmitter",
            "Transmitter",
        );
        b.raw(b",\"who\":");
        pool::org_ref(b, &enc.org);
        b.raw(b"}]}");
    }
}

fn lower_into(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().map(|c| c.to_ascii_lowercase()));
}

/// Appends the patient to a Provenance's (non-empty) target list.
///
/// R4 places a Provenance in a Patient compartment only through a `target`
/// that is the Patient (as Synthea's own Provenance does); without it,
/// patient-level `$export` would silently leave every Provenance out.
fn patient_target(b: &mut Vec<u8>, p: &Person) {
    b.push(b',');
    b.reference(Rt::Patient.name(), &p.id);
}
