//! The result: a table for people, JSON for scripts. MB are 10^6 bytes.

use serde::Serialize;

use crate::load::Measured;
use crate::options::{Config, Scenario};

#[derive(Serialize, Debug)]
pub struct Summary {
    pub scenario: &'static str,
    pub registry: String,
    pub connections: usize,
    /// "closed-loop" or "constant-rate".
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub warmup_s: f64,
    pub elapsed_s: f64,
    /// Operations measured (a pull or a push is one operation).
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    /// Percent of operations that succeeded.
    pub success_rate: f64,
    pub qps: f64,
    pub http_requests: u64,
    pub bytes: u64,
    pub mb_per_s: f64,
    pub latency_ms: Latency,
    pub errors: Vec<ErrorCount>,
}

#[derive(Serialize, Debug, Default)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Serialize, Debug)]
pub struct ErrorCount {
    pub status: Option<u16>,
    pub error: String,
    pub count: u64,
}

pub fn summarize(cfg: &Config, scenario: Scenario, m: &Measured) -> Summary {
    let s = &m.stats;
    let secs = m.elapsed.as_secs_f64().max(1e-9);
    let h = &s.latency;
    let ms = |us: u64| us as f64 / 1000.0;
    let latency = if h.is_empty() {
        Latency::default()
    } else {
        Latency {
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    };
    let mut errors: Vec<ErrorCount> = s
        .errors
        .iter()
        .map(|(f, n)| ErrorCount {
            status: f.status,
            error: f.code.clone(),
            count: *n,
        })
        .collect();
    errors.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.error.cmp(&b.error)));
    let total = s.total();
    Summary {
        scenario: scenario.name(),
        registry: cfg.registry.clone(),
        connections: cfg.load.connections,
        mode: if cfg.load.rate.is_some() {
            "constant-rate"
        } else {
            "closed-loop"
        },
        rate: cfg.load.rate,
        warmup_s: cfg.load.warmup.as_secs_f64(),
        elapsed_s: secs,
        requests: total,
        ok: s.ok,
        failed: s.failed,
        success_rate: if total == 0 {
            0.0
        } else {
            100.0 * s.ok as f64 / total as f64
        },
        qps: total as f64 / secs,
        http_requests: s.http_requests,
        bytes: s.bytes,
        mb_per_s: s.bytes as f64 / 1e6 / secs,
        latency_ms: latency,
        errors,
    }
}

pub fn json(s: &Summary) -> String {
    serde_json::to_string_pretty(s).expect("a summary is plain data")
}

/// 1234567 as "1,234,567".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && matches!((s.len() - i) % 3, 0) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn table(s: &Summary) -> String {
    let mode = match s.rate {
        Some(r) => format!("constant rate {r}/s (latency from the intended send time)"),
        None => "closed loop".into(),
    };
    let warm = if s.warmup_s > 0.0 {
        format!(" after {:.1} s warm-up", s.warmup_s)
    } else {
        String::new()
    };
    let l = &s.latency_ms;
    let mut out = format!(
        "berth bench {} against {}\n{} connections, {mode}, {:.2} s measured{warm}\n\n",
        s.scenario, s.registry, s.connections, s.elapsed_s
    );
    out += &format!(
        "{:>12} {:>9} {:>11} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  latency (ms)\n",
        "requests", "success", "QPS", "MB/s", "min", "p50", "p90", "p99", "p99.9", "max"
    );
    out += &format!(
        "{:>12} {:>8.2}% {:>11.1} {:>9.2} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n",
        thousands(s.requests),
        s.success_rate,
        s.qps,
        s.mb_per_s,
        l.min,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max
    );
    if s.http_requests != s.requests {
        out += &format!("({} HTTP requests)\n", thousands(s.http_requests));
    }
    if !s.errors.is_empty() {
        out += "\nerrors:\n";
        for e in &s.errors {
            let status = e.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
            out += &format!("{:>12}  {status:>3}  {}\n", thousands(e.count), e.error);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
