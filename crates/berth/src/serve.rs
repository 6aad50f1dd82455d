//! `berth serve`: open the stores, bind, serve until SIGTERM or Ctrl-C, then
//! let in-flight requests finish within the shutdown timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::ops::Ops;
use api::telemetry::Telemetry;
use axum::serve::ListenerExt;
use metadata::{MetadataStore, RedbMetadata};
use observe::{Checks, Health, Metrics};
use registry::events::Recorder;
use registry::{Registry, RegistryConfig};
use storage::{BlobStore, FsBlobStore};
use tokio::net::TcpListener;

use crate::config::{ServeArgs, ServeConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub fn run(args: ServeArgs) -> Result<(), BoxError> {
    let cfg = args.resolve()?;
    crate::logging::init(&cfg.log, cfg.log_format);
    check_exposure(&cfg)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(cfg))
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
    let blobs: Arc<dyn BlobStore> = Arc::new(blobs);
    let meta: Arc<dyn MetadataStore> = Arc::new(meta);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(cfg.health.failure_threshold));
    let mut registry = Registry::new(
        blobs.clone(),
        meta.clone(),
        RegistryConfig {
            sparse_index: cfg.sparse_index,
            max_manifest_size: cfg.max_manifest_size,
        },
    );
    let (committed, wake) = tokio::sync::watch::channel(0);
    let kinds = events::wanted_kinds(&cfg.webhooks);
    if !kinds.is_empty() {
        let recorder = Recorder::start(
            meta.clone(),
            kinds,
            &cfg.event_source,
            metrics.recorder.clone(),
            committed,
        );
        registry = registry.with_events(recorder);
    }
    // With no webhooks this only prunes what an earlier configuration left.
    events::start(meta.clone(), cfg.webhooks.clone(), metrics.clone(), wake)?;
    tokio::spawn(observe::health::run(
        Checks {
            blobs,
            meta,
            data_dir: cfg.data_dir.clone(),
            config: cfg.health.clone(),
        },
        health.clone(),
        metrics.clone(),
    ));

    let telemetry = Telemetry {
        metrics: metrics.clone(),
        access_log: cfg.access_log,
    };
    let ops = api::ops::router(Ops {
        metrics,
        health: health.clone(),
    });
    let mut app = api::router(Arc::new(registry));
    match cfg.metrics_listen {
        None => app = app.merge(ops),
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--metrics-listen): {e}"))?;
            let ops_addr = l.local_addr()?;
            tracing::info!(ops_listen = %ops_addr, "health and metrics endpoints are serving");
            let ops = api::telemetry::layer(ops, telemetry.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, ops.into_make_service_with_connect_info::<SocketAddr>()).await {
                    tracing::error!(error = %e, "the health and metrics listener failed");
                }
            });
        }
    }
    let app = api::telemetry::layer(app, telemetry);
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(listen = %addr, data_dir = %cfg.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "berth is serving");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let timeout = Duration::from_secs(cfg.shutdown_timeout);
    let drain_delay = cfg.drain_delay;
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Readiness fails first, so load balancers stop sending new
            // work while berth still serves what arrives meanwhile.
            health.set_draining();
            if !drain_delay.is_zero() {
                tracing::info!(
                    delay_ms = drain_delay.as_millis() as u64,
                    "draining: /readyz fails; still serving"
                );
                tokio::time::sleep(drain_delay).await;
            }
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
