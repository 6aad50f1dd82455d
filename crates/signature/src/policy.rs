//! The signature policy of a repository, and the decision for a manifest.
//! `decide` is pure: the caller gathers the signatures (from its own store
//! or over HTTP) and hands them in, so the registry and `berth verify` make
//! the same decision for the same input.

use std::collections::BTreeSet;

use base64::Engine;
use oci::Digest;

use crate::bundle;
use crate::keys::PublicKey;
use crate::simple;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse what the policy does not allow.
    Enforce,
    /// Serve it, and log and count the refusal that would have been.
    Warn,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// How messages name it (the repository pattern, usually).
    pub name: String,
    pub keys: Vec<PublicKey>,
    /// Distinct trusted keys that must have signed (m of n); at least 1.
    pub threshold: usize,
    /// Digests served unsigned.
    pub allow_digests: BTreeSet<Digest>,
    pub mode: Mode,
}

/// One signature found for a manifest, before it is checked.
#[derive(Debug, Clone)]
pub enum Candidate {
    /// A layer of the `.sig` manifest: the payload blob's bytes (or why
    /// they could not be read) and the annotation's signature.
    Simple {
        payload: Result<Vec<u8>, String>,
        signature_b64: String,
    },
    /// The bundle JSON of a referrer (or why it could not be read).
    Bundle { json: Result<Vec<u8>, String> },
}

/// What became of one candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A trusted key signed this manifest.
    Trusted { key: String },
    /// Signed for another manifest (by a trusted key: the payload is
    /// genuine, just not this image's).
    OtherDigest { signs: String },
    /// No trusted key's signature verifies: an untrusted key, or a payload
    /// changed after signing.
    Untrusted { hint: Option<String> },
    /// Not a signature berth can read.
    Malformed { why: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Why, for the client's message and the log: names the policy and
    /// what failed, or what passed.
    pub reason: String,
    /// The metric label: `signed`, `allow_listed`, `unsigned`, `untrusted`,
    /// `digest_mismatch`, `threshold`, `malformed`.
    pub result: &'static str,
    pub findings: Vec<Finding>,
}

fn check(c: &Candidate, digest: &Digest, manifest: &[u8], keys: &[PublicKey]) -> Finding {
    match c {
        Candidate::Simple { payload, signature_b64 } => {
            let payload = match payload {
                Ok(p) => p,
                Err(why) => {
                    return Finding::Malformed {
                        why: format!("signature payload unreadable: {why}"),
                    }
                }
            };
            let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature_b64.trim()) else {
                return Finding::Malformed {
                    why: "the signature annotation is not base64".into(),
                };
            };
            let Some(key) = keys.iter().find(|k| k.verifies(payload, &sig)) else {
                return Finding::Untrusted { hint: None };
            };
            match simple::signed_digest(payload) {
                Ok(d) if d == digest.to_string() => Finding::Trusted {
                    key: key.fingerprint.clone(),
                },
                Ok(d) => Finding::OtherDigest { signs: d },
                Err(e) => Finding::Malformed { why: e.to_string() },
            }
        }
        Candidate::Bundle { json } => {
            let json = match json {
                Ok(j) => j,
                Err(why) => {
                    return Finding::Malformed {
                        why: format!("bundle unreadable: {why}"),
                    }
                }
            };
            let parsed = match bundle::parse(json) {
                Ok(p) => p,
                Err(e) => return Finding::Malformed { why: e.to_string() },
            };
            let Some(key) = keys.iter().find(|k| parsed.signed_by(k, manifest)) else {
                return Finding::Untrusted {
                    hint: parsed.hint.filter(|h| !h.is_empty()),
                };
            };
            if parsed.subjects.iter().any(|s| *s == digest.to_string()) {
                Finding::Trusted {
                    key: key.fingerprint.clone(),
                }
            } else {
                Finding::OtherDigest {
                    signs: parsed.subjects.join(", "),
                }
            }
        }
    }
}

fn short(fp: &str) -> &str {
    let hex = fp.trim_start_matches("sha256:");
    &hex[..hex.len().min(12)]
}

