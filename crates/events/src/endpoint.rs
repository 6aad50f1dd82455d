//! A webhook endpoint: its configuration (a `[[webhooks]]` table in the TOML
//! file) and its filter.

use std::collections::BTreeMap;
use std::time::Duration;

use registry::events::{EventKind, EventKinds};
use serde::Deserialize;

/// One `[[webhooks]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Names the endpoint in metrics and logs, and keys its delivery
    /// position: renaming an endpoint starts it from the oldest kept event.
    pub name: String,
    /// `http://` or `https://` URL events are POSTed to.
    pub url: String,
    /// Event types to send (`push`, `pull`, `delete`, `mount`, `tag`);
    /// empty or absent means all.
    #[serde(default)]
    pub types: Vec<String>,
    /// Repository patterns (`*` matches any run of characters, `/`
    /// included; `?` one character); empty or absent means all.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Extra request headers, e.g. `Authorization`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per-request timeout, e.g. "5s". [default: 5s]
    pub timeout: Option<String>,
    /// Attempts before an event becomes a dead letter. [default: 12]
    pub max_attempts: Option<u32>,
    /// First retry delay, doubled after each failure. [default: 1s]
    pub backoff_initial: Option<String>,
    /// Longest retry delay. [default: 5m]
    pub backoff_max: Option<String>,
}

/// A validated endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    pub kinds: EventKinds,
    pub repositories: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

fn duration(field: &str, v: &Option<String>, default: Duration) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) => observe::time::parse_duration(s).map_err(|e| format!("{field}: {e}")),
    }
}

impl EndpointConfig {
    pub fn validate(&self) -> Result<Endpoint, String> {
        let at = |e: String| format!("webhook {:?}: {e}", self.name);
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(at("name must be letters, digits, '-', '_' or '.'".into()));
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(at(format!("url {:?} must start with http:// or https://", self.url)));
        }
        let mut kinds = EventKinds::default();
        for t in &self.types {
            let k = EventKind::parse(t).ok_or_else(|| {
                at(format!(
                    "unknown event type {t:?}; use push, pull, delete, mount or tag"
                ))
            })?;
            kinds.insert(k);
        }
        if kinds.is_empty() {
            kinds = EventKinds::all();
        }
        let max_attempts = self.max_attempts.unwrap_or(12);
        if max_attempts == 0 {
            return Err(at("max_attempts must be at least 1".into()));
        }
        Ok(Endpoint {
            name: self.name.clone(),
            url: self.url.clone(),
            kinds,
            repositories: self.repositories.clone(),
            headers: self.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            timeout: duration("timeout", &self.timeout, Duration::from_secs(5)).map_err(at)?,
            max_attempts,
            backoff_initial: duration("backoff_initial", &self.backoff_initial, Duration::from_secs(1)).map_err(at)?,
            backoff_max: duration("backoff_max", &self.backoff_max, Duration::from_secs(300)).map_err(at)?,
        })
    }
}

/// Validates every endpoint and checks that names are unique.
pub fn validate_all(configs: &[EndpointConfig]) -> Result<Vec<Endpoint>, String> {
    let mut out: Vec<Endpoint> = Vec::new();
    for c in configs {
        let e = c.validate()?;
        if out.iter().any(|o| o.name == e.name) {
            return Err(format!("two webhooks are named {:?}; names must be unique", e.name));
        }
        out.push(e);
    }
    Ok(out)
}

/// The kinds at least one endpoint wants: the registry records only these.
pub fn wanted_kinds(endpoints: &[Endpoint]) -> EventKinds {
    endpoints.iter().fold(EventKinds::default(), |k, e| k.union(e.kinds))
}

impl Endpoint {
    /// Whether this endpoint wants an event of `kind` about `repository`.
    pub fn wants(&self, kind: EventKind, repository: &str) -> bool {
        self.kinds.contains(kind)
            && (self.repositories.is_empty() || self.repositories.iter().any(|p| glob_match(p, repository)))
    }

    /// The delay before retry number `attempt` (1 = first retry).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff_initial.saturating_mul(factor).min(self.backoff_max)
    }
}

/// `*` matches any run of characters (including `/`), `?` exactly one.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    // Iterative matching with one backtrack point for the last `*`.
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> EndpointConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob_match("team/*", "team/app"));
        assert!(glob_match("team/*", "team/a/b"));
        assert!(!glob_match("team/*", "other/app"));
        assert!(glob_match("*/app", "x/y/app"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*", ""));
        assert!(glob_match("library/alpine", "library/alpine"));
        assert!(!glob_match("library/alpine", "library/alpine2"));
    }

    #[test]
    fn filters_and_defaults() {
        let e = cfg("name = \"ci\"\nurl = \"http://127.0.0.1:1/\"\ntypes = [\"push\", \"io.berth.delete\"]\nrepositories = [\"team/*\"]\n")
            .validate()
            .unwrap();
        assert!(e.wants(EventKind::Push, "team/app"));
        assert!(e.wants(EventKind::Delete, "team/app"));
        assert!(!e.wants(EventKind::Pull, "team/app"));
        assert!(!e.wants(EventKind::Push, "other/app"));
        assert_eq!(e.timeout, Duration::from_secs(5));
        assert_eq!(e.max_attempts, 12);
        assert_eq!(e.backoff(1), Duration::from_secs(1));
        assert_eq!(e.backoff(4), Duration::from_secs(8));
        assert_eq!(e.backoff(40), Duration::from_secs(300));
        let all = cfg("name = \"all\"\nurl = \"https://hooks.example/x\"\n")
            .validate()
            .unwrap();
        assert!(all.wants(EventKind::Pull, "any/thing"));
        assert!(!wanted_kinds(std::slice::from_ref(&e)).contains(EventKind::Pull));
        assert!(wanted_kinds(&[e, all]).contains(EventKind::Pull));
    }

    #[test]
    fn invalid_configs_say_what_to_fix() {
        let err = |t: &str| cfg(t).validate().unwrap_err();
        assert!(err("name = \"a b\"\nurl = \"http://x/\"").contains("name must be"));
        assert!(err("name = \"a\"\nurl = \"ftp://x/\"").contains("http://"));
        assert!(err("name = \"a\"\nurl = \"http://x/\"\ntypes = [\"pushed\"]").contains("unknown event type"));
        assert!(err("name = \"a\"\nurl = \"http://x/\"\ntimeout = \"soon\"").contains("timeout"));
        let dup = vec![
            cfg("name = \"a\"\nurl = \"http://x/\""),
            cfg("name = \"a\"\nurl = \"http://y/\""),
        ];
        assert!(validate_all(&dup).unwrap_err().contains("unique"));
    }
}
