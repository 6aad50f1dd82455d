//! Steps 1 and 2: name resolution (with `--resolve` overrides) and a TCP
//! connection to each address found.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::image::Image;
use crate::report::{Category, Report};
use crate::Options;

/// The first address that accepted, and its stream.
pub async fn steps(r: &mut Report, img: &Image, opts: &Options) -> Option<(SocketAddr, TcpStream)> {
    let t = Instant::now();
    let mut addrs: Vec<SocketAddr> = opts
        .resolve
        .iter()
        .filter(|(h, p, _)| h.eq_ignore_ascii_case(&img.host) && *p == img.port)
        .map(|(_, p, a)| SocketAddr::new(*a, *p))
        .collect();
    let how = if addrs.is_empty() { "resolved" } else { "from --resolve" };
    if addrs.is_empty() {
        match tokio::time::timeout(opts.timeout, tokio::net::lookup_host((img.host.as_str(), img.port))).await {
            Ok(Ok(found)) => addrs = found.collect(),
            Ok(Err(e)) => {
                r.fail(
                    "name resolution",
                    Category::Network,
                    t,
                    format!("{}: {e}", img.host),
                    format!("the registry name {} does not resolve ({e})", img.host),
                    "check the spelling of the host in the image reference, then DNS from this machine (/etc/resolv.conf; in a cluster, CoreDNS and the node's resolver); `--resolve HOST:PORT:ADDR` tests an address directly".into(),
                );
                return None;
            }
            Err(_) => {
                r.fail(
                    "name resolution",
                    Category::Network,
                    t,
                    format!("no answer in {:?}", opts.timeout),
                    format!("resolving {} timed out after {:?}", img.host, opts.timeout),
                    "the DNS server does not answer: check /etc/resolv.conf and that UDP/TCP port 53 is open to it"
                        .into(),
                );
                return None;
            }
        }
    }
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    r.ok("name resolution", t, format!("{} {how}: {}", img.host, list.join(", ")));

    let t = Instant::now();
    let mut tried = Vec::new();
    let mut last = None;
    for a in &addrs {
        match tokio::time::timeout(opts.timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                tried.push(format!("{a} connected"));
                r.ok("tcp connect", t, tried.join("; "));
                return Some((*a, s));
            }
            Ok(Err(e)) => {
                tried.push(format!("{a}: {e}"));
                last = Some(match e.kind() {
                    ErrorKind::ConnectionRefused => ("refused", *a),
                    ErrorKind::TimedOut => ("timed out", *a),
                    _ => ("unreachable", *a),
                });
            }
            Err(_) => {
                tried.push(format!("{a}: no answer in {:?}", opts.timeout));
                last = Some(("timed out", *a));
            }
        }
    }
    let detail = tried.join("; ");
    let (cause, fix) = match last {
        Some(("refused", a)) => (
            format!("connection refused by {a}: nothing listens on port {} there", a.port()),
            "start the registry, or fix the port in the image reference (a container's published port, a Service's port)".to_string(),
        ),
        Some(("timed out", a)) => (
            format!("the connection to {a} timed out after {:?}: the network path drops the packets (the host answers nothing, not even a refusal)", opts.timeout),
            "check what filters traffic between this machine and the registry: a network policy (the CNI plugin), security groups or a firewall, and HTTPS_PROXY/NO_PROXY if a proxy should carry it".to_string(),
        ),
        Some((_, a)) => (
            format!("{a} is unreachable: {detail}"),
            "check the route to the registry (the node's routes, VPN, the Service's endpoints)".to_string(),
        ),
        None => (
            format!("{} resolved to no address", img.host),
            "check the DNS records of the registry's name".to_string(),
        ),
    };
    r.fail("tcp connect", Category::Network, t, detail, cause, fix);
    None
}
