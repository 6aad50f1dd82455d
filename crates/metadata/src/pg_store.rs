//! PostgreSQL backend: the same model as the redb tables (see `pg_schema`),
//! shared by any number of berth nodes.
//!
//! Concurrency: every write is one transaction at READ COMMITTED with
//! explicit locks, taken first, in one statement, in one global order (by
//! the key's hash), so two transactions never wait on each other in a cycle:
//! - a transaction-scoped advisory lock per digest it records, references or
//!   removes (`d:<digest>`): a blob commit, a manifest put, a GC sweep and a
//!   claim check of one digest run one at a time, and each sees what the
//!   previous one committed (READ COMMITTED reads the newest committed rows
//!   in each statement, after the lock);
//! - one per project whose quota the write checks (`q:<project>`);
//! - the row lock of `counters.outbox_last` for writes that append events,
//!   taken last (held the shortest), so event numbers follow commit order.
//!
//! SERIALIZABLE would give the same guarantees without the locks, but every
//! event-appending write would then abort on the outbox counter whenever two
//! ran at once; with the locks, writes of different digests never wait on
//! each other. A deadlock or serialization failure (PostgreSQL still
//! reports them, e.g. on a hash collision) is retried a bounded number of
//! times, then surfaces as `MetaError::Retryable`.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, Transaction};
use oci::{Descriptor, Digest, RepoName, Tag, UploadId};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::pg_changes::notify;
use crate::pg_schema::{migrate, MigrateError, Migrated};
use crate::{
    Admission, ChangeSink, Conflict, DeadLetter, Events, Lease, LeasedUpload, ManifestHead, ManifestRecord, MetaError,
    MetadataStore, Missing, NewManifest, OutboxEvent, Result, StoreStats, UploadRecord,
};

/// Connections per node. Each request holds one for one statement or one
/// short transaction.
const POOL_SIZE: usize = 16;
/// How long a request waits for a connection (or for one to be made)
/// before failing with `Retryable`: an outage gives fast 503s, not hangs.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Attempts of a transaction that failed on a deadlock or a serialization
/// failure.
const MAX_ATTEMPTS: u32 = 8;

pub struct PostgresMetadata {
    pub(crate) pool: Pool,
    schema: Migrated,
    /// For the change feed's own connection (`pg_changes`).
    config: tokio_postgres::Config,
}

/// Why `PostgresMetadata::connect` failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the PostgreSQL URL is invalid; write it as postgres://USER:PASSWORD@HOST:PORT/DATABASE")]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot set up the PostgreSQL connection pool")]
    Pool(#[source] deadpool_postgres::BuildError),
    #[error(
        "cannot connect to PostgreSQL at {target}: check that PostgreSQL runs and accepts TCP connections \
         there, that the URL's user, password and database are right, and that pg_hba.conf lets this host in"
    )]
    Connect {
        target: String,
        #[source]
        source: PoolError,
    },
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// Where a configuration points, without its password, for messages.
fn describe(cfg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = cfg
                .get_ports()
                .get(i)
                .or(cfg.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match h {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}:{port} (Unix socket)", dir.display()),
            }
        })
        .collect();
    format!(
        "{} (database {}, user {})",
        if hosts.is_empty() {
            "localhost:5432".to_string()
        } else {
            hosts.join(",")
        },
        cfg.get_dbname().unwrap_or("(the user's name)"),
        cfg.get_user().unwrap_or("(this OS user's name)")
    )
}

impl PostgresMetadata {
    /// Connects to the database at `url` (`postgres://user:pass@host:port/db`
    /// or the key=value form) and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<PostgresMetadata, OpenError> {
        let mut cfg: tokio_postgres::Config = url.parse().map_err(OpenError::Url)?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(POOL_WAIT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("berth");
        }
        let target = describe(&cfg);
        let manager = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .build()
            .map_err(OpenError::Pool)?;
        let mut client = pool
            .get()
            .await
            .map_err(|source| OpenError::Connect { target, source })?;
        let schema = migrate(&mut client).await?;
        drop(client);
        Ok(PostgresMetadata {
            pool,
            schema,
            config: cfg,
        })
    }

    /// The schema version, and what `connect` migrated.
    pub fn schema(&self) -> &Migrated {
        &self.schema
    }

    /// Rows of one statement outside a transaction. A connection found dead
    /// (PostgreSQL restarted since it was pooled) is replaced once.
    pub(crate) async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.pool.get().await.map_err(pool_err)?;
            let r = async {
                let st = client.prepare_cached(sql).await?;
                client.query(&st, params).await
            }
            .await;
            match r {
                Ok(rows) => return Ok(rows),
                Err(e) if attempt < 2 && unavailable(&e) => continue,
                Err(e) => return Err(pg_err(e)),
            }
        }
    }

    pub(crate) async fn row(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        Ok(self.rows(sql, params).await?.into_iter().next())
    }
}

