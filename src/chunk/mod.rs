//! Chunk geometry, BLAKE3 digests of chunks and blocks, zero detection and the whole-volume digest.
//!
//! Pure computation, no I/O and no tokio. The definitions here are the ones in `proto/PROTOCOL.md`
//! ("Chunks, blocks and digests"): both agents must compute them identically.

pub mod pages;

use std::fmt;

mod cover;
mod lanes;

pub use cover::{chunk_digest_with_cover, cover};
pub use lanes::{
    block_digests, block_digests_at, chunk_digest_of_blocks, hash_chunk, hash_chunk_into,
};

/// The finest unit that travels: guests write 4 KiB blocks. Frozen in protocol version 1.
pub const BLOCK_SIZE: u32 = 4096;
/// The default chunk size (first level of comparison); see "Choosing the chunk size" in the protocol.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// The largest chunk: 64 blocks, so a set of blocks fits a `u64` mask. Frozen in protocol version 1.
pub const MAX_CHUNK_SIZE: u32 = 64 * BLOCK_SIZE;
/// Key-derivation context of the volume digest. Frozen in protocol version 1.
const VOLUME_DIGEST_CONTEXT: &str = "blockmover v1 2026-11 volume digest";

/// A BLAKE3 digest of a chunk, a block or a whole volume.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The BLAKE3 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a volume of a given size splits into chunks and blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    volume_size: u64,
    chunk_size: u32,
}

impl Geometry {
    /// Checks the chunk size (a power of two from [`BLOCK_SIZE`] to [`MAX_CHUNK_SIZE`]).
    pub fn new(volume_size: u64, chunk_size: u32) -> Result<Self, String> {
        if !chunk_size.is_power_of_two() || !(BLOCK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(format!(
                "chunk size {chunk_size} must be a power of two from {BLOCK_SIZE} to {MAX_CHUNK_SIZE}"
            ));
        }
        Ok(Geometry {
            volume_size,
            chunk_size,
        })
    }

    /// The volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// `ceil(volume_size / chunk_size)`.
    pub fn chunk_count(&self) -> u64 {
        self.volume_size.div_ceil(u64::from(self.chunk_size))
    }

    /// Byte offset and length of chunk `index` (the last chunk may be short).
    pub fn chunk_range(&self, index: u64) -> (u64, usize) {
        let offset = index * u64::from(self.chunk_size);
        let len = (self.volume_size.saturating_sub(offset)).min(u64::from(self.chunk_size));
        (offset, len as usize)
    }

    /// How many blocks chunk `index` holds.
    pub fn blocks_in_chunk(&self, index: u64) -> u32 {
        blocks_in(self.chunk_range(index).1)
    }
}

/// How many blocks a chunk of `len` bytes holds (the last one may be short).
pub fn blocks_in(len: usize) -> u32 {
    len.div_ceil(BLOCK_SIZE as usize) as u32
}

/// The byte range of block `b` inside a chunk of `chunk_len` bytes.
pub fn block_range(chunk_len: usize, b: u32) -> std::ops::Range<usize> {
    let start = b as usize * BLOCK_SIZE as usize;
    start..(start + BLOCK_SIZE as usize).min(chunk_len)
}

/// The runs of set bits of a block mask, as half-open block ranges.
pub fn runs(mask: u64) -> impl Iterator<Item = (u32, u32)> {
    let mut m = mask;
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let start = m.trailing_zeros();
        let len = (m >> start).trailing_ones();
        m &= !(((1u128 << len) - 1) as u64) << start;
        Some((start, start + len))
    })
}

/// Whether every byte is zero. Written as an OR-fold over fixed slices so that it vectorises.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// What a scan learns about one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSummary {
    /// BLAKE3 of the chunk's bytes.
    pub digest: Digest,
    /// Whether the chunk is all zeros.
    pub zero: bool,
}

/// Digests of all-zero chunks, precomputed so that zero chunks are detected without hashing them.
#[derive(Clone, Debug)]
pub struct ZeroDigests {
    full: Digest,
    last: Digest,
    geometry: Geometry,
}

impl ZeroDigests {
    /// Precomputes the digests of a full zero chunk and of the (possibly short) last one.
    pub fn new(geometry: Geometry) -> Self {
        let full = Digest::of(&vec![0u8; geometry.chunk_size() as usize]);
        let last_len = geometry
            .chunk_count()
            .checked_sub(1)
            .map_or(0, |i| geometry.chunk_range(i).1);
        ZeroDigests {
            full,
            last: Digest::of(&vec![0u8; last_len]),
            geometry,
        }
    }

    /// The digest of zeros the length of chunk `index`.
    pub fn for_chunk(&self, index: u64) -> Digest {
        if index + 1 == self.geometry.chunk_count() {
            self.last
        } else {
            self.full
        }
    }

