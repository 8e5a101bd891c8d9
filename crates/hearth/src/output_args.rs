//! The output storage flags of `hearth serve` / `hearth demo`, and the [`Output`] they select.

use anyhow::Context;
use clap::Args;
use hearth_export::{Output, OutputSettings};

#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Keep export files in S3-compatible object storage, e.g. s3://bucket/prefix (default: the
    /// data directory). Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the
    /// other usual AWS sources; several Hearth processes may share one bucket.
    #[arg(long, env = "HEARTH_OUTPUT")]
    output: Option<String>,
    /// The S3 endpoint, for S3-compatible servers other than AWS (else AWS_ENDPOINT_URL).
    #[arg(long, env = "HEARTH_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// The S3 region (else AWS_REGION or AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long, env = "HEARTH_S3_REGION")]
    s3_region: Option<String>,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "HEARTH_S3_ALLOW_HTTP")]
    s3_allow_http: bool,
    /// Manifests list presigned object storage URLs that expire with the job
    /// (`requiresAccessToken: false`) instead of Hearth's own download URLs. Needs --output.
    #[arg(long, env = "HEARTH_PRESIGNED_URLS")]
    presigned_urls: bool,
}

impl OutputArgs {
    /// The output storage, checked against the bucket before the server starts.
    pub async fn output(&self) -> anyhow::Result<Output> {
        let output = OutputSettings {
            location: self.output.clone(),
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            allow_http: self.s3_allow_http,
            presigned_urls: self.presigned_urls,
            ..OutputSettings::default()
        }
        .build()?;
        output
            .check()
            .await
            .with_context(|| format!("cannot use the export output {}", output.describe()))?;
        Ok(output)
    }
}
