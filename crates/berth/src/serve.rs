//! `berth serve`: open the stores, bind, serve until SIGTERM or Ctrl-C, then
//! let in-flight requests finish within the shutdown timeout.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use metadata::RedbMetadata;
use registry::{Registry, RegistryConfig};
use storage::FsBlobStore;
use tokio::net::TcpListener;

use crate::config::{ServeArgs, ServeConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub fn run(args: ServeArgs) -> Result<(), BoxError> {
    let cfg = args.resolve()?;
    init_logging(&cfg.log);
    check_exposure(&cfg)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(cfg))
}

fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// An unauthenticated registry is reachable by anyone who can reach its
/// address, so a non-loopback bind needs an explicit opt-in.
fn check_exposure(cfg: &ServeConfig) -> Result<(), BoxError> {
    if !cfg.listen.ip().is_loopback() && !cfg.insecure_allow_anonymous {
        return Err(format!(
            "refusing to listen on {} without authentication: anyone who can reach it could push, pull and delete. \
             Listen on a loopback address, or pass --insecure-allow-anonymous if that is really what you want",
            cfg.listen
        )
        .into());
    }
    Ok(())
}

async fn serve(cfg: ServeConfig) -> Result<(), BoxError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", cfg.data_dir.display()))?;
    let blobs = FsBlobStore::open(&cfg.data_dir)
        .await
        .map_err(|e| format!("cannot open blob storage in {}: {e}", cfg.data_dir.display()))?;
    let meta_path = cfg.data_dir.join("meta.redb");
    let meta = RedbMetadata::open(&meta_path).map_err(|e| {
        format!(
            "cannot open metadata database {}: {e} (is another berth using this data directory?)",
            meta_path.display()
        )
    })?;
    let registry = Registry::new(
        Arc::new(blobs),
        Arc::new(meta),
        RegistryConfig {
            sparse_index: cfg.sparse_index,
            max_manifest_size: cfg.max_manifest_size,
            manifest_cache_bytes: cfg.manifest_cache_size,
        },
    );
    let app = api::router(Arc::new(registry));
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(listen = %addr, data_dir = %cfg.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "berth is serving");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let timeout = Duration::from_secs(cfg.shutdown_timeout);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!(
                timeout_secs = timeout.as_secs(),
                "shutting down: finishing in-flight requests"
            );
            // A hard stop if draining takes longer than the timeout.
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                tracing::warn!("in-flight requests did not finish in time; exiting");
                std::process::exit(1);
            });
        })
        .await?;
    tracing::info!("berth stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
