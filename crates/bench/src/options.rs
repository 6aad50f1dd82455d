//! The command line of `berth bench`, and its check into a `Config` that
//! holds only sensible values, so nothing later has to re-validate.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::units::{parse_duration, parse_size};

#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:
  berth bench --seed 1000                              fill a registry with 1000 small images
  berth bench manifest-get -c 400 -d 15s               closed loop, 400 connections
  berth bench catalog-page --rate 5000 -d 30s          constant rate; latency counted from the intended send time
  berth bench blob-get --image bench/big00000:latest -c 4
  berth bench push --layer-size 64MiB --chunk-size 8MiB -n 20
  berth bench mixed --mix manifest-get=70,blob-get=20,tags=10 --json")]
pub struct BenchArgs {
    /// What to measure. Omit it to only run --seed.
    #[arg(value_enum)]
    pub scenario: Option<Scenario>,

    /// Registry URL: http://HOST:PORT or https://HOST:PORT.
    #[arg(
        long,
        short = 'r',
        env = "BERTH_BENCH_REGISTRY",
        default_value = "http://127.0.0.1:5000"
    )]
    pub registry: String,

    /// Concurrent connections; each runs one operation at a time.
    #[arg(long, short = 'c', default_value_t = 10)]
    pub connections: usize,

    /// How long to measure, e.g. 10s, 500ms, 2m.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Stop after this many operations (or at --duration, whichever is first).
    #[arg(long, short = 'n', value_name = "COUNT")]
    pub requests: Option<u64>,

    /// Constant rate, in operations per second over all connections. Latency
    /// is then counted from when each operation should have been sent, so a
    /// stalled server shows in the percentiles (no coordinated omission).
    /// Without it, each connection sends as fast as answers come (closed loop).
    #[arg(long, value_name = "OPS_PER_SEC")]
    pub rate: Option<f64>,

    /// Run this long before measuring, e.g. 2s.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Give up on one operation after this long; it counts as an error.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Worker threads of the load generator [default: one per CPU].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Image the read scenarios use: REPO:TAG or REPO@DIGEST.
    #[arg(long, default_value = "bench/r00000:latest")]
    pub image: String,

    /// manifest-get and manifest-head: ask by digest instead of by tag.
    #[arg(long)]
    pub by_digest: bool,

    /// Page size (`?n=`) for catalog-page, catalog-walk and tags.
    #[arg(long, value_name = "N")]
    pub page_size: Option<usize>,

    /// catalog-page: ask for the page after this repository (`&last=`), as a
    /// client walking the catalog does, instead of the first page.
    #[arg(long, value_name = "REPO")]
    pub last: Option<String>,

    /// blob-get: fetch this many bytes at a random offset (HTTP Range)
    /// instead of the whole blob.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub range: Option<u64>,

    /// blob-get: the blob to fetch [default: the image's largest layer].
    #[arg(long, value_name = "DIGEST")]
    pub blob: Option<String>,

    /// push: size of each pushed layer, e.g. 1MiB, 1GiB.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub layer_size: u64,

    /// push: upload in PATCH chunks of this size (chunked upload) instead of
    /// one PUT (monolithic).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub chunk_size: Option<u64>,

    /// push: repository the layers go to.
    #[arg(long, default_value = "bench/push")]
    pub push_repo: String,

    /// mixed: weights of the scenarios, e.g. manifest-get=70,blob-get=20,tags=10.
    #[arg(
        long,
        default_value = "manifest-head=40,manifest-get=30,blob-get=15,tags=10,catalog-page=5"
    )]
    pub mix: String,

    /// Before the run, fill the registry with this many repositories, each
    /// holding one image tagged `latest` (PREFIX00000, PREFIX00001, ...).
    /// Images already there are kept.
    #[arg(long, value_name = "REPOS")]
    pub seed: Option<usize>,

    /// Name prefix of the seeded repositories.
    #[arg(long, default_value = "bench/r")]
    pub seed_prefix: String,

    /// Size of the one layer of each seeded image.
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    pub seed_layer_size: u64,

    /// Basic-auth credentials, USER:PASSWORD. Used directly when the
    /// registry asks for Basic, or to get a token when it asks for Bearer.
    #[arg(long, env = "BERTH_BENCH_USER", value_name = "USER:PASSWORD")]
    pub user: Option<String>,

    /// A ready Bearer token, sent as is.
    #[arg(long, env = "BERTH_BENCH_TOKEN", conflicts_with = "user")]
    pub token: Option<String>,

    /// Extra CA certificate(s), PEM, to trust for https registries.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// Do not verify the registry's TLS certificate.
    #[arg(long)]
    pub insecure: bool,

    /// Seed of the random choices (ranges, mix), so runs repeat.
    #[arg(long, default_value_t = 1)]
    pub random_seed: u64,

    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// GET /v2/_catalog (the whole catalog, or the registry's default page).
    Catalog,
    /// GET /v2/_catalog?n=N: the first page (--page-size, default 100).
    CatalogPage,
    /// Walk the whole catalog page by page, following Link headers.
    CatalogWalk,
    /// GET /v2/REPO/tags/list.
    Tags,
    /// GET a manifest, by tag (or --by-digest).
    ManifestGet,
    /// HEAD a manifest, by tag (or --by-digest).
    ManifestHead,
    /// GET a blob, whole or a --range of it.
    BlobGet,
    /// Push a layer: POST then PUT (monolithic) or PATCH chunks (--chunk-size).
    Push,
    /// What a node does: resolve the tag, fetch the manifest, the config and
    /// every layer, and verify every digest.
    PullImage,
    /// A weighted mix (--mix) of the other scenarios.
    Mixed,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Catalog => "catalog",
            Scenario::CatalogPage => "catalog-page",
            Scenario::CatalogWalk => "catalog-walk",
            Scenario::Tags => "tags",
            Scenario::ManifestGet => "manifest-get",
            Scenario::ManifestHead => "manifest-head",
            Scenario::BlobGet => "blob-get",
            Scenario::Push => "push",
            Scenario::PullImage => "pull-image",
            Scenario::Mixed => "mixed",
        }
    }
}

