//! Fuzz target `traceparent`. What it checks is in `fuzz/checks/traceparent.rs`, which the
//! normal test build also runs on every seed (`crates/api/tests/fuzz_seeds.rs`).
#![no_main]

include!("../checks/traceparent.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