    /// The summary of chunk `index` known to be all zeros.
    pub fn zero_summary(&self, index: u64) -> ChunkSummary {
        ChunkSummary {
            digest: self.for_chunk(index),
            zero: true,
        }
    }

    /// Hashes chunk `index`, skipping BLAKE3 when it is all zeros.
    pub fn summarize(&self, index: u64, bytes: &[u8]) -> ChunkSummary {
        if is_zero(bytes) {
            self.zero_summary(index)
        } else {
            ChunkSummary {
                digest: Digest::of(bytes),
                zero: false,
            }
        }
    }
}

/// A BLAKE3 hasher fed many small pieces (chunk digests, 32 bytes each) through a staging buffer. BLAKE3 hashes
/// input of 2 KiB or more on all SIMD lanes at once, but pieces of 32 bytes one 64-byte block at a time: fed digest
/// by digest, the manifest and volume digests of a 16 GiB volume (8 MiB of digests, three hashers per agent) took
/// more CPU than the rest of a small delta. The result is the same as feeding the pieces one by one.
#[derive(Clone, Debug)]
pub struct StagedHasher {
    hasher: blake3::Hasher,
    staged: Vec<u8>,
}

/// Bytes a [`StagedHasher`] gathers before hashing them.
const STAGED_LEN: usize = 64 << 10;

impl StagedHasher {
    /// Stages in front of `hasher`.
    pub fn new(hasher: blake3::Hasher) -> Self {
        StagedHasher {
            hasher,
            staged: Vec::new(),
        }
    }

    /// Adds `bytes`. The hasher is handed input so that what it has hashed always ends at a multiple of
    /// [`STAGED_LEN`]: BLAKE3 hashes a subtree on all SIMD lanes only when it starts at a multiple of its own size,
    /// and a volume digest's 12-byte prefix put every 64 KiB handed over at an odd offset, each hashed at 4.2 GB/s
    /// instead of 7.5 (512 MiB of digests at 1 TiB, several passes per agent).
    pub fn update(&mut self, mut bytes: &[u8]) {
        loop {
            let pending = (self.hasher.count() % STAGED_LEN as u64) as usize + self.staged.len();
            let room = STAGED_LEN - pending % STAGED_LEN;
            if bytes.len() < room {
                if self.staged.capacity() == 0 {
                    self.staged.reserve_exact(STAGED_LEN);
                }
                self.staged.extend_from_slice(bytes);
                return;
            }
            if self.staged.is_empty() {
                // Up to the boundary and every whole stage after it, straight from `bytes`.
                let whole = room + (bytes.len() - room) / STAGED_LEN * STAGED_LEN;
                self.hasher.update(&bytes[..whole]);
                bytes = &bytes[whole..];
            } else {
                self.staged.extend_from_slice(&bytes[..room]);
                bytes = &bytes[room..];
                self.hasher.update(&self.staged);
                self.staged.clear();
            }
        }
    }

    /// The hash of everything added.
    pub fn finalize(&self) -> blake3::Hash {
        if self.staged.is_empty() {
            return self.hasher.finalize();
        }
        let mut rest = self.hasher.clone();
        rest.update(&self.staged);
        rest.finalize()
    }
}

/// The whole-volume digest, fed chunk digests in chunk order.
#[derive(Clone, Debug)]
pub struct VolumeDigest {
    hasher: StagedHasher,
    next: u64,
}

