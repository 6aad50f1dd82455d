//! Garbage collection from the command line (`berth gc`, on a stopped
//! registry's data directory) and on a schedule inside `berth serve`. Both
//! run the same `Registry::gc`; see `registry::gc` for how it stays safe
//! while the registry serves.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use registry::lease::Exclusive;
use registry::{GcOptions, Registry, RegistryConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How GC runs; shared by `berth gc` and `berth serve`.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct GcTuning {
    /// Keep anything uploaded, linked or referenced within this many
    /// seconds: layers arrive before their manifest. [default: 3600]
    #[arg(long, env = "BERTH_GC_GRACE", value_name = "SECS")]
    pub gc_grace: Option<u64>,

    /// Remove upload sessions started more than this many seconds ago.
    /// [default: 86400]
    #[arg(long, env = "BERTH_GC_UPLOAD_TTL", value_name = "SECS")]
    pub gc_upload_ttl: Option<u64>,

    /// Projects whose untagged manifests GC removes (comma-separated; `*`
    /// for all). Manifests that are an index's children, have referrers, or
    /// are attached to an image as referrers are kept. [default: none]
    #[arg(long, env = "BERTH_GC_UNTAGGED", value_name = "PROJECTS", value_delimiter = ',')]
    pub gc_untagged: Vec<String>,

    /// Removals per metadata transaction. [default: 8 in berth serve, 64
    /// in berth gc]
    #[arg(long, env = "BERTH_GC_BATCH", value_name = "N")]
    pub gc_batch: Option<usize>,

    /// Least pause between batches, in milliseconds, so serving keeps the
    /// store. [default: 20 in berth serve, 0 in berth gc]
    #[arg(long, env = "BERTH_GC_PAUSE_MS", value_name = "MS")]
    pub gc_pause_ms: Option<u64>,

    /// Most share of the time GC spends working, in percent (1-100): after
    /// each batch it rests long enough to stay under it. [default: 10 in
    /// berth serve, 100 in berth gc]
    #[arg(long, env = "BERTH_GC_DUTY", value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub gc_duty: Option<u8>,
}

impl GcTuning {
    /// These flags over `file`'s, over the defaults.
    pub fn resolve(&self, file: &GcTuning) -> Result<GcOptions, String> {
        let d = GcOptions::default();
        let untagged = if self.gc_untagged.is_empty() {
            file.gc_untagged.clone()
        } else {
            self.gc_untagged.clone()
        };
        let untagged: Vec<String> = untagged.iter().map(|p| p.trim().to_string()).collect();
        // A project is the first component of a repository name; anything
        // else would silently match nothing.
        if let Some(bad) = untagged
            .iter()
            .find(|p| p.as_str() != "*" && (p.is_empty() || p.contains('/') || p.parse::<oci::RepoName>().is_err()))
        {
            return Err(format!(
                "--gc-untagged {bad:?} is not a project name: give projects (the first part of a repository name, \
                 e.g. team for team/app), comma-separated, or * for all"
            ));
        }
        if let Some(bad) = file.gc_duty.filter(|p| !(1..=100).contains(p)) {
            return Err(format!("gc_duty = {bad} is not a percentage from 1 to 100"));
        }
        Ok(GcOptions {
            grace: self
                .gc_grace
                .or(file.gc_grace)
                .map(Duration::from_secs)
                .unwrap_or(d.grace),
            upload_ttl: self
                .gc_upload_ttl
                .or(file.gc_upload_ttl)
                .map(Duration::from_secs)
                .unwrap_or(d.upload_ttl),
            untagged_projects: untagged,
            dry_run: false,
            batch: self.gc_batch.or(file.gc_batch).unwrap_or(d.batch),
            pause: self
                .gc_pause_ms
                .or(file.gc_pause_ms)
                .map(Duration::from_millis)
                .unwrap_or(d.pause),
            duty: self
                .gc_duty
                .or(file.gc_duty)
                .map(|p| f64::from(p) / 100.0)
                .unwrap_or(d.duty),
        })
    }
}

#[derive(Args, Debug)]
pub struct RetentionArgs {
    #[command(flatten)]
    pub store: crate::accounts::Store,
    #[command(flatten)]
    pub storage: crate::storage_location::StorageArgs,
    /// A retention rule,
    /// `PROJECT:keep-last=N:pattern=GLOB:pushed-within-days=D:pulled-within-days=D:protect=GLOB`
    /// (repeatable; keep-last, pushed-within-days or pulled-within-days
    /// required).
    #[arg(long = "rule", value_name = "RULE", required = true)]
    pub rules: Vec<String>,
    /// The immutable-tag rules of `berth serve` (same syntax): tags they
    /// match are never deleted. [default: none]
    #[arg(long, env = "BERTH_IMMUTABLE_TAGS", value_name = "RULES", value_delimiter = ',')]
    pub immutable_tags: Vec<String>,
    /// Report which tags would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `berth retention`: apply rules once, list the tags deleted.
pub fn retention(args: RetentionArgs) -> Result<(), BoxError> {
    let rules = args
        .rules
        .iter()
        .map(|r| r.parse())
        .collect::<Result<Vec<registry::RetentionRule>, String>>()?;
    let immutable_tags = args
        .immutable_tags
        .iter()
        .map(|r| r.parse())
        .collect::<Result<Vec<registry::TagRule>, String>>()?;
    let config = RegistryConfig {
        immutable_tags,
        ..RegistryConfig::default()
    };
    let (rt, registry) = open_offline(&args.store, &args.storage, "retention", config)?;
    let tags = rt
        .block_on(registry.exclusively(registry::lease::GC, registry.retention(&rules, args.dry_run)))
        .map_err(|e| format!("retention failed: {e}"))
        .and_then(ran)?;
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    for (repo, tag) in &tags {
        println!("{verb} {repo}:{tag}");
    }
    println!("{verb} {} tags", tags.len());
    Ok(())
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: crate::accounts::Store,
    #[command(flatten)]
    pub storage: crate::storage_location::StorageArgs,
    #[command(flatten)]
    pub tuning: GcTuning,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `berth gc`: one run on the data directory, report on stdout.
pub fn run(args: GcArgs) -> Result<(), BoxError> {
    // The registry is stopped: nobody to leave the machine to.
    let offline = GcTuning {
        gc_batch: Some(64),
        gc_pause_ms: Some(0),
        gc_duty: Some(100),
        ..GcTuning::default()
    };
    let opts = GcOptions {
        dry_run: args.dry_run,
        ..args.tuning.resolve(&offline)?
    };
    let (rt, registry) = open_offline(&args.store, &args.storage, "gc", RegistryConfig::default())?;
    let report = rt
        .block_on(registry.exclusively(registry::lease::GC, registry.gc(&opts)))
        .map_err(|e| format!("garbage collection failed: {e}"))
        .and_then(ran)?;
    println!("{report}");
    Ok(())
}

/// What an offline run under the GC lease did: with metadata shared by
/// serving nodes, one of them may be collecting (it holds the lease).
fn ran<T>(outcome: Exclusive<T>) -> Result<T, String> {
    match outcome {
        Exclusive::Ran(v) => Ok(v),
        Exclusive::Busy { holder } => Err(format!(
            "node {holder} is collecting garbage or applying retention now (it holds the GC lease); try again later"
        )),
    }
}

/// Opens the registry of a data directory for an offline command (`berth
/// gc`, `retention`, `fsck`, `du`), with the runtime to run it on (its
/// tasks carry PostgreSQL's connections). Refuses while berth runs on it.
pub fn open_offline(
    store: &crate::accounts::Store,
    storage: &crate::storage_location::StorageArgs,
    command: &str,
    config: RegistryConfig,
) -> Result<(tokio::runtime::Runtime, Registry), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let dir = store.data_dir.clone().unwrap_or_else(crate::config::default_data_dir);
    let location = store.location()?;
    let blobs = crate::backends::BlobLocation {
        location: storage.location()?,
        credentials: storage.storage_credentials.clone(),
    };
    if !crate::backends::exists(&dir, &location, &blobs) {
        return Err(format!(
            "{} holds no registry (no meta.redb); pass the data directory of berth serve with --data-dir",
            dir.display()
        )
        .into());
    }
    let hint = if command == "gc" {
        ". A running berth collects garbage itself: see --gc-interval of berth serve".to_string()
    } else {
        format!(". Stop berth to run berth {command}")
    };
    let b = rt.block_on(crate::backends::open(&dir, &location, &blobs, None, &hint))?;
    Ok((rt, Registry::new(b.blobs, b.meta, config)))
}

/// Runs GC every `interval` until the process ends. A failed run is logged
/// and the next one tries again. With metadata shared by several nodes,
/// retention and GC run on one node at a time: the one holding the GC lease
/// (`registry::lease`); the others skip the interval and say so.
pub async fn schedule(
    app: Arc<api::App>,
    interval: Duration,
    opts: GcOptions,
    retention: Vec<registry::RetentionRule>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; let the server settle for one interval.
    tick.tick().await;
    loop {
        tick.tick().await;
        // Pull times reach the store once per interval, off the request
        // path, on every node: each knows only its own pulls.
        if let Err(e) = app.registry.flush_pulls().await {
            tracing::warn!(error = %e, "could not record tag pull times; they are kept for the next interval");
        }
        let started = std::time::Instant::now();
        match app
            .registry
            .exclusively(registry::lease::GC, maintain(&app.registry, &opts, &retention))
            .await
        {
            Ok(Exclusive::Ran(report)) => tracing::info!(
                bytes_freed = report.bytes_freed(),
                objects_freed = report.objects_freed(),
                untagged_manifests = report.manifests,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "scheduled garbage collection: {report}"
            ),
            Ok(Exclusive::Busy { holder }) => tracing::info!(
                holder = %holder,
                "scheduled garbage collection skipped: another node holds the GC lease and is collecting"
            ),
            Err(e) => {
                tracing::error!(error = %e, "scheduled garbage collection failed; it runs again at the next interval")
            }
        }
    }
}

/// One scheduled round: retention first, so the manifests it untags can go
/// in the same GC run.
async fn maintain(
    registry: &Registry,
    opts: &GcOptions,
    retention: &[registry::RetentionRule],
) -> registry::Result<registry::GcReport> {
    if !retention.is_empty() {
        match registry.retention(retention, false).await {
            Ok(tags) => tracing::info!(tags_deleted = tags.len(), "scheduled retention"),
            Err(e) => tracing::error!(error = %e, "scheduled retention failed; it runs again at the next interval"),
        }
    }
    registry.gc(opts).await
}
