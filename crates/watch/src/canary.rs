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
use crate::spec::{Canary, Compare, Router};

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
    /// Too few requests to judge: never a pass.
    Inconclusive(String),
}

impl Verdict {
    /// The result label of `berth_watch_canary_analyses_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Verdict::Pass(_) => "pass",
            Verdict::Fail(..) => "fail",
            Verdict::Inconclusive(_) => "inconclusive",
        }
    }
}

/// One side's numbers in one window, from either source.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measure {
    /// Requests in the window (Prometheus's `increase` is not whole).
    pub requests: f64,
    /// Failed requests in the window.
    pub errors: f64,
    /// The latency percentile, in seconds; `None`: no data.
    pub latency: Option<f64>,
}

impl Measure {
    pub fn of(side: &Side, percentile: f64) -> Measure {
        Measure {
            requests: side.requests as f64,
            errors: side.errors as f64,
            latency: (!side.latencies.is_empty()).then(|| side.percentile(percentile)),
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests > 0.0 {
            self.errors / self.requests
        } else {
            0.0
        }
    }

    fn describe(&self, p: f64) -> String {
        let latency = self.latency.map_or("no data".to_string(), |l| format!("{l:.3}s"));
        format!(
            "{:.0} requests, {:.2} % errors, p{p} {latency}",
            self.requests,
            self.error_rate() * 100.0
        )
    }
}

/// Judges one window from nginx's log.
pub fn judge_window(c: &Canary, w: &Window) -> Verdict {
    judge(
        c,
        &Measure::of(&w.canary, c.percentile),
        &Measure::of(&w.stable, c.percentile),
    )
}

pub fn judge(c: &Canary, canary: &Measure, stable: &Measure) -> Verdict {
    let all = canary.requests + stable.requests;
    let share = if all > 0.0 { canary.requests * 100.0 / all } else { 0.0 };
    let summary = format!(
        "canary {} ({share:.1} % of the traffic); stable {}",
        canary.describe(c.percentile),
        stable.describe(c.percentile)
    );
    let min = c.min_requests as f64;
    if canary.requests < min {
        return Verdict::Inconclusive(format!(
            "{summary}: fewer than {} canary requests, no conclusion",
            c.min_requests
        ));
    }
    let absolute = c.compare != Compare::Relative;
    let relative = c.compare != Compare::Absolute;
    let err = canary.error_rate();
    if absolute && err > c.max_error_rate {
        return Verdict::Fail(
            Cause::CanaryErrors,
            format!("{summary}: canary error rate above {:.2} %", c.max_error_rate * 100.0),
        );
    }
    let lat = canary.latency;
    if let Some(l) = lat.filter(|l| absolute && *l > c.max_latency.as_secs_f64()) {
        return Verdict::Fail(
            Cause::CanaryLatency,
            format!(
                "{summary}: canary p{} latency {l:.3}s above {:?}",
                c.percentile, c.max_latency
            ),
        );
    }
    // Past this point a failure needs the stable's numbers beside it.
    if relative && stable.requests < min {
        return Verdict::Inconclusive(format!(
            "{summary}: fewer than {} stable requests, nothing to compare the canary with",
            c.min_requests
        ));
    }
    if relative && err > stable.error_rate() + c.max_error_rate_increase {
        return Verdict::Fail(
            Cause::CanaryErrors,
            format!(
                "{summary}: canary error rate more than {:.2} points above the stable's",
                c.max_error_rate_increase * 100.0
            ),
        );
    }
    let Some(lat) = lat else {
        return Verdict::Inconclusive(format!("{summary}: no latency for the canary, no conclusion"));
    };
    if relative {
        let Some(base) = stable.latency else {
            return Verdict::Inconclusive(format!("{summary}: no latency for the stable, nothing to compare with"));
        };
        let limit = (base * c.max_latency_ratio).max(c.latency_floor.as_secs_f64());
        if lat > limit {
            return Verdict::Fail(
                Cause::CanaryLatency,
                format!(
                    "{summary}: canary p{} latency above {} x the stable's ({limit:.3}s)",
                    c.percentile, c.max_latency_ratio
                ),
            );
        }
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
            compare: Compare::Both,
            max_error_rate_increase: 0.005,
            max_latency_ratio: 1.5,
            latency_floor: Duration::from_millis(100),
            prometheus: None,
        }
    }

    fn m(requests: f64, errors: f64, latency: f64) -> Measure {
        Measure {
            requests,
            errors,
            latency: Some(latency),
        }
    }

