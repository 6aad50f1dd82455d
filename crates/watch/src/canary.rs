//! Traffic routing through nginx and the canary analysis.
//!
//! berth writes the upstream block (weighted servers) to the file nginx
//! includes, and runs the reload command. nginx's weighted round robin is
//! smooth and exact: with weights 95 and 5, 5 of every 100 requests go to
//! the canary. The analysis reads nginx's JSON access log (`upstream_addr`,
//! `status`, `request_time`) for each window, and compares the canary's
//! error rate and latency percentile with the thresholds, with the
//! stable's numbers beside them as the evidence.

use std::collections::HashSet;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;

use crate::classify::Cause;
use crate::spec::{Canary, Router};

/// Writes the upstream with `servers` (address, weight) and reloads nginx.
pub fn route(r: &Router, servers: &[(String, u32)]) -> Result<(), String> {
    let mut text = format!("# Written by berth watch; do not edit.\nupstream {} {{\n", r.upstream);
    for (addr, weight) in servers {
        text.push_str(&format!("    server {addr} weight={weight};\n"));
    }
    text.push_str("}\n");
    // Visible whole or not at all: nginx may read it at any moment.
    let tmp = r.conf.with_extension("berth-tmp");
    std::fs::write(&tmp, &text)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &r.conf))
        .map_err(|e| format!("cannot write the upstream to {}: {e}", r.conf.display()))?;
    let out = std::process::Command::new(&r.reload[0])
        .args(&r.reload[1..])
        .output()
        .map_err(|e| format!("cannot run the reload command {:?}: {e}", r.reload))?;
    if !out.status.success() {
        return Err(format!(
            "the reload command {:?} failed ({}): {}",
            r.reload,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Requests of one side in one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Side {
    pub requests: u64,
    pub errors: u64,
    /// Seconds.
    pub latencies: Vec<f64>,
}

impl Side {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// Nearest-rank percentile `p` (0-100) of the latencies, in seconds.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut l = self.latencies.clone();
        l.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * l.len() as f64).ceil() as usize;
        l[rank.clamp(1, l.len()) - 1]
    }

    fn describe(&self, p: f64) -> String {
        format!(
            "{} requests, {:.2} % errors, p{p} {:.3}s",
            self.requests,
            self.error_rate() * 100.0,
            self.percentile(p)
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub canary: Side,
    pub stable: Side,
}

impl Window {
    /// The canary's share of the window's requests, in percent.
    pub fn share(&self) -> f64 {
        let all = self.canary.requests + self.stable.requests;
        if all == 0 {
            0.0
        } else {
            self.canary.requests as f64 * 100.0 / all as f64
        }
    }
}

#[derive(Deserialize)]
struct Line {
    upstream_addr: String,
    status: u16,
    request_time: f64,
}

/// Reads the log lines appended since `offset` (moved to the end), sorted
/// into canary and stable by upstream address. A shorter file than the
/// offset was rotated: it is read from its start.
pub fn read_window(
    log: &Path,
    offset: &mut u64,
    canary: &HashSet<String>,
    stable: &HashSet<String>,
) -> std::io::Result<Window> {
    let mut f = std::fs::File::open(log)?;
    let len = f.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    f.seek(SeekFrom::Start(*offset))?;
    // Line by line: a busy window is not read into memory whole.
    let mut r = std::io::BufReader::new(f.take(len - *offset));
    let mut w = Window::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        // A line still being written waits for the next window.
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        *offset += n as u64;
        let Ok(l) = serde_json::from_slice::<Line>(&line) else {
            continue;
        };
        // After a retry nginx lists every server tried; the last answered.
        let addr = l.upstream_addr.rsplit(", ").next().unwrap_or("").trim();
        let side = if canary.contains(addr) {
            &mut w.canary
        } else if stable.contains(addr) {
            &mut w.stable
        } else {
            continue;
        };
        side.requests += 1;
        if l.status >= 500 {
            side.errors += 1;
        }
        side.latencies.push(l.request_time);
    }
    Ok(w)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass(String),
    Fail(Cause, String),
    /// Too few canary requests to judge: never a pass.
    Inconclusive(String),
}

pub fn judge(c: &Canary, w: &Window) -> Verdict {
    let summary = format!(
        "canary {} ({:.1} % of the traffic); stable {}",
        w.canary.describe(c.percentile),
        w.share(),
        w.stable.describe(c.percentile)
    );
    if w.canary.requests < c.min_requests {
        return Verdict::Inconclusive(format!(
            "{summary}: fewer than {} canary requests, no conclusion",
            c.min_requests
        ));
    }
    if w.canary.error_rate() > c.max_error_rate {
        return Verdict::Fail(
            Cause::CanaryErrors,
            format!("{summary}: canary error rate above {:.2} %", c.max_error_rate * 100.0),
        );
    }
    let lat = w.canary.percentile(c.percentile);
    if lat > c.max_latency.as_secs_f64() {
        return Verdict::Fail(
            Cause::CanaryLatency,
            format!("{summary}: canary p{} latency above {:?}", c.percentile, c.max_latency),
        );
    }
    Verdict::Pass(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn canary() -> Canary {
        Canary {
            steps: vec![],
            interval: Duration::from_secs(1),
            max_error_rate: 0.01,
            max_latency: Duration::from_secs(2),
            percentile: 99.0,
            min_requests: 10,
            inconclusive_windows: 3,
            on_inconclusive: crate::spec::OnInconclusive::Rollback,
        }
    }

    #[test]
    fn windows_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let mut f = std::fs::File::create(&log).unwrap();
        let c: HashSet<String> = ["127.0.0.1:2".to_string()].into();
        let s: HashSet<String> = ["127.0.0.1:1".to_string()].into();
        for i in 0..100 {
            let addr = if i % 10 == 0 { "127.0.0.1:2" } else { "127.0.0.1:1" };
            let status = if i == 20 { 502 } else { 200 };
            writeln!(
                f,
                r#"{{"upstream_addr":"{addr}","status":{status},"request_time":0.{i:03}}}"#
            )
            .unwrap();
        }
        write!(f, r#"{{"upstream_addr":"127.0.0.1:2","sta"#).unwrap();
        let mut off = 0;
        let w = read_window(&log, &mut off, &c, &s).unwrap();
        assert_eq!((w.canary.requests, w.stable.requests), (10, 90));
        assert_eq!(w.share(), 10.0);
        assert_eq!(w.canary.errors, 1);
        // 10 % errors on the canary.
        assert!(matches!(judge(&canary(), &w), Verdict::Fail(Cause::CanaryErrors, _)));
        // The half-written line is read with the next window.
        writeln!(f, r#"tus":200,"request_time":2.5}}"#).unwrap();
        let w = read_window(&log, &mut off, &c, &s).unwrap();
        assert_eq!(w.canary.requests, 1);
        assert!(matches!(judge(&canary(), &w), Verdict::Inconclusive(_)));
        let slow = Window {
            canary: Side {
                requests: 10,
                errors: 0,
                latencies: vec![2.5; 10],
            },
            stable: Side::default(),
        };
        assert!(matches!(
            judge(&canary(), &slow),
            Verdict::Fail(Cause::CanaryLatency, _)
        ));
    }
}
