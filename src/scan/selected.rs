//! Scanning only the chunks a change list names, in chunk order, with a look at each chunk's bytes while they are
//! in the worker's buffer (a delta by change list takes the listed blocks from there, see `source::push`).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread;

use rayon::prelude::*;
use rayon::ThreadPool;

use super::{on, segments_per_round, READ_AHEAD, SEGMENT_CHUNKS};
use crate::changes::ChangedChunks;
use crate::chunk::{
    block_digests_at, block_range, blocks_in, chunk_digest_of_blocks, hash_chunk_into, is_zero,
    runs, ChunkSummary, Digest, Geometry, ZeroDigests, BLOCK_SIZE,
};
use crate::error::{Error, Result};
use crate::volume::Volume;

/// A scanned chunk: its index, its summary, and what `keep` took from its bytes.
pub type Selected<T> = (u64, ChunkSummary, Option<T>);

/// What `keep` sees of a chunk a selected scan read: its bytes, its summary, and with `keep_blocks` (and the chunk
/// not all zeros) the digests of its blocks, from the same pass as its digest (empty otherwise).
pub struct Read<'a> {
    /// The chunk's bytes; only its listed blocks' when `partial`.
    pub bytes: &'a [u8],
    /// Only the listed blocks were read (the others' digests are the base's, from [`Keep::base`]).
    pub partial: bool,
    /// Its digest, and whether it is all zeros.
    pub summary: &'a ChunkSummary,
    /// Its block digests, or none.
    pub blocks: &'a [Digest],
}

/// Where a selected scan finds the block digests of a chunk of the image its change list is relative to (the
/// base): a chunk whose base block digests are known is read in its listed blocks only, and its unlisted blocks
/// are taken to be the base's (what a change list says).
pub trait BaseBlocks: Send + Sync {
    /// The digests of every block of base chunk `chunk` (`chunk_len` bytes), proven against the base, or `None`.
    fn of(&self, chunk: u64, chunk_len: usize) -> Option<Vec<Digest>>;

    /// A hint that [`BaseBlocks::of`] is about to be asked for `chunks` (a round of the scan): start reading them.
    fn prefetch(&self, _chunks: &[u64]) {}
}

/// What a selected scan does with each chunk it read: `keep` takes what it wants of it (see [`scan_selected`]);
/// with `blocks`, it also gets the chunk's block digests.
pub struct Keep<F> {
    /// Compute each chunk's block digests in the pass that gives its digest.
    pub blocks: bool,
    /// With `blocks`: read only the listed blocks of a chunk whose base block digests these know.
    pub base: Option<Arc<dyn BaseBlocks>>,
    /// Takes what it wants of a chunk read.
    pub keep: F,
}

