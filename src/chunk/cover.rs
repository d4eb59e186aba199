//! Covers (protocol 7): what a chunk's other blocks contribute to its digest, in as few chaining values as its
//! BLAKE3 tree allows.
//!
//! A pushed chunk (BLOCKS) carries some of its blocks, the *listed* ones. The cover of the others is the chaining
//! value of every largest subtree of the chunk's tree that holds no listed block, left to right: with the digests of
//! the listed blocks it rebuilds the chunk digest, and so does it with the digests of *other* bytes in the listed
//! places. The destination uses both: the cover with its target's listed blocks must give its base's digest of the
//! chunk (so the blocks outside the list are the base's: the list missed none of the chunk's changes), and the
//! cover with the pushed blocks the source's new digest. Neither needs the target's other blocks read. One listed
//! block of sixteen needs a cover of four chaining values (its siblings on the way to the root), not fifteen.

use blake3::hazmat::{self, Mode};

use super::lanes::subtree;
use super::{Digest, BLOCK_SIZE};

const BLOCK: usize = BLOCK_SIZE as usize;

/// The cover of the blocks not in `listed` of a chunk of `chunk_len` bytes, from the digests of all its `blocks`.
/// Empty for a chunk of one block, or when every block is listed; a chunk with no listed block has no cover (its
/// root is not a chaining value), and gets an empty one.
pub fn cover(blocks: &[Digest], chunk_len: usize, listed: u64) -> Vec<Digest> {
    debug_assert_eq!(blocks.len(), chunk_len.div_ceil(BLOCK));
    let mut out = Vec::new();
    if blocks.len() >= 2 && listed != 0 {
        let left = left_len(chunk_len);
        collect(blocks, 0, left, listed, &mut out);
        collect(blocks, left / BLOCK, chunk_len - left, listed, &mut out);
    }
    out
}

/// The digest of a chunk of `chunk_len` bytes from the cover of the blocks not in `listed` and `digests`, which has
/// one entry per block of the chunk, of which only the listed ones are used. `None` when the cover is not exactly
/// the one `listed` needs (a chaining value too few or too many), and for a chunk of one block or none listed,
/// whose digest is not such a merge.
pub fn chunk_digest_with_cover(
    cover: &[Digest],
    digests: &[Digest],
    chunk_len: usize,
    listed: u64,
) -> Option<Digest> {
    let n = chunk_len.div_ceil(BLOCK);
    if n < 2 || listed == 0 || digests.len() != n {
        return None;
    }
    let mut cover = cover.iter();
    let left = left_len(chunk_len);
    let l = rebuild(&mut cover, digests, 0, left, listed)?;
    let r = rebuild(&mut cover, digests, left / BLOCK, chunk_len - left, listed)?;
    if cover.next().is_some() {
        return None;
    }
    Some(Digest(
        *hazmat::merge_subtrees_root(&l, &r, Mode::Hash).as_bytes(),
    ))
}

/// The left child's length of a subtree of `len` bytes (BLAKE3: the largest power of two of leaves shorter than
/// the whole; a whole number of blocks when the subtree has two or more).
fn left_len(len: usize) -> usize {
    hazmat::left_subtree_len(len as u64) as usize
}

/// Whether any of blocks `first .. first + n` is listed.
fn any_listed(listed: u64, first: usize, n: usize) -> bool {
    let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    (listed >> first) & mask != 0
}

/// Adds the cover of the subtree of `len` bytes from block `first` on.
fn collect(blocks: &[Digest], first: usize, len: usize, listed: u64, out: &mut Vec<Digest>) {
    let n = len.div_ceil(BLOCK);
    if !any_listed(listed, first, n) {
        out.push(Digest(subtree(&blocks[first..first + n], len)));
        return;
    }
    if n == 1 {
        return;
    }
    let left = left_len(len);
    collect(blocks, first, left, listed, out);
    collect(blocks, first + left / BLOCK, len - left, listed, out);
}

