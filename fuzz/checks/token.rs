// The token parser and the credential parsers around it: a bearer token
// (`auth::token::TokenKey::verify`), token scopes, and `Authorization:
// Basic`. Arbitrary input never panics, and nothing unsigned is accepted.
//
// `include!`d by fuzz/fuzz_targets/token.rs and crates/api/tests/fuzz_seeds.rs,
// so no inner attributes here.

use auth::token::TokenKey;
use http::{HeaderMap, HeaderValue};

pub fn check(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let key = TokenKey::from_seed([42; 32]);
    // Nothing the fuzzer writes can carry a valid Ed25519 signature by our
    // key, so no input may verify.
    assert!(key.verify(&s, 1_000, "berth").is_err(), "accepted a forged token: {s:?}");
    for scope in s.split(' ') {
        if let Some(a) = auth::scope::parse(scope) {
            assert!(!a.kind.is_empty() && !a.name.is_empty() && !a.actions.is_empty());
        }
    }
    let _ = auth::scope::parse_all(std::iter::once(s.as_ref()));
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v);
        let _ = api::access::basic_credentials(&h);
    }
}
