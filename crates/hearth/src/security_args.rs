//! The authorization and hardening flags of `hearth serve` / `hearth demo`, and what they turn
//! into: [`AuthSettings`] and [`ServeOptions`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hearth_server::auth::OidcSettings;
use hearth_server::{AuthSettings, ServeOptions};

use crate::cli::parse_duration;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthArg {
    /// Every request is allowed (the embedded demo).
    Off,
    /// Hearth's own SMART Backend Services authorization server (`hearth clients add`).
    Smart,
    /// Bearer tokens of a trusted OpenID Connect provider.
    Oidc,
}

#[derive(Args, Debug, Clone)]
pub struct SecurityArgs {
    /// Authorization: off (open, the default), smart (Hearth issues SMART Backend Services
    /// tokens to clients registered with `hearth clients add`), or oidc (tokens of a trusted
    /// OpenID Connect provider, see --trusted-issuer).
    #[arg(long, env = "HEARTH_AUTH", value_enum, default_value_t = AuthArg::Off)]
    auth: AuthArg,
    /// How long access tokens issued with --auth smart live (at most 300s).
    #[arg(long, env = "HEARTH_TOKEN_LIFETIME", default_value = "300s", value_parser = parse_duration)]
    token_lifetime: Duration,
    /// --auth oidc: the issuer (`iss`) whose tokens are accepted.
    #[arg(long, env = "HEARTH_TRUSTED_ISSUER")]
    trusted_issuer: Option<String>,
    /// --auth oidc: the URL of the issuer's JWKS (its signing keys).
    #[arg(long, env = "HEARTH_ISSUER_JWKS")]
    issuer_jwks: Option<String>,
    /// --auth oidc: an audience (`aud`) every accepted token must carry.
    #[arg(long, env = "HEARTH_AUDIENCE")]
    audience: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (TLS 1.2 and 1.3 only).
    #[arg(long, env = "HEARTH_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "HEARTH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Larger request heads (request line and headers) are answered 431.
    #[arg(long, env = "HEARTH_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// A client must send its request line and headers within this (also the keep-alive idle
    /// limit).
    #[arg(long, env = "HEARTH_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// A request must be received, body included, and answered within this (else 408).
    #[arg(long, env = "HEARTH_REQUEST_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// A response that the client does not read for this long ends the connection.
    #[arg(long, env = "HEARTH_SEND_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    send_timeout: Duration,
    /// Connections served at once; more wait.
    #[arg(long, env = "HEARTH_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Answer 429 with Retry-After to status polls that come sooner than the previous answer's
    /// Retry-After asked.
    #[arg(long, env = "HEARTH_THROTTLE_POLLS")]
    pub throttle_polls: bool,
}

impl SecurityArgs {
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    pub fn auth_settings(&self) -> anyhow::Result<AuthSettings> {
        let oidc_flags =
            self.trusted_issuer.is_some() || self.issuer_jwks.is_some() || self.audience.is_some();
        let mut settings = match self.auth {
            AuthArg::Off | AuthArg::Smart if oidc_flags => {
                bail!("--trusted-issuer, --issuer-jwks and --audience apply to --auth oidc only")
            }
            AuthArg::Off => AuthSettings::default(),
            AuthArg::Smart => AuthSettings::smart(),
            AuthArg::Oidc => {
                let (Some(issuer), Some(jwks_url), Some(audience)) = (
                    self.trusted_issuer.clone(),
                    self.issuer_jwks.clone(),
                    self.audience.clone(),
                ) else {
                    bail!("--auth oidc needs --trusted-issuer, --issuer-jwks and --audience");
                };
                if !(jwks_url.starts_with("https://") || jwks_url.starts_with("http://")) {
                    bail!("--issuer-jwks must be an http(s) URL, not '{jwks_url}'");
                }
                AuthSettings::oidc(OidcSettings {
                    issuer,
                    jwks_url,
                    audience,
                })
            }
        };
        if self.token_lifetime.is_zero() || self.token_lifetime > Duration::from_secs(300) {
            bail!("--token-lifetime must be between 1s and 300s");
        }
        settings.token_lifetime = self.token_lifetime;
        Ok(settings)
    }

    pub fn serve_options(&self) -> anyhow::Result<ServeOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(hearth_server::load_tls(cert, key).context("loading the TLS certificate")?)
            }
            _ => None,
        };
        Ok(ServeOptions {
            tls,
            max_header_bytes: self.max_header_bytes,
            header_timeout: self.header_timeout,
            request_timeout: self.request_timeout,
            send_timeout: self.send_timeout,
            max_connections: self.max_connections,
        })
    }
}
