//! `berth diagnose`: walks the pull path of one image the way a client
//! does (name resolution, TCP, TLS, the auth challenge, credentials, the
//! tag, the manifest, the platform, every blob) and stops at the first step
//! that fails, with the root cause and the fix. It only reads: GET and HEAD.
//! `berth watch` calls [`run`] when a deployment's pull fails.

mod creds;
mod image;
mod net;
mod pull;
mod report;
mod tls;
pub mod verify;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use creds::{docker_config, parse_creds, Creds, CredsError};
pub use image::{Image, ImageError};
pub use report::{Category, Report, Status, Step};

/// What to diagnose and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host[:port]/repo[:tag|@digest]`, optionally `http://` or `https://` first.
    pub image: String,
    pub creds: Option<Creds>,
    /// `os/arch[/variant]`; default: this machine's.
    pub platform: Option<String>,
    /// Each network step's limit.
    pub timeout: Duration,
    /// `HOST:PORT:ADDR` overrides of name resolution, as curl's `--resolve`.
    pub resolve: Vec<(String, u16, IpAddr)>,
    /// Speak plain HTTP (as a client that lists the registry as insecure).
    pub plain_http: bool,
    /// Extra trusted CA certificates (PEM), besides the system's.
    pub ca_file: Option<PathBuf>,
    /// GET every blob and verify its digest.
    pub deep: bool,
    /// Show a progress bar for `deep` (on a terminal).
    pub progress: bool,
}

impl Options {
    pub fn new(image: &str) -> Options {
        Options {
            image: image.to_string(),
            creds: None,
            platform: None,
            timeout: Duration::from_secs(10),
            resolve: Vec::new(),
            plain_http: false,
            ca_file: None,
            deep: false,
            progress: false,
        }
    }
}

/// Parses a `--resolve HOST:PORT:ADDR` value.
pub fn parse_resolve(s: &str) -> Result<(String, u16, IpAddr), String> {
    let mut it = s.splitn(3, ':');
    let (Some(host), Some(port), Some(addr)) = (it.next(), it.next(), it.next()) else {
        return Err(format!("{s:?}: expected HOST:PORT:ADDR"));
    };
    let port = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let addr = addr
        .parse()
        .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
    Ok((host.to_string(), port, addr))
}

/// Runs every step and returns the report; never fails itself (a bad
/// option is a failed step too, category `usage`).
pub async fn run(opts: &Options) -> Report {
    let mut r = Report::new(&opts.image);
    let img = match Image::parse(&opts.image, opts.plain_http) {
        Ok(i) => i,
        Err(e) => {
            r.fail(
                "image reference",
                Category::Usage,
                std::time::Instant::now(),
                e.to_string(),
                format!("{} is not an image reference: {e}", opts.image),
                "write it as host[:port]/repository[:tag|@digest], e.g. registry.example.com/team/app:v1".into(),
            );
            return r.finish(opts);
        }
    };
    if let Some(stream) = net::steps(&mut r, &img, opts).await {
        if let Some(conn) = tls::step(&mut r, &img, opts, stream).await {
            pull::steps(&mut r, &img, opts, conn).await;
        }
    }
    r.finish(opts)
}
