//! Writes a population as NDJSON files:
//! `cargo run --release -p hearth-synth --example synth_dir -- <dir> [patients] [seed]`

use std::path::PathBuf;
use std::time::Instant;

use hearth_synth::{SynthConfig, write_ndjson_dir};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "synth-out".into()));
    let patients = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let seed = args.next().and_then(|a| a.parse().ok()).unwrap_or(42);
    let started = Instant::now();
    let summary = write_ndjson_dir(&SynthConfig { patients, seed }, &dir)?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{} resources, {} bytes in {elapsed:.2} s ({:.0} resources/s) -> {}",
        summary.resources,
        summary.bytes,
        summary.resources as f64 / elapsed,
        dir.display()
    );
    Ok(())
}
