//! Scanning a volume in chunk order: every worker reads and hashes chunks of a segment, one thread delivers them.
//!
//! The workers are rayon's global pool (one per core), or the pool a caller gives ([`scan_in`]): the source's
//! `--read-depth` pool, whose N threads each keep one read in flight (network disks give their throughput only
//! with many). A pool of more than [`SEGMENT_CHUNKS`] threads scans several segments at once.
//!
//! Each worker reads a run of [`RUN_CHUNKS`] chunks into its own buffer and hashes them while the bytes are still
//! in its cache: reading whole segments on one thread and hashing them on others moved every byte through memory
//! twice. Memory budget: one run buffer per worker (256 KiB at 64 KiB chunks; a 1 MiB `O_DIRECT` buffer with
//! `--direct-reads`), and at most [`READ_AHEAD`] segments of summaries (33 bytes per chunk) waiting for the sink.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;

mod selected;
pub use selected::{scan_selected, BaseBlocks, Keep, Read};
use std::sync::Arc;
use std::thread;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::chunk::{hash_chunk_into, is_zero, ChunkSummary, Digest, Geometry, ZeroDigests};
use crate::error::{Error, Result};
use crate::volume::{resident, Volume, DIRECT_ALIGN};

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
    sink: impl FnMut(u64, Vec<ChunkSummary>) -> Result<()>,
) -> Result<()> {
    scan_in(None, volume, geometry, bytes_read, sink)
}

/// [`scan`] with the reads and hashes on `pool` (rayon's global pool without one).
pub fn scan_in(
    pool: Option<Arc<ThreadPool>>,
    volume: Arc<Volume>,
    geometry: Geometry,
    bytes_read: Arc<AtomicU64>,
    mut sink: impl FnMut(u64, Vec<ChunkSummary>) -> Result<()>,
) -> Result<()> {
    scan_keeping_blocks(pool, volume, geometry, bytes_read, false, |first, s, _| {
        sink(first, s)
    })
}

/// The block digests of consecutive chunks of a scan, [`Blocks::stride`] per chunk (the last chunk's may be fewer,
/// padded with zeros).
#[derive(Debug, Default)]
pub struct Blocks {
    digests: Vec<Digest>,
    stride: usize,
}

impl Blocks {
    /// Every chunk's digests in order, [`Blocks::stride`] per chunk.
    pub fn flat(&self) -> &[Digest] {
        &self.digests
    }

    /// Digests per chunk.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The digests of the `at`-th chunk of this run (`count` of them, the chunk's blocks).
    pub fn of(&self, at: usize, count: usize) -> Option<&[Digest]> {
        self.digests.get(at * self.stride..at * self.stride + count)
    }

    /// Splits off the chunks from the `at`-th on.
    fn split_off(&mut self, at: usize) -> Blocks {
        let digests = self
            .digests
            .split_off((at * self.stride).min(self.digests.len()));
        Blocks {
            digests,
            stride: self.stride,
        }
    }
}

