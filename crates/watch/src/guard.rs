//! `berth watch run`: the long-running guard. It watches the active
//! release of every service in the history (its instances' state and
//! health, once per health interval) and rolls a service back to the last
//! release that passed when an instance fails the threshold of
//! consecutive checks. A service with a deployment in progress is left to
//! that deployment; one whose deployment's process died (its lock is free)
//! is reconciled first (`recover`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rollout::{watch_instances, Guard};
use crate::spec::{self, Spec};
use crate::store::StoreError;

/// How often the history is read for services to watch.
const RESCAN: Duration = Duration::from_secs(1);

/// Runs until the process ends.
pub async fn run(g: Arc<Guard>) {
    let mut watched: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        match g.store.bg().services().await {
            Ok(services) => {
                for (name, st) in services {
                    if st.active.is_none() || watched.get(&name).is_some_and(|h| !h.is_finished()) {
                        continue;
                    }
                    tracing::info!(service = %name, "guard: watching");
                    watched.insert(name.clone(), tokio::spawn(watch_service(g.clone(), name)));
                }
            }
            Err(e) => tracing::warn!(error = %e, "guard: cannot read the history"),
        }
        tokio::time::sleep(RESCAN).await;
    }
}

async fn watch_service(g: Arc<Guard>, name: String) {
    loop {
        let state = match g.store.bg().state(&name).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "guard: cannot read the service");
                tokio::time::sleep(RESCAN).await;
                continue;
            }
        };
        let Some(active) = state.active.clone() else { return };
        let spec = match spec::parse(Path::new(&active.spec_file), &active.spec_toml) {
            Ok(s) => Spec {
                image: active.image.clone(),
                version: active.version.clone(),
                ..s
            },
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "guard: the active release's description is invalid");
                return;
            }
        };
        // Busy while another process holds the lock; a deployment in
        // progress without its lock holder died, and is reconciled.
        let busy = match g.store.lock(&name) {
            Ok(_lock) if state.in_progress_since_ms.is_some() => {
                match g.recover(&name).await {
                    Ok(ids) => tracing::warn!(service = %name, ?ids, "guard: reconciled interrupted deployments"),
                    Err(e) => tracing::warn!(service = %name, error = %e, "guard: cannot reconcile"),
                }
                true
            }
            Ok(_lock) => false,
            Err(StoreError::Locked { .. }) => true,
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "guard: cannot take the service's lock");
                true
            }
        };
        let failed = match &spec.backend {
            crate::spec::Backend::Containers => {
                let ids: Vec<String> = match g.engine.list(&name).await {
                    Ok(l) => l
                        .into_iter()
                        .filter(|c| c.digest == active.digest)
                        .map(|c| c.id)
                        .collect(),
                    Err(e) => {
                        tracing::warn!(service = %name, error = %e, "guard: cannot list the instances");
                        Vec::new()
                    }
                };
                if busy || ids.is_empty() {
                    tokio::time::sleep(spec.health.interval.max(RESCAN)).await;
                    continue;
                }
                // Watch a while, then look at the history again (a new release).
                let until = Instant::now() + spec.health.interval * 10;
                watch_instances(
                    &g,
                    &spec,
                    &ids,
                    Some(until),
                    |m| tracing::warn!(service = %name, "guard: {m}"),
                )
                .await
            }
            crate::spec::Backend::Swarm(sw) => {
                if busy {
                    tokio::time::sleep(spec.health.interval.max(RESCAN)).await;
                    continue;
                }
                let until = Instant::now() + spec.health.interval * 10;
                g.swarm_watch(
                    &spec,
                    sw,
                    &active,
                    Some(until),
                    &|m| tracing::warn!(service = %name, "guard: {m}"),
                )
                .await
            }
            // The cluster restarts the pods; berth rolls the Deployment
            // back when they keep failing.
            #[cfg(feature = "kubernetes")]
            crate::spec::Backend::Kubernetes(k) => {
                if busy {
                    tokio::time::sleep(spec.health.interval.max(RESCAN)).await;
                    continue;
                }
                let until = Instant::now() + spec.health.interval * 10;
                g.kubernetes_watch(
                    &spec,
                    k,
                    &active,
                    until,
                    &|m| tracing::warn!(service = %name, "guard: {m}"),
                )
                .await
            }
            #[cfg(not(feature = "kubernetes"))]
            crate::spec::Backend::Kubernetes(_) => return,
        };
        let Err(f) = failed else { continue };
        // A deployment that started meanwhile owns the service (it may
        // have removed these instances itself).
        let now = g.store.bg().state(&name).await.ok();
        if now.as_ref().is_none_or(|s| {
            s.in_progress_since_ms.is_some() || s.active.as_ref().map(|a| &a.digest) != Some(&active.digest)
        }) {
            continue;
        }
        let reason = format!("guard: {}: {}", f.cause, f.evidence);
        tracing::warn!(service = %name, %reason, "guard: rolling back");
        match g.rollback(&name, &reason).await {
            Ok(d) => tracing::info!(service = %name, outcome = ?d.outcome, "guard: rollback finished"),
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "guard: cannot roll back");
                // Nothing to roll back to: do not retry at every check.
                tokio::time::sleep(spec.health.interval * 10).await;
            }
        }
    }
}
