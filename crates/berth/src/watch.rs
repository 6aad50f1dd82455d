//! `berth watch`: the deployment guard's commands (crates/watch).

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use watch::{Diagnosis, Failure, Guard, Outcome, PullDiagnoser, Store};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args)]
pub struct WatchArgs {
    /// The guard's durable history (deployments, timelines, pauses).
    #[arg(long, env = "BERTH_WATCH_HISTORY", default_value = "berth-watch.redb", global = true)]
    history: PathBuf,
    #[command(subcommand)]
    cmd: WatchCmd,
}

#[derive(Subcommand)]
enum WatchCmd {
    /// Deploy a service from its description (TOML): by digest, beside the
    /// old version, gated on Running and health; rolls back on failure.
    Deploy {
        file: PathBuf,
        /// Deploy this image instead of the file's `image`.
        #[arg(long)]
        image: Option<String>,
    },
    /// Every service: the active version, pauses, the failure count.
    Status,
    /// A service's deployments with their timelines.
    History { name: String },
    /// Refuse further deployments of a service until `resume`.
    Pause {
        name: String,
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
    },
    /// Lift a pause and start counting failures again.
    Resume { name: String },
    /// Go back to the last release that passed before the active one.
    Rollback { name: String },
    /// The long-running guard: watches every service's active release and
    /// rolls back on failed health; exports /metrics.
    Run {
        /// Where /metrics is served.
        #[arg(long, default_value = "127.0.0.1:9465")]
        listen: std::net::SocketAddr,
        /// A label on every series, NAME=VALUE (e.g. region=eu); repeatable.
        #[arg(long = "label", value_parser = label)]
        labels: Vec<(String, String)>,
    },
    /// The monthly review: time to deploy, failures, rollbacks, causes.
    Report {
        #[arg(long, default_value = "30d", value_parser = observe::time::parse_duration)]
        since: std::time::Duration,
    },
}

fn label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

