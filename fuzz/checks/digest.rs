// `oci::Digest` parsing: arbitrary text never panics, and whatever is
// accepted round-trips and has the exact hex length of its algorithm.
//
// `include!`d by fuzz/fuzz_targets/digest.rs and crates/api/tests/fuzz_seeds.rs,
// so no inner attributes here.

use oci::{Algorithm, Digest, Reference};

pub fn check(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s, "Display must give back the input");
        assert_eq!(d.as_str(), s);
        let alg = d.algorithm();
        assert_eq!(d.hex().len(), alg.hex_len(), "hex length of {s:?}");
        assert_eq!(d.hex().len(), match alg {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        });
        assert!(
            d.hex().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "hex of {s:?} must be lowercase hex"
        );
        assert_eq!(s, format!("{}:{}", alg.as_str(), d.hex()));
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d), "reparse of {s:?}");
        // A reference with a ':' is a digest, and the same one.
        assert_eq!(s.parse::<Reference>(), Ok(Reference::Digest(d.clone())));
    }

    // What the hasher renders is itself a valid digest that verifies.
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let mut h = alg.hasher();
        h.update(data);
        let d = h.finish();
        assert_eq!(d.algorithm(), alg);
        assert_eq!(d.as_str().parse::<Digest>().as_ref(), Ok(&d));
        assert!(d.verify(data));
    }
}
