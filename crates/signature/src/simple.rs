//! cosign's tag scheme: the signatures of manifest `sha256:<hex>` are the
//! layers of the manifest tagged `sha256-<hex>.sig` in the same repository.
//! Each layer is a simple-signing payload (JSON naming the signed manifest's
//! digest), with the base64 signature of the payload's bytes in the
//! `dev.cosignproject.cosign/signature` annotation.

use oci::{Digest, Manifest};
use serde_json::Value;

/// The payload media type cosign writes (its spec); the issue tracker and
/// some tools spell it with `cosignproject`, which is accepted too.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SIMPLE_SIGNING_ALT: &str = "application/vnd.dev.cosignproject.cosign/simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const COSIGN_TYPE: &str = "cosign container image signature";

/// The tag that holds the signatures of `digest`.
pub fn sig_tag(digest: &Digest) -> String {
    format!("{}.sig", crate::bundle::referrers_tag(digest))
}

/// Whether `tag` is a signature tag (`<alg>-<hex>.sig`).
pub fn is_sig_tag(tag: &str) -> bool {
    tag.strip_suffix(".sig")
        .and_then(|t| t.split_once('-'))
        .is_some_and(|(alg, hex)| !alg.is_empty() && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One signature of the tag scheme: the payload blob to fetch and the
/// signature of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub payload: Digest,
    pub payload_size: u64,
    pub signature_b64: String,
}

/// The signature layers of a `.sig` manifest; other layers are ignored.
pub fn layers(m: &Manifest) -> Vec<Layer> {
    m.layers
        .iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING || l.media_type == SIMPLE_SIGNING_ALT)
        .filter_map(|l| {
            let sig = l.annotations.as_ref()?.get(SIGNATURE_ANNOTATION)?;
            Some(Layer {
                payload: l.digest.clone(),
                payload_size: l.size,
                signature_b64: sig.clone(),
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("the payload is not JSON: {0}")]
    Json(String),
    #[error("the payload's critical.type is {0:?}, not \"cosign container image signature\"")]
    Type(String),
    #[error("the payload has no critical.image.docker-manifest-digest")]
    NoDigest,
}

/// The manifest digest a simple-signing payload signs.
pub fn signed_digest(payload: &[u8]) -> Result<String, PayloadError> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| PayloadError::Json(e.to_string()))?;
    let critical = &v["critical"];
    let ty = critical["type"].as_str().unwrap_or_default();
    if ty != COSIGN_TYPE {
        return Err(PayloadError::Type(ty.to_string()));
    }
    // The spec's example capitalises the key; cosign writes it lower-case.
    critical["image"]
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("docker-manifest-digest")))
        .and_then(|(_, v)| v.as_str())
        .map(str::to_string)
        .ok_or(PayloadError::NoDigest)
}

/// A payload as cosign writes it, for tests and signers.
pub fn payload(repo: &str, digest: &Digest) -> Vec<u8> {
    serde_json::json!({
        "critical": {
            "identity": {"docker-reference": repo},
            "image": {"docker-manifest-digest": digest.to_string()},
            "type": COSIGN_TYPE,
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_payloads() {
        let d = Digest::sha256(b"m");
        let t = sig_tag(&d);
        assert!(t.starts_with("sha256-") && t.ends_with(".sig"));
        assert!(is_sig_tag(&t));
        assert!(!is_sig_tag("v1.sig") && !is_sig_tag("sha256-.sig") && !is_sig_tag("latest"));
        assert_eq!(signed_digest(&payload("r", &d)).unwrap(), d.to_string());
        let spec = br#"{"critical":{"identity":{"docker-reference":"x"},"image":{"Docker-manifest-digest":"sha256:ab"},"type":"cosign container image signature"}}"#;
        assert_eq!(signed_digest(spec).unwrap(), "sha256:ab");
        assert!(matches!(signed_digest(b"{"), Err(PayloadError::Json(_))));
        assert!(matches!(
            signed_digest(br#"{"critical":{"type":"atomic container signature"}}"#),
            Err(PayloadError::Type(_))
        ));
        assert_eq!(
            signed_digest(br#"{"critical":{"type":"cosign container image signature"}}"#),
            Err(PayloadError::NoDigest)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_payload_is_an_answer_never_a_panic(b in proptest::collection::vec(0u8..=255, 0..300)) {
            let _ = signed_digest(&b);
        }
    }
}
