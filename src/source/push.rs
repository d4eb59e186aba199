//! A delta by change list pushes the blocks the list names (protocol 5, BLOCKS): they are taken from the buffer the
//! scan hashed, compressed in lanes of their own, and sent with the chunk's digest, in chunk order among the
//! DIGESTS runs. The destination writes them if its chunk with them hashes to the digest and asks with NEED
//! otherwise, so a list that names a chunk but misses some of its changed blocks costs a round trip, not the sync.
//!
//! A delta by manifest pushes too (protocol 8): of a chunk whose digest differs from the base's, the blocks whose
//! digests (from the scan) differ from the base's (from `source.blocks`, each entry proven against the manifest),
//! read again, with the cover of the others. That spares the destination's NEED, its block digests and the round
//! trip, as a change list's push does; the destination checks the chunk the same way.

use rayon::prelude::*;

use super::data::{compress_in_lanes, differing_blocks, raw_frame};
use crate::changes::ChangedChunks;
use crate::chunk::{block_range, cover, is_zero, Digest, Geometry, ZeroDigests};
use crate::codec::{DataFrame, Message, MAX_DIGESTS_PER_FRAME};
use crate::error::Result;
use crate::manifest::KnownBlocks;
use crate::scan::{BaseBlocks, Blocks};
use crate::volume::Volume;
use crate::zstream::{Encoder, MAX_LANES};

/// Whether a session with this selection pushes: only a change list that names blocks inside chunks says which
/// blocks changed. A list of whole chunks (a 64 KiB or coarser tracker) would have every block of a chunk pushed
/// for one written block; its chunks are compared with NEED and block digests instead.
pub fn pushes(selection: Option<&ChangedChunks>) -> bool {
    selection.is_some_and(ChangedChunks::block_precise)
}

/// The lanes of a session: `(pushed blocks, NEED answers)`, as ranges of lane numbers. Each lane belongs to one
/// thread, which keeps its parts in order on the wire. A session that pushes sends few NEED answers (a change
/// list's misses): one lane for them.
pub fn lanes(pushing: bool, per_core: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    if pushing {
        let push = per_core.clamp(1, MAX_LANES - 1);
        (0..push, push..push + 1)
    } else {
        (0..0, 0..per_core.clamp(1, MAX_LANES))
    }
}

/// A pushed chunk's listed blocks as a raw BLOCKS payload, whether it is worth compressing, and the cover of the
/// chunk's other blocks.
pub type Pushed = (DataFrame, bool, Vec<Digest>);

/// The listed blocks of a scanned chunk as a raw BLOCKS payload (zero blocks as marks), whether it is worth
/// compressing at `level`, and the cover of its other blocks from `blocks`, the digests of all its blocks.
pub fn listed_blocks(
    geometry: Geometry,
    chunk: u64,
    bytes: &[u8],
    blocks: &[Digest],
    listed: u64,
    level: Option<i32>,
) -> Pushed {
    let len = bytes.len();
    let (mut send_mask, mut zero_mask) = (0u64, 0u64);
    let mut raw =
        Vec::with_capacity(listed.count_ones() as usize * crate::chunk::BLOCK_SIZE as usize);
    for b in 0..geometry.blocks_in_chunk(chunk) {
        if listed & (1 << b) == 0 {
            continue;
        }
        let block = &bytes[block_range(len, b)];
        if is_zero(block) {
            zero_mask |= 1 << b;
        } else {
            send_mask |= 1 << b;
            raw.extend_from_slice(block);
        }
    }
    let (frame, worth) = raw_frame(chunk, send_mask, zero_mask, raw, level);
    (frame, worth, cover(blocks, len, listed))
}

/// The pushes of a delta by manifest among `chunks`, the announced ones of a scanned segment from chunk `first`
/// whose block digests are `blocks`: each chunk that is not zeros and whose base block digests `known` proves is
/// pushed with its blocks whose digests differ from the base's (read again from `volume`; zero blocks as marks),
/// compressible at `level`, and the cover of the others. A chunk without a proven entry is left to DIGESTS and NEED.
///
/// A file or device is read here, on the caller's thread: on `pool` the reads would wait behind the scan's rounds
/// there (measured by hand on the 2 GiB pair, four alternated runs: 0.36-0.37 s here, but for one outlier, and
/// 0.41-0.46 s on the pool).
/// An NBD export is read on `pool`, whose depth is the session's reads in flight: there each read is a round trip.
#[allow(clippy::too_many_arguments)]
pub fn differing(
    pool: &rayon::ThreadPool,
    volume: &Volume,
    geometry: Geometry,
    known: &KnownBlocks,
    zeros: &ZeroDigests,
    chunks: &[(u64, Digest)],
    (first, blocks): (u64, &Blocks),
    level: Option<i32>,
) -> Result<Vec<Pushed>> {
    let wanted: Vec<u64> = chunks
        .iter()
        .filter(|&&(c, d)| d != zeros.for_chunk(c))
        .map(|&(c, _)| c)
        .collect();
    BaseBlocks::prefetch(known, &wanted);
    // The base's entries in chunk order (its reader streams the manifest), then the reads in parallel.
    let jobs: Vec<(u64, &[Digest], Vec<Digest>)> = wanted
        .into_iter()
        .filter_map(|chunk| {
            let count = geometry.blocks_in_chunk(chunk) as usize;
            let ours = blocks.of(chunk.checked_sub(first)? as usize, count)?;
            let base = known.of(chunk, geometry.chunk_range(chunk).1)?;
            Some((chunk, ours, base))
        })
        .collect();
    let build = |(chunk, ours, base): &(u64, &[Digest], Vec<Digest>)| -> Result<Option<Pushed>> {
        let (frame, worth) = differing_blocks(volume, geometry, *chunk, base, ours, level)?;
        let listed = frame.send_mask | frame.zero_mask;
        let len = geometry.chunk_range(*chunk).1;
        // A chunk whose digest differs from the base's has a block that does; none would be a chunk announced in
        // error, which DIGESTS and NEED settle.
        Ok((listed != 0).then(|| (frame, worth, cover(ours, len, listed))))
    };
    let built: Vec<Option<Pushed>> = match volume.is_export() {
        true => pool.install(|| jobs.par_iter().map(build).collect::<Result<_>>())?,
        false => jobs.iter().map(build).collect::<Result<_>>()?,
    };
    Ok(built.into_iter().flatten().collect())
}

