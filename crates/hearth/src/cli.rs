//! Subcommands and their flags (each flag also reads a `HEARTH_*` variable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hearth_load::{BatchLimits, LoadObserver, LoadReport, Rejection, Target};
use hearth_server::{Embedded, ExportSettings, FHIR_PATH, ServerConfig};
use hearth_store::Backend;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "hearth",
    version,
    about = "Hearth: a FHIR R4 server built for Bulk Data export"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the FHIR server.
    Serve(ServeArgs),
    /// Load NDJSON, gzip NDJSON or Bundle files into a data directory or a running server.
    Load(LoadArgs),
    /// Write a deterministic synthetic population as NDJSON, one file per resource type.
    Synth(SynthArgs),
    /// Fill an empty data directory with a synthetic population, then serve it.
    Demo(DemoArgs),
    /// Download a Bulk Data export from any FHIR server: kick-off, polling, parallel downloads.
    Export(crate::export_cmd::ExportArgs),
    /// Register, list and remove SMART Backend Services clients (for `serve --auth smart`).
    Clients(crate::clients_cmd::ClientsArgs),
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HEARTH_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Data directory: the SQLite database and export files live here.
    #[arg(long, env = "HEARTH_DATA", default_value = "./hearth-data")]
    data: PathBuf,
    /// PostgreSQL database (postgres://user@host:port/db) shared by several Hearth processes,
    /// in place of the embedded SQLite store in the data directory.
    #[arg(long, env = "HEARTH_DATABASE")]
    database: Option<String>,
    /// Public FHIR base URL (default http://<addr>/fhir).
    #[arg(long, env = "HEARTH_BASE_URL")]
    base_url: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "HEARTH_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Log format.
    #[arg(long, env = "HEARTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Export worker threads (default: the number of cores).
    #[arg(long, env = "HEARTH_EXPORT_WORKERS")]
    export_workers: Option<usize>,
    /// Export files roll over before they exceed this many bytes.
    #[arg(long, env = "HEARTH_MAX_FILE_BYTES", default_value_t = 256 * 1024 * 1024)]
    max_file_bytes: u64,
    /// How long export files and jobs are kept after completion (e.g. 24h, 90m, 3600s).
    #[arg(long, env = "HEARTH_EXPORT_TTL", default_value = "24h", value_parser = parse_duration)]
    export_ttl: Duration,
    /// Unfinished exports one client may have before kick-offs answer 429.
    #[arg(long, env = "HEARTH_MAX_ACTIVE_EXPORTS", default_value_t = 16)]
    max_active_exports: u64,
    /// Planned size of an export work unit, in resources: smaller units spread a job over more
    /// workers and lose less work to a crash.
    #[arg(long, env = "HEARTH_EXPORT_UNIT_ROWS", default_value_t = 100_000)]
    export_unit_rows: u64,
    /// Seconds a claimed export unit stays claimed without a renewal; other processes take
    /// over a dead one's units after that. Hidden: deployments keep the default; tests
    /// shorten it so that a killed process's units are taken over within seconds.
    #[arg(
        long,
        env = "HEARTH_EXPORT_LEASE_SECS",
        default_value_t = hearth_export::DEFAULT_LEASE.as_secs(),
        hide = true
    )]
    export_lease_secs: u64,
    /// How export workers share the CPU with request handling: `idle` runs them only on CPU
    /// time requests leave free (lowest request latency, but no export progress while requests
    /// saturate the CPU); `low` keeps them a small share at nice 10.
    #[arg(long, env = "HEARTH_EXPORT_PRIORITY", value_enum, default_value_t = ExportPriority::Idle)]
    export_priority: ExportPriority,
    /// Accept export kick-offs that have no Accept header.
    #[arg(long, env = "HEARTH_LENIENT_HEADERS")]
    lenient_headers: bool,
    #[command(flatten)]
    security: crate::security_args::SecurityArgs,
    #[command(flatten)]
    output: crate::output_args::OutputArgs,
}

/// `90`, `90s`, `15m`, `24h` or `2d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 24h"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => return Err(format!("'{text}': use s, m, h or d")),
    };
    Ok(Duration::from_secs(seconds))
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum ExportPriority {
    Idle,
    Low,
}

