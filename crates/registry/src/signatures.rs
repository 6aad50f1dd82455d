//! The signatures stored for a manifest, gathered for a signature policy
//! (`signature::decide`): the layers of its cosign `.sig` tag, the Sigstore
//! bundles among its referrers, and those listed by the referrers tag
//! scheme's fallback index (`sha256-<hex>`), which clients write for
//! registries without the referrers API. All read-only: no pull is noted
//! and no event recorded, so a policy check is not a pull.

use futures_util::StreamExt;
use oci::{Digest, ErrorCode, Manifest, Reference, RepoName, Tag};
use signature::{bundle, simple, Candidate};

use crate::{Registry, Result};

/// Signature payloads and bundles are small; a bigger blob is refused
/// rather than read into memory for a policy check.
const MAX_SIGNATURE_BLOB: u64 = 1 << 20;
/// Bounds the work one check does, whatever was pushed.
const MAX_CANDIDATES: usize = 64;

impl Registry {
    /// A counter that changes with every write that can change a
    /// manifest, a tag, a referrer or a blob link, this node's or (with a
    /// shared store) another's: a decision taken at one value holds while
    /// it stays the same. `None` while the manifest cache may not answer
    /// (a shared store whose change feed has not proved itself lately):
    /// then nothing derived from the store may be reused either.
    pub fn write_generation(&self) -> Option<u64> {
        self.cache.fresh().then(|| self.cache.generation())
    }

    /// Every signature stored in `repo` for manifest `digest`.
    pub async fn signature_candidates(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Candidate>> {
        let mut out = Vec::new();
        if let Some(sig) = self.manifest_by_tag(repo, &simple::sig_tag(digest)).await? {
            for l in simple::layers(&sig).into_iter().take(MAX_CANDIDATES) {
                out.push(Candidate::Simple {
                    payload: self.small_blob(repo, &l.payload).await,
                    signature_b64: l.signature_b64,
                });
            }
        }
        let mut artifacts: Vec<Digest> = self
            .referrers(repo, digest, None)
            .await?
            .into_iter()
            .filter(|d| d.artifact_type.as_deref().is_some_and(bundle::is_bundle_type))
            .map(|d| d.digest)
            .collect();
        if let Some(index) = self.manifest_by_tag(repo, &bundle::referrers_tag(digest)).await? {
            for d in index.manifests {
                if d.artifact_type.as_deref().is_some_and(bundle::is_bundle_type) && !artifacts.contains(&d.digest) {
                    artifacts.push(d.digest);
                }
            }
        }
        for a in artifacts.into_iter().take(MAX_CANDIDATES.saturating_sub(out.len())) {
            let json = match self.manifest_lookup(repo, &Reference::Digest(a.clone()), true).await {
                Ok(m) => match parse(&m) {
                    Some(m) => match m.layers.iter().find(|l| bundle::is_bundle_type(&l.media_type)) {
                        Some(l) => self.small_blob(repo, &l.digest).await,
                        None => Err(format!("artifact {a} has no bundle layer")),
                    },
                    None => Err(format!("artifact {a} is not a manifest")),
                },
                Err(e) => Err(format!("artifact {a}: {}", e.message)),
            };
            out.push(Candidate::Bundle { json });
        }
        Ok(out)
    }

    /// The bytes of manifest `digest` (a message signature is over them),
    /// read without noting a pull.
    pub async fn manifest_bytes(&self, repo: &RepoName, digest: &Digest) -> Result<bytes::Bytes> {
        let m = self
            .manifest_lookup(repo, &Reference::Digest(digest.clone()), true)
            .await?;
        Ok(m.bytes.unwrap_or_default())
    }

    async fn manifest_by_tag(&self, repo: &RepoName, tag: &str) -> Result<Option<Manifest>> {
        let Ok(tag) = tag.parse::<Tag>() else { return Ok(None) };
        match self.manifest_lookup(repo, &Reference::Tag(tag), true).await {
            Ok(m) => Ok(parse(&m)),
            Err(e) if e.code == ErrorCode::ManifestUnknown || e.code == ErrorCode::NameUnknown => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bytes of a small blob of `repo`, or why they could not be read
    /// (a signature whose payload is gone is a finding, not an error).
    async fn small_blob(&self, repo: &RepoName, d: &Digest) -> std::result::Result<Vec<u8>, String> {
        let b = self
            .blob_open(repo, d)
            .await
            .map_err(|e| format!("{d}: {}", e.message))?;
        if b.size > MAX_SIGNATURE_BLOB {
            return Err(format!(
                "{d} is {} bytes, more than a signature ({MAX_SIGNATURE_BLOB})",
                b.size
            ));
        }
        let mut s = b.read(None).await.map_err(|e| format!("{d}: {}", e.message))?;
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.map_err(|e| format!("{d}: {e}"))?);
            if out.len() as u64 > MAX_SIGNATURE_BLOB {
                return Err(format!("{d} is larger than a signature"));
            }
        }
        Ok(out)
    }
}

fn parse(m: &crate::ManifestBody) -> Option<Manifest> {
    Manifest::parse(m.bytes.as_deref()?, Some(&m.media_type)).ok()
}
