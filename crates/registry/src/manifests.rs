//! Manifest push, pull and delete.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use metadata::{Conflict, ManifestHead, ManifestRecord, MetaError, Missing, NewManifest};
use oci::{Digest, ErrorCode, Manifest, Reference, RepoName, Tag};

use crate::cache::{self, Cached};
use crate::events::{EventData, EventKind};
use crate::{now, Registry, RegistryError, Result};

/// What a manifest PUT stored.
#[derive(Debug, Clone)]
pub struct PutManifest {
    pub digest: Digest,
    /// The manifest's subject, for the `OCI-Subject` response header.
    pub subject: Option<Digest>,
}

/// A manifest as served.
#[derive(Debug, Clone)]
pub struct ManifestBody {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// `None` for HEAD.
    pub bytes: Option<Bytes>,
}

fn served(digest: Digest, m: &Cached, with_body: bool) -> ManifestBody {
    ManifestBody {
        digest,
        media_type: m.media_type.clone(),
        size: m.bytes.len() as u64,
        bytes: with_body.then(|| m.bytes.clone()),
    }
}

impl Registry {
    /// The tags of a push that immutability rules fix, after refusing the
    /// push if one of them already names another manifest. The store checks
    /// them again in the put's transaction (`NewManifest::fixed_tags`).
    async fn fixed_tags(&self, repo: &RepoName, tags: &[Tag], digest: &Digest) -> Result<Vec<Tag>> {
        let rules = &self.config.immutable_tags;
        let mut fixed = Vec::new();
        for t in tags {
            if let Some(rule) = crate::immutable::rule_for(rules, repo, t.as_str()) {
                match self.meta.resolve_tag(repo, t).await? {
                    Some(old) if old != *digest => {
                        return Err(crate::immutable::denied(repo, t, rule, "moved to another manifest"))
                    }
                    _ => fixed.push(t.clone()),
                }
            }
        }
        Ok(fixed)
    }

    /// The tags pointing at manifest `d`, after refusing if one is
    /// immutable; `None` when no rule applies to the repository. The delete
    /// passes them to the store, which refuses if another tag came since.
    async fn deletable_tags(&self, repo: &RepoName, d: &Digest) -> Result<Option<Vec<Tag>>> {
        let rules = &self.config.immutable_tags;
        if !rules
            .iter()
            .any(|r| r.project.as_deref().is_none_or(|p| p == repo.project()))
        {
            return Ok(None);
        }
        let mut tags = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = self.meta.list_tags(repo, last.as_deref(), 1000).await?;
            for name in &page {
                let Ok(t) = name.parse::<Tag>() else { continue };
                if self.meta.resolve_tag(repo, &t).await?.as_ref() != Some(d) {
                    continue;
                }
                if let Some(rule) = crate::immutable::rule_for(rules, repo, name) {
                    return Err(crate::immutable::denied(repo, &t, rule, "deleted with its manifest"));
                }
                tags.push(t);
            }
            match page.last() {
                Some(l) if page.len() == 1000 => last = Some(l.clone()),
                _ => break,
            }
        }
        Ok(Some(tags))
    }

    /// Deletes a tag; an immutable one that exists is refused. (A rule is
    /// configuration, so there is nothing for a concurrent write to change:
    /// an immutable tag is never deleted here.)
    async fn tag_delete(&self, repo: &RepoName, t: &Tag, events: metadata::Events) -> Result<bool> {
        if let Some(rule) = crate::immutable::rule_for(&self.config.immutable_tags, repo, t.as_str()) {
            return match self.meta.resolve_tag(repo, t).await? {
                Some(_) => Err(crate::immutable::denied(repo, t, rule, "deleted")),
                None => Ok(false),
            };
        }
        Ok(self.meta.delete_tag(repo, t, events).await?)
    }

    /// Deletes manifest `d` and its tags, refusing if one is immutable.
    async fn digest_delete(&self, repo: &RepoName, d: &Digest, events: metadata::Events) -> Result<bool> {
        // A retry only when a mutable tag came meanwhile; an immutable one is
        // refused by the next check.
        for _ in 0..3 {
            let allowed = self.deletable_tags(repo, d).await?;
            match self
                .meta
                .delete_manifest(repo, d, allowed.as_deref(), events.clone())
                .await
            {
                Err(MetaError::Conflict(Conflict::TagAdded(t))) => {
                    tracing::debug!(%repo, digest = %d, tag = %t, "a tag came while deleting; checking again");
                }
                other => return Ok(other?),
            }
        }
        Err(RegistryError::new(
            ErrorCode::Unavailable,
            format!("manifest {d} keeps being tagged while it is deleted; try again"),
        ))
    }

    /// Writes a manifest's bytes and records it; the inner result is the
    /// store's answer. The fence is read before the bytes are written; if GC
    /// claimed the digest since (its bytes may be gone), they are written
    /// again.
    pub(crate) async fn store_manifest(
        &self,
        repo: &RepoName,
        body: Bytes,
        mut new: NewManifest,
    ) -> Result<Result<(), MetaError>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            new.admission.fence = Some(self.byte_fence(&new.digest).await?);
            self.blobs.put(&new.digest, body.clone()).await?;
            match self.meta.put_manifest(repo, new.clone()).await {
                Err(MetaError::Conflict(Conflict::Fenced(d))) if attempt < 3 => {
                    tracing::debug!(%repo, digest = %d, "GC claimed the manifest's bytes as they were written; writing again");
                }
                stored => return Ok(stored),
            }
        }
    }
}