impl From<ExportPriority> for hearth_export::WorkerPriority {
    fn from(priority: ExportPriority) -> Self {
        match priority {
            ExportPriority::Idle => Self::Idle,
            ExportPriority::Low => Self::Low,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Files or directories (.ndjson, .ndjson.gz, .json Bundles).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Write straight into this data directory (the server must not be running on it).
    #[arg(long, env = "HEARTH_DATA", conflicts_with = "server")]
    data: Option<PathBuf>,
    /// Write straight into this PostgreSQL database (postgres://…); servers may be running on it.
    #[arg(long, env = "HEARTH_DATABASE", conflicts_with_all = ["server", "data"])]
    database: Option<String>,
    /// Send through the HTTP API of a running server (its FHIR base URL).
    #[arg(long, env = "HEARTH_SERVER")]
    server: Option<String>,
    /// Resources per batch (default: 2,000; 10,000 into PostgreSQL).
    #[arg(long)]
    batch_resources: Option<usize>,
}

#[derive(Args, Debug)]
struct SynthArgs {
    /// Number of patients.
    #[arg(long, default_value_t = 100)]
    patients: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Seed; the same seed gives byte-identical output.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Patients to synthesize when the data directory is empty.
    #[arg(long, default_value_t = 100)]
    patients: u64,
    #[command(flatten)]
    serve: ServeArgs,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            serve(args).await
        }
        Command::Load(args) => load(args).await,
        Command::Synth(args) => {
            let started = Instant::now();
            let summary = hearth_synth::write_ndjson_dir(
                &hearth_synth::SynthConfig {
                    patients: args.patients,
                    seed: args.seed,
                },
                &args.out,
            )
            .with_context(|| format!("writing {}", args.out.display()))?;
            for (resource_type, count) in &summary.by_type {
                println!("{resource_type:<24} {count:>10}");
            }
            println!(
                "{} resources, {} bytes in {:.1?} to {}",
                summary.resources,
                summary.bytes,
                started.elapsed(),
                args.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            init_logging(args.serve.log_format);
            demo(args).await
        }
        Command::Export(args) => crate::export_cmd::run(args).await,
        Command::Clients(args) => crate::clients_cmd::run(args).await,
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(args.database.as_deref(), &args.data).await?;
    serve_store(args, store).await
}

pub(crate) async fn open_store(
    database: Option<&str>,
    data: &Path,
) -> anyhow::Result<Arc<dyn Backend>> {
    hearth_store::open(database, data)
        .await
        .with_context(|| match database {
            Some(_) => "opening the database".to_owned(),
            None => format!("opening the data directory {}", data.display()),
        })
}

async fn serve_store(args: ServeArgs, store: Arc<dyn Backend>) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let local = listener.local_addr()?;
    let auth = args.security.auth_settings()?;
    let output = args.output.output().await?;
    let options = args.security.serve_options()?;
    let scheme = if args.security.tls() { "https" } else { "http" };
    let base_url = args
        .base_url
        .unwrap_or_else(|| format!("{scheme}://{local}{FHIR_PATH}"))
        .trim_end_matches('/')
        .to_owned();
    let export = ExportSettings {
        workers: args
            .export_workers
            .unwrap_or(ExportSettings::default().workers),
        max_file_bytes: args.max_file_bytes,
        ttl: args.export_ttl,
        max_active_exports: args.max_active_exports,
        rows_per_unit: args.export_unit_rows.max(1),
        lease: Duration::from_secs(args.export_lease_secs.max(1)),
        worker_priority: args.export_priority.into(),
        output,
    };
    let workers = export.workers;
    let config = ServerConfig {
        base_url: base_url.clone(),
        max_body_bytes: args.max_body_bytes,
        lenient_headers: args.lenient_headers,
    };
    let embedded = Embedded::start_secured(store, &args.data, config, export, &auth)
        .await
        .context("starting the export engine")?;
    let state = embedded
        .state
        .clone()
        .with_poll_throttle(args.security.throttle_polls);
    tracing::info!(%base_url, data = %args.data.display(), workers, auth = ?auth.kind,
        tls = options.tls.is_some(), "Hearth is serving FHIR R4");
    hearth_server::serve_with(listener, state, options, shutdown_signal()).await?;
    embedded.shutdown().await.context("closing the store")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Shows a progress line on a terminal and prints rejections as `file:line: reason`.
struct ConsoleObserver {
    bar: ProgressBar,
    started: Instant,
}

impl ConsoleObserver {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {pos} resources ({per_sec}) {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            bar,
            started: Instant::now(),
        }
    }
}

impl LoadObserver for ConsoleObserver {
    fn progress(&mut self, report: &LoadReport) {
        self.bar.set_position(report.loaded);
        self.bar
            .set_message(format!("{:.1} MB read", report.bytes as f64 / 1e6));
    }

