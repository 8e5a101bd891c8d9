//! Prints the resource mix, size and throughput of a generated population:
//! `cargo run --release -p hearth-synth --example synth_stats -- [patients] [seed]`

use std::time::Instant;

use hearth_synth::{SynthConfig, generate};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let patients = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let seed = args.next().and_then(|a| a.parse().ok()).unwrap_or(42);
    let config = SynthConfig { patients, seed };

    // Per-patient resource counts, to show the spread between patients.
    let mut per_patient: Vec<u64> = Vec::new();
    let started = Instant::now();
    let summary = generate(&config, &mut |rt, _json| {
        match rt {
            "Patient" => per_patient.push(1),
            "Organization" | "Practitioner" | "Group" => {}
            _ => {
                if let Some(last) = per_patient.last_mut() {
                    *last += 1;
                }
            }
        }
        Ok(())
    })?;
    let elapsed = started.elapsed().as_secs_f64();

    println!("patients: {patients}, seed: {seed}");
    for (rt, n) in &summary.by_type {
        println!(
            "  {rt:<18} {n:>10}  {:>5.1} %",
            100.0 * *n as f64 / summary.resources as f64
        );
    }
    per_patient.sort_unstable();
    let pct = |p: usize| {
        per_patient
            .get(per_patient.len() * p / 100)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "resources: {}  bytes: {}  bytes/resource: {:.0}  resources/patient: {:.0}  bytes/patient: {:.0}",
        summary.resources,
        summary.bytes,
        summary.bytes as f64 / summary.resources as f64,
        summary.resources as f64 / patients.max(1) as f64,
        summary.bytes as f64 / patients.max(1) as f64,
    );
    println!(
        "resources per patient: min {} p10 {} median {} p90 {} max {}",
        per_patient.first().copied().unwrap_or(0),
        pct(10),
        pct(50),
        pct(90),
        per_patient.last().copied().unwrap_or(0),
    );
    println!(
        "time: {elapsed:.3} s  {:.0} resources/s  {:.1} MB/s",
        summary.resources as f64 / elapsed,
        summary.bytes as f64 / elapsed / 1e6
    );
    Ok(())
}
