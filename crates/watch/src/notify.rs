//! Telling people: alerts to Alertmanager's v2 API with the priority
//! labels of the shipped rules (deploy/prometheus/berth-rules.yml), and
//! CloudEvents to webhooks. A notification that cannot be delivered is
//! logged and never stops a rollout or a rollback.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::spec::Notify;
use crate::store::{now_ms, time_of};

/// The guide's priorities: P0 within 3 min, P1 within 15 min, P2 within 1 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    P0,
    P1,
    P2,
}

impl Priority {
    /// As the shipped rules pair them.
    fn severity(self) -> &'static str {
        match self {
            Priority::P0 => "critical",
            Priority::P1 => "warning",
            Priority::P2 => "info",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Priority::P0 => "P0",
            Priority::P1 => "P1",
            Priority::P2 => "P2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Alert {
    pub name: &'static str,
    pub service: String,
    pub priority: Priority,
    pub summary: String,
    /// Extra annotations (cause, evidence, root_cause, fix, ...).
    pub details: BTreeMap<String, String>,
}

/// Posts `alert` to Alertmanager and to the webhooks of `to`.
pub async fn send(http: &reqwest::Client, to: &Notify, alert: &Alert) {
    let mut labels: BTreeMap<String, String> = to.labels.clone();
    labels.insert("alertname".into(), alert.name.into());
    labels.insert("service".into(), alert.service.clone());
    labels.insert("severity".into(), alert.priority.severity().into());
    labels.insert("priority".into(), alert.priority.label().into());
    labels.insert("area".into(), "deploys".into());
    labels.insert("scope".into(), "node".into());
    labels.entry("instance".into()).or_insert_with(hostname);
    labels.entry("region".into()).or_insert_with(|| "default".into());
    let mut annotations = alert.details.clone();
    annotations.insert("summary".into(), alert.summary.clone());
    let now = now_ms();
    if let Some(am) = &to.alertmanager {
        let body = json!([{
            "labels": labels,
            "annotations": annotations,
            "startsAt": time_of(now),
            "generatorURL": "berth://watch",
        }]);
        let url = format!("{am}/api/v2/alerts");
        post(http, &url, "application/json", body.to_string()).await;
    }
    for hook in &to.webhooks {
        let event = json!({
            "specversion": "1.0",
            "id": uuid::Uuid::new_v4().to_string(),
            "source": "berth://watch",
            "type": format!("io.berth.watch.{}", alert.name),
            "time": time_of(now),
            "subject": alert.service,
            "datacontenttype": "application/json",
            "data": {"labels": labels, "annotations": annotations},
        });
        post(
            http,
            hook,
            "application/cloudevents+json; charset=utf-8",
            event.to_string(),
        )
        .await;
    }
}

async fn post(http: &reqwest::Client, url: &str, content_type: &str, body: String) {
    let sent = http
        .post(url)
        .header("content-type", content_type)
        .timeout(Duration::from_secs(5))
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(%url, status = %r.status(), "notification refused"),
        Err(e) => tracing::warn!(%url, error = %e, "notification not delivered"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
