//! The accept loop: plain HTTP/1.1 or HTTPS (rustls, TLS 1.2 and 1.3 only), with the limits
//! that must hold before a request reaches a handler.
//!
//! `axum::serve` cannot limit header size or header read time, so Hearth drives hyper's
//! HTTP/1 connections itself:
//! - headers larger than `max_header_bytes` are answered `431` by hyper;
//! - a client that does not finish its headers within `header_timeout` (including an idle
//!   keep-alive connection) is disconnected;
//! - a TLS handshake must finish within [`HANDSHAKE_TIMEOUT`], on its own task, so slow
//!   handshakes never hold up the accept loop;
//! - a response that cannot be written for `send_timeout` (the client stopped reading) ends the
//!   connection, which also frees the blocking thread that streams a download;
//! - at most `max_connections` connections are served at once; more wait in the kernel's
//!   backlog;
//! - each request must be answered within `request_timeout` ([`crate::limits`], `408`).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::AppState;

/// A TLS handshake must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for in-flight requests (a long download may be cut).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How the server listens.
#[derive(Clone)]
pub struct ServeOptions {
    /// Serve HTTPS with this configuration ([`load_tls`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Larger request heads are answered `431`.
    pub max_header_bytes: usize,
    /// The request line and headers must arrive within this.
    pub header_timeout: Duration,
    /// A request must be received and answered (response headers sent) within this.
    pub request_timeout: Duration,
    /// A response write stalled this long ends the connection.
    pub send_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            tls: None,
            max_header_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            send_timeout: Duration::from_secs(120),
            max_connections: 4096,
        }
    }
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("tls", &self.tls.is_some())
            .field("max_header_bytes", &self.max_header_bytes)
            .field("header_timeout", &self.header_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    NoKey { path: String, reason: String },
    #[error("the certificate and key cannot be used together: {0}")]
    Config(#[from] rustls::Error),
}

/// The server's TLS configuration from a PEM certificate chain and private key: TLS 1.2 and
/// 1.3 only (rustls offers nothing older), HTTP/1.1 by ALPN, the aws-lc-rs provider.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (for at most [`SHUTDOWN_GRACE`]).
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = crate::router(state).layer(axum::middleware::from_fn_with_state(
        options.request_timeout,
        crate::limits::request_deadline,
    ));
    let acceptor = options.tls.clone().map(TlsAcceptor::from);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_header_size(options.max_header_bytes.max(1024));
    let http = Arc::new(http);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let send_timeout = options.send_timeout;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors and the like: give the system a moment.
                        tracing::error!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Headers and body go out in separate writes: without TCP_NODELAY the body waits for
        // the client's delayed ACK (about 40 ms per small download).
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let http = http.clone();
        let watcher = graceful.watcher();
        match &acceptor {
            None => {
                let io = TokioIo::new(StallGuard::new(tcp, send_timeout));
                let connection = watcher.watch(http.serve_connection(io, service));
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                return;
                            }
                        };
                    let io = TokioIo::new(StallGuard::new(tls, send_timeout));
                    let _ = watcher.watch(http.serve_connection(io, service)).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period were cut");
    }
    Ok(())
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A connection whose writes fail once they have made no progress for `limit`: a client that
/// stops reading a response cannot hold the connection (and what feeds it) forever.
pub struct StallGuard<T> {
    inner: T,
    limit: Duration,
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled_since: None,
        }
    }

    /// Called when a write could not proceed: `Ready(error)` once the stall has lasted too
    /// long, `Pending` otherwise (with a wake-up registered for the deadline).
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let deadline = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<R>(
        &mut self,
        result: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match result {
            Poll::Ready(result) => {
                self.stalled_since = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Reads may rightly wait (a long download, an idle keep-alive): hyper's header read
        // timeout and the request deadline bound them instead.
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(result, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_stalled_past_the_limit_fails() {
        // A 64-byte pipe whose reader never reads.
        let (writer, _reader) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(writer, Duration::from_millis(100));
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(5), guarded.write_all(&[0u8; 4096]))
            .await
            .expect("the stall guard ends the write");
        let error = result.expect_err("the write cannot finish");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn writes_that_progress_are_not_cut() {
        let (writer, mut reader) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(writer, Duration::from_millis(200));
        let reading = tokio::spawn(async move {
            let mut sink = Vec::new();
            // Slow but steady: never 200 ms without progress.
            let mut chunk = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                match tokio::io::AsyncReadExt::read(&mut reader, &mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.extend_from_slice(&chunk[..n]),
                }
            }
            sink.len()
        });
        guarded.write_all(&[1u8; 2048]).await.unwrap();
        guarded.shutdown().await.unwrap();
        drop(guarded);
        assert_eq!(reading.await.unwrap(), 2048);
    }
}
