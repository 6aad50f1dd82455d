//! Blob fills: one download from the upstream per (repository, blob), however
//! many clients ask at once. The download writes into an upload session of
//! the cache repository (hashed as it streams, verified and committed like
//! a push); every waiting client reads the upload file as it grows, so the
//! first byte reaches a client without waiting for the whole blob.
//!
//! A client never receives the last byte of a blob before the digest is
//! verified: a corrupt or truncated upstream transfer ends every client's
//! response with an error, never with a complete wrong body. A failed fill
//! cancels its upload, so nothing partial is kept.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use oci::{Digest, ErrorCode, RepoName, UploadId};
use registry::proxied::FILL_OWNER;
use registry::{Registry, RegistryError};
use storage::ByteStream;
use tokio::sync::{mpsc, watch};

use crate::client::{Client, UpstreamError};

/// Bytes gathered from the upstream before one append. Appends happen
/// sooner when the upstream has nothing more ready, so a slow upstream
/// still reaches clients promptly.
const APPEND_BATCH: usize = 1 << 20;

/// How a fill stands; readers watch it.
#[derive(Debug, Clone, Default)]
pub struct FillState {
    /// The response head arrived: `size` is what it announced.
    pub started: bool,
    pub size: Option<u64>,
    pub upload: Option<UploadId>,
    /// Bytes appended to the upload so far.
    pub written: u64,
    /// All of them arrived and hash to the digest; the commit may still be
    /// under way.
    pub verified: bool,
    /// The last bytes appended, kept in memory so that clients keeping up
    /// with the download do not read them back from disk.
    pub recent: Recent,
    /// `Some` once the blob is committed (Ok) or the fill failed.
    pub done: Option<Result<(), FillError>>,
}

/// Memory for the bytes most recently appended to a fill, shared by its
/// readers (the chunks are reference-counted, not copied).
const RECENT_BYTES: usize = 16 << 20;

/// Chunks with their offsets in the blob, oldest first, at most
/// `RECENT_BYTES` (plus one batch).
#[derive(Debug, Clone, Default)]
pub struct Recent {
    chunks: std::collections::VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, mut at: u64, batch: Vec<Bytes>) {
        for b in batch {
            let len = b.len();
            self.chunks.push_back((at, b));
            self.bytes += len;
            at += len as u64;
        }
        while self.bytes > RECENT_BYTES {
            match self.chunks.pop_front() {
                Some((_, b)) => self.bytes -= b.len(),
                None => break,
            }
        }
    }

    /// The bytes from `pos` up to `end` that are in memory, if `pos` is.
    fn from(&self, pos: u64, end: u64) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = pos;
        for (start, b) in &self.chunks {
            let stop = start + b.len() as u64;
            if at >= end {
                break;
            }
            if *start <= at && at < stop {
                let hi = stop.min(end);
                out.push(b.slice((at - start) as usize..(hi - start) as usize));
                at = hi;
            }
        }
        out
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("{}", .0.message)]
    Local(RegistryError),
}

impl From<RegistryError> for FillError {
    fn from(e: RegistryError) -> Self {
        FillError::Local(e)
    }
}

/// What a fill needs; cloned into its task.
#[derive(Clone)]
pub struct FillCtx {
    pub reg: Arc<Registry>,
    pub client: Arc<Client>,
    pub metrics: observe::proxy_metrics::UpstreamMetrics,
}

/// Downloads `digest` of upstream repository `up_repo` into `repo`,
/// publishing progress on `tx`. Runs as its own task, so a client that
/// goes away does not abort a download others wait for.
pub async fn run(ctx: FillCtx, repo: RepoName, up_repo: String, digest: Digest, tx: watch::Sender<FillState>) {
    let result = download(&ctx, &repo, &up_repo, &digest, &tx).await;
    if let Err(e) = &result {
        if let FillError::Upstream(u) = e {
            ctx.metrics.error(u.kind());
        }
        tracing::warn!(upstream = %ctx.client.upstream().name, %repo, %digest, error = %e, "pull-through fill failed");
        let upload = tx.borrow().upload.clone();
        if let Some(id) = upload {
            if let Err(e) = ctx.reg.upload_cancel(&repo, &id, Some(FILL_OWNER)).await {
                tracing::warn!(upload = %id, error = %e.message, "could not remove a failed fill's upload; GC removes it");
            }
        }
    }
    tx.send_modify(|s| s.done = Some(result));
}