/// [`scan_in`] that, with `keep_blocks`, also hands the sink the block digests of each chunk (`chunk::hash_chunk`:
/// one pass gives both), flat, [`Blocks::stride`] per chunk; a zero chunk's are not computed (zeros in their place).
/// Without it the sink's [`Blocks`] hold none. The source keeps those of the chunks a delta announces, so that
/// answering a NEED reads only the blocks that differ and hashes nothing.
pub fn scan_keeping_blocks(
    pool: Option<Arc<ThreadPool>>,
    volume: Arc<Volume>,
    geometry: Geometry,
    bytes_read: Arc<AtomicU64>,
    keep_blocks: bool,
    mut sink: impl FnMut(u64, Vec<ChunkSummary>, Blocks) -> Result<()>,
) -> Result<()> {
    // Cold, `bench --allocated --cold`, four alternated runs each: the scan against dd, source/destination, 104/95,
    // 71/97, 74/90, 79/59% without this and 90/175, 63/122, 83/130, 104/111% with it; the cold incremental
    // 1.80-2.65 s (median 2.19) without and 1.29-2.38 s (median 1.85) with.
    volume.advise_sequential();
    let round = SEGMENT_CHUNKS * segments_per_round(pool.as_deref());
    let in_flight = if pool.is_some() {
        OWN_POOL_ROUNDS_IN_FLIGHT
    } else {
        1
    };
    let (tx, rx) = sync_channel::<Result<(u64, Vec<ChunkSummary>, Blocks)>>(READ_AHEAD);
    let scanner = thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let zeros = Arc::new(ZeroDigests::new(geometry));
            let count = geometry.chunk_count();
            let mut next = 0;
            let mut rounds = VecDeque::new();
            loop {
                // With rounds in flight, a worker done with its part of one round takes work of the next instead
                // of idling until the round's last chunk is hashed.
                while rounds.len() < in_flight && next < count {
                    let n = round.min(count - next);
                    let (done, result) = sync_channel(1);
                    let (volume, zeros, bytes_read) =
                        (volume.clone(), zeros.clone(), bytes_read.clone());
                    let first = next;
                    let job = move || {
                        // A panic here would abort the process (rayon's spawn): it becomes this round's error.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            summarize_segment(
                                &volume,
                                geometry,
                                &zeros,
                                &bytes_read,
                                first,
                                n,
                                keep_blocks,
                            )
                        }))
                        .unwrap_or(Err(Error::Cancelled("a scan worker panicked")));
                        // Never blocks: the channel has room for its one result.
                        let _ = done.send(r);
                    };
                    match pool.as_deref() {
                        Some(p) => p.spawn(job),
                        None => rayon::spawn(job),
                    }
                    rounds.push_back((first, result));
                    next += n;
                }
                let Some((first, result)) = rounds.pop_front() else {
                    return;
                };
                let item = result
                    .recv()
                    .unwrap_or(Err(Error::Cancelled("a scan round ended early")));
                let (mut summaries, mut blocks) = match item {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut at = first;
                while !summaries.is_empty() {
                    let cut = summaries.len().min(SEGMENT_CHUNKS as usize);
                    let rest = summaries.split_off(cut);
                    let more = blocks.split_off(cut);
                    let len = summaries.len() as u64;
                    if tx.send(Ok((at, summaries, blocks))).is_err() {
                        return;
                    }
                    at += len;
                    summaries = rest;
                    blocks = more;
                }
            }
        })
        .map_err(|e| Error::Config(format!("cannot start the scan thread: {e}")))?;
    let mut delivered = 0;
    let result = rx
        .iter()
        .try_for_each(|segment| {
            let (first, summaries, blocks) = segment?;
            delivered = first + summaries.len() as u64;
            sink(first, summaries, blocks)
        })
        .and_then(|()| {
            // The scan thread ends early only by sending an error, unless it died.
            if delivered == geometry.chunk_count() {
                Ok(())
            } else {
                Err(Error::Cancelled("the scan thread ended early"))
            }
        });
    drop(rx);
    let _ = scanner.join();
    result
}

/// Segments a round scans at least (16 MiB at 64 KiB chunks). A round ends when its last chunk is hashed, and zero
/// chunks cost a fraction of random ones, so with one segment (four 1 MiB groups on two threads) a thread often
/// waited idle at the end of each round. Alternated A/B on 2 GiB allocated in the page cache, 1% change, five runs
/// each, medians: stateless 0.74 -> 0.61 s, delta by manifest 0.69 -> 0.52 s; 8 or 16 segments measured no better
/// than 4.
const MIN_SEGMENTS_PER_ROUND: u64 = 4;

