//! Properties of the generated population that consumers (import, export,
//! benchmarks) rely on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;

use hearth_synth::{Summary, SynthConfig, generate, write_ndjson_dir};
use serde_json::Value;

type Resources = Vec<(&'static str, Vec<u8>)>;

fn collect(patients: u64, seed: u64) -> (Resources, Summary) {
    let mut out = Vec::new();
    let summary = generate(&SynthConfig { patients, seed }, &mut |rt, json| {
        out.push((rt, json.to_vec()));
        Ok(())
    })
    .expect("generation succeeds");
    (out, summary)
}

fn parse(resources: &Resources) -> Vec<(&'static str, Value)> {
    resources
        .iter()
        .map(|(rt, json)| {
            let v: Value = serde_json::from_slice(json).expect("valid JSON");
            (*rt, v)
        })
        .collect()
}

fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Every `"reference"` string anywhere inside `v`.
fn references<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("reference", Value::String(s)) => out.push(s),
                    _ => references(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| references(i, out)),
        _ => {}
    }
}

/// Every string that starts like a FHIR date (`YYYY-MM-DD…`).
fn dates<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => map.values().for_each(|c| dates(c, out)),
        Value::Array(items) => items.iter().for_each(|i| dates(i, out)),
        Value::String(s) => {
            let b = s.as_bytes();
            if b.len() >= 10
                && b[..4].iter().all(u8::is_ascii_digit)
                && b[4] == b'-'
                && b[7] == b'-'
            {
                out.push(s);
            }
        }
        _ => {}
    }
}

fn reference_str<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

#[test]
fn same_seed_is_byte_identical_and_seeds_differ() {
    let (a, sa) = collect(12, 7);
    let (b, sb) = collect(12, 7);
    assert_eq!(a, b);
    assert_eq!(sa.bytes, sb.bytes);
    assert_eq!(sa.by_type, sb.by_type);
    let (c, _) = collect(12, 8);
    assert_ne!(a, c);
    // Different seeds must not just shuffle: the generated ids differ
    // (Groups have fixed, well-known ids).
    let ids = |r: &Resources| -> HashSet<String> {
        parse(r)
            .into_iter()
            .filter(|(rt, _)| *rt != "Group")
            .map(|(rt, v)| format!("{rt}/{}", v["id"].as_str().unwrap_or_default()))
            .collect()
    };
    assert!(ids(&a).is_disjoint(&ids(&c)));
}

#[test]
fn every_resource_is_compact_json_with_type_and_unique_valid_id() {
    let (resources, summary) = collect(20, 1);
    let parsed = parse(&resources);
    let mut seen: HashMap<&str, HashSet<String>> = HashMap::new();
    let mut bytes = 0u64;
    for ((rt, json), (_, v)) in resources.iter().zip(&parsed) {
        assert!(!json.contains(&b'\n'), "no raw newline inside a resource");
        assert_eq!(json.first(), Some(&b'{'));
        assert_eq!(v["resourceType"], *rt);
        let id = v["id"].as_str().expect("id");
        assert!(is_fhir_id(id), "{rt}/{id}");
        assert!(
            seen.entry(rt).or_default().insert(id.to_owned()),
            "duplicate {rt}/{id}"
        );
        assert!(
            v.pointer("/meta/profile/0").is_some() || v.pointer("/meta/tag/0").is_some(),
            "{rt} has meta"
        );
        bytes += json.len() as u64;
    }
    assert_eq!(summary.resources, resources.len() as u64);
    assert_eq!(summary.bytes, bytes);
    let by_type: BTreeMap<&str, u64> = seen.iter().map(|(k, v)| (*k, v.len() as u64)).collect();
    assert_eq!(summary.by_type, by_type);
    for rt in [
        "Patient",
        "Practitioner",
        "Organization",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "Procedure",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "Provenance",
        "Group",
    ] {
        assert!(
            by_type.get(rt).copied().unwrap_or(0) > 0,
            "{rt} is generated"
        );
    }
}

