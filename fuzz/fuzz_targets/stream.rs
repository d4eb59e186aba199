//! Arbitrary bytes through the framed reader in pieces of `data[0] % 64 + 1` bytes.
#![no_main]

#[allow(dead_code)] // each target calls one of the shared checks
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::stream(data));
