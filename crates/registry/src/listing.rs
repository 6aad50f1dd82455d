//! Catalog, tags list and referrers.
//!
//! First pages of the catalog (no `last`: what a plain `GET /v2/_catalog`
//! asks for) are served from memory. Every write that can change the set of
//! repositories (manifest put and delete, tag delete, GC's manifest sweep)
//! bumps a generation after its metadata commit; a page is served only if it
//! was read at the current generation, and a reader notes the generation
//! before reading the store, so a page read before a write is never served
//! after that write returns. One reader at a time refills, so a burst of
//! requests after a change costs one store read, not one each. With a
//! shared store, other nodes' changes arrive through the change feed and
//! bump the generation the same way; pages are served only while the
//! manifest cache is fresh (see `cache`), within the same bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// How many page sizes the catalog cache keeps first pages for.
const CACHED_PAGE_SIZES: usize = 8;

/// First catalog pages by page size, valid for one generation of the set of
/// repositories.
#[derive(Default)]
pub(crate) struct CatalogCache {
    generation: AtomicU64,
    pages: Mutex<HashMap<usize, (u64, Arc<Page>)>>,
    /// Held by the one reader refilling the cache.
    fill: tokio::sync::Mutex<()>,
}

impl CatalogCache {
    /// Call after every metadata commit that may add or remove a repository.
    pub(crate) fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn get(&self, n: usize) -> Option<Arc<Page>> {
        let generation = self.generation.load(Ordering::SeqCst);
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        match pages.get(&n) {
            Some((g, page)) if *g == generation => Some(page.clone()),
            _ => None,
        }
    }

    /// Keeps `page`, read from the store at `generation`, unless a change has
    /// happened since.
    fn insert(&self, generation: u64, n: usize, page: Arc<Page>) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        pages.retain(|_, (g, _)| *g == generation);
        if pages.len() >= CACHED_PAGE_SIZES {
            pages.clear();
        }
        pages.insert(n, (generation, page));
    }
}

impl Registry {
    /// A page of the catalog: `n` names (default `DEFAULT_PAGE`, at most
    /// `MAX_PAGE`) after `last`. First pages come from memory when no
    /// repository was created or removed since they were read.
    pub async fn catalog(&self, n: Option<usize>, last: Option<&str>) -> Result<Arc<Page>> {
        let n = n.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
        if last.is_some() {
            return Ok(Arc::new(page(self.meta.list_repos(last, n + 1).await?, n)));
        }
        // Other nodes' changes reach the catalog as they reach manifests.
        let fresh = || self.cache.fresh();
        if let Some(p) = self.catalog_cache.get(n).filter(|_| fresh()) {
            return Ok(p);
        }
        let _fill = self.catalog_cache.fill.lock().await;
        if let Some(p) = self.catalog_cache.get(n).filter(|_| fresh()) {
            return Ok(p);
        }
        let generation = self.catalog_cache.generation.load(Ordering::SeqCst);
        let p = Arc::new(page(self.meta.list_repos(None, n + 1).await?, n));
        self.catalog_cache.insert(generation, n, p.clone());
        Ok(p)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use oci::Reference;

    use crate::gc::tests::{env, push, repo};

    #[tokio::test]
    async fn cached_catalog_pages_follow_every_change_of_the_repositories() {
        let e = env().await;
        let (a, b) = (repo("p/a"), repo("p/b"));
        push(&e.reg, &a, b"cfg-a", &[b"layer-a"], Some("v1")).await;
        let first = e.reg.catalog(None, None).await.unwrap();
        assert_eq!(first.items, ["p/a"]);
        // Unchanged: the same page, from memory.
        assert!(Arc::ptr_eq(&first, &e.reg.catalog(None, None).await.unwrap()));
        let m = push(&e.reg, &b, b"cfg-b", &[b"layer-b"], None).await;
        assert_eq!(e.reg.catalog(None, None).await.unwrap().items, ["p/a", "p/b"]);
        let small = e.reg.catalog(Some(1), None).await.unwrap();
        assert_eq!((small.items.as_slice(), small.more), (&["p/a".to_string()][..], true));
        // Deleting the last manifest removes the repository.
        e.reg.manifest_delete(&b, &Reference::Digest(m)).await.unwrap();
        assert_eq!(e.reg.catalog(None, None).await.unwrap().items, ["p/a"]);
        let small = e.reg.catalog(Some(1), None).await.unwrap();
        assert_eq!((small.items.as_slice(), small.more), (&["p/a".to_string()][..], false));
        // Pages after `last` are read from the store.
        assert!(e.reg.catalog(None, Some("p/a")).await.unwrap().items.is_empty());
    }

    #[tokio::test]
    async fn garbage_collection_that_empties_a_repository_drops_it_from_the_catalog() {
        let e = env().await;
        push(&e.reg, &repo("q/untagged"), b"cfg", &[b"layer"], None).await;
        assert_eq!(e.reg.catalog(None, None).await.unwrap().items, ["q/untagged"]);
        let opts = crate::gc::GcOptions {
            untagged_projects: vec!["q".into()],
            ..crate::gc::tests::now_opts()
        };
        e.reg.gc(&opts).await.unwrap();
        assert!(e.reg.catalog(None, None).await.unwrap().items.is_empty());
    }

    #[tokio::test]
    async fn concurrent_first_pages_agree_with_the_store() {
        let e = env().await;
        for i in 0..5 {
            push(&e.reg, &repo(&format!("p/r{i}")), b"cfg", &[b"layer"], Some("v1")).await;
        }
        let reads: Vec<_> = (0..32)
            .map(|_| {
                let reg = e.reg.clone();
                tokio::spawn(async move { reg.catalog(None, None).await.unwrap() })
            })
            .collect();
        for r in reads {
            assert_eq!(r.await.unwrap().items.len(), 5);
        }
    }
}
