//! The registry being measured: its address, TLS setup and credentials.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{HeaderValue, Uri};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

use crate::auth::Auth;
use crate::options::TlsOptions;

#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

pub struct Target {
    /// The URL as given, for messages.
    pub url: String,
    /// The `Host` header.
    pub host: HeaderValue,
    pub addrs: Vec<SocketAddr>,
    pub tls: Option<Tls>,
    pub auth: Auth,
}

impl Target {
    /// The same registry with other credentials.
    pub fn with_auth(&self, auth: Auth) -> Target {
        Target {
            url: self.url.clone(),
            host: self.host.clone(),
            addrs: self.addrs.clone(),
            tls: self.tls.clone(),
            auth,
        }
    }
}

/// The parts of a registry URL.
#[derive(Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
}

/// Parses `http[s]://host[:port][/]`; a URL without a scheme is http.
pub fn parse_url(url: &str) -> Result<Endpoint, String> {
    let bad = |why: &str| format!("bad registry URL {url:?}: {why}; write e.g. http://127.0.0.1:5000");
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let uri: Uri = full.parse().map_err(|_| bad("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad("the scheme must be http or https")),
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("give only scheme, host and port: the /v2/ paths are added"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("put credentials in --user, not in the URL"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(Endpoint {
        https,
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        authority: authority.as_str().to_string(),
    })
}

/// Resolves the URL's host and prepares TLS. Credentials come later
/// (`auth::negotiate`), since finding what the registry wants takes a request.
pub async fn resolve(url: &str, tls: &TlsOptions) -> Result<Target, String> {
    let ep = parse_url(url)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}; check the host in {url}", ep.host))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{} has no address; check the host in {url}", ep.host));
    }
    let tls = if ep.https {
        let server_name = ServerName::try_from(ep.host.clone())
            .map_err(|e| format!("{} is not a valid TLS server name: {e}", ep.host))?;
        Some(Tls {
            connector: TlsConnector::from(Arc::new(client_config(tls)?)),
            server_name,
        })
    } else {
        None
    };
    Ok(Target {
        url: url.to_string(),
        host: HeaderValue::from_str(&ep.authority).map_err(|_| format!("bad host in {url}"))?,
        addrs,
        tls,
        auth: Auth::None,
    })
}

fn client_config(opts: &TlsOptions) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let mut config = if opts.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        let system = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
        if system.exists() {
            // A bad system certificate must not stop the run; --ca-cert is checked strictly below.
            let certs: Vec<_> = pem_certs(&system).unwrap_or_default();
            roots.add_parsable_certificates(certs);
        }
        if let Some(ca) = &opts.ca_cert {
            for cert in pem_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("--ca-cert {}: {e}", ca.display()))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// `--insecure`: accepts any certificate, but still checks the handshake
/// signatures so the connection is TLS as usual.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = parse_url("http://127.0.0.1:5000").unwrap();
        assert_eq!((e.https, e.host.as_str(), e.port), (false, "127.0.0.1", 5000));
        let e = parse_url("https://registry.example/").unwrap();
        assert_eq!((e.https, e.port, e.authority.as_str()), (true, 443, "registry.example"));
        let e = parse_url("localhost:5000").unwrap();
        assert_eq!((e.https, e.host.as_str(), e.port), (false, "localhost", 5000));
        let e = parse_url("http://[::1]:5000").unwrap();
        assert_eq!(e.host, "::1");
        for bad in ["ftp://x", "http://x/v2/", "http://u:p@x", "http://", "http://x?y=1"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn ca_cert_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let opts = TlsOptions {
            ca_cert: Some(path),
            insecure: false,
        };
        let err = resolve("https://127.0.0.1:1", &opts).await.err().unwrap();
        assert!(err.contains("ca.pem"), "{err}");
    }
}
