//! Per-project storage quotas. A project's usage counts each blob its
//! repositories link once, however many of them link it, plus each manifest
//! once (`MetadataStore::project_usage`). A blob commit, a mount or a
//! manifest put that would take a project over its quota is refused with
//! `DENIED` before anything is stored; content the project already holds
//! is free to add again.
//!
//! The metadata store checks the quota in the transaction that records the
//! blob, link or manifest (`metadata::Admission`), so concurrent pushes,
//! through one node or several, cannot both squeeze under the limit. A
//! check before the bytes are written spares writing what the store would
//! refuse.

use metadata::{Admission, Conflict, MetaError};
use oci::{Digest, ErrorCode, RepoName};

use crate::{Registry, RegistryError, Result};

/// A project's storage use and quota, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectUsage {
    pub bytes: u64,
    /// `None`: no quota.
    pub quota: Option<u64>,
}

impl Registry {
    /// What `project` uses, as its quota counts it.
    pub async fn project_usage(&self, project: &str) -> Result<ProjectUsage> {
        Ok(ProjectUsage {
            bytes: self.meta.project_usage(project).await?,
            quota: self.config.quotas.get(project).copied(),
        })
    }

    /// Refuses `size` bytes of `digest` in `repo`'s project if they would
    /// take it over its quota now; else the admission the metadata write
    /// checks again, in its transaction.
    pub(crate) async fn quota_admit(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<Admission> {
        let project = repo.project();
        let Some(&limit) = self.config.quotas.get(project) else {
            return Ok(Admission::default());
        };
        if !self.meta.project_holds(project, digest).await? {
            let used = self.meta.project_usage(project).await?;
            if used.saturating_add(size) > limit {
                return Err(over_quota(repo, used, limit, size));
            }
        }
        Ok(Admission {
            quota: Some(limit),
            fence: None,
        })
    }
}

/// `e` as the service's error; the store's quota conflict as the refusal
/// it is.
pub(crate) fn refused(repo: &RepoName, e: MetaError) -> RegistryError {
    match e {
        MetaError::Conflict(Conflict::OverQuota { used, limit, size }) => over_quota(repo, used, limit, size),
        e => e.into(),
    }
}

/// The refusal of a push that would take `repo`'s project over its quota.
fn over_quota(repo: &RepoName, used: u64, limit: u64, size: u64) -> RegistryError {
    let project = repo.project();
    RegistryError::new(
        ErrorCode::Denied,
        format!(
            "project {project} is over its storage quota: it uses {used} of {limit} bytes, and this needs {size} more; \
             delete images (space returns after garbage collection) or ask an administrator to raise the quota"
        ),
    )
    .with_detail(project.to_string())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use metadata::MetadataStore;
    use oci::{Digest, ErrorCode, Reference};

    use crate::gc::tests::{env_with, manifest, pull, push, repo, upload};
    use crate::RegistryConfig;

    #[tokio::test]
    async fn a_push_over_quota_is_refused_and_shared_layers_count_once() {
        let limit = 2_000 + 600;
        let e = env_with(RegistryConfig {
            quotas: [("q".to_string(), limit)].into(),
            ..RegistryConfig::default()
        })
        .await;
        let (a, b) = (repo("q/a"), repo("q/b"));
        let big = vec![1u8; 1_000];
        let m1 = push(&e.reg, &a, b"c1", &[&big], Some("v1")).await;
        // The same layer in another repository of the project costs nothing.
        let m2 = push(&e.reg, &b, b"c2", &[&big], Some("v1")).await;
        let used = e.meta.project_usage("q").await.unwrap();
        let m_len = manifest(b"c1", &[&big]).len() as u64;
        assert_eq!(used, 1_000 + 2 + 2 + 2 * m_len);
        assert_eq!(e.reg.usage().await.unwrap().projects["q"], used);

        // A new 1000-byte layer does not fit.
        let other = vec![2u8; 1_000];
        let d = Digest::sha256(&other);
        let id = e.reg.upload_start(&a, None, oci::Algorithm::Sha256).await.unwrap();
        let body: storage::ByteStream = Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from(other.clone()))]));
        let err = e
            .reg
            .upload_finish(&a, &id, None, None, &d, Some(body))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Denied);
        assert_eq!(
            err.message,
            format!(
                "project q is over its storage quota: it uses {used} of {limit} bytes, and this needs 1000 more; \
                 delete images (space returns after garbage collection) or ask an administrator to raise the quota"
            )
        );
        // Nothing partial: no blob, no link, no upload, usage unchanged.
        assert!(e.meta.blob_size(&d).await.unwrap().is_none());
        assert!(e.reg.upload_status(&a, &id, None).await.is_err());
        assert_eq!(storage::BlobStore::stat(e.blobs.as_ref(), &d).await.unwrap(), None);
        assert_eq!(e.meta.project_usage("q").await.unwrap(), used);
        // A mount from another project is refused the same way.
        let elsewhere = repo("other/x");
        upload(&e.reg, &elsewhere, &other).await;
        let err = e.reg.mount(&a, &d, Some(&elsewhere)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Denied);
        // Re-pushing what the project holds is always fine.
        assert_eq!(push(&e.reg, &a, b"c1", &[&big], Some("v1")).await, m1);
        // Other projects have no quota.
        push(&e.reg, &repo("free/a"), b"c9", &[&other], None).await;

        // Deleting an image frees its share once GC removes it.
        e.reg.manifest_delete(&b, &Reference::Digest(m2.clone())).await.unwrap();
        e.reg.gc(&crate::gc::tests::now_opts()).await.unwrap();
        assert_eq!(e.meta.project_usage("q").await.unwrap(), 1_000 + 2 + m_len);
        pull(&e.reg, &a, &m1).await.unwrap();
    }

    /// Pushes of new layers at once, each alone within the quota, only one
    /// fitting with another: the store's transaction admits one of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_pushes_cannot_both_fit_under_the_quota() {
        let e = env_with(RegistryConfig {
            quotas: [("q".to_string(), 1_500)].into(),
            ..RegistryConfig::default()
        })
        .await;
        let a = repo("q/a");
        let push = |i: u8| {
            let (reg, a) = (e.reg.clone(), a.clone());
            tokio::spawn(async move {
                let data = vec![i; 1_000];
                let d = Digest::sha256(&data);
                let id = reg.upload_start(&a, None, oci::Algorithm::Sha256).await.unwrap();
                let body: storage::ByteStream = Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from(data))]));
                reg.upload_finish(&a, &id, None, None, &d, Some(body)).await
            })
        };
        let tasks: Vec<_> = (1..=4).map(push).collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(r.code, ErrorCode::Denied, "{r:?}");
        }
        assert_eq!(e.meta.project_usage("q").await.unwrap(), 1_000);
    }
}
