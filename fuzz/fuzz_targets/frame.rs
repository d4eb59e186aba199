//! One frame at the front of arbitrary bytes: both decoders agree, decoded frames re-encode to their bytes.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::frame(data));