/// Scans only the chunks in `chunks` (a change list), calling `sink` with up to [`SEGMENT_CHUNKS`] of them at a
/// time, in order, the reads and hashes on `pool` (rayon's global pool without one). `keep.keep` sees each chunk
/// right after it was hashed (not a chunk known to be zeros without reading: a hole, or outside the allocation
/// map), on the worker that read it; with `keep.blocks` it also sees the chunk's block digests (a pushed chunk's
/// cover is made of them). The same budget as [`super::scan`]: one buffer per worker, a few segments ahead, plus
/// what `keep` returns for them.
pub fn scan_selected<T: Send + 'static, F>(
    pool: Option<Arc<ThreadPool>>,
    volume: Arc<Volume>,
    geometry: Geometry,
    chunks: Arc<ChangedChunks>,
    bytes_read: Arc<AtomicU64>,
    keep: Keep<F>,
    mut sink: impl FnMut(Vec<Selected<T>>) -> Result<()>,
) -> Result<()>
where
    F: Fn(u64, Read<'_>) -> Option<T> + Send + Sync + 'static,
{
    let (tx, rx) = sync_channel::<Result<Vec<Selected<T>>>>(READ_AHEAD);
    let scanner = thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let zeros = ZeroDigests::new(geometry);
            let round = (SEGMENT_CHUNKS * segments_per_round(pool.as_deref())) as usize;
            let partial = keep.blocks && keep.base.is_some();
            // The listed blocks are scattered: no readahead around each, and each round's reads are handed to the
            // storage together while the round before it is hashed, so that its queue holds them all whatever
            // the number of reader threads.
            volume.advise_random();
            let prefetch = |these: &[u64]| {
                volume.prefetch(round_ranges(geometry, &chunks, these, partial));
                if let Some(base) = keep.base.as_ref().filter(|_| partial) {
                    base.prefetch(these);
                }
            };
            let mut indices = chunks.iter();
            let mut next: Vec<u64> = indices.by_ref().take(round).collect();
            prefetch(&next);
            while !next.is_empty() {
                let these = std::mem::replace(&mut next, indices.by_ref().take(round).collect());
                prefetch(&next);
                let item: Result<Vec<Selected<T>>> = on(pool.as_deref(), || {
                    these
                        .par_iter()
                        .map(|&i| {
                            read_one(&volume, geometry, &zeros, &bytes_read, &chunks, i, &keep)
                        })
                        .collect()
                });
                let mut summaries = match item {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !summaries.is_empty() {
                    let rest = summaries.split_off(summaries.len().min(SEGMENT_CHUNKS as usize));
                    if tx.send(Ok(summaries)).is_err() {
                        return;
                    }
                    summaries = rest;
                }
            }
        })
        .map_err(|e| Error::Config(format!("cannot start the scan thread: {e}")))?;
    let result = rx.iter().try_for_each(|segment| sink(segment?));
    drop(rx);
    let _ = scanner.join();
    result
}

/// The byte ranges `(offset, length)` the reads of the listed chunks `these` will cover, adjacent ones merged: a
/// chunk's listed blocks when it may be read in part (`partial`: its base block digests may be known, see
/// [`Keep::base`]), else the whole chunk.
fn round_ranges(
    geometry: Geometry,
    chunks: &ChangedChunks,
    these: &[u64],
    partial: bool,
) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &i in these {
        let (offset, len) = geometry.chunk_range(i);
        let all = all_blocks(len);
        let listed = if partial {
            chunks.listed_blocks(i) & all
        } else {
            all
        };
        let mut add = |from: u64, to: u64| match ranges.last_mut() {
            Some((o, l)) if *o + *l == from => *l = to - *o,
            _ => ranges.push((from, to - from)),
        };
        if listed == all {
            add(offset, offset + len as u64);
            continue;
        }
        for (b0, b1) in runs(listed) {
            let (start, end) = (block_range(len, b0).start, block_range(len, b1 - 1).end);
            add(offset + start as u64, offset + end as u64);
        }
    }
    ranges
}

/// The mask of every block of a chunk of `len` bytes.
fn all_blocks(len: usize) -> u64 {
    if len as u64 >= 64 * u64::from(BLOCK_SIZE) {
        u64::MAX
    } else {
        (1u64 << blocks_in(len)) - 1
    }
}

