//! `berth bench`: a load generator for OCI registries. It speaks only the
//! Distribution API over HTTP/1.1, so it measures berth, CNCF distribution or
//! any other registry the same way.
//!
//! Flow: parse and check the options (`options`), reach the registry and
//! negotiate credentials (`target`, `auth`), optionally fill it (`seed`),
//! resolve what the scenario needs (`plan`), run the load (`load`), and
//! report (`report`). Each worker owns one connection (`conn`), so
//! `--connections` is exactly the number of sockets, as with wrk.

mod auth;
mod conn;
mod data;
mod load;
mod ops;
mod options;
mod outcome;
mod plan;
mod push;
mod report;
mod rng;
mod seed;
mod stats;
mod target;
mod units;

use std::io::IsTerminal;
use std::sync::Arc;

pub use options::{BenchArgs, Scenario};

/// Runs `berth bench`. Every error is a sentence that says what to fix.
pub fn run(args: BenchArgs) -> Result<(), String> {
    let cfg = options::check(args)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = cfg.threads {
        rt.worker_threads(t);
    }
    let rt = rt
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(run_async(cfg))
}

async fn run_async(cfg: options::Config) -> Result<(), String> {
    let mut target = target::resolve(&cfg.registry, &cfg.tls).await?;
    target.auth = auth::negotiate(&target, &cfg.credentials, &cfg.tls).await?;
    let target = Arc::new(target);
    let progress = std::io::stderr().is_terminal() && !cfg.json;

    if let Some(seed) = &cfg.seed {
        let done = seed::run(&target, seed, cfg.load.connections.min(32)).await?;
        eprintln!(
            "seeded {} repositories ({} already there) in {:.1} s",
            done.pushed + done.skipped,
            done.skipped,
            done.elapsed.as_secs_f64()
        );
    }
    let Some(scenario) = cfg.scenario else {
        return Ok(());
    };
    let plan = Arc::new(plan::prepare(&target, scenario, &cfg.plan).await?);
    let measured = load::run(target.clone(), plan, &cfg.load, progress).await;
    let summary = report::summarize(&cfg, scenario, &measured);
    if cfg.json {
        println!("{}", report::json(&summary));
    } else {
        print!("{}", report::table(&summary));
    }
    Ok(())
}
