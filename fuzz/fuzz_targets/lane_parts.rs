//! A compression lane's parts decoded in order: exactly raw_len bytes each or a refusal, never a panic.
#![no_main]

#[allow(dead_code)] // each target calls one of the shared checks
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::lane_parts(data));
