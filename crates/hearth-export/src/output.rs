//! Where finished export files live: the local export directory (the embedded default), or an
//! S3-compatible bucket shared by every Hearth process of a deployment.
//!
//! Workers always write into the local export directory. With object storage that directory is
//! only a staging area: a unit's finished files are uploaded before the unit commits, and the
//! local copies go. Nothing a process needs later may live only on its own disk, because any
//! process may serve the status request, the download or the job's Provenance unit.

use std::fmt;
use std::io::Read;
use std::path::Path as LocalPath;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::signer::{Method, Signer};
use object_store::{ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The default multipart part size: above S3's 5 MiB minimum, and small enough that an upload
/// holds little memory (see [`UPLOAD_CONCURRENCY`]).
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts of one file in flight at once. A worker's upload then holds at most about
/// `(UPLOAD_CONCURRENCY + 1) × part size` in memory, whatever the file's size.
const UPLOAD_CONCURRENCY: usize = 2;

/// Bytes read from a staged file per step of an upload.
const READ_CHUNK: usize = 1024 * 1024;

/// SigV4 refuses presigned URLs that live longer than a week; status requests re-sign anyway.
const MAX_SIGNED_URL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why output storage could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("'{0}' is not an object storage location: use s3://bucket/prefix")]
    InvalidLocation(String),
    #[error(
        "presigned URLs need object storage output (--output s3://bucket/prefix); files in the local export directory are served by Hearth"
    )]
    PresignedNeedsObjectStorage,
    #[error(
        "{0} applies to object storage output only (--output s3://bucket/prefix); without --output, files stay in the data directory"
    )]
    ObjectStorageOptionWithoutOutput(&'static str),
    #[error("the export file {0} is no longer in object storage")]
    NotFound(String),
    /// The caller asked the upload to stop (its job was cancelled).
    #[error("the upload was stopped")]
    Stopped,
    #[error("object storage: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How `hearth serve` was asked to store export files.
#[derive(Debug, Clone)]
pub struct OutputSettings {
    /// `s3://bucket/prefix`; `None` keeps files in the data directory.
    pub location: Option<String>,
    /// The S3 endpoint (else `AWS_ENDPOINT_URL`, else AWS itself).
    pub endpoint: Option<String>,
    /// The region (else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// Allow a plain-HTTP endpoint (loopback test servers).
    pub allow_http: bool,
    /// Credentials; `None` leaves them to `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` and the
    /// other sources object_store knows (web identity, instance metadata).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Manifests list presigned URLs instead of Hearth's own download URLs.
    pub presigned_urls: bool,
    /// Files larger than this are uploaded in parts of this size. S3 refuses parts below
    /// 5 MiB (except the last), so smaller values are for test servers only.
    pub part_size: usize,
}

impl Default for OutputSettings {
    fn default() -> Self {
        Self {
            location: None,
            endpoint: None,
            region: None,
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
            presigned_urls: false,
            part_size: DEFAULT_PART_SIZE,
        }
    }
}

impl OutputSettings {
    /// Checks the combination and sets up the client (no request is sent yet: see
    /// [`Output::check`]).
    pub fn build(&self) -> Result<Output, OutputError> {
        let Some(location) = &self.location else {
            if self.presigned_urls {
                return Err(OutputError::PresignedNeedsObjectStorage);
            }
            for (set, flag) in [
                (self.endpoint.is_some(), "--s3-endpoint"),
                (self.region.is_some(), "--s3-region"),
                (self.allow_http, "--s3-allow-http"),
            ] {
                if set {
                    return Err(OutputError::ObjectStorageOptionWithoutOutput(flag));
                }
            }
            return Ok(Output::Local);
        };
        let (bucket, prefix) = parse_s3_location(location)?;
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if self.allow_http {
            builder = builder.with_allow_http(true);
        }
        if let Some(key) = &self.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &self.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        // Downloads stream to clients at the client's pace: a total request deadline would cut
        // long downloads, so that client only bounds the wait for each read. That bound is
        // longer than the server's send timeout, so a client that stops reading is cut off
        // before back-pressure could look like a stalled bucket.
        let reader = builder
            .clone()
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                "30days",
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ReadTimeout),
                "5m",
            )
            .build()?;
        let store = Arc::new(builder.build()?);
        Ok(Output::Object(Arc::new(ObjectOutput {
            signer: self.presigned_urls.then(|| Arc::clone(&store)),
            store,
            reader: Arc::new(reader),
            prefix,
            location: location.trim_end_matches('/').to_owned(),
            part_size: self.part_size.max(1),
        })))
    }
}

/// `s3://bucket/some/prefix/` → (`bucket`, `some/prefix`).
fn parse_s3_location(location: &str) -> Result<(String, Path), OutputError> {
    let invalid = || OutputError::InvalidLocation(location.to_owned());
    let rest = location.strip_prefix("s3://").ok_or_else(invalid)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || rest.contains(['?', '#']) {
        return Err(invalid());
    }
    let prefix = Path::parse(prefix.trim_matches('/')).map_err(|_| invalid())?;
    Ok((bucket.to_owned(), prefix))
}

