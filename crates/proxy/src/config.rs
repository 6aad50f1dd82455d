//! An upstream: its configuration (a `[[upstreams]]` table in the TOML file)
//! and the validated form the cache works with.

use std::time::Duration;

use serde::Deserialize;

/// One `[[upstreams]]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Names the upstream in metrics and logs.
    pub name: String,
    /// The upstream registry, e.g. `https://registry-1.docker.io`.
    pub url: String,
    /// The berth project that caches it: `<project>/<repo>` pulls
    /// `<repo>` from the upstream. [default: the name]
    pub project: Option<String>,
    /// The registry host containerd names in `?ns=` when berth is its
    /// mirror. [default: the URL's host, and `docker.io` for Docker Hub]
    pub namespace: Option<String>,
    /// Serve pulls of repositories that are not found locally from this
    /// upstream (what Docker's `registry-mirrors` needs: it sends
    /// `library/nginx` with no prefix and no `?ns=`). At most one upstream.
    #[serde(default)]
    pub mirror: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password (its first line), instead of `password`.
    pub password_file: Option<String>,
    /// Extra CA certificates (PEM) to trust for this upstream.
    pub ca_file: Option<String>,
    /// A cached manifest or blob not pulled for this long is evicted. [72h]
    pub ttl: Option<String>,
    /// Most bytes kept for this upstream, e.g. `500G`. [500G]
    pub max_size: Option<String>,
    /// Eviction starts above this percentage of `max_size`... [90]
    pub high_watermark: Option<f64>,
    /// ...and stops at or below this one. [80]
    pub low_watermark: Option<f64>,
    /// How long an upstream's answer about a tag is trusted before asking
    /// again (with HEAD). [60s]
    pub revalidate: Option<String>,
    /// While the upstream is unreachable, a cached tag is served for this
    /// long after the upstream last confirmed it. [24h]
    pub stale_for: Option<String>,
    /// Requests per second to the upstream. [10]
    pub rate: Option<f64>,
    /// Requests in flight to the upstream at once (a blob download counts
    /// until it ends). [10]
    pub concurrency: Option<usize>,
    /// Requests that may wait for the rate or concurrency limit; more are
    /// refused at once with TOOMANYREQUESTS. [100]
    pub queue: Option<usize>,
    /// Longest wait in that queue before TOOMANYREQUESTS. [30s]
    pub queue_timeout: Option<String>,
    /// Time allowed to connect and receive a response head. [30s]
    pub timeout: Option<String>,
    /// Time between eviction passes. [1m]
    pub evict_interval: Option<String>,
}

/// A validated upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    /// Without a trailing slash.
    pub url: String,
    pub project: String,
    pub namespace: String,
    pub mirror: bool,
    pub credentials: Option<(String, String)>,
    pub ca_pem: Option<Vec<u8>>,
    pub ttl: Duration,
    pub max_size: u64,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub revalidate: Duration,
    pub stale_for: Duration,
    pub rate: f64,
    pub concurrency: usize,
    pub queue: usize,
    pub queue_timeout: Duration,
    pub timeout: Duration,
    pub evict_interval: Duration,
}

impl Upstream {
    /// The upstream's name for a repository: Docker Hub keeps official
    /// images under `library/`.
    pub fn upstream_repo(&self, repo: &str) -> String {
        if self.namespace == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        }
    }
}

fn duration(field: &str, v: &Option<String>, default: Duration) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) => observe::time::parse_duration(s).map_err(|e| format!("{field}: {e}")),
    }
}

/// `host[:port]` of an http(s) URL, or `None` if it is not one.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split('/').next()?;
    (!host.is_empty()).then_some(host)
}

impl UpstreamConfig {
    pub fn validate(&self) -> Result<Upstream, String> {
        let at = |e: String| format!("upstream {:?}: {e}", self.name);
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.'))
        };
        if !name_ok(&self.name) {
            return Err(at("name must be lowercase letters, digits, '-', '_' or '.'".into()));
        }
        let url = self.url.trim_end_matches('/').to_string();
        let host = host_of(&url).ok_or_else(|| {
            at(format!(
                "url {:?} must be http:// or https:// and a host, e.g. https://registry-1.docker.io",
                self.url
            ))
        })?;
        let project = self.project.clone().unwrap_or_else(|| self.name.clone());
        if project.parse::<oci::RepoName>().is_err() || project.contains('/') {
            return Err(at(format!(
                "project {project:?} must be one valid repository name component, e.g. dockerhub"
            )));
        }
        let namespace = match &self.namespace {
            Some(ns) => ns.clone(),
            None if matches!(host, "registry-1.docker.io" | "index.docker.io" | "docker.io") => "docker.io".into(),
            None => host.to_string(),
        };
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => return Err(at("give password or password_file, not both".into())),
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| at(format!("cannot read password_file {f}: {e}")))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            ),
            (None, None) => None,
        };
        let credentials = match (&self.username, password) {
            (Some(u), Some(p)) => Some((u.clone(), p)),
            (None, None) => None,
            _ => return Err(at("username and password go together".into())),
        };
        let ca_pem = match &self.ca_file {
            Some(f) => Some(std::fs::read(f).map_err(|e| at(format!("cannot read ca_file {f}: {e}")))?),
            None => None,
        };
        let max_size = match &self.max_size {
            Some(s) => observe::size::parse_size(s).map_err(|e| at(format!("max_size: {e}")))?,
            None => 500 << 30,
        };
        let high_watermark = self.high_watermark.unwrap_or(90.0);
        let low_watermark = self.low_watermark.unwrap_or(80.0);
        if !(0.0 < low_watermark && low_watermark <= high_watermark && high_watermark <= 100.0) {
            return Err(at(format!(
                "watermarks must satisfy 0 < low_watermark ({low_watermark}) <= high_watermark ({high_watermark}) <= 100"
            )));
        }
        let rate = self.rate.unwrap_or(10.0);
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(at(format!(
                "rate {rate} must be a positive number of requests per second"
            )));
        }
        let concurrency = self.concurrency.unwrap_or(10);
        if concurrency == 0 {
            return Err(at("concurrency must be at least 1".into()));
        }
        Ok(Upstream {
            name: self.name.clone(),
            url,
            project,
            namespace,
            mirror: self.mirror,
            credentials,
            ca_pem,
            ttl: duration("ttl", &self.ttl, Duration::from_secs(72 * 3600)).map_err(at)?,
            max_size,
            high_watermark,
            low_watermark,
            revalidate: duration("revalidate", &self.revalidate, Duration::from_secs(60)).map_err(at)?,
            stale_for: duration("stale_for", &self.stale_for, Duration::from_secs(24 * 3600)).map_err(at)?,
            rate,
            concurrency,
            queue: self.queue.unwrap_or(100),
            queue_timeout: duration("queue_timeout", &self.queue_timeout, Duration::from_secs(30)).map_err(at)?,
            timeout: duration("timeout", &self.timeout, Duration::from_secs(30)).map_err(at)?,
            evict_interval: duration("evict_interval", &self.evict_interval, Duration::from_secs(60)).map_err(at)?,
        })
    }
}

