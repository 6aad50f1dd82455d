//! Status, history and the review as text for the terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::store::{time_of, Deployment, Kind, Outcome, ServiceState};

pub fn status(services: &[(String, ServiceState)]) -> String {
    let mut out = String::new();
    if services.is_empty() {
        out.push_str("no service has been deployed with berth watch yet\n");
    }
    for (name, s) in services {
        let active = s
            .active
            .as_ref()
            .map_or("none".to_string(), |r| format!("{} ({})", r.version, r.digest));
        let _ = writeln!(out, "{name}: active {active}");
        match &s.paused {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "  PAUSED since {}: {}; resume with `berth watch resume {name}`",
                    time_of(p.since_ms),
                    p.reason
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  consecutive failed deployments: {} of {} before a pause",
                    s.consecutive_failures, s.failure_limit
                );
            }
        }
        if let Some(prev) = s.active.as_ref().and_then(|a| s.rollback_target(&a.digest)) {
            let _ = writeln!(out, "  rollback target: {} ({})", prev.version, prev.digest);
        }
    }
    out
}

pub fn history(deployments: &[Deployment]) -> String {
    let mut out = String::new();
    for d in deployments {
        let result = d.outcome.map_or("running", Outcome::as_str);
        let took = d
            .duration()
            .map(|t| format!(" in {:.1}s", t.as_secs_f64()))
            .unwrap_or_default();
        let kind = match d.kind {
            Kind::Deploy => "deploy",
            Kind::Rollback => "rollback",
        };
        let _ = writeln!(
            out,
            "#{} {kind} {} {} -> {result}{took}",
            d.id,
            d.image,
            time_of(d.started_ms)
        );
        if let Some(f) = &d.failure {
            let _ = writeln!(out, "  cause: {}: {}", f.cause, f.evidence);
            if let Some(r) = &f.root_cause {
                let _ = writeln!(out, "  root cause: {r}");
            }
            let _ = writeln!(out, "  fix: {}", f.fix);
        }
        for e in &d.events {
            let _ = writeln!(out, "    {} {}", time_of(e.at_ms), e.what);
        }
    }
    out
}

/// The guide's monthly review: time to deploy (mean, p95), failures,
/// rollbacks, and the most frequent causes.
pub fn review(deployments: &[Deployment], since: Duration) -> String {
    let deploys: Vec<&Deployment> = deployments
        .iter()
        .filter(|d| d.kind == Kind::Deploy && d.outcome.is_some())
        .collect();
    let mut out = String::new();
    let days = since.as_secs() as f64 / 86_400.0;
    let _ = writeln!(out, "deployments in the last {days:.0} days: {}", deploys.len());
    let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &deploys {
        *by_outcome
            .entry(d.outcome.map_or("running", Outcome::as_str))
            .or_default() += 1;
    }
    for o in [
        Outcome::Success,
        Outcome::Failure,
        Outcome::Timeout,
        Outcome::RolledBack,
    ] {
        let _ = writeln!(
            out,
            "  {:<12} {}",
            o.as_str(),
            by_outcome.get(o.as_str()).copied().unwrap_or(0)
        );
    }
    let manual = deployments.iter().filter(|d| d.kind == Kind::Rollback).count();
    let _ = writeln!(out, "manual and guard rollbacks: {manual}");
    let mut times: Vec<f64> = deploys
        .iter()
        .filter(|d| d.outcome == Some(Outcome::Success))
        .filter_map(|d| d.duration())
        .map(|t| t.as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    if times.is_empty() {
        out.push_str("time to deploy: no successful deployment\n");
    } else {
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        // Nearest rank.
        let p95 = times[((times.len() as f64 * 0.95).ceil() as usize).clamp(1, times.len()) - 1];
        let _ = writeln!(
            out,
            "time to deploy (successful): mean {mean:.1}s, p95 {p95:.1}s (target: mean under 15 min)"
        );
    }
    let mut causes: BTreeMap<String, usize> = BTreeMap::new();
    for d in deployments {
        if let Some(f) = &d.failure {
            *causes.entry(f.cause.to_string()).or_default() += 1;
        }
    }
    let mut causes: Vec<(String, usize)> = causes.into_iter().collect();
    causes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out.push_str("top failure causes:\n");
    if causes.is_empty() {
        out.push_str("  none\n");
    }
    for (c, n) in causes.iter().take(5) {
        let _ = writeln!(out, "  {c:<22} {n}");
    }
    out
}
