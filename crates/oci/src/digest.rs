//! Content digests (`algorithm:encoded`), restricted to the algorithms the
//! OCI image spec registers: sha256 and sha512.

use std::fmt;
use std::str::FromStr;

use crate::hash::Hasher;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 | Algorithm::Sha512 => Hasher::new(self),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string is not `algorithm:encoded` with a well-formed encoding.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex> or sha512:<128 lowercase hex>")]
    Invalid(String),
    /// Well-formed, but an algorithm berth does not implement.
    #[error("unsupported digest algorithm {0:?}: berth supports sha256 and sha512")]
    Unsupported(String),
    /// An algorithm name alone (`?digest-algorithm=`) that breaks the
    /// spec's grammar.
    #[error("invalid digest algorithm {0:?}: expected sha256 or sha512")]
    InvalidAlgorithm(String),
}

/// The spec's grammar of an algorithm: components of `[a-z0-9]+` joined by
/// one of `+._-`.
fn algorithm_well_formed(alg: &str) -> bool {
    !alg.is_empty()
        && alg
            .split(['+', '.', '_', '-'])
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

/// An algorithm by name, as `?digest-algorithm=` gives it.
impl FromStr for Algorithm {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sha256" => Ok(Algorithm::Sha256),
            "sha512" => Ok(Algorithm::Sha512),
            _ if algorithm_well_formed(s) => Err(DigestError::Unsupported(s.to_string())),
            _ => Err(DigestError::InvalidAlgorithm(s.to_string())),
        }
    }
}

/// A validated digest. The string form is stored once; `hex()` and
/// `algorithm()` are views into it. Because only lowercase hex of the exact
/// length is accepted, a digest is always safe to use as a path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    text: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.text[self.algorithm.as_str().len() + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The digest whose encoding is `bytes` in lowercase hex.
    pub(crate) fn from_raw(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut text = String::with_capacity(algorithm.as_str().len() + 1 + bytes.len() * 2);
        text.push_str(algorithm.as_str());
        text.push(':');
        for b in bytes {
            text.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            text.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        Digest { algorithm, text }
    }

    /// The sha256 digest of `data`.
    pub fn sha256(data: &[u8]) -> Digest {
        let mut h = Algorithm::Sha256.hasher();
        h.update(data);
        h.finish()
    }

    /// The digest of `data` under this digest's algorithm; used to verify.
    pub fn verify(&self, data: &[u8]) -> bool {
        let mut h = self.algorithm.hasher();
        h.update(data);
        h.finish() == *self
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, enc)) = s.split_once(':') else {
            return Err(DigestError::Invalid(s.to_string()));
        };
        let alg_ok = algorithm_well_formed(alg);
        let enc_ok = !enc.is_empty()
            && enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
        if !alg_ok || !enc_ok {
            return Err(DigestError::Invalid(s.to_string()));
        }
        let algorithm: Algorithm = alg.parse()?;
        let hex_ok =
            enc.len() == algorithm.hex_len() && enc.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(DigestError::Invalid(s.to_string()));
        }
        Ok(Digest {
            algorithm,
            text: s.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_algorithm_names() {
        assert_eq!("sha512".parse::<Algorithm>(), Ok(Algorithm::Sha512));
        assert_eq!("sha256".parse::<Algorithm>(), Ok(Algorithm::Sha256));
        assert_eq!(
            "blake3".parse::<Algorithm>(),
            Err(DigestError::Unsupported("blake3".into()))
        );
        for bad in ["", "SHA256", "sha256:", "a..b", "-x"] {
            assert_eq!(
                bad.parse::<Algorithm>(),
                Err(DigestError::InvalidAlgorithm(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_valid_digests() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d, Digest::sha256(b""));
        let d512 = {
            let mut h = Algorithm::Sha512.hasher();
            h.update(b"abc");
            h.finish()
        };
        assert_eq!(d512.hex().len(), 128);
        assert_eq!(d512.as_str().parse::<Digest>().unwrap(), d512);
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c442",
            "sha256:../../../../etc/passwd",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(matches!(bad.parse::<Digest>(), Err(DigestError::Invalid(_))), "{bad}");
        }
        assert!(matches!(
            "md5:d41d8cd98f00b204e9800998ecf8427e".parse::<Digest>(),
            Err(DigestError::Unsupported(_))
        ));
    }

    #[test]
    fn verify_checks_content() {
        let d = Digest::sha256(b"hello");
        assert!(d.verify(b"hello"));
        assert!(!d.verify(b"hellO"));
    }
}
