//! An agent's block digests, kept beside its manifest (`source.blocks`, `destination.blocks` in the state
//! directory): for each chunk the digests of its 4 KiB blocks (nodes of the chunk's BLAKE3 tree, see
//! `chunk::lanes`). With them a source's delta by change list reads only the blocks its list names and takes the
//! digests of the chunk's other blocks from here, and a destination's delta reads nothing of its target to check a
//! pushed chunk or to ask for a changed one.
//!
//! A cache, not a record: nothing in it is believed until it proves itself. An entry is used only when its block
//! digests merge into the digest the agent's manifest (checksummed, validated page by page) holds for that chunk;
//! finding other block digests that merge into the same chunk digest is a BLAKE3 collision. So the file needs no
//! header, checksum, fsync or atomic replacement: an entry that is torn, stale (its chunk changed since), from
//! another geometry or another volume, or a hole, merges into another digest (or is short), and its chunk is read
//! whole, as without the file. Entries are written whenever the source hashed a chunk with its block digests, in any
//! sync; an entry of a sync that then fails describes bytes the manifest does not, and is never used. A whole chunk
//! of zeros in the manifest needs no entry.
//!
//! Layout: the entry of chunk `c` is at byte `c × S × 32`, `S = chunk_size / 4096`: the digests of its blocks in
//! order, 32 bytes each (a short last chunk's entry holds fewer). The file is sparse: 1/128 of the volume at most,
//! for the chunks hashed with their block digests (a full comparison with a state directory hashes all of them).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{Reader, Role, Store};
use crate::chunk::{
    block_digests, blocks_in, chunk_digest_of_blocks, Digest, Geometry, BLOCK_SIZE,
};

/// Entries of a [`BlockFile::prefetch`] this close (bytes) are read in one request: the gap costs less to read
/// than another request.
const PREFETCH_GAP: u64 = 64 << 10;

/// The byte ranges `(offset, length)` that hold the entries (`entry` bytes each) at offsets `at` (increasing), with
/// entries closer than [`PREFETCH_GAP`] in one range.
fn prefetch_runs(entry: u64, at: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for at in at {
        match runs.last_mut() {
            Some((from, len)) if at <= *from + *len + PREFETCH_GAP => *len = at + entry - *from,
            _ => runs.push((at, entry)),
        }
    }
    runs
}

/// The block digests file of a state directory.
pub struct BlockFile {
    file: File,
    /// It held no entry when opened (just created, e.g. after `--block-digests off`).
    empty: bool,
    /// Digests per entry: the blocks of a whole chunk.
    stride: u64,
    /// A whole chunk of zeros: its digest and its blocks'.
    zero: (Digest, Vec<Digest>),
    /// A write failed (logged once): later ones are skipped. Only speed is lost.
    failed: AtomicBool,
}

impl BlockFile {
    /// Opens (creating, mode 0600) the block digests file at `path` for chunks of `geometry`.
    pub fn open(path: &Path, geometry: Geometry) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let empty = file.metadata()?.len() == 0;
        let zeros = vec![0u8; geometry.chunk_size() as usize];
        Ok(BlockFile {
            empty,
            file,
            stride: u64::from(geometry.chunk_size() / BLOCK_SIZE),
            zero: (Digest::of(&zeros), block_digests(&zeros)),
            failed: AtomicBool::new(false),
        })
    }

    /// `role`'s block digests file in `store`'s directory, opened for chunks of `geometry`; `None` without a
    /// directory, or when it cannot be opened (logged: the agent then reads what it would read without it).
    pub fn in_store(store: &Store, role: Role, geometry: Geometry) -> Option<Arc<Self>> {
        let path = store.blocks_path(role)?;
        match BlockFile::open(&path, geometry) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!("cannot open {}: {e}", path.display());
                None
            }
        }
    }

    /// Asks the kernel to read the entries of `chunks` (increasing) into the page cache now
    /// (`posix_fadvise(WILLNEED)`), so that the [`BlockFile::known`] calls that follow, one after the other, find
    /// them there instead of waiting for each read in turn: after a volume larger than the page cache went through
    /// it, the file is cold. Entries closer than [`PREFETCH_GAP`] go in one request. Only a hint: nothing fails.
    pub fn prefetch(&self, chunks: impl IntoIterator<Item = u64>) {
        let entries = chunks.into_iter().map_while(|c| self.at(c));
        for (from, len) in prefetch_runs(self.stride * 32, entries) {
            let _ = rustix::fs::fadvise(
                &self.file,
                from,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::WillNeed,
            );
        }
    }

    fn at(&self, chunk: u64) -> Option<u64> {
        chunk.checked_mul(self.stride)?.checked_mul(32)
    }

    /// What the entry of `chunk` holds: `count` digests, unchecked (`None` past the end of the file).
    pub fn read(&self, chunk: u64, count: usize) -> Option<Vec<Digest>> {
        if count as u64 > self.stride {
            return None;
        }
        let mut bytes = vec![0u8; count * 32];
        self.file.read_exact_at(&mut bytes, self.at(chunk)?).ok()?;
        Some(
            bytes
                .chunks_exact(32)
                .map(|d| Digest(d.try_into().expect("32 bytes")))
                .collect(),
        )
    }

    /// The digests of the blocks of chunk `chunk` (`chunk_len` bytes) of the image whose digest of that chunk is
    /// `base`: its entry if it merges into `base` (the zero blocks' for a whole chunk of zeros), else `None`.
    pub fn known(&self, chunk: u64, chunk_len: usize, base: Digest) -> Option<Vec<Digest>> {
        if base == self.zero.0 && chunk_len == self.zero.1.len() * BLOCK_SIZE as usize {
            return Some(self.zero.1.clone());
        }
        let entry = self.read(chunk, blocks_in(chunk_len) as usize)?;
        (chunk_digest_of_blocks(&entry, chunk_len)? == base).then_some(entry)
    }

    /// Whether the file held no entry when it was opened: a scan that hashes every chunk anyway should then write
    /// all their entries, not only those of the chunks that changed.
    pub fn was_empty(&self) -> bool {
        self.empty
    }

    /// Writes the entry of `chunk`: the digests of all of its blocks.
    pub fn write(&self, chunk: u64, blocks: &[Digest]) {
        if blocks.len() as u64 <= self.stride {
            self.write_at(chunk, blocks);
        }
    }

    /// Writes the entries of the chunks from `first` on: `flat` holds each chunk's block digests, `stride` of them
    /// per chunk (a scan's segment, see `scan::Blocks`).
    pub fn write_run(&self, first: u64, flat: &[Digest], stride: usize) {
        if stride as u64 == self.stride {
            self.write_at(first, flat);
        }
    }

    fn write_at(&self, chunk: u64, digests: &[Digest]) {
        if self.failed.load(Ordering::Relaxed) || digests.is_empty() {
            return;
        }
        let bytes: Vec<u8> = digests.iter().flat_map(|d| d.0).collect();
        let written = match self.at(chunk) {
            Some(at) => self.file.write_all_at(&bytes, at),
            None => Err(io::Error::other("offset overflows")),
        };
        if let Err(e) = written {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "cannot keep the source's block digests ({e}): a delta by change list reads listed chunks whole"
                );
            }
        }
    }
}

