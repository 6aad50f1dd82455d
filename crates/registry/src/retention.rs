//! Retention rules: which tags of a project to delete so old images can be
//! collected. A rule applies to the tags of a project's repositories that
//! match its `pattern`; of those, each repository keeps its `keep_last`
//! most recently pushed, anything pushed within `pushed_within_days`, and
//! anything matching `protect`. Immutable tags are never deleted: they are
//! left out of the plan (and their delete would be refused anyway). The
//! rest lose their tag; their manifests, now untagged, go with GC's
//! untagged pruning (`--gc-untagged`).
//!
//! Push time is the time the tag's manifest was last put (a re-tag puts it
//! again). Pull time is the last GET or HEAD of the manifest by that tag
//! (`pulls`); `pulled-within-days` keeps tags pulled that recently.
//!
//! Syntax: `PROJECT:key=value:...` with keys `keep-last`, `pattern`
//! (default `*`), `pushed-within-days`, `pulled-within-days`, `protect`.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use metadata::GcSnapshot;
use oci::{Reference, RepoName, Tag};

use crate::immutable::glob;
use crate::{Registry, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    pub project: String,
    pub pattern: String,
    pub keep_last: Option<usize>,
    pub pushed_within_days: Option<u64>,
    pub pulled_within_days: Option<u64>,
    pub protect: Option<String>,
}

impl FromStr for RetentionRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!("retention rule {s:?}: {why}; write e.g. team:keep-last=10:pattern=v*:pushed-within-days=30:protect=release-*")
        };
        let mut parts = s.split(':');
        let project = parts.next().unwrap_or("").trim();
        if project.is_empty() {
            return Err(bad("it names no project"));
        }
        if project.contains('/') {
            return Err(bad(&format!(
                "{project:?} is a repository, not a project (the first part of a repository name)"
            )));
        }
        let mut rule = RetentionRule {
            project: project.to_string(),
            pattern: "*".into(),
            keep_last: None,
            pushed_within_days: None,
            pulled_within_days: None,
            protect: None,
        };
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("{part:?} is not key=value")))?;
            match k.trim() {
                "keep-last" => rule.keep_last = Some(v.trim().parse().map_err(|_| bad("keep-last is not a number"))?),
                "pushed-within-days" => {
                    rule.pushed_within_days = Some(
                        v.trim()
                            .parse()
                            .map_err(|_| bad("pushed-within-days is not a number"))?,
                    )
                }
                "pulled-within-days" => {
                    rule.pulled_within_days = Some(
                        v.trim()
                            .parse()
                            .map_err(|_| bad("pulled-within-days is not a number"))?,
                    )
                }
                "pattern" => rule.pattern = v.trim().to_string(),
                "protect" => rule.protect = Some(v.trim().to_string()),
                other => return Err(bad(&format!("unknown key {other:?}"))),
            }
        }
        if rule.keep_last.is_none() && rule.pushed_within_days.is_none() && rule.pulled_within_days.is_none() {
            return Err(bad(
                "it keeps nothing: give keep-last, pushed-within-days or pulled-within-days",
            ));
        }
        Ok(rule)
    }
}