/// How one attempt of a transaction failed.
pub(crate) enum TxFail {
    /// The store said no (a conflict, a missing reference): final.
    Meta(MetaError),
    /// No connection.
    Pool(PoolError),
    /// A statement failed.
    Pg(tokio_postgres::Error),
    /// COMMIT failed: after a lost connection, whether it committed is
    /// unknown, so it is not retried.
    Commit(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for TxFail {
    fn from(e: tokio_postgres::Error) -> Self {
        TxFail::Pg(e)
    }
}
impl From<PoolError> for TxFail {
    fn from(e: PoolError) -> Self {
        TxFail::Pool(e)
    }
}
impl From<MetaError> for TxFail {
    fn from(e: MetaError) -> Self {
        TxFail::Meta(e)
    }
}
impl From<Conflict> for TxFail {
    fn from(e: Conflict) -> Self {
        TxFail::Meta(e.into())
    }
}
impl From<Missing> for TxFail {
    fn from(e: Missing) -> Self {
        TxFail::Meta(e.into())
    }
}

/// A deadlock or serialization failure: nothing was written, and the same
/// transaction run again will likely pass.
fn contended(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// The server is gone or refusing (a lost connection, a shutdown, too many
/// clients): it may be back soon.
fn unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
        }
        // Without a SQL state: an I/O error on the socket, a timeout.
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

pub(crate) fn pg_err(e: tokio_postgres::Error) -> MetaError {
    if contended(&e) || unavailable(&e) {
        MetaError::Retryable(Box::new(e))
    } else {
        MetaError::Backend(Box::new(e))
    }
}

pub(crate) fn pool_err(e: PoolError) -> MetaError {
    match e {
        PoolError::Timeout(_) | PoolError::Backend(_) => MetaError::Retryable(Box::new(e)),
        e => MetaError::Backend(Box::new(e)),
    }
}

/// `None`: try the transaction again (after a pause); else its error.
pub(crate) async fn retry_or_fail(e: TxFail, attempt: u32) -> Option<MetaError> {
    let again = match &e {
        TxFail::Meta(_) | TxFail::Pool(_) => false,
        TxFail::Pg(pe) => (contended(pe) && attempt < MAX_ATTEMPTS) || (unavailable(pe) && attempt < 2),
        TxFail::Commit(pe) => contended(pe) && attempt < MAX_ATTEMPTS,
    };
    if again {
        tokio::time::sleep(backoff(attempt)).await;
        return None;
    }
    Some(match e {
        TxFail::Meta(m) => m,
        TxFail::Pool(p) => pool_err(p),
        TxFail::Pg(pe) | TxFail::Commit(pe) => pg_err(pe),
    })
}

/// 1, 2, 4... ms, up to 64, with jitter so that writers that collided do
/// not collide again.
fn backoff(attempt: u32) -> Duration {
    let base = 1u64 << attempt.min(6);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    Duration::from_micros(base * 1000 + nanos % (base * 1000))
}

/// Runs `$body` (an expression of the result's value, which may use `?` and
/// `return Err(..)`) in a transaction on `$store`, with `$tx` bound to it:
/// commits on success, rolls back on error, and runs it again on a deadlock,
/// a serialization failure or a dead pooled connection.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let r: std::result::Result<_, $crate::pg_store::TxFail> = async {
                let mut client = $store.pool.get().await?;
                let tx = client.transaction().await?;
                let out = async {
                    let $tx = &tx;
                    let v = $body;
                    Ok::<_, $crate::pg_store::TxFail>(v)
                }
                .await;
                match out {
                    Ok(v) => {
                        tx.commit().await.map_err($crate::pg_store::TxFail::Commit)?;
                        Ok(v)
                    }
                    Err(e) => {
                        // Explicitly, not on drop: a transaction left open
                        // holds its locks and GC's snapshots back.
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }
            .await;
            match r {
                Ok(v) => break Ok(v),
                Err(e) => {
                    if let Some(e) = $crate::pg_store::retry_or_fail(e, attempt).await {
                        break Err(e);
                    }
                }
            }
        }
    }};
}
pub(crate) use in_tx;

pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

pub(crate) async fn q(tx: &Transaction<'_>, sql: &str, p: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
    let st = tx.prepare_cached(sql).await?;
    tx.query(&st, p).await
}

pub(crate) async fn q1(tx: &Transaction<'_>, sql: &str, p: Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
    Ok(q(tx, sql, p).await?.into_iter().next())
}

pub(crate) async fn x(tx: &Transaction<'_>, sql: &str, p: Params<'_>) -> Result<u64, tokio_postgres::Error> {
    let st = tx.prepare_cached(sql).await?;
    tx.execute(&st, p).await
}

/// A u64 as PostgreSQL's BIGINT (values past i64::MAX saturate: they are
/// limits such as "no cutoff").
pub(crate) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn uint(v: i64) -> u64 {
    v.max(0) as u64
}

pub(crate) fn be(e: impl std::error::Error + Send + Sync + 'static) -> MetaError {
    MetaError::Backend(Box::new(e))
}

pub(crate) fn parse_digest(s: &str) -> Result<Digest> {
    s.parse().map_err(be)
}

/// Takes the advisory locks of `keys` for the transaction, in the one
/// global order, in one round trip.
pub(crate) async fn lock(tx: &Transaction<'_>, keys: Vec<String>) -> Result<(), tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    x(
        tx,
        "SELECT pg_advisory_xact_lock(h) FROM \
         (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY 1) AS s",
        &[&keys],
    )
    .await
    .map(|_| ())
}

pub(crate) fn digest_key(d: &str) -> String {
    format!("d:{d}")
}

/// The locks a write recording `digests` (and checking the quota of
/// `repo`'s project, if it has one) takes.
fn write_keys<'a>(repo: &RepoName, admission: Admission, digests: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut keys: Vec<String> = digests.into_iter().map(digest_key).collect();
    if admission.quota.is_some() {
        keys.push(format!("q:{}", repo.project()));
    }
    keys
}

/// Checks `admission` for `size` bytes of `digest` in `repo`, inside the
/// write's transaction, under its locks.
async fn admit(
    tx: &Transaction<'_>,
    repo: &RepoName,
    digest: &Digest,
    size: u64,
    admission: Admission,
) -> Result<(), TxFail> {
    if let Some(fence) = admission.fence {
        crate::pg_gc::check_fence(tx, digest, fence).await?;
    }
    if let Some(limit) = admission.quota {
        let (used, holds) = crate::pg_gc::project_usage_in(tx, repo.project(), digest.as_str()).await?;
        if !holds && used.saturating_add(size) > limit {
            return Err(Conflict::OverQuota { used, limit, size }.into());
        }
    }
    Ok(())
}

