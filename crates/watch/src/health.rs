//! One health check of one instance: the operations guide's JSON,
//! `{"status":"healthy","image_version":"..."}`. A healthy answer from
//! another version than the one deployed is a failure.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Healthy,
    /// Answered, but not healthy (status code or `status`).
    Unhealthy(String),
    /// Healthy, from another version.
    WrongVersion {
        reported: String,
    },
    /// No answer (refused, timed out, not JSON).
    NoAnswer(String),
}

impl Check {
    pub fn ok(&self) -> bool {
        *self == Check::Healthy
    }

    pub fn describe(&self, expected: &str) -> String {
        match self {
            Check::Healthy => "healthy".into(),
            Check::Unhealthy(why) => format!("unhealthy: {why}"),
            Check::WrongVersion { reported } => {
                format!("healthy, but reports image_version {reported:?} where {expected:?} was deployed")
            }
            Check::NoAnswer(why) => format!("no answer: {why}"),
        }
    }
}

#[derive(Deserialize)]
struct Body {
    status: String,
    #[serde(default)]
    image_version: Option<String>,
}

/// GETs `url` and judges the answer against `expected` version.
pub async fn check(http: &reqwest::Client, url: &str, timeout: Duration, expected: &str) -> Check {
    let resp = match http.get(url).timeout(timeout).send().await {
        Ok(r) => r,
        Err(e) => return Check::NoAnswer(error_chain(&e)),
    };
    let status = resp.status();
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return Check::NoAnswer(error_chain(&e)),
    };
    judge(status.as_u16(), &bytes, expected)
}

fn judge(status: u16, body: &[u8], expected: &str) -> Check {
    let snippet = || String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string();
    if !(200..300).contains(&status) {
        return Check::Unhealthy(format!("HTTP {status} {}", snippet()));
    }
    let b: Body = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return Check::Unhealthy(format!("not the health JSON ({e}): {}", snippet())),
    };
    if b.status != "healthy" {
        return Check::Unhealthy(format!("status {:?}", b.status));
    }
    match b.image_version {
        Some(v) if v == expected => Check::Healthy,
        Some(v) => Check::WrongVersion { reported: v },
        None => Check::Unhealthy("no image_version in the answer".into()),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judging() {
        let ok = br#"{"status":"healthy","image_version":"v2","last_check":"x"}"#;
        assert_eq!(judge(200, ok, "v2"), Check::Healthy);
        assert_eq!(judge(200, ok, "v3"), Check::WrongVersion { reported: "v2".into() });
        assert!(matches!(judge(503, ok, "v2"), Check::Unhealthy(_)));
        assert!(matches!(
            judge(200, br#"{"status":"degraded","image_version":"v2"}"#, "v2"),
            Check::Unhealthy(_)
        ));
        assert!(matches!(judge(200, b"OK", "v2"), Check::Unhealthy(_)));
    }
}
