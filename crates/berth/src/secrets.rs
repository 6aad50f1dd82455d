//! File modes for what holds secrets: the data directory is created 0700
//! and the database, audit log and token key 0600, whatever the umask
//! (the database holds password hashes, the key signs every token). Files
//! an older berth or an administrator left readable by others are reported
//! at startup with the command that fixes them.

use std::path::Path;

/// Creates `dir` (and missing parents) readable by its owner only; warns if
/// it already exists and others may read it.
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    let existed = dir.is_dir();
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    if existed {
        warn_if_exposed(dir, "the data directory");
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 if it does not exist (so the program
/// that fills it, redb, cannot create it with the umask's mode); warns if
/// it exists and others may read it.
pub fn prepare_private_file(path: &Path, what: &str) -> Result<(), String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            warn_if_exposed(path, what);
            Ok(())
        }
        Err(e) => Err(format!("cannot create {what} {}: {e}", path.display())),
    }
}

/// Logs a warning, with the fix, if group or others have any access to
/// `path`.
pub fn warn_if_exposed(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else { return };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let fix = if meta.is_dir() { "700" } else { "600" };
            tracing::warn!(
                path = %path.display(),
                mode = %format!("{mode:04o}"),
                "{what} is readable by other local users; restrict it with: chmod {fix} {}",
                path.display()
            );
        }
    }
}
