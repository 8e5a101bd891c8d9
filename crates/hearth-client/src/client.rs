//! The HTTP conversation with one server: kick-off, status polling, cancel, and parallel
//! downloads that survive dropped connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{
    ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LOCATION, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, HeaderMap, HeaderValue, IF_RANGE, LAST_MODIFIED, RANGE,
};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::Error;
use crate::auth::{Authorizer, Credentials};
use crate::error::{describe_body, outcome_codes};
use crate::manifest::{Manifest, PlannedFile, SavedFile};
use crate::progress::{PollUpdate, Progress};
use crate::request::{ExportRequest, parse_base};
use crate::retry::{Backoff, RetryPolicy, is_transient_code, is_transient_status, retry_after};
use crate::sink::{self, Finished, Message, SinkConfig};

/// Error bodies are read only this far: enough for any OperationOutcome worth showing.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// A manifest larger than this is refused rather than held in memory.
const MANIFEST_LIMIT: usize = 32 * 1024 * 1024;
/// Connection attempts for a kick-off whose server cannot be reached.
const KICK_OFF_CONNECT_ATTEMPTS: u32 = 3;
/// Chunks in flight between the network and a file's writer thread, per download.
const SINK_QUEUE: usize = 8;

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub credentials: Credentials,
    pub retry: RetryPolicy,
    /// Files downloaded at the same time.
    pub parallel: usize,
    pub connect_timeout: Duration,
    /// A response that delivers nothing for this long counts as a dropped connection.
    pub read_timeout: Duration,
    /// `fsync` each file before it gets its final name.
    pub sync_files: bool,
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            credentials: Credentials::None,
            retry: RetryPolicy::default(),
            parallel: 4,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            sync_files: true,
            user_agent: format!("hearth-client/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A Bulk Data client for one server. Cheap to clone.
#[derive(Clone)]
pub struct BulkClient {
    inner: Arc<Inner>,
}

struct Inner {
    base: Url,
    http: reqwest::Client,
    auth: Authorizer,
    options: ClientOptions,
}

/// The job's final status answer.
#[derive(Debug, Clone)]
pub struct Completed {
    pub manifest: Manifest,
    /// The manifest exactly as the server sent it, for saving.
    pub body: Bytes,
}

/// What a `DELETE` of the status URL achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// The server accepted the cancel (or the deletion of a finished job's files).
    Accepted,
    /// The job was unknown: already cancelled, finished and released, or expired.
    NotFound(String),
}

/// Which network failures a request may be retried after.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NetworkRetry {
    Always,
    /// Only when the connection could not be made: the server never saw the request.
    ConnectOnly,
}

