//! `[[signature_policies]]` tables of the config file, checked into the
//! rules `api::signed` enforces.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;
use signature::{Mode, Policy, PublicKey};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignaturePolicyConfig {
    /// Repository glob, e.g. `prod/*`; the first policy that matches applies.
    pub repositories: String,
    /// PEM public key files (`cosign.pub`).
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    /// Distinct trusted keys that must have signed. [default: 1]
    pub threshold: Option<usize>,
    /// Digests served unsigned.
    #[serde(default)]
    pub allow_digests: Vec<String>,
    /// `enforce` (default) or `warn`.
    pub mode: Option<String>,
    /// Also check pulls by digest. [default: false]
    #[serde(default)]
    pub by_digest: bool,
    /// Callers with push permission pull unsigned images. [default: true]
    pub exempt_pushers: Option<bool>,
}

pub fn validate_all(policies: &[SignaturePolicyConfig]) -> Result<Vec<api::signed::Rule>, String> {
    policies
        .iter()
        .enumerate()
        .map(|(i, p)| validate(p).map_err(|e| format!("signature_policies[{i}] ({}): {e}", p.repositories)))
        .collect()
}

fn validate(p: &SignaturePolicyConfig) -> Result<api::signed::Rule, String> {
    if p.repositories.is_empty() {
        return Err("repositories is empty; give a pattern such as \"prod/*\"".into());
    }
    let mut keys = Vec::new();
    for path in &p.keys {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read key {}: {e}", path.display()))?;
        let key = PublicKey::from_pem(&pem).map_err(|e| format!("key {}: {e}", path.display()))?;
        if !keys.iter().any(|k: &PublicKey| k.fingerprint == key.fingerprint) {
            keys.push(key);
        }
    }
    let threshold = p.threshold.unwrap_or(1);
    if threshold == 0 {
        return Err("threshold must be at least 1".into());
    }
    // A policy with no keys is an allow-list alone: only its digests pass.
    let allow_list_only = keys.is_empty() && !p.allow_digests.is_empty();
    if threshold > keys.len() && !allow_list_only {
        return Err(format!(
            "threshold {threshold} needs at least {threshold} distinct keys, and {} given",
            keys.len()
        ));
    }
    let allow_digests = p
        .allow_digests
        .iter()
        .map(|d| d.parse().map_err(|e| format!("allow_digests: {d:?}: {e}")))
        .collect::<Result<BTreeSet<_>, String>>()?;
    let mode = match p.mode.as_deref().unwrap_or("enforce") {
        "enforce" => Mode::Enforce,
        "warn" => Mode::Warn,
        other => return Err(format!("mode {other:?}: give \"enforce\" or \"warn\"")),
    };
    Ok(api::signed::Rule {
        repositories: p.repositories.clone(),
        policy: Policy {
            name: p.repositories.clone(),
            keys,
            threshold,
            allow_digests,
            mode,
        },
        by_digest: p.by_digest,
        exempt_pushers: p.exempt_pushers.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> Result<Vec<api::signed::Rule>, String> {
        #[derive(Deserialize)]
        struct F {
            signature_policies: Vec<SignaturePolicyConfig>,
        }
        let f: F = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        validate_all(&f.signature_policies)
    }

    #[test]
    fn policies_are_checked_with_errors_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cosign.pub");
        std::fs::write(&key, signature::keys::testing::Signer::p256().public_pem()).unwrap();
        let k = key.display();
        let ok = cfg(&format!(
            "[[signature_policies]]\nrepositories = \"prod/*\"\nkeys = [\"{k}\", \"{k}\"]\n"
        ))
        .unwrap();
        assert_eq!(ok[0].policy.keys.len(), 1, "one key given twice counts once");
        assert!(ok[0].exempt_pushers && !ok[0].by_digest);
        let e = cfg(&format!(
            "[[signature_policies]]\nrepositories = \"prod/*\"\nkeys = [\"{k}\"]\nthreshold = 2\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("signature_policies[0] (prod/*): threshold 2 needs at least 2 distinct keys"),
            "{e}"
        );
        let e = cfg("[[signature_policies]]\nrepositories = \"p/*\"\nkeys = [\"/nonexistent.pub\"]\n").unwrap_err();
        assert!(e.contains("cannot read key /nonexistent.pub"), "{e}");
        let e = cfg(&format!(
            "[[signature_policies]]\nrepositories = \"p/*\"\nkeys = [\"{k}\"]\nmode = \"audit\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("give \"enforce\" or \"warn\""), "{e}");
        assert!(cfg("[[signature_policies]]\nrepositories = \"p/*\"\nkeyz = []\n").is_err());
    }
}
