//! Streaming SHA-256 and SHA-512 whose state can be saved and resumed, so
//! an upload that one node hashed up to some byte can be continued by
//! another without hashing those bytes again.
//!
//! The compression functions are sha2's (`compress256`, `compress512`,
//! which pick the CPU's SHA extensions at run time); this module only
//! keeps what sha2's own wrappers keep privately: the chaining words, the
//! bytes of the last partial block and the length.

use sha2::digest::generic_array::typenum::{U128, U64};
use sha2::digest::generic_array::GenericArray;

use crate::digest::{Algorithm, Digest};

const SHA256_INIT: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];
const SHA512_INIT: [u64; 8] = [
    0x6a09e667f3bcc908,
    0xbb67ae8584caa73b,
    0x3c6ef372fe94f82b,
    0xa54ff53a5f1d36f1,
    0x510e527fade682d1,
    0x9b05688c2b3e6c1f,
    0x1f83d9abfb41bd6b,
    0x5be0cd19137e2179,
];

/// First byte of a saved state; a later layout gets another number.
const FORMAT: u8 = 1;

#[derive(Clone)]
enum Words {
    Sha256([u32; 8]),
    Sha512([u64; 8]),
}

/// A streaming hasher for one of the supported algorithms.
#[derive(Clone)]
pub struct Hasher {
    words: Words,
    /// The bytes of the current partial block (`len % block_size` of them).
    block: [u8; 128],
    /// Bytes hashed so far.
    len: u64,
}