/// How the load runs.
#[derive(Debug, Clone)]
pub struct Load {
    pub connections: usize,
    pub duration: Duration,
    pub requests: Option<u64>,
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub timeout: Duration,
}

/// What the scenario works on, before it is resolved against the registry.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub image: String,
    pub by_digest: bool,
    pub page_size: Option<usize>,
    pub last: Option<oci::RepoName>,
    pub range: Option<u64>,
    pub blob: Option<String>,
    pub layer_size: u64,
    pub chunk_size: Option<u64>,
    pub push_repo: oci::RepoName,
    pub mix: Vec<(Scenario, u32)>,
    pub random_seed: u64,
}

#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub repos: usize,
    pub prefix: String,
    pub layer_size: u64,
}

#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub ca_cert: Option<PathBuf>,
    pub insecure: bool,
}

#[derive(Debug, Clone, Default)]
pub enum Credentials {
    #[default]
    None,
    Basic {
        user: String,
        password: String,
    },
    Token(String),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub registry: String,
    pub scenario: Option<Scenario>,
    pub load: Load,
    pub plan: PlanOptions,
    pub seed: Option<SeedOptions>,
    pub tls: TlsOptions,
    pub credentials: Credentials,
    pub threads: Option<usize>,
    pub json: bool,
}

/// Layers above this are refused: the pushed layer is held in memory.
const MAX_LAYER: u64 = 8 << 30;

