//! `hearth export`: flags → `hearth_client`, progress bars, Ctrl-C, exit status. The work
//! (kick-off, polling, downloads, state) is the client library's.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hearth_client::auth::{BackendServices, Credentials, SigningKey};
use hearth_client::{
    BulkClient, Cancelled, ClientOptions, ExportJob, ExportRequest, ExportSummary, Level, Manifest,
    PlannedFile, PollUpdate, Progress, SavedFile,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Url;

/// Exit status after Ctrl-C (128 + SIGINT), as shells report it.
const INTERRUPTED: u8 = 130;
/// How long an interrupted run waits for the server to confirm the cancel.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The FHIR base URL of the server to export from, e.g. https://example.org/fhir.
    base_url: String,
    /// Directory for the files, the manifest and the incremental state.
    #[arg(long)]
    out: PathBuf,
    /// system, patient or group:<id>.
    #[arg(long, default_value = "system", value_parser = parse_level)]
    level: Level,
    /// Resource types to export (comma-separated or repeated).
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<String>,
    /// Only resources changed after this FHIR instant (e.g. 2024-01-31T00:00:00Z).
    #[arg(long, conflicts_with = "incremental")]
    since: Option<String>,
    /// Continue from the last run against this server: its transactionTime becomes _since,
    /// and each run is saved in a subdirectory of --out named after its transactionTime.
    #[arg(long)]
    incremental: bool,
    /// A search that filters one type, e.g. 'Observation?status=final' (repeatable).
    #[arg(long = "type-filter")]
    type_filters: Vec<String>,
    /// Elements to keep, `element` or `Type.element` (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    elements: Vec<String>,
    /// Only these patients (Patient/<id> or <id>; repeatable; patient and group levels).
    #[arg(long = "patient", value_delimiter = ',')]
    patients: Vec<String>,
    /// _outputFormat to ask for (the server's default is application/fhir+ndjson).
    #[arg(long)]
    output_format: Option<String>,
    /// Files downloaded at the same time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Print nothing but errors.
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
    /// On Ctrl-C, leave the job running on the server (and do not delete it after the
    /// download) instead of cancelling it; continue later with --resume.
    #[arg(long)]
    detach: bool,
    /// Continue an export started earlier: its status URL (Content-Location).
    #[arg(long, value_name = "URL")]
    resume: Option<String>,
    /// SMART Backend Services client id (with --private-key).
    #[arg(long, env = "HEARTH_CLIENT_ID", requires = "private_key")]
    client_id: Option<String>,
    /// PEM private key registered for --client-id: RSA (RS384) or EC P-384 (ES384).
    #[arg(long, env = "HEARTH_PRIVATE_KEY", requires = "client_id")]
    private_key: Option<PathBuf>,
    /// The `kid` the registered JWKS gives the key (default: its RFC 7638 thumbprint).
    #[arg(long, env = "HEARTH_KEY_ID", requires = "client_id")]
    key_id: Option<String>,
    /// Token endpoint (default: from [base]/.well-known/smart-configuration).
    #[arg(long, env = "HEARTH_TOKEN_URL", requires = "client_id")]
    token_url: Option<String>,
    /// Scopes to ask for.
    #[arg(long, env = "HEARTH_SCOPE", default_value = "system/*.read")]
    scope: String,
    /// A bearer token obtained another way.
    #[arg(
        long,
        env = "HEARTH_BEARER_TOKEN",
        conflicts_with = "client_id",
        hide_env_values = true
    )]
    bearer: Option<String>,
}

fn parse_level(text: &str) -> Result<Level, String> {
    text.parse()
        .map_err(|e: hearth_client::Error| e.to_string())
}

pub async fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    // Installed before anything else, so an early Ctrl-C is ours to handle, not a kill.
    let interrupt = Interrupt::install();
    let mode = if args.quiet {
        Mode::Quiet
    } else if std::io::stderr().is_terminal() {
        Mode::Bars
    } else {
        Mode::Lines
    };
    let console = Arc::new(Console::new(mode, usize::from(args.parallel)));
    let (client, job) = match setup(&args) {
        Ok(setup) => setup,
        Err(e) => return Ok(failed(&console, args.json, &e.to_string())),
    };
    let outcome = tokio::select! {
        result = hearth_client::export::run(&client, &job, console.clone()) => Some(result),
        () = interrupt.wait() => None,
    };
    match outcome {
        Some(Ok(summary)) => {
            console.clear();
            report(&summary, &args);
            Ok(ExitCode::SUCCESS)
        }
        Some(Err(e)) => Ok(failed(&console, args.json, &e.to_string())),
        None => {
            console.clear();
            let reason = interrupted(&client, console.status_url(), args.detach, &interrupt).await;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"status": "interrupted", "message": reason})
                );
            }
            eprintln!("{reason}");
            Ok(ExitCode::from(INTERRUPTED))
        }
    }
}

