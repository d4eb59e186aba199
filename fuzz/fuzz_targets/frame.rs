//! One frame at the front of arbitrary bytes: both decoders agree, decoded frames re-encode to their bytes.
#![no_main]

#[allow(dead_code)] // each target calls one of the shared checks
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::frame(data));
