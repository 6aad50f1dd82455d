//! `berth serve` configuration: a TOML file, environment variables and
//! flags. A flag beats its environment variable (clap does that), and both
//! beat the file, which beats the built-in default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use clap::Args;
use events::{Endpoint, EndpointConfig};
use observe::HealthConfig;
use serde::Deserialize;

use crate::logging::LogFormat;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file. Its keys are the long option names with '_'
    /// for '-', e.g. `listen = "127.0.0.1:5000"`, `data_dir = "/var/lib/berth"`.
    /// Webhooks are `[[webhooks]]` tables, only in the file: `name`, `url`,
    /// and optionally `types` (push, pull, delete, mount, tag), `repositories`
    /// (patterns with `*` and `?`), `headers`, `timeout` ("5s"),
    /// `max_attempts` (12), `backoff_initial` ("1s"), `backoff_max` ("5m").
    /// Pull-through cache upstreams are `[[upstreams]]` tables, only in the
    /// file: `name`, `url`, and optionally `project`, `namespace`, `mirror`,
    /// `username`, `password`/`password_file`, `ca_file`, `ttl` ("72h"),
    /// `max_size` ("500G"), `revalidate` ("60s"), `stale_for` ("24h"),
    /// `rate` (10), `concurrency` (10), `queue` (100); see the README.
    /// Signature policies are `[[signature_policies]]` tables, only in the
    /// file: `repositories` (a pattern), `keys` (PEM files), and optionally
    /// `threshold` (1), `allow_digests`, `mode` ("enforce" or "warn"),
    /// `by_digest` (false), `exempt_pushers` (true); see the README.
    #[arg(long, env = "BERTH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on. [default: 127.0.0.1:5000]
    #[arg(long, env = "BERTH_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Directory for blobs, uploads and the metadata database.
    /// [default: $XDG_DATA_HOME/berth, else ~/.local/share/berth]
    #[arg(long, env = "BERTH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Where the metadata (repositories, tags, manifests, accounts) lives:
    /// `redb`, the embedded database in the data directory, or a PostgreSQL
    /// URL, `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, which several
    /// berth nodes can share (needs a build with `--features berth/postgres`).
    /// The schema is migrated at start (see `berth migrate`). [default: redb]
    #[arg(long, env = "BERTH_METADATA", value_name = "URL")]
    pub metadata: Option<String>,

    /// Where the blobs (layers, configs, manifests' bytes) and uploads in
    /// progress live: `fs`, the data directory, or an S3 bucket,
    /// `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`, which several
    /// berth nodes can share (with --metadata postgres://...). `endpoint`
    /// is an S3-compatible server's `http(s)://HOST:PORT` (path-style
    /// requests); without it, AWS. The credentials come from
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or
    /// --storage-credentials. [default: fs]
    #[arg(long, env = "BERTH_STORAGE", value_name = "URL")]
    pub storage: Option<String>,

    /// An AWS credentials file (`[default]` with `aws_access_key_id` and
    /// `aws_secret_access_key`, or the profile AWS_PROFILE names) for the
    /// --storage bucket, instead of the environment's keys. Keep it 0600.
    #[arg(long, env = "BERTH_STORAGE_CREDENTIALS", value_name = "FILE")]
    pub storage_credentials: Option<PathBuf>,

    /// Accept image indexes whose child manifests are not in the repository.
    #[arg(long, env = "BERTH_SPARSE_INDEX", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub sparse_index: Option<bool>,

    /// Largest manifest accepted, in bytes. [default: 4194304]
    #[arg(long, env = "BERTH_MAX_MANIFEST_SIZE", value_name = "BYTES")]
    pub max_manifest_size: Option<usize>,

    /// Memory for hot manifests, in bytes; 0 turns the cache off.
    /// [default: 67108864]
    #[arg(long, env = "BERTH_MANIFEST_CACHE_SIZE", value_name = "BYTES")]
    pub manifest_cache_size: Option<usize>,

    /// Seconds to let in-flight requests finish after SIGTERM or Ctrl-C.
    /// [default: 30]
    #[arg(long, env = "BERTH_SHUTDOWN_TIMEOUT", value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,

    /// Allow listening on a non-loopback address without authentication.
    /// Anyone who can reach the address can then push, pull and delete.
    #[arg(long, env = "BERTH_INSECURE_ALLOW_ANONYMOUS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_allow_anonymous: Option<bool>,

    /// Log filter, e.g. `info` or `berth=debug,info`. [default: info]
    #[arg(long, env = "BERTH_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Turn on access control: users, projects, roles, robot accounts and
    /// token auth. Without it, anyone who can connect may push and delete.
    #[arg(long, env = "BERTH_AUTH", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub auth: Option<bool>,

    /// The URL clients use to reach this registry, e.g.
    /// `https://registry.example.com`. The token realm is built from it,
    /// never from the request's Host header. [default: http://<listen>]
    #[arg(long, env = "BERTH_EXTERNAL_URL", value_name = "URL")]
    pub external_url: Option<String>,

    /// The `service` name in challenges and the audience of tokens.
    /// [default: berth]
    #[arg(long, env = "BERTH_TOKEN_SERVICE", value_name = "NAME")]
    pub token_service: Option<String>,

    /// Lifetime of access tokens, in seconds. [default: 300]
    #[arg(long, env = "BERTH_TOKEN_TTL", value_name = "SECS")]
    pub token_ttl: Option<u64>,

    /// Seconds a client may take to send its request head, stay silent in
    /// the middle of a request body, or read nothing of a response, before
    /// the request fails or the connection is closed. [default: 30]
    #[arg(long, env = "BERTH_CLIENT_TIMEOUT", value_name = "SECS")]
    pub client_timeout: Option<u64>,

    /// Client connections served at once; beyond it a new connection gets
    /// 503 (TLS: is closed), logged and counted in
    /// berth_connections_refused. [default: 8192, or fewer when the open
    /// file limit is lower: half of what it leaves after 256]
    #[arg(long, env = "BERTH_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// TLS certificate chain (PEM). With --tls-key, berth serves HTTPS
    /// (HTTP/2 and HTTP/1.1); SIGHUP reloads both files.
    #[arg(long, env = "BERTH_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, env = "BERTH_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// The Ed25519 token signing key (created if missing).
    /// [default: <data-dir>/token.key]
    #[arg(long, env = "BERTH_TOKEN_KEY", value_name = "FILE")]
    pub token_key: Option<PathBuf>,
    /// Log format: `json` (one JSON object per line, Elastic Common Schema
    /// field names), `human`, or `auto` (human on a terminal, else JSON).
    /// [default: auto]
    #[arg(long, env = "BERTH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Write one access-log line per request, at info level. [default: true]
    #[arg(long, env = "BERTH_ACCESS_LOG", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub access_log: Option<bool>,

    /// Serve /healthz, /livez, /readyz and /metrics on this address instead
    /// of the registry's. [default: on the registry listener]
    #[arg(long, env = "BERTH_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Time between background health checks, e.g. `10s` or `500ms`.
    /// [default: 10s]
    #[arg(long, env = "BERTH_HEALTH_INTERVAL", value_name = "DURATION")]
    pub health_interval: Option<String>,

    /// Consecutive failed checks after which a dependency, and berth, is
    /// unhealthy; one success makes it healthy again. [default: 3]
    #[arg(long, env = "BERTH_HEALTH_FAILURES", value_name = "N")]
    pub health_failures: Option<u32>,

    /// Free bytes on the data directory's filesystem below which the disk
    /// check fails and /readyz reports "out of disk". [default: 1073741824]
    #[arg(long, env = "BERTH_MIN_FREE_DISK", value_name = "BYTES")]
    pub min_free_disk: Option<u64>,

    /// After SIGTERM, how long /readyz reports "draining" while berth still
    /// serves, so load balancers stop sending traffic first, e.g. `5s`.
    /// [default: 0s]
    #[arg(long, env = "BERTH_DRAIN_DELAY", value_name = "DURATION")]
    pub drain_delay: Option<String>,

    /// The CloudEvents `source` of the events this node sends to webhooks.
    /// Webhooks themselves are `[[webhooks]]` tables in the config file.
    /// [default: /berth/<hostname>]
    #[arg(long, env = "BERTH_EVENT_SOURCE", value_name = "URI")]
    pub event_source: Option<String>,

    /// Run garbage collection every this many seconds; 0 turns it off.
    /// [default: 3600]
    #[arg(long, env = "BERTH_GC_INTERVAL", value_name = "SECS")]
    pub gc_interval: Option<u64>,

    #[command(flatten)]
    pub gc: crate::gc::GcTuning,

    /// Tags that, once pushed, cannot be moved or deleted (DENIED):
    /// comma-separated patterns with `*` and `?`, each for every project
    /// (`v*`) or one (`team=release-*`). [default: none]
    #[arg(long, env = "BERTH_IMMUTABLE_TAGS", value_name = "RULES", value_delimiter = ',')]
    pub immutable_tags: Vec<String>,

    /// Refuse new uploads (DENIED) while the data directory's volume is at
    /// least this full, in percent; pulls still work. 100 turns it off.
    /// [default: 95]
    #[arg(long, env = "BERTH_DISK_WATERMARK", value_name = "PERCENT")]
    pub disk_watermark: Option<f64>,

    /// Storage quotas per project, comma-separated `PROJECT=SIZE` with SIZE
    /// in bytes or with a K, M, G or T suffix (powers of 1024), e.g.
    /// `team=50G`. A layer shared by repositories of a project counts once.
    /// [default: none]
    #[arg(long, env = "BERTH_QUOTA", value_name = "QUOTAS", value_delimiter = ',')]
    pub quota: Vec<String>,

    /// Retention rules applied before each GC run, separated by `;`:
    /// `PROJECT:keep-last=N:pattern=GLOB:pushed-within-days=D:protect=GLOB`.
    /// [default: none]
    #[arg(long, env = "BERTH_RETENTION", value_name = "RULES", value_delimiter = ';')]
    pub retention: Vec<String>,
}