/// Rounds a scan on a pool of its own (the source's `--read-depth` pool) keeps on it at once. With one, every round
/// ended on a barrier: the workers that finished their part first spun and yielded until the round's last chunk was
/// hashed, a third of the source's context switches in a delta by manifest. Alternated on the 2 GiB allocated
/// pair, four runs each (when rounds were still mapped): delta by manifest 0.415-0.467 s -> 0.394-0.420 s. A round
/// is 16 MiB, hashed in 2-3 ms on two threads, so with two in flight the pool idled whenever the thread that hands
/// out rounds waited longer than that for a core: in a delta by manifest, system-wide idle (perf cpu-clock, 2026-12-04)
/// was 16-18% of the sync with 2, 12-14% with 4, 9-12% with 8 or 16; the results cost 33 bytes a chunk. A scan
/// on rayon's global pool (the destination's) keeps one: that pool also computes the block digests its NEEDs wait
/// for, and with two its stateless syncs measured no faster and switched more.
const OWN_POOL_ROUNDS_IN_FLIGHT: usize = 8;

/// Segments scanned together on `pool`: enough runs of chunks for every thread to have a read in flight.
fn segments_per_round(pool: Option<&ThreadPool>) -> u64 {
    let threads = pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads()) as u64;
    (threads * RUN_CHUNKS)
        .div_ceil(SEGMENT_CHUNKS)
        .max(MIN_SEGMENTS_PER_ROUND)
}

/// Runs `work` (which uses rayon's parallel iterators) on `pool`, or on the global pool without one. Only the
/// parallel part runs inside the pool: a pool thread never waits there for a sink or a channel.
pub fn on<T: Send>(pool: Option<&ThreadPool>, work: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(p) => p.install(work),
        None => work(),
    }
}

/// Chunks read together by one `O_DIRECT` read of a cold segment (1 MiB with 64 KiB chunks, like `dd bs=1M`).
const DIRECT_CHUNKS: u64 = 16;

/// Summarizes chunks `first..first + n` on the current pool: each worker reads a run of chunks into its own reused buffer
/// and hashes it there, while it is in the core's cache. With `--direct-reads`, a segment that is not in the page
/// cache (a cold volume) is read in large `O_DIRECT` reads instead, so the scan neither fills nor thrashes the
/// cache (see `volume::direct`); the segment is mapped only to ask the kernel that (`mincore`), never read through
/// the mapping.
///
/// Hashing the page cache in place through a mapping (as from 2026-11 to 2026-12-04) never measured faster on this
/// machine's kernel (6.18) and AVX-512 BLAKE3, and slower when the page cache holds the volume in small folios
/// (filled by 4-64 KiB writes): then the per-page work of mapping and unmapping costs more than `pread`'s copy, and
/// BLAKE3 reads memory instead of its cache. 2 GiB allocated, 1% change, alternated three runs each: small folios,
/// delta by manifest 0.38-0.42 -> 0.32-0.38 s and stateless 0.59-0.65 -> 0.47-0.52 s; the same volume re-read
/// after eviction (readahead's large folios), 0.28-0.31 -> 0.27-0.28 s; `bench --allocated --delta`, twice each,
/// medians within noise (stateless 0.51 either way, manifest 0.37 -> 0.34-0.38 s). Peak RSS of a source 40 -> 14
/// MiB: no mapped pages of the volume.
fn summarize_segment(
    volume: &Volume,
    geometry: Geometry,
    zeros: &ZeroDigests,
    bytes_read: &AtomicU64,
    first: u64,
    n: u64,
    keep_blocks: bool,
) -> Result<(Vec<ChunkSummary>, Blocks)> {
    let start = geometry.chunk_range(first).0;
    let stride = if keep_blocks {
        geometry.blocks_in_chunk(0) as usize
    } else {
        0
    };
    let (last, last_len) = geometry.chunk_range(first + n - 1);
    let cold = volume.direct_reads()
        && volume
            .map(start, last + last_len as u64 - start)
            .is_some_and(|m| !resident(&m));
    let mut digests = vec![Digest([0; 32]); n as usize * stride];
    let groups: Vec<Vec<ChunkSummary>> = parts(
        &mut digests,
        n.div_ceil(DIRECT_CHUNKS),
        DIRECT_CHUNKS as usize * stride,
    )
    .into_par_iter()
    .enumerate()
    .map(|(g, blocks)| {
        let from = first + g as u64 * DIRECT_CHUNKS;
        let to = (from + DIRECT_CHUNKS).min(first + n);
        if cold {
            if let Some(done) =
                summarize_direct(volume, geometry, zeros, bytes_read, from, to, blocks)
            {
                return done;
            }
        }
        let runs = (to - from).div_ceil(RUN_CHUNKS);
        let per_run: Vec<Vec<ChunkSummary>> = parts(blocks, runs, RUN_CHUNKS as usize * stride)
            .into_par_iter()
            .enumerate()
            .map(|(r, blocks)| {
                let at = from + r as u64 * RUN_CHUNKS;
                summarize_run(
                    volume,
                    geometry,
                    zeros,
                    bytes_read,
                    at,
                    (at + RUN_CHUNKS).min(to),
                    blocks,
                )
            })
            .collect::<Result<_>>()?;
        Ok(per_run.into_iter().flatten().collect())
    })
    .collect::<Result<_>>()?;
    Ok((
        groups.into_iter().flatten().collect(),
        Blocks { digests, stride },
    ))
}

