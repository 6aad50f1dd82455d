// `WWW-Authenticate` challenges from an upstream registry
// (`oci::challenge::parse`): arbitrary headers never panic, and every
// challenge parsed has a scheme made of token characters.
//
// `include!`d by fuzz/fuzz_targets/challenge.rs and crates/api/tests/fuzz_seeds.rs,
// so no inner attributes here.

pub fn check(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    for c in oci::challenge::parse(&s) {
        assert!(!c.scheme.is_empty());
        assert!(c.scheme.chars().all(|ch| ch.is_ascii_graphic()), "{:?}", c.scheme);
        for (k, _) in &c.params {
            assert!(!k.is_empty() && k.chars().all(|ch| !ch.is_ascii_uppercase()));
        }
    }
}