    fn rejected(&mut self, rejection: &Rejection) {
        self.bar
            .suspend(|| eprintln!("{}: {}", rejection.origin, rejection.reason));
    }
}

async fn load_into(
    paths: &[PathBuf],
    target: Target,
    limits: BatchLimits,
) -> anyhow::Result<(LoadReport, Duration)> {
    let files = hearth_load::expand_paths(paths)?;
    let mut observer = ConsoleObserver::new();
    let report = hearth_load::load(files, target, limits, &mut observer).await?;
    observer.bar.finish_and_clear();
    Ok((report, observer.started.elapsed()))
}

fn print_summary(report: &LoadReport, elapsed: Duration) {
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}",
        "type", "created", "updated", "unchanged", "deleted"
    );
    for (resource_type, c) in &report.by_type {
        println!(
            "{resource_type:<24} {:>10} {:>10} {:>10} {:>10}",
            c.created, c.updated, c.unchanged, c.deleted
        );
    }
    let seconds = elapsed.as_secs_f64().max(1e-9);
    println!(
        "loaded {} resources from {} files ({:.1} MB) in {:.2} s: {:.0} resources/s; rejected {}",
        report.loaded,
        report.files,
        report.bytes as f64 / 1e6,
        seconds,
        report.loaded as f64 / seconds,
        report.rejected
    );
}

async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let limits = match args.database {
        // Each PostgreSQL batch pays a commit flush and a few round trips: larger ones load
        // faster (300k Synthea-like resources: 31k/s at 2,000, 39k/s at 10,000).
        Some(_) => BatchLimits {
            resources: 10_000,
            bytes: 16 * 1024 * 1024,
        },
        None => BatchLimits::default(),
    };
    let limits = BatchLimits {
        resources: args.batch_resources.unwrap_or(limits.resources).max(1),
        ..limits
    };
    let (report, elapsed) = match (&args.data, &args.server) {
        (_, Some(server)) => {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()?;
            let target = Target::Server {
                base_url: server.clone(),
                client,
            };
            load_into(&args.paths, target, limits).await?
        }
        (data, None) => {
            let data = data
                .clone()
                .unwrap_or_else(|| PathBuf::from("./hearth-data"));
            let store = open_store(args.database.as_deref(), &data).await?;
            let result = load_into(&args.paths, Target::Store(store.clone()), limits).await;
            store.close().await.context("closing the store")?;
            result?
        }
    };
    print_summary(&report, elapsed);
    Ok(if report.rejected > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(args.serve.database.as_deref(), &args.serve.data).await?;
    if store.seq_at(i64::MAX).await? == 0 {
        let synth_dir = args.serve.data.join("demo-ndjson");
        tracing::info!(patients = args.patients, dir = %synth_dir.display(), "synthesizing a demo population");
        let config = hearth_synth::SynthConfig {
            patients: args.patients,
            seed: 1,
        };
        let dir = synth_dir.clone();
        tokio::task::spawn_blocking(move || hearth_synth::write_ndjson_dir(&config, &dir))
            .await?
            .context("synthesizing the demo population")?;
        let (report, elapsed) = load_into(
            std::slice::from_ref(&synth_dir),
            Target::Store(store.clone()),
            BatchLimits::default(),
        )
        .await?;
        print_summary(&report, elapsed);
        let _ = std::fs::remove_dir_all(&synth_dir);
    } else {
        tracing::info!("the data directory already holds data; serving it as it is");
    }
    serve_store(args.serve, store).await
}
