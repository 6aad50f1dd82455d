//! The one place that builds the storage backends from the configuration,
//! for `berth serve` and every offline command (`gc`, `retention`, `fsck`,
//! `du`, the account commands, `migrate`). Blobs are in the fs store of the
//! data directory (the default) or, with `--storage s3://...` and the `s3`
//! feature, in an S3 bucket (`storage_location`); metadata (with the
//! accounts) is in the embedded redb database in the data directory
//! (`meta.redb`, the default) or, with `--metadata postgres://...` and the
//! `postgres` feature, in PostgreSQL. The callers only see the traits.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use metadata::{IdentityStore, MetadataStore, RedbMetadata};
use storage::{BlobStore, FsBlobStore};

use crate::storage_location::StorageLocation;

/// Where the metadata lives (`--metadata`, `BERTH_METADATA`, the `metadata`
/// key of the config file).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum MetadataLocation {
    /// `meta.redb` in the data directory.
    #[default]
    Embedded,
    /// A PostgreSQL URL.
    Postgres(String),
}

/// The URL holds a password: only the scheme is ever printed.
impl std::fmt::Debug for MetadataLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetadataLocation::Embedded => f.write_str("Embedded"),
            MetadataLocation::Postgres(_) => f.write_str("Postgres(postgres://...)"),
        }
    }
}

impl FromStr for MetadataLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "redb" | "embedded" => Ok(MetadataLocation::Embedded),
            u if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(MetadataLocation::Postgres(u.to_string()))
            }
            other => {
                // The rest may hold a password: show only what precedes it.
                let shown = other.split_once("://").map_or("", |(scheme, _)| scheme);
                Err(format!(
                    "--metadata {shown:?}... is neither `redb` (the embedded database in the data directory, the \
                     default) nor a PostgreSQL URL; write postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                ))
            }
        }
    }
}

/// Both metadata traits of one store.
pub struct MetadataStores {
    pub meta: Arc<dyn MetadataStore>,
    pub identity: Arc<dyn IdentityStore>,
}

