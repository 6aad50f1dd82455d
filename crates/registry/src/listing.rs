//! Catalog, tags list and referrers.

use oci::{Descriptor, Digest, ErrorCode, RepoName};

use crate::{Registry, RegistryError, Result};

/// Page size when the client gives no `n`, and the most a page may hold.
pub const DEFAULT_PAGE: usize = 1000;
pub const MAX_PAGE: usize = 10_000;

/// One page of a paginated list; `more` is true when entries follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

fn page(mut items: Vec<String>, n: usize) -> Page {
    let more = items.len() > n;
    items.truncate(n);
    Page { items, more }
}

impl Registry {
    pub async fn catalog(&self, n: Option<usize>, last: Option<&str>) -> Result<Page> {
        let n = n.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
        Ok(page(self.meta.list_repos(last, n + 1).await?, n))
    }

    pub async fn tags(&self, repo: &RepoName, n: Option<usize>, last: Option<&str>) -> Result<Page> {
        if !self.meta.repo_exists(repo).await? {
            return Err(
                RegistryError::new(ErrorCode::NameUnknown, "repository name not known to registry")
                    .with_detail(repo.to_string()),
            );
        }
        let n = n.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
        Ok(page(self.meta.list_tags(repo, last, n + 1).await?, n))
    }

    /// Manifests whose subject is `subject`, optionally only those of one
    /// artifact type. An unknown subject has no referrers (not an error).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let mut list = self.meta.referrers(repo, subject).await?;
        if let Some(t) = artifact_type {
            list.retain(|d| d.artifact_type.as_deref() == Some(t));
        }
        Ok(list)
    }
}
