//! Change lists: which chunks changed since the image of the source's manifest, and where they come from.
//!
//! A [`Tracker`] is the seam: a JSON file of byte extents ([`ExtentsFile`], `source --changed-extents`), an NBD
//! export's dirty bitmap ([`NbdTracker`], `source --dirty-bitmap`); the trackers of the other snapshot systems
//! (reflink extents, CSI changed block tracking) implement the same trait. Whatever the tracker, what the session gets is [`ChangedChunks`]: sorted, disjoint chunk
//! ranges. A change list is only as good as its tracker: a range it misses is not read, not compared and not sent
//! (see "Why a delta sync is safe" in `proto/PROTOCOL.md`, and `--verify-every`, which bounds that).

pub mod cbt;
mod file;
mod nbd;

pub use cbt::{CbtConfig, CsiSnapshotMetadata};
pub use file::ExtentsFile;
pub use nbd::NbdTracker;

use crate::chunk::{Digest, Geometry, BLOCK_SIZE};
use crate::error::Result;

/// Something that tells which byte ranges of the volume changed since the source's manifest was written.
///
/// The source asks only when it holds a usable manifest (`base` is that image's volume digest): without one the
/// sync is a full comparison whatever changed. A tracker that cannot answer returns
/// [`crate::error::Error::Tracker`], and the sync falls back to a full comparison with the reason in the log and
/// the status; any other error (a change list file that names ranges past the volume) fails the sync, because a
/// list that is wrong must not pass for one that could not be read.
pub trait Tracker: Send + Sync + std::fmt::Debug {
    /// What produced the list, for logs and the status (e.g. `extents file /run/changes.json`).
    fn describe(&self) -> String;
    /// The changed chunks of a volume of `geometry` since the image whose volume digest is `base`.
    fn changed(&self, geometry: Geometry, base: &Digest) -> Result<ChangedChunks>;

    /// For a full comparison: the byte extents `(offset, length)` of the volume that may hold data, if the
    /// tracker knows (NBD `base:allocation`, CSI GetMetadataAllocated). The rest is taken for zeros without being
    /// read. Not asked for a full comparison that verifies (`--verify`, `--verify-every`): that one trusts no
    /// tracker. An error means the whole volume is read.
    fn allocated(&self, _geometry: Geometry) -> Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

/// Chunks that changed, as sorted, disjoint, non-empty half-open ranges of chunk indices, and the 4 KiB blocks of
/// them the list named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedChunks {
    ranges: Vec<(u64, u64)>,
    /// The blocks named, as sorted, disjoint half-open ranges of block indices.
    blocks: Vec<(u64, u64)>,
    /// Some range starts or ends inside a chunk: the list says which blocks of a chunk changed. A list whose every
    /// range is whole chunks (a tracker of 64 KiB granularity or coarser) says nothing finer than the chunk.
    block_precise: bool,
    /// Blocks per chunk.
    per_chunk: u64,
}

/// Why a list of extents cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadExtent(pub String);

impl ChangedChunks {
    /// Every chunk of `geometry`.
    pub fn all(geometry: Geometry) -> Self {
        let n = geometry.chunk_count();
        let blocks = geometry.volume_size().div_ceil(u64::from(BLOCK_SIZE));
        ChangedChunks {
            ranges: if n == 0 { Vec::new() } else { vec![(0, n)] },
            blocks: if n == 0 {
                Vec::new()
            } else {
                vec![(0, blocks)]
            },
            block_precise: false,
            per_chunk: u64::from(geometry.chunk_size() / BLOCK_SIZE),
        }
    }

    /// Normalises byte extents `(offset, length)` (in any order, overlapping, unaligned) to the 4 KiB blocks they
    /// touch, then to chunks. An extent of length 0 touches nothing; one that ends past the volume is an error.
    pub fn from_extents(
        extents: &[(u64, u64)],
        geometry: Geometry,
    ) -> std::result::Result<Self, BadExtent> {
        let size = geometry.volume_size();
        let (block, chunk) = (u64::from(BLOCK_SIZE), u64::from(geometry.chunk_size()));
        let mut blocks = Vec::with_capacity(extents.len());
        let mut block_precise = false;
        for &(offset, length) in extents {
            let end = offset.checked_add(length).filter(|e| *e <= size);
            let Some(end) = end else {
                return Err(BadExtent(format!(
                    "extent [{offset}, {length}] ends past the end of the volume ({size} bytes)"
                )));
            };
            if length == 0 {
                continue;
            }
            // Blocks first (the unit that travels), then the chunks that hold them.
            let (first_block, end_block) = (offset / block, end.div_ceil(block));
            let inside = |b: u64| !(b * block).is_multiple_of(chunk) && b * block < size;
            block_precise |= inside(first_block) || inside(end_block);
            blocks.push((first_block, end_block));
        }
        let blocks = merged(blocks);
        let per_chunk = chunk / block;
        let ranges = merged(
            blocks
                .iter()
                .map(|&(s, e)| (s / per_chunk, e.div_ceil(per_chunk)))
                .collect(),
        );
        Ok(ChangedChunks {
            ranges,
            blocks,
            block_precise,
            per_chunk,
        })
    }