#[test]
fn references_resolve_and_link_patient_encounter_and_results() {
    let (resources, _) = collect(20, 3);
    let parsed = parse(&resources);
    let known: HashSet<String> = parsed
        .iter()
        .map(|(rt, v)| format!("{rt}/{}", v["id"].as_str().unwrap_or_default()))
        .collect();
    let mut checked = 0;
    for (rt, v) in &parsed {
        let mut refs = Vec::new();
        references(v, &mut refs);
        for r in refs {
            assert!(known.contains(r), "{rt} cites missing {r}");
            checked += 1;
        }
        let patient = match *rt {
            "Immunization" => reference_str(v, "/patient/reference"),
            "Encounter" | "Observation" | "Condition" | "MedicationRequest" | "Procedure"
            | "DiagnosticReport" | "DocumentReference" => reference_str(v, "/subject/reference"),
            _ => Some("Patient/"),
        };
        assert!(
            patient.is_some_and(|p| p.starts_with("Patient/")),
            "{rt} references its patient"
        );
        let encounter = match *rt {
            "Observation" | "Condition" | "MedicationRequest" | "Procedure" | "Immunization"
            | "DiagnosticReport" => reference_str(v, "/encounter/reference"),
            "DocumentReference" => reference_str(v, "/context/encounter/0/reference"),
            _ => Some("Encounter/"),
        };
        assert!(
            encounter.is_some_and(|e| e.starts_with("Encounter/")),
            "{rt} references its encounter"
        );
        if *rt == "DiagnosticReport" {
            let results = v["result"].as_array().expect("result");
            assert!(!results.is_empty());
            for r in results {
                assert!(
                    r["reference"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("Observation/"))
                );
            }
        }
        if *rt == "Provenance" {
            assert!(!v["target"].as_array().expect("target").is_empty());
            let agents = v["agent"].as_array().expect("agent");
            assert!(agents.iter().all(|a| {
                a["who"]["reference"].as_str().is_some_and(|w| {
                    w.starts_with("Practitioner/") || w.starts_with("Organization/")
                })
            }));
        }
        if *rt == "DocumentReference" {
            let attachment = &v["content"][0]["attachment"];
            assert!(
                attachment["contentType"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("text/plain"))
            );
            assert!(attachment["data"].as_str().is_some_and(|d| !d.is_empty()));
        }
    }
    assert!(checked > 10_000, "checked {checked} references");

    // Each encounter has a Provenance that targets it and its own resources.
    let mut encounter_targets: HashMap<&str, usize> = HashMap::new();
    for (rt, v) in &parsed {
        if *rt == "Provenance" {
            for t in v["target"].as_array().into_iter().flatten() {
                if let Some(r) = t["reference"]
                    .as_str()
                    .filter(|r| r.starts_with("Encounter/"))
                {
                    *encounter_targets.entry(r).or_default() += 1;
                }
            }
        }
    }
    let encounters = parsed.iter().filter(|(rt, _)| *rt == "Encounter").count();
    assert_eq!(encounter_targets.len(), encounters);
    assert!(encounter_targets.values().all(|n| *n == 1));
}

#[test]
fn dates_are_in_the_past() {
    let (resources, _) = collect(30, 11);
    let mut all = Vec::new();
    for (_, v) in parse(&resources) {
        let mut ds = Vec::new();
        dates(&v, &mut ds);
        all.extend(ds.into_iter().map(str::to_owned));
    }
    assert!(all.len() > 10_000);
    let latest = all.iter().max().cloned().unwrap_or_default();
    let earliest = all.iter().min().cloned().unwrap_or_default();
    assert!(latest.as_str() < "2026-01-01", "latest date {latest}");
    assert!(
        earliest.as_str() >= "1925-01-01",
        "earliest date {earliest}"
    );
    // Spread over many years, not bunched up.
    let years: HashSet<&str> = all.iter().map(|d| &d[..4]).collect();
    assert!(years.len() > 50, "{} distinct years", years.len());
}