/// Appends `payloads` to the outbox in the caller's transaction; returns
/// the last sequence number (the current last if there are none). Takes the
/// counter's row lock: call it last, just before commit.
pub(crate) async fn append_outbox(tx: &Transaction<'_>, payloads: &[Vec<u8>]) -> Result<u64, tokio_postgres::Error> {
    if payloads.is_empty() {
        let row = q1(tx, "SELECT value FROM counters WHERE name = 'outbox_last'", &[]).await?;
        return Ok(row.map(|r| uint(r.get(0))).unwrap_or(0));
    }
    let n = payloads.len() as i64;
    let last: i64 = q1(
        tx,
        "UPDATE counters SET value = value + $1 WHERE name = 'outbox_last' RETURNING value",
        &[&n],
    )
    .await?
    .map(|r| r.get(0))
    .unwrap_or(0);
    let first = last - n + 1;
    let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    x(
        tx,
        "INSERT INTO outbox (seq, payload) \
         SELECT $1 + ord - 1, p FROM unnest($2::bytea[]) WITH ORDINALITY AS t(p, ord)",
        &[&first, &payloads],
    )
    .await?;
    Ok(uint(last))
}

async fn upsert_link(tx: &Transaction<'_>, repo: &str, digest: &str, size: i64) -> Result<(), tokio_postgres::Error> {
    x(
        tx,
        "INSERT INTO links (repo, digest, size) VALUES ($1, $2, $3) \
         ON CONFLICT (repo, digest) DO UPDATE SET size = EXCLUDED.size",
        &[&repo, &digest, &size],
    )
    .await
    .map(|_| ())
}

/// A duration as PostgreSQL's interval arithmetic wants it: seconds.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[async_trait]
impl MetadataStore for PostgresMetadata {
    fn shared(&self) -> bool {
        true
    }

    async fn follow_changes(&self, sink: std::sync::Arc<dyn ChangeSink>) {
        crate::pg_changes::follow(&self.config, sink).await
    }

    async fn take_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<Lease> {
        // Taken if free, expired or already ours; the expiry is on the
        // database's clock, the one clock every node shares.
        let row = self
            .row(
                "INSERT INTO leases (name, holder, expires) VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires \
                 WHERE leases.holder = EXCLUDED.holder OR leases.expires < now() \
                 RETURNING holder",
                &[&name, &holder, &secs(ttl)],
            )
            .await?;
        if row.is_some() {
            return Ok(Lease::Held);
        }
        let holder = self
            .row("SELECT holder FROM leases WHERE name = $1", &[&name])
            .await?
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default();
        Ok(Lease::Busy { holder })
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.rows("DELETE FROM leases WHERE name = $1 AND holder = $2", &[&name, &holder])
            .await
            .map(|_| ())
    }

    async fn lease_upload(&self, id: &UploadId, holder: &str, ttl: Duration) -> Result<Option<LeasedUpload>> {
        let row = self
            .row(
                "UPDATE uploads SET holder = $2, lease_until = now() + make_interval(secs => $3) \
                 WHERE id = $1 AND (holder IS NULL OR holder = $2 OR lease_until < now()) \
                 RETURNING record, hash_state",
                &[&id.as_str(), &holder, &secs(ttl)],
            )
            .await?;
        match row {
            Some(r) => Ok(Some(LeasedUpload {
                record: serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(be)?,
                hash_state: r.get(1),
            })),
            None => match self.get_upload(id).await? {
                Some(_) => Err(Conflict::UploadBusy(id.clone()).into()),
                None => Ok(None),
            },
        }
    }