/// Serves /metrics and runs the guard until SIGTERM or Ctrl-C.
async fn serve(g: Guard, listen: std::net::SocketAddr, labels: Vec<(String, String)>) -> Result<(), BoxError> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "berth watch: guard running; metrics on http://{}/metrics",
        listener.local_addr()?
    );
    let registry = Arc::new(watch::metrics::registry(g.store.clone(), labels));
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                // The collector reads the history (redb): off the runtime.
                let encoded = tokio::task::spawn_blocking(move || {
                    let mut text = String::new();
                    prometheus_client::encoding::text::encode(&mut text, &registry)
                        .map(|()| text)
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match encoded {
                    Ok(text) => (
                        axum::http::StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    ),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("cannot encode the metrics: {e}\n"),
                    ),
                }
            }
        }),
    );
    tokio::spawn(watch::guard::run(Arc::new(g)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}

fn guard(store: Store) -> Result<Guard, BoxError> {
    let http = reqwest::Client::builder()
        .user_agent(concat!("berth-watch/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(Guard {
        engine: Arc::new(watch::Docker::from_env()),
        store,
        diagnoser: Arc::new(WalkThePullPath),
        http,
        echo: true,
    })
}

/// A failed pull's diagnosis: `berth diagnose`'s walk of the pull path,
/// from this host (the Engine's), for the root cause and fix it names; the
/// Engine's own error where the walk finds nothing wrong (a transient fault,
/// or one between the Engine and the registry only).
struct WalkThePullPath;

#[async_trait::async_trait]
impl PullDiagnoser for WalkThePullPath {
    async fn diagnose(&self, image: &str, failure: &Failure) -> Option<Diagnosis> {
        let mut opts = diagnose::Options::new(image);
        // The Engine speaks plain HTTP to loopback registries (it treats
        // 127.0.0.0/8 as insecure), so the walk must too.
        opts.plain_http = is_loopback_registry(image);
        opts.timeout = std::time::Duration::from_secs(5);
        let report = diagnose::run(&opts).await;
        match (report.root_cause, report.fix) {
            (Some(root_cause), Some(fix)) => Some(Diagnosis { root_cause, fix }),
            _ => watch::FromEngineError.diagnose(image, failure).await,
        }
    }
}

fn is_loopback_registry(image: &str) -> bool {
    let host = image.split('/').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// A deployment in progress whose process died (nobody holds its
/// service's lock) is reconciled before the status is printed.
fn reconcile_interrupted(store: &Store) -> Result<(), BoxError> {
    let interrupted: Vec<(String, watch::store::ServiceLock)> = store
        .services()?
        .into_iter()
        .filter(|(_, s)| s.in_progress_since_ms.is_some())
        .filter_map(|(name, _)| store.lock(&name).ok().map(|l| (name, l)))
        .collect();
    if interrupted.is_empty() {
        return Ok(());
    }
    let g = guard(store.clone())?;
    runtime()?.block_on(async {
        for (name, _lock) in &interrupted {
            for id in g.recover(name).await? {
                eprintln!("berth watch: {name} #{id} was interrupted (its process died); reconciled, see `berth watch history {name}`");
            }
        }
        Ok::<(), watch::WatchError>(())
    })?;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

pub fn run(args: WatchArgs) -> Result<(), BoxError> {
    let store = Store::new(&args.history);
    match args.cmd {
        WatchCmd::Deploy { file, image } => {
            let (spec, text) = watch::spec::load(&file)?;
            let spec = match image {
                Some(i) => spec.with_image(&i, None)?,
                None => spec,
            };
            let g = guard(store)?;
            let d = runtime()?.block_on(g.deploy(&spec, &file, &text))?;
            print!("{}", watch::report::history(std::slice::from_ref(&d)));
            match d.outcome {
                Some(Outcome::Success) => Ok(()),
                o => Err(format!(
                    "deployment #{} of {} ended {}; `berth watch history {}` has the timeline",
                    d.id,
                    d.service,
                    o.map_or("unfinished", Outcome::as_str),
                    d.service
                )
                .into()),
            }
        }
        WatchCmd::Status => {
            // The state is printed even if the reconciliation cannot run.
            if let Err(e) = reconcile_interrupted(&store) {
                eprintln!("berth watch: cannot reconcile interrupted deployments: {e}");
            }
            print!("{}", watch::report::status(&store.services()?));
            Ok(())
        }
        WatchCmd::History { name } => {
            let all = store.deployments(Some(&name), 0)?;
            if all.is_empty() {
                return Err(watch::StoreError::Unknown(name).into());
            }
            print!("{}", watch::report::history(&all));
            Ok(())
        }
        WatchCmd::Pause { name, reason } => {
            store.pause(&name, &reason)?;
            println!("{name}: paused ({reason}); `berth watch resume {name}` lifts it");
            Ok(())
        }
        WatchCmd::Resume { name } => {
            store.resume(&name)?;
            println!("{name}: resumed; deployments are admitted again");
            Ok(())
        }
        WatchCmd::Rollback { name } => {
            let g = guard(store)?;
            let d = runtime()?.block_on(g.rollback(&name, "rollback requested by an operator"))?;
            print!("{}", watch::report::history(std::slice::from_ref(&d)));
            match d.outcome {
                Some(Outcome::Success) => Ok(()),
                _ => Err(format!("the rollback of {name} failed; see the cause above").into()),
            }
        }
        WatchCmd::Run { listen, labels } => {
            let g = guard(store)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(serve(g, listen, labels))
        }
        WatchCmd::Report { since } => {
            let from = watch::store::now_ms().saturating_sub(since.as_millis() as u64);
            print!("{}", watch::report::review(&store.deployments(None, from)?, since));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_registries_are_plain_http_as_the_engine_does() {
        for (image, loopback) in [
            ("127.0.0.1:5000/team/app:v1", true),
            ("localhost:5000/app", true),
            ("[::1]:5000/app:v1", true),
            ("127.0.0.2/app", true),
            ("registry.example.com/app:v1", false),
            ("10.0.0.1:5000/app", false),
        ] {
            assert_eq!(super::is_loopback_registry(image), loopback, "{image}");
        }
    }
}
