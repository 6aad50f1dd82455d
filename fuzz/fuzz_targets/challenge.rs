//! Fuzz target `challenge`. What it checks is in `fuzz/checks/challenge.rs`, which the
//! normal test build also runs on every seed (`crates/api/tests/fuzz_seeds.rs`).
#![no_main]

include!("../checks/challenge.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
