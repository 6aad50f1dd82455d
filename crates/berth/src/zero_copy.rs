//! The plain-TCP connection stream: writes of blob bytes that are mapped
//! windows of a blob file (`storage::fs::file_region`) go out with
//! `sendfile`, straight from the page cache, instead of being copied from
//! the mapping into the socket. Everything else passes through unchanged.
//!
//! Only plain TCP connections use it: under TLS the bytes must be encrypted
//! by the process, so they are copied anyway.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

pub struct PlainStream(pub TcpStream);

impl PlainStream {
    /// Sends up to `n` bytes of `file` from `offset`, when the socket can
    /// take them.
    #[cfg(target_os = "linux")]
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: u64,
        n: usize,
    ) -> Poll<io::Result<usize>> {
        use std::os::fd::AsRawFd;
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            let sent = self.0.try_io(Interest::WRITABLE, || {
                let mut off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
                // SAFETY: two open descriptors and a local offset; the
                // kernel reads the file's pages, not our memory.
                let r = unsafe { libc::sendfile(self.0.as_raw_fd(), file.as_raw_fd(), &mut off, n) };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// `sendfile` for `buf` if it is a file region, else `None`.
    fn poll_region(&self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        #[cfg(target_os = "linux")]
        if let Some((file, offset, n)) = storage::fs::file_region(buf) {
            return Some(self.poll_sendfile(cx, &file, offset, n));
        }
        let _ = (cx, buf);
        None
    }
}

impl AsyncRead for PlainStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(p) = self.poll_region(cx, buf) {
            return p;
        }
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    /// A file region at the front goes alone, by `sendfile`; otherwise the
    /// slices before the first file region go in one `writev`. A partial
    /// write is what the caller expects either way.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let bufs = match bufs.iter().position(|b| !b.is_empty()) {
            Some(first) => &bufs[first..],
            None => return Poll::Ready(Ok(0)),
        };
        if let Some(p) = self.poll_region(cx, &bufs[0]) {
            return p;
        }
        #[cfg(target_os = "linux")]
        let bufs = match bufs[1..].iter().position(|b| storage::fs::file_region(b).is_some()) {
            Some(region) => &bufs[..=region],
            None => bufs,
        };
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
