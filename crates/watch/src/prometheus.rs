//! The canary analysis from Prometheus: the deployment's PromQL queries
//! (`[canary.prometheus]`, like an AnalysisTemplate) run as instant queries
//! through Prometheus's HTTP API, once for the canary and once for the
//! stable, with the placeholders filled in. The metrics are the service's
//! own (an instrumented app scraped by Prometheus, e.g. found through
//! `docker_sd_configs` by berth's container labels); berth only reads them.
//!
//! A query that returns nothing for `requests` or `latency` is no data
//! (inconclusive, never a pass); nothing for `errors` is no errors, since a
//! counter of errors that never happened does not exist yet. A query that
//! returns several series is an error in the query: it must aggregate.

use std::time::Duration;

use serde::Deserialize;

use crate::canary::Measure;
use crate::spec::{render_query, PrometheusAnalysis};

/// The values a query's placeholders take for one side.
#[derive(Debug, Clone)]
pub struct Track {
    /// `canary` or `stable`.
    pub track: &'static str,
    pub service: String,
    pub version: String,
    pub digest: String,
}

/// One side's numbers for the window of length `interval` ending now.
pub async fn measure(
    http: &reqwest::Client,
    p: &PrometheusAnalysis,
    t: &Track,
    interval: Duration,
    percentile: f64,
) -> Result<Measure, String> {
    let vars = [
        ("service", t.service.clone()),
        ("version", t.version.clone()),
        ("digest", t.digest.clone()),
        ("track", t.track.to_string()),
        ("interval", promql_duration(interval)),
        ("quantile", format!("{}", percentile / 100.0)),
    ];
    let run = |q: &str| {
        let q = render_query(q, &vars);
        async move {
            instant(http, p, &q)
                .await
                .map_err(|e| format!("{}: {e} (query: {q})", t.track))
        }
    };
    let requests = run(&p.requests).await?.unwrap_or(0.0);
    let errors = run(&p.errors).await?.unwrap_or(0.0);
    let latency = run(&p.latency).await?;
    Ok(Measure {
        requests,
        errors,
        latency,
    })
}

/// A Prometheus duration: whole seconds, else milliseconds.
pub fn promql_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<Sample>),
    Scalar((f64, String)),
    // Parsed only to say that they are not an instant result.
    Matrix(#[allow(dead_code)] serde::de::IgnoredAny),
    String(#[allow(dead_code)] serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Sample {
    value: (f64, String),
}

/// The value of an instant query now: `None` for no result or NaN.
async fn instant(http: &reqwest::Client, p: &PrometheusAnalysis, query: &str) -> Result<Option<f64>, String> {
    let url = format!("{}/api/v1/query", p.url);
    let r = http
        .post(&url)
        .form(&[("query", query)])
        .timeout(p.timeout)
        .send()
        .await
        .map_err(|e| format!("cannot reach Prometheus at {}: {e}", p.url))?;
    let status = r.status();
    let body = r
        .bytes()
        .await
        .map_err(|e| format!("reading Prometheus's answer: {e}"))?;
    let a: Answer = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "Prometheus answered HTTP {status} with what is not its API's JSON ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    if a.status != "success" {
        return Err(format!(
            "Prometheus refused the query: {}",
            a.error.unwrap_or_else(|| format!("HTTP {status}"))
        ));
    }
    let value = match a.data {
        Some(Data::Vector(v)) if v.is_empty() => return Ok(None),
        Some(Data::Vector(v)) if v.len() == 1 => v[0].value.1.clone(),
        Some(Data::Vector(v)) => {
            return Err(format!(
                "the query returns {} series; aggregate it to one (e.g. sum(...))",
                v.len()
            ))
        }
        Some(Data::Scalar((_, v))) => v,
        _ => return Err("the query must return an instant vector or a scalar".into()),
    };
    let v: f64 = value
        .parse()
        .map_err(|_| format!("Prometheus returned {value:?}, not a number"))?;
    Ok((!v.is_nan()).then_some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_for_promql() {
        assert_eq!(promql_duration(Duration::from_secs(60)), "60s");
        assert_eq!(promql_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn answers() {
        let parse = |s: &str| serde_json::from_str::<Answer>(s).unwrap();
        let a = parse(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"0.25"]}]}}"#,
        );
        assert!(matches!(a.data, Some(Data::Vector(v)) if v[0].value.1 == "0.25"));
        let a = parse(r#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"NaN"]}}"#);
        assert!(matches!(a.data, Some(Data::Scalar((_, v))) if v == "NaN"));
        let a = parse(r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#);
        assert_eq!(a.error.as_deref(), Some("parse error"));
    }

    #[tokio::test]
    async fn prometheus_unreachable_is_an_error_not_zero() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let p = PrometheusAnalysis {
            url: url.clone(),
            requests: "sum(up)".into(),
            errors: "sum(up)".into(),
            latency: "sum(up)".into(),
            timeout: Duration::from_secs(2),
        };
        let t = Track {
            track: "canary",
            service: "web".into(),
            version: "v2".into(),
            digest: "sha256:00".into(),
        };
        let e = measure(&reqwest::Client::new(), &p, &t, Duration::from_secs(30), 99.0)
            .await
            .unwrap_err();
        assert!(e.contains(&format!("cannot reach Prometheus at {url}")), "{e}");
        assert!(e.contains("(query: sum(up))"), "{e}");
    }
}