/// The block digests of the chunks of a source's base, from its block digests file, each checked against the base
/// before it is handed out.
pub struct KnownBlocks {
    base: Mutex<Reader>,
    file: Arc<BlockFile>,
}

impl KnownBlocks {
    /// Block digests of the image `base` describes, from `file`.
    pub fn new(base: Reader, file: Arc<BlockFile>) -> Self {
        KnownBlocks {
            base: Mutex::new(base),
            file,
        }
    }

    /// The digests of the blocks of base chunk `chunk` (`chunk_len` bytes), if its entry merges into the base's
    /// digest of it; `None` otherwise (no entry, another chunk's, a damaged base page). See [`BlockFile::known`].
    pub fn of(&self, chunk: u64, chunk_len: usize) -> Option<Vec<Digest>> {
        let base = self.base.lock().ok()?.digest(chunk).ok()?;
        self.file.known(chunk, chunk_len, base)
    }
}

impl crate::scan::BaseBlocks for KnownBlocks {
    fn of(&self, chunk: u64, chunk_len: usize) -> Option<Vec<Digest>> {
        KnownBlocks::of(self, chunk, chunk_len)
    }

    fn prefetch(&self, chunks: &[u64]) {
        self.file.prefetch(chunks.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetching_joins_entries_closer_than_the_gap_and_keeps_far_ones_apart() {
        let e = 512;
        let runs = |at: &[u64]| prefetch_runs(e, at.iter().copied());
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[5 * e]), vec![(5 * e, e)]);
        // Adjacent, and a gap of exactly PREFETCH_GAP: one run to the end of the last entry.
        let joined = [0, e, 2 * e + PREFETCH_GAP];
        assert_eq!(runs(&joined), vec![(0, 3 * e + PREFETCH_GAP)]);
        // One byte more apart: two runs.
        let apart = [0, e + PREFETCH_GAP + 1];
        assert_eq!(runs(&apart), vec![(0, e), (e + PREFETCH_GAP + 1, e)]);
    }

    #[test]
    fn an_entry_reads_back_and_a_hole_or_the_end_reads_as_nothing_useful() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let g = Geometry::new(10 * 65536, 65536).map_err(anyhow::Error::msg)?;
        let f = BlockFile::open(&dir.path().join("source.blocks"), g)?;
        assert_eq!(f.read(3, 16), None, "an empty file has no entry");
        let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let blocks = block_digests(&chunk);
        f.write(7, &blocks);
        assert_eq!(f.read(7, 16), Some(blocks.clone()));
        assert_eq!(
            f.read(2, 16),
            Some(vec![Digest([0; 32]); 16]),
            "a hole reads as zeros"
        );
        assert_eq!(f.read(8, 16), None, "past the end");
        assert_eq!(f.read(7, 17), None, "more digests than a chunk has blocks");
        // A segment's run: stride digests per chunk.
        let run: Vec<Digest> = [blocks.clone(), blocks.clone()].concat();
        f.write_run(0, &run, 16);
        assert_eq!(f.read(1, 16), Some(blocks.clone()));
        f.write_run(4, &run, 8);
        assert_eq!(
            f.read(4, 16),
            Some(vec![Digest([0; 32]); 16]),
            "a run of another stride is not written"
        );
        Ok(())
    }
}
