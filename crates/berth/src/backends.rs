//! The one place that builds the storage backends from the configuration,
//! for `berth serve` and every offline command (`gc`, `retention`, `fsck`,
//! `du`, the account commands). Today that is the embedded pair: the fs blob
//! store and the redb metadata database (`meta.redb`, which also holds the
//! accounts) in one data directory; another backend is another arm here, and
//! the callers keep using the traits.

use std::path::Path;
use std::sync::Arc;

use metadata::{IdentityStore, MetadataStore, RedbMetadata};
use storage::{BlobStore, FsBlobStore};

/// The metadata database's file in a data directory.
const METADATA_FILE: &str = "meta.redb";

/// The backends of one registry.
pub struct Backends {
    pub blobs: Arc<dyn BlobStore>,
    pub meta: Arc<dyn MetadataStore>,
    /// Users, projects and robots; the same store as `meta`.
    pub identity: Arc<dyn IdentityStore>,
}

/// Whether `data_dir` holds a registry at all (offline commands refuse an
/// empty directory rather than create one).
pub fn exists(data_dir: &Path) -> bool {
    data_dir.join(METADATA_FILE).exists()
}

/// Opens the metadata store alone (the account commands need nothing
/// else). `runtime`: where its transactions run (see
/// `RedbMetadata::on_runtime`); `None` for the caller's.
pub fn open_metadata(data_dir: &Path, runtime: Option<tokio::runtime::Handle>) -> Result<RedbMetadata, String> {
    crate::secrets::create_private_dir(data_dir)?;
    let path = data_dir.join(METADATA_FILE);
    crate::secrets::prepare_private_file(&path, "the metadata database (it holds password hashes)")?;
    let store = RedbMetadata::open(&path).map_err(|e| {
        format!(
            "cannot open metadata database {}: {} (is another berth using this data directory?)",
            path.display(),
            metadata::error_chain(&e)
        )
    })?;
    Ok(match runtime {
        Some(rt) => store.on_runtime(rt),
        None => store,
    })
}

/// Opens both stores of `data_dir`. The metadata first: its lock says
/// whether another berth runs there, and opening the blob store cleans up
/// interrupted writes, which must not happen under a running server.
/// `busy_hint` is added to a failure to open the metadata (what to do when
/// berth is running).
pub async fn open(
    data_dir: &Path,
    runtime: Option<tokio::runtime::Handle>,
    busy_hint: &str,
) -> Result<Backends, String> {
    let store = Arc::new(open_metadata(data_dir, runtime).map_err(|e| format!("{e}{busy_hint}"))?);
    let blobs = FsBlobStore::open(data_dir)
        .await
        .map_err(|e| format!("cannot open blob storage in {}: {e}", data_dir.display()))?;
    Ok(Backends {
        blobs: Arc::new(blobs),
        meta: store.clone(),
        identity: store,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_berth_per_data_directory_and_the_hint_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!exists(dir.path()));
        let first = open(dir.path(), None, ". Stop berth first").await.unwrap();
        assert!(exists(dir.path()));
        let Err(e) = open(dir.path(), None, ". Stop berth first").await else {
            panic!("a second open of a data directory in use must fail");
        };
        assert!(
            e.contains("is another berth using this data directory?). Stop berth first"),
            "{e}"
        );
        drop(first);
        open(dir.path(), None, "").await.unwrap();
    }
}
