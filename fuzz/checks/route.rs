// The HTTP request parsers of berth-api: `route::parse` (the `/v2/...` path)
// and `request::{byte_range, chunk_range, Query}`.
//
// The whole input is used three ways: as the path after `/v2/`, as a
// `Range` / `Content-Range` header value, and as a query string. If it starts
// with `<decimal>\n`, that number is one of the blob sizes `byte_range` is
// tried against (the others are fixed edge sizes).
//
// `include!`d by fuzz/fuzz_targets/route.rs and crates/api/tests/fuzz_seeds.rs,
// so no inner attributes here.

use api::request::{byte_range, chunk_range, Query};
use api::route::{self, Route};
use http::{header, HeaderMap, HeaderValue};
use oci::RepoName;

fn check_name(name: &RepoName) {
    let s = name.as_str();
    assert!(!s.is_empty() && s.len() <= oci::name::MAX_NAME_LEN, "name {s:?}");
    for c in s.split('/') {
        assert!(!c.is_empty() && c != "." && c != "..", "component {c:?} of routed name {s:?}");
        assert!(!c.contains('%'), "routed name {s:?} still percent-encoded");
    }
}

/// The canonical path of a route; parsing it must give the route back.
fn render(r: &Route) -> String {
    match r {
        Route::Catalog => "_catalog".to_string(),
        Route::Tags(n) => format!("{n}/tags/list"),
        Route::Manifest(n, r) => format!("{n}/manifests/{r}"),
        Route::Blob(n, d) => format!("{n}/blobs/{d}"),
        Route::UploadStart(n) => format!("{n}/blobs/uploads/"),
        Route::Upload(n, id) => format!("{n}/blobs/uploads/{id}"),
        Route::Referrers(n, d) => format!("{n}/referrers/{d}"),
    }
}

fn check_route(path: &str) {
    let Some(Ok(r)) = route::parse(path) else {
        return;
    };
    match &r {
        Route::Catalog => {}
        Route::Tags(n) | Route::UploadStart(n) => check_name(n),
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::Referrers(n, _) | Route::Upload(n, _) => check_name(n),
    }
    let canonical = render(&r);
    match route::parse(&canonical) {
        Some(Ok(again)) => assert_eq!(again, r, "{path:?} -> {canonical:?} routes elsewhere"),
        other => panic!("{path:?} -> {r:?}, but its canonical path {canonical:?} gives {other:?}"),
    }
}

fn check_ranges(value: HeaderValue, sizes: &[u64]) {
    let mut h = HeaderMap::new();
    h.insert(header::RANGE, value.clone());
    h.insert(header::CONTENT_RANGE, value);
    for &size in sizes {
        match byte_range(&h, size) {
            Ok(Some(r)) => assert!(
                r.start < r.end && r.end <= size,
                "byte_range({:?}, {size}) = {r:?}",
                h.get(header::RANGE)
            ),
            Ok(None) => {}
            // A 416 names the blob's size.
            Err(e) => assert!(e.headers.iter().all(|(_, v)| v.to_str().is_ok())),
        }
    }
    if let Ok(Some((a, b))) = chunk_range(&h) {
        assert!(a <= b, "chunk_range({:?}) = ({a}, {b})", h.get(header::CONTENT_RANGE));
    }
}

pub fn check(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    check_route(s);
    // Also as the path would be if the fuzzer's text were the full URI path.
    if let Some(rest) = s.strip_prefix("/v2/") {
        check_route(rest);
    }

    let mut sizes = vec![0, 1, 2, 10, 4096, data.len() as u64, u64::MAX - 1, u64::MAX];
    let header_text = match s.split_once('\n') {
        Some((n, rest)) => match n.trim().parse::<u64>() {
            Ok(size) => {
                sizes.push(size);
                rest
            }
            Err(_) => s,
        },
        None => s,
    };
    if let Ok(v) = HeaderValue::from_str(header_text) {
        check_ranges(v, &sizes);
    }
    // Non-UTF-8 header bytes (obs-text) must be tolerated too.
    if let Ok(v) = HeaderValue::from_bytes(data) {
        check_ranges(v, &sizes);
    }

    let q = Query::parse(Some(s));
    let _ = q.n();
    let _ = q.get("n");
    let _ = q.all("tag").count();
    let _ = Query::parse(None).n();
}