/// The chaining value of the subtree of `len` bytes from block `first` on, taking unlisted subtrees from `cover`.
fn rebuild<'a>(
    cover: &mut impl Iterator<Item = &'a Digest>,
    digests: &[Digest],
    first: usize,
    len: usize,
    listed: u64,
) -> Option<[u8; 32]> {
    let n = len.div_ceil(BLOCK);
    if !any_listed(listed, first, n) {
        return cover.next().map(|d| d.0);
    }
    if n == 1 {
        return Some(digests[first].0);
    }
    let left = left_len(len);
    let l = rebuild(cover, digests, first, left, listed)?;
    let r = rebuild(cover, digests, first + left / BLOCK, len - left, listed)?;
    Some(hazmat::merge_subtrees_non_root(&l, &r, Mode::Hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::block_digests;
    use rand::{Rng, RngCore, SeedableRng};

    /// Chunk lengths of two blocks or more, of every shape: a short last block, a partial leaf, odd block counts
    /// (an unbalanced tree), whole and partial groups of sixteen, the largest chunk.
    const SHAPES: [usize; 9] = [
        2 * BLOCK,
        BLOCK + 1,
        3 * BLOCK,
        5 * BLOCK + 2048 + 7,
        15 * BLOCK + 4095,
        16 * BLOCK,
        17 * BLOCK + 7,
        33 * BLOCK,
        64 * BLOCK,
    ];

    fn all(n: usize) -> u64 {
        if n == 64 {
            u64::MAX
        } else {
            (1 << n) - 1
        }
    }

    #[test]
    fn a_cover_and_the_listed_blocks_rebuild_the_chunk_digest_for_every_shape_and_list() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for len in SHAPES {
            let mut chunk = vec![0u8; len];
            rng.fill_bytes(&mut chunk);
            let blocks = block_digests(&chunk);
            let n = blocks.len();
            let mut lists = vec![1, 1 << (n - 1), all(n), all(n) & 0x5555_5555_5555_5555];
            lists.extend(
                (0..40)
                    .map(|_| rng.random::<u64>() & all(n))
                    .filter(|&l| l != 0),
            );
            for listed in lists {
                let c = cover(&blocks, len, listed);
                let digest = chunk_digest_with_cover(&c, &blocks, len, listed);
                assert_eq!(
                    digest,
                    Some(Digest::of(&chunk)),
                    "{len} bytes, listed {listed:#x}"
                );
                // Only the listed entries are read.
                let mut only = vec![Digest([0xee; 32]); n];
                for b in 0..n {
                    if listed & (1 << b) != 0 {
                        only[b] = blocks[b];
                    }
                }
                assert_eq!(chunk_digest_with_cover(&c, &only, len, listed), digest);
                // A chaining value too few or too many is refused, never merged.
                if !c.is_empty() {
                    assert_eq!(chunk_digest_with_cover(&c[1..], &blocks, len, listed), None);
                }
                let mut more = c.clone();
                more.push(blocks[0]);
                assert_eq!(chunk_digest_with_cover(&more, &blocks, len, listed), None);
            }
        }
    }

    #[test]
    fn a_cover_is_the_siblings_on_the_way_to_the_root() {
        let chunk = vec![9u8; 16 * BLOCK];
        let blocks = block_digests(&chunk);
        assert_eq!(cover(&blocks, chunk.len(), 1 << 5).len(), 4);
        assert_eq!(
            cover(&blocks, chunk.len(), 0b11 << 6).len(),
            3,
            "two blocks of one pair"
        );
        assert_eq!(
            cover(&blocks, chunk.len(), 0b11 << 7).len(),
            6,
            "two blocks of two pairs"
        );
        assert!(cover(&blocks, chunk.len(), 0xffff).is_empty());
        assert!(
            cover(&blocks[..1], BLOCK, 1).is_empty(),
            "one block: nothing to cover"
        );
        assert_eq!(chunk_digest_with_cover(&[], &blocks[..1], BLOCK, 1), None);
        assert_eq!(chunk_digest_with_cover(&[], &blocks, chunk.len(), 0), None);
    }

    #[test]
    fn a_changed_block_outside_the_list_changes_the_rebuilt_digest() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for len in SHAPES {
            let mut base = vec![0u8; len];
            rng.fill_bytes(&mut base);
            let n = len.div_ceil(BLOCK);
            let listed = 1u64 << rng.random_range(0..n);
            for changed in (0..n).filter(|b| listed & (1 << b) == 0) {
                let mut now = base.clone();
                now[changed * BLOCK] ^= 1;
                // The source's cover of its chunk, with the target's (the base's) listed blocks.
                let c = cover(&block_digests(&now), len, listed);
                let rebuilt = chunk_digest_with_cover(&c, &block_digests(&base), len, listed);
                assert_ne!(
                    rebuilt,
                    Some(Digest::of(&base)),
                    "{len} bytes, block {changed}"
                );
            }
        }
    }
}
