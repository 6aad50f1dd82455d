//! `berth serve`: open the stores, bind, serve until SIGTERM or Ctrl-C, then
//! let in-flight requests finish within the shutdown timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::backends::Backends;
use api::ops::Ops;
use api::telemetry::Telemetry;
use metadata::IdentityStore;
use observe::{Checks, Health, Metrics};
use registry::events::Recorder;
use registry::{Registry, RegistryConfig};
use tokio::net::TcpListener;

use crate::config::{ServeArgs, ServeConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub fn run(args: ServeArgs) -> Result<(), BoxError> {
    let cfg = args.resolve()?;
    crate::logging::init(&cfg.log, cfg.log_format);
    check_exposure(&cfg)?;
    let maintenance = crate::background::runtime()?;
    let serving = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(crate::logging::on_worker_park)
        .build()?;
    let served = serving.block_on(serve(cfg, maintenance.handle().clone()));
    // Maintenance stops first: a GC batch in flight is safe to abandon
    // (every removal is its own transaction, and bytes are deleted after
    // their record). Dropping the serving runtime then waits for a metadata
    // transaction maintenance had started on it, so none is cut short.
    maintenance.shutdown_background();
    drop(serving);
    served
}

/// An unauthenticated registry is reachable by anyone who can reach its
/// address, so a non-loopback bind needs an explicit opt-in.
fn check_exposure(cfg: &ServeConfig) -> Result<(), BoxError> {
    if !cfg.listen.ip().is_loopback() && !cfg.auth && !cfg.insecure_allow_anonymous {
        return Err(format!(
            "refusing to listen on {} without authentication: anyone who can reach it could push, pull and delete. \
             Turn on access control with --auth, listen on a loopback address, or pass --insecure-allow-anonymous \
             if that is really what you want",
            cfg.listen
        )
        .into());
    }
    Ok(())
}

/// `maintenance` runs retention, GC and cache eviction at low priority (see
/// `background`).
async fn serve(cfg: ServeConfig, maintenance: tokio::runtime::Handle) -> Result<(), BoxError> {
    // The metadata store runs its transactions on the serving runtime (see
    // `RedbMetadata::on_runtime`).
    let Backends { blobs, meta, identity } = crate::backends::open(
        &cfg.data_dir,
        &cfg.metadata,
        &cfg.blobs,
        Some(tokio::runtime::Handle::current()),
        "",
    )
    .await?;
    let blobs_at = match &cfg.blobs.location {
        crate::storage_location::StorageLocation::DataDir => cfg.data_dir.display().to_string(),
        crate::storage_location::StorageLocation::S3(s3) => s3.to_string(),
    };
    let meta_at = match cfg.metadata {
        crate::backends::MetadataLocation::Postgres(_) => "PostgreSQL".to_string(),
        crate::backends::MetadataLocation::Embedded => cfg.data_dir.display().to_string(),
    };
    tracing::info!("blobs in {blobs_at}; metadata in {meta_at}");
    let metrics = Arc::new(Metrics::new());
    let conns = metrics.connections.clone();
    let health = Arc::new(Health::new(cfg.health.failure_threshold));
    let mut registry = Registry::new(
        blobs.clone(),
        meta.clone(),
        RegistryConfig {
            sparse_index: cfg.sparse_index,
            max_manifest_size: cfg.max_manifest_size,
            manifest_cache_bytes: cfg.manifest_cache_size,
            immutable_tags: cfg.immutable_tags.clone(),
            disk_watermark: cfg.disk_watermark,
            quotas: cfg.quotas.clone(),
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
    events::start(
        meta.clone(),
        cfg.webhooks.clone(),
        metrics.clone(),
        wake,
        registry.node_id(),
    )?;
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

    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "; another program uses this address: choose another with --listen ADDR or BERTH_LISTEN=ADDR, e.g. --listen 127.0.0.1:5001"
        } else {
            ""
        };
        format!("cannot listen on {}: {e}{hint}", cfg.listen)
    })?;
    let addr: SocketAddr = listener.local_addr()?;
    let scheme = if cfg.tls_cert.is_some() { "https" } else { "http" };
    let external_url = cfg.external_url.clone().unwrap_or_else(|| format!("{scheme}://{addr}"));
    let auth = if cfg.auth {
        Some(
            open_auth(&cfg, &external_url, identity)
                .await?
                .with_counters(metrics.auth.clone()),
        )
    } else {
        None
    };
    let registry = Arc::new(registry);
    // With metadata in PostgreSQL, the other nodes' writes reach this
    // node's caches through the store's change feed (returns at once with
    // redb, which only this process writes).
    tokio::spawn(registry.clone().follow_changes());
    let mut app = api::App::new(registry.clone(), auth);
    app.body_idle_timeout = Duration::from_secs(cfg.client_timeout);
    if !cfg.signature_policies.is_empty() {
        for r in &cfg.signature_policies {
            let keys: Vec<&str> = r.policy.keys.iter().map(|k| k.short()).collect();
            tracing::info!(repositories = %r.repositories, keys = ?keys, threshold = r.policy.threshold,
                mode = ?r.policy.mode, "signature policy");
        }
        app.signatures = Some(Arc::new(api::signed::Policies::new(
            cfg.signature_policies.clone(),
            metrics.clone(),
        )));
    }
    if !cfg.upstreams.is_empty() {
        let proxy = Arc::new(proxy::Proxy::new(registry, &cfg.upstreams, &metrics)?);
        for u in &cfg.upstreams {
            tracing::info!(upstream = %u.name, url = %u.url, project = %u.project, namespace = %u.namespace,
                mirror = u.mirror, "pull-through cache");
        }
        maintenance.spawn(proxy::run_eviction(proxy.clone(), cfg.gc.clone()));
        tokio::spawn(proxy::run_health(
            proxy.clone(),
            health.clone(),
            metrics.clone(),
            cfg.health.interval,
        ));
        app.proxy = Some(proxy);
    }
    let app = Arc::new(app);
    let app_registry = app.registry.clone();
    if cfg.gc_interval > 0 {
        maintenance.spawn(crate::gc::schedule(
            app.clone(),
            Duration::from_secs(cfg.gc_interval),
            cfg.gc.clone(),
            cfg.retention.clone(),
        ));
    }
    let mut app = api::router(app);
    let telemetry = Telemetry {
        metrics: metrics.clone(),
        access_log: cfg.access_log,
    };
    let ops = api::ops::router(Ops {
        metrics,
        health: health.clone(),
    });
    match cfg.metrics_listen {
        None => app = app.merge(ops),
        Some(ops_addr) => {
            let l = TcpListener::bind(ops_addr)
                .await
                .map_err(|e| format!("cannot listen on {ops_addr} (--metrics-listen): {e}"))?;
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
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(crate::server::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None) => None,
        _ => return Err("TLS needs both --tls-cert and --tls-key".into()),
    };
    // Bad certificate files stop berth before it announces anything.
    if let Some(files) = &tls {
        crate::server::load_tls(files)?;
    }
    tracing::info!(
        listen = %addr,
        node = %app_registry.node_id(),
        tls = tls.is_some(),
        external_url = %external_url,
        data_dir = %cfg.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "berth is serving"
    );
    let drain = Duration::from_secs(cfg.shutdown_timeout);
    let drain_delay = cfg.drain_delay;
    let shutdown = async move {
        shutdown_signal().await;
        // Readiness fails first, so load balancers stop sending new work
        // while berth still serves what arrives meanwhile.
        health.set_draining();
        if !drain_delay.is_zero() {
            tracing::info!(
                delay_ms = drain_delay.as_millis() as u64,
                "draining: /readyz fails; still serving"
            );
            tokio::time::sleep(drain_delay).await;
        }
        tracing::info!(
            timeout_secs = drain.as_secs(),
            "shutting down: finishing in-flight requests"
        );
    };
    let limits = crate::server::Limits {
        header_read_timeout: Duration::from_secs(cfg.client_timeout),
        write_timeout: Duration::from_secs(cfg.client_timeout),
        max_connections: cfg
            .max_connections
            .unwrap_or_else(|| default_max_connections(raise_fd_limit())),
    };
    tracing::info!(max_connections = limits.max_connections, "connection limit");
    crate::server::serve(listener, app, tls, limits, conns, shutdown, drain).await?;
    // The other nodes need not wait for the lease to expire.
    if cfg.gc_interval > 0 {
        app_registry.release_lease(registry::lease::GC).await;
    }
    tracing::info!("berth stopped");
    Ok(())
}

/// Raises the soft open-file limit to the hard one (as Go programs do)
/// and returns it: every connection needs a descriptor, a blob GET two.
fn raise_fd_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a local struct the kernel fills and reads.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim = raised;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
        let cur = lim.rlim_cur as u64;
        cur
    }
    #[cfg(not(unix))]
    8192
}