/// Where a process stores finished export files.
#[derive(Clone, Default)]
pub enum Output {
    /// The export directory itself.
    #[default]
    Local,
    /// An S3-compatible bucket; the export directory only stages files.
    Object(Arc<ObjectOutput>),
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("Local"),
            Self::Object(object) => write!(f, "Object({})", object.location),
        }
    }
}

impl Output {
    /// Whether manifests list presigned URLs.
    pub fn presigned_urls(&self) -> bool {
        matches!(self, Self::Object(object) if object.signer.is_some())
    }

    /// Where files go, for logs: `local` or `s3://bucket/prefix`.
    pub fn describe(&self) -> String {
        match self {
            Self::Local => "local".into(),
            Self::Object(object) => object.location.clone(),
        }
    }

    /// Fails fast on a wrong bucket, endpoint or credentials: one listing request.
    pub async fn check(&self) -> Result<(), OutputError> {
        match self {
            Self::Local => Ok(()),
            Self::Object(object) => {
                object
                    .store
                    .list_with_delimiter(Some(&object.prefix))
                    .await?;
                Ok(())
            }
        }
    }
}

/// Export files in an S3-compatible bucket, under `<prefix>/<job id>/<file name>`.
pub struct ObjectOutput {
    /// Uploads, listings, deletions: requests with a deadline.
    store: Arc<AmazonS3>,
    /// Downloads proxied to clients.
    reader: Arc<AmazonS3>,
    /// Present when manifests list presigned URLs.
    signer: Option<Arc<AmazonS3>>,
    prefix: Path,
    location: String,
    part_size: usize,
}

impl ObjectOutput {
    /// The object of a path relative to the export directory (`<job>/<name>`).
    fn key(&self, relative: &str) -> Path {
        self.prefix
            .parts()
            .chain(
                relative
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(Into::into),
            )
            .collect()
    }