/// The file's keys: the same settings, all optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    metadata: Option<String>,
    storage: Option<String>,
    storage_credentials: Option<PathBuf>,
    sparse_index: Option<bool>,
    max_manifest_size: Option<usize>,
    manifest_cache_size: Option<usize>,
    shutdown_timeout: Option<u64>,
    insecure_allow_anonymous: Option<bool>,
    log: Option<String>,
    auth: Option<bool>,
    external_url: Option<String>,
    token_service: Option<String>,
    token_ttl: Option<u64>,
    token_key: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_timeout: Option<u64>,
    max_connections: Option<usize>,
    log_format: Option<LogFormat>,
    access_log: Option<bool>,
    metrics_listen: Option<SocketAddr>,
    health_interval: Option<String>,
    health_failures: Option<u32>,
    min_free_disk: Option<u64>,
    drain_delay: Option<String>,
    event_source: Option<String>,
    /// Webhook endpoints: only in the file (a list of tables has no
    /// sensible flag form).
    #[serde(default)]
    webhooks: Vec<EndpointConfig>,
    /// Pull-through cache upstreams: only in the file, like webhooks.
    #[serde(default)]
    upstreams: Vec<proxy::UpstreamConfig>,
    /// Signature policies: only in the file.
    #[serde(default)]
    signature_policies: Vec<crate::signature_config::SignaturePolicyConfig>,
    gc_interval: Option<u64>,
    gc_grace: Option<u64>,
    gc_upload_ttl: Option<u64>,
    #[serde(default)]
    gc_untagged: Vec<String>,
    gc_batch: Option<usize>,
    gc_pause_ms: Option<u64>,
    gc_duty: Option<u8>,
    #[serde(default)]
    immutable_tags: Vec<String>,
    disk_watermark: Option<f64>,
    #[serde(default)]
    quota: Vec<String>,
    #[serde(default)]
    retention: Vec<String>,
}

