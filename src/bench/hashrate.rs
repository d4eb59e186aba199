//! The raw all-core BLAKE3 rate of this machine: the ceiling the agents' hashing is compared against.

use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rayon::prelude::*;

/// Bytes hashed per round.
const BUFFER: usize = 256 << 20;
/// Hashed in pieces of the agents' chunk size, one BLAKE3 per piece, as the agents do.
const PIECE: usize = 64 << 10;
/// Best of this many rounds.
const ROUNDS: usize = 3;

/// The raw rate and how it was measured.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HashRate {
    /// Bytes per second, best round.
    pub bytes_per_sec: f64,
    /// Threads rayon used (all cores).
    pub threads: usize,
    /// Bytes per round.
    pub buffer_bytes: u64,
    /// Bytes per BLAKE3 call.
    pub piece_bytes: u64,
}

/// Hashes a 256 MiB in-memory buffer of random bytes with rayon over 64 KiB pieces, best of 3.
pub fn measure() -> HashRate {
    let mut buf = vec![0u8; BUFFER];
    rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut buf);
    let mut best = Duration::MAX;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let folded = buf
            .par_chunks(PIECE)
            .map(|piece| blake3::hash(piece).as_bytes()[0])
            .reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(folded);
        best = best.min(start.elapsed());
    }
    HashRate {
        bytes_per_sec: BUFFER as f64 / best.as_secs_f64(),
        threads: rayon::current_num_threads(),
        buffer_bytes: BUFFER as u64,
        piece_bytes: PIECE as u64,
    }
}
