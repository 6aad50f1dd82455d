//! The audit log: one JSON object per line, appended to a file, for every
//! push, pull, delete, failed login and permission change. Writing is
//! handed to a background task so a request never waits on the file.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC, with milliseconds.
    pub time: String,
    /// Who: a user, `robot$name`, or `anonymous`.
    pub actor: String,
    /// What: `push`, `pull`, `delete`, `login_failed`, `user_create`, ...
    pub action: String,
    /// On what: a repository reference, user, project or robot name.
    pub resource: String,
    /// From where: the client address.
    pub client: String,
    /// `ok`, `denied` or `failed`.
    pub result: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A handle to the log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::UnboundedSender<AuditRecord>>,
    path: Option<PathBuf>,
}

impl AuditLog {
    /// Appends to `path`. Must be called within a tokio runtime.
    pub fn open(path: PathBuf) -> std::io::Result<AuditLog> {
        let mut file = open_append(&path)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<AuditRecord>();
        let log_path = path.clone();
        tokio::task::spawn_blocking(move || {
            while let Some(rec) = rx.blocking_recv() {
                let mut batch = vec![rec];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut buf = Vec::new();
                for r in &batch {
                    if serde_json::to_writer(&mut buf, r).is_ok() {
                        buf.push(b'\n');
                    }
                }
                if let Err(e) = file.write_all(&buf).and_then(|_| file.flush()) {
                    tracing::error!(error = %e, path = %path.display(), "cannot write the audit log");
                }
            }
        });
        Ok(AuditLog {
            tx: Some(tx),
            path: Some(log_path),
        })
    }

    /// A log that records nothing (auth disabled, or tests).
    pub fn disabled() -> AuditLog {
        AuditLog { tx: None, path: None }
    }

    /// The file, for queries.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn record(&self, actor: &str, action: &str, resource: &str, client: &str, result: &str, detail: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(AuditRecord {
                time: observe::time::rfc3339(std::time::SystemTime::now()),
                actor: actor.into(),
                action: action.into(),
                resource: resource.into(),
                client: client.into(),
                result: result.into(),
                detail: detail.into(),
            });
        }
    }
}

/// Opens the log for appending, creating it readable by its owner only
/// (whatever the umask): it names every account and client address.
pub fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

/// Query filters for `berth audit`; empty fields match everything.
#[derive(Debug, Default, Clone)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Matches resources starting with this (a repository or project).
    pub resource: Option<String>,
    pub result: Option<String>,
    /// RFC 3339; records at or after it.
    pub since: Option<String>,
    /// Only the last N matching records.
    pub last: Option<usize>,
}

impl AuditQuery {
    fn matches(&self, r: &AuditRecord) -> bool {
        self.actor.as_ref().is_none_or(|a| &r.actor == a)
            && self.action.as_ref().is_none_or(|a| &r.action == a)
            && self.resource.as_ref().is_none_or(|p| r.resource.starts_with(p.as_str()))
            && self.result.as_ref().is_none_or(|x| &r.result == x)
            // RFC 3339 UTC strings of one format sort as time does.
            && self.since.as_ref().is_none_or(|s| r.time.as_str() >= s.as_str())
    }
}

/// Reads the records of `path` that match `q`, oldest first.
pub fn query(path: &Path, q: &AuditQuery) -> std::io::Result<Vec<AuditRecord>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if let Ok(rec) = serde_json::from_str::<AuditRecord>(&line) {
            if q.matches(&rec) {
                out.push(rec);
            }
        }
    }
    if let Some(n) = q.last {
        let skip = out.len().saturating_sub(n);
        out.drain(..skip);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_and_queries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(path.clone()).unwrap();
        log.record("alice", "push", "team/app:v1", "127.0.0.1", "ok", "");
        log.record("bob", "pull", "team/app:v1", "127.0.0.1", "denied", "not a member");
        log.record("alice", "delete", "other/x@sha256:00", "127.0.0.1", "ok", "");
        drop(log);
        let mut all = Vec::new();
        for _ in 0..100 {
            all = query(&path, &AuditQuery::default()).unwrap();
            if all.len() == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(all.len(), 3);
        let q = AuditQuery {
            actor: Some("alice".into()),
            ..Default::default()
        };
        assert_eq!(query(&path, &q).unwrap().len(), 2);
        let q = AuditQuery {
            resource: Some("team/".into()),
            result: Some("denied".into()),
            ..Default::default()
        };
        let denied = query(&path, &q).unwrap();
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].detail, "not a member");
        let q = AuditQuery {
            last: Some(1),
            ..Default::default()
        };
        assert_eq!(query(&path, &q).unwrap()[0].action, "delete");
    }
}