/// The settings in force.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub metadata: crate::backends::MetadataLocation,
    pub blobs: crate::backends::BlobLocation,
    pub sparse_index: bool,
    pub max_manifest_size: usize,
    pub manifest_cache_size: usize,
    pub shutdown_timeout: u64,
    pub insecure_allow_anonymous: bool,
    pub log: String,
    pub auth: bool,
    /// Without a trailing slash; `None` means `http://<bound address>`.
    pub external_url: Option<String>,
    pub token_service: String,
    pub token_ttl: u64,
    pub token_key: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_timeout: u64,
    /// `None`: derived from the open file limit at start.
    pub max_connections: Option<usize>,
    pub log_format: LogFormat,
    pub access_log: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub health: HealthConfig,
    pub drain_delay: Duration,
    pub event_source: String,
    pub webhooks: Vec<Endpoint>,
    pub upstreams: Vec<proxy::Upstream>,
    pub signature_policies: Vec<api::signed::Rule>,
    /// Seconds between GC runs; 0 = off.
    pub gc_interval: u64,
    pub gc: registry::GcOptions,
    pub immutable_tags: Vec<registry::TagRule>,
    pub disk_watermark: f64,
    pub quotas: std::collections::BTreeMap<String, u64>,
    pub retention: Vec<registry::RetentionRule>,
}

