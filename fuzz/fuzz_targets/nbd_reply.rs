//! One NBD transmission reply at the front of arbitrary bytes: a reply, incomplete, or a one-line error; never a
//! panic, and never an allocation for a length a header claims (run with `-malloc_limit_mb`).
#![no_main]

#[allow(dead_code)] // each target calls one of the shared checks
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::nbd_reply(data));
