//! Tag immutability: rules naming tags that, once they exist, can be
//! neither moved to another manifest nor deleted (release tags a deployment
//! pins). A rule is a pattern (`v*`, `release-*`; `*` matches any run of
//! characters, `?` one) for every project, or `PROJECT=PATTERN` for one.

use std::str::FromStr;

use oci::{ErrorCode, RepoName, Tag};

use crate::RegistryError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    /// `None`: every project.
    pub project: Option<String>,
    pub pattern: String,
}

impl FromStr for TagRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (project, pattern) = match s.split_once('=') {
            Some((p, pat)) => (Some(p.trim().to_string()), pat.trim()),
            None => (None, s.trim()),
        };
        if pattern.is_empty() || project.as_deref() == Some("") {
            return Err(format!(
                "immutable tag rule {s:?} is empty; write a pattern such as v* or PROJECT=release-*"
            ));
        }
        Ok(TagRule {
            project,
            pattern: pattern.to_string(),
        })
    }
}

impl std::fmt::Display for TagRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.project {
            Some(p) => write!(f, "{p}={}", self.pattern),
            None => f.write_str(&self.pattern),
        }
    }
}

/// Glob match with `*` (any run, possibly empty) and `?` (one character).
/// Iterative with one backtrack point, so it is linear-ish and cannot blow
/// up on patterns with many stars. On bytes, without allocating: it runs
/// on the pull path (signature policies), and what it matches, repository
/// names and tags, is ASCII by the spec's grammar.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// The first rule that makes `tag` of `repo` immutable.
pub fn rule_for<'a>(rules: &'a [TagRule], repo: &RepoName, tag: &str) -> Option<&'a TagRule> {
    rules
        .iter()
        .find(|r| r.project.as_deref().is_none_or(|p| p == repo.project()) && glob(&r.pattern, tag))
}

fn advice(what: &str) -> &'static str {
    if what.starts_with("moved") {
        "push under a new tag"
    } else {
        "an administrator must remove the rule (--immutable-tags) first"
    }
}

