//! A connection stream that gives up on a client that stops reading: when
//! a write has made no progress for the client timeout, the write fails
//! with `TimedOut`, hyper drops the connection, and its socket, its open
//! blob file and its share of a response body are freed.
//!
//! It wraps the stream under hyper, so it covers HTTP/1.1 and HTTP/2, plain
//! and TLS alike, and every response however it is produced (a manifest
//! from memory, a blob by `sendfile`). Reads are untouched: the request
//! head and body have their own timeouts.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use observe::metrics::ConnectionMetrics;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Armed when a write first returns `Pending`; disarmed by progress.
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    metrics: ConnectionMetrics,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, timeout: Duration, metrics: ConnectionMetrics) -> Self {
        WriteDeadline {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
            metrics,
        }
    }

    fn guard<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            self.sleep.as_mut().reset(Instant::now() + self.timeout);
            self.armed = true;
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.metrics.write_timed_out();
                tracing::debug!(
                    secs = self.timeout.as_secs(),
                    "closing a connection whose client stopped reading"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing for the client timeout",
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_reader_that_stops_times_the_write_out() {
        // A 4 KiB pipe nobody reads.
        let (ours, _theirs) = tokio::io::duplex(4096);
        let counter = ConnectionMetrics::default();
        let mut s = WriteDeadline::new(ours, Duration::from_millis(200), counter.clone());
        let started = std::time::Instant::now();
        let err = s.write_all(&vec![0u8; 1 << 20]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(counter.write_timeouts(), 1);
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let mut s = WriteDeadline::new(ours, Duration::from_millis(300), ConnectionMetrics::default());
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            let mut n = 0;
            // Slower than the whole write would take at full speed, but
            // never silent for the timeout.
            while n < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                n += theirs.read(&mut buf).await.unwrap();
            }
            n
        });
        s.write_all(&vec![0u8; 64 * 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 64 * 1024);
    }
}