/// Reads and summarizes one listed chunk into this worker's buffer (a change list's chunks are scattered: read,
/// not mapped one by one), then lets `keep` look at it.
fn read_one<T>(
    volume: &Volume,
    geometry: Geometry,
    zeros: &ZeroDigests,
    bytes_read: &AtomicU64,
    chunks: &ChangedChunks,
    i: u64,
    keep: &Keep<impl Fn(u64, Read<'_>) -> Option<T>>,
) -> Result<Selected<T>> {
    thread_local! {
        static BUFFER: RefCell<(Vec<u8>, Vec<Digest>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    let (offset, len) = geometry.chunk_range(i);
    // Outside the allocation map a tracker gave: zeros by the storage's word, not read and not counted.
    if volume.outside_allocation(offset, len as u64) {
        return Ok((i, zeros.zero_summary(i), None));
    }
    BUFFER.with(|cell| {
        let (buf, blocks) = &mut *cell.borrow_mut();
        buf.resize(len, 0);
        blocks.clear();
        let listed = chunks.listed_blocks(i);
        let all = all_blocks(len);
        let known = match &keep.base {
            Some(base) if keep.blocks && listed & all != all => base.of(i, len),
            _ => None,
        };
        if let Some(known) = known {
            // Only the listed blocks are read and hashed; the others are the base's.
            *blocks = known;
            for (b0, b1) in runs(listed) {
                let range = block_range(len, b0).start..block_range(len, b1 - 1).end;
                volume.read_exact_at(&mut buf[range.clone()], offset + range.start as u64)?;
                bytes_read.fetch_add(range.len() as u64, Ordering::Relaxed);
                let fresh = block_digests_at(&buf[range], b0);
                blocks[b0 as usize..b1 as usize].copy_from_slice(&fresh);
            }
            let digest = chunk_digest_of_blocks(blocks, len).ok_or_else(|| {
                Error::Config(format!("chunk {i} of one block has no block digests"))
            })?;
            let summary = ChunkSummary {
                zero: digest == zeros.for_chunk(i),
                digest,
            };
            let read = Read {
                bytes: buf,
                partial: true,
                summary: &summary,
                blocks,
            };
            let kept = (keep.keep)(i, read);
            return Ok((i, summary, kept));
        }
        let hole = volume.read_unless_hole(buf, offset)?;
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        if hole {
            return Ok((i, zeros.zero_summary(i), None));
        }
        let summary = if keep.blocks && !is_zero(buf) {
            blocks.resize(blocks_in(len) as usize, Digest([0; 32]));
            ChunkSummary {
                digest: hash_chunk_into(buf, blocks),
                zero: false,
            }
        } else {
            zeros.summarize(i, buf)
        };
        let kept = (keep.keep)(
            i,
            Read {
                bytes: buf,
                partial: false,
                summary: &summary,
                blocks,
            },
        );
        Ok((i, summary, kept))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::block_digests;

    #[test]
    fn a_selected_scan_reads_only_the_listed_chunks() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("v.img");
        let size = 200 * 65536;
        let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &data)?;
        let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
        let list = ChangedChunks::from_extents(&[(65536 * 3, 1), (65536 * 70, 65536 * 65)], g)
            .map_err(|e| anyhow::anyhow!(e.0))?;
        let read = Arc::new(AtomicU64::new(0));
        let mut seen = Vec::new();
        scan_selected(
            None,
            Arc::new(Volume::open_source(&p)?),
            g,
            Arc::new(list),
            read.clone(),
            Keep {
                blocks: true,
                base: None,
                keep: |i, r: Read<'_>| {
                    (i % 2 == 1).then(|| (r.bytes.len(), r.summary.zero, r.blocks.to_vec()))
                },
            },
            |s| {
                assert!(s.len() <= SEGMENT_CHUNKS as usize);
                seen.extend(s);
                Ok(())
            },
        )?;
        let indices: Vec<u64> = seen.iter().map(|(i, _, _)| *i).collect();
        assert_eq!(
            indices,
            std::iter::once(3).chain(70..135).collect::<Vec<_>>()
        );
        assert_eq!(
            read.load(Ordering::Relaxed),
            66 * 65536,
            "only the listed chunks are read"
        );
        for (i, s, kept) in &seen {
            let bytes = &data[*i as usize * 65536..][..65536];
            assert_eq!(s.digest, Digest::of(bytes), "chunk {i}");
            let expected = (i % 2 == 1).then(|| (65536, false, block_digests(bytes)));
            assert_eq!(
                *kept, expected,
                "keep saw chunk {i}'s bytes and block digests"
            );
        }
        Ok(())
    }

    #[test]
    fn a_round_prefetches_the_listed_blocks_of_chunks_read_in_part_and_whole_chunks_otherwise(
    ) -> anyhow::Result<()> {
        let size = 5 * 65536 + 5000;
        let g = Geometry::new(size, 65536).map_err(anyhow::Error::msg)?;
        // Chunk 2: blocks 5 and 6; chunk 3: every block; chunk 4: block 0; chunk 5 (5000 bytes): its short block 1.
        let listed = [
            (2 * 65536 + 5 * 4096, 8192),
            (3 * 65536, 65536 + 4096),
            (5 * 65536 + 4096, 904),
        ];
        let list = ChangedChunks::from_extents(&listed, g).map_err(|e| anyhow::anyhow!(e.0))?;
        let these: Vec<u64> = list.iter().collect();
        assert_eq!(these, [2, 3, 4, 5]);
        assert_eq!(
            round_ranges(g, &list, &these, true),
            [
                (2 * 65536 + 5 * 4096, 8192),
                (3 * 65536, 65536 + 4096),
                (5 * 65536 + 4096, 904)
            ],
            "the listed blocks, adjacent ones merged across chunks"
        );
        assert_eq!(
            round_ranges(g, &list, &these, false),
            [(2 * 65536, 3 * 65536 + 5000)],
            "whole chunks when none is read in part"
        );
        assert_eq!(
            round_ranges(g, &list, &[5], true),
            [(5 * 65536 + 4096, 904)]
        );
        let whole = ChangedChunks::from_extents(&[(5 * 65536, 5000)], g)
            .map_err(|e| anyhow::anyhow!(e.0))?;
        assert_eq!(
            round_ranges(g, &whole, &[5], true),
            [(5 * 65536, 5000)],
            "a short last chunk listed whole"
        );
        Ok(())
    }

    /// The base's block digests of chunk 2 only.
    struct Chunk2(Vec<Digest>);

    impl BaseBlocks for Chunk2 {
        fn of(&self, chunk: u64, _: usize) -> Option<Vec<Digest>> {
            (chunk == 2).then(|| self.0.clone())
        }
    }

    #[test]
    fn a_chunk_whose_base_blocks_are_known_is_read_in_its_listed_blocks_only() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("v.img");
        let size = 4 * 65536;
        let base: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let mut now = base.clone();
        // Blocks 5 and 6 of chunk 2 and block 1 of chunk 3 changed and are listed; block 9 of chunk 2 changed
        // unlisted (a tracker that lies).
        for b in [2 * 16 + 5, 2 * 16 + 6, 3 * 16 + 1, 2 * 16 + 9] {
            now[b * 4096..][..4096].fill(7);
        }
        std::fs::write(&p, &now)?;
        let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
        let listed = [(2 * 65536 + 5 * 4096, 8192), (3 * 65536 + 4096, 4096)];
        let list = ChangedChunks::from_extents(&listed, g).map_err(|e| anyhow::anyhow!(e.0))?;
        let known = Chunk2(block_digests(&base[2 * 65536..][..65536]));
        let read = Arc::new(AtomicU64::new(0));
        let mut seen = Vec::new();
        scan_selected(
            None,
            Arc::new(Volume::open_source(&p)?),
            g,
            Arc::new(list),
            read.clone(),
            Keep {
                blocks: true,
                base: Some(Arc::new(known)),
                keep: |_, r: Read<'_>| Some((r.partial, r.blocks.to_vec())),
            },
            |s| {
                seen.extend(s);
                Ok(())
            },
        )?;
        assert_eq!(
            read.load(Ordering::Relaxed),
            8192 + 65536,
            "chunk 2's two listed blocks, chunk 3 whole (no base digests)"
        );
        let mut trusted = base[2 * 65536..][..65536].to_vec();
        trusted[5 * 4096..7 * 4096].fill(7);
        let chunk3 = &now[3 * 65536..][..65536];
        let expected = vec![
            (
                2,
                Digest::of(&trusted),
                Some((true, block_digests(&trusted))),
            ),
            (3, Digest::of(chunk3), Some((false, block_digests(chunk3)))),
        ];
        let got: Vec<_> = seen.into_iter().map(|(i, s, k)| (i, s.digest, k)).collect();
        assert_eq!(
            got, expected,
            "chunk 2 is the base with its listed blocks: its unlisted change is not seen"
        );
        Ok(())
    }
}
