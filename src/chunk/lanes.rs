//! Block digests hashed side by side, and chunk digests rebuilt from them.
//!
//! Since protocol 6 a block digest is the BLAKE3 *chaining value* of the block's subtree at its place in its chunk's
//! BLAKE3 tree (PROTOCOL.md, "Chunks, blocks and digests"): block `k` is the subtree of BLAKE3 chunks (1 KiB leaves)
//! `4k..4k+3`, hashed with those leaf counters and without the root flag. Two things follow:
//! - a chunk's block digests merge into its chunk digest (`BLAKE3(chunk)`, unchanged): a destination that kept the
//!   target's block digests from its NEED verifies a patched chunk by hashing only the blocks it received
//!   ([`chunk_digest_of_blocks`]), with no second read of the target chunk and no hash of all of it;
//! - the blocks of a chunk are consecutive leaves of one tree: `blake3::platform::Platform::hash_many` hashes them
//!   on all SIMD lanes with the leaf counter going up by one per leaf, then the parents level by level, at the rate
//!   of a 64 KiB input (7.6 GB/s measured here, against 2.5 GB/s for `blake3::hash` of each 4 KiB block).
//!
//! `hash_many` is public in blake3 but undocumented ("for benchmarks only"); it is the one multi-lane entry the
//! crate has (blake3 PR 575 proposes a documented one). Cargo.toml pins blake3 exactly so that an upgrade is a
//! decision, and the tests here compare every shape with blake3's documented `hazmat` API (`set_input_offset`,
//! `finalize_non_root`, `merge_subtrees_*`), which the short last block and the merges use directly.

use blake3::hazmat::{self, HasherExt, Mode};
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
/// BLAKE3's chunk length (a leaf of the tree), and how many of them make a block.
const LEAF: usize = blake3::CHUNK_LEN;
const BLOCK: usize = BLOCK_SIZE as usize;
const LEAVES: usize = BLOCK / LEAF;
/// Blocks hashed in one pass: 64 leaves, four times AVX-512's sixteen lanes, the widest `hash_many` uses.
const GROUP: usize = 16;
/// A chaining value or digest.
const CV: usize = 32;

fn platform() -> Platform {
    static PLATFORM: OnceLock<Platform> = OnceLock::new();
    *PLATFORM.get_or_init(Platform::detect)
}

/// The digest of each block of `chunk`, in order (the last block may be short).
pub fn block_digests(chunk: &[u8]) -> Vec<Digest> {
    block_digests_at(chunk, 0)
}

/// The digests of consecutive blocks of one chunk: `bytes` starts at block `first` of its chunk, and only its last
/// block may be short (the chunk's short last block).
pub fn block_digests_at(bytes: &[u8], first: u32) -> Vec<Digest> {
    let whole = bytes.len() / BLOCK;
    let mut digests = vec![Digest([0; 32]); bytes.len().div_ceil(BLOCK)];
    hash_blocks(&bytes[..whole * BLOCK], first, &mut digests[..whole]);
    if let Some(last) = digests.get_mut(whole) {
        let offset = (u64::from(first) + whole as u64) * BLOCK as u64;
        let mut hasher = blake3::Hasher::new();
        hasher
            .set_input_offset(offset)
            .update(&bytes[whole * BLOCK..]);
        *last = Digest(hasher.finalize_non_root());
    }
    digests
}

/// The chunk digest (`BLAKE3(chunk)`) of a chunk of `chunk_len` bytes from the digests of all of its blocks, or
/// `None` for a chunk of one block, whose digest is not a merge of anything (hash its bytes).
pub fn chunk_digest_of_blocks(blocks: &[Digest], chunk_len: usize) -> Option<Digest> {
    debug_assert_eq!(blocks.len(), chunk_len.div_ceil(BLOCK));
    let n = blocks.len();
    if n < 2 {
        return None;
    }
    if n <= 64 && n.is_power_of_two() && chunk_len == n * BLOCK {
        return Some(perfect_root(blocks));
    }
    let (left, right) = split(blocks, chunk_len);
    let root = hazmat::merge_subtrees_root(&left, &right, Mode::Hash);
    Some(Digest(*root.as_bytes()))
}

/// The chunk digest (`BLAKE3(chunk)`) and the digest of each of its blocks, from one pass over its bytes: the
/// blocks are hashed side by side, then merged into the chunk's root. About as fast as `blake3::hash` alone for a
/// chunk of a power of two of whole blocks (every chunk but a short last one), whose upper levels are hashed on
/// the lanes too.
pub fn hash_chunk(chunk: &[u8]) -> (Digest, Vec<Digest>) {
    let mut blocks = vec![Digest([0; 32]); chunk.len().div_ceil(BLOCK)];
    (hash_chunk_into(chunk, &mut blocks), blocks)
}

