//! Trusted public keys.

use ring::signature::{self, UnparsedPublicKey};
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The algorithms a key can be used with: the curve or key type fixes it,
/// since cosign's signatures carry no algorithm of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 with SHA-256, ASN.1 signatures (cosign's default).
    EcdsaP256,
    Ed25519,
    /// RSA, PKCS#1 v1.5 or PSS, SHA-256.
    Rsa,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ecdsa-p256",
            KeyKind::Ed25519 => "ed25519",
            KeyKind::Rsa => "rsa",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM public key: {0}")]
    Pem(String),
    #[error("PEM block is {0:?}; a public key is \"PUBLIC KEY\" (cosign.pub, or `openssl pkey -pubout`)")]
    Label(String),
    #[error("the public key is not valid SubjectPublicKeyInfo DER: {0}")]
    Der(String),
    #[error("unsupported public key algorithm {0} (supported: ECDSA P-256, Ed25519, RSA)")]
    Algorithm(String),
}

/// A public key a policy trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: KeyKind,
    /// The key bytes `ring` verifies with (the SPKI's subjectPublicKey).
    raw: Vec<u8>,
    /// `sha256:<hex>` of the SPKI DER: how berth names a key in messages
    /// (`openssl pkey -pubin -outform DER | sha256sum` gives the same).
    pub fingerprint: String,
}

const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

impl PublicKey {
    /// Reads the first `PUBLIC KEY` block of `pem`.
    pub fn from_pem(pem: &str) -> Result<PublicKey, KeyError> {
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| KeyError::Pem(e.to_string()))?;
        if block.label != "PUBLIC KEY" {
            return Err(KeyError::Label(block.label));
        }
        PublicKey::from_spki_der(&block.contents)
    }

    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, KeyError> {
        let (rest, spki) = SubjectPublicKeyInfo::from_der(der).map_err(|e| KeyError::Der(e.to_string()))?;
        if !rest.is_empty() {
            return Err(KeyError::Der(format!("{} trailing bytes", rest.len())));
        }
        let oid = spki.algorithm.algorithm.to_id_string();
        let kind = match oid.as_str() {
            OID_EC => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .unwrap_or_default();
                if curve != OID_P256 {
                    return Err(KeyError::Algorithm(format!("EC on curve {curve}")));
                }
                KeyKind::EcdsaP256
            }
            OID_ED25519 => KeyKind::Ed25519,
            OID_RSA => KeyKind::Rsa,
            other => return Err(KeyError::Algorithm(other.to_string())),
        };
        Ok(PublicKey {
            kind,
            raw: spki.subject_public_key.data.to_vec(),
            fingerprint: format!("sha256:{:x}", Sha256::digest(der)),
        })
    }

    /// Whether `sig` is this key's signature of `msg`.
    pub fn verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        let ok = |alg: &'static dyn signature::VerificationAlgorithm| {
            UnparsedPublicKey::new(alg, &self.raw).verify(msg, sig).is_ok()
        };
        match self.kind {
            KeyKind::EcdsaP256 => ok(&signature::ECDSA_P256_SHA256_ASN1),
            KeyKind::Ed25519 => ok(&signature::ED25519),
            KeyKind::Rsa => ok(&signature::RSA_PKCS1_2048_8192_SHA256) || ok(&signature::RSA_PSS_2048_8192_SHA256),
        }
    }

    /// The short form used in messages: the first 12 hex digits.
    pub fn short(&self) -> &str {
        let hex = self.fingerprint.trim_start_matches("sha256:");
        &hex[..hex.len().min(12)]
    }
}

/// Test keys: the signer side, which berth itself never needs. Public so
/// the integration tests and `berth verify`'s tests sign as cosign does.
pub mod testing {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    /// The DER prefix of a P-256 SubjectPublicKeyInfo before its 65-byte point.
    const P256_SPKI_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
        0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

    pub enum Signer {
        P256(EcdsaKeyPair),
        Ed25519(Ed25519KeyPair),
    }

    impl Signer {
        pub fn p256() -> Signer {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate a P-256 key");
            Signer::P256(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("read the key back"))
        }

        pub fn ed25519() -> Signer {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("generate an Ed25519 key");
            Signer::Ed25519(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("read the key back"))
        }

        pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
            match self {
                Signer::P256(k) => k.sign(&SystemRandom::new(), msg).expect("sign").as_ref().to_vec(),
                Signer::Ed25519(k) => k.sign(msg).as_ref().to_vec(),
            }
        }

        pub fn spki_der(&self) -> Vec<u8> {
            let (prefix, point): (&[u8], &[u8]) = match self {
                Signer::P256(k) => (&P256_SPKI_PREFIX, k.public_key().as_ref()),
                Signer::Ed25519(k) => (&ED25519_SPKI_PREFIX, k.public_key().as_ref()),
            };
            [prefix, point].concat()
        }

        /// The public key as `cosign.pub` holds it.
        pub fn public_pem(&self) -> String {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(self.spki_der());
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap_or(""))
                .collect();
            format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                lines.join("\n")
            )
        }

        pub fn public(&self) -> PublicKey {
            PublicKey::from_spki_der(&self.spki_der()).expect("our own SPKI parses")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Signer;
    use super::*;

    #[test]
    fn p256_and_ed25519_keys_verify_their_signatures_only() {
        for s in [Signer::p256(), Signer::ed25519()] {
            let k = PublicKey::from_pem(&s.public_pem()).unwrap();
            let sig = s.sign(b"payload");
            assert!(k.verifies(b"payload", &sig));
            assert!(!k.verifies(b"payloaD", &sig));
            let other = Signer::p256().public();
            assert!(!other.verifies(b"payload", &sig));
            assert!(k.fingerprint.starts_with("sha256:") && k.fingerprint.len() == 71);
        }
    }

    #[test]
    fn wrong_pem_blocks_and_garbage_are_clear_errors() {
        assert!(matches!(PublicKey::from_pem("hello"), Err(KeyError::Pem(_))));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(PublicKey::from_pem(cert), Err(KeyError::Label("CERTIFICATE".into())));
        assert!(matches!(
            PublicKey::from_spki_der(&[0x30, 0x03, 0x01, 0x01, 0xff]),
            Err(KeyError::Der(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_an_error_or_a_key_never_a_panic(b in proptest::collection::vec(0u8..=255, 0..200)) {
            let _ = PublicKey::from_spki_der(&b);
            let _ = PublicKey::from_pem(&String::from_utf8_lossy(&b));
        }
    }
}
