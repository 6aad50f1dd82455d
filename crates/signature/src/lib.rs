//! Signatures of images, as cosign writes them, and the policy that decides
//! whether a manifest may be served.
//!
//! - `keys`: trusted public keys (PEM `PUBLIC KEY`: ECDSA P-256 as `cosign
//!   generate-key-pair` writes, Ed25519, RSA) and their fingerprints;
//! - `simple`: the tag scheme (`sha256-<hex>.sig`, a manifest whose layers
//!   are simple-signing payloads, the signature in an annotation);
//! - `bundle`: Sigstore bundles v0.3 (cosign 3's default, attached through
//!   the referrers API): a DSSE envelope around an in-toto statement, or a
//!   message signature;
//! - `policy`: require-signed with m of n distinct keys, digest allow-lists,
//!   enforce or warn; `decide` is a pure function of what was found.
//!
//! Verification is offline and key-based: no transparency log, no
//! certificates (keyless signing needs a trust root and is not done here).
//! Cryptography is `ring` (already berth's TLS provider), X.509/SPKI parsing
//! `x509-parser`; the `sigstore` crate does not read v0.3 bundles and would
//! add a second crypto stack for what is a few hundred lines here.

pub mod bundle;
pub mod keys;
pub mod policy;
pub mod simple;

pub use keys::{KeyError, PublicKey};
pub use policy::{decide, Candidate, Finding, Mode, Policy, Verdict};
