//! Signed tokens: compact JWTs (RFC 7519) signed with Ed25519 (`EdDSA`,
//! RFC 8037). The parser accepts only what this registry issues: three
//! base64url parts, `alg` exactly `EdDSA`, a valid signature by our key, and
//! then the time and audience checks.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::scope::Access;

/// Longest token accepted; ours are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Clock skew tolerated on `nbf` and `iat`.
const LEEWAY_SECS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    /// Granted access; empty for a refresh token.
    #[serde(default)]
    pub access: Vec<Access>,
    /// "access" or "refresh".
    #[serde(default = "access_kind")]
    pub kind: String,
    /// The account's generation when issued (`metadata::User::generation`);
    /// the token is void once the account's differs. Absent (0) in tokens
    /// of robots and of accounts never changed.
    #[serde(default)]
    pub gen: u64,
}

fn access_kind() -> String {
    "access".into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm is not EdDSA")]
    Algorithm,
    #[error("token signature is invalid (not signed by this registry's key)")]
    Signature,
    #[error("token has expired; log in again")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token was issued for another service")]
    Audience,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// The registry's signing key.
pub struct TokenKey {
    signing: SigningKey,
    verifying: VerifyingKey,
    kid: String,
}

impl TokenKey {
    pub fn from_seed(seed: [u8; 32]) -> TokenKey {
        let signing = SigningKey::from_bytes(&seed);
        let verifying = signing.verifying_key();
        let fp = sha2::Sha256::digest(verifying.as_bytes());
        let kid = fp[..8].iter().map(|b| format!("{b:02x}")).collect();
        TokenKey {
            signing,
            verifying,
            kid,
        }
    }

    pub fn generate() -> Result<TokenKey, String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no randomness for a key: {e}"))?;
        Ok(TokenKey::from_seed(seed))
    }

    /// Loads the key from `path` (64 hex characters), creating it with mode
    /// 0600 if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<TokenKey, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let text = text.trim();
                let mut seed = [0u8; 32];
                if text.len() != 64 {
                    return Err(format!("token key {} is not 64 hex characters", path.display()));
                }
                for (i, b) in seed.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16)
                        .map_err(|_| format!("token key {} is not hex", path.display()))?;
                }
                Ok(TokenKey::from_seed(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = TokenKey::generate()?;
                let hex: String = key.signing.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
                match publish_private(path, &hex) {
                    Ok(()) => Ok(key),
                    // Another node sharing the directory made one first:
                    // every node must sign with the same key, so use it.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => TokenKey::load_or_create(path),
                    Err(e) => Err(format!("cannot write token key {}: {e}", path.display())),
                }
            }
            Err(e) => Err(format!("cannot read token key {}: {e}", path.display())),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        let h = B64.encode(serde_json::to_vec(&header).unwrap_or_default());
        let p = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signing_input = format!("{h}.{p}");
        let sig = self.signing.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(sig.to_bytes()))
    }

    /// Verifies a token's signature, then its time window and audience.
    pub fn verify(&self, token: &str, now: u64, audience: &str) -> Result<Claims, TokenError> {
        let claims = self.verify_signature(token)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if claims.nbf > now + LEEWAY_SECS || claims.iat > now + LEEWAY_SECS {
            return Err(TokenError::NotYetValid);
        }
        if claims.aud != audience {
            return Err(TokenError::Audience);
        }
        Ok(claims)
    }

    fn verify_signature(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(TokenError::Algorithm);
        }
        let sig_bytes: [u8; 64] = B64
            .decode(s)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(TokenError::Malformed)?;
        let signing_input_len = h.len() + 1 + p.len();
        self.verifying
            .verify(
                &token.as_bytes()[..signing_input_len],
                &Signature::from_bytes(&sig_bytes),
            )
            .map_err(|_| TokenError::Signature)?;
        B64.decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)
    }
}

/// Creates `path` holding `text`, mode 0600, whole or not at all: written
/// and synced under a temporary name, then linked into place, which fails
/// (`AlreadyExists`) if another process published it first. So a reader
/// never sees a key half written, and processes starting at once on a
/// shared directory all end up with the same key.
fn publish_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: u64) -> Claims {
        Claims {
            iss: "berth".into(),
            sub: "alice".into(),
            aud: "berth".into(),
            exp: now + 300,
            nbf: now,
            iat: now,
            jti: "1".into(),
            access: vec![Access {
                kind: "repository".into(),
                name: "team/app".into(),
                actions: vec!["pull".into()],
            }],
            kind: "access".into(),
            gen: 3,
        }
    }

    #[test]
    fn sign_and_verify() {
        let key = TokenKey::generate().unwrap();
        let t = key.sign(&claims(1000));
        assert_eq!(key.verify(&t, 1000, "berth").unwrap(), claims(1000));
        assert_eq!(key.verify(&t, 1300, "berth"), Err(TokenError::Expired));
        assert_eq!(key.verify(&t, 900, "berth"), Err(TokenError::NotYetValid));
        assert_eq!(key.verify(&t, 1000, "other"), Err(TokenError::Audience));
        let other = TokenKey::generate().unwrap();
        assert_eq!(other.verify(&t, 1000, "berth"), Err(TokenError::Signature));
    }

    #[test]
    fn tampering_is_detected() {
        let key = TokenKey::generate().unwrap();
        let t = key.sign(&claims(1000));
        let parts: Vec<&str> = t.split('.').collect();
        // Grant push by rewriting the payload, keeping the signature.
        let mut c = claims(1000);
        c.access[0].actions.push("push".into());
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(key.verify(&forged, 1000, "berth"), Err(TokenError::Signature));
        // alg=none.
        let none = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none}.{}.", parts[1]);
        assert_eq!(key.verify(&unsigned, 1000, "berth"), Err(TokenError::Algorithm));
        for bad in ["", "a.b", "a.b.c.d", "....", &format!("{}.{}", parts[0], parts[1])] {
            assert!(key.verify(bad, 1000, "berth").is_err(), "{bad}");
        }
    }

    #[test]
    fn key_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let k1 = TokenKey::load_or_create(&path).unwrap();
        let k2 = TokenKey::load_or_create(&path).unwrap();
        assert_eq!(k1.kid(), k2.kid());
        let t = k1.sign(&claims(5));
        assert!(k2.verify(&t, 5, "berth").is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, "zz").unwrap();
        assert!(TokenKey::load_or_create(&path).is_err());
    }

    /// Nodes starting at once on a shared directory with no key yet: each
    /// gets a key, and it is the same one.
    #[test]
    fn processes_creating_the_key_at_once_agree_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let kids: Vec<String> = (0..8)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    TokenKey::load_or_create(&path).map(|k| k.kid().to_string())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert!(kids.iter().all(|k| *k == kids[0]), "{kids:?}");
        // Nothing but the key is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(s in "[A-Za-z0-9_.=-]{0,300}") {
            let key = TokenKey::from_seed([7; 32]);
            let _ = key.verify(&s, 0, "berth");
        }
    }
}
