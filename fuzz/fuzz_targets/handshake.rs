//! Key-file parsing and the PSK proof exchange: `data[0]` bytes of key text, then what the peer sends.
#![no_main]

#[allow(dead_code)] // each target calls one of the shared checks
#[path = "../checks.rs"]
mod checks;

use std::sync::OnceLock;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::handshake(runtime(), data));