    /// Streams a staged file into the object `relative`: one PUT when it is smaller than a
    /// part, a multipart upload otherwise. Memory stays bounded by the part size. Once `stop`
    /// is set, the upload ends at its next chunk with [`OutputError::Stopped`], leaving nothing
    /// in the bucket: a large file takes seconds, longer than a cancel may wait.
    pub async fn upload(
        &self,
        local: &LocalPath,
        relative: &str,
        stop: &AtomicBool,
    ) -> Result<(), OutputError> {
        let mut file = tokio::fs::File::open(local).await?;
        let store: Arc<dyn ObjectStore> = self.store.clone();
        let mut writer = BufWriter::with_capacity(store, self.key(relative), self.part_size)
            .with_max_concurrency(UPLOAD_CONCURRENCY);
        let copied: Result<(), OutputError> = async {
            loop {
                let mut chunk = BytesMut::with_capacity(READ_CHUNK);
                while chunk.len() < READ_CHUNK {
                    if file.read_buf(&mut chunk).await? == 0 {
                        break;
                    }
                }
                if chunk.is_empty() {
                    return Ok(());
                }
                if stop.load(Ordering::Relaxed) {
                    return Err(OutputError::Stopped);
                }
                writer.put(chunk.freeze()).await?;
            }
        }
        .await;
        if let Err(e) = copied {
            // Parts already stored would otherwise be kept (and billed) by the bucket.
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.shutdown().await?;
        Ok(())
    }

    /// Uploads `names` from the staging directory `dir` to `<job>/<name>` and removes the
    /// staged copies. On failure, or when `stop` is set, nothing of the batch is left in the
    /// bucket.
    pub async fn upload_files(
        &self,
        dir: &LocalPath,
        job_id: &str,
        names: &[String],
        stop: &AtomicBool,
    ) -> Result<(), OutputError> {
        let mut uploaded = Vec::with_capacity(names.len());
        for name in names {
            let relative = format!("{job_id}/{name}");
            if let Err(e) = self.upload(&dir.join(name), &relative, stop).await {
                self.delete(&uploaded).await;
                return Err(e);
            }
            uploaded.push(relative);
        }
        for name in names {
            let _ = tokio::fs::remove_file(dir.join(name)).await;
        }
        Ok(())
    }

    /// Removes objects (paths relative to the export directory); a missing one is no error.
    pub async fn delete(&self, relatives: &[String]) {
        let keys: Vec<object_store::Result<Path>> =
            relatives.iter().map(|r| Ok(self.key(r))).collect();
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(keys).boxed());
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(error = %e, "cannot delete an export object"),
            }
        }
    }

    /// Streams the object `relative` into the local file `local`.
    pub async fn fetch(&self, relative: &str, local: &LocalPath) -> Result<(), OutputError> {
        let key = self.key(relative);
        let result = self
            .store
            .get(&key)
            .await
            .map_err(|e| not_found(e, relative))?;
        let mut stream = result.into_stream();
        let mut file = tokio::fs::File::create(local).await?;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await?;
        Ok(())
    }

    /// Removes every object of a job; returns how many there were.
    pub async fn remove_job(&self, job_id: &str) -> Result<u64, OutputError> {
        self.remove_job_older_than(job_id, Duration::ZERO).await
    }

    /// Removes the objects of a job written more than `age` ago.
    pub async fn remove_job_older_than(
        &self,
        job_id: &str,
        age: Duration,
    ) -> Result<u64, OutputError> {
        // Unix microseconds; every object counts when `age` is zero.
        let cutoff = (!age.is_zero()).then(|| {
            hearth_fhir::instant::now_micros() - age.as_micros().min(i64::MAX as u128) as i64
        });
        let listing = self
            .store
            .list(Some(&self.key(job_id)))
            .filter_map(move |meta| async move {
                match meta {
                    Ok(meta)
                        if cutoff.is_none_or(|c| meta.last_modified.timestamp_micros() < c) =>
                    {
                        Some(Ok(meta.location))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                }
            })
            .boxed();
        let mut removed = 0;
        let mut results = self.store.delete_stream(listing);
        while let Some(result) = results.next().await {
            match result {
                Ok(_) => removed += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(removed)
    }

    /// The job ids that have objects in the bucket.
    pub async fn job_ids(&self) -> Result<Vec<String>, OutputError> {
        let listing = self.store.list_with_delimiter(Some(&self.prefix)).await?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// A file to proxy to a client.
    pub fn remote_file(&self, relative: &str, size: u64) -> RemoteFile {
        RemoteFile {
            store: self.reader.clone(),
            key: self.key(relative),
            size,
        }
    }

    /// A presigned GET URL of `relative`, valid for `expires_in` (at most a week).
    pub async fn signed_url(
        &self,
        relative: &str,
        expires_in: Duration,
    ) -> Result<Option<String>, OutputError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let expires_in = expires_in.clamp(Duration::from_secs(1), MAX_SIGNED_URL_LIFETIME);
        let url = signer
            .signed_url(Method::GET, &self.key(relative), expires_in)
            .await?;
        Ok(Some(url.to_string()))
    }
}

fn not_found(error: object_store::Error, relative: &str) -> OutputError {
    match error {
        object_store::Error::NotFound { .. } => OutputError::NotFound(relative.to_owned()),
        e => e.into(),
    }
}

/// An export file in object storage, as the download route sees it.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    store: Arc<AmazonS3>,
    key: Path,
    size: u64,
}

impl RemoteFile {
    /// The file's length in bytes (as recorded when it was written).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Starts a ranged GET of `len` bytes from `start`. A missing object fails here, before a
    /// response is started.
    pub async fn open(&self, start: u64, len: u64) -> Result<RemoteReader, OutputError> {
        let stream = if len == 0 {
            futures::stream::empty().boxed()
        } else {
            let options = GetOptions {
                range: Some(GetRange::Bounded(start..start + len)),
                ..GetOptions::default()
            };
            self.store
                .get_opts(&self.key, options)
                .await
                .map_err(|e| not_found(e, self.key.as_ref()))?
                .into_stream()
        };
        Ok(RemoteReader {
            runtime: tokio::runtime::Handle::current(),
            stream,
            current: Bytes::new(),
        })
    }
}

/// A blocking [`Read`] over a ranged GET, for the blocking threads that encode downloads.
/// Reading it on an async worker thread would block the runtime (and panics).
pub struct RemoteReader {
    runtime: tokio::runtime::Handle,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.runtime.block_on(self.stream.next()) {
                Some(chunk) => self.current = chunk.map_err(std::io::Error::from)?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_locations_name_a_bucket_and_a_prefix() {
        let (bucket, prefix) = parse_s3_location("s3://exports/hearth/prod/").unwrap();
        assert_eq!(bucket, "exports");
        assert_eq!(prefix.as_ref(), "hearth/prod");
        let (bucket, prefix) = parse_s3_location("s3://exports").unwrap();
        assert_eq!(bucket, "exports");
        assert_eq!(prefix.as_ref(), "");
        for bad in ["exports", "s3://", "s3:///x", "file:///tmp", "s3://b/x?y=1"] {
            assert!(parse_s3_location(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn presigned_urls_and_s3_flags_need_object_storage() {
        let presigned = OutputSettings {
            presigned_urls: true,
            ..OutputSettings::default()
        };
        assert!(matches!(
            presigned.build(),
            Err(OutputError::PresignedNeedsObjectStorage)
        ));
        let endpoint = OutputSettings {
            endpoint: Some("http://127.0.0.1:9000".into()),
            ..OutputSettings::default()
        };
        assert!(matches!(
            endpoint.build(),
            Err(OutputError::ObjectStorageOptionWithoutOutput(
                "--s3-endpoint"
            ))
        ));
        assert!(matches!(
            OutputSettings::default().build(),
            Ok(Output::Local)
        ));
    }

    #[test]
    fn objects_live_under_the_prefix() {
        let settings = OutputSettings {
            location: Some("s3://exports/a/b".into()),
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..OutputSettings::default()
        };
        let Ok(Output::Object(object)) = settings.build() else {
            panic!("object storage output");
        };
        assert_eq!(
            object.key("job/u1-a1-Patient-p1.ndjson").as_ref(),
            "a/b/job/u1-a1-Patient-p1.ndjson"
        );
        assert!(!Output::Object(object).presigned_urls());
    }
}