/// `count` consecutive pieces of `size` digests of `digests` (the last may be short), or `count` empty ones when
/// `size` is 0 (no block digests kept).
fn parts(digests: &mut [Digest], count: u64, size: usize) -> Vec<&mut [Digest]> {
    if size == 0 {
        return (0..count).map(|_| <&mut [Digest]>::default()).collect();
    }
    digests.chunks_mut(size).collect()
}

/// Summarizes a chunk's bytes: with room for its block digests (`blocks` not empty), in one pass that gives both.
fn summarize_bytes(
    zeros: &ZeroDigests,
    i: u64,
    bytes: &[u8],
    blocks: &mut [Digest],
) -> ChunkSummary {
    if blocks.is_empty() || is_zero(bytes) {
        return zeros.summarize(i, bytes);
    }
    let count = bytes.len().div_ceil(crate::chunk::BLOCK_SIZE as usize);
    let digest = hash_chunk_into(bytes, &mut blocks[..count]);
    ChunkSummary {
        digest,
        zero: false,
    }
}

/// Summarizes chunks `from..to` from one `O_DIRECT` read into this worker's aligned buffer. `None` when that
/// cannot be done (no `O_DIRECT` here, or a hole or unallocated range among them, which the per-chunk path skips
/// without reading): the caller then reads them as usual.
fn summarize_direct(
    volume: &Volume,
    geometry: Geometry,
    zeros: &ZeroDigests,
    bytes_read: &AtomicU64,
    from: u64,
    to: u64,
    blocks: &mut [Digest],
) -> Option<Result<Vec<ChunkSummary>>> {
    // Room for each chunk's block digests, or none.
    let stride = blocks.len() / (to - from) as usize;
    thread_local! {
        static DIRECT: RefCell<Option<memmap2::MmapMut>> = const { RefCell::new(None) };
    }
    let (start, len) = span(geometry, from, to);
    if any_hole(volume, geometry, from, to) {
        return None;
    }
    let room = (len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    DIRECT.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|b| (b.len() as u64) < room) {
            // Page-aligned, as O_DIRECT wants; one per worker, reused for every read.
            *cell = Some(memmap2::MmapMut::map_anon(room as usize).ok()?);
        }
        let buf = cell.as_mut()?;
        if let Err(e) = volume.read_direct(buf, len, start)? {
            return Some(Err(e));
        }
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Some(Ok(summarize_read(
            geometry,
            zeros,
            from..to,
            &buf[..len],
            blocks,
            stride,
        )))
    })
}