/// The (repository, tag) pairs the rules delete, given the snapshot and the
/// time `now` (seconds since the epoch). Pure, so a dry run shows exactly
/// what a real run would do.
pub fn plan(snap: &GcSnapshot, rules: &[RetentionRule], now: u64) -> Vec<(String, String)> {
    let created: HashMap<(&str, &str), u64> = snap
        .manifests
        .iter()
        .map(|m| ((m.repo.as_str(), m.digest.as_str()), m.record.created))
        .collect();
    let pulled: HashMap<(&str, &str), u64> = snap
        .pulls
        .iter()
        .map(|(r, t, time)| ((r.as_str(), t.as_str()), *time))
        .collect();
    let mut out = Vec::new();
    for rule in rules {
        // Per repository: (push time, tag) of the tags the rule governs.
        let mut per_repo: BTreeMap<&str, Vec<(u64, &str)>> = BTreeMap::new();
        for (repo, tag, d) in &snap.tags {
            let project = repo.split('/').next().unwrap_or(repo);
            if project != rule.project || !glob(&rule.pattern, tag) {
                continue;
            }
            let pushed = created.get(&(repo.as_str(), d.as_str())).copied().unwrap_or(0);
            per_repo.entry(repo).or_default().push((pushed, tag));
        }
        for (repo, mut tags) in per_repo {
            // Newest first; ties broken by name so the plan is deterministic.
            tags.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
            for (i, (pushed, tag)) in tags.iter().enumerate() {
                let recent = rule
                    .pushed_within_days
                    .is_some_and(|d| pushed.saturating_add(d * 86_400) >= now);
                let pulled_recently = rule.pulled_within_days.is_some_and(|d| {
                    pulled
                        .get(&(repo, *tag))
                        .is_some_and(|p| p.saturating_add(d * 86_400) >= now)
                });
                let within_last = rule.keep_last.is_some_and(|n| i < n);
                let protected = rule.protect.as_deref().is_some_and(|p| glob(p, tag));
                if !(recent || pulled_recently || within_last || protected) {
                    out.push((repo.to_string(), tag.to_string()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

impl Registry {
    /// Applies the rules (or, with `dry_run`, only plans). Returns the tags
    /// deleted (or to delete). Tags this registry's `--immutable-tags` rules
    /// protect are left out of the plan, so a dry run lists exactly what a
    /// real run deletes.
    pub async fn retention(&self, rules: &[RetentionRule], dry_run: bool) -> Result<Vec<(String, String)>> {
        // Pulls noted in memory count too.
        self.flush_pulls().await?;
        let snap = self.meta.gc_snapshot().await?;
        let mut planned = plan(&snap, rules, crate::now());
        planned.retain(|(repo, tag)| {
            let immutable = repo
                .parse::<RepoName>()
                .is_ok_and(|r| crate::immutable::rule_for(&self.config.immutable_tags, &r, tag).is_some());
            if immutable {
                tracing::debug!(%repo, %tag, "retention keeps an immutable tag");
            }
            !immutable
        });
        if dry_run {
            return Ok(planned);
        }
        let mut deleted = Vec::new();
        for (repo, tag) in planned {
            let (Ok(r), Ok(t)) = (repo.parse::<RepoName>(), tag.parse::<Tag>()) else {
                continue;
            };
            match self.manifest_delete(&r, &Reference::Tag(t)).await {
                Ok(()) => {
                    tracing::info!(%repo, %tag, "retention deleted a tag");
                    deleted.push((repo, tag))
                }
                Err(e) => tracing::info!(%repo, %tag, reason = %e.message, "retention kept a tag"),
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use oci::Reference;

    use super::*;
    use crate::gc::tests::{env_with, push, repo, tag};
    use crate::RegistryConfig;

    fn rule(s: &str) -> RetentionRule {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_or_say_what_is_wrong() {
        let r = rule("team:keep-last=2:pattern=v*:protect=v1*");
        assert_eq!(
            (r.keep_last, r.pattern.as_str(), r.protect.as_deref()),
            (Some(2), "v*", Some("v1*"))
        );
        for bad in [
            "",
            "team",
            "team:keep-last=x",
            "team:color=blue",
            "team:keep-last",
            "team/app:keep-last=1",
        ] {
            assert!(bad.parse::<RetentionRule>().is_err(), "{bad}");
        }
        assert!("team:pattern=v*"
            .parse::<RetentionRule>()
            .unwrap_err()
            .contains("keeps nothing"));
    }

    #[tokio::test]
    async fn keeps_the_last_n_protected_and_immutable_and_deletes_the_rest() {
        let e = env_with(RegistryConfig {
            immutable_tags: vec!["team=v0".parse().unwrap()],
            ..RegistryConfig::default()
        })
        .await;
        let (a, b) = (repo("team/a"), repo("other/a"));
        for (i, t) in ["v0", "v1", "v2", "v3", "keep-me"].iter().enumerate() {
            push(&e.reg, &a, format!("cfg{i}").as_bytes(), &[b"l"], Some(t)).await;
        }
        push(&e.reg, &a, b"cfg-dev", &[b"l"], Some("dev")).await;
        push(&e.reg, &b, b"cfg-o", &[b"l"], Some("v1")).await;
        // Pushed within a second or two, so push order is not reliable
        // here (`keep_last_follows_push_time` checks it): keep none by count.
        let rules = vec![rule("team:keep-last=0:pattern=v*:protect=v3")];
        let planned = e.reg.retention(&rules, true).await.unwrap();
        let want: Vec<(String, String)> = ["v1", "v2"]
            .iter()
            .map(|t| ("team/a".to_string(), t.to_string()))
            .collect();
        assert_eq!(
            planned, want,
            "v0 is immutable, v3 is protected, dev and keep-me do not match, other/ is another project"
        );
        let deleted = e.reg.retention(&rules, false).await.unwrap();
        assert_eq!(deleted, want, "the dry run listed exactly what the real run deletes");
        for (t, present) in [
            ("v0", true),
            ("v1", false),
            ("v2", false),
            ("v3", true),
            ("dev", true),
            ("keep-me", true),
        ] {
            let got = e.reg.manifest_get(&a, &Reference::Tag(tag(t)), false).await.is_ok();
            assert_eq!(got, present, "{t}");
        }
        assert!(e.reg.manifest_get(&b, &Reference::Tag(tag("v1")), false).await.is_ok());
        // Recently pushed tags are kept by pushed-within-days.
        let recent = vec![rule("team:keep-last=0:pushed-within-days=1")];
        assert!(e.reg.retention(&recent, true).await.unwrap().is_empty());
        // Recently pulled tags are kept by pulled-within-days; pulls are
        // noted in memory and flushed by retention itself.
        // Every tag left was just fetched by the loop above, but `np`.
        push(&e.reg, &a, b"cfg-np", &[b"l"], Some("np")).await;
        let pulled = vec![rule("team:keep-last=0:pulled-within-days=1")];
        let planned = e.reg.retention(&pulled, true).await.unwrap();
        assert_eq!(planned, vec![("team/a".to_string(), "np".to_string())]);
        e.reg.manifest_get(&a, &Reference::Tag(tag("np")), false).await.unwrap();
        assert!(e.reg.retention(&pulled, true).await.unwrap().is_empty());
    }

    #[test]
    fn keep_last_follows_push_time() {
        use metadata::{GcManifest, ManifestRecord};
        let m = |repo: &str, n: u8, created: u64| GcManifest {
            repo: repo.into(),
            digest: oci::Digest::sha256(&[n]),
            record: ManifestRecord {
                media_type: oci::media::OCI_MANIFEST.into(),
                size: 1,
                artifact_type: None,
                subject: None,
                annotations: None,
                blobs: vec![],
                children: vec![],
                created,
                cached_from: None,
            },
        };
        let snap = GcSnapshot {
            manifests: vec![m("t/a", 1, 100), m("t/a", 2, 300), m("t/a", 3, 200)],
            tags: vec![
                ("t/a".into(), "old".into(), oci::Digest::sha256(&[1])),
                ("t/a".into(), "new".into(), oci::Digest::sha256(&[2])),
                ("t/a".into(), "mid".into(), oci::Digest::sha256(&[3])),
            ],
            ..GcSnapshot::default()
        };
        let del = |r: &str, now| plan(&snap, &[rule(r)], now);
        assert_eq!(del("t:keep-last=2", 1000), vec![("t/a".to_string(), "old".to_string())]);
        assert_eq!(del("t:keep-last=1", 1000).len(), 2);
        // 300 s ago is within a day; with now far in the future, nothing is.
        assert!(del("t:pushed-within-days=1", 1000).is_empty());
        assert_eq!(del("t:pushed-within-days=1", 300 + 86_400 + 1).len(), 3);
        // A pull keeps a tag its age would not.
        let mut pulled = snap.clone();
        pulled.pulls = vec![("t/a".into(), "old".into(), 200_000)];
        let kept = plan(&pulled, &[rule("t:pulled-within-days=1")], 200_000 + 3600);
        assert_eq!(
            kept,
            vec![
                ("t/a".to_string(), "mid".to_string()),
                ("t/a".to_string(), "new".to_string())
            ]
        );
    }
}
