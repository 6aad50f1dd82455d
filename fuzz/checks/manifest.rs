// `oci::Manifest::parse`: arbitrary bytes with a Content-Type never panic,
// and an accepted manifest is consistent.
//
// Input layout: the first byte picks the Content-Type (`CONTENT_TYPES[b % 8]`,
// so the ASCII digits '0'..'7' pick entries 0..7, which keeps the seeds
// readable); the rest is the manifest body.
//
// `include!`d by fuzz/fuzz_targets/manifest.rs and crates/api/tests/fuzz_seeds.rs,
// so no inner attributes here.

use oci::media;
use oci::{Descriptor, Manifest};

const CONTENT_TYPES: [Option<&str>; 8] = [
    None,
    Some(media::OCI_MANIFEST),
    Some(media::OCI_INDEX),
    Some(media::DOCKER_MANIFEST),
    Some(media::DOCKER_MANIFEST_LIST),
    Some("application/json"),
    Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
    Some(""),
];

/// A descriptor survives serialisation: what berth stores (referrers lists,
/// metadata) reads back the same.
fn round_trips(d: &Descriptor) {
    let json = serde_json::to_vec(d).expect("a descriptor serialises");
    let back: Descriptor = serde_json::from_slice(&json).expect("a serialised descriptor parses");
    assert_eq!(&back, d, "descriptor round trip through {}", String::from_utf8_lossy(&json));
}

pub fn check(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let Ok(m) = Manifest::parse(body, content_type) else {
        return;
    };

    assert!(media::is_manifest(&m.media_type), "accepted media type {:?}", m.media_type);
    // When the header names a manifest type, the result has exactly that type.
    let bare = content_type.map(|c| c.split(';').next().unwrap_or("").trim());
    if let Some(c) = bare.filter(|c| media::is_manifest(c)) {
        assert_eq!(m.media_type, c);
    }

    if m.is_index() {
        assert!(m.config.is_none(), "an index has no config");
        assert!(m.layers.is_empty(), "an index has no layers");
        assert_eq!(m.required_blobs().count(), 0, "an index requires no blobs");
        if m.media_type == media::DOCKER_MANIFEST_LIST {
            assert!(m.manifests.iter().all(|d| media::is_manifest(&d.media_type)));
        }
    } else {
        assert!(m.config.is_some(), "an image manifest has a config");
        assert!(m.manifests.is_empty(), "an image manifest has no manifests");
    }
    if m.media_type.starts_with("application/vnd.docker.") {
        assert!(m.subject.is_none(), "Docker manifests carry no subject");
    }

    // required_blobs = the config, then every distributable layer, in order.
    let required: Vec<&Descriptor> = m.required_blobs().collect();
    let expected: Vec<&Descriptor> = m
        .config
        .iter()
        .chain(m.layers.iter().filter(|l| !media::is_non_distributable(&l.media_type)))
        .collect();
    assert_eq!(required, expected);
    let layers_required = &required[usize::from(m.config.is_some())..];
    assert!(
        layers_required.iter().all(|l| !media::is_non_distributable(&l.media_type)),
        "required_blobs yields a non-distributable layer"
    );

    match (&m.artifact_type, &m.config) {
        (Some(a), _) => assert_eq!(m.effective_artifact_type().as_ref(), Some(a)),
        (None, Some(c)) => assert_eq!(m.effective_artifact_type().as_ref(), Some(&c.media_type)),
        (None, None) => assert_eq!(m.effective_artifact_type(), None),
    }

    for d in m.config.iter().chain(&m.layers).chain(&m.manifests).chain(&m.subject) {
        assert_eq!(d.digest.hex().len(), d.digest.algorithm().hex_len());
        round_trips(d);
    }

    // Parsing is deterministic.
    assert_eq!(Manifest::parse(body, content_type).as_ref(), Ok(&m));
}