pub fn check(a: BenchArgs) -> Result<Config, String> {
    if a.scenario.is_none() && a.seed.is_none() {
        return Err("nothing to do: name a scenario (e.g. `berth bench manifest-get`) or pass --seed N".into());
    }
    if a.connections == 0 || a.connections > 100_000 {
        return Err("--connections must be between 1 and 100000".into());
    }
    if a.duration.is_zero() {
        return Err("--duration must be more than zero, e.g. --duration 10s".into());
    }
    if a.requests == Some(0) {
        return Err("--requests must be at least 1".into());
    }
    if let Some(r) = a.rate {
        if !(r.is_finite() && r > 0.0) {
            return Err("--rate must be a positive number of operations per second".into());
        }
    }
    if a.timeout.is_zero() {
        return Err("--timeout must be more than zero".into());
    }
    if a.threads == Some(0) {
        return Err("--threads must be at least 1".into());
    }
    if a.page_size == Some(0) {
        return Err("--page-size must be at least 1".into());
    }
    if a.range == Some(0) {
        return Err("--range must be at least 1 byte".into());
    }
    if a.chunk_size == Some(0) {
        return Err("--chunk-size must be at least 1 byte".into());
    }
    if a.layer_size > MAX_LAYER || a.seed_layer_size > MAX_LAYER {
        return Err("layer sizes above 8 GiB are not supported: the layer is generated in memory".into());
    }
    if a.seed == Some(0) {
        return Err("--seed must be at least 1 repository".into());
    }
    if a.scenario.is_some() {
        crate::plan::parse_image(&a.image)?;
    }
    let last = a
        .last
        .as_deref()
        .map(str::parse::<oci::RepoName>)
        .transpose()
        .map_err(|e| format!("bad --last: {e}"))?;
    let push_repo = a
        .push_repo
        .parse()
        .map_err(|e| format!("bad --push-repo {:?}: {e}", a.push_repo))?;
    let mix = parse_mix(&a.mix)?;
    let seed = match a.seed {
        Some(repos) => {
            // Check the prefix by the names it will produce.
            let probe = format!("{}{:05}", a.seed_prefix, 0);
            probe
                .parse::<oci::RepoName>()
                .map_err(|e| format!("bad --seed-prefix {:?}: {e}", a.seed_prefix))?;
            Some(SeedOptions {
                repos,
                prefix: a.seed_prefix,
                layer_size: a.seed_layer_size,
            })
        }
        None => None,
    };
    let credentials = match (a.user, a.token) {
        (Some(u), _) => match u.split_once(':') {
            Some((user, password)) if !user.is_empty() => Credentials::Basic {
                user: user.into(),
                password: password.into(),
            },
            _ => return Err("--user must be USER:PASSWORD".into()),
        },
        (None, Some(t)) if !t.is_empty() => Credentials::Token(t),
        _ => Credentials::None,
    };
    Ok(Config {
        registry: a.registry,
        scenario: a.scenario,
        load: Load {
            connections: a.connections,
            duration: a.duration,
            requests: a.requests,
            rate: a.rate,
            warmup: a.warmup,
            timeout: a.timeout,
        },
        plan: PlanOptions {
            image: a.image,
            by_digest: a.by_digest,
            page_size: a.page_size,
            last,
            range: a.range,
            blob: a.blob,
            layer_size: a.layer_size,
            chunk_size: a.chunk_size,
            push_repo,
            mix,
            random_seed: a.random_seed,
        },
        seed,
        tls: TlsOptions {
            ca_cert: a.ca_cert,
            insecure: a.insecure,
        },
        credentials,
        threads: a.threads,
        json: a.json,
    })
}

/// `name=weight,...` into scenarios with positive weights.
pub fn parse_mix(s: &str) -> Result<Vec<(Scenario, u32)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("bad --mix entry {part:?}: write SCENARIO=WEIGHT, e.g. manifest-get=70"))?;
        let scenario = Scenario::from_str(name.trim(), true)
            .map_err(|_| format!("bad --mix entry {part:?}: unknown scenario {name:?}"))?;
        if scenario == Scenario::Mixed {
            return Err("--mix cannot contain `mixed` itself".into());
        }
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| format!("bad --mix entry {part:?}: the weight must be a whole number"))?;
        if weight > 0 {
            out.push((scenario, weight));
        }
    }
    if out.is_empty() {
        return Err("--mix needs at least one scenario with a positive weight".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn check_args(line: &[&str]) -> Result<Config, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("bench").chain(line.iter().copied())).map_err(|e| e.to_string())?;
        check(cli.args)
    }

    #[test]
    fn defaults_are_sane() {
        let c = check_args(&["manifest-get"]).unwrap();
        assert_eq!(c.scenario, Some(Scenario::ManifestGet));
        assert_eq!(c.load.connections, 10);
        assert_eq!(c.load.duration, Duration::from_secs(10));
        assert!(c.seed.is_none());
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        for (line, needle) in [
            (&["manifest-get", "-d", "0s"][..], "--duration"),
            (&["manifest-get", "-c", "0"], "--connections"),
            (&["manifest-get", "--rate", "0"], "--rate"),
            (&["manifest-get", "-n", "0"], "--requests"),
            (&["push", "--chunk-size", "0"], "--chunk-size"),
            (&["push", "--push-repo", "Bad Name"], "--push-repo"),
            (&["mixed", "--mix", "manifest-get"], "--mix"),
            (&["catalog", "--user", "nopassword"], "--user"),
            (&[], "nothing to do"),
        ] {
            let err = check_args(line).unwrap_err();
            assert!(err.contains(needle), "{line:?}: {err}");
        }
    }

    #[test]
    fn mix_parses_weights_and_drops_zeros() {
        let m = parse_mix("manifest-get=70, blob-get=0,tags=30").unwrap();
        assert_eq!(m, vec![(Scenario::ManifestGet, 70), (Scenario::Tags, 30)]);
        assert!(parse_mix("nope=1").is_err());
        assert!(parse_mix("mixed=1").is_err());
        assert!(parse_mix("tags=0").is_err());
        assert!(parse_mix("tags=x").is_err());
    }

    #[test]
    fn credentials() {
        let c = check_args(&["catalog", "--user", "alice:s3:cret"]).unwrap();
        match c.credentials {
            Credentials::Basic { user, password } => {
                assert_eq!((user.as_str(), password.as_str()), ("alice", "s3:cret"))
            }
            other => panic!("{other:?}"),
        }
    }
}