    #[test]
    fn absolute_relative_and_both() {
        let with = |compare| Canary { compare, ..canary() };
        let (abs, rel, both) = (with(Compare::Absolute), with(Compare::Relative), with(Compare::Both));
        let healthy = m(100.0, 0.0, 0.010);
        // 1.5 % errors where the stable has none: fails every way.
        let errors = m(200.0, 3.0, 0.010);
        for c in [&abs, &rel, &both] {
            assert!(matches!(
                judge(c, &errors, &healthy),
                Verdict::Fail(Cause::CanaryErrors, _)
            ));
            assert!(matches!(judge(c, &healthy, &healthy), Verdict::Pass(_)));
        }
        // The stable fails as much: only the thresholds fail the canary.
        assert!(matches!(judge(&rel, &errors, &errors), Verdict::Pass(_)));
        assert!(matches!(judge(&abs, &errors, &errors), Verdict::Fail(..)));
        assert!(matches!(judge(&both, &errors, &errors), Verdict::Fail(..)));
        // 0.8 % errors (under 1 %) where the stable has none: relative fails.
        let some = m(1000.0, 8.0, 0.010);
        assert!(matches!(judge(&abs, &some, &healthy), Verdict::Pass(_)));
        let v = judge(&rel, &some, &healthy);
        assert!(
            matches!(&v, Verdict::Fail(Cause::CanaryErrors, s) if s.contains("0.50 points above the stable's")),
            "{v:?}"
        );
        // 1.2 s, under 2 s, where the stable takes 0.2 s: relative fails.
        let slowish = m(100.0, 0.0, 1.2);
        let base = m(100.0, 0.0, 0.2);
        assert!(matches!(judge(&abs, &slowish, &base), Verdict::Pass(_)));
        assert!(matches!(
            judge(&both, &slowish, &base),
            Verdict::Fail(Cause::CanaryLatency, _)
        ));
        // 40 ms against 5 ms is eight times, but under the floor: noise.
        assert!(matches!(
            judge(&rel, &m(100.0, 0.0, 0.040), &m(100.0, 0.0, 0.005)),
            Verdict::Pass(_)
        ));
        // 2.5 s where the stable takes 2.4 s: only the threshold fails it.
        assert!(matches!(
            judge(&rel, &m(50.0, 0.0, 2.5), &m(50.0, 0.0, 2.4)),
            Verdict::Pass(_)
        ));
        assert!(matches!(
            judge(&abs, &m(50.0, 0.0, 2.5), &m(50.0, 0.0, 2.4)),
            Verdict::Fail(Cause::CanaryLatency, _)
        ));
    }

    #[test]
    fn no_data_is_never_a_pass() {
        let healthy = m(100.0, 0.0, 0.010);
        let none = Measure::default();
        for compare in [Compare::Absolute, Compare::Relative, Compare::Both] {
            let c = Canary { compare, ..canary() };
            assert!(
                matches!(judge(&c, &none, &healthy), Verdict::Inconclusive(_)),
                "{compare:?}"
            );
            let no_latency = Measure {
                latency: None,
                ..healthy
            };
            assert!(
                matches!(judge(&c, &no_latency, &healthy), Verdict::Inconclusive(_)),
                "{compare:?}"
            );
        }
        // Relative with no stable traffic: nothing to compare with...
        let rel = Canary {
            compare: Compare::Relative,
            ..canary()
        };
        let v = judge(&rel, &healthy, &none);
        assert!(
            matches!(&v, Verdict::Inconclusive(s) if s.contains("nothing to compare")),
            "{v:?}"
        );
        // ... but a failure on the thresholds needs no comparison.
        let both = canary();
        assert!(matches!(judge(&both, &m(100.0, 10.0, 0.01), &none), Verdict::Fail(..)));
        assert!(matches!(judge(&both, &healthy, &none), Verdict::Inconclusive(_)));
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
        assert!(matches!(
            judge_window(&canary(), &w),
            Verdict::Fail(Cause::CanaryErrors, _)
        ));
        // The half-written line is read with the next window.
        writeln!(f, r#"tus":200,"request_time":2.5}}"#).unwrap();
        let w = read_window(&log, &mut off, &c, &s).unwrap();
        assert_eq!(w.canary.requests, 1);
        assert!(matches!(judge_window(&canary(), &w), Verdict::Inconclusive(_)));
        let slow = Window {
            canary: Side {
                requests: 10,
                errors: 0,
                latencies: vec![2.5; 10],
            },
            stable: Side::default(),
        };
        assert!(matches!(
            judge_window(&canary(), &slow),
            Verdict::Fail(Cause::CanaryLatency, _)
        ));
    }
}
