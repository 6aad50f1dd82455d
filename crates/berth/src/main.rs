//! The `berth` binary: argument parsing and subcommands. Each subcommand
//! lives in its own module; this file only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A request allocates and frees many small objects (headers, the log
/// line, futures) across threads; glibc's malloc took 16 % of the CPU
/// serving small responses, mimalloc much less (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where transparent huge pages are on for everything
/// (`/sys/kernel/mm/transparent_hugepage/enabled` = `always`), each 2 MiB
/// region mimalloc touches becomes resident whole: peak RSS under 400
/// connections went from 32 to 66-120 MiB. berth's heap is small and
/// scattered, so it gains nothing from huge pages; opt the process out.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: sets a flag of this process; no memory is touched.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

mod accounts;
mod backends;
mod background;
mod config;
mod diagnose_cmd;
mod fsck;
mod gc;
mod logging;
mod migrate;
mod secrets;
mod serve;
mod server;
mod signature_config;
mod storage_location;
mod watch;
mod write_deadline;
mod zero_copy;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A container image registry and its operations toolkit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up; the size of the serve options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the registry (OCI Distribution Spec 1.1).
    Serve(Box<config::ServeArgs>),
    /// Manage users (with berth stopped; while it runs, use /api/v1/users).
    User {
        #[command(flatten)]
        store: accounts::Store,
        #[command(subcommand)]
        cmd: accounts::UserCmd,
    },
    /// Manage projects and their members.
    Project {
        #[command(flatten)]
        store: accounts::Store,
        #[command(subcommand)]
        cmd: accounts::ProjectCmd,
    },
    /// Manage robot accounts (scoped, expiring credentials for automation).
    Robot {
        #[command(flatten)]
        store: accounts::Store,
        #[command(subcommand)]
        cmd: accounts::RobotCmd,
    },
    /// Query the audit log of pushes, pulls, deletes, failed logins and
    /// permission changes.
    Audit(accounts::AuditArgs),
    /// Load-test a registry (berth or any other): seed it, then measure a
    /// scenario's throughput and latency.
    Bench(Box<bench::BenchArgs>),
    /// Collect garbage on a data directory with berth stopped: unreferenced
    /// blobs, abandoned uploads and (per project, if asked) untagged
    /// manifests. A running berth does this itself (--gc-interval).
    Gc(gc::GcArgs),
    /// Verify every blob's digest and size and the metadata's references,
    /// with berth stopped; --repair fixes what is safe to fix.
    Fsck(fsck::FsckArgs),
    /// Apply retention rules once (untag old images), with berth stopped;
    /// a running berth applies --retention before each GC run.
    Retention(gc::RetentionArgs),
    /// Storage used per project and repository, and what shared layers save.
    Du(fsck::DuArgs),
    /// Walk the pull path of an image (DNS, TCP, TLS, auth, tag, manifest,
    /// platform, blobs) and name the root cause of a failing pull, with the fix.
    Diagnose(diagnose_cmd::DiagnoseArgs),
    /// Find an image's cosign signatures (the .sig tag, Sigstore bundles) on
    /// any registry, check them against trusted keys, print who signed and
    /// the verdict.
    Verify(diagnose_cmd::VerifyArgs),
    /// The deployment guard: deploy services on the Docker Engine by
    /// digest, gate them on Running and health, roll back, pause, review.
    Watch(watch::WatchArgs),
    /// Bring the PostgreSQL metadata database's schema up to date (berth
    /// serve also does this at start).
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::User { store, cmd } => accounts::user(store, cmd),
        Command::Project { store, cmd } => accounts::project(store, cmd),
        Command::Robot { store, cmd } => accounts::robot(store, cmd),
        Command::Audit(args) => accounts::audit_cmd(args),
        Command::Bench(args) => bench::run(*args).map_err(Into::into),
        Command::Gc(args) => gc::run(args),
        Command::Fsck(args) => fsck::fsck(args),
        Command::Retention(args) => gc::retention(args),
        Command::Du(args) => fsck::du(args),
        Command::Diagnose(args) => return diagnose_cmd::run(args),
        Command::Verify(args) => return diagnose_cmd::verify(args),
        Command::Watch(args) => watch::run(args),
        Command::Migrate(args) => migrate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