impl VolumeDigest {
    /// Starts the digest of a volume of this geometry.
    pub fn new(geometry: Geometry) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(VOLUME_DIGEST_CONTEXT);
        hasher.update(&geometry.volume_size().to_le_bytes());
        hasher.update(&geometry.chunk_size().to_le_bytes());
        VolumeDigest {
            hasher: StagedHasher::new(hasher),
            next: 0,
        }
    }

    /// Adds the digest of the next chunk.
    pub fn push(&mut self, digest: &Digest) {
        self.push_many(&digest.0);
    }

    /// Adds the digests of the next `digests.len() / 32` chunks, concatenated.
    pub fn push_many(&mut self, digests: &[u8]) {
        debug_assert_eq!(digests.len() % 32, 0);
        self.hasher.update(digests);
        self.next += (digests.len() / 32) as u64;
    }

    /// How many chunk digests were pushed.
    pub fn chunks(&self) -> u64 {
        self.next
    }

    /// The digest over everything pushed.
    pub fn finish(&self) -> Digest {
        Digest(*self.hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_hasher_hashes_what_a_plain_one_fed_piece_by_piece_does() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        // Digest-sized pieces across the staging boundary, odd sizes, a piece larger than the stage, and nothing.
        for sizes in [
            &[32usize][..],
            &[1, 31, 4096, 65535, 70_000, 7],
            &[0, 65536, 1],
        ] {
            let mut plain = blake3::Hasher::new_derive_key("blockmover staged test");
            let mut staged = StagedHasher::new(plain.clone());
            let mut at = 0;
            for size in sizes.iter().cycle().take(3000) {
                let end = (at + size).min(bytes.len());
                plain.update(&bytes[at..end]);
                staged.update(&bytes[at..end]);
                at = end;
                if at % 3 == 0 {
                    assert_eq!(staged.finalize(), plain.finalize(), "after {at} bytes");
                }
            }
            assert!(at > STAGED_LEN, "the pieces cross the stage ({at} bytes)");
            assert_eq!(staged.finalize(), plain.finalize());
        }
        assert_eq!(
            StagedHasher::new(blake3::Hasher::new()).finalize(),
            blake3::hash(b"")
        );
    }

    #[test]
    fn a_staged_hasher_after_a_prefix_hands_over_input_aligned_to_the_stage() {
        let bytes: Vec<u8> = (0..400_000u32).map(|i| (i * 17 % 253) as u8).collect();
        for prefix in [0usize, 12, 65535] {
            let mut plain = blake3::Hasher::new_derive_key("blockmover staged test");
            plain.update(&bytes[..prefix]);
            let mut staged = StagedHasher::new(plain.clone());
            let mut at = prefix;
            for size in [32usize, 100_000, 32, 7, 200_000].iter().cycle() {
                let end = (at + size).min(bytes.len());
                plain.update(&bytes[at..end]);
                staged.update(&bytes[at..end]);
                at = end;
                // Whatever it handed over ends on a stage boundary; less than a stage waits.
                let count = staged.hasher.count();
                assert!(
                    count == prefix as u64 || count.is_multiple_of(STAGED_LEN as u64),
                    "{count} hashed after {at} bytes"
                );
                assert!(staged.staged.len() < STAGED_LEN);
                assert_eq!(staged.finalize(), plain.finalize(), "after {at} bytes");
                if at == bytes.len() {
                    break;
                }
            }
        }
    }

    #[test]
    fn geometry_rejects_chunk_sizes_that_do_not_fit_a_block_mask() {
        assert!(Geometry::new(1 << 20, 3000).is_err());
        assert!(Geometry::new(1 << 20, 2048).is_err());
        assert!(Geometry::new(1 << 20, 512 * 1024).is_err());
        assert!(Geometry::new(1 << 20, 64 * 1024).is_ok());
    }

    #[test]
    fn short_last_chunk_and_block_are_counted() {
        let g = Geometry::new(3 * 65536 + 5000, 65536).expect("valid geometry");
        assert_eq!(g.chunk_count(), 4);
        assert_eq!(g.chunk_range(3), (3 * 65536, 5000));
        assert_eq!(g.blocks_in_chunk(3), 2);
        assert_eq!(block_range(5000, 1), 4096..5000);
        assert_eq!(g.blocks_in_chunk(0), 16);
    }

    #[test]
    fn zero_detection_matches_the_digest_of_zeros() {
        let g = Geometry::new(65536 + 100, 65536).expect("valid geometry");
        let z = ZeroDigests::new(g);
        let s = z.summarize(1, &[0u8; 100]);
        assert!(s.zero);
        assert_eq!(s.digest, Digest::of(&[0u8; 100]));
        let mut data = vec![0u8; 65536];
        data[65535] = 1;
        let s = z.summarize(0, &data);
        assert!(!s.zero);
        assert_eq!(s.digest, Digest::of(&data));
    }

    #[test]
    fn runs_split_a_mask_into_consecutive_blocks() {
        assert_eq!(runs(0b0111_0110).collect::<Vec<_>>(), vec![(1, 3), (4, 7)]);
        assert_eq!(runs(u64::MAX).collect::<Vec<_>>(), vec![(0, 64)]);
        assert_eq!(runs(0).count(), 0);
    }

    #[test]
    fn is_zero_finds_a_byte_anywhere() {
        for pos in [0usize, 63, 64, 4095, 4099] {
            let mut v = vec![0u8; 4100];
            assert!(is_zero(&v));
            v[pos] = 0x80;
            assert!(!is_zero(&v), "byte at {pos}");
        }
    }

    #[test]
    fn volume_digest_depends_on_order_and_geometry() {
        let g = Geometry::new(2 * 65536, 65536).expect("valid geometry");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let digest = |g, ds: &[Digest]| {
            let mut v = VolumeDigest::new(g);
            ds.iter().for_each(|d| v.push(d));
            v.finish()
        };
        assert_ne!(digest(g, &[a, b]), digest(g, &[b, a]));
        let g2 = Geometry::new(2 * 65536 - 1, 65536).expect("valid geometry");
        assert_ne!(digest(g, &[a, b]), digest(g2, &[a, b]));
    }
}
