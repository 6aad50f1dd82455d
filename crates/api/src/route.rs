//! Parsing of `/v2/...` paths. Repository names contain slashes, so no
//! route matcher can split `/v2/<name>/manifests/<reference>`; this is the
//! one place that does. Matching works from the end of the path, where the
//! endpoint keywords are, and the name is validated last.

use observe::RouteKind;
use oci::{Digest, Reference, RepoName, UploadId};
use percent_encoding::percent_decode_str;
use registry::RegistryError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Catalog,
    Tags(RepoName),
    Manifest(RepoName, Reference),
    Blob(RepoName, Digest),
    UploadStart(RepoName),
    Upload(RepoName, UploadId),
    Referrers(RepoName, Digest),
}

impl Route {
    /// The repository the route addresses (every route but the catalog).
    pub fn repo(&self) -> Option<&RepoName> {
        match self {
            Route::Catalog => None,
            Route::Tags(n)
            | Route::Manifest(n, _)
            | Route::Blob(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Referrers(n, _) => Some(n),
        }
    }

    pub fn repo_mut(&mut self) -> Option<&mut RepoName> {
        match self {
            Route::Catalog => None,
            Route::Tags(n)
            | Route::Manifest(n, _)
            | Route::Blob(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Referrers(n, _) => Some(n),
        }
    }
}

/// Parses the part of the path after `/v2/`. `None` means no such endpoint
/// (404); `Some(Err)` an endpoint with an invalid name, reference or digest.
pub fn parse(rest: &str) -> Option<Result<Route, RegistryError>> {
    if rest == "_catalog" {
        return Some(Ok(Route::Catalog));
    }
    // Borrowed unless a segment has something to decode.
    let segs: Vec<std::borrow::Cow<'_, str>> = rest
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy())
        .collect();
    let n = segs.len();
    let seg = |i: usize| segs.get(i).map(|s| s.as_ref());
    let name = |k: usize| -> Result<RepoName, RegistryError> { Ok(segs[..n - k].join("/").parse::<RepoName>()?) };
    if n < 2 {
        return None;
    }
    let last = seg(n - 1)?;
    let before = seg(n - 2)?;
    let third = if n >= 3 { seg(n - 3) } else { None };
    let route = if before == "blobs" && last == "uploads" && n > 2 {
        name(2).map(Route::UploadStart)
    } else if third == Some("blobs") && before == "uploads" && n > 3 {
        if last.is_empty() {
            name(3).map(Route::UploadStart)
        } else {
            name(3).and_then(|r| Ok(Route::Upload(r, last.parse()?)))
        }
    } else if before == "blobs" && n > 2 {
        name(2).and_then(|r| Ok(Route::Blob(r, last.parse()?)))
    } else if before == "manifests" && n > 2 {
        name(2).and_then(|r| Ok(Route::Manifest(r, last.parse()?)))
    } else if before == "referrers" && n > 2 {
        name(2).and_then(|r| Ok(Route::Referrers(r, last.parse()?)))
    } else if before == "tags" && last == "list" && n > 2 {
        name(2).map(Route::Tags)
    } else {
        return None;
    };
    Some(route)
}

/// What kind of endpoint `path` addresses, for metrics. A scan of the last
/// segments, as `parse` matches them, but without decoding or validating
/// anything: it runs on every request, before routing.
pub fn kind(path: &str) -> RouteKind {
    match path {
        "/v2" | "/v2/" => return RouteKind::Base,
        "/healthz" | "/livez" | "/readyz" | "/metrics" => return RouteKind::Ops,
        "/token" => return RouteKind::Token,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return RouteKind::Other;
    };
    if rest == "_catalog" {
        return RouteKind::Catalog;
    }
    let mut segs = rest.rsplit('/');
    let (last, before, third) = (segs.next(), segs.next(), segs.next());
    match (third, before, last) {
        (_, Some("blobs"), Some("uploads")) | (Some("blobs"), Some("uploads"), _) => RouteKind::Upload,
        (_, Some("blobs"), _) => RouteKind::Blob,
        (_, Some("manifests"), _) => RouteKind::Manifest,
        (_, Some("referrers"), _) => RouteKind::Referrers,
        (_, Some("tags"), Some("list")) => RouteKind::Tags,
        _ => RouteKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci::ErrorCode;

    fn ok(p: &str) -> Route {
        parse(p).expect("a route").expect("valid")
    }

    #[test]
    fn routes() {
        let d = Digest::sha256(b"x");
        assert_eq!(ok("_catalog"), Route::Catalog);
        assert_eq!(ok("a/b/tags/list"), Route::Tags("a/b".parse().unwrap()));
        assert_eq!(
            ok("a/b/manifests/v1"),
            Route::Manifest("a/b".parse().unwrap(), "v1".parse().unwrap())
        );
        assert_eq!(
            ok(&format!("a/blobs/{d}")),
            Route::Blob("a".parse().unwrap(), d.clone())
        );
        // A digest may arrive percent-encoded.
        let enc = d.as_str().replace(':', "%3A");
        assert_eq!(
            ok(&format!("a/blobs/{enc}")),
            Route::Blob("a".parse().unwrap(), d.clone())
        );
        assert_eq!(ok("x/y/blobs/uploads/"), Route::UploadStart("x/y".parse().unwrap()));
        assert_eq!(ok("x/y/blobs/uploads"), Route::UploadStart("x/y".parse().unwrap()));
        assert_eq!(
            ok("x/blobs/uploads/abc-123"),
            Route::Upload("x".parse().unwrap(), "abc-123".parse().unwrap())
        );
        assert_eq!(
            ok(&format!("r/referrers/{d}")),
            Route::Referrers("r".parse().unwrap(), d.clone())
        );
        // Keywords inside names are still names.
        assert_eq!(
            ok("blobs/manifests/manifests/latest"),
            Route::Manifest("blobs/manifests".parse().unwrap(), "latest".parse().unwrap())
        );
        assert_eq!(
            ok(&format!("a/blobs/uploads/blobs/{d}")),
            Route::Blob("a/blobs/uploads".parse().unwrap(), d)
        );
    }

    #[test]
    fn kinds() {
        let d = Digest::sha256(b"x");
        for (p, k) in [
            ("/v2/", RouteKind::Base),
            ("/v2/_catalog", RouteKind::Catalog),
            ("/v2/a/b/tags/list", RouteKind::Tags),
            ("/v2/a/manifests/v1", RouteKind::Manifest),
            (&format!("/v2/a/blobs/{d}"), RouteKind::Blob),
            ("/v2/a/blobs/uploads/", RouteKind::Upload),
            ("/v2/a/blobs/uploads", RouteKind::Upload),
            ("/v2/a/blobs/uploads/abc", RouteKind::Upload),
            (&format!("/v2/a/referrers/{d}"), RouteKind::Referrers),
            ("/metrics", RouteKind::Ops),
            ("/v2/a/foo", RouteKind::Other),
            ("/favicon.ico", RouteKind::Other),
        ] {
            assert_eq!(kind(p), k, "{p}");
        }
    }

    #[test]
    fn errors() {
        let code = |p: &str| parse(p).expect("a route").expect_err("invalid").code;
        assert_eq!(code("A/manifests/v1"), ErrorCode::NameInvalid);
        assert_eq!(code("../etc/manifests/v1"), ErrorCode::NameInvalid);
        assert_eq!(code("a%2F..%2Fb/manifests/v1"), ErrorCode::NameInvalid);
        assert_eq!(code("a/manifests/sha256:tag"), ErrorCode::DigestInvalid);
        assert_eq!(code("a/manifests/bad:tag"), ErrorCode::Unsupported);
        assert_eq!(code("a/manifests/-bad"), ErrorCode::TagInvalid);
        assert_eq!(code("a/blobs/sha256:00"), ErrorCode::DigestInvalid);
        assert_eq!(
            code("a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e"),
            ErrorCode::Unsupported
        );
        assert_eq!(code("a/blobs/uploads/..%2F..%2Fx"), ErrorCode::BlobUploadUnknown);
        assert!(parse("").is_none());
        assert!(parse("a").is_none());
        assert!(parse("manifests/v1").is_none());
        assert!(parse("a/foo/bar").is_none());
        assert!(parse("blobs/uploads/").is_none());
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn route_parser_never_panics(s in any::<String>()) {
            let _ = super::parse(&s);
        }

        #[test]
        fn route_parser_on_path_like_input(s in "([a-z0-9%.:_-]{0,12}/){0,6}(blobs|manifests|uploads|tags|list|referrers|_catalog|)(/[a-zA-Z0-9%.:_-]{0,70}){0,2}") {
            // Whatever it accepts names a valid repository.
            if let Some(Ok(r)) = super::parse(&s) {
                let dbg = format!("{r:?}");
                prop_assert!(!dbg.contains(".."), "{}", dbg);
            }
        }
    }
}
