//! Space on the filesystem that holds the data directory.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes in use (as `df` counts them: size minus free).
    pub used: u64,
    /// Bytes an unprivileged writer can still use.
    pub available: u64,
    pub size: u64,
}

pub fn usage(path: &Path) -> io::Result<DiskUsage> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs reads a NUL-terminated path and writes the struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    let size = st.f_blocks as u64 * unit;
    let free = st.f_bfree as u64 * unit;
    Ok(DiskUsage {
        used: size.saturating_sub(free),
        available: st.f_bavail as u64 * unit,
        size,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_of_a_real_directory() {
        let d = super::usage(std::path::Path::new("/")).unwrap();
        assert!(d.size > 0 && d.used <= d.size && d.available <= d.size);
        assert!(super::usage(std::path::Path::new("/no/such/dir")).is_err());
    }
}
