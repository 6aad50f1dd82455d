//! `berth migrate`: brings a PostgreSQL metadata database's schema up to
//! date and says what it did. `berth serve` does the same at start; running
//! it first lets an operator migrate once, before rolling out new nodes.

use clap::Args;

use crate::backends::MetadataLocation;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The PostgreSQL database, `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
    #[arg(long, env = "BERTH_METADATA", value_name = "URL")]
    pub metadata: Option<String>,
}

pub fn run(args: MigrateArgs) -> Result<(), BoxError> {
    let location: MetadataLocation = args.metadata.as_deref().unwrap_or("").parse()?;
    let MetadataLocation::Postgres(url) = location else {
        return Err(
            "berth migrate migrates a PostgreSQL metadata database: pass --metadata \
                    postgres://USER:PASSWORD@HOST:PORT/DATABASE (or set BERTH_METADATA). The embedded database \
                    needs no migrations: berth creates its tables when it opens it"
                .into(),
        );
    };
    migrate(&url)
}

#[cfg(feature = "postgres")]
fn migrate(url: &str) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let store = rt.block_on(crate::backends::connect_postgres(url))?;
    let schema = store.schema();
    let names = |v: &i32| {
        metadata::pg_schema::MIGRATIONS
            .iter()
            .find(|m| m.0 == *v)
            .map_or(String::new(), |m| format!("{v} ({})", m.1))
    };
    if schema.applied.is_empty() {
        println!("schema at version {}: already up to date", schema.version);
    } else {
        let applied: Vec<String> = schema.applied.iter().map(names).collect();
        println!("schema at version {}: applied {}", schema.version, applied.join(", "));
    }
    Ok(())
}

#[cfg(not(feature = "postgres"))]
fn migrate(_url: &str) -> Result<(), BoxError> {
    Err(crate::backends::NO_POSTGRES.into())
}