#[test]
fn output_order_is_pool_then_patients_then_groups() {
    let (resources, summary) = collect(25, 5);
    let types: Vec<&str> = resources.iter().map(|(rt, _)| *rt).collect();
    let pool = summary.by_type["Organization"] as usize;
    assert_eq!(pool, 3, "one organization per 10 patients, rounded up");
    assert_eq!(summary.by_type["Practitioner"] as usize, pool);
    assert!(types[..pool].iter().all(|t| *t == "Organization"));
    assert!(types[pool..2 * pool].iter().all(|t| *t == "Practitioner"));
    assert_eq!(types[2 * pool], "Patient");
    let first_group = types.iter().position(|t| *t == "Group").expect("groups");
    assert!(types[first_group..].iter().all(|t| *t == "Group"));
    assert!(
        types[2 * pool..first_group]
            .iter()
            .all(|t| !matches!(*t, "Organization" | "Practitioner" | "Group"))
    );

    // Within a patient's block everything is about that patient.
    let parsed = parse(&resources);
    let mut current = String::new();
    for (rt, v) in &parsed[2 * pool..first_group] {
        if *rt == "Patient" {
            current = format!("Patient/{}", v["id"].as_str().unwrap_or_default());
            continue;
        }
        let subject = reference_str(v, "/subject/reference")
            .or_else(|| reference_str(v, "/patient/reference"));
        if let Some(s) = subject {
            assert_eq!(s, current);
        }
    }
}

#[test]
fn mix_and_size_resemble_synthea() {
    let patients = 50;
    let (resources, summary) = collect(patients, 42);
    let total = summary.resources as f64;
    let share = |rt: &str| 100.0 * summary.by_type.get(rt).copied().unwrap_or(0) as f64 / total;
    let expect = [
        ("Observation", 45.0, 51.0),
        ("Encounter", 8.0, 10.5),
        ("Procedure", 5.5, 8.5),
        ("Immunization", 3.0, 5.5),
        ("DiagnosticReport", 2.5, 5.0),
        ("Condition", 1.5, 4.0),
        ("MedicationRequest", 2.0, 4.5),
        ("DocumentReference", 2.0, 4.5),
        ("Provenance", 8.0, 20.0),
    ];
    for (rt, lo, hi) in expect {
        let s = share(rt);
        assert!((lo..=hi).contains(&s), "{rt}: {s:.1} % not in {lo}..{hi}");
    }
    let per_patient = total / patients as f64;
    let bytes_per_patient = summary.bytes as f64 / patients as f64;
    let bytes_per_resource = summary.bytes as f64 / total;
    assert!(
        (200.0..=420.0).contains(&per_patient),
        "{per_patient} resources/patient"
    );
    assert!(
        (280_000.0..=560_000.0).contains(&bytes_per_patient),
        "{bytes_per_patient} bytes/patient"
    );
    assert!(
        (1_100.0..=1_600.0).contains(&bytes_per_resource),
        "{bytes_per_resource} bytes/resource"
    );

    // Patients differ: some small records, some large ones.
    let mut counts = Vec::new();
    for (rt, _) in &resources {
        match *rt {
            "Patient" => counts.push(1u64),
            "Organization" | "Practitioner" | "Group" => {}
            _ => {
                if let Some(last) = counts.last_mut() {
                    *last += 1;
                }
            }
        }
    }
    assert_eq!(counts.len() as u64, patients);
    let min = counts.iter().min().copied().unwrap_or(0);
    let max = counts.iter().max().copied().unwrap_or(0);
    assert!(min < 80, "smallest record has {min} resources");
    assert!(max > 700, "largest record has {max} resources");
}

