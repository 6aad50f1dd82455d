//! Generated content: layer bytes and the small images around them.

use bytes::Bytes;
use oci::Digest;

/// What the read scenarios accept as a manifest. Registries that convert
/// or refuse manifests by `Accept` (distribution does) need it.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// `len` pseudo-random bytes, the same for the same `seed`. Random rather
/// than zeros so no layer of the path can compress or skip them.
pub fn fill(seed: u64, len: usize) -> Bytes {
    let mut rng = crate::rng::Rng::new(seed);
    let mut v = vec![0u8; len];
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let tail = chunks.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
    Bytes::from(v)
}

/// An image with one layer: its config and its OCI manifest.
pub struct Image {
    pub config: Bytes,
    pub config_digest: Digest,
    pub manifest: Bytes,
}

pub fn image(name: &str, layer: &Bytes, layer_digest: &Digest) -> Image {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": { "berth.bench.image": name } },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest.as_str()] },
    }))
    .expect("static JSON");
    let config = Bytes::from(config);
    let config_digest = Digest::sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::media::OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.as_str(),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest.as_str(),
            "size": layer.len(),
        }],
    }))
    .expect("static JSON");
    Image {
        config,
        config_digest,
        manifest: Bytes::from(manifest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_deterministic_and_exact() {
        for len in [0, 1, 7, 8, 9, 1000] {
            assert_eq!(fill(3, len).len(), len);
        }
        assert_eq!(fill(3, 100), fill(3, 100));
        assert_ne!(fill(3, 100), fill(4, 100));
    }

    #[test]
    fn image_manifest_is_valid_and_references_its_blobs() {
        let layer = fill(1, 100);
        let ld = Digest::sha256(&layer);
        let img = image("x", &layer, &ld);
        let m = oci::Manifest::parse(&img.manifest, Some(oci::media::OCI_MANIFEST)).unwrap();
        assert_eq!(m.config.unwrap().digest, img.config_digest);
        assert_eq!(m.layers[0].digest, ld);
        assert_eq!(m.layers[0].size, 100);
    }
}