/// A parsed manifest and what the store records of it.
pub(crate) struct Described {
    pub manifest: Manifest,
    pub record: ManifestRecord,
    pub required_blobs: Vec<Digest>,
    pub children: Vec<Digest>,
    pub subject: Option<Digest>,
}

pub(crate) fn describe(body: &Bytes, content_type: Option<&str>) -> Result<Described> {
    let manifest = Manifest::parse(body, content_type)?;
    let required_blobs: Vec<Digest> = manifest.required_blobs().map(|d| d.digest.clone()).collect();
    let children: Vec<Digest> = manifest.manifests.iter().map(|d| d.digest.clone()).collect();
    let subject = manifest.subject.as_ref().map(|s| s.digest.clone());
    let record = ManifestRecord {
        media_type: manifest.media_type.clone(),
        size: body.len() as u64,
        artifact_type: manifest.effective_artifact_type(),
        subject: subject.as_ref().map(|d| d.to_string()),
        annotations: manifest.annotations.clone(),
        blobs: required_blobs.iter().map(|d| d.to_string()).collect(),
        children: children.iter().map(|d| d.to_string()).collect(),
        created: now(),
        cached_from: None,
    };
    Ok(Described {
        manifest,
        record,
        required_blobs,
        children,
        subject,
    })
}

impl Registry {
    /// Checks a manifest body's size and, for a push by digest, its digest.
    /// Returns its digest.
    pub(crate) fn check_manifest_body(&self, body: &Bytes, reference: &Reference) -> Result<Digest> {
        if body.len() > self.config.max_manifest_size {
            return Err(RegistryError::new(
                ErrorCode::SizeTooLarge,
                format!(
                    "manifest is {} bytes; the limit is {} bytes",
                    body.len(),
                    self.config.max_manifest_size
                ),
            ));
        }
        match reference {
            Reference::Digest(d) if !d.verify(body) => Err(RegistryError::new(
                ErrorCode::DigestInvalid,
                "manifest content does not match the digest in the URL",
            )
            .with_detail(d.to_string())),
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(_) => Ok(Digest::sha256(body)),
        }
    }
}

fn manifest_unknown(reference: &Reference) -> RegistryError {
    RegistryError::new(ErrorCode::ManifestUnknown, "manifest unknown").with_detail(reference.to_string())
}

