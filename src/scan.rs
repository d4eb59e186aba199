//! Scanning a volume in chunk order: every core reads and hashes chunks of a segment, one thread delivers them.
//!
//! Each worker reads a chunk into its own buffer and hashes it while the bytes are still in its cache: reading
//! whole segments on one thread and hashing them on others moved every byte through memory twice, and the copy out
//! of the page cache was the largest cost of an unchanged scan. Memory budget: one chunk buffer per worker, and at
//! most [`READ_AHEAD`] segments of summaries (33 bytes per chunk) waiting for the sink.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread;

use rayon::prelude::*;

use crate::changes::ChangedChunks;
use crate::chunk::{ChunkSummary, Geometry, ZeroDigests};
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Chunks per segment: the unit of a DIGESTS frame.
pub const SEGMENT_CHUNKS: u64 = 64;
/// Segments scanned ahead of the sink (summaries only, so this costs almost no memory).
pub const READ_AHEAD: usize = 8;

/// Scans the first `geometry.volume_size()` bytes of `volume`, calling `sink` with each segment's first chunk
/// index and chunk summaries, in order. `bytes_read` counts progress. Stops at the first error from the volume or
/// from `sink`.
pub fn scan(
    volume: Arc<Volume>,
    geometry: Geometry,
    bytes_read: Arc<AtomicU64>,
    mut sink: impl FnMut(u64, Vec<ChunkSummary>) -> Result<()>,
) -> Result<()> {
    let (tx, rx) = sync_channel::<Result<(u64, Vec<ChunkSummary>)>>(READ_AHEAD);
    let scanner = thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let zeros = ZeroDigests::new(geometry);
            let count = geometry.chunk_count();
            let mut first = 0;
            while first < count {
                let n = SEGMENT_CHUNKS.min(count - first);
                let item = summarize_segment(&volume, geometry, &zeros, &bytes_read, first, n)
                    .map(|s| (first, s));
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    return;
                }
                first += n;
            }
        })
        .map_err(|e| Error::Config(format!("cannot start the scan thread: {e}")))?;
    let result = rx.iter().try_for_each(|segment| {
        let (first, summaries) = segment?;
        sink(first, summaries)
    });
    drop(rx);
    let _ = scanner.join();
    result
}

/// Summarizes chunks `first..first + n` on all cores, hashing them in place in one mapping of the segment.
fn summarize_segment(
    volume: &Volume,
    geometry: Geometry,
    zeros: &ZeroDigests,
    bytes_read: &AtomicU64,
    first: u64,
    n: u64,
) -> Result<Vec<ChunkSummary>> {
    let start = geometry.chunk_range(first).0;
    let (last, last_len) = geometry.chunk_range(first + n - 1);
    let map = volume.map(start, last + last_len as u64 - start);
    let mapped = map.as_deref().map(|m| (start, m));
    (first..first + n)
        .into_par_iter()
        .map(|i| summarize(volume, mapped, geometry, zeros, bytes_read, i))
        .collect()
}

/// Summarizes one chunk: hashed in place from `map` (the volume mapped), else read into this worker's buffer. A
/// chunk in a hole of a sparse file is known to be zeros without reading it either way.
fn summarize(
    volume: &Volume,
    map: Option<(u64, &[u8])>,
    geometry: Geometry,
    zeros: &ZeroDigests,
    bytes_read: &AtomicU64,
    i: u64,
) -> Result<ChunkSummary> {
    thread_local! {
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let (offset, len) = geometry.chunk_range(i);
    // Outside the allocation map a tracker gave (NBD base:allocation): zeros by the storage's word, not read, and
    // so not counted in `bytes_read` either.
    if volume.outside_allocation(offset, len as u64) {
        return Ok(zeros.zero_summary(i));
    }
    let in_map = map.and_then(|(start, m)| {
        let at = usize::try_from(offset - start).ok()?;
        m.get(at..at + len)
    });
    if let Some(bytes) = in_map {
        let hole = volume.is_hole(offset, len as u64);
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        return Ok(if hole {
            zeros.zero_summary(i)
        } else {
            zeros.summarize(i, bytes)
        });
    }
    BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(len, 0);
        let hole = volume.read_unless_hole(&mut buf, offset)?;
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Ok(if hole {
            zeros.zero_summary(i)
        } else {
            zeros.summarize(i, &buf)
        })
    })
}