/// The byte range `(offset, length)` of chunks `from..to`.
fn span(geometry: Geometry, from: u64, to: u64) -> (u64, usize) {
    let start = geometry.chunk_range(from).0;
    let (last, last_len) = geometry.chunk_range(to - 1);
    (start, (last + last_len as u64 - start) as usize)
}

/// Whether any of chunks `from..to` is a hole or outside the allocation map ([`Volume::is_hole`]): the per-chunk
/// path knows those are zeros without reading them.
fn any_hole(volume: &Volume, geometry: Geometry, from: u64, to: u64) -> bool {
    (from..to).any(|i| {
        let (o, l) = geometry.chunk_range(i);
        volume.is_hole(o, l as u64)
    })
}

/// Summarizes `chunks`, read together into `buf` (from the first one's offset), with room for `stride` block
/// digests each in `blocks`.
fn summarize_read(
    geometry: Geometry,
    zeros: &ZeroDigests,
    chunks: std::ops::Range<u64>,
    buf: &[u8],
    blocks: &mut [Digest],
    stride: usize,
) -> Vec<ChunkSummary> {
    let start = geometry.chunk_range(chunks.start).0;
    let from = chunks.start;
    chunks
        .map(|i| {
            let (o, l) = geometry.chunk_range(i);
            let at = (o - start) as usize;
            let k = (i - from) as usize * stride;
            summarize_bytes(zeros, i, &buf[at..at + l], &mut blocks[k..k + stride])
        })
        .collect()
}

/// Chunks read together into a worker's buffer: 256 KiB at 64 KiB chunks, still in a core's 512 KiB L2 when hashed,
/// and a quarter of the `pread` calls (`dd` of the cached 2 GiB volume: 0.22-0.24 s of system time at 64 KiB, 0.20
/// at 256 KiB). Delta by manifest on the 2 GiB allocated pair, 1% change, alternated five and four runs: 0.48 s
/// (0.46-0.49) one chunk a read, 0.45 s (0.44-0.48) four; two and eight measured between.
pub const RUN_CHUNKS: u64 = 4;

/// Summarizes chunks `from..to`, read by one `pread` into this worker's buffer when none of them is a hole or
/// outside the allocation map (else chunk by chunk, as [`summarize`], which skips those without reading).
fn summarize_run(
    volume: &Volume,
    geometry: Geometry,
    zeros: &ZeroDigests,
    bytes_read: &AtomicU64,
    from: u64,
    to: u64,
    blocks: &mut [Digest],
) -> Result<Vec<ChunkSummary>> {
    let stride = blocks.len() / (to - from) as usize;
    if to - from == 1 || any_hole(volume, geometry, from, to) {
        return parts(blocks, to - from, stride)
            .into_iter()
            .enumerate()
            .map(|(k, b)| summarize(volume, geometry, zeros, bytes_read, from + k as u64, b))
            .collect();
    }
    thread_local! {
        static RUN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let (start, len) = span(geometry, from, to);
    RUN.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(len, 0);
        volume.read_exact_at(&mut buf, start)?;
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Ok(summarize_read(
            geometry,
            zeros,
            from..to,
            &buf,
            blocks,
            stride,
        ))
    })
}

/// Summarizes one chunk, read into this worker's buffer. A chunk in a hole of a sparse file is known to be zeros
/// without reading it.
fn summarize(
    volume: &Volume,
    geometry: Geometry,
    zeros: &ZeroDigests,
    bytes_read: &AtomicU64,
    i: u64,
    blocks: &mut [Digest],
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
    BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(len, 0);
        let hole = volume.read_unless_hole(&mut buf, offset)?;
        bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Ok(if hole {
            zeros.zero_summary(i)
        } else {
            summarize_bytes(zeros, i, &buf, blocks)
        })
    })
}

#[cfg(test)]
mod tests;
