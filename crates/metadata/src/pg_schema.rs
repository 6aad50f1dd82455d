//! The PostgreSQL schema and its versioned migrations. They run at start
//! (`PostgresMetadata::connect`) and from `berth migrate`, in one
//! transaction that records each in `schema_migrations`, under an advisory
//! lock: nodes starting at once apply every migration exactly once.
//!
//! Every text key is `COLLATE "C"`: listings page in byte order, as the
//! embedded backend does, whatever the database's default collation.

/// Taken (for the transaction) by whoever migrates; the value is arbitrary
/// but fixed forever.
const MIGRATION_LOCK: i64 = 0x6265_7274_685f_6d67; // "berth_mg"

/// (version, name, SQL). Append only: a released migration never changes.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "initial schema", V1), (2, "leases", V2)];

const V1: &str = r#"
CREATE TABLE blobs (
    digest TEXT COLLATE "C" PRIMARY KEY,
    size BIGINT NOT NULL
);
-- Which repository may read which blob.
CREATE TABLE links (
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (repo, digest)
);
-- GC removes the links of a swept blob without scanning every repository.
CREATE INDEX links_by_digest ON links (digest);
CREATE TABLE manifests (
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    media_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    -- The whole ManifestRecord as JSON; media_type and size are copied out
    -- so a manifest GET reads two columns, not the annotations.
    record BYTEA NOT NULL,
    PRIMARY KEY (repo, digest)
);
-- The children of an index, so GC asks "is it a child?" through an index.
CREATE TABLE manifest_children (
    repo TEXT COLLATE "C" NOT NULL,
    parent TEXT COLLATE "C" NOT NULL,
    child TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo, parent, child)
);
CREATE INDEX manifest_children_by_child ON manifest_children (repo, child);
CREATE TABLE tags (
    repo TEXT COLLATE "C" NOT NULL,
    tag TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo, tag)
);
CREATE INDEX tags_by_digest ON tags (repo, digest);
CREATE TABLE referrers (
    repo TEXT COLLATE "C" NOT NULL,
    subject TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    descriptor BYTEA NOT NULL,
    PRIMARY KEY (repo, subject, digest)
);
CREATE TABLE uploads (
    id TEXT COLLATE "C" PRIMARY KEY,
    record BYTEA NOT NULL
);
-- The event outbox. Numbers come from counters.outbox_last, whose row lock
-- the appending transaction holds until it commits: numbers are handed out
-- in commit order, so a reader past N never misses an event numbered below.
CREATE TABLE outbox (
    seq BIGINT PRIMARY KEY,
    payload BYTEA NOT NULL
);
CREATE TABLE outbox_cursors (
    endpoint TEXT COLLATE "C" PRIMARY KEY,
    seq BIGINT NOT NULL
);
CREATE TABLE dead_letters (
    endpoint TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (endpoint, seq)
);
CREATE TABLE counters (
    name TEXT COLLATE "C" PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('outbox_last', 0);
-- The last write that committed, linked or referenced a digest: its time
-- and its transaction id (see pg_gc).
CREATE TABLE gc_touched (
    digest TEXT COLLATE "C" PRIMARY KEY,
    time BIGINT NOT NULL,
    seq BIGINT NOT NULL
);
CREATE TABLE gc_claims (
    digest TEXT COLLATE "C" PRIMARY KEY,
    seq BIGINT NOT NULL,
    released BIGINT NOT NULL
);
CREATE TABLE tag_pulls (
    repo TEXT COLLATE "C" NOT NULL,
    tag TEXT COLLATE "C" NOT NULL,
    time BIGINT NOT NULL,
    PRIMARY KEY (repo, tag)
);
CREATE TABLE users (
    name TEXT COLLATE "C" PRIMARY KEY,
    record BYTEA NOT NULL
);
CREATE TABLE projects (
    name TEXT COLLATE "C" PRIMARY KEY,
    record BYTEA NOT NULL
);
CREATE TABLE members (
    project TEXT COLLATE "C" NOT NULL,
    member TEXT COLLATE "C" NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (project, member)
);
CREATE INDEX members_by_member ON members (member);
CREATE TABLE robots (
    name TEXT COLLATE "C" PRIMARY KEY,
    record BYTEA NOT NULL
);
"#;

/// Several nodes: leases (one node at a time runs GC, writes to an upload),
/// and the hash state an upload's last append saved for the next node.
const V2: &str = r#"
ALTER TABLE uploads
    ADD COLUMN holder TEXT,
    ADD COLUMN lease_until TIMESTAMPTZ,
    ADD COLUMN hash_state BYTEA;
CREATE TABLE leases (
    name TEXT COLLATE "C" PRIMARY KEY,
    holder TEXT NOT NULL,
    expires TIMESTAMPTZ NOT NULL
);
"#;

/// What `migrate` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The schema version now.
    pub version: i32,
    /// The versions this call applied (empty: it was up to date).
    pub applied: Vec<i32>,
}

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migrating the PostgreSQL schema failed")]
    Postgres(#[from] tokio_postgres::Error),
    /// A newer berth migrated this database: this one does not know its
    /// schema and must not write to it.
    #[error(
        "the database's schema is at version {found}, newer than this berth knows ({known}); \
         run the berth version that migrated it, or a newer one"
    )]
    TooNew { found: i32, known: i32 },
}

/// Applies every migration not yet applied, in order, in one transaction
/// under the migration lock (a second node starting at once waits, then
/// finds nothing to do).
pub(crate) async fn migrate(client: &mut deadpool_postgres::Client) -> Result<Migrated, MigrateError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if let Some(&found) = done.iter().max().filter(|v| **v > known) {
        return Err(MigrateError::TooNew { found, known });
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(Migrated {
        version: known,
        applied,
    })
}
