//! Credentials from the command line, a file, or docker's `config.json`.

use std::path::Path;

use base64::Engine;

#[derive(Clone)]
pub struct Creds {
    pub user: String,
    pub pass: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({}:<redacted>)", self.user)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("credentials must be USER:PASS")]
    Format,
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not docker's config.json: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("{path} has no auths entry for {host}: run `docker login {host}`")]
    NoEntry { path: String, host: String },
    #[error("the auth of {host} in {path} is not base64 of USER:PASS")]
    BadAuth { path: String, host: String },
}

pub fn parse_creds(s: &str) -> Result<Creds, CredsError> {
    let (user, pass) = s
        .trim_end_matches(['\n', '\r'])
        .split_once(':')
        .ok_or(CredsError::Format)?;
    if user.is_empty() {
        return Err(CredsError::Format);
    }
    Ok(Creds {
        user: user.to_string(),
        pass: pass.to_string(),
    })
}

/// The entry for `host` (`host:port`) in `DIR/config.json`'s `auths`.
pub fn docker_config(dir: &Path, host: &str) -> Result<Creds, CredsError> {
    let path = dir.join("config.json");
    let shown = path.display().to_string();
    let text = std::fs::read(&path).map_err(|source| CredsError::Read {
        path: shown.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|source| CredsError::Json {
        path: shown.clone(),
        source,
    })?;
    let auths = v.get("auths").and_then(|a| a.as_object());
    let entry = auths.and_then(|a| {
        [host.to_string(), format!("https://{host}"), format!("http://{host}")]
            .iter()
            .find_map(|k| a.get(k))
            .or_else(|| a.get(&format!("https://{host}/v2/")))
    });
    let entry = entry.ok_or_else(|| CredsError::NoEntry {
        path: shown.clone(),
        host: host.to_string(),
    })?;
    let bad = || CredsError::BadAuth {
        path: shown.clone(),
        host: host.to_string(),
    };
    let auth = entry.get("auth").and_then(|a| a.as_str()).ok_or_else(bad)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .map_err(|_| bad())?;
    parse_creds(&String::from_utf8(raw).map_err(|_| bad())?).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json() {
        let d = tempfile_dir();
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            d.join("config.json"),
            format!(r#"{{"auths":{{"h:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let c = docker_config(&d, "h:5000").unwrap();
        assert_eq!((c.user.as_str(), c.pass.as_str()), ("alice", "s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(matches!(docker_config(&d, "other:1"), Err(CredsError::NoEntry { .. })));
        assert!(parse_creds("nocolon").is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("berth-diagnose-creds-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