/// Opens the metadata wherever it lives. `runtime`: where redb's
/// transactions run (see `RedbMetadata::on_runtime`); PostgreSQL's run on
/// the caller's runtime, whose tasks carry its connections.
pub async fn open_stores(
    data_dir: &Path,
    location: &MetadataLocation,
    runtime: Option<tokio::runtime::Handle>,
) -> Result<MetadataStores, String> {
    match location {
        MetadataLocation::Embedded => {
            let store = Arc::new(open_metadata(data_dir, runtime)?);
            Ok(MetadataStores {
                meta: store.clone(),
                identity: store,
            })
        }
        MetadataLocation::Postgres(url) => open_postgres(url).await,
    }
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<MetadataStores, String> {
    let store = Arc::new(connect_postgres(url).await?);
    Ok(MetadataStores {
        meta: store.clone(),
        identity: store,
    })
}

/// Connects and migrates (`berth migrate` reports what this did).
#[cfg(feature = "postgres")]
pub async fn connect_postgres(url: &str) -> Result<metadata::PostgresMetadata, String> {
    metadata::PostgresMetadata::connect(url).await.map_err(|e| {
        format!(
            "{} (the URL comes from --metadata, BERTH_METADATA or the config file's `metadata`)",
            metadata::error_chain(&e)
        )
    })
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<MetadataStores, String> {
    Err(NO_POSTGRES.to_string())
}

#[cfg(not(feature = "postgres"))]
pub const NO_POSTGRES: &str = "this berth was built without PostgreSQL support; build it with \
                               `cargo build --release --features berth/postgres`, or use the embedded database \
                               (leave --metadata unset)";

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
/// empty directory rather than create one). With PostgreSQL, the database
/// says: the data directory only holds blobs, or nothing when they are in
/// S3.
pub fn exists(data_dir: &Path, location: &MetadataLocation, blobs: &BlobLocation) -> bool {
    match (location, &blobs.location) {
        (MetadataLocation::Embedded, _) => data_dir.join(METADATA_FILE).exists(),
        (MetadataLocation::Postgres(_), StorageLocation::DataDir) => data_dir.exists(),
        (MetadataLocation::Postgres(_), StorageLocation::S3(_)) => true,
    }
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

/// Where the blobs are, and the credentials file for S3
/// (`--storage-credentials`; `None`: the environment's).
#[derive(Clone, Debug, Default)]
pub struct BlobLocation {
    pub location: StorageLocation,
    pub credentials: Option<std::path::PathBuf>,
}

/// Opens both stores of `data_dir`. The metadata first: its lock says
/// whether another berth runs there, and opening the blob store cleans up
/// interrupted writes, which must not happen under a running server.
/// `busy_hint` is added to a failure to open the metadata (what to do when
/// berth is running).
pub async fn open(
    data_dir: &Path,
    location: &MetadataLocation,
    blobs: &BlobLocation,
    runtime: Option<tokio::runtime::Handle>,
    busy_hint: &str,
) -> Result<Backends, String> {
    let stores = open_stores(data_dir, location, runtime).await.map_err(|e| {
        if *location == MetadataLocation::Embedded {
            format!("{e}{busy_hint}")
        } else {
            e
        }
    })?;
    Ok(Backends {
        blobs: open_blobs(data_dir, blobs).await?,
        meta: stores.meta,
        identity: stores.identity,
    })
}

/// Opens the blob store wherever it is. An S3 bucket is checked at once
/// (that it exists and takes the credentials), so a mistake fails the
/// start rather than the first push.
pub async fn open_blobs(data_dir: &Path, blobs: &BlobLocation) -> Result<Arc<dyn BlobStore>, String> {
    match &blobs.location {
        StorageLocation::DataDir => {
            let store = FsBlobStore::open(data_dir)
                .await
                .map_err(|e| format!("cannot open blob storage in {}: {e}", data_dir.display()))?;
            Ok(Arc::new(store))
        }
        StorageLocation::S3(s3) => open_s3(s3, blobs.credentials.as_deref()).await,
    }
}

#[cfg(feature = "s3")]
async fn open_s3(
    s3: &crate::storage_location::S3Location,
    credentials: Option<&Path>,
) -> Result<Arc<dyn BlobStore>, String> {
    use storage::s3::{OpenError, S3BlobStore, S3Credentials, S3Options};
    let c = crate::storage_location::credentials(credentials)?;
    let opts = S3Options {
        bucket: s3.bucket.clone(),
        prefix: s3.prefix.clone(),
        endpoint: s3.endpoint.clone(),
        region: s3.region.clone(),
        credentials: S3Credentials {
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            session_token: c.session_token,
        },
    };
    let creds = if credentials.is_some() {
        "the --storage-credentials file"
    } else {
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    };
    match S3BlobStore::open(opts).await {
        Ok(store) => Ok(Arc::new(store)),
        Err(e @ OpenError::NoSuchBucket { .. }) => Err(format!(
            "{e}: create it (for example `aws s3 mb s3://{}{}`), or name an existing bucket in --storage",
            s3.bucket,
            s3.endpoint
                .as_deref()
                .map(|u| format!(" --endpoint-url {u}"))
                .unwrap_or_default()
        )),
        Err(e @ OpenError::Refused { .. }) => Err(format!(
            "{}; check {creds}, and that the key may read and write the bucket",
            error_text(&e)
        )),
        Err(e @ OpenError::Unavailable { .. }) => Err(format!(
            "{}; check the endpoint and region in --storage, and that the server is up",
            error_text(&e)
        )),
        Err(e @ OpenError::Settings(_)) => Err(format!("{} (from --storage)", error_text(&e))),
    }
}

#[cfg(not(feature = "s3"))]
async fn open_s3(
    _s3: &crate::storage_location::S3Location,
    _credentials: Option<&Path>,
) -> Result<Arc<dyn BlobStore>, String> {
    Err(NO_S3.to_string())
}

#[cfg(not(feature = "s3"))]
const NO_S3: &str = "this berth was built without S3 support; build it with `cargo build --release --features \
                     berth/s3` (on by default), or keep the blobs in the data directory (leave --storage unset)";

/// An error and its sources, each once (object_store's errors repeat their
/// source in their own text), on one line (they quote the server's XML).
#[cfg(feature = "s3")]
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_berth_per_data_directory_and_the_hint_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = MetadataLocation::Embedded;
        assert!(!exists(dir.path(), &embedded, &BlobLocation::default()));
        let fs = BlobLocation::default();
        let first = open(dir.path(), &embedded, &fs, None, ". Stop berth first")
            .await
            .unwrap();
        assert!(exists(dir.path(), &embedded, &BlobLocation::default()));
        let Err(e) = open(dir.path(), &embedded, &fs, None, ". Stop berth first").await else {
            panic!("a second open of a data directory in use must fail");
        };
        assert!(
            e.contains("is another berth using this data directory?). Stop berth first"),
            "{e}"
        );
        drop(first);
        open(dir.path(), &embedded, &fs, None, "").await.unwrap();
    }

    #[test]
    fn metadata_locations_parse_and_never_show_a_password() {
        assert_eq!("".parse::<MetadataLocation>().unwrap(), MetadataLocation::Embedded);
        assert_eq!("redb".parse::<MetadataLocation>().unwrap(), MetadataLocation::Embedded);
        let url = "postgres://berth:hunter2@db:5432/registry";
        let pg: MetadataLocation = url.parse().unwrap();
        assert_eq!(pg, MetadataLocation::Postgres(url.into()));
        assert!(!format!("{pg:?}").contains("hunter2"));
        assert!("postgresql://db/registry".parse::<MetadataLocation>().is_ok());
        let e = "postgress://berth:hunter2@db/registry"
            .parse::<MetadataLocation>()
            .unwrap_err();
        assert!(e.contains("\"postgress\"") && e.contains("postgres://USER"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[cfg(not(feature = "postgres"))]
    #[tokio::test]
    async fn a_postgres_url_without_the_feature_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let pg = MetadataLocation::Postgres("postgres://db/registry".into());
        let Err(e) = open_stores(dir.path(), &pg, None).await else {
            panic!("no PostgreSQL support in this build")
        };
        assert!(e.contains("--features berth/postgres"), "{e}");
    }
}
