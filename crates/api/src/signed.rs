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
use signature::{bundle, simple, Mode, Policy, Verdict};

use crate::access::{self, Caller};
use registry::{ManifestBody, RegistryError};

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

/// Decisions by repository and digest, each with the write generation it
/// was taken at; nested so a lookup borrows the request's names instead of
/// copying them.
#[derive(Default)]
struct Decisions {
    by_repo: HashMap<RepoName, HashMap<Digest, (u64, Arc<Verdict>)>>,
    len: usize,
}

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
            decisions: Mutex::new(Decisions::default()),
        }
    }

    fn rule_for(&self, repo: &RepoName) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| registry::immutable::glob(&r.repositories, repo.as_str()))
    }

    fn cached(&self, repo: &RepoName, digest: &Digest, generation: u64) -> Option<Arc<Verdict>> {
        let d = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        d.by_repo
            .get(repo)?
            .get(digest)
            .filter(|(g, _)| *g == generation)
            .map(|(_, v)| v.clone())
    }

    fn keep(&self, repo: &RepoName, digest: &Digest, generation: u64, v: Arc<Verdict>) {
        let mut d = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if d.len >= MAX_DECISIONS {
            *d = Decisions::default();
        }
        let old = d
            .by_repo
            .entry(repo.clone())
            .or_default()
            .insert(digest.clone(), (generation, v));
        if old.is_none() {
            d.len += 1;
        }
    }
}

/// Tags that hold signatures themselves (`sha256-<hex>.sig`) or the
/// referrers fallback index (`sha256-<hex>`): a signer reads them before it
/// writes, so no policy applies to them.
fn is_signature_tag(t: &str) -> bool {
    simple::is_sig_tag(t) || bundle::is_referrers_tag(t)
}

/// Checks manifest `m` of `name`, pulled as `r`, against the policy that
/// covers the repository, if any.
pub(crate) async fn check(ctx: &Ctx<'_>, name: &RepoName, r: &Reference, m: &ManifestBody) -> Result<(), ApiError> {
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
    let (reg, digest) = (ctx.reg(), &m.digest);
    // Taken before reading, so a write while we read makes the decision
    // stale; `None` when nothing read from the store may be reused.
    let generation = reg.write_generation();
    let cached = generation.and_then(|g| policies.cached(name, digest, g));
    // The common case, a cached pass, asks nothing of access control.
    if cached.as_ref().is_some_and(|v| v.allowed) {
        return Ok(());
    }
    if rule.exempt_pushers
        && !matches!(ctx.caller, Caller::Open)
        && access::can_push(ctx.auth(), &ctx.caller, name).await
    {
        return Ok(());
    }
    let verdict = match cached {
        Some(v) => v,
        None => {
            let found = reg.signature_candidates(name, digest).await?;
            // A message signature is over the manifest's bytes: a GET has
            // them; a HEAD reads them.
            let bytes = match &m.bytes {
                Some(b) => b.clone(),
                None => reg.manifest_bytes(name, digest).await?,
            };
            let v = Arc::new(signature::decide(&rule.policy, digest, &bytes, &found));
            let enforce = rule.policy.mode == Mode::Enforce;
            policies.metrics.signature_decision(v.result, enforce);
            if !v.allowed {
                tracing::warn!(repository = %name, %digest, policy = %rule.policy.name, result = v.result,
                    mode = if enforce { "enforce" } else { "warn" }, "signature policy: {}", v.reason);
            }
            if let Some(g) = generation {
                policies.keep(name, digest, g, v.clone());
            }
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
    // The digest in the detail, as for every error about one: `berth
    // verify` checks a refused tag by it.
    Err(RegistryError::new(ErrorCode::Denied, verdict.reason.clone())
        .with_detail(digest.to_string())
        .into())
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
