//! `berth fsck` and `berth du`: check and measure a stopped registry's data
//! directory.

use std::io::{IsTerminal, Write};

use clap::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args, Debug)]
pub struct FsckArgs {
    #[command(flatten)]
    pub store: crate::accounts::Store,
    #[command(flatten)]
    pub storage: crate::storage_location::StorageArgs,
    /// Fix what is safe to fix: drop records and links of missing or corrupt
    /// blobs (clients then push them again) and tags of missing manifests.
    #[arg(long)]
    pub repair: bool,
}

#[derive(Args, Debug)]
pub struct DuArgs {
    #[command(flatten)]
    pub store: crate::accounts::Store,
    #[command(flatten)]
    pub storage: crate::storage_location::StorageArgs,
}

/// Exits with failure when anything is found (and not repaired), so scripts
/// can act on it.
pub fn fsck(args: FsckArgs) -> Result<(), BoxError> {
    let (rt, registry) =
        crate::gc::open_offline(&args.store, &args.storage, "fsck", registry::RegistryConfig::default())?;
    let tty = std::io::stderr().is_terminal();
    let progress = move |done: u64, total: u64| {
        // A counter line, only for a person watching.
        if tty && (done & 63 == 0 || done == total) {
            let mut err = std::io::stderr();
            let _ = write!(err, "\rfsck: verified {done}/{total} blobs");
            if done == total {
                let _ = writeln!(err);
            }
        }
    };
    let report = rt
        .block_on(registry.fsck(args.repair, &progress))
        .map_err(|e| format!("fsck failed: {e}"))?;
    for f in &report.findings {
        println!("{f}");
    }
    println!(
        "checked {} blobs ({} bytes): {} problems{}",
        report.blobs_checked,
        report.bytes_checked,
        report.findings.len(),
        if args.repair {
            format!(", {} repairs", report.repaired)
        } else {
            String::new()
        }
    );
    let left = report
        .findings
        .iter()
        .filter(|f| !args.repair || !f.repairable())
        .count();
    if left == 0 {
        Ok(())
    } else if args.repair {
        Err("problems remain that are not safe to repair automatically; see above".into())
    } else {
        Err("problems found; run berth fsck --repair to fix what is safe to fix".into())
    }
}

pub fn du(args: DuArgs) -> Result<(), BoxError> {
    let (rt, registry) =
        crate::gc::open_offline(&args.store, &args.storage, "du", registry::RegistryConfig::default())?;
    let u = rt.block_on(registry.usage()).map_err(|e| format!("du failed: {e}"))?;
    println!("{:>14}  project", "bytes");
    for (p, n) in &u.projects {
        println!("{n:>14}  {p}");
    }
    println!("{:>14}  repository", "bytes");
    for (r, n) in &u.repos {
        println!("{n:>14}  {r}");
    }
    println!(
        "stored {} bytes; without deduplication {} bytes; saved {} bytes",
        u.stored,
        u.logical,
        u.saved()
    );
    Ok(())
}
