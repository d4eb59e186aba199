//! Scanning a volume in chunk order: one thread reads segments ahead, all cores hash the chunks of a segment.
//!
//! Memory budget: a segment is [`SEGMENT_CHUNKS`] chunks (4 MiB at 64 KiB); at most [`READ_AHEAD`] segments wait
//! between the reader and the hashers, plus one being read and one being hashed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;

use rayon::prelude::*;

use crate::chunk::{ChunkSummary, Geometry, ZeroDigests};
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Chunks per segment: the unit of read-ahead and of a DIGESTS frame.
pub const SEGMENT_CHUNKS: u64 = 64;
/// Segments read ahead of hashing.
pub const READ_AHEAD: usize = 2;

/// Scans the first `geometry.volume_size()` bytes of `volume`, calling `sink` with each segment's first chunk
/// index and chunk summaries, in order. `bytes_read` counts progress. Stops at the first error from the volume or
/// from `sink`.
pub fn scan(
    volume: Arc<Volume>,
    geometry: Geometry,
    bytes_read: Arc<AtomicU64>,
    mut sink: impl FnMut(u64, Vec<ChunkSummary>) -> Result<()>,
) -> Result<()> {
    let zeros = ZeroDigests::new(geometry);
    let chunk = geometry.chunk_size() as usize;
    let (full_tx, full_rx) = sync_channel::<Result<(u64, Vec<u8>)>>(READ_AHEAD);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(READ_AHEAD + 2);
    let reader = {
        let volume = volume.clone();
        thread::Builder::new()
            .name("scan-read".into())
            .spawn(move || read_segments(&volume, geometry, &bytes_read, &full_tx, &free_rx))
            .map_err(|e| Error::Config(format!("cannot start the scan thread: {e}")))?
    };
    let result = (|| {
        for segment in full_rx.iter() {
            let (first, buf) = segment?;
            let summaries: Vec<ChunkSummary> = buf
                .par_chunks(chunk)
                .enumerate()
                .map(|(i, bytes)| zeros.summarize(first + i as u64, bytes))
                .collect();
            let _ = free_tx.try_send(buf);
            sink(first, summaries)?;
        }
        Ok(())
    })();
    drop(full_rx);
    drop(free_tx);
    let _ = reader.join();
    result
}

fn read_segments(
    volume: &Volume,
    geometry: Geometry,
    bytes_read: &AtomicU64,
    full: &SyncSender<Result<(u64, Vec<u8>)>>,
    free: &Receiver<Vec<u8>>,
) {
    let count = geometry.chunk_count();
    let mut first = 0;
    while first < count {
        let n = SEGMENT_CHUNKS.min(count - first);
        let (offset, _) = geometry.chunk_range(first);
        let (last_off, last_len) = geometry.chunk_range(first + n - 1);
        let len = (last_off + last_len as u64 - offset) as usize;
        let mut buf = free.try_recv().unwrap_or_default();
        buf.resize(len, 0);
        let item = volume
            .read_exact_at(&mut buf, offset)
            .map(|()| (first, buf));
        let failed = item.is_err();
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        if full.send(item).is_err() || failed {
            return;
        }
        first += n;
    }
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
}
