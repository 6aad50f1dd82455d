//! Signature policy on the pull path: after access control and the
//! pull-through cache, before a manifest is sent. A manifest GET or HEAD by
//! tag (and by digest, where a policy says so) of a repository a policy
//! covers is served only if `signature::decide` allows it; otherwise `403
//! DENIED` with the reason, an audit record and a log line. In warn mode
//! the same is logged and counted, and the manifest served.
//!
//! Decisions are cached per (repository, digest), valid while the
//! registry's write generation is unchanged: any manifest, tag or referrer
//! written or deleted (a signature pushed, a `.sig` tag moved) starts over,
//! so a signature pushed after a refusal counts at the next pull.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use oci::{Digest, ErrorCode, Reference, RepoName};
use signature::{simple, Mode, Policy, Verdict};

use crate::access::{self, Caller};
use crate::error::ApiError;
use crate::Ctx;

/// One `[[signature_policies]]` entry.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Repository glob (`*`, `?`), e.g. `prod/*`.
    pub repositories: String,
    pub policy: Policy,
    /// Also check manifests pulled by digest (an index's children, a
    /// deployment pinned by digest). Off by default: signature artefacts
    /// are fetched by digest, and a digest pin is already a decision.
    pub by_digest: bool,
    /// A caller who may push to the repository may pull what it is about
    /// to sign (with access control on; never by User-Agent).
    pub exempt_pushers: bool,
}

/// A decision for (repository, digest), with the write generation it was
/// taken at.
type Decisions = HashMap<(RepoName, Digest), (u64, Arc<Verdict>)>;

/// Decisions kept; beyond it the cache starts afresh (bounded memory).
const MAX_DECISIONS: usize = 10_000;

pub struct Policies {
    rules: Vec<Rule>,
    metrics: Arc<observe::Metrics>,
    decisions: Mutex<Decisions>,
}

impl Policies {
    pub fn new(rules: Vec<Rule>, metrics: Arc<observe::Metrics>) -> Policies {
        Policies {
            rules,
            metrics,
            decisions: Mutex::new(HashMap::new()),
        }
    }

    fn rule_for(&self, repo: &RepoName) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| registry::immutable::glob(&r.repositories, repo.as_str()))
    }

    fn cached(&self, repo: &RepoName, digest: &Digest, generation: u64) -> Option<Arc<Verdict>> {
        let d = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        d.get(&(repo.clone(), digest.clone()))
            .filter(|(g, _)| *g == generation)
            .map(|(_, v)| v.clone())
    }

    fn keep(&self, repo: &RepoName, digest: &Digest, generation: u64, v: Arc<Verdict>) {
        let mut d = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if d.len() >= MAX_DECISIONS {
            d.clear();
        }
        d.insert((repo.clone(), digest.clone()), (generation, v));
    }
}

/// Tags that hold signatures themselves (`sha256-<hex>.sig`) or the
/// referrers fallback index (`sha256-<hex>`): a signer reads them before it
/// writes, so no policy applies to them.
fn is_signature_tag(t: &str) -> bool {
    simple::is_sig_tag(t)
        || t.split_once('-')
            .is_some_and(|(alg, hex)| alg == "sha256" && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Checks manifest `digest` of `name`, pulled as `r`, against the policy
/// that covers the repository, if any.
pub(crate) async fn check(ctx: &Ctx<'_>, name: &RepoName, r: &Reference, digest: &Digest) -> Result<(), ApiError> {
    let Some(policies) = ctx.app.signatures.as_deref() else {
        return Ok(());
    };
    let Some(rule) = policies.rule_for(name) else {
        return Ok(());
    };
    match r {
        Reference::Tag(t) if is_signature_tag(t.as_str()) => return Ok(()),
        Reference::Digest(_) if !rule.by_digest => return Ok(()),
        _ => {}
    }
    if rule.exempt_pushers
        && !matches!(ctx.caller, Caller::Open)
        && access::can_push(ctx.auth(), &ctx.caller, name).await
    {
        return Ok(());
    }
    let reg = ctx.reg();
    // Taken before reading, so a write while we read makes the decision stale.
    let generation = reg.write_generation();
    let verdict = match policies.cached(name, digest, generation) {
        Some(v) => v,
        None => {
            let found = reg.signature_candidates(name, digest).await?;
            let bytes = reg.manifest_bytes(name, digest).await?;
            let v = Arc::new(signature::decide(&rule.policy, digest, &bytes, &found));
            let enforce = rule.policy.mode == Mode::Enforce;
            policies.metrics.signature_decision(v.result, enforce);
            if !v.allowed {
                tracing::warn!(repository = %name, %digest, policy = %rule.policy.name, result = v.result,
                    mode = if enforce { "enforce" } else { "warn" }, "signature policy: {}", v.reason);
            }
            policies.keep(name, digest, generation, v.clone());
            v
        }
    };
    if verdict.allowed {
        return Ok(());
    }
    let resource = format!("{name}@{digest}");
    if rule.policy.mode == Mode::Warn {
        ctx.audit("pull", &resource, "warn", &verdict.reason);
        return Ok(());
    }
    ctx.audit("pull", &resource, "denied", &verdict.reason);
    Err(ApiError::new(ErrorCode::Denied, verdict.reason.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_tags_are_recognised() {
        let hex = "a".repeat(64);
        assert!(is_signature_tag(&format!("sha256-{hex}.sig")));
        assert!(is_signature_tag(&format!("sha256-{hex}")));
        assert!(!is_signature_tag("v1"));
        assert!(!is_signature_tag("sha256-abc"));
        assert!(!is_signature_tag("release-1.2"));
    }
}
