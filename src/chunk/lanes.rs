//! Block digests hashed side by side, one block per SIMD lane.
//!
//! A block digest is BLAKE3 of 4 KiB: four BLAKE3 chunks of 1 KiB and three parent nodes. `blake3::hash` spreads
//! one input's BLAKE3 chunks over the SIMD lanes, so a 4 KiB input fills four lanes of AVX-512's sixteen: measured
//! here at 2.5 GB/s, against 7.1 GB/s for a 64 KiB input. Every chunk that changes costs the block digests of
//! its 16 blocks on both sides (the destination's NEED, the source's answer), and at 1 % of a 2 GiB volume
//! changed those took 72 ms of CPU per agent. Here the blocks of a chunk are hashed as lanes of one computation,
//! level by level, through `blake3::platform::Platform::hash_many`: 7.6 GB/s. The digests are BLAKE3's, byte
//! for byte; the tests compare every shape with `blake3::hash` and `blake3::Hasher`.
//!
//! `hash_many` is public in blake3 but undocumented ("for benchmarks only"); it is the one multi-lane entry the
//! crate has (blake3 PR 575 proposes a documented one). Cargo.toml pins blake3 exactly so that an upgrade is a
//! decision, and the tests here fail if the entry ever computes something else.
//!
//! The chunk digest cannot come out of the same pass: inside a chunk's BLAKE3 tree, block k's leaves are hashed
//! with chunk counters 4k..4k+3, while the block's own digest hashes them with 0..3.

use blake3::platform::Platform;
use blake3::IncrementCounter;
use std::sync::OnceLock;

use super::{Digest, BLOCK_SIZE};

/// BLAKE3's initialisation vector (the key of unkeyed hashing), from the BLAKE3 specification.
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
/// Domain flags, from the BLAKE3 specification.
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;
const ROOT: u8 = 8;
/// BLAKE3's chunk length, and how many of them make a block.
const LEAF: usize = 1024;
const BLOCK: usize = BLOCK_SIZE as usize;
const LEAVES: usize = BLOCK / LEAF;
/// Blocks hashed in one pass: AVX-512's sixteen 32-bit lanes, the widest `hash_many` uses.
const LANES: usize = 16;
/// A chaining value or digest.
const CV: usize = 32;

static ZERO_LEAF: [u8; LEAF] = [0; LEAF];
static ZERO_PAIR: [u8; 2 * CV] = [0; 2 * CV];

fn platform() -> Platform {
    static PLATFORM: OnceLock<Platform> = OnceLock::new();
    *PLATFORM.get_or_init(Platform::detect)
}

/// The digest of each block of `chunk`, in order; a short last block is hashed on its own.
pub fn block_digests(chunk: &[u8]) -> Vec<Digest> {
    let whole = chunk.len() / BLOCK;
    let mut digests = vec![Digest([0; 32]); chunk.len().div_ceil(BLOCK)];
    hash_blocks(&chunk[..whole * BLOCK], &mut digests[..whole]);
    if let Some(last) = digests.get_mut(whole) {
        *last = Digest::of(&chunk[whole * BLOCK..]);
    }
    digests
}

/// Hashes the whole blocks of `bytes` into `digests`, one per block.
fn hash_blocks(bytes: &[u8], digests: &mut [Digest]) {
    let platform = platform();
    for (group, blocks) in bytes.chunks(LANES * BLOCK).enumerate() {
        let n = blocks.len() / BLOCK;
        // Level 0: leaf j of every block, one lane per block; the four chaining values of block k end up at
        // leaf_cvs[k * 4 * CV..].
        let mut leaf_cvs = [0u8; LANES * LEAVES * CV];
        let mut out = [0u8; LANES * CV];
        for j in 0..LEAVES {
            let mut inputs = [&ZERO_LEAF; LANES];
            for (k, input) in inputs.iter_mut().take(n).enumerate() {
                let at = k * BLOCK + j * LEAF;
                *input = blocks[at..at + LEAF].try_into().expect("a whole leaf");
            }
            platform.hash_many(
                &inputs[..n],
                &IV,
                j as u64,
                IncrementCounter::No,
                0,
                CHUNK_START,
                CHUNK_END,
                &mut out[..n * CV],
            );
            for k in 0..n {
                let at = (k * LEAVES + j) * CV;
                leaf_cvs[at..at + CV].copy_from_slice(&out[k * CV..(k + 1) * CV]);
            }
        }
        // Level 1: two parents per block, each over two adjacent leaves.
        let mut pairs = [0u8; LANES * 2 * CV];
        parents(
            platform,
            &leaf_cvs[..n * LEAVES * CV],
            PARENT,
            &mut pairs[..n * 2 * CV],
        );
        // Level 2: the block's root node, its digest.
        let mut roots = [0u8; LANES * CV];
        parents(
            platform,
            &pairs[..n * 2 * CV],
            PARENT | ROOT,
            &mut roots[..n * CV],
        );
        for (k, digest) in digests[group * LANES..group * LANES + n]
            .iter_mut()
            .enumerate()
        {
            digest.0.copy_from_slice(&roots[k * CV..(k + 1) * CV]);
        }
    }
}

/// Hashes each adjacent pair of chaining values in `children` into one parent node with `flags`.
fn parents(platform: Platform, children: &[u8], flags: u8, out: &mut [u8]) {
    for (children, out) in children
        .chunks(LANES * 2 * CV)
        .zip(out.chunks_mut(LANES * CV))
    {
        let mut inputs = [&ZERO_PAIR; LANES];
        let n = children.len() / (2 * CV);
        for (k, input) in inputs.iter_mut().take(n).enumerate() {
            *input = children[k * 2 * CV..(k + 1) * 2 * CV]
                .try_into()
                .expect("a pair of chaining values");
        }
        platform.hash_many(&inputs[..n], &IV, 0, IncrementCounter::No, flags, 0, 0, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    #[test]
    fn block_digests_are_blake3_of_each_block_for_every_shape() {
        // Whole groups of lanes, partial groups, one block, a short last block, less than a block, nothing.
        for len in [
            0,
            100,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK,
            15 * BLOCK + 4095,
            16 * BLOCK,
            17 * BLOCK + 7,
            64 * BLOCK,
        ] {
            let chunk = bytes(len, len as u64);
            let expected: Vec<Digest> = chunk.chunks(BLOCK).map(Digest::of).collect();
            assert_eq!(block_digests(&chunk), expected, "length {len}");
        }
    }

    #[test]
    fn a_changed_byte_changes_its_block_digest_and_no_other() {
        let mut chunk = bytes(16 * BLOCK, 7);
        let before = block_digests(&chunk);
        chunk[5 * BLOCK + 4095] ^= 1;
        let after = block_digests(&chunk);
        for k in 0..16 {
            assert_eq!(before[k] == after[k], k != 5, "block {k}");
        }
    }
}