    /// Whether the list names blocks inside chunks (see [`ChangedChunks::listed_blocks`]), not only whole chunks.
    pub fn block_precise(&self) -> bool {
        self.block_precise
    }

    /// The blocks of `chunk` the list named, a bit per block (bit `b` = block `b` of the chunk).
    pub fn listed_blocks(&self, chunk: u64) -> u64 {
        let (start, end) = (chunk * self.per_chunk, (chunk + 1) * self.per_chunk);
        let mut mask = 0u64;
        let first = self.blocks.partition_point(|(_, e)| *e <= start);
        for &(s, e) in self.blocks[first..].iter().take_while(|(s, _)| *s < end) {
            let (s, e) = (s.max(start) - start, e.min(end) - start);
            mask |= (u64::MAX >> (64 - (e - s))) << s;
        }
        mask
    }

    /// The ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// How many chunks changed.
    pub fn chunk_count(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether `chunk` is in the list.
    pub fn contains(&self, chunk: u64) -> bool {
        let i = self.ranges.partition_point(|(_, e)| *e <= chunk);
        self.ranges.get(i).is_some_and(|(s, _)| *s <= chunk)
    }

    /// The changed chunk indices in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|&(s, e)| s..e)
    }
}

/// Sorts half-open ranges and merges those that overlap or touch.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(size: u64) -> Geometry {
        Geometry::new(size, 65536).expect("geometry")
    }

    #[test]
    fn extents_are_normalised_to_blocks_then_chunks_sorted_and_merged() {
        let geo = g(10 * 65536 + 100);
        let c = ChangedChunks::from_extents(
            &[
                (5 * 65536 + 10, 1),    // inside chunk 5
                (65536 - 1, 2),         // straddles chunks 0 and 1
                (3 * 65536, 2 * 65536), // chunks 3 and 4, merged with 5
                (4 * 65536 + 7, 100),   // overlaps
                (9 * 65536, 0),         // empty: nothing
                (10 * 65536 + 99, 1),   // the last, short chunk 10
            ],
            geo,
        )
        .expect("valid");
        assert_eq!(c.ranges(), &[(0, 2), (3, 6), (10, 11)]);
        assert_eq!(c.chunk_count(), 6);
        assert!(c.contains(0) && c.contains(1) && c.contains(5) && c.contains(10));
        assert!(!c.contains(2) && !c.contains(6) && !c.contains(9));
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![0, 1, 3, 4, 5, 10]);
    }

    #[test]
    fn an_extent_past_the_end_or_overflowing_is_an_error() {
        let geo = g(4 * 65536);
        let past = ChangedChunks::from_extents(&[(4 * 65536 - 1, 2)], geo).expect_err("past");
        assert!(
            past.0
                .contains("ends past the end of the volume (262144 bytes)"),
            "{past:?}"
        );
        assert!(ChangedChunks::from_extents(&[(u64::MAX, 2)], geo).is_err());
        let empty = ChangedChunks::from_extents(&[(4 * 65536, 0)], geo).expect("empty at the end");
        assert_eq!((empty.chunk_count(), empty.ranges()), (0, &[][..]));
    }

    #[test]
    fn listed_blocks_are_kept_per_chunk_and_whole_chunk_lists_are_not_block_precise() {
        let geo = g(4 * 65536 + 5000);
        let c = ChangedChunks::from_extents(
            &[
                (4096 + 10, 1),          // block 1 of chunk 0
                (15 * 4096, 2 * 4096),   // block 15 of chunk 0 and block 0 of chunk 1
                (3 * 65536, 65536),      // all of chunk 3
                (4 * 65536 + 4999, 1),   // block 1 of the short last chunk 4
                (2 * 65536 + 8191, 1),   // block 1 of chunk 2
                (2 * 65536 + 4096, 100), // the same block again
            ],
            geo,
        )
        .expect("valid");
        assert!(c.block_precise());
        assert_eq!(c.listed_blocks(0), (1 << 1) | (1 << 15));
        assert_eq!(c.listed_blocks(1), 1);
        assert_eq!(c.listed_blocks(2), 1 << 1);
        assert_eq!(c.listed_blocks(3), 0xffff);
        assert_eq!(c.listed_blocks(4), 1 << 1);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);

        let whole = ChangedChunks::from_extents(&[(65536, 2 * 65536), (4 * 65536, 5000)], geo)
            .expect("valid");
        assert!(
            !whole.block_precise(),
            "whole chunks, and a range to the volume's end, say nothing finer than the chunk"
        );
        assert_eq!(whole.listed_blocks(2), 0xffff);
        assert_eq!(whole.listed_blocks(4), 0b11, "the short chunk's two blocks");
        assert_eq!(whole.listed_blocks(0), 0);
        assert!(!ChangedChunks::all(geo).block_precise());
        assert_eq!(ChangedChunks::all(geo).listed_blocks(4), 0b11);
    }

    #[test]
    fn all_names_every_chunk() {
        let c = ChangedChunks::all(g(3 * 65536 + 1));
        assert_eq!(c.chunk_count(), 4);
        assert_eq!(ChangedChunks::all(g(0)).chunk_count(), 0);
    }
}