/// Whether `policy` lets manifest `digest` (whose bytes are `manifest`) be
/// served, given every signature found for it. Each trusted key counts
/// once however many signatures it made.
pub fn decide(policy: &Policy, digest: &Digest, manifest: &[u8], found: &[Candidate]) -> Verdict {
    let verdict = |allowed, result, reason: String, findings| Verdict {
        allowed,
        reason,
        result,
        findings,
    };
    if policy.allow_digests.contains(digest) {
        return verdict(
            true,
            "allow_listed",
            format!("{digest} is on the allow-list of signature policy {}", policy.name),
            Vec::new(),
        );
    }
    let findings: Vec<Finding> = found.iter().map(|c| check(c, digest, manifest, &policy.keys)).collect();
    let signers: BTreeSet<&str> = findings
        .iter()
        .filter_map(|f| match f {
            Finding::Trusted { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    let need = policy.threshold.max(1);
    let names = || signers.iter().map(|k| short(k)).collect::<Vec<_>>().join(", ");
    let prefix = format!("signature policy {} refuses {digest}", policy.name);
    if signers.len() >= need {
        return verdict(
            true,
            "signed",
            format!(
                "{digest} is signed by {} of {need} required trusted keys ({})",
                signers.len(),
                names()
            ),
            findings,
        );
    }
    if !signers.is_empty() {
        return verdict(
            false,
            "threshold",
            format!(
                "{prefix}: signed by {} of {need} required distinct trusted keys ({}); a key that signs twice counts once",
                signers.len(),
                names()
            ),
            findings,
        );
    }
    if findings.is_empty() {
        return verdict(
            false,
            "unsigned",
            format!(
                "{prefix}: no signature (neither a {} tag nor a Sigstore bundle referrer); sign it: cosign sign --key cosign.key IMAGE@{digest}",
                simple::sig_tag(digest)
            ),
            findings,
        );
    }
    // The most telling failure first: a genuine signature of another image,
    // then an untrusted key, then what could not be read.
    if let Some(Finding::OtherDigest { signs }) = findings.iter().find(|f| matches!(f, Finding::OtherDigest { .. })) {
        return verdict(
            false,
            "digest_mismatch",
            format!("{prefix}: payload digest does not match: a trusted key signed {signs}, not this manifest"),
            findings,
        );
    }
    if let Some(Finding::Untrusted { hint }) = findings.iter().find(|f| matches!(f, Finding::Untrusted { .. })) {
        let hint = hint.as_ref().map(|h| format!(" (key hint {h})")).unwrap_or_default();
        let trusted = policy.keys.iter().map(|k| k.short()).collect::<Vec<_>>().join(", ");
        return verdict(
            false,
            "untrusted",
            format!(
                "{prefix}: signed by an untrusted key{hint}, or the payload was changed after signing: no signature verifies with the trusted keys ({trusted})"
            ),
            findings,
        );
    }
    let why = findings
        .iter()
        .find_map(|f| match f {
            Finding::Malformed { why } => Some(why.as_str()),
            _ => None,
        })
        .unwrap_or("no readable signature");
    verdict(false, "malformed", format!("{prefix}: {why}"), findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::testing::Signer;

    fn policy(keys: &[&Signer], threshold: usize) -> Policy {
        Policy {
            name: "prod/*".into(),
            keys: keys.iter().map(|s| s.public()).collect(),
            threshold,
            allow_digests: BTreeSet::new(),
            mode: Mode::Enforce,
        }
    }

    fn simple(s: &Signer, d: &Digest) -> Candidate {
        let p = simple::payload("prod/app", d);
        Candidate::Simple {
            signature_b64: base64::engine::general_purpose::STANDARD.encode(s.sign(&p)),
            payload: Ok(p),
        }
    }

    fn bundle(s: &Signer, d: &Digest) -> Candidate {
        Candidate::Bundle {
            json: Ok(bundle::dsse_bundle(d.hex(), |m| s.sign(m))),
        }
    }

    #[test]
    fn every_case_of_the_matrix() {
        let (a, b, stranger) = (Signer::p256(), Signer::ed25519(), Signer::p256());
        let d = Digest::sha256(b"manifest");
        let other = Digest::sha256(b"other");
        let one = policy(&[&a, &b], 1);
        let v = decide(&one, &d, b"manifest", &[]);
        assert_eq!((v.allowed, v.result), (false, "unsigned"));
        assert!(v.reason.contains("no signature"), "{}", v.reason);

        let mut listed = one.clone();
        listed.allow_digests.insert(d.clone());
        assert_eq!(decide(&listed, &d, b"", &[]).result, "allow_listed");

        assert_eq!(decide(&one, &d, b"", &[simple(&a, &d)]).result, "signed");
        assert_eq!(decide(&one, &d, b"", &[bundle(&b, &d)]).result, "signed");

        let v = decide(&one, &d, b"", &[simple(&stranger, &d)]);
        assert_eq!((v.allowed, v.result), (false, "untrusted"));
        assert!(v.reason.contains("signed by an untrusted key"), "{}", v.reason);

        // A payload changed after signing: the signature no longer verifies.
        let Candidate::Simple { signature_b64, .. } = simple(&a, &d) else {
            unreachable!()
        };
        let mut tampered = simple::payload("prod/app", &d);
        tampered[5] ^= 1;
        let v = decide(
            &one,
            &d,
            b"",
            &[Candidate::Simple {
                payload: Ok(tampered),
                signature_b64,
            }],
        );
        assert_eq!(v.result, "untrusted");

        let v = decide(&one, &d, b"", &[simple(&a, &other)]);
        assert_eq!(v.result, "digest_mismatch");
        assert!(v.reason.contains(&other.to_string()), "{}", v.reason);

        let gone = Candidate::Simple {
            payload: Err("blob unknown".into()),
            signature_b64: String::new(),
        };
        assert_eq!(decide(&one, &d, b"", &[gone]).result, "malformed");

        let two = policy(&[&a, &b], 2);
        let v = decide(&two, &d, b"", &[simple(&a, &d), bundle(&a, &d)]);
        assert_eq!((v.allowed, v.result), (false, "threshold"));
        assert!(v.reason.contains("1 of 2 required"), "{}", v.reason);
        assert!(decide(&two, &d, b"", &[simple(&a, &d), bundle(&b, &d)]).allowed);
    }
}