/// Half the descriptors left after 256 for the store, logs and peers (a
/// blob reader holds two), at most 8192 and at least 16.
fn default_max_connections(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(256) / 2).clamp(16, 8192) as usize
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

async fn open_auth(
    cfg: &ServeConfig,
    external_url: &str,
    meta: Arc<dyn IdentityStore>,
) -> Result<auth::Auth, BoxError> {
    if external_url.contains("://0.0.0.0") || external_url.contains("://[::]") {
        return Err(format!(
            "berth listens on {} and clients cannot reach the token service there; set --external-url to the URL \
             clients use, e.g. https://registry.example.com",
            cfg.listen
        )
        .into());
    }
    let key = auth::token::TokenKey::load_or_create(&cfg.token_key)?;
    crate::secrets::warn_if_exposed(&cfg.token_key, "the token signing key");
    let audit_path = cfg.data_dir.join("audit.log");
    crate::secrets::warn_if_exposed(&audit_path, "the audit log");
    let audit = auth::audit::AuditLog::open(audit_path)
        .map_err(|e| format!("cannot open the audit log in {}: {e}", cfg.data_dir.display()))?;
    let config = auth::AuthConfig {
        realm: format!("{external_url}/token"),
        service: cfg.token_service.clone(),
        token_ttl: Duration::from_secs(cfg.token_ttl),
        ..auth::AuthConfig::default()
    };
    bootstrap_admin(meta.as_ref(), &cfg.data_dir).await?;
    Ok(auth::Auth::new(meta, key, config, audit))
}