#[test]
fn groups_list_existing_patients() {
    for (patients, expected) in [
        (0u64, vec![]),
        (1, vec![("group-10", 1), ("all-patients", 1)]),
        (7, vec![("group-10", 7), ("all-patients", 7)]),
        (
            150,
            vec![("group-10", 10), ("group-100", 100), ("all-patients", 150)],
        ),
        (
            1000,
            vec![
                ("group-10", 10),
                ("group-100", 100),
                ("group-1000", 1000),
                ("all-patients", 1000),
            ],
        ),
    ] {
        let mut patient_ids = HashSet::new();
        let mut groups = Vec::new();
        generate(&SynthConfig { patients, seed: 9 }, &mut |rt, json| {
            // Only Patient and Group are parsed: keeps the 1000-patient case fast.
            match rt {
                "Patient" => {
                    let v: Value = serde_json::from_slice(json).map_err(io::Error::other)?;
                    patient_ids.insert(format!("Patient/{}", v["id"].as_str().unwrap_or_default()));
                }
                "Group" => {
                    groups.push(serde_json::from_slice::<Value>(json).map_err(io::Error::other)?)
                }
                _ => {}
            }
            Ok(())
        })
        .expect("generation succeeds");
        assert_eq!(patient_ids.len() as u64, patients);
        let got: Vec<(String, usize)> = groups
            .iter()
            .map(|g| {
                let members = g["member"].as_array().map_or(0, Vec::len);
                (g["id"].as_str().unwrap_or_default().to_owned(), members)
            })
            .collect();
        let want: Vec<(String, usize)> = expected
            .iter()
            .map(|(id, n)| ((*id).to_owned(), *n))
            .collect();
        assert_eq!(got, want, "{patients} patients");
        for g in &groups {
            assert_eq!(g["type"], "person");
            assert_eq!(g["actual"], true);
            let members = g["member"].as_array().expect("member");
            assert_eq!(g["quantity"].as_u64(), Some(members.len() as u64));
            let mut distinct = HashSet::new();
            for m in members {
                let r = m["entity"]["reference"].as_str().expect("entity");
                assert!(patient_ids.contains(r), "{} lists unknown {r}", g["id"]);
                assert!(distinct.insert(r), "{} lists {r} twice", g["id"]);
            }
        }
        if patients >= 10 {
            let sized = &groups[0];
            let members = sized["member"].as_array().expect("member");
            assert!(members.iter().any(|m| m["inactive"] == true));
            assert!(members.iter().any(|m| m.get("period").is_some()));
        }
    }
}

#[test]
fn emit_errors_stop_generation() {
    let mut calls = 0;
    let err = generate(
        &SynthConfig {
            patients: 5,
            seed: 1,
        },
        &mut |_, _| {
            calls += 1;
            if calls == 3 {
                Err(io::Error::other("disk full"))
            } else {
                Ok(())
            }
        },
    )
    .expect_err("error is propagated");
    assert_eq!(err.to_string(), "disk full");
    assert_eq!(calls, 3);
}

#[test]
fn ndjson_dir_matches_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("nested/out");
    let config = SynthConfig {
        patients: 15,
        seed: 4,
    };
    let summary = write_ndjson_dir(&config, &out).expect("write");
    let (resources, generated) = collect(config.patients, config.seed);
    assert_eq!(summary.by_type, generated.by_type);
    assert_eq!(summary.resources, generated.resources);

    let mut on_disk = 0u64;
    let mut expected: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for (rt, json) in &resources {
        let file = expected.entry(rt).or_default();
        file.extend_from_slice(json);
        file.push(b'\n');
    }
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let want: Vec<String> = expected.keys().map(|rt| format!("{rt}.ndjson")).collect();
    assert_eq!(names, want);
    for (rt, content) in &expected {
        let got = std::fs::read(out.join(format!("{rt}.ndjson"))).expect("read");
        assert!(got == *content, "{rt}.ndjson matches generate()");
        on_disk += got.len() as u64;
    }
    assert_eq!(summary.bytes, on_disk);

    // Rewriting into the same directory replaces rather than appends.
    write_ndjson_dir(&config, &out).expect("rewrite");
    let again = std::fs::read(out.join("Patient.ndjson")).expect("read");
    assert_eq!(again, expected["Patient"]);
}

/// `cargo test --release -p hearth-synth -- --ignored --nocapture throughput`
#[test]
#[ignore = "benchmark; run in release"]
fn throughput() {
    let config = SynthConfig {
        patients: 3000,
        seed: 42,
    };
    let started = std::time::Instant::now();
    let mut sink = 0u64;
    let summary = generate(&config, &mut |_, json| {
        // Touch the bytes so the work cannot be optimised away.
        sink = sink.wrapping_add(u64::from(json[json.len() / 2]));
        Ok(())
    })
    .expect("generation succeeds");
    let secs = started.elapsed().as_secs_f64();
    let rate = summary.resources as f64 / secs;
    println!(
        "{} resources, {} bytes in {secs:.3} s: {rate:.0} resources/s, {:.0} MB/s, {:.0} bytes/patient ({sink})",
        summary.resources,
        summary.bytes,
        summary.bytes as f64 / secs / 1e6,
        summary.bytes as f64 / config.patients as f64,
    );
    if !cfg!(debug_assertions) {
        assert!(rate >= 100_000.0, "{rate:.0} resources/s");
    }
}
