//! The whole-volume digest by pages: the same digest as [`super::VolumeDigest`], computed from the BLAKE3
//! chaining values of fixed-size pieces of its input, so that a change to a few chunk digests costs a few pages
//! and a merge of the page table, not a hash of every digest (512 MiB of them for a 1 TiB volume).
//!
//! The volume digest is one BLAKE3 (derive-key mode) over `input = volume_size (8, LE) || chunk_size (4, LE) ||
//! digest of chunk 0 || digest of chunk 1 || ...`. BLAKE3 is a tree over 1 KiB chunks of its input; a page is the
//! aligned subtree over bytes `p × PAGE_LEN .. (p + 1) × PAGE_LEN` of that input (the last may be short). Page
//! boundaries do not fall on digest boundaries (the 12-byte prefix), so a chunk digest may lie in two pages.
//! With more than one page, a page's value is its non-root chaining value and the root is merged over them in
//! BLAKE3's own tree shape; with one page, its value is the volume digest itself. The tests check both against
//! [`super::VolumeDigest`] for every shape of tree.

use std::ops::Range;

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};

use super::{Digest, Geometry, VOLUME_DIGEST_CONTEXT};

/// Bytes of the volume digest's input per page: a power-of-two number of BLAKE3 chunks. Frozen in manifest
/// format 3 (a change takes a new magic). 512 digests: a 1 TiB volume in 64 KiB chunks has 32 Ki pages (a 1 MiB
/// table), and one changed chunk costs a 16 KiB page.
pub const PAGE_LEN: u64 = 16 << 10;
/// Bytes of the input before the first digest (volume size and chunk size).
const PREFIX_LEN: u64 = 12;
/// Bytes per chunk digest.
const DIGEST_LEN: u64 = 32;

/// The page layout of a geometry's volume digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pages {
    geometry: Geometry,
    input_len: u64,
    count: u64,
    key: [u8; 32],
}