/// [`hash_chunk`] into `blocks` (one per block of `chunk`), without allocating.
pub fn hash_chunk_into(chunk: &[u8], blocks: &mut [Digest]) -> Digest {
    let n = chunk.len().div_ceil(BLOCK);
    let whole = chunk.len() / BLOCK;
    hash_blocks(&chunk[..whole * BLOCK], 0, &mut blocks[..whole]);
    if whole < n {
        blocks[whole] = block_digests_at(&chunk[whole * BLOCK..], whole as u32)[0];
    }
    let blocks = &blocks[..n];
    if n < 2 {
        return Digest::of(chunk);
    }
    chunk_digest_of_blocks(blocks, chunk.len()).expect("two blocks or more")
}

/// The root of a perfect tree over `blocks` (a power of two of them, at least two, each a whole block): hashed level
/// by level on the SIMD lanes, every level but the root in one `hash_many` call per [`GROUP`] pairs, instead of one
/// compression per parent node.
fn perfect_root(blocks: &[Digest]) -> Digest {
    let n = blocks.len();
    debug_assert!((2..=64).contains(&n) && n.is_power_of_two());
    let mut level = [0u8; 64 * CV];
    for (d, out) in blocks.iter().zip(level.chunks_exact_mut(CV)) {
        out.copy_from_slice(&d.0);
    }
    let mut len = n * CV;
    while len > 2 * CV {
        let mut up = [0u8; 32 * CV];
        for (children, out) in level[..len]
            .chunks(GROUP * 2 * 2 * CV)
            .zip(up.chunks_mut(GROUP * 2 * CV))
        {
            parents(platform(), children, &mut out[..children.len() / 2]);
        }
        len /= 2;
        level[..len].copy_from_slice(&up[..len]);
    }
    let (left, right) = (&level[..CV], &level[CV..2 * CV]);
    let root = hazmat::merge_subtrees_root(
        left.try_into().expect("a chaining value"),
        right.try_into().expect("a chaining value"),
        Mode::Hash,
    );
    Digest(*root.as_bytes())
}

/// The chaining values of the two children of the subtree made of `blocks` (at least two, `len` bytes): BLAKE3 puts
/// the largest power of two of leaves shorter than the whole on the left, a whole number of blocks.
fn split(blocks: &[Digest], len: usize) -> ([u8; CV], [u8; CV]) {
    let left = hazmat::left_subtree_len(len as u64) as usize;
    let n = left / BLOCK;
    (
        subtree(&blocks[..n], left),
        subtree(&blocks[n..], len - left),
    )
}

/// The chaining value of the subtree made of `blocks` (`len` bytes).
pub(super) fn subtree(blocks: &[Digest], len: usize) -> [u8; CV] {
    if let [one] = blocks {
        return one.0;
    }
    let (left, right) = split(blocks, len);
    hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
}

/// Hashes the whole blocks of `bytes`, the first of them block `first` of its chunk, into `digests`.
fn hash_blocks(bytes: &[u8], first: u32, digests: &mut [Digest]) {
    let platform = platform();
    for (group, blocks) in bytes.chunks(GROUP * BLOCK).enumerate() {
        let n = blocks.len() / BLOCK;
        let block = u64::from(first) + (group * GROUP) as u64;
        // Level 0: the group's leaves in order, leaf counters going up by one from the first block's first leaf.
        let mut inputs: [&[u8; LEAF]; GROUP * LEAVES] = [&[0; LEAF]; GROUP * LEAVES];
        for (leaf, input) in blocks.chunks_exact(LEAF).zip(inputs.iter_mut()) {
            *input = leaf.try_into().expect("a whole leaf");
        }
        let mut leaf_cvs = [0u8; GROUP * LEAVES * CV];
        platform.hash_many(
            &inputs[..n * LEAVES],
            &IV,
            block * LEAVES as u64,
            IncrementCounter::Yes,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut leaf_cvs[..n * LEAVES * CV],
        );
        // Level 1: a parent over each pair of leaves; level 2: a parent over each pair of those, a block.
        let mut pairs = [0u8; GROUP * 2 * CV];
        parents(
            platform,
            &leaf_cvs[..n * LEAVES * CV],
            &mut pairs[..n * 2 * CV],
        );
        let mut roots = [0u8; GROUP * CV];
        parents(platform, &pairs[..n * 2 * CV], &mut roots[..n * CV]);
        for (k, digest) in digests[group * GROUP..group * GROUP + n]
            .iter_mut()
            .enumerate()
        {
            digest.0.copy_from_slice(&roots[k * CV..(k + 1) * CV]);
        }
    }
}