fn setup(args: &ExportArgs) -> Result<(BulkClient, ExportJob), hearth_client::Error> {
    let credentials = match (&args.bearer, &args.client_id, &args.private_key) {
        (Some(token), _, _) => Credentials::Bearer(token.clone()),
        (None, Some(client_id), Some(key)) => Credentials::BackendServices(BackendServices {
            client_id: client_id.clone(),
            key: SigningKey::from_file(key, args.key_id.clone())?,
            token_url: args.token_url.clone(),
            scope: args.scope.clone(),
        }),
        _ => Credentials::None,
    };
    let options = ClientOptions {
        credentials,
        parallel: usize::from(args.parallel),
        ..ClientOptions::default()
    };
    let client = BulkClient::new(&args.base_url, options)?;
    let mut request = ExportRequest::new(args.level.clone());
    request.types = trimmed(&args.types);
    request.since = args.since.clone();
    request.type_filters = trimmed(&args.type_filters);
    request.elements = trimmed(&args.elements);
    request.patients = trimmed(&args.patients);
    request.output_format = args.output_format.clone();
    request.validate()?;
    let job = ExportJob {
        request,
        out_dir: args.out.clone(),
        incremental: args.incremental,
        resume: args.resume.clone(),
        release: !args.detach,
    };
    Ok((client, job))
}