impl Registry {
    /// Stores a manifest under `reference` (a tag, or the digest the content
    /// must have) and the extra `tags` (`?tag=`).
    pub async fn manifest_put(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
        tags: Vec<Tag>,
    ) -> Result<PutManifest> {
        let digest = self.check_manifest_body(&body, reference)?;
        let mut all_tags = tags;
        if let Reference::Tag(t) = reference {
            all_tags.push(t.clone());
        }
        let Described {
            manifest,
            record,
            required_blobs,
            children,
            subject,
        } = describe(&body, content_type)?;
        let required_manifests = if self.config.sparse_index { vec![] } else { children };
        let (media_type, size) = (manifest.media_type.clone(), body.len() as u64);
        let events = self.change_events(|| {
            let data = |tag: Option<&Tag>| EventData {
                repository: repo.to_string(),
                digest: Some(digest.to_string()),
                tag: tag.map(Tag::to_string),
                media_type: Some(media_type.clone()),
                size: Some(size),
                from: None,
            };
            let pushed_tag = match reference {
                Reference::Tag(t) => Some(t),
                Reference::Digest(_) => None,
            };
            let mut out = vec![(EventKind::Push, data(pushed_tag))];
            out.extend(all_tags.iter().map(|t| (EventKind::Tag, data(Some(t)))));
            out
        });
        let n_events = events.len();
        // Immutable tags that exist may only be put again on the same
        // manifest; the store checks again in the put's transaction.
        let fixed_tags = self.fixed_tags(repo, &all_tags, &digest).await?;
        let admission = self.quota_admit(repo, &digest, body.len() as u64).await?;
        // Bytes first, durably; the metadata commit is what makes them visible.
        let new = NewManifest {
            digest: digest.clone(),
            record,
            required_blobs,
            required_manifests,
            tags: all_tags,
            fixed_tags,
            admission,
            events,
        };
        let stored = self.store_manifest(repo, body, new).await;
        // After the commit: the tags may have moved.
        self.manifests_changed(repo);
        match stored? {
            Ok(()) => {
                self.events_committed(n_events);
                Ok(PutManifest { digest, subject })
            }
            Err(MetaError::NotFound(Missing::Reference(missing))) => Err(RegistryError::new(
                ErrorCode::ManifestBlobUnknown,
                format!("manifest references {missing}, which is not in repository {repo}; push it first"),
            )
            .with_detail(missing.to_string())),
            // Another push claimed the immutable tag first.
            Err(MetaError::Conflict(Conflict::TagMoved { tag, current })) => Err(
                match crate::immutable::rule_for(&self.config.immutable_tags, repo, tag.as_str()) {
                    Some(rule) => crate::immutable::denied(repo, &tag, rule, "moved to another manifest"),
                    None => RegistryError::internal("moving a fixed tag", Conflict::TagMoved { tag, current }),
                },
            ),
            Err(e) => Err(crate::quota::refused(repo, e)),
        }
    }

    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<(Digest, ManifestHead)> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => self
                .meta
                .resolve_tag(repo, t)
                .await?
                .ok_or_else(|| manifest_unknown(reference))?,
        };
        let record = self
            .meta
            .manifest_head(repo, &digest)
            .await?
            .ok_or_else(|| manifest_unknown(reference))?;
        Ok((digest, record))
    }

    /// Fetches a manifest; with `with_body` false (HEAD) the bytes are not
    /// returned. A GET is a pull event.
    pub async fn manifest_get(&self, repo: &RepoName, reference: &Reference, with_body: bool) -> Result<ManifestBody> {
        let m = self.manifest_lookup(repo, reference, with_body).await?;
        self.pulls.note(repo, reference);
        if with_body {
            self.pull_event(|| EventData {
                repository: repo.to_string(),
                digest: Some(m.digest.to_string()),
                tag: match reference {
                    Reference::Tag(t) => Some(t.to_string()),
                    Reference::Digest(_) => None,
                },
                media_type: Some(m.media_type.clone()),
                size: Some(m.size),
                from: None,
            });
        }
        Ok(m)
    }

    /// Hot manifests come from the cache (see `cache`).
    pub(crate) async fn manifest_lookup(
        &self,
        repo: &RepoName,
        reference: &Reference,
        with_body: bool,
    ) -> Result<ManifestBody> {
        let known = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(t) => self.cache.tag(repo, t),
        };
        if let Some(digest) = known {
            if let Some(m) = self.cache.manifest(repo, &digest) {
                return Ok(served(digest, &m, with_body));
            }
        }
        let generation = self.cache.generation();
        let (digest, record) = self.resolve(repo, reference).await?;
        if !with_body && record.size > cache::MAX_ENTRY as u64 {
            // Not cacheable anyway: spare reading it for a HEAD.
            return Ok(ManifestBody {
                digest,
                media_type: record.media_type,
                size: record.size,
                bytes: None,
            });
        }
        // One read, and one buffer, for every request in flight.
        let bytes = self
            .in_flight
            .slot(repo, &digest)
            .get_or_load(|| self.read_manifest(repo, reference, &digest, record.size))
            .await?;
        let m = Arc::new(Cached {
            media_type: record.media_type,
            bytes,
        });
        let tag = match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        };
        self.cache.insert(generation, repo, tag, &digest, m.clone());
        Ok(served(digest, &m, with_body))
    }

    async fn read_manifest(&self, repo: &RepoName, reference: &Reference, digest: &Digest, size: u64) -> Result<Bytes> {
        let mut out = Vec::with_capacity(size as usize);
        let mut stream = self.blobs.get(digest, None).await.map_err(|e| {
            tracing::error!(%repo, %digest, error = %e, "manifest is recorded but its bytes are unreadable; run `berth fsck`");
            manifest_unknown(reference)
        })?;
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.map_err(storage::StorageError::from)?);
        }
        Ok(Bytes::from(out))
    }

    /// Deletes by digest (the manifest and every tag pointing at it) or by
    /// tag (only the tag).
    pub async fn manifest_delete(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let events = self.change_events(|| {
            let (digest, tag) = match reference {
                Reference::Digest(d) => (Some(d.to_string()), None),
                Reference::Tag(t) => (None, Some(t.to_string())),
            };
            vec![(
                EventKind::Delete,
                EventData {
                    repository: repo.to_string(),
                    digest,
                    tag,
                    ..Default::default()
                },
            )]
        });
        let n = events.len();
        let existed = match reference {
            Reference::Digest(d) => self.digest_delete(repo, d, events).await,
            Reference::Tag(t) => self.tag_delete(repo, t, events).await,
        };
        // After the commit, and even on error: the store may have changed.
        self.manifests_changed(repo);
        if !existed? {
            return Err(manifest_unknown(reference));
        }
        self.events_committed(n);
        Ok(())
    }
}