/// With access control on and no users yet, creates `admin` from
/// BERTH_INITIAL_ADMIN_PASSWORD, or says how to create the first admin.
async fn bootstrap_admin(meta: &dyn IdentityStore, data_dir: &std::path::Path) -> Result<(), BoxError> {
    if !meta.list_users().await.map_err(|e| e.to_string())?.is_empty() {
        return Ok(());
    }
    match std::env::var("BERTH_INITIAL_ADMIN_PASSWORD") {
        Ok(pw) if !pw.is_empty() => {
            match auth::admin::create_user(meta, "admin", &pw, true).await {
                Ok(_) => tracing::info!("created system administrator 'admin' from BERTH_INITIAL_ADMIN_PASSWORD"),
                // Another node sharing the database, starting at once, made it.
                Err(auth::admin::AdminError::Conflict(_)) => {}
                Err(e) => {
                    return Err(
                        format!("cannot create the initial admin from BERTH_INITIAL_ADMIN_PASSWORD: {e}").into(),
                    )
                }
            }
        }
        _ => tracing::warn!(
            "access control is on but there are no users yet. Create the first administrator: stop berth and run \
             `berth user add admin --admin --data-dir {}`, or start berth once with BERTH_INITIAL_ADMIN_PASSWORD set",
            data_dir.display()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_connection_cap_leaves_descriptors_to_spare() {
        use super::default_max_connections as cap;
        assert_eq!(cap(1024), 384);
        assert_eq!(cap(1 << 20), 8192);
        assert_eq!(cap(100), 16);
    }
}
