//! The HTTP server: accepts connections (plain or TLS), serves HTTP/1.1 and
//! HTTP/2 with hyper, bounds what a client can make the server hold
//! (header size, header read time, write progress, open connections), and
//! drains connections on shutdown.
//!
//! Beyond `max_connections` a new connection is answered `503` (plain
//! HTTP) or closed (TLS) at once, logged and counted: a few thousand idle
//! or slow sockets cannot exhaust descriptors, and the accept loop backs off
//! when the process is out of them anyway.
//!
//! TLS certificates are reloaded on SIGHUP without dropping connections:
//! each new handshake uses the configuration current at accept time.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use observe::metrics::ConnectionMetrics;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tower::ServiceExt;

use crate::write_deadline::WriteDeadline;

/// Largest request head (request line plus headers) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// What a client is allowed to make the server wait for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to complete the TLS handshake and send the request head.
    pub header_read_timeout: Duration,
    /// A connection whose writes make no progress this long is closed.
    pub write_timeout: Duration,
    /// Connections served at once; more are refused at accept.
    pub max_connections: usize,
}

/// What a connection beyond the cap gets, on plain HTTP.
fn busy_response() -> Vec<u8> {
    let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"too many open connections; retry in a second"}]}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Longest rest of the accept loop after accept errors in a row.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Holds a connection's place under the cap, and counts it open.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: ConnectionMetrics,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.metrics.closed();
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Loads a certificate chain and key into a rustls server configuration
/// that offers HTTP/2 and HTTP/1.1.
pub fn load_tls(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "cannot read TLS certificate {}: {e}{}",
                files.cert.display(),
                pem_hint(&files.cert, false)
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "no certificate in {}{}",
            files.cert.display(),
            pem_hint(&files.cert, false)
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        format!(
            "cannot read TLS key {}: {e}{}",
            files.key.display(),
            pem_hint(&files.key, true)
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not fit together: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What is wrong with a certificate or key file that did not parse, and
/// the command that converts it: berth reads PEM only, and keys
/// unencrypted.
fn pem_hint(path: &std::path::Path, key: bool) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let (expected, convert) = if key {
        (
            "an unencrypted PEM key (BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)",
            "openssl pkey",
        )
    } else {
        ("PEM certificates (BEGIN CERTIFICATE)", "openssl x509")
    };
    let text = String::from_utf8_lossy(&bytes);
    let p = path.display();
    if text.contains("ENCRYPTED") {
        format!("; the key is encrypted, and berth needs {expected}: decrypt it with `{convert} -in {p} -out key.pem`")
    } else if !text.contains("-----BEGIN ") {
        format!("; this is not PEM (DER?), and berth needs {expected}: convert it with `{convert} -inform DER -in {p} -out {}.pem`", if key { "key" } else { "cert" })
    } else {
        format!("; berth needs {expected}")
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits up to
/// `drain` for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsFiles>,
    limits: Limits,
    conns: ConnectionMetrics,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> Result<(), BoxError> {
    let tls_config = match &tls {
        Some(files) => Some(Arc::new(RwLock::new(load_tls(files)?))),
        None => None,
    };
    if let (Some(files), Some(current)) = (tls.clone(), tls_config.clone()) {
        tokio::spawn(reload_on_sighup(files, current));
    }
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        // A client that stops reading stops answering pings, also when
        // flow control, not a full socket, keeps the server from writing.
        .keep_alive_interval(Some(limits.write_timeout))
        .keep_alive_timeout(limits.write_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    let busy = busy_response();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = Duration::ZERO;
    let mut last_refusal_log: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::ZERO;
                    a
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off
                    // (doubling, up to a second), keep serving.
                    if backoff.is_zero() {
                        tracing::warn!(error = %e, "accept failed; backing off");
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            conns.refused();
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_refusal_log = Some(std::time::Instant::now());
                tracing::warn!(client = %peer, max = limits.max_connections,
                    "refusing a connection: --max-connections are open (counted in berth_connections_refused)");
            }
            if tls_config.is_none() {
                // Best effort, without waiting: the socket is new and empty.
                let _ = tcp.try_write(&busy);
            }
            continue;
        };
        conns.opened();
        let admitted = Admitted {
            _permit: permit,
            metrics: conns.clone(),
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let plain = tls_config.is_none();
        let svc = TowerToHyperService::new(app.map_request(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            if plain {
                req.extensions_mut().insert(api::PlainTcp);
            }
            req
        }));
        let builder = builder.clone();
        match &tls_config {
            None => {
                let io = WriteDeadline::new(crate::zero_copy::PlainStream(tcp), limits.write_timeout, conns.clone());
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), svc)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(admitted);
                });
            }
            Some(current) => {
                let cfg = current.read().unwrap_or_else(|e| e.into_inner()).clone();
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                let watcher = graceful.watcher();
                let io = WriteDeadline::new(tcp, limits.write_timeout, conns.clone());
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                    drop(admitted);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => Ok(()),
        _ = tokio::time::sleep(drain) => {
            tracing::warn!("in-flight requests did not finish within {} s; exiting", drain.as_secs());
            Ok(())
        }
    }
}

async fn reload_on_sighup(files: TlsFiles, current: Arc<RwLock<Arc<rustls::ServerConfig>>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match load_tls(&files) {
                Ok(cfg) => {
                    *current.write().unwrap_or_else(|e| e.into_inner()) = cfg;
                    tracing::info!(cert = %files.cert.display(), "reloaded the TLS certificate");
                }
                Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (files, current);
}