/// List values without surrounding blanks, and without the empty ones `a,,b` or a trailing
/// comma would give.
fn trimmed(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One line on stderr (and the JSON status on stdout with --json); exit status 1.
fn failed(console: &Console, json: bool, reason: &str) -> ExitCode {
    console.clear();
    if json {
        println!(
            "{}",
            serde_json::json!({"status": "failed", "message": reason})
        );
    }
    eprintln!("error: {reason}");
    ExitCode::FAILURE
}

/// Cancels the job unless `detach`, and says what happened.
async fn interrupted(
    client: &BulkClient,
    status_url: Option<String>,
    detach: bool,
    interrupt: &Interrupt,
) -> String {
    let Some(url) = status_url else {
        return "interrupted before the server accepted the export".into();
    };
    if detach {
        return format!("interrupted; the export continues on the server: --resume {url}");
    }
    let Ok(url) = Url::parse(&url) else {
        return format!("interrupted; cannot cancel {url}");
    };
    let cancel = tokio::time::timeout(CANCEL_TIMEOUT, client.cancel(&url));
    tokio::select! {
        result = cancel => match result {
            Ok(Ok(Cancelled::Accepted)) => "interrupted; the export was cancelled on the server".into(),
            Ok(Ok(Cancelled::NotFound(message))) => {
                format!("interrupted; the server no longer knows the export: {message}")
            }
            Ok(Err(e)) => format!("interrupted; cancelling {url} failed: {e}"),
            Err(_) => format!("interrupted; cancelling {url} timed out"),
        },
        // A second Ctrl-C: stop waiting for the server.
        () = interrupt.wait() => format!("interrupted; the cancel of {url} was not confirmed"),
    }
}

fn report(summary: &ExportSummary, args: &ExportArgs) {
    if args.json {
        let mut value = serde_json::to_value(summary).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("status".into(), "complete".into());
        }
        println!("{value}");
        return;
    }
    if args.quiet {
        return;
    }
    let mb = summary.bytes as f64 / 1e6;
    let rate = mb / summary.download_seconds.max(1e-3);
    println!(
        "saved {} files to {}: {} resources, {:.1} MB in {:.1} s ({:.0} MB/s); transactionTime {}",
        summary.files.len(),
        summary.directory.display(),
        thousands(summary.resources),
        mb,
        summary.download_seconds,
        rate,
        summary.transaction_time
    );
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// SIGINT (and SIGTERM) as a future that can be awaited more than once.
struct Interrupt {
    #[cfg(unix)]
    signals: Option<tokio::sync::Mutex<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>>,
}

impl Interrupt {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signals = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some(tokio::sync::Mutex::new((int, term))),
                _ => None,
            };
            Self { signals }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn wait(&self) {
        #[cfg(unix)]
        if let Some(signals) = &self.signals {
            let mut signals = signals.lock().await;
            let (int, term) = &mut *signals;
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Progress bars on a terminal.
    Bars,
    /// Plain lines on stderr (a log file, a pipe, CI).
    Lines,
    Quiet,
}

/// Shows progress as bars or lines, and remembers the status URL for Ctrl-C.
struct Console {
    mode: Mode,
    multi: MultiProgress,
    overall: ProgressBar,
    /// One bar per download slot (`--parallel` of them), reused file after file: bars added
    /// and removed while others redraw leave stray lines behind on terminals.
    slots: Mutex<Vec<Slot>>,
    parallel: usize,
    status_url: Mutex<Option<String>>,
    last_progress: Mutex<Option<String>>,
    bytes: AtomicU64,
    files_done: AtomicU64,
    files_total: AtomicU64,
    download_started: Mutex<Option<Instant>>,
    /// Milliseconds since `created` of the last overall message update (throttling).
    last_message: AtomicU64,
    created: Instant,
}

const FILE_TEMPLATE: &str = "  {prefix:<32!} [{bar:24}] {human_pos}/{human_len} {msg}";
const FILE_SPINNER: &str = "  {prefix:<32!} {spinner} {human_pos} resources {msg}";
const IDLE_TEMPLATE: &str = "  ";
const OVERALL_TEMPLATE: &str =
    "{elapsed_precise} [{bar:32}] {human_pos}/{human_len} resources · {msg}";
const OVERALL_SPINNER: &str = "{elapsed_precise} {spinner} {human_pos} resources · {msg}";

impl Console {
    fn new(mode: Mode, parallel: usize) -> Self {
        let target = if mode == Mode::Bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new_spinner());
        overall.set_style(style("{elapsed_precise} {spinner} {msg}"));
        if mode == Mode::Bars {
            overall.enable_steady_tick(Duration::from_millis(120));
            overall.set_message("starting the export");
        }
        Self {
            mode,
            multi,
            overall,
            slots: Mutex::new(Vec::new()),
            parallel,
            status_url: Mutex::new(None),
            last_progress: Mutex::new(None),
            bytes: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            files_total: AtomicU64::new(0),
            download_started: Mutex::new(None),
            last_message: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    fn status_url(&self) -> Option<String> {
        self.status_url.lock().ok().and_then(|url| url.clone())
    }

    /// A line above the bars, or on stderr in line mode.
    fn line(&self, text: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(text);
            }
            Mode::Lines => eprintln!("hearth export: {text}"),
            Mode::Quiet => {}
        }
    }

    fn clear(&self) {
        if let Ok(slots) = self.slots.lock() {
            for slot in slots.iter() {
                slot.bar.finish_and_clear();
            }
        }
        self.overall.finish_and_clear();
        let _ = self.multi.clear();
    }

    fn overall_message(&self, force: bool) {
        if self.mode != Mode::Bars {
            return;
        }
        let now = self.created.elapsed().as_millis() as u64;
        let last = self.last_message.load(Ordering::Relaxed);
        if !force && now < last + 200 {
            return;
        }
        self.last_message.store(now, Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let seconds = self
            .download_started
            .lock()
            .ok()
            .and_then(|s| *s)
            .map_or(0.0, |s| s.elapsed().as_secs_f64());
        let rate = if seconds > 0.0 {
            bytes as f64 / 1e6 / seconds
        } else {
            0.0
        };
        self.overall.set_message(format!(
            "{}/{} files · {:.1} MB · {:.0} MB/s",
            self.files_done.load(Ordering::Relaxed),
            self.files_total.load(Ordering::Relaxed),
            bytes as f64 / 1e6,
            rate
        ));
    }
}

/// A download slot's bar and the file (plan index) it shows.
struct Slot {
    bar: ProgressBar,
    file: Option<usize>,
}

impl Console {
    fn with_slot(&self, file: &PlannedFile, update: impl FnOnce(&ProgressBar)) {
        if let Ok(slots) = self.slots.lock()
            && let Some(slot) = slots.iter().find(|s| s.file == Some(file.index))
        {
            update(&slot.bar);
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Progress for Console {
    fn kicked_off(&self, status_url: &str) {
        if let Ok(mut slot) = self.status_url.lock() {
            *slot = Some(status_url.to_owned());
        }
        self.line(&format!("status URL {status_url}"));
        self.overall
            .set_message("export accepted; waiting for the server");
    }

    fn polled(&self, update: &PollUpdate) {
        let text = update
            .progress
            .clone()
            .unwrap_or_else(|| "in progress".into());
        self.overall.set_message(format!(
            "server: {text} (next check in {:.0?})",
            update.next_poll
        ));
        if self.mode == Mode::Lines
            && let Ok(mut last) = self.last_progress.lock()
            && last.as_deref() != Some(text.as_str())
        {
            eprintln!("hearth export: {text}");
            *last = Some(text);
        }
    }

    fn retrying(&self, what: &str, reason: &str, wait: Duration) {
        self.line(&format!("{what}: {reason}; trying again in {wait:.1?}"));
    }

    fn manifest(&self, manifest: &Manifest, files: &[PlannedFile]) {
        let total: Option<u64> = files
            .iter()
            .filter(|f| f.kind == hearth_client::FileKind::Output)
            .map(|f| f.count)
            .sum();
        self.files_total
            .store(files.len() as u64, Ordering::Relaxed);
        if let Ok(mut started) = self.download_started.lock() {
            *started = Some(Instant::now());
        }
        match total {
            Some(total) => {
                self.overall.set_style(style(OVERALL_TEMPLATE));
                self.overall.set_length(total);
            }
            None => self.overall.set_style(style(OVERALL_SPINNER)),
        }
        self.overall.set_position(0);
        self.overall.reset_elapsed();
        self.overall_message(true);
        if self.mode == Mode::Bars
            && let Ok(mut slots) = self.slots.lock()
        {
            for _ in 0..self.parallel.min(files.len()) {
                let bar = self.multi.insert_before(&self.overall, ProgressBar::new(0));
                bar.set_style(style(IDLE_TEMPLATE));
                slots.push(Slot { bar, file: None });
            }
        }
        if self.mode == Mode::Lines {
            eprintln!(
                "hearth export: complete (transactionTime {}): {} files to download",
                manifest.transaction_time,
                files.len()
            );
        }
    }

    fn file_started(&self, file: &PlannedFile) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let Some(slot) = slots.iter_mut().find(|slot| slot.file.is_none()) else {
            return;
        };
        slot.file = Some(file.index);
        match file.count {
            Some(count) => {
                slot.bar.set_style(style(FILE_TEMPLATE));
                slot.bar.set_length(count);
            }
            None => {
                slot.bar.set_style(style(FILE_SPINNER));
                slot.bar.unset_length();
            }
        }
        slot.bar.set_position(0);
        slot.bar.set_prefix(file.name());
    }

    fn file_progress(&self, file: &PlannedFile, bytes: u64, lines: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.mode != Mode::Bars {
            return;
        }
        if file.kind == hearth_client::FileKind::Output {
            self.overall.inc(lines);
        }
        self.with_slot(file, |bar| bar.inc(lines));
        self.overall_message(false);
    }

    fn file_resumed(&self, file: &PlannedFile, offset: u64, reason: &str) {
        self.line(&format!(
            "{}: interrupted ({reason}); resuming at byte {offset}",
            file.name()
        ));
    }

    fn file_restarted(&self, file: &PlannedFile, bytes: u64, lines: u64) {
        self.line(&format!("{}: starting over", file.name()));
        self.bytes.fetch_sub(
            bytes.min(self.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        if file.kind == hearth_client::FileKind::Output {
            self.overall.dec(lines);
        }
        self.with_slot(file, |bar| bar.set_position(0));
    }

    fn file_finished(&self, file: &PlannedFile, saved: &SavedFile) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slots) = self.slots.lock()
            && let Some(slot) = slots.iter_mut().find(|s| s.file == Some(file.index))
        {
            slot.file = None;
            slot.bar.set_style(style(IDLE_TEMPLATE));
            slot.bar.set_prefix("");
        }
        self.overall_message(true);
        if self.mode == Mode::Lines {
            eprintln!(
                "hearth export: saved {} ({} resources, {:.1} MB)",
                saved.path.display(),
                saved.resources,
                saved.bytes as f64 / 1e6
            );
        }
    }
}