fn duration(name: &str, v: Option<String>, default: Duration) -> Result<Duration, String> {
    v.map(|s| observe::time::parse_duration(&s).map_err(|e| format!("--{name}: {e}")))
        .transpose()
        .map(|d| d.unwrap_or(default))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("berth");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/berth"),
        None => PathBuf::from("berth-data"),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {} is invalid: {e}", path.display()))
}

/// `PROJECT=SIZE`, SIZE in bytes or with a K/M/G/T suffix (powers of 1024).
fn parse_quota(s: &str) -> Result<(String, u64), String> {
    let bad = || format!("quota {s:?} is not PROJECT=SIZE; write e.g. team=50G or team=1000000");
    let (project, size) = s.split_once('=').ok_or_else(bad)?;
    let project = project.trim();
    if project.is_empty() {
        return Err(bad());
    }
    let bytes = observe::size::parse_size(size).map_err(|_| bad())?;
    Ok((project.to_string(), bytes))
}

impl ServeArgs {
    /// Merges flags and environment (already in `self`) over the file.
    pub fn resolve(self) -> Result<ServeConfig, String> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let listen: SocketAddr = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:5000".parse().expect("valid"));
        let data_dir = self.data_dir.or(file.data_dir).unwrap_or_else(default_data_dir);
        let external_url = self
            .external_url
            .or(file.external_url)
            .map(|u| u.trim_end_matches('/').to_string());
        if let Some(u) = &external_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!("external URL {u:?} must start with http:// or https://"));
            }
        }
        let immutable_tags = if self.immutable_tags.is_empty() {
            file.immutable_tags
        } else {
            self.immutable_tags
        };
        let immutable_tags = immutable_tags
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<registry::TagRule>, String>>()?;
        let disk_watermark = self.disk_watermark.or(file.disk_watermark).unwrap_or(95.0);
        if !(0.0..=100.0).contains(&disk_watermark) {
            return Err(format!(
                "disk watermark {disk_watermark} is not a percentage; give a number from 0 to 100 (100 turns the guard off)"
            ));
        }
        let quota = if self.quota.is_empty() { file.quota } else { self.quota };
        let quotas = quota.iter().map(|q| parse_quota(q)).collect::<Result<_, String>>()?;
        let retention = if self.retention.is_empty() {
            file.retention
        } else {
            self.retention
        };
        let retention = retention
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<registry::RetentionRule>, String>>()?;
        let metadata = self
            .metadata
            .or(file.metadata)
            .map(|m| m.parse())
            .transpose()?
            .unwrap_or_default();
        let blobs = crate::backends::BlobLocation {
            location: self
                .storage
                .or(file.storage)
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or_default(),
            credentials: self.storage_credentials.or(file.storage_credentials),
        };
        Ok(ServeConfig {
            metadata,
            blobs,
            retention,
            quotas,
            disk_watermark,
            immutable_tags,
            listen,
            token_key: self
                .token_key
                .or(file.token_key)
                .unwrap_or_else(|| data_dir.join("token.key")),
            data_dir,
            client_timeout: self.client_timeout.or(file.client_timeout).unwrap_or(30),
            max_connections: self.max_connections.or(file.max_connections),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            auth: self.auth.or(file.auth).unwrap_or(false),
            external_url,
            token_service: self
                .token_service
                .or(file.token_service)
                .unwrap_or_else(|| "berth".into()),
            token_ttl: self.token_ttl.or(file.token_ttl).unwrap_or(300),
            sparse_index: self.sparse_index.or(file.sparse_index).unwrap_or(false),
            max_manifest_size: self
                .max_manifest_size
                .or(file.max_manifest_size)
                .unwrap_or(oci::manifest::MAX_MANIFEST_SIZE),
            manifest_cache_size: self
                .manifest_cache_size
                .or(file.manifest_cache_size)
                .unwrap_or(registry::RegistryConfig::default().manifest_cache_bytes),
            shutdown_timeout: self.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(30),
            insecure_allow_anonymous: self
                .insecure_allow_anonymous
                .or(file.insecure_allow_anonymous)
                .unwrap_or(false),
            log: self.log.or(file.log).unwrap_or_else(|| "info".into()),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            access_log: self.access_log.or(file.access_log).unwrap_or(true),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            health: HealthConfig {
                interval: duration(
                    "health-interval",
                    self.health_interval.or(file.health_interval),
                    Duration::from_secs(10),
                )?,
                failure_threshold: match self.health_failures.or(file.health_failures).unwrap_or(3) {
                    0 => return Err("--health-failures must be at least 1".into()),
                    n => n,
                },
                min_free_disk: self.min_free_disk.or(file.min_free_disk).unwrap_or(1 << 30),
                disk_watermark,
            },
            drain_delay: duration("drain-delay", self.drain_delay.or(file.drain_delay), Duration::ZERO)?,
            event_source: self
                .event_source
                .or(file.event_source)
                .unwrap_or_else(|| format!("/berth/{}", hostname())),
            webhooks: events::validate_all(&file.webhooks)?,
            upstreams: proxy::validate_all(&file.upstreams)?,
            signature_policies: crate::signature_config::validate_all(&file.signature_policies)?,
            gc_interval: self.gc_interval.or(file.gc_interval).unwrap_or(3600),
            gc: self.gc.resolve(&crate::gc::GcTuning {
                gc_grace: file.gc_grace,
                gc_upload_ttl: file.gc_upload_ttl,
                gc_untagged: file.gc_untagged,
                gc_batch: file.gc_batch,
                gc_pause_ms: file.gc_pause_ms,
                gc_duty: file.gc_duty,
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\ndata_dir = \"/srv/berth\"\nsparse_index = true\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/srv/berth"));
        assert!(c.sparse_index);
        assert_eq!(c.max_manifest_size, 4 * 1024 * 1024);
    }

    #[test]
    fn observability_settings_and_webhooks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(
            &path,
            r#"
health_interval = "250ms"
health_failures = 5
log_format = "json"
metrics_listen = "127.0.0.1:9100"

[[webhooks]]
name = "ci"
url = "http://127.0.0.1:8080/events"
types = ["push", "delete"]
repositories = ["team/*"]
backoff_initial = "100ms"
"#,
        )
        .unwrap();
        let c = ServeArgs {
            config: Some(path.clone()),
            health_failures: Some(2),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.health.interval, Duration::from_millis(250));
        assert_eq!(c.health.failure_threshold, 2, "the flag beats the file");
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.access_log);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.webhooks.len(), 1);
        assert_eq!(c.webhooks[0].backoff_initial, Duration::from_millis(100));
        assert!(c.event_source.starts_with("/berth/"));
        std::fs::write(&path, "[[webhooks]]\nname = \"x\"\nurl = \"gopher://h/\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("http://"), "{err}");
    }

    #[test]
    fn quotas_parse_with_units() {
        assert_eq!(parse_quota("team=50G").unwrap(), ("team".into(), 50 << 30));
        assert_eq!(parse_quota("a=1000").unwrap(), ("a".into(), 1000));
        assert_eq!(parse_quota("a=2k").unwrap(), ("a".into(), 2048));
        for bad in ["team", "=5", "a=5X", "a=", "a=99999999999T"] {
            assert!(parse_quota(bad).unwrap_err().contains("PROJECT=SIZE"), "{bad}");
        }
    }

    #[test]
    fn lifecycle_rules_are_checked_at_start() {
        let args = |retention: &str, immutable: &str| ServeArgs {
            retention: vec![retention.to_string()],
            immutable_tags: vec![immutable.to_string()],
            ..Default::default()
        };
        let c = args("team:keep-last=3:pattern=v*", "v*").resolve().unwrap();
        assert_eq!(c.retention[0].keep_last, Some(3));
        assert_eq!(c.immutable_tags[0].pattern, "v*");
        let err = args("team:keep-last=x", "v*").resolve().unwrap_err();
        assert!(err.contains("keep-last is not a number"), "{err}");
        let err = ServeArgs {
            disk_watermark: Some(120.0),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("from 0 to 100"), "{err}");
    }

    #[test]
    fn metadata_location_from_flag_or_file() {
        use crate::backends::MetadataLocation;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, "metadata = \"postgres://berth@db/registry\"\n").unwrap();
        let c = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            c.metadata,
            MetadataLocation::Postgres("postgres://berth@db/registry".into())
        );
        let c = ServeArgs {
            config: Some(path),
            metadata: Some("redb".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.metadata, MetadataLocation::Embedded, "the flag beats the file");
        assert_eq!(
            ServeArgs::default().resolve().unwrap().metadata,
            MetadataLocation::Embedded
        );
        let err = ServeArgs {
            metadata: Some("mysql://x".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("postgres://USER"), "{err}");
    }

    #[test]
    fn storage_location_from_flag_or_file() {
        use crate::storage_location::StorageLocation;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(
            &path,
            "storage = \"s3://registry/berth?endpoint=http://127.0.0.1:9000\"\nstorage_credentials = \"/etc/berth/s3\"\n",
        )
        .unwrap();
        let c = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let StorageLocation::S3(s3) = &c.blobs.location else {
            panic!("{:?}", c.blobs)
        };
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("registry", "berth"));
        assert_eq!(c.blobs.credentials, Some(PathBuf::from("/etc/berth/s3")));
        let c = ServeArgs {
            config: Some(path),
            storage: Some("fs".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.blobs.location, StorageLocation::DataDir, "the flag beats the file");
        assert_eq!(
            ServeArgs::default().resolve().unwrap().blobs.location,
            StorageLocation::DataDir
        );
        let err = ServeArgs {
            storage: Some("s3://registry?endpoint=localhost:9000".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.starts_with("--storage: ") && err.contains("http://"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("lisen"), "{err}");
    }
}
