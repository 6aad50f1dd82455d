//! The image reference: `[http[s]://]host[:port]/repo[:tag|@digest]`.

use oci::{Reference, RepoName};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no registry host: give host[:port]/repository")]
    NoHost,
    #[error("{0:?} is not a port")]
    Port(String),
    #[error("repository: {0}")]
    Repo(oci::NameError),
    #[error("tag or digest: {0}")]
    Reference(oci::NameError),
}

#[derive(Debug, Clone)]
pub struct Image {
    pub host: String,
    pub port: u16,
    pub https: bool,
    pub repo: RepoName,
    pub reference: Reference,
}

impl Image {
    pub fn parse(s: &str, plain_http: bool) -> Result<Image, ImageError> {
        let (https, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            (!plain_http, s)
        };
        let (hostport, path) = rest.split_once('/').ok_or(ImageError::NoHost)?;
        if hostport.is_empty() {
            return Err(ImageError::NoHost);
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (h, p.parse().map_err(|_| ImageError::Port(p.to_string()))?),
            _ => (hostport, if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let (repo, reference) = if let Some((r, d)) = path.split_once('@') {
            (r, d)
        } else {
            match path.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t),
                _ => (path, "latest"),
            }
        };
        Ok(Image {
            host,
            port,
            https,
            repo: repo.parse().map_err(ImageError::Repo)?,
            reference: reference.parse().map_err(ImageError::Reference)?,
        })
    }

    /// `host:port` as it appears in URLs and in client configuration.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn base(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.authority())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let i = Image::parse("127.0.0.1:5000/team/app:v1", false).unwrap();
        assert_eq!((i.host.as_str(), i.port, i.https), ("127.0.0.1", 5000, true));
        assert_eq!(i.repo.as_str(), "team/app");
        assert_eq!(i.reference.to_string(), "v1");
        let i = Image::parse("http://reg.example/app", false).unwrap();
        assert_eq!(
            (i.port, i.https, i.reference.to_string().as_str()),
            (80, false, "latest")
        );
        let d = oci::Digest::sha256(b"x");
        let i = Image::parse(&format!("h:1/a/b@{d}"), true).unwrap();
        assert!(!i.https && matches!(i.reference, Reference::Digest(_)));
        assert!(Image::parse("app:v1", false).is_err());
        assert!(Image::parse("h:x/app", false).is_err());
        assert!(Image::parse("h/App", false).is_err());
    }
}
