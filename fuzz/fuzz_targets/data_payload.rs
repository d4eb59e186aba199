//! DATA payloads (masks, lengths, zstd) against a chunk: exactly raw_len bytes or a refusal, never a bomb.
#![no_main]

#[allow(dead_code)] // each target calls one of the shared checks
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::data_payload(data));