/// Why a saved hash state cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a saved hash state: {0}")]
pub struct StateError(&'static str);

impl Hasher {
    pub fn new(alg: Algorithm) -> Hasher {
        Hasher {
            words: match alg {
                Algorithm::Sha256 => Words::Sha256(SHA256_INIT),
                Algorithm::Sha512 => Words::Sha512(SHA512_INIT),
            },
            block: [0; 128],
            len: 0,
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.words {
            Words::Sha256(_) => Algorithm::Sha256,
            Words::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// How many bytes have been hashed.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn block_size(&self) -> usize {
        match self.words {
            Words::Sha256(_) => 64,
            Words::Sha512(_) => 128,
        }
    }

    /// Runs the compression function over `blocks`, a whole number of
    /// blocks.
    fn compress(words: &mut Words, blocks: &[u8]) {
        match words {
            Words::Sha256(w) => {
                debug_assert_eq!(blocks.len() % 64, 0);
                // SAFETY: `GenericArray<u8, U64>` is a `repr(transparent)`
                // wrapper of 64 bytes with alignment 1 (it is what sha2's
                // own block buffer casts input slices to), and `blocks`
                // holds exactly `len / 64` of them.
                let b = unsafe {
                    std::slice::from_raw_parts(blocks.as_ptr().cast::<GenericArray<u8, U64>>(), blocks.len() / 64)
                };
                sha2::compress256(w, b);
            }
            Words::Sha512(w) => {
                debug_assert_eq!(blocks.len() % 128, 0);
                // SAFETY: as above, with blocks of 128 bytes.
                let b = unsafe {
                    std::slice::from_raw_parts(blocks.as_ptr().cast::<GenericArray<u8, U128>>(), blocks.len() / 128)
                };
                sha2::compress512(w, b);
            }
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        let bs = self.block_size();
        let total = data.len() as u64;
        let have = (self.len % bs as u64) as usize;
        if have > 0 {
            let take = (bs - have).min(data.len());
            self.block[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            if have + take < bs {
                self.len += total;
                return;
            }
            let block = self.block;
            Self::compress(&mut self.words, &block[..bs]);
        }
        let whole = data.len() / bs * bs;
        if whole > 0 {
            Self::compress(&mut self.words, &data[..whole]);
        }
        let rest = &data[whole..];
        self.block[..rest.len()].copy_from_slice(rest);
        self.len += total;
    }

    pub fn finish(mut self) -> Digest {
        let bs = self.block_size();
        // Padding: 0x80, zeros, then the length in bits, big-endian, in the
        // last 8 (SHA-256) or 16 (SHA-512) bytes of a block.
        let length_bytes = bs / 8;
        let bits = u128::from(self.len) * 8;
        let have = (self.len % bs as u64) as usize;
        let pad_blocks = if have + 1 + length_bytes <= bs { 1 } else { 2 };
        let mut tail = [0u8; 256];
        tail[..have].copy_from_slice(&self.block[..have]);
        tail[have] = 0x80;
        let end = pad_blocks * bs;
        tail[end - length_bytes..end].copy_from_slice(&bits.to_be_bytes()[16 - length_bytes..]);
        Self::compress(&mut self.words, &tail[..end]);
        let bytes: Vec<u8> = match self.words {
            Words::Sha256(w) => w.iter().flat_map(|x| x.to_be_bytes()).collect(),
            Words::Sha512(w) => w.iter().flat_map(|x| x.to_be_bytes()).collect(),
        };
        Digest::from_raw(self.algorithm(), &bytes)
    }

    /// The state, to `resume` later (in any process): the format, the
    /// algorithm, the length, the chaining words and the partial block.
    pub fn save(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 8 + 64 + 128);
        out.push(FORMAT);
        out.push(match self.words {
            Words::Sha256(_) => 1,
            Words::Sha512(_) => 2,
        });
        out.extend_from_slice(&self.len.to_le_bytes());
        match &self.words {
            Words::Sha256(w) => w.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Words::Sha512(w) => w.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
        let have = (self.len % self.block_size() as u64) as usize;
        out.extend_from_slice(&self.block[..have]);
        out
    }

    /// A hasher in the state `save` returned.
    pub fn resume(saved: &[u8]) -> Result<Hasher, StateError> {
        let [format, alg, rest @ ..] = saved else {
            return Err(StateError("too short"));
        };
        if *format != FORMAT {
            return Err(StateError("unknown format"));
        }
        let (len, rest) = rest.split_first_chunk::<8>().ok_or(StateError("too short"))?;
        let len = u64::from_le_bytes(*len);
        let (words, bs, rest) = match alg {
            1 => {
                let (w, rest) = rest.split_first_chunk::<32>().ok_or(StateError("too short"))?;
                let mut words = [0u32; 8];
                for (x, c) in words.iter_mut().zip(w.chunks_exact(4)) {
                    *x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                (Words::Sha256(words), 64, rest)
            }
            2 => {
                let (w, rest) = rest.split_first_chunk::<64>().ok_or(StateError("too short"))?;
                let mut words = [0u64; 8];
                for (x, c) in words.iter_mut().zip(w.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    *x = u64::from_le_bytes(b);
                }
                (Words::Sha512(words), 128, rest)
            }
            _ => return Err(StateError("unknown algorithm")),
        };
        if rest.len() as u64 != len % bs {
            return Err(StateError("partial block does not match the length"));
        }
        let mut block = [0u8; 128];
        block[..rest.len()].copy_from_slice(rest);
        Ok(Hasher { words, block, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::Digest as _;

    fn reference(alg: Algorithm, data: &[u8]) -> Digest {
        let bytes = match alg {
            Algorithm::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Algorithm::Sha512 => sha2::Sha512::digest(data).to_vec(),
        };
        Digest::from_raw(alg, &bytes)
    }

    #[test]
    fn known_answers() {
        let h = Hasher::new(Algorithm::Sha256);
        assert_eq!(
            h.finish().as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"abc");
        assert_eq!(
            h.finish().as_str(),
            "sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
        // Every padding case around a block's end.
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            for n in 0..300 {
                let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
                let mut h = Hasher::new(alg);
                h.update(&data);
                assert_eq!(h.finish(), reference(alg, &data), "{alg:?} {n}");
            }
        }
    }

    #[test]
    fn a_state_that_is_not_one_is_refused() {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"abc");
        let saved = h.save();
        assert!(Hasher::resume(&saved).is_ok());
        assert!(Hasher::resume(&saved[..saved.len() - 1]).is_err());
        assert!(Hasher::resume(&[]).is_err());
        let mut bad = saved.clone();
        bad[0] = 9;
        assert!(Hasher::resume(&bad).is_err());
        let mut bad = saved;
        bad[1] = 3;
        assert!(Hasher::resume(&bad).is_err());
    }

    proptest! {
        /// Any chunking, saved and resumed between any chunks, gives
        /// sha2's digest of the whole.
        #[test]
        fn saved_and_resumed_anywhere_it_matches_sha2(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
            sha512 in any::<bool>(),
        ) {
            let alg = if sha512 { Algorithm::Sha512 } else { Algorithm::Sha256 };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut h = Hasher::new(alg);
            let mut at = 0;
            for c in cuts {
                h.update(&data[at..c]);
                at = c;
                h = Hasher::resume(&h.save()).unwrap();
                prop_assert_eq!(h.len(), at as u64);
            }
            h.update(&data[at..]);
            prop_assert_eq!(h.finish(), reference(alg, &data));
        }
    }
}
