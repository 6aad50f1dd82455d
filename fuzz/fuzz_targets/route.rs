//! Fuzz target `route`. What it checks is in `fuzz/checks/route.rs`, which the
//! normal test build also runs on every seed (`crates/api/tests/fuzz_seeds.rs`).
#![no_main]

include!("../checks/route.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
