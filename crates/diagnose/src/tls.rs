//! Step 3: TLS with a verifier that wraps webpki's and records the chain
//! the server sent and the exact verification failure; or, for a plain
//! HTTP registry, what each client must be told.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::image::Image;
use crate::report::{Category, Report};
use crate::Options;

/// What the HTTP steps need: the address that worked and the TLS
/// configuration that verified it.
pub struct Conn {
    pub addr: SocketAddr,
    pub tls: Option<rustls::ClientConfig>,
}

#[derive(Debug)]
pub(crate) struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<(Vec<CertificateDer<'static>>, Option<rustls::Error>)>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let res = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        if let Ok(mut s) = self.seen.lock() {
            s.0 = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
            s.1 = res.as_ref().err().cloned();
        }
        res
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The system's roots (honouring SSL_CERT_FILE) and `--ca-file`.
pub(crate) fn roots(opts: &Options) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = store.add(c);
    }
    if let Some(path) = &opts.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let c: CertificateDer = c.map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
            store.add(c).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(store)
}

pub(crate) fn config(store: RootCertStore) -> Result<(rustls::ClientConfig, Arc<Recording>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let rec = Arc::new(Recording {
        inner,
        seen: Mutex::new((Vec::new(), None)),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(rec.clone())
        .with_no_client_auth();
    Ok((cfg, rec))
}

/// Subject, issuer and dates of one certificate.
fn describe(der: &CertificateDer) -> (String, String, String, bool) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => (
            c.subject().to_string(),
            c.issuer().to_string(),
            format!("valid {} to {}", c.validity().not_before, c.validity().not_after),
            c.subject().as_raw() == c.issuer().as_raw(),
        ),
        Err(e) => (
            format!("unparsable certificate ({e})"),
            String::new(),
            String::new(),
            false,
        ),
    }
}

/// What answered a plain HTTP request.
#[derive(Debug, PartialEq)]
enum Answer {
    Http,
    /// A TLS record (an alert): the port serves TLS.
    Tls,
    /// Nothing, or not HTTP.
    Other,
}

/// Sends a plain HTTP request and looks at the first bytes of the answer.
async fn probe_http(stream: &mut TcpStream, img: &Image, opts: &Options) -> Answer {
    let req = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", img.authority());
    let probe = async {
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 5];
        let mut n = 0;
        while n < buf.len() {
            match stream.read(&mut buf[n..]).await.ok()? {
                0 => break,
                k => n += k,
            }
        }
        // A TLS record: content type 21 (alert) or 22 (handshake), version 3.x.
        Some(if &buf[..n] == b"HTTP/" {
            Answer::Http
        } else if n >= 2 && (buf[0] == 21 || buf[0] == 22) && buf[1] == 3 {
            Answer::Tls
        } else {
            Answer::Other
        })
    };
    tokio::time::timeout(opts.timeout, probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(Answer::Other)
}

async fn speaks_http(stream: &mut TcpStream, img: &Image, opts: &Options) -> bool {
    probe_http(stream, img, opts).await == Answer::Http
}

const INSECURE_FIX: &str = "list the registry as insecure in each client: docker: \"insecure-registries\": [\"AUTH\"] in /etc/docker/daemon.json; containerd: /etc/containerd/certs.d/AUTH/hosts.toml with server = \"http://AUTH\"; podman/cri-o: [[registry]] location = \"AUTH\", insecure = true in /etc/containers/registries.conf; or better, serve it over TLS";