/// Validates every upstream and checks that names, projects and namespaces
/// are unique and at most one is the mirror.
pub fn validate_all(configs: &[UpstreamConfig]) -> Result<Vec<Upstream>, String> {
    let ups = configs
        .iter()
        .map(UpstreamConfig::validate)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in ups.iter().enumerate() {
        for b in &ups[..i] {
            for (what, x, y) in [
                ("name", &a.name, &b.name),
                ("project", &a.project, &b.project),
                ("namespace", &a.namespace, &b.namespace),
            ] {
                if x == y {
                    return Err(format!(
                        "upstreams {:?} and {:?} have the same {what} {x:?}",
                        b.name, a.name
                    ));
                }
            }
        }
    }
    if ups.iter().filter(|u| u.mirror).count() > 1 {
        return Err("at most one upstream can be the mirror (mirror = true)".into());
    }
    Ok(ups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, url: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            url: url.into(),
            ..UpstreamConfig::default()
        }
    }

    #[test]
    fn defaults_and_docker_hub() {
        let u = cfg("dockerhub", "https://registry-1.docker.io/").validate().unwrap();
        assert_eq!(u.url, "https://registry-1.docker.io");
        assert_eq!(u.project, "dockerhub");
        assert_eq!(u.namespace, "docker.io");
        assert_eq!(u.ttl, Duration::from_secs(72 * 3600));
        assert_eq!(u.max_size, 500 << 30);
        assert_eq!((u.high_watermark, u.low_watermark), (90.0, 80.0));
        assert_eq!(u.rate, 10.0);
        assert_eq!(u.upstream_repo("nginx"), "library/nginx");
        assert_eq!(u.upstream_repo("grafana/loki"), "grafana/loki");
        let q = cfg("quay", "https://quay.io").validate().unwrap();
        assert_eq!(q.namespace, "quay.io");
        assert_eq!(q.upstream_repo("nginx"), "nginx");
    }

    #[test]
    fn refusals_name_the_field() {
        let e = |c: UpstreamConfig| c.validate().unwrap_err();
        assert!(e(cfg("Hub", "https://h")).contains("name must be lowercase"));
        assert!(e(cfg("hub", "ftp://h")).contains("must be http:// or https://"));
        let mut c = cfg("hub", "https://h");
        c.username = Some("u".into());
        assert!(e(c).contains("username and password go together"));
        let mut c = cfg("hub", "https://h");
        c.ttl = Some("3w".into());
        assert!(e(c).contains("ttl: unknown unit"));
        let mut c = cfg("hub", "https://h");
        c.low_watermark = Some(95.0);
        assert!(e(c).contains("watermarks"));
        let mut c = cfg("hub", "https://h");
        c.project = Some("a/b".into());
        assert!(e(c).contains("project"));
        let err = validate_all(&[cfg("a", "https://h"), cfg("b", "https://h")]).unwrap_err();
        assert!(err.contains("same namespace \"h\""), "{err}");
        let mut m1 = cfg("a", "https://h1");
        m1.mirror = true;
        let mut m2 = cfg("b", "https://h2");
        m2.mirror = true;
        assert!(validate_all(&[m1, m2]).unwrap_err().contains("at most one"));
    }

    #[test]
    fn parses_from_toml() {
        #[derive(Deserialize)]
        struct F {
            upstreams: Vec<UpstreamConfig>,
        }
        let f: F = toml::from_str(
            "[[upstreams]]\nname = \"hub\"\nurl = \"http://127.0.0.1:5001\"\nttl = \"2s\"\nmax_size = \"1M\"\n",
        )
        .unwrap();
        let u = validate_all(&f.upstreams).unwrap();
        assert_eq!(u[0].ttl, Duration::from_secs(2));
        assert_eq!(u[0].max_size, 1 << 20);
        assert_eq!(u[0].namespace, "127.0.0.1:5001");
        assert!(toml::from_str::<F>("[[upstreams]]\nname = \"x\"\nurl = \"http://h\"\nbogus = 1\n").is_err());
    }
}