/// Scans only the chunks in `chunks` (a change list), calling `sink` with up to [`SEGMENT_CHUNKS`] of them at a
/// time, in order, each with its index. The same budget as [`scan`]: one buffer per worker, a few segments ahead.
pub fn scan_selected(
    volume: Arc<Volume>,
    geometry: Geometry,
    chunks: ChangedChunks,
    bytes_read: Arc<AtomicU64>,
    mut sink: impl FnMut(Vec<(u64, ChunkSummary)>) -> Result<()>,
) -> Result<()> {
    let (tx, rx) = sync_channel::<Result<Vec<(u64, ChunkSummary)>>>(READ_AHEAD);
    let scanner = thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let zeros = ZeroDigests::new(geometry);
            let mut indices = chunks.iter().peekable();
            while indices.peek().is_some() {
                let segment: Vec<u64> = indices.by_ref().take(SEGMENT_CHUNKS as usize).collect();
                let item: Result<Vec<(u64, ChunkSummary)>> = segment
                    .par_iter()
                    .map(|&i| {
                        // A change list's chunks are scattered: read, not mapped one by one.
                        let s = summarize(&volume, None, geometry, &zeros, &bytes_read, i)?;
                        Ok((i, s))
                    })
                    .collect();
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    return;
                }
            }
        })
        .map_err(|e| Error::Config(format!("cannot start the scan thread: {e}")))?;
    let result = rx.iter().try_for_each(|segment| sink(segment?));
    drop(rx);
    let _ = scanner.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Digest;

    #[test]
    fn scan_reports_every_chunk_in_order_with_digests_and_zero_flags() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("v.img");
        let size = 130 * 65536 + 777;
        let mut data = vec![0u8; size];
        for (i, b) in data.iter_mut().enumerate().skip(65536 * 3) {
            *b = (i % 251) as u8;
        }
        data[65536 * 128..65536 * 129].fill(0);
        std::fs::write(&p, &data)?;
        let vol = Arc::new(Volume::open_source(&p)?);
        let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
        let read = Arc::new(AtomicU64::new(0));
        let mut all = Vec::new();
        scan(vol, g, read.clone(), |first, s| {
            assert_eq!(first, all.len() as u64);
            all.extend(s);
            Ok(())
        })?;
        assert_eq!(all.len() as u64, g.chunk_count());
        assert_eq!(read.load(Ordering::Relaxed), size as u64);
        for (i, s) in all.iter().enumerate() {
            let (off, len) = g.chunk_range(i as u64);
            let bytes = &data[off as usize..off as usize + len];
            assert_eq!(s.digest, Digest::of(bytes), "chunk {i}");
            assert_eq!(s.zero, i < 3 || i == 128, "chunk {i}");
        }
        Ok(())
    }

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
            Arc::new(Volume::open_source(&p)?),
            g,
            list,
            read.clone(),
            |s| {
                assert!(s.len() <= SEGMENT_CHUNKS as usize);
                seen.extend(s);
                Ok(())
            },
        )?;
        let indices: Vec<u64> = seen.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            indices,
            std::iter::once(3).chain(70..135).collect::<Vec<_>>()
        );
        assert_eq!(
            read.load(Ordering::Relaxed),
            66 * 65536,
            "only the listed chunks are read"
        );
        for (i, s) in &seen {
            let bytes = &data[*i as usize * 65536..][..65536];
            assert_eq!(s.digest, Digest::of(bytes), "chunk {i}");
        }
        Ok(())
    }
}