async fn download(
    ctx: &FillCtx,
    repo: &RepoName,
    up_repo: &str,
    digest: &Digest,
    tx: &watch::Sender<FillState>,
) -> Result<(), FillError> {
    // A fill that finished just before this one was started.
    if ctx.reg.blob_size(repo, digest).await.is_ok() {
        return Ok(());
    }
    // Room first: with storage above its watermark nothing is fetched
    // (the caller streams straight from the upstream instead).
    let id = ctx.reg.upload_start(repo, Some(FILL_OWNER), digest.algorithm()).await?;
    tx.send_modify(|s| s.upload = Some(id.clone()));
    let (resp, _permit) = ctx
        .client
        .get_blob(up_repo, digest)
        .await
        .map_err(FillError::Upstream)?;
    let size = resp.content_length();
    tx.send_modify(|s| {
        s.started = true;
        s.size = size;
    });
    let mut body = resp.bytes_stream();
    let mut written = 0u64;
    let broke = |e: reqwest::Error| FillError::Upstream(UpstreamError::Body(e.to_string()));
    let mut ended = false;
    while !ended {
        let mut batch: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        match body.next().await {
            None => break,
            Some(chunk) => {
                let c = chunk.map_err(broke)?;
                len += c.len();
                batch.push(c);
            }
        }
        // Take what is already there, without waiting, up to a batch.
        while len < APPEND_BATCH {
            match body.next().now_or_never() {
                Some(Some(chunk)) => {
                    let c = chunk.map_err(broke)?;
                    len += c.len();
                    batch.push(c);
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        ctx.metrics.upstream_bytes.inc_by(len as u64);
        if size.is_some_and(|s| written + len as u64 > s) {
            return Err(FillError::Upstream(UpstreamError::Body(format!(
                "sent more than the {} bytes it announced",
                size.unwrap_or(0)
            ))));
        }
        let data: ByteStream = Box::pin(futures_util::stream::iter(batch.clone().into_iter().map(Ok)));
        let start = written;
        written = ctx.reg.upload_append(repo, &id, Some(FILL_OWNER), None, data).await?;
        tx.send_modify(|s| {
            s.written = written;
            s.recent.push(start, batch);
        });
    }
    if let Some(s) = size.filter(|s| *s != written) {
        return Err(FillError::Upstream(UpstreamError::Body(format!(
            "sent {written} of the {s} bytes it announced"
        ))));
    }
    // The streaming hash already tells whether the bytes are right: let
    // the clients have the rest while the commit syncs them.
    if ctx.reg.upload_hashed(&id).await.as_ref() == Some(digest) {
        tx.send_modify(|s| s.verified = true);
    }
    // Verifies the digest, commits durably and links into the repository.
    match ctx
        .reg
        .upload_finish(repo, &id, Some(FILL_OWNER), None, digest, None)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code == ErrorCode::DigestInvalid => Err(FillError::Upstream(UpstreamError::Digest {
            expected: digest.to_string(),
            actual: e.message,
        })),
        Err(e) => Err(e.into()),
    }
}

/// Waits until the fill has a response head (or failed), and returns its
/// announced size.
pub async fn started(rx: &mut watch::Receiver<FillState>) -> Result<Option<u64>, FillError> {
    loop {
        {
            let s = rx.borrow_and_update();
            if let Some(Err(e)) = &s.done {
                return Err(e.clone());
            }
            if s.started || s.done.is_some() {
                return Ok(s.size);
            }
        }
        if rx.changed().await.is_err() {
            return Err(gone());
        }
    }
}

fn gone() -> FillError {
    FillError::Local(RegistryError::new(
        ErrorCode::Internal,
        "the download from upstream stopped unexpectedly; retry the pull",
    ))
}

fn io_error(e: &FillError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The bytes `start..end` of the blob being filled (`end`: the size when
/// unknown up front), as they arrive, then from the committed blob.
pub fn follow(
    reg: Arc<Registry>,
    repo: RepoName,
    digest: Digest,
    mut rx: watch::Receiver<FillState>,
    start: u64,
    end: Option<u64>,
) -> ByteStream {
    let (out, recv) = mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let mut pos = start;
        loop {
            let s = rx.borrow_and_update().clone();
            let end = end.or(s.size);
            if end.is_some_and(|e| pos >= e) {
                return;
            }
            match &s.done {
                Some(Err(e)) => {
                    let _ = out.send(Err(io_error(e))).await;
                    return;
                }
                Some(Ok(())) => {
                    // Committed: the rest comes from the blob store.
                    let rest = async {
                        let blob = reg.blob_open(&repo, &digest).await?;
                        let stop = end.unwrap_or(blob.size).min(blob.size);
                        blob.read(Some(pos.min(stop)..stop)).await
                    };
                    match rest.await {
                        Ok(mut stream) => {
                            while let Some(chunk) = stream.next().await {
                                if out.send(chunk).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = out.send(Err(std::io::Error::other(e.message))).await;
                        }
                    }
                    return;
                }
                None => {}
            }
            // Hold back the last byte until the digest is verified (which
            // comes before the commit makes it durable: clients need the
            // right bytes, not synced ones).
            let verified_end = match (s.verified, s.size) {
                (true, _) => s.written,
                (false, Some(size)) => s.written.min(size.saturating_sub(1)),
                (false, None) => s.written.saturating_sub(1),
            };
            let allowed = end.map_or(verified_end, |e| e.min(verified_end));
            if let (true, Some(id)) = (pos < allowed, &s.upload) {
                // An error means committed or cancelled meanwhile: the
                // state says which.
                let before = pos;
                let in_memory = s.recent.from(pos, allowed);
                if !in_memory.is_empty() {
                    for b in in_memory {
                        pos += b.len() as u64;
                        if out.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                if let Ok(mut stream) = reg.upload_read_from(id, pos).await {
                    while pos < allowed {
                        match stream.next().await {
                            Some(Ok(mut b)) => {
                                let room = (allowed - pos) as usize;
                                if b.len() > room {
                                    b.truncate(room);
                                }
                                pos += b.len() as u64;
                                if out.send(Ok(b)).await.is_err() {
                                    return;
                                }
                            }
                            Some(Err(_)) | None => break,
                        }
                    }
                    if pos > before {
                        continue;
                    }
                }
            }
            if rx.changed().await.is_err() && rx.borrow().done.is_none() {
                let _ = out.send(Err(io_error(&gone()))).await;
                return;
            }
        }
    });
    Box::pin(futures_util::stream::unfold(recv, |mut r| async move {
        r.recv().await.map(|item| (item, r))
    }))
}

/// A blob straight from the upstream to one client, stored nowhere: for
/// when storage is too full to cache. Hashed on the way; the last chunk is
/// held back until the digest is verified, so a corrupt transfer never
/// reaches the client whole.
pub fn pass_through(resp: reqwest::Response, digest: Digest, permit: crate::limit::Permit) -> ByteStream {
    struct St {
        body: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        hasher: Option<oci::Hasher>,
        held: Option<Bytes>,
        digest: Digest,
        _permit: crate::limit::Permit,
    }
    let st = St {
        body: Box::pin(resp.bytes_stream()),
        hasher: Some(digest.algorithm().hasher()),
        held: None,
        digest,
        _permit: permit,
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        loop {
            let hasher = st.hasher.as_mut()?;
            match st.body.next().await {
                Some(Ok(b)) => {
                    hasher.update(&b);
                    if let Some(prev) = st.held.replace(b) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.hasher = None;
                    return Some((
                        Err(std::io::Error::other(format!("upstream broke off the transfer: {e}"))),
                        st,
                    ));
                }
                None => {
                    let actual = st.hasher.take()?.finish();
                    if actual != st.digest {
                        let e = format!("upstream sent content with digest {actual}, not {}", st.digest);
                        return Some((Err(std::io::Error::other(e)), st));
                    }
                    let last = st.held.take()?;
                    return Some((Ok(last), st));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_bytes_are_served_from_memory_within_the_window() {
        let mut r = Recent::default();
        r.push(0, vec![Bytes::from_static(b"abc"), Bytes::from_static(b"def")]);
        r.push(6, vec![Bytes::from_static(b"ghi")]);
        let joined = |v: Vec<Bytes>| v.concat();
        assert_eq!(joined(r.from(1, 8)), b"bcdefgh");
        assert_eq!(joined(r.from(4, 100)), b"efghi");
        assert!(r.from(9, 100).is_empty(), "not yet appended");
        // Past the window, old bytes come from the file.
        r.push(9, vec![Bytes::from(vec![0u8; RECENT_BYTES])]);
        assert!(r.from(0, 10).is_empty());
        assert_eq!(r.from(9, 12).concat(), vec![0u8; 3]);
    }
}