pub(crate) fn denied(repo: &RepoName, tag: &Tag, rule: &TagRule, what: &str) -> RegistryError {
    RegistryError::new(
        ErrorCode::Denied,
        format!(
            "tag {repo}:{tag} is immutable (rule {rule}): it cannot be {what}; {}",
            advice(what)
        ),
    )
    .with_detail(tag.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn patterns() {
        assert!(glob("v*", "v1.2.3"));
        assert!(glob("v*", "v"));
        assert!(!glob("v*", "latest"));
        assert!(glob("release-*-final", "release-2024-final"));
        assert!(!glob("release-*-final", "release-2024"));
        assert!(glob("v?", "v1") && !glob("v?", "v10"));
        assert!(glob("*", "anything"));
        assert!(glob("a*b*c", "aXXbYYc") && !glob("a*b*c", "aXXcYYb"));
    }

    #[test]
    fn rules_apply_to_their_project() {
        let rules: Vec<TagRule> = ["team=release-*", "v*"].iter().map(|r| r.parse().unwrap()).collect();
        let (team, other): (RepoName, RepoName) = ("team/app".parse().unwrap(), "other/app".parse().unwrap());
        assert_eq!(
            rule_for(&rules, &team, "release-1").unwrap().to_string(),
            "team=release-*"
        );
        assert!(rule_for(&rules, &other, "release-1").is_none());
        assert!(rule_for(&rules, &other, "v2").is_some());
        assert!("team=".parse::<TagRule>().is_err());
        assert!("=v*".parse::<TagRule>().is_err());
    }

    mod registry {
        use oci::{Digest, ErrorCode, Reference};

        use crate::gc::tests::{env_with, manifest, push, repo, tag, upload};
        use crate::RegistryConfig;

        fn config() -> RegistryConfig {
            RegistryConfig {
                immutable_tags: vec!["v*".parse().unwrap()],
                ..RegistryConfig::default()
            }
        }

        #[tokio::test]
        async fn immutable_tags_cannot_move_or_go() {
            let e = env_with(config()).await;
            let r = repo("p/a");
            let a = push(&e.reg, &r, b"cfg-a", &[b"l"], Some("v1")).await;
            // The same manifest again is fine; so is moving a mutable tag.
            assert_eq!(push(&e.reg, &r, b"cfg-a", &[b"l"], Some("v1")).await, a);
            push(&e.reg, &r, b"cfg-a", &[b"l"], Some("latest")).await;
            push(&e.reg, &r, b"cfg-b", &[b"l"], Some("latest")).await;

            upload(&e.reg, &r, b"cfg-c").await;
            let body = manifest(b"cfg-c", &[b"l"]);
            let c = Digest::sha256(&body);
            let err = e
                .reg
                .manifest_put(
                    &r,
                    &Reference::Tag(tag("v1")),
                    Some(oci::media::OCI_MANIFEST),
                    body,
                    vec![],
                )
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::Denied);
            assert_eq!(
                err.message,
                "tag p/a:v1 is immutable (rule v*): it cannot be moved to another manifest; push under a new tag"
            );
            // Nothing partial: the refused manifest is not there, v1 is unchanged.
            assert!(e.reg.manifest_get(&r, &Reference::Digest(c), false).await.is_err());
            let v1 = e.reg.manifest_get(&r, &Reference::Tag(tag("v1")), false).await.unwrap();
            assert_eq!(v1.digest, a);

            let err = e.reg.manifest_delete(&r, &Reference::Tag(tag("v1"))).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::Denied);
            assert!(err.message.contains("cannot be deleted"), "{}", err.message);
            let err = e
                .reg
                .manifest_delete(&r, &Reference::Digest(a.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::Denied);
            assert!(err.message.contains("deleted with its manifest"), "{}", err.message);
            assert!(e.reg.manifest_delete(&r, &Reference::Tag(tag("latest"))).await.is_ok());
            // Other projects' rules do not apply here, and a missing tag is unknown.
            let err = e.reg.manifest_delete(&r, &Reference::Tag(tag("v9"))).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::ManifestUnknown);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn two_pushes_racing_for_a_new_immutable_tag_one_wins() {
            let e = env_with(config()).await;
            let r = repo("p/a");
            for cfg in [b"cfg-x", b"cfg-y"] {
                upload(&e.reg, &r, cfg).await;
            }
            upload(&e.reg, &r, b"l").await;
            let put = |cfg: &'static [u8]| {
                let (reg, r) = (e.reg.clone(), r.clone());
                tokio::spawn(async move {
                    let body = manifest(cfg, &[b"l"]);
                    reg.manifest_put(
                        &r,
                        &Reference::Tag(tag("v2")),
                        Some(oci::media::OCI_MANIFEST),
                        body,
                        vec![],
                    )
                    .await
                })
            };
            let (x, y) = (put(b"cfg-x"), put(b"cfg-y"));
            let (x, y) = (x.await.unwrap(), y.await.unwrap());
            assert!(x.is_ok() != y.is_ok(), "exactly one wins: {x:?} {y:?}");
            let winner = x.or(y).unwrap().digest;
            let v2 = e.reg.manifest_get(&r, &Reference::Tag(tag("v2")), false).await.unwrap();
            assert_eq!(v2.digest, winner);
        }
    }

    proptest! {
        /// A pattern with no wildcards matches exactly itself; a prefix
        /// followed by `*` matches exactly the strings with that prefix.
        #[test]
        fn glob_agrees_with_literal_and_prefix(a in "[a-z0-9.-]{0,8}", b in "[a-z0-9.-]{0,8}") {
            prop_assert_eq!(glob(&a, &b), a == b);
            prop_assert_eq!(glob(&format!("{a}*"), &b), b.starts_with(&a));
        }
    }
}