impl Pages {
    /// The pages of `geometry`'s volume digest.
    pub fn new(geometry: Geometry) -> Self {
        let input_len = PREFIX_LEN + DIGEST_LEN * geometry.chunk_count();
        Pages {
            geometry,
            input_len,
            count: input_len.div_ceil(PAGE_LEN),
            key: hazmat::hash_derive_key_context(VOLUME_DIGEST_CONTEXT),
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// How many pages (at least 1).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes of page `p`'s input.
    pub fn len(&self, p: u64) -> usize {
        let start = p * PAGE_LEN;
        ((start + PAGE_LEN).min(self.input_len) - start) as usize
    }

    /// The chunks whose digests have bytes in page `p`.
    pub fn chunks(&self, p: u64) -> Range<u64> {
        let start = p * PAGE_LEN;
        let end = (start + PAGE_LEN).min(self.input_len);
        let first = start.saturating_sub(PREFIX_LEN) / DIGEST_LEN;
        let last = (end - PREFIX_LEN).div_ceil(DIGEST_LEN);
        first..last.min(self.geometry.chunk_count())
    }

    /// The pages that hold bytes of chunk `chunk`'s digest (one or two).
    pub fn of_chunk(&self, chunk: u64) -> Range<u64> {
        let start = PREFIX_LEN + chunk * DIGEST_LEN;
        start / PAGE_LEN..(start + DIGEST_LEN - 1) / PAGE_LEN + 1
    }

    /// Page `p`'s input, given the digests of [`Pages::chunks`]`(p)` concatenated.
    pub fn input<'a>(&self, p: u64, digests: &'a [u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
        let chunks = self.chunks(p);
        debug_assert_eq!(
            digests.len() as u64,
            (chunks.end - chunks.start) * DIGEST_LEN
        );
        let len = self.len(p);
        if p == 0 {
            scratch.clear();
            scratch.extend_from_slice(&self.geometry.volume_size().to_le_bytes());
            scratch.extend_from_slice(&self.geometry.chunk_size().to_le_bytes());
            scratch.extend_from_slice(&digests[..len - PREFIX_LEN as usize]);
            return scratch;
        }
        let skip = (p * PAGE_LEN - PREFIX_LEN - chunks.start * DIGEST_LEN) as usize;
        &digests[skip..skip + len]
    }

    /// The value of page `p` from its input (see the module doc).
    pub fn value(&self, p: u64, input: &[u8]) -> [u8; 32] {
        debug_assert_eq!(input.len(), self.len(p));
        let mut h = blake3::Hasher::new_from_context_key(&self.key);
        if self.count == 1 {
            h.update(input);
            return *h.finalize().as_bytes();
        }
        h.set_input_offset(p * PAGE_LEN);
        h.update(input);
        h.finalize_non_root()
    }

    /// The volume digest of a page table (one value per page, in order).
    pub fn root(&self, table: &[[u8; 32]]) -> Digest {
        assert_eq!(table.len() as u64, self.count, "one value per page");
        if self.count == 1 {
            return Digest(table[0]);
        }
        let mode = Mode::DeriveKeyMaterial(&self.key);
        let split = hazmat::left_subtree_len(self.input_len);
        let pages = (split / PAGE_LEN) as usize;
        let left = subtree(&table[..pages], split, mode);
        let right = subtree(&table[pages..], self.input_len - split, mode);
        Digest(*hazmat::merge_subtrees_root(&left, &right, mode).as_bytes())
    }
}

/// The chaining value of the subtree over `table`'s pages, `len` bytes of input.
fn subtree(table: &[[u8; 32]], len: u64, mode: Mode) -> ChainingValue {
    if table.len() == 1 {
        return table[0];
    }
    // A subtree of more than one page is longer than a page, so its left half is a whole number of pages.
    let split = hazmat::left_subtree_len(len);
    let pages = (split / PAGE_LEN) as usize;
    let left = subtree(&table[..pages], split, mode);
    let right = subtree(&table[pages..], len - split, mode);
    hazmat::merge_subtrees_non_root(&left, &right, mode)
}

/// Computes the page table of digests pushed in chunk order (what a manifest writer stores beside them).
pub struct PageHasher {
    pages: Pages,
    /// The input of the page being filled.
    page: Vec<u8>,
    table: Vec<[u8; 32]>,
    pushed: u64,
}

impl PageHasher {
    /// For a volume of `geometry`.
    pub fn new(geometry: Geometry) -> Self {
        let pages = Pages::new(geometry);
        let mut page = Vec::with_capacity(PAGE_LEN as usize);
        page.extend_from_slice(&geometry.volume_size().to_le_bytes());
        page.extend_from_slice(&geometry.chunk_size().to_le_bytes());
        PageHasher {
            table: Vec::with_capacity(pages.count() as usize),
            pages,
            page,
            pushed: 0,
        }
    }

    /// Adds the digests of the next `digests.len() / 32` chunks, concatenated. Digests past the geometry's chunk
    /// count are ignored (the caller counts and refuses them).
    pub fn push_many(&mut self, mut digests: &[u8]) {
        debug_assert_eq!(digests.len() % DIGEST_LEN as usize, 0);
        let room = self.pages.geometry.chunk_count() - self.pushed;
        let n = (digests.len() as u64 / DIGEST_LEN).min(room);
        digests = &digests[..(n * DIGEST_LEN) as usize];
        self.pushed += n;
        while !digests.is_empty() {
            let take = (PAGE_LEN as usize - self.page.len()).min(digests.len());
            self.page.extend_from_slice(&digests[..take]);
            digests = &digests[take..];
            if self.page.len() == PAGE_LEN as usize
                && self.table.len() as u64 + 1 < self.pages.count
            {
                let p = self.table.len() as u64;
                self.table.push(self.pages.value(p, &self.page));
                self.page.clear();
            }
        }
    }

    /// How many digests were pushed.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// The page table and the volume digest, once every chunk's digest was pushed (`None` before).
    pub fn finish(mut self) -> Option<(Vec<[u8; 32]>, Digest)> {
        if self.pushed != self.pages.geometry.chunk_count() {
            return None;
        }
        let p = self.table.len() as u64;
        debug_assert_eq!(p + 1, self.pages.count);
        self.table.push(self.pages.value(p, &self.page));
        let root = self.pages.root(&self.table);
        Some((self.table, root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::VolumeDigest;

    fn digests(n: u64, salt: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|i| *blake3::hash(&[&i.to_le_bytes()[..], &[salt]].concat()).as_bytes())
            .collect()
    }

    fn flat(g: Geometry, ds: &[u8]) -> Digest {
        let mut v = VolumeDigest::new(g);
        v.push_many(ds);
        v.finish()
    }

    /// The table of `ds` built page by page from [`Pages::chunks`] and [`Pages::input`].
    fn by_pages(pages: &Pages, ds: &[u8]) -> Vec<[u8; 32]> {
        let mut scratch = Vec::new();
        (0..pages.count())
            .map(|p| {
                let c = pages.chunks(p);
                let bytes = &ds[(c.start * 32) as usize..(c.end * 32) as usize];
                pages.value(p, pages.input(p, bytes, &mut scratch))
            })
            .collect()
    }

    /// Chunk counts around every boundary that changes the tree's shape: one page, a page exactly full, two,
    /// three (an unbalanced tree), a power of two pages and one more, and a last page of a few bytes.
    const COUNTS: [u64; 16] = [
        1, 2, 100, 511, 512, 513, 1023, 1024, 1025, 1535, 1536, 2047, 4095, 4096, 4097, 9000,
    ];

    #[test]
    fn the_page_table_gives_the_flat_volume_digest() {
        for n in COUNTS {
            let g = Geometry::new(n * 4096 - 7, 4096).expect("geometry");
            let ds = digests(n, 1);
            let pages = Pages::new(g);
            let mut streamed = PageHasher::new(g);
            // Pushed in uneven pieces, to cross page boundaries mid-push.
            for piece in ds.chunks(32 * 37) {
                streamed.push_many(piece);
            }
            let (table, root) = streamed.finish().expect("all pushed");
            assert_eq!(root, flat(g, &ds), "{n} chunks");
            assert_eq!(table, by_pages(&pages, &ds), "{n} chunks");
            assert_eq!(pages.root(&table), root, "{n} chunks");
        }
    }

    #[test]
    fn a_changed_digest_changes_only_its_pages() {
        for n in [513u64, 4097] {
            let g = Geometry::new(n * 4096, 4096).expect("geometry");
            let pages = Pages::new(g);
            let ds = digests(n, 2);
            let table = by_pages(&pages, &ds);
            for chunk in [0, 1, 510, 511, 512, n - 1] {
                let mut changed = ds.clone();
                changed[(chunk * 32) as usize + 31] ^= 1;
                let new = by_pages(&pages, &changed);
                let touched = pages.of_chunk(chunk);
                for p in 0..pages.count() {
                    // A digest's last byte is in the last page it touches.
                    let expect_changed = p == touched.end - 1;
                    assert_eq!(
                        new[p as usize] != table[p as usize],
                        expect_changed,
                        "{n} {chunk} {p}"
                    );
                    assert!(pages.chunks(p).contains(&chunk) == touched.contains(&p));
                }
                assert_eq!(pages.root(&new), flat(g, &changed));
            }
        }
    }

    #[test]
    fn pages_cover_every_chunk_and_byte() {
        for n in COUNTS {
            let g = Geometry::new(n * 65536, 65536).expect("geometry");
            let pages = Pages::new(g);
            let total: u64 = (0..pages.count()).map(|p| pages.len(p) as u64).sum();
            assert_eq!(total, 12 + 32 * n);
            assert_eq!(pages.chunks(0).start, 0);
            assert_eq!(pages.chunks(pages.count() - 1).end, n);
            for p in 1..pages.count() {
                let (a, b) = (pages.chunks(p - 1), pages.chunks(p));
                // A page boundary falls 20 bytes into a digest, which is in both pages.
                assert_eq!(a.end, b.start + 1, "{n} {p}");
            }
        }
    }

    #[test]
    fn a_hasher_refuses_to_finish_short() {
        let g = Geometry::new(10 * 4096, 4096).expect("geometry");
        let mut h = PageHasher::new(g);
        h.push_many(&digests(9, 3));
        assert!(h.finish().is_none());
    }
}