/// Hashes each adjacent pair of chaining values in `children` into one (non-root) parent node.
fn parents(platform: Platform, children: &[u8], out: &mut [u8]) {
    let mut inputs: [&[u8; 2 * CV]; GROUP * 2] = [&[0; 2 * CV]; GROUP * 2];
    let n = children.len() / (2 * CV);
    for (pair, input) in children.chunks_exact(2 * CV).zip(inputs.iter_mut()) {
        *input = pair.try_into().expect("a pair of chaining values");
    }
    platform.hash_many(
        &inputs[..n],
        &IV,
        0,
        IncrementCounter::No,
        PARENT,
        0,
        0,
        out,
    );
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

    /// A block's digest through blake3's documented subtree API: its bytes at their offset, finalized as a
    /// non-root node.
    fn at_place(block: &[u8], index: usize) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher
            .set_input_offset((index * BLOCK) as u64)
            .update(block);
        Digest(hasher.finalize_non_root())
    }

    /// Chunk lengths of every shape: one block, a short one, a partial leaf, whole groups, partial groups, odd block
    /// counts (BLAKE3's tree is not balanced there), the largest chunk.
    const SHAPES: [usize; 12] = [
        100,
        BLOCK,
        BLOCK + 1,
        BLOCK + LEAF,
        2 * BLOCK,
        3 * BLOCK,
        5 * BLOCK + 2 * LEAF + 7,
        15 * BLOCK + 4095,
        16 * BLOCK,
        17 * BLOCK + 7,
        33 * BLOCK,
        64 * BLOCK,
    ];

    #[test]
    fn block_digests_are_the_chaining_values_of_each_block_at_its_place_for_every_shape() {
        for len in SHAPES {
            let chunk = bytes(len, len as u64);
            let expected: Vec<Digest> = chunk
                .chunks(BLOCK)
                .enumerate()
                .map(|(k, b)| at_place(b, k))
                .collect();
            assert_eq!(block_digests(&chunk), expected, "length {len}");
        }
        assert!(block_digests(&[]).is_empty());
    }

    #[test]
    fn the_digests_of_a_run_of_blocks_are_those_of_the_same_blocks_in_their_chunk() {
        let chunk = bytes(17 * BLOCK + 7, 3);
        let all = block_digests(&chunk);
        for (first, count) in [(0usize, 1usize), (1, 1), (3, 5), (15, 3), (16, 2), (2, 16)] {
            let end = ((first + count) * BLOCK).min(chunk.len());
            let run = block_digests_at(&chunk[first * BLOCK..end], first as u32);
            assert_eq!(run, all[first..first + run.len()], "blocks {first}+{count}");
        }
    }

    #[test]
    fn block_digests_merge_into_the_chunk_digest_for_every_shape() {
        for len in SHAPES {
            let chunk = bytes(len, 100 + len as u64);
            let merged = chunk_digest_of_blocks(&block_digests(&chunk), len);
            if len <= BLOCK {
                assert_eq!(
                    merged, None,
                    "a chunk of one block ({len} bytes) is hashed whole"
                );
            } else {
                assert_eq!(merged, Some(Digest::of(&chunk)), "length {len}");
            }
        }
    }

    #[test]
    fn one_pass_gives_the_chunk_digest_and_the_block_digests_for_every_shape() {
        for len in SHAPES.into_iter().chain([0, 32 * BLOCK, 8 * BLOCK + 1]) {
            let chunk = bytes(len, 200 + len as u64);
            let (digest, blocks) = hash_chunk(&chunk);
            assert_eq!(digest, Digest::of(&chunk), "length {len}");
            assert_eq!(blocks, block_digests(&chunk), "length {len}");
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

    #[test]
    fn equal_blocks_at_different_places_have_different_digests() {
        // The place is part of the digest: a block moved inside its chunk does not compare equal.
        let chunk = vec![7u8; 4 * BLOCK];
        let d = block_digests(&chunk);
        assert_ne!(d[0], d[1]);
        assert_ne!(d[1], d[3]);
        assert_ne!(
            d[0],
            Digest::of(&chunk[..BLOCK]),
            "not BLAKE3 of the block alone"
        );
    }
}
