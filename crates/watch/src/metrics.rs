//! `/metrics` of `berth watch run`: read from the history at each scrape,
//! so deployments made by other berth processes (`berth watch deploy`)
//! count too. Names match the shipped rules
//! (deploy/prometheus/berth-rules.yml).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::store::{Outcome, Store, DURATION_BUCKETS};

#[derive(Debug)]
struct FromHistory {
    store: Store,
    /// Labels on every series (e.g. region, instance).
    labels: Vec<(String, String)>,
}

/// A registry exporting the guard's families from `store`.
pub fn registry(store: Store, labels: Vec<(String, String)>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(FromHistory { store, labels }));
    r
}

impl Collector for FromHistory {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let services = match self.store.services() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the history");
                return Ok(());
            }
        };
        let labels = |service: &str, extra: Option<(&str, &str)>| {
            let mut l = self.labels.clone();
            l.push(("service".into(), service.into()));
            if let Some((k, v)) = extra {
                l.push((k.into(), v.into()));
            }
            l
        };
        let mut fam = encoder.encode_descriptor(
            "berth_watch_deploys",
            "Finished deployments by result (success, failure, timeout, rolled_back)",
            None,
            MetricType::Counter,
        )?;
        for (name, st) in &services {
            for o in [
                Outcome::Success,
                Outcome::Failure,
                Outcome::Timeout,
                Outcome::RolledBack,
            ] {
                let n = st.counts.deploys.get(o.as_str()).copied().unwrap_or(0);
                ConstCounter::new(n).encode(fam.encode_family(&labels(name, Some(("result", o.as_str()))))?)?;
            }
        }
        let mut fam = encoder.encode_descriptor(
            "berth_watch_deploy_duration_seconds",
            "Time from the start of a deployment to its result",
            None,
            MetricType::Histogram,
        )?;
        for (name, st) in &services {
            let c = &st.counts;
            let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                .iter()
                .chain(std::iter::once(&f64::INFINITY))
                .enumerate()
                .map(|(i, b)| (*b, c.duration_buckets.get(i).copied().unwrap_or(0)))
                .collect();
            buckets.truncate(DURATION_BUCKETS.len() + 1);
            let count = buckets.iter().map(|b| b.1).sum();
            fam.encode_family(&labels(name, None))?.encode_histogram::<NoLabelSet>(
                c.duration_sum,
                count,
                &buckets,
                None,
            )?;
        }
        let mut fam = encoder.encode_descriptor(
            "berth_watch_rollbacks",
            "Rollbacks done (after a failed deployment, by the guard, or by hand)",
            None,
            MetricType::Counter,
        )?;
        for (name, st) in &services {
            ConstCounter::new(st.counts.rollbacks).encode(fam.encode_family(&labels(name, None))?)?;
        }
        let mut fam = encoder.encode_descriptor(
            "berth_watch_pauses",
            "Times deployments of the service were paused",
            None,
            MetricType::Counter,
        )?;
        for (name, st) in &services {
            ConstCounter::new(st.counts.pauses).encode(fam.encode_family(&labels(name, None))?)?;
        }
        let mut fam = encoder.encode_descriptor(
            "berth_watch_canary_analyses",
            "Canary analysis windows by result (pass, fail, inconclusive)",
            None,
            MetricType::Counter,
        )?;
        for (name, st) in &services {
            for r in ["pass", "fail", "inconclusive"] {
                let n = st.counts.analyses.get(r).copied().unwrap_or(0);
                ConstCounter::new(n).encode(fam.encode_family(&labels(name, Some(("result", r))))?)?;
            }
        }
        let mut fam = encoder.encode_descriptor(
            "berth_watch_paused",
            "1 while deployments of the service are paused",
            None,
            MetricType::Gauge,
        )?;
        for (name, st) in &services {
            ConstGauge::new(i64::from(st.paused.is_some())).encode(fam.encode_family(&labels(name, None))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Effect, Kind, Release};

    #[test]
    fn families_from_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("h.redb"));
        let d = store.begin("web", Kind::Deploy, "r/web:v1", "v1", 3).unwrap();
        let r = Release {
            image: "r/web:v1".into(),
            digest: "sha256:1".into(),
            version: "v1".into(),
            spec_file: String::new(),
            spec_toml: String::new(),
        };
        store
            .finish("web", d.id, Outcome::Success, None, Effect::Passed(r))
            .unwrap();
        let d = store.begin("web", Kind::Deploy, "r/web:v2", "v2", 3).unwrap();
        // Not healthy within its start timeout, and rolled back: a
        // `timeout` that counts as a rollback.
        let rolled_back = Effect::RolledBack {
            from: "sha256:2".into(),
        };
        store.finish("web", d.id, Outcome::Timeout, None, rolled_back).unwrap();
        store.count_analysis("web", "inconclusive").unwrap();
        store.count_analysis("web", "inconclusive").unwrap();
        store.pause("web", "by hand").unwrap();
        let reg = registry(store, vec![("region".into(), "eu".into())]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            r#"berth_watch_deploys_total{region="eu",service="web",result="success"} 1"#,
            r#"berth_watch_deploys_total{region="eu",service="web",result="timeout"} 1"#,
            r#"berth_watch_deploys_total{region="eu",service="web",result="rolled_back"} 0"#,
            r#"berth_watch_rollbacks_total{region="eu",service="web"} 1"#,
            r#"berth_watch_deploy_duration_seconds_count{region="eu",service="web"} 2"#,
            r#"berth_watch_deploy_duration_seconds_bucket{le="+Inf",region="eu",service="web"} 2"#,
            r#"berth_watch_paused{region="eu",service="web"} 1"#,
            r#"berth_watch_pauses_total{region="eu",service="web"} 1"#,
            r#"berth_watch_canary_analyses_total{region="eu",service="web",result="inconclusive"} 2"#,
            r#"berth_watch_canary_analyses_total{region="eu",service="web",result="pass"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
