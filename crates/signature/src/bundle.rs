//! Sigstore bundles (`application/vnd.dev.sigstore.bundle.v0.3+json`), as
//! cosign 3 attaches them: an artifact manifest whose `subject` is the
//! signed manifest and whose one layer is the bundle JSON (cosign's
//! `specs/BUNDLE_SPEC.md`). The bundle holds either a DSSE envelope around
//! an in-toto statement whose subject digest is the manifest's, or a
//! message signature over the manifest bytes. Field names follow the
//! protobuf JSON mapping of `sigstore_bundle.proto` (camelCase).

use base64::Engine;
use serde::Deserialize;

use crate::keys::PublicKey;

pub const BUNDLE_V03: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Earlier bundle versions, accepted when the artifact type says bundle.
const BUNDLE_PREFIX: &str = "application/vnd.dev.sigstore.bundle";
pub const IN_TOTO: &str = "application/vnd.in-toto+json";

pub fn is_bundle_type(t: &str) -> bool {
    t.starts_with(BUNDLE_PREFIX)
}

/// The referrers tag scheme's tag (`sha256-<hex>`): the index of `digest`'s
/// referrers that clients write to registries without the referrers API.
pub fn referrers_tag(digest: &oci::Digest) -> String {
    digest.to_string().replacen(':', "-", 1)
}

/// Whether `tag` is such a tag.
pub fn is_referrers_tag(tag: &str) -> bool {
    tag.split_once('-')
        .is_some_and(|(alg, hex)| alg == "sha256" && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    #[serde(default)]
    verification_material: Option<serde_json::Value>,
    #[serde(default)]
    dsse_envelope: Option<Envelope>,
    #[serde(default)]
    message_signature: Option<MessageSignature>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageSignature {
    message_digest: MessageDigest,
    signature: String,
}

#[derive(Debug, Deserialize)]
struct MessageDigest {
    algorithm: String,
    digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is not valid JSON of a Sigstore bundle: {0}")]
    Json(String),
    #[error("the bundle's mediaType is {0:?}, not a Sigstore bundle")]
    MediaType(String),
    #[error("the bundle holds neither a DSSE envelope nor a message signature")]
    Empty,
    #[error("{0} is not base64")]
    Base64(&'static str),
    #[error("the DSSE payload type is {0:?}, not an in-toto statement")]
    PayloadType(String),
    #[error("the in-toto statement is not valid: {0}")]
    Statement(String),
}

/// What a bundle says, once parsed: the digests it claims to sign, and how
/// to check its signatures.
pub struct Parsed {
    /// `sha256:<hex>` digests the statement's subjects (or the message
    /// digest) name.
    pub subjects: Vec<String>,
    /// The bytes the signatures are over (DSSE's PAE, or the message).
    signed: Signed,
    sigs: Vec<Vec<u8>>,
    /// The key hint of the verification material, when it has one.
    pub hint: Option<String>,
}

enum Signed {
    Pae(Vec<u8>),
    /// A message signature is over the manifest's own bytes.
    Message,
}

fn b64(s: &str, what: &'static str) -> Result<Vec<u8>, BundleError> {
    let e = base64::engine::general_purpose::STANDARD;
    e.decode(s.trim())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s.trim()))
        .map_err(|_| BundleError::Base64(what))
}

/// DSSE's pre-authentication encoding: what a DSSE signature signs.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

pub fn parse(json: &[u8]) -> Result<Parsed, BundleError> {
    let b: Bundle = serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
    if !is_bundle_type(&b.media_type) {
        return Err(BundleError::MediaType(b.media_type));
    }
    let hint = b
        .verification_material
        .as_ref()
        .and_then(|v| v["publicKey"]["hint"].as_str())
        .map(str::to_string);
    if let Some(env) = b.dsse_envelope {
        if env.payload_type != IN_TOTO {
            return Err(BundleError::PayloadType(env.payload_type));
        }
        let payload = b64(&env.payload, "the DSSE payload")?;
        let st: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|e| BundleError::Statement(e.to_string()))?;
        let subjects = st["subject"]
            .as_array()
            .ok_or_else(|| BundleError::Statement("no subject list".into()))?
            .iter()
            .filter_map(|s| s["digest"]["sha256"].as_str())
            .map(|h| format!("sha256:{}", h.to_ascii_lowercase()))
            .collect();
        let sigs = env
            .signatures
            .iter()
            .map(|s| b64(&s.sig, "a DSSE signature"))
            .collect::<Result<_, _>>()?;
        return Ok(Parsed {
            subjects,
            signed: Signed::Pae(pae(&env.payload_type, &payload)),
            sigs,
            hint,
        });
    }
    if let Some(m) = b.message_signature {
        let digest = b64(&m.message_digest.digest, "the message digest")?;
        let subjects = match m.message_digest.algorithm.as_str() {
            "SHA2_256" => vec![format!("sha256:{}", hex(&digest))],
            _ => Vec::new(),
        };
        return Ok(Parsed {
            subjects,
            signed: Signed::Message,
            sigs: vec![b64(&m.signature, "the message signature")?],
            hint,
        });
    }
    Err(BundleError::Empty)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Parsed {
    /// Whether `key` made one of the signatures. `manifest` is the signed
    /// manifest's bytes (a message signature is over them).
    pub fn signed_by(&self, key: &PublicKey, manifest: &[u8]) -> bool {
        let msg: &[u8] = match &self.signed {
            Signed::Pae(p) => p,
            Signed::Message => manifest,
        };
        self.sigs.iter().any(|s| key.verifies(msg, s))
    }
}

/// A DSSE bundle as cosign 3 writes for `digest`, signed by `sign`: for
/// tests and signers.
pub fn dsse_bundle(digest_hex: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "", "digest": {"sha256": digest_hex}}],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {},
    })
    .to_string();
    let e = base64::engine::general_purpose::STANDARD;
    let sig = sign(&pae(IN_TOTO, statement.as_bytes()));
    serde_json::json!({
        "mediaType": BUNDLE_V03,
        "verificationMaterial": {"publicKey": {"hint": ""}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": e.encode(statement.as_bytes()),
            "payloadType": IN_TOTO,
            "signatures": [{"sig": e.encode(sig), "keyid": ""}],
        },
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::testing::Signer;

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(pae("t", b"ab"), b"DSSEv1 1 t 2 ab".to_vec());
    }

    #[test]
    fn a_dsse_bundle_names_its_subject_and_verifies_with_its_key_only() {
        let s = Signer::p256();
        let b = dsse_bundle("ab12", |m| s.sign(m));
        let p = parse(&b).unwrap();
        assert_eq!(p.subjects, vec!["sha256:ab12".to_string()]);
        assert!(p.signed_by(&s.public(), b""));
        assert!(!p.signed_by(&Signer::p256().public(), b""));
    }

    #[test]
    fn malformed_bundles_are_errors() {
        assert!(matches!(parse(b"[]"), Err(BundleError::Json(_))));
        assert!(matches!(parse(br#"{"mediaType":"x"}"#), Err(BundleError::MediaType(_))));
        assert_eq!(
            parse(format!(r#"{{"mediaType":"{BUNDLE_V03}"}}"#).as_bytes()).err(),
            Some(BundleError::Empty)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_never_panic(b in proptest::collection::vec(0u8..=255, 0..300)) {
            let _ = parse(&b);
        }
    }
}