pub async fn step(
    r: &mut Report,
    img: &Image,
    opts: &Options,
    (addr, mut stream): (SocketAddr, TcpStream),
) -> Option<Conn> {
    let t = Instant::now();
    let auth = img.authority();
    if !img.https {
        let answer = probe_http(&mut stream, img, opts).await;
        if answer == Answer::Http {
            r.warn(
                "tls",
                t,
                format!(
                    "plain HTTP registry: the client must list it as insecure ({})",
                    INSECURE_FIX.replace("AUTH", &auth)
                ),
            );
            return Some(Conn { addr, tls: None });
        }
        r.fail(
            "tls",
            Category::Tls,
            t,
            format!("{addr} did not answer a plain HTTP request ({answer:?})"),
            if answer == Answer::Tls {
                format!("{auth} is an HTTPS registry (it answered plain HTTP with a TLS alert), and the client was told plain HTTP")
            } else {
                format!("{auth} does not speak plain HTTP (it is an HTTPS registry, or not a web server)")
            },
            format!("use https: drop --plain-http or the http:// prefix, and trust its CA (--ca-file, or the clients' certs.d/{auth}/ca.crt)"),
        );
        return None;
    }
    let (cfg, rec) = match roots(opts).and_then(config) {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                "tls",
                Category::Usage,
                t,
                e.clone(),
                e,
                "give a PEM file of CA certificates to --ca-file".into(),
            );
            return None;
        }
    };
    let name = match ServerName::try_from(img.host.clone()) {
        Ok(n) => n,
        Err(e) => {
            let m = format!("{}: {e}", img.host);
            r.fail(
                "tls",
                Category::Usage,
                t,
                m.clone(),
                m,
                "give a DNS name or an IP address".into(),
            );
            return None;
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg.clone()));
    let res = tokio::time::timeout(opts.timeout, connector.connect(name, stream)).await;
    let (chain, verr) = rec.seen.lock().map(|s| s.clone()).unwrap_or_default();
    let described: Vec<_> = chain.iter().map(describe).collect();
    let chain_text = described
        .iter()
        .map(|(s, i, d, _)| format!("subject {s}, issuer {i}, {d}"))
        .collect::<Vec<_>>()
        .join(" | ");
    match res {
        Ok(Ok(_)) => {
            r.ok("tls", t, format!("certificate chain verified: {chain_text}"));
            Some(Conn { addr, tls: Some(cfg) })
        }
        Ok(Err(e)) => {
            let leaf = described.first().cloned().unwrap_or_default();
            let top = described.last().cloned().unwrap_or_default();
            let trust = format!("add the CA to this machine's trust store, or to the clients: docker and containerd: /etc/docker/certs.d/{auth}/ca.crt or /etc/containerd/certs.d/{auth}/; podman: /etc/containers/certs.d/{auth}/ca.crt (berth diagnose: --ca-file)");
            let (cause, fix) = match verr {
                Some(rustls::Error::InvalidCertificate(ce)) => match ce {
                    CertificateError::UnknownIssuer if top.3 => (
                        format!("certificate signed by an unknown authority: the chain ends at the self-signed {} which this client does not trust", top.0),
                        trust,
                    ),
                    CertificateError::UnknownIssuer => (
                        format!("certificate signed by an unknown authority: the server sent {} certificate(s) ending at one issued by {}, and sent no certificate for that issuer: a missing intermediate (or a CA this client does not trust)", chain.len(), top.1),
                        format!("make the server send its full chain (its certificate, then each intermediate up to the root: for berth, --tls-cert with the intermediates appended); if the CA is private, {trust}"),
                    ),
                    CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                        format!("certificate has expired: {} ({})", leaf.0, leaf.2),
                        "renew the registry's certificate (and check this machine's clock)".into(),
                    ),
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                        format!("certificate is not valid yet: {} ({})", leaf.0, leaf.2),
                        "check this machine's clock (NTP) and the certificate's notBefore".into(),
                    ),
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
                        format!("wrong host name: the certificate ({}) is not valid for {}: {ce:?}", leaf.0, img.host),
                        format!("reissue the certificate with {} in its subjectAltName, or pull through a name it has", img.host),
                    ),
                    other => (format!("certificate refused: {other:?}"), trust),
                },
                Some(other) => (format!("certificate refused: {other}"), trust),
                None => {
                    let plain = match TcpStream::connect(addr).await {
                        Ok(mut s) => speaks_http(&mut s, img, opts).await,
                        Err(_) => false,
                    };
                    if plain {
                        (
                            format!("{auth} is a plain HTTP registry, and the client expected https"),
                            INSECURE_FIX.replace("AUTH", &auth),
                        )
                    } else {
                        (format!("TLS handshake with {addr} failed: {e}"), "check that this port serves TLS (the proxy or load balancer in front of the registry)".into())
                    }
                }
            };
            r.fail("tls", Category::Tls, t, format!("{e}; chain: {chain_text}"), cause, fix);
            None
        }
        Err(_) => {
            r.fail(
                "tls",
                Category::Network,
                t,
                format!("no TLS answer in {:?}", opts.timeout),
                format!(
                    "{addr} accepted the connection but did not complete a TLS handshake in {:?}",
                    opts.timeout
                ),
                "check the proxy or load balancer in front of the registry, and that this port serves TLS".into(),
            );
            None
        }
    }
}
