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

/// Chunks that changed, as sorted, disjoint, non-empty half-open ranges of chunk indices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedChunks {
    ranges: Vec<(u64, u64)>,
}

/// Why a list of extents cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadExtent(pub String);

impl ChangedChunks {
    /// Every chunk of `geometry`.
    pub fn all(geometry: Geometry) -> Self {
        let n = geometry.chunk_count();
        ChangedChunks {
            ranges: if n == 0 { Vec::new() } else { vec![(0, n)] },
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
        let mut ranges = Vec::with_capacity(extents.len());
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
            ranges.push((
                first_block * block / chunk,
                (end_block * block).min(size).div_ceil(chunk),
            ));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Ok(ChangedChunks { ranges: merged })
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
        assert_eq!(
            ChangedChunks::from_extents(&[(4 * 65536, 0)], geo).expect("empty at the end"),
            ChangedChunks::default()
        );
    }

    #[test]
    fn all_names_every_chunk() {
        let c = ChangedChunks::all(g(3 * 65536 + 1));
        assert_eq!(c.chunk_count(), 4);
        assert_eq!(ChangedChunks::all(g(0)).chunk_count(), 0);
    }
}