/// Compresses pushed payloads in the push lanes.
pub struct Pusher {
    encoders: Vec<Option<Encoder>>,
    first_lane: usize,
    level: i32,
}

impl Pusher {
    /// Lanes `lanes` at zstd `level`.
    pub fn new(lanes: std::ops::Range<usize>, level: i32) -> Self {
        Pusher {
            encoders: lanes.clone().map(|_| None).collect(),
            first_lane: lanes.start,
            level,
        }
    }

    /// Compresses the frames marked worth it, lanes in parallel (on the caller's pool).
    pub fn compress(&mut self, frames: &mut [(DataFrame, bool)]) -> Result<()> {
        compress_in_lanes(frames, &mut self.encoders, self.first_lane, self.level)
    }
}

/// The announcements of `chunks` (in increasing order): a BLOCKS frame for each chunk with a frame (and its
/// cover) in `pushed` (also in increasing order), DIGESTS frames for runs of consecutive others.
pub fn announcements(
    chunks: &[(u64, Digest)],
    pushed: Vec<(DataFrame, Vec<Digest>)>,
) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    let mut pushed = pushed.into_iter().peekable();
    for &(chunk, digest) in chunks {
        if pushed.peek().is_some_and(|(d, _)| d.chunk == chunk) {
            if let Some((data, cover)) = pushed.next() {
                out.push(Message::Blocks {
                    digest,
                    cover,
                    data,
                });
            }
            continue;
        }
        match out.last_mut() {
            Some(Message::Digests { first, digests })
                if *first + digests.len() as u64 == chunk
                    && digests.len() < MAX_DIGESTS_PER_FRAME =>
            {
                digests.push(digest)
            }
            _ => out.push(Message::Digests {
                first: chunk,
                digests: vec![digest],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;
    use bytes::Bytes;

    #[test]
    fn announcements_interleave_blocks_and_digest_runs_in_chunk_order() {
        let d = |c: u64| Digest::of(&c.to_be_bytes());
        let chunks: Vec<(u64, Digest)> = [1, 2, 3, 5, 6, 9].iter().map(|&c| (c, d(c))).collect();
        let frame = |chunk| DataFrame {
            chunk,
            send_mask: 1,
            zero_mask: 0,
            encoding: Encoding::Raw,
            raw_len: 4096,
            payload: Bytes::from(vec![chunk as u8; 4096]),
        };
        let out = announcements(
            &chunks,
            vec![(frame(2), vec![d(20)]), (frame(9), Vec::new())],
        );
        let shape: Vec<String> = out
            .iter()
            .map(|m| match m {
                Message::Digests { first, digests } => format!("D{first}+{}", digests.len()),
                Message::Blocks {
                    digest,
                    cover,
                    data,
                } => {
                    assert_eq!(*digest, d(data.chunk));
                    assert_eq!(cover.len(), usize::from(data.chunk == 2), "its own cover");
                    format!("B{}", data.chunk)
                }
                other => other.name().into(),
            })
            .collect();
        assert_eq!(shape, ["D1+1", "B2", "D3+1", "D5+2", "B9"]);
    }

    #[test]
    fn listed_blocks_carry_data_and_zero_marks_and_only_what_is_listed() {
        let g = Geometry::new(65536 + 8192, 65536).expect("geometry");
        let mut chunk = vec![3u8; 65536];
        chunk[2 * 4096..3 * 4096].fill(0);
        let blocks = crate::chunk::block_digests(&chunk);
        let (d, _, c) = listed_blocks(g, 0, &chunk, &blocks, 0b1110, Some(1));
        assert_eq!(
            (d.send_mask, d.zero_mask, d.raw_len),
            (0b1010, 0b0100, 8192)
        );
        assert_eq!(
            c,
            cover(&blocks, 65536, 0b1110),
            "the cover of the other blocks"
        );
        assert_eq!(c.len(), 3, "block 0, blocks 4-7 and blocks 8-15");
        assert_eq!(&d.payload[..4096], &chunk[4096..8192]);
        assert_eq!(&d.payload[4096..], &chunk[3 * 4096..4 * 4096]);
        let zeros = crate::chunk::block_digests(&[0u8; 8192]);
        let (short, worth, c) = listed_blocks(g, 1, &[0u8; 8192], &zeros, 0b11, Some(1));
        assert!(c.is_empty(), "every block listed: no cover");
        assert_eq!(
            (short.send_mask, short.zero_mask, short.raw_len),
            (0, 0b11, 0)
        );
        assert!(!worth, "nothing to compress");
    }

    #[test]
    fn a_pushing_session_keeps_a_lane_for_need_answers() {
        assert_eq!(lanes(true, 2), (0..2, 2..3));
        assert_eq!(lanes(true, 8), (0..3, 3..4));
        assert_eq!(lanes(false, 2), (0..0, 0..2));
        assert_eq!(lanes(false, 8), (0..0, 0..4));
    }
}