/// The answer to a request, transient failures already retried.
enum Answer {
    Success(Response),
    Failure {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

impl BulkClient {
    /// A client for the FHIR server at `base` (e.g. `https://example.org/fhir`).
    pub fn new(base: &str, options: ClientOptions) -> Result<Self, Error> {
        let base = parse_base(base)?;
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .user_agent(options.user_agent.clone())
            .build()
            .map_err(|e| Error::Invalid(format!("cannot set up HTTP: {}", chain(&e))))?;
        let auth = Authorizer::new(options.credentials.clone(), base.clone(), http.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                base,
                http,
                auth,
                options,
            }),
        })
    }

    pub fn base(&self) -> &Url {
        &self.inner.base
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Starts an export and returns its status URL. GET unless a parameter needs POST; a
    /// server that refuses GET with `405` is asked again with POST.
    pub async fn kick_off(
        &self,
        request: &ExportRequest,
        progress: &dyn Progress,
    ) -> Result<Url, Error> {
        request.validate()?;
        let endpoint = request.endpoint(&self.inner.base)?;
        let mut url = endpoint.clone();
        {
            let pairs = request.query_pairs();
            if !pairs.is_empty() {
                let mut query = url.query_pairs_mut();
                for (name, value) in &pairs {
                    query.append_pair(name, value);
                }
            }
        }
        let body = request.parameters().to_string();
        let mut post = request.needs_post();
        loop {
            let build = || {
                let builder = if post {
                    self.inner
                        .http
                        .post(endpoint.clone())
                        .header(CONTENT_TYPE, "application/fhir+json")
                        .body(body.clone())
                } else {
                    self.inner.http.get(url.clone())
                };
                builder
                    .header(ACCEPT, "application/fhir+json")
                    .header("prefer", "respond-async")
            };
            let answer = self
                .send(
                    "kick-off",
                    NetworkRetry::ConnectOnly,
                    true,
                    progress,
                    &build,
                )
                .await?;
            match answer {
                Answer::Success(response) if response.status() == StatusCode::ACCEPTED => {
                    let status = response.status().as_u16();
                    let location = response
                        .headers()
                        .get(CONTENT_LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .ok_or(Error::NoStatusUrl { status })?;
                    return endpoint.join(location.trim()).map_err(|e| {
                        Error::Invalid(format!("the status URL '{location}' is not a URL: {e}"))
                    });
                }
                Answer::Success(response) => {
                    let status = response.status().as_u16();
                    let body = read_capped(response, ERROR_BODY_LIMIT).await;
                    return Err(Error::KickOffRefused {
                        status,
                        message: format!(
                            "expected 202 Accepted for an asynchronous export; {}",
                            describe_body(&body)
                        ),
                    });
                }
                Answer::Failure {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    ..
                } if !post => post = true,
                Answer::Failure { status, body, .. } => {
                    return Err(Error::KickOffRefused {
                        status: status.as_u16(),
                        message: describe_body(&body),
                    });
                }
            }
        }
    }

    /// Polls the status URL until the job completes, honouring `Retry-After` and backing off
    /// exponentially when the server gives none.
    pub async fn wait(
        &self,
        status_url: &Url,
        progress: &dyn Progress,
    ) -> Result<Completed, Error> {
        let policy = &self.inner.options.retry;
        let started = Instant::now();
        let mut backoff = Backoff::new(policy);
        loop {
            let build = || {
                self.inner
                    .http
                    .get(status_url.clone())
                    .header(ACCEPT, "application/json")
            };
            let answer = self
                .send(
                    "polling the export status",
                    NetworkRetry::Always,
                    true,
                    progress,
                    &build,
                )
                .await?;
            let response = match answer {
                Answer::Success(response) => response,
                Answer::Failure { status, body, .. } => {
                    let message = describe_body(&body);
                    let status_code = status.as_u16();
                    return Err(
                        if matches!(status, StatusCode::NOT_FOUND | StatusCode::GONE) {
                            Error::JobGone {
                                status: status_code,
                                message,
                            }
                        } else {
                            Error::JobFailed {
                                status: status_code,
                                message,
                            }
                        },
                    );
                }
            };
            match response.status() {
                StatusCode::OK => {
                    let body = read_limited(response, MANIFEST_LIMIT, "the manifest").await?;
                    let manifest = Manifest::parse(&body)?;
                    return Ok(Completed { manifest, body });
                }
                StatusCode::ACCEPTED => {
                    let text = response
                        .headers()
                        .get("x-progress")
                        .and_then(|v| v.to_str().ok())
                        .map(|s| s.chars().take(100).collect::<String>());
                    let wait = retry_after(response.headers(), policy)
                        .unwrap_or_else(|| backoff.next_delay())
                        .max(policy.min_poll_interval);
                    progress.polled(&PollUpdate {
                        progress: text,
                        elapsed: started.elapsed(),
                        next_poll: wait,
                    });
                    tokio::time::sleep(wait).await;
                }
                other => {
                    let body = read_capped(response, ERROR_BODY_LIMIT).await;
                    return Err(Error::JobFailed {
                        status: other.as_u16(),
                        message: format!("unexpected status answer; {}", describe_body(&body)),
                    });
                }
            }
        }
    }

    /// Cancels a running job, or releases a finished one's files (`DELETE` on the status URL).
    pub async fn cancel(&self, status_url: &Url) -> Result<Cancelled, Error> {
        let build = || {
            self.inner
                .http
                .delete(status_url.clone())
                .header(ACCEPT, "application/fhir+json")
        };
        let answer = self
            .send(
                "cancelling the export",
                NetworkRetry::Always,
                true,
                &crate::progress::Silent,
                &build,
            )
            .await?;
        match answer {
            Answer::Success(_) => Ok(Cancelled::Accepted),
            Answer::Failure {
                status: StatusCode::NOT_FOUND | StatusCode::GONE,
                body,
                ..
            } => Ok(Cancelled::NotFound(describe_body(&body))),
            Answer::Failure { status, body, .. } => Err(Error::CancelRefused {
                status: status.as_u16(),
                message: describe_body(&body),
            }),
        }
    }

    /// Downloads `files`, `parallel` at a time, each saved and verified before it gets its
    /// final name. Stops at the first file that fails for good; the others are abandoned and
    /// their temporary files removed.
    pub async fn download(
        &self,
        files: Vec<PlannedFile>,
        progress: Arc<dyn Progress>,
    ) -> Result<Vec<SavedFile>, Error> {
        let permits = Arc::new(Semaphore::new(self.inner.options.parallel.max(1)));
        // Largest first (by resource count; unknown counts first of all), so the end of the
        // run is not one big file downloading alone.
        let mut files = files;
        files.sort_by_key(|file| std::cmp::Reverse(file.count.unwrap_or(u64::MAX)));
        let mut waiting = files.into_iter().peekable();
        let mut tasks = JoinSet::new();
        let mut saved = Vec::new();
        loop {
            tokio::select! {
                // Failures first: no new download starts once one has failed for good.
                biased;
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let outcome = joined.map_err(|e| Error::Download {
                        url: String::new(),
                        status: None,
                        message: format!("a download task stopped: {e}"),
                    });
                    match outcome.and_then(|result| result) {
                        Ok(file) => saved.push(file),
                        Err(e) => {
                            tasks.abort_all();
                            while tasks.join_next().await.is_some() {}
                            return Err(e);
                        }
                    }
                }
                // Permits are taken here, in order, so downloads start largest first.
                Ok(permit) = permits.clone().acquire_owned(), if waiting.peek().is_some() => {
                    let Some(file) = waiting.next() else { continue };
                    let client = self.clone();
                    let progress = progress.clone();
                    let mut slot = Slot {
                        permits: permits.clone(),
                        held: Some(permit),
                    };
                    tasks.spawn(async move {
                        let index = file.index;
                        client
                            .fetch(file, progress, &mut slot)
                            .await
                            .map(|saved| (index, saved))
                    });
                }
                else => break,
            }
        }
        saved.sort_by_key(|(index, _)| *index);
        Ok(saved.into_iter().map(|(_, file)| file).collect())
    }

    /// One file, start to finish.
    async fn fetch(
        &self,
        file: PlannedFile,
        progress: Arc<dyn Progress>,
        slot: &mut Slot,
    ) -> Result<SavedFile, Error> {
        slot.acquire().await;
        progress.file_started(&file);
        let (sender, receiver) = mpsc::channel(SINK_QUEUE);
        let config = SinkConfig {
            file: file.clone(),
            temp: temp_path(&file.path),
            progress: progress.clone(),
            sync: self.inner.options.sync_files,
        };
        let writer = tokio::task::spawn_blocking(move || sink::run(config, receiver));
        let result = self.transfer(&file, &sender, &*progress, slot).await;
        drop(sender);
        let written = writer.await;
        let saved = match (result, written) {
            (Ok(saved), _) => saved,
            // The writer stopped first: its error is the real one.
            (Err(Transfer::SinkGone), Ok(Err(e))) => return Err(e),
            (Err(Transfer::SinkGone), _) => {
                return Err(Error::Download {
                    url: file.url.to_string(),
                    status: None,
                    message: "the file writer stopped unexpectedly".into(),
                });
            }
            (Err(Transfer::Failed(e)), _) => return Err(e),
        };
        progress.file_finished(&file, &saved);
        Ok(saved)
    }

    async fn transfer(
        &self,
        file: &PlannedFile,
        sink: &mpsc::Sender<Message>,
        progress: &dyn Progress,
        slot: &mut Slot,
    ) -> Result<SavedFile, Transfer> {
        let policy = &self.inner.options.retry;
        let what = format!("downloading {}", file.name());
        let mut offset = 0u64;
        let mut validator: Option<HeaderValue> = None;
        let mut interruptions = 0u32;
        let mut wire_bytes = 0u64;
        let mut requests = 0u32;
        let mut last_reason = String::new();
        let mut backoff = Backoff::new(policy);
        loop {
            slot.acquire().await;
            requests += 1;
            let build = || {
                let request = self
                    .inner
                    .http
                    .get(file.url.clone())
                    .header(ACCEPT, "application/fhir+ndjson");
                if offset == 0 {
                    return request.header(ACCEPT_ENCODING, "gzip");
                }
                // Range applies to the identity representation: the offset is a count of
                // decoded bytes, whatever encoding the interrupted response had.
                let request = request
                    .header(ACCEPT_ENCODING, "identity")
                    .header(RANGE, format!("bytes={offset}-"));
                match &validator {
                    Some(value) => request.header(IF_RANGE, value.clone()),
                    None => request,
                }
            };
            let answer = self
                .send(
                    &what,
                    NetworkRetry::Always,
                    file.requires_token,
                    progress,
                    &build,
                )
                .await?;
            let response = match answer {
                Answer::Success(response) => response,
                Answer::Failure {
                    status: StatusCode::RANGE_NOT_SATISFIABLE,
                    headers,
                    ..
                } if offset > 0 => {
                    if unsatisfied_range_length(&headers) == Some(offset) {
                        // Everything had arrived; only the end of the stream was missing.
                        send(
                            sink,
                            Message::Begin {
                                gzip: false,
                                offset,
                            },
                        )
                        .await?;
                        slot.release();
                        match finish(sink).await? {
                            Finished::Saved { bytes, lines } => {
                                return Ok(saved(file, bytes, lines, wire_bytes, requests));
                            }
                            Finished::Resume(_) => {}
                        }
                    }
                    last_reason = "the server refused the range; starting over".into();
                    offset = 0;
                    validator = None;
                    continue;
                }
                Answer::Failure { status, body, .. } => {
                    return Err(Transfer::Failed(Error::Download {
                        url: file.url.to_string(),
                        status: Some(status.as_u16()),
                        message: describe_body(&body),
                    }));
                }
            };
            let status = response.status();
            let headers = response.headers();
            let gzip = match headers
                .get(CONTENT_ENCODING)
                .map(|v| v.to_str().unwrap_or("?"))
            {
                None => false,
                Some(coding) if coding.eq_ignore_ascii_case("identity") => false,
                Some(coding)
                    if coding.eq_ignore_ascii_case("gzip")
                        || coding.eq_ignore_ascii_case("x-gzip") =>
                {
                    true
                }
                Some(coding) => {
                    return Err(Transfer::Failed(Error::Download {
                        url: file.url.to_string(),
                        status: Some(status.as_u16()),
                        message: format!("unsupported Content-Encoding '{coding}'"),
                    }));
                }
            };
            let start = match status {
                StatusCode::OK => 0,
                StatusCode::PARTIAL_CONTENT
                    if !gzip && content_range_start(headers) == Some(offset) =>
                {
                    offset
                }
                StatusCode::PARTIAL_CONTENT => {
                    // Not the range asked for: ask for the whole file instead.
                    last_reason = "the server answered another range; starting over".into();
                    offset = 0;
                    validator = None;
                    continue;
                }
                other => {
                    return Err(Transfer::Failed(Error::Download {
                        url: file.url.to_string(),
                        status: Some(other.as_u16()),
                        message: "unexpected status for a file download".into(),
                    }));
                }
            };
            if start == 0 {
                validator = strong_validator(headers);
            } else {
                progress.file_resumed(file, start, &last_reason);
            }
            send(
                sink,
                Message::Begin {
                    gzip,
                    offset: start,
                },
            )
            .await?;
            let mut body = response.bytes_stream();
            let broke = loop {
                match body.next().await {
                    Some(Ok(chunk)) => {
                        wire_bytes += chunk.len() as u64;
                        send(sink, Message::Data(chunk)).await?;
                    }
                    Some(Err(e)) => break Some(chain(&e)),
                    None => break None,
                }
            };
            let next = match broke {
                None => {
                    // The network part is done: the next download can start while this
                    // file is verified, flushed to disk and renamed.
                    slot.release();
                    match finish(sink).await? {
                        Finished::Saved { bytes, lines } => {
                            return Ok(saved(file, bytes, lines, wire_bytes, requests));
                        }
                        Finished::Resume(at) => {
                            last_reason = "the gzip stream ended early".into();
                            at
                        }
                    }
                }
                Some(reason) => {
                    last_reason = reason;
                    let (reply, answer) = oneshot::channel();
                    send(sink, Message::Pause(reply)).await?;
                    answer
                        .await
                        .map_err(|_| Transfer::SinkGone)?
                        .map_err(Transfer::Failed)?
                }
            };
            interruptions += 1;
            if interruptions >= policy.max_attempts {
                return Err(Transfer::Failed(Error::RetriesExhausted {
                    what,
                    attempts: interruptions,
                    last: last_reason,
                }));
            }
            if next == 0 {
                validator = None;
            }
            offset = next;
            // Reconnect at once after a first drop (the usual case: one broken connection);
            // back off if the server keeps dropping.
            if interruptions > 1 {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }

    /// Sends a request built by `build` (again for each attempt), with the access token when
    /// `with_token`. Network errors (as `network` allows), `429`, `408` and `5xx` answers that
    /// are not a definite failure are retried after `Retry-After` or a backoff delay; a `401`
    /// renews the token once. Other answers are returned.
    async fn send(
        &self,
        what: &str,
        network: NetworkRetry,
        with_token: bool,
        progress: &dyn Progress,
        build: &(dyn Fn() -> RequestBuilder + Sync),
    ) -> Result<Answer, Error> {
        let policy = &self.inner.options.retry;
        let auth = &self.inner.auth;
        let mut backoff = Backoff::new(policy);
        let mut failures = 0u32;
        let mut renewed = false;
        loop {
            let token = if with_token {
                auth.header().await?
            } else {
                None
            };
            let mut request = build();
            if let Some(token) = &token {
                request = request.header(AUTHORIZATION, token.clone());
            }
            let mut limit = policy.max_attempts;
            let (reason, wait) = match request.send().await {
                Err(e) => {
                    if network == NetworkRetry::ConnectOnly {
                        if !e.is_connect() {
                            return Err(Error::Network {
                                what: what.to_owned(),
                                message: chain(&e),
                            });
                        }
                        // Nothing is at stake before a job exists: a wrong address or a server
                        // that is down should be reported in seconds, not minutes.
                        limit = limit.min(KICK_OFF_CONNECT_ATTEMPTS);
                    }
                    (chain(&e), None)
                }
                Ok(response) => {
                    let status = response.status();
                    if status == StatusCode::UNAUTHORIZED
                        && token.is_some()
                        && auth.renewable()
                        && !renewed
                    {
                        renewed = true;
                        auth.rejected(token.as_ref()).await;
                        continue;
                    }
                    if !(status.is_client_error() || status.is_server_error()) {
                        return Ok(Answer::Success(response));
                    }
                    let wait = retry_after(response.headers(), policy);
                    let headers = response.headers().clone();
                    let body = read_capped(response, ERROR_BODY_LIMIT).await;
                    if !transient_failure(status, &body) {
                        return Ok(Answer::Failure {
                            status,
                            headers,
                            body,
                        });
                    }
                    (format!("{status}: {}", describe_body(&body)), wait)
                }
            };
            failures += 1;
            if failures >= limit {
                return Err(Error::RetriesExhausted {
                    what: what.to_owned(),
                    attempts: failures,
                    last: reason,
                });
            }
            let wait = wait.unwrap_or_else(|| backoff.next_delay());
            progress.retrying(what, &reason, wait);
            tracing::debug!(what, reason, ?wait, "retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// A download's share of `--parallel`, given up while its file is being committed.
struct Slot {
    permits: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl Slot {
    async fn acquire(&mut self) {
        if self.held.is_none() {
            // Fails only once the semaphore is closed, which it never is.
            self.held = self.permits.clone().acquire_owned().await.ok();
        }
    }

    fn release(&mut self) {
        self.held = None;
    }
}

/// Why a transfer stopped.
enum Transfer {
    Failed(Error),
    /// The writer thread went away; its own result says why.
    SinkGone,
}

impl From<Error> for Transfer {
    fn from(e: Error) -> Self {
        Self::Failed(e)
    }
}

async fn send(sink: &mpsc::Sender<Message>, message: Message) -> Result<(), Transfer> {
    sink.send(message).await.map_err(|_| Transfer::SinkGone)
}

async fn finish(sink: &mpsc::Sender<Message>) -> Result<Finished, Transfer> {
    let (reply, answer) = oneshot::channel();
    send(sink, Message::Finish(reply)).await?;
    answer
        .await
        .map_err(|_| Transfer::SinkGone)?
        .map_err(Transfer::Failed)
}

fn saved(file: &PlannedFile, bytes: u64, lines: u64, wire_bytes: u64, requests: u32) -> SavedFile {
    SavedFile {
        kind: file.kind,
        resource_type: file.resource_type.clone(),
        url: file.url.to_string(),
        path: file.path.clone(),
        resources: lines,
        bytes,
        wire_bytes,
        retries: requests.saturating_sub(1),
    }
}

/// `dir/.name.part` beside `dir/name`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.part"))
}

/// A `5xx` is a definite failure only when the server says so: an OperationOutcome without
/// a transient issue code. Anything else (a proxy's HTML page, a `503`) may pass.
fn transient_failure(status: StatusCode, body: &[u8]) -> bool {
    if !is_transient_status(status) {
        return false;
    }
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    ) {
        return true;
    }
    match outcome_codes(body) {
        None => true,
        Some(codes) => codes.is_empty() || codes.iter().any(|c| is_transient_code(c)),
    }
}

/// A validator for `If-Range`: a strong ETag, or else `Last-Modified`.
fn strong_validator(headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(etag) = headers.get(ETAG)
        && !etag.as_bytes().starts_with(b"W/")
    {
        return Some(etag.clone());
    }
    headers.get(LAST_MODIFIED).cloned()
}

/// The first byte of a `Content-Range: bytes a-b/n`.
fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// The length in a `416`'s `Content-Range: bytes */n`.
fn unsatisfied_range_length(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    value.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

/// Reads at most `limit` bytes of a body, for error messages: a failure to read leaves what
/// was read.
async fn read_capped(response: Response, limit: usize) -> Bytes {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Bytes::from(body)
}

/// Reads a whole body that must fit in `limit` bytes.
async fn read_limited(response: Response, limit: usize, what: &str) -> Result<Bytes, Error> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Network {
            what: format!("reading {what}"),
            message: chain(&e),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(Error::Manifest(format!(
                "{what} is larger than {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// An error with its causes, on one line: reqwest's own message rarely says what broke.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_hide_beside_their_final_name() {
        assert_eq!(
            temp_path(Path::new("/out/deleted/Bundle.1.ndjson")),
            Path::new("/out/deleted/.Bundle.1.ndjson.part")
        );
    }

    #[test]
    fn ranges_are_read_from_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 100-199/200"));
        assert_eq!(content_range_start(&headers), Some(100));
        headers.insert(CONTENT_RANGE, HeaderValue::from_static("bytes */200"));
        assert_eq!(unsatisfied_range_length(&headers), Some(200));
        assert_eq!(content_range_start(&headers), None);
    }

    #[test]
    fn only_definite_failures_stop_retries() {
        let failed = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"boom"}]}"#;
        let busy = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"}]}"#;
        assert!(!transient_failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            failed
        ));
        assert!(transient_failure(StatusCode::INTERNAL_SERVER_ERROR, busy));
        assert!(transient_failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            b"<html>"
        ));
        assert!(transient_failure(StatusCode::SERVICE_UNAVAILABLE, failed));
        assert!(transient_failure(StatusCode::TOO_MANY_REQUESTS, b""));
        assert!(!transient_failure(StatusCode::NOT_FOUND, b""));
    }

    #[test]
    fn weak_etags_are_no_range_validators() {
        let mut headers = HeaderMap::new();
        headers.insert(ETAG, HeaderValue::from_static("W/\"1\""));
        assert_eq!(strong_validator(&headers), None);
        headers.insert(
            LAST_MODIFIED,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert!(strong_validator(&headers).is_some());
        headers.insert(ETAG, HeaderValue::from_static("\"abc\""));
        assert_eq!(strong_validator(&headers).unwrap(), "\"abc\"");
    }
}