    async fn release_upload(&self, id: &UploadId, holder: &str, hash_state: Option<&[u8]>) -> Result<bool> {
        let rows = self
            .rows(
                "UPDATE uploads SET holder = NULL, lease_until = NULL, hash_state = COALESCE($3, hash_state) \
                 WHERE id = $1 AND holder = $2 RETURNING 1",
                &[&id.as_str(), &holder, &hash_state],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn add_blob(&self, repo: &RepoName, digest: &Digest, size: u64, admission: Admission) -> Result<()> {
        let (r, d, sz) = (repo.as_str(), digest.as_str(), int(size));
        in_tx!(self, |tx| {
            lock(tx, write_keys(repo, admission, [d])).await?;
            admit(tx, repo, digest, size, admission).await?;
            x(
                tx,
                "INSERT INTO blobs (digest, size) VALUES ($1, $2) ON CONFLICT (digest) DO UPDATE SET size = EXCLUDED.size",
                &[&d, &sz],
            )
            .await?;
            upsert_link(tx, r, d, sz).await?;
            crate::pg_gc::touch(tx, &[d]).await?;
        })
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let row = self
            .row("SELECT size FROM blobs WHERE digest = $1", &[&digest.as_str()])
            .await?;
        Ok(row.map(|r| uint(r.get(0))))
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest, admission: Admission, events: Events) -> Result<()> {
        let (r, d) = (repo.as_str(), digest.as_str());
        in_tx!(self, |tx| {
            lock(tx, write_keys(repo, admission, [d])).await?;
            let Some(row) = q1(tx, "SELECT size FROM blobs WHERE digest = $1", &[&d]).await? else {
                return Err(Missing::Blob(digest.clone()).into());
            };
            let size: i64 = row.get(0);
            admit(tx, repo, digest, uint(size), admission).await?;
            upsert_link(tx, r, d, size).await?;
            crate::pg_gc::touch(tx, &[d]).await?;
            append_outbox(tx, &events).await?;
        })
    }

    async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let row = self
            .row(
                "SELECT size FROM links WHERE repo = $1 AND digest = $2",
                &[&repo.as_str(), &digest.as_str()],
            )
            .await?;
        Ok(row.map(|r| uint(r.get(0))))
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest, events: Events) -> Result<bool> {
        let (r, d) = (repo.as_str(), digest.as_str());
        in_tx!(self, |tx| {
            let n = x(tx, "DELETE FROM links WHERE repo = $1 AND digest = $2", &[&r, &d]).await?;
            if n > 0 {
                append_outbox(tx, &events).await?;
                // A link can be a signature's payload: other nodes' policy
                // decisions about the repository are taken again.
                notify(tx, r).await?;
            }
            n > 0
        })
    }

    async fn put_manifest(&self, repo: &RepoName, m: NewManifest) -> Result<()> {
        let r = repo.as_str();
        let d = m.digest.as_str();
        let json = serde_json::to_vec(&m.record).map_err(be)?;
        let referrer = match &m.record.subject {
            Some(subject) => {
                let desc = Descriptor {
                    media_type: m.record.media_type.clone(),
                    digest: m.digest.clone(),
                    size: m.record.size,
                    artifact_type: m.record.artifact_type.clone(),
                    annotations: m.record.annotations.clone(),
                    platform: None,
                    urls: None,
                };
                Some((subject.as_str(), serde_json::to_vec(&desc).map_err(be)?))
            }
            None => None,
        };
        // Everything this put makes referenced, or requires, is locked: a
        // sweep of any of them waits, then sees this put's touch.
        let locked: Vec<&str> = std::iter::once(d)
            .chain(m.record.blobs.iter().map(String::as_str))
            .chain(m.record.children.iter().map(String::as_str))
            .chain(m.required_blobs.iter().map(Digest::as_str))
            .chain(m.required_manifests.iter().map(Digest::as_str))
            .chain(referrer.as_ref().map(|(s, _)| *s))
            .collect();
        let required_blobs: Vec<&str> = m.required_blobs.iter().map(Digest::as_str).collect();
        let required_manifests: Vec<&str> = m.required_manifests.iter().map(Digest::as_str).collect();
        let size = int(m.record.size);
        in_tx!(self, |tx| {
            lock(tx, write_keys(repo, m.admission, locked.iter().copied())).await?;
            admit(tx, repo, &m.digest, m.record.size, m.admission).await?;
            if !required_blobs.is_empty() {
                let have = q(
                    tx,
                    "SELECT digest FROM links WHERE repo = $1 AND digest = ANY($2)",
                    &[&r, &required_blobs],
                )
                .await?;
                let have: Vec<String> = have.iter().map(|row| row.get(0)).collect();
                if let Some(b) = m.required_blobs.iter().find(|b| !have.iter().any(|h| h == b.as_str())) {
                    return Err(Missing::Reference(b.clone()).into());
                }
            }
            if !required_manifests.is_empty() {
                let have = q(
                    tx,
                    "SELECT digest FROM manifests WHERE repo = $1 AND digest = ANY($2)",
                    &[&r, &required_manifests],
                )
                .await?;
                let have: Vec<String> = have.iter().map(|row| row.get(0)).collect();
                if let Some(c) = m
                    .required_manifests
                    .iter()
                    .find(|c| !have.iter().any(|h| h == c.as_str()))
                {
                    return Err(Missing::Reference(c.clone()).into());
                }
            }
            x(
                tx,
                "INSERT INTO manifests (repo, digest, media_type, size, record) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (repo, digest) DO UPDATE SET media_type = EXCLUDED.media_type, \
                 size = EXCLUDED.size, record = EXCLUDED.record",
                &[&r, &d, &m.record.media_type, &size, &json],
            )
            .await?;
            x(
                tx,
                "DELETE FROM manifest_children WHERE repo = $1 AND parent = $2",
                &[&r, &d],
            )
            .await?;
            if !m.record.children.is_empty() {
                x(
                    tx,
                    "INSERT INTO manifest_children (repo, parent, child) \
                     SELECT DISTINCT $1::text, $2::text, c FROM unnest($3::text[]) AS c",
                    &[&r, &d, &m.record.children],
                )
                .await?;
            }
            for t in &m.tags {
                let tag = t.as_str();
                if m.fixed_tags.contains(t) {
                    // The single-winner write: created if absent, never
                    // moved. Of two puts racing for a new tag, the second
                    // waits for the first's commit and then updates nothing.
                    let kept = q1(
                        tx,
                        "INSERT INTO tags (repo, tag, digest) VALUES ($1, $2, $3) \
                         ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest \
                         WHERE tags.digest = EXCLUDED.digest RETURNING digest",
                        &[&r, &tag, &d],
                    )
                    .await?;
                    if kept.is_none() {
                        let current = q1(tx, "SELECT digest FROM tags WHERE repo = $1 AND tag = $2", &[&r, &tag])
                            .await?
                            .map(|row| row.get::<_, String>(0))
                            .unwrap_or_default();
                        return Err(Conflict::TagMoved {
                            tag: t.clone(),
                            current: parse_digest(&current)?,
                        }
                        .into());
                    }
                } else {
                    x(
                        tx,
                        "INSERT INTO tags (repo, tag, digest) VALUES ($1, $2, $3) \
                         ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest",
                        &[&r, &tag, &d],
                    )
                    .await?;
                }
            }
            if let Some((subject, desc)) = &referrer {
                x(
                    tx,
                    "INSERT INTO referrers (repo, subject, digest, descriptor) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (repo, subject, digest) DO UPDATE SET descriptor = EXCLUDED.descriptor",
                    &[&r, subject, &d, desc],
                )
                .await?;
            }
            // The manifest's own bytes, its blobs and its children are
            // referenced from now on: a collector's earlier snapshot must
            // not remove them.
            let touched: Vec<&str> = std::iter::once(d)
                .chain(m.record.blobs.iter().map(String::as_str))
                .chain(m.record.children.iter().map(String::as_str))
                .collect();
            crate::pg_gc::touch(tx, &touched).await?;
            notify(tx, r).await?;
            append_outbox(tx, &m.events).await?;
        })
    }

    async fn get_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let row = self
            .row(
                "SELECT record FROM manifests WHERE repo = $1 AND digest = $2",
                &[&repo.as_str(), &digest.as_str()],
            )
            .await?;
        row.map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(be))
            .transpose()
    }

    async fn manifest_head(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestHead>> {
        let row = self
            .row(
                "SELECT media_type, size FROM manifests WHERE repo = $1 AND digest = $2",
                &[&repo.as_str(), &digest.as_str()],
            )
            .await?;
        Ok(row.map(|r| ManifestHead {
            media_type: r.get(0),
            size: uint(r.get(1)),
        }))
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let row = self
            .row(
                "SELECT digest FROM tags WHERE repo = $1 AND tag = $2",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?;
        row.map(|r| parse_digest(r.get(0))).transpose()
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        allowed_tags: Option<&[Tag]>,
        events: Events,
    ) -> Result<bool> {
        let (r, d) = (repo.as_str(), digest.as_str());
        in_tx!(self, |tx| {
            // A put tagging this manifest holds the same lock.
            lock(tx, vec![digest_key(d)]).await?;
            let Some(old) = q1(
                tx,
                "DELETE FROM manifests WHERE repo = $1 AND digest = $2 RETURNING record",
                &[&r, &d],
            )
            .await?
            else {
                return Ok(false);
            };
            let record: ManifestRecord = serde_json::from_slice(old.get::<_, &[u8]>(0)).map_err(be)?;
            let tags = q(
                tx,
                "DELETE FROM tags WHERE repo = $1 AND digest = $2 RETURNING tag",
                &[&r, &d],
            )
            .await?;
            if let Some(allowed) = allowed_tags {
                let mut tags: Vec<String> = tags.iter().map(|row| row.get(0)).collect();
                tags.sort();
                if let Some(t) = tags.iter().find(|t| !allowed.iter().any(|a| a.as_str() == t.as_str())) {
                    return Err(Conflict::TagAdded(t.parse().map_err(be)?).into());
                }
            }
            x(
                tx,
                "DELETE FROM manifest_children WHERE repo = $1 AND parent = $2",
                &[&r, &d],
            )
            .await?;
            if let Some(subject) = &record.subject {
                x(
                    tx,
                    "DELETE FROM referrers WHERE repo = $1 AND subject = $2 AND digest = $3",
                    &[&r, subject, &d],
                )
                .await?;
            }
            notify(tx, r).await?;
            append_outbox(tx, &events).await?;
            true
        })
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag, events: Events) -> Result<bool> {
        let (r, t) = (repo.as_str(), tag.as_str());
        in_tx!(self, |tx| {
            let n = x(tx, "DELETE FROM tags WHERE repo = $1 AND tag = $2", &[&r, &t]).await?;
            if n > 0 {
                notify(tx, r).await?;
                append_outbox(tx, &events).await?;
            }
            n > 0
        })
    }

    async fn repo_exists(&self, repo: &RepoName) -> Result<bool> {
        Ok(self
            .row("SELECT 1 FROM manifests WHERE repo = $1 LIMIT 1", &[&repo.as_str()])
            .await?
            .is_some())
    }

    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let rows = self
            .rows(
                "SELECT tag FROM tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3",
                &[&repo.as_str(), &last.unwrap_or(""), &(n.min(i64::MAX as usize) as i64)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn list_repos(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        // The distinct repositories of `manifests`, one index probe each
        // (a loose index scan), instead of a count row every put would
        // update.
        let rows = self
            .rows(
                "WITH RECURSIVE r(repo) AS ( \
                   (SELECT repo FROM manifests WHERE repo > $1 ORDER BY repo LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT m.repo FROM manifests m WHERE m.repo > r.repo ORDER BY m.repo LIMIT 1) \
                   FROM r WHERE r.repo IS NOT NULL \
                 ) SELECT repo FROM r WHERE repo IS NOT NULL LIMIT $2",
                &[&last.unwrap_or(""), &(n.min(i64::MAX as usize) as i64)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>> {
        let rows = self
            .rows(
                "SELECT descriptor FROM referrers WHERE repo = $1 AND subject = $2 ORDER BY digest",
                &[&repo.as_str(), &subject.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(be))
            .collect()
    }

    async fn put_upload(&self, id: &UploadId, rec: &UploadRecord) -> Result<()> {
        let json = serde_json::to_vec(rec).map_err(be)?;
        self.rows(
            "INSERT INTO uploads (id, record) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            &[&id.as_str(), &json],
        )
        .await
        .map(|_| ())
    }

    async fn get_upload(&self, id: &UploadId) -> Result<Option<UploadRecord>> {
        let row = self
            .row("SELECT record FROM uploads WHERE id = $1", &[&id.as_str()])
            .await?;
        row.map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(be))
            .transpose()
    }

    async fn delete_upload(&self, id: &UploadId) -> Result<()> {
        self.rows("DELETE FROM uploads WHERE id = $1", &[&id.as_str()])
            .await
            .map(|_| ())
    }

    async fn stats(&self) -> Result<StoreStats> {
        let row = self
            .row(
                "SELECT (SELECT count(DISTINCT repo) FROM manifests), (SELECT count(*) FROM manifests), \
                 (SELECT count(*) FROM tags), (SELECT count(*) FROM blobs), \
                 (SELECT COALESCE(sum(size), 0)::bigint FROM blobs), (SELECT count(*) FROM uploads)",
                &[],
            )
            .await?
            .ok_or_else(|| be(std::io::Error::other("no row")))?;
        let n = |i: usize| uint(row.get::<_, i64>(i));
        Ok(StoreStats {
            repositories: n(0),
            manifests: n(1),
            tags: n(2),
            blobs: n(3),
            blob_bytes: n(4),
            uploads: n(5),
        })
    }

    async fn outbox_append(&self, payloads: Vec<Vec<u8>>) -> Result<u64> {
        in_tx!(self, |tx| append_outbox(tx, &payloads).await?)
    }

    async fn outbox_read(&self, after: u64, n: usize) -> Result<Vec<OutboxEvent>> {
        let rows = self
            .rows(
                "SELECT seq, payload FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&int(after), &(n.min(i64::MAX as usize) as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| OutboxEvent {
                seq: uint(r.get(0)),
                payload: r.get(1),
            })
            .collect())
    }

    async fn outbox_last_seq(&self) -> Result<u64> {
        let row = self
            .row("SELECT value FROM counters WHERE name = 'outbox_last'", &[])
            .await?;
        Ok(row.map(|r| uint(r.get(0))).unwrap_or(0))
    }

    async fn outbox_cursor(&self, endpoint: &str) -> Result<u64> {
        let row = self
            .row("SELECT seq FROM outbox_cursors WHERE endpoint = $1", &[&endpoint])
            .await?;
        Ok(row.map(|r| uint(r.get(0))).unwrap_or(0))
    }

    async fn outbox_advance(&self, endpoint: &str, seq: u64, dead: Option<DeadLetter>) -> Result<()> {
        let dead = dead
            .map(|d| serde_json::to_vec(&d).map(|j| (int(d.seq), j)))
            .transpose()
            .map_err(be)?;
        let seq = int(seq);
        in_tx!(self, |tx| {
            x(
                tx,
                "INSERT INTO outbox_cursors (endpoint, seq) VALUES ($1, $2) \
                 ON CONFLICT (endpoint) DO UPDATE SET seq = GREATEST(outbox_cursors.seq, EXCLUDED.seq)",
                &[&endpoint, &seq],
            )
            .await?;
            if let Some((dseq, json)) = &dead {
                x(
                    tx,
                    "INSERT INTO dead_letters (endpoint, seq, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (endpoint, seq) DO UPDATE SET record = EXCLUDED.record",
                    &[&endpoint, dseq, json],
                )
                .await?;
            }
        })
    }

    async fn outbox_prune(&self, seq: u64) -> Result<u64> {
        let seq = int(seq);
        in_tx!(self, |tx| x(tx, "DELETE FROM outbox WHERE seq <= $1", &[&seq]).await?)
    }

    async fn dead_letters(&self, endpoint: &str) -> Result<Vec<DeadLetter>> {
        let rows = self
            .rows(
                "SELECT record FROM dead_letters WHERE endpoint = $1 ORDER BY seq",
                &[&endpoint],
            )
            .await?;
        rows.iter()
            .map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(be))
            .collect()
    }

    async fn gc_snapshot(&self) -> Result<crate::GcSnapshot> {
        crate::pg_gc::snapshot(self).await
    }

    async fn sweep_blobs(&self, candidates: &[Digest], guard: crate::SweepGuard) -> Result<Vec<crate::SweptBlob>> {
        crate::pg_gc::sweep_blobs(self, candidates, guard).await
    }

    async fn byte_fence(&self, digest: &Digest) -> Result<u64> {
        crate::pg_gc::byte_fence(self, digest).await
    }

    async fn release_claims(&self, digests: &[Digest]) -> Result<()> {
        crate::pg_gc::release_claims(self, digests).await
    }

    async fn unreleased_claims(&self, released_before: u64) -> Result<Vec<Digest>> {
        crate::pg_gc::unreleased_claims(self, released_before).await
    }

    async fn sweep_manifests(&self, ms: &[crate::ManifestSweep], guard: crate::SweepGuard) -> Result<Vec<Option<u64>>> {
        crate::pg_gc::sweep_manifests(self, ms, guard).await
    }

    async fn project_usage(&self, project: &str) -> Result<u64> {
        Ok(crate::pg_gc::project_usage(self, project, "").await?.0)
    }

    async fn project_holds(&self, project: &str, digest: &Digest) -> Result<bool> {
        Ok(crate::pg_gc::project_usage(self, project, digest.as_str()).await?.1)
    }

    async fn record_pulls(&self, pulls: &[(String, String, u64)]) -> Result<()> {
        crate::pg_gc::record_pulls(self, pulls).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg_cluster::TestCluster;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_backend_passes_the_shared_suites() {
        let Some(cluster) = TestCluster::start() else { return };
        let url = cluster.create_database("suite").await;
        let store = PostgresMetadata::connect(&url).await.unwrap();
        assert_eq!(store.schema().applied, vec![1, 2]);
        crate::testsuite::run_all(&store).await;
        crate::identity_testsuite::run_all(&store).await;
    }

    /// Nodes starting at once on a new database: every one comes up, the
    /// schema is migrated once, and a later start finds nothing to do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_run_once_however_many_nodes_start_at_once() {
        let Some(cluster) = TestCluster::start() else { return };
        let url = cluster.create_database("migrate").await;
        let starts = (0..4).map(|_| {
            let url = url.clone();
            async move { PostgresMetadata::connect(&url).await }
        });
        let stores: Vec<PostgresMetadata> = spawn_all(starts).await;
        let applied: Vec<&Vec<i32>> = stores
            .iter()
            .map(|s| &s.schema().applied)
            .filter(|a| !a.is_empty())
            .collect();
        assert_eq!(applied, vec![&vec![1, 2]], "exactly one start migrated");
        let rows = stores[0]
            .rows("SELECT version FROM schema_migrations", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), crate::pg_schema::MIGRATIONS.len());
        let again = PostgresMetadata::connect(&url).await.unwrap();
        assert!(again.schema().applied.is_empty());
        assert_eq!(again.schema().version, 2);
        // A schema from a newer berth is refused, not written to.
        again
            .rows(
                "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')",
                &[],
            )
            .await
            .unwrap();
        let Err(e) = PostgresMetadata::connect(&url).await else {
            panic!("a newer schema must be refused")
        };
        assert!(
            matches!(e, OpenError::Migrate(MigrateError::TooNew { found: 999, known: 2 })),
            "{e:?}"
        );
    }

    /// Runs each start on its own task, at once, and waits for all.
    async fn spawn_all<F>(fs: impl Iterator<Item = F>) -> Vec<PostgresMetadata>
    where
        F: std::future::Future<Output = Result<PostgresMetadata, OpenError>> + Send + 'static,
    {
        let handles: Vec<_> = fs.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap().unwrap());
        }
        out
    }

    /// Two nodes (two stores, two pools) on one database: of puts racing
    /// for one new fixed tag one wins, and concurrent pushes through both
    /// never take a project over its quota. Several rounds, so the writes
    /// really interleave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_agree_on_fixed_tags_and_quotas() {
        let Some(cluster) = TestCluster::start() else { return };
        let url = cluster.create_database("nodes").await;
        let (a, b) = (
            PostgresMetadata::connect(&url).await.unwrap(),
            PostgresMetadata::connect(&url).await.unwrap(),
        );
        let quota = Admission {
            quota: Some(1_000),
            fence: None,
        };
        for round in 0..5 {
            let repo: RepoName = format!("nodes{round}/app").parse().unwrap();
            let tag: Tag = "v1".parse().unwrap();
            let put = |seed: &str| NewManifest {
                digest: Digest::sha256(format!("{round}-{seed}").as_bytes()),
                record: ManifestRecord {
                    media_type: oci::media::OCI_MANIFEST.into(),
                    size: 10,
                    artifact_type: None,
                    subject: None,
                    annotations: None,
                    blobs: vec![],
                    children: vec![],
                    created: 1,
                    cached_from: None,
                },
                required_blobs: vec![],
                required_manifests: vec![],
                tags: vec![tag.clone()],
                fixed_tags: vec![tag.clone()],
                admission: Admission::default(),
                events: vec![b"push".to_vec()],
            };
            let (x, y) = tokio::join!(a.put_manifest(&repo, put("a")), b.put_manifest(&repo, put("b")));
            assert_eq!(
                [&x, &y].iter().filter(|r| r.is_ok()).count(),
                1,
                "one winner: {x:?} {y:?}"
            );
            let winner = if x.is_ok() { put("a").digest } else { put("b").digest };
            assert_eq!(b.resolve_tag(&repo, &tag).await.unwrap(), Some(winner));

            let blob: Vec<Digest> = (0..4)
                .map(|i| Digest::sha256(format!("{round}-blob-{i}").as_bytes()))
                .collect();
            let (r1, r2, r3, r4) = tokio::join!(
                a.add_blob(&repo, &blob[0], 400, quota),
                b.add_blob(&repo, &blob[1], 400, quota),
                a.add_blob(&repo, &blob[2], 400, quota),
                b.add_blob(&repo, &blob[3], 400, quota),
            );
            let admitted = [&r1, &r2, &r3, &r4].iter().filter(|r| r.is_ok()).count();
            // 10 bytes of manifest are held already: two 400-byte blobs fit.
            assert_eq!(admitted, 2, "{r1:?} {r2:?} {r3:?} {r4:?}");
            assert!(a.project_usage(repo.project()).await.unwrap() <= 1_000);
        }
        // One event per winning put, numbered without gaps or repeats.
        let events = a.outbox_read(0, 100).await.unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=5).collect::<Vec<u64>>());
    }

    /// Two nodes appending at once while a reader follows the outbox with
    /// a cursor, as a webhook deliverer does: numbers follow commit order,
    /// so the reader, which never looks back, sees every event once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_reader_following_the_outbox_misses_nothing_two_nodes_append() {
        let Some(cluster) = TestCluster::start() else { return };
        let url = cluster.create_database("outbox").await;
        let (a, b, r) = (
            std::sync::Arc::new(PostgresMetadata::connect(&url).await.unwrap()),
            std::sync::Arc::new(PostgresMetadata::connect(&url).await.unwrap()),
            PostgresMetadata::connect(&url).await.unwrap(),
        );
        const EACH: u64 = 100;
        let writer = |s: std::sync::Arc<PostgresMetadata>, name: &'static str| {
            tokio::spawn(async move {
                for i in 0..EACH {
                    s.outbox_append(vec![format!("{name}{i}").into_bytes()]).await.unwrap();
                }
            })
        };
        let (wa, wb) = (writer(a, "a"), writer(b, "b"));
        let (mut cursor, mut seen) = (0u64, Vec::new());
        // Bounded: the writers finish; then one more read drains the rest.
        let mut done = false;
        while !done {
            done = wa.is_finished() && wb.is_finished();
            for e in r.outbox_read(cursor, 7).await.unwrap() {
                assert!(e.seq > cursor);
                cursor = e.seq;
                seen.push(e.payload);
            }
        }
        while let Some(page) = Some(r.outbox_read(cursor, 50).await.unwrap()).filter(|p| !p.is_empty()) {
            for e in page {
                cursor = e.seq;
                seen.push(e.payload);
            }
        }
        assert_eq!(seen.len() as u64, 2 * EACH, "every event, once");
        assert_eq!(cursor, 2 * EACH);
    }

    /// What a change feed told its sink.
    #[derive(Default)]
    struct Heard {
        changed: std::sync::Mutex<Vec<String>>,
        caught_up: std::sync::Mutex<Option<std::time::Instant>>,
        resets: std::sync::atomic::AtomicUsize,
    }

    impl ChangeSink for Heard {
        fn changed(&self, repo: &str) {
            self.changed.lock().unwrap().push(repo.to_string());
        }
        fn caught_up(&self, at: std::time::Instant) {
            *self.caught_up.lock().unwrap() = Some(at);
        }
        fn reset(&self) {
            self.resets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            *self.caught_up.lock().unwrap() = None;
        }
    }

    impl Heard {
        /// Waits (boundedly) for a proof that every change committed before
        /// `t` was heard, and returns what was heard.
        async fn after(&self, t: std::time::Instant) -> Vec<String> {
            for _ in 0..400 {
                if self.caught_up.lock().unwrap().is_some_and(|at| at > t) {
                    return std::mem::take(&mut *self.changed.lock().unwrap());
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("the feed never caught up");
        }
    }

    fn manifest(seed: &str, tag: &str) -> NewManifest {
        NewManifest {
            digest: Digest::sha256(seed.as_bytes()),
            record: ManifestRecord {
                media_type: oci::media::OCI_MANIFEST.into(),
                size: 10,
                artifact_type: None,
                subject: None,
                annotations: None,
                blobs: vec![],
                children: vec![],
                created: 1,
                cached_from: None,
            },
            required_blobs: vec![],
            required_manifests: vec![],
            tags: vec![tag.parse().unwrap()],
            fixed_tags: vec![],
            admission: Admission::default(),
            events: vec![],
        }
    }

    /// One node follows the feed while another writes: once the feed
    /// says it caught up with a moment, every change committed before that
    /// moment was heard, puts and deletes alike, also after the feed's
    /// connection was killed under it (it says so with a reset first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_change_feed_proves_it_heard_every_change_before_a_moment() {
        let Some(cluster) = TestCluster::start() else { return };
        let url = cluster.create_database("feed").await;
        let a = std::sync::Arc::new(PostgresMetadata::connect(&url).await.unwrap());
        let b = PostgresMetadata::connect(&url).await.unwrap();
        let heard = std::sync::Arc::new(Heard::default());
        let feed = tokio::spawn({
            let (a, heard) = (a.clone(), heard.clone());
            async move { a.follow_changes(heard).await }
        });
        heard.after(std::time::Instant::now()).await;
        let repo: RepoName = "feed/app".parse().unwrap();
        let m = manifest("feed-1", "v1");
        b.put_manifest(&repo, m.clone()).await.unwrap();
        assert_eq!(heard.after(std::time::Instant::now()).await, ["feed/app"]);
        // Nothing changed, nothing heard.
        assert!(heard.after(std::time::Instant::now()).await.is_empty());
        b.delete_tag(&repo, &"v1".parse().unwrap(), vec![]).await.unwrap();
        // A delete of nothing changes nothing.
        b.delete_tag(&repo, &"v1".parse().unwrap(), vec![]).await.unwrap();
        assert_eq!(heard.after(std::time::Instant::now()).await, ["feed/app"]);

        let resets = heard.resets.load(std::sync::atomic::Ordering::SeqCst);
        let killed = b
            .rows(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE query LIKE 'SELECT pg_notify($1, $2)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(killed.len(), 1, "the feed's connection");
        // Written while the feed may be down: either heard, or covered by
        // the reset the feed makes before it proves anything again.
        b.delete_manifest(&repo, &m.digest, None, vec![]).await.unwrap();
        heard.after(std::time::Instant::now()).await;
        assert!(heard.resets.load(std::sync::atomic::Ordering::SeqCst) > resets);
        b.put_manifest(&repo, manifest("feed-2", "v2")).await.unwrap();
        assert_eq!(heard.after(std::time::Instant::now()).await, ["feed/app"]);
        feed.abort();
    }

    #[tokio::test]
    async fn a_failed_connect_says_what_to_check() {
        // A loopback port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let Err(e) = PostgresMetadata::connect(&format!("postgres://berth:secret@127.0.0.1:{port}/registry")).await
        else {
            panic!("nothing listens there")
        };
        let msg = crate::error_chain(&e);
        assert!(
            msg.contains(&format!("127.0.0.1:{port} (database registry, user berth)")),
            "{msg}"
        );
        assert!(msg.contains("check that PostgreSQL runs"), "{msg}");
        assert!(!msg.contains("secret"), "the password stays out of messages: {msg}");
        let Err(e) = PostgresMetadata::connect("postgres://[nonsense").await else {
            panic!("not a URL")
        };
        assert!(matches!(e, OpenError::Url(_)), "{e:?}");
    }

    /// PostgreSQL going away fails calls at once with `Retryable` (a 503 for
    /// clients), and the same store works again when it is back: the pooled
    /// connections it cut are replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_is_retryable_and_the_store_recovers() {
        let Some(mut cluster) = TestCluster::start() else {
            return;
        };
        let url = cluster.create_database("outage").await;
        let store = PostgresMetadata::connect(&url).await.unwrap();
        let repo: RepoName = "outage/app".parse().unwrap();
        let d = Digest::sha256(b"outage");
        store.add_blob(&repo, &d, 1, Admission::default()).await.unwrap();
        cluster.stop_server();
        // Each call returns on the refused connect (no waiting for the pool:
        // POOL_WAIT bounds it otherwise); no timing is asserted here.
        let err = store.linked_blob(&repo, &d).await.unwrap_err();
        assert!(matches!(err, MetaError::Retryable(_)), "{err:?}");
        let err = store.add_blob(&repo, &d, 1, Admission::default()).await.unwrap_err();
        assert!(matches!(err, MetaError::Retryable(_)), "{err:?}");
        assert!(cluster.start_server());
        assert_eq!(store.linked_blob(&repo, &d).await.unwrap(), Some(1));
        store.add_blob(&repo, &d, 1, Admission::default()).await.unwrap();
    }
}
