//! Scanning a volume in chunk order: every worker reads and hashes chunks of a segment, one thread delivers them.
//!
//! The workers are rayon's global pool (one per core), or the pool a caller gives ([`scan_in`]): the source's
//! `--read-depth` pool, whose N threads each keep one read in flight (network disks give their throughput only
//! with many). A pool of more than [`SEGMENT_CHUNKS`] threads scans several segments at once.
//!
//! Each worker reads a chunk into its own buffer and hashes it while the bytes are still in its cache: reading
//! whole segments on one thread and hashing them on others moved every byte through memory twice. Memory budget:
//! one chunk buffer per worker (a 1 MiB `O_DIRECT` buffer with `--direct-reads`), and at most [`READ_AHEAD`]
//! segments of summaries (33 bytes per chunk) waiting for the sink.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;

mod selected;
pub use selected::scan_selected;
use std::sync::Arc;
use std::thread;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::chunk::{ChunkSummary, Geometry, ZeroDigests};
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
    let (tx, rx) = sync_channel::<Result<(u64, Vec<ChunkSummary>)>>(READ_AHEAD);
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
                            summarize_segment(&volume, geometry, &zeros, &bytes_read, first, n)
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
                let mut summaries = match item {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut at = first;
                while !summaries.is_empty() {
                    let rest = summaries.split_off(summaries.len().min(SEGMENT_CHUNKS as usize));
                    let len = summaries.len() as u64;
                    if tx.send(Ok((at, summaries))).is_err() {
                        return;
                    }
                    at += len;
                    summaries = rest;
                }
            }
        })
        .map_err(|e| Error::Config(format!("cannot start the scan thread: {e}")))?;
    let mut delivered = 0;
    let result = rx
        .iter()
        .try_for_each(|segment| {
            let (first, summaries) = segment?;
            delivered = first + summaries.len() as u64;
            sink(first, summaries)
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
/// pair, four runs each (when rounds were still mapped): delta by manifest 0.415-0.467 s -> 0.394-0.420 s. A scan
/// on rayon's global pool (the destination's) keeps one: that pool also computes the block digests its NEEDs wait
/// for, and with two its stateless syncs measured no faster and switched more.
const OWN_POOL_ROUNDS_IN_FLIGHT: usize = 2;

/// Segments scanned together on `pool`: enough chunks for every thread to have a read in flight.
fn segments_per_round(pool: Option<&ThreadPool>) -> u64 {
    let threads = pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads()) as u64;
    threads.div_ceil(SEGMENT_CHUNKS).max(MIN_SEGMENTS_PER_ROUND)
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

/// Summarizes chunks `first..first + n` on the current pool: each worker reads a chunk into its own reused buffer
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
) -> Result<Vec<ChunkSummary>> {
    let start = geometry.chunk_range(first).0;
    let (last, last_len) = geometry.chunk_range(first + n - 1);
    let cold = volume.direct_reads()
        && volume
            .map(start, last + last_len as u64 - start)
            .is_some_and(|m| !resident(&m));
    let groups: Vec<Vec<ChunkSummary>> = (0..n.div_ceil(DIRECT_CHUNKS))
        .into_par_iter()
        .map(|g| {
            let from = first + g * DIRECT_CHUNKS;
            let to = (from + DIRECT_CHUNKS).min(first + n);
            if cold {
                if let Some(done) = summarize_direct(volume, geometry, zeros, bytes_read, from, to)
                {
                    return done;
                }
            }
            (from..to)
                .into_par_iter()
                .map(|i| summarize(volume, geometry, zeros, bytes_read, i))
                .collect()
        })
        .collect::<Result<_>>()?;
    Ok(groups.into_iter().flatten().collect())
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
) -> Option<Result<Vec<ChunkSummary>>> {
    thread_local! {
        static DIRECT: RefCell<Option<memmap2::MmapMut>> = const { RefCell::new(None) };
    }
    let start = geometry.chunk_range(from).0;
    let (last, last_len) = geometry.chunk_range(to - 1);
    let len = (last + last_len as u64 - start) as usize;
    if (from..to).any(|i| {
        let (o, l) = geometry.chunk_range(i);
        volume.is_hole(o, l as u64)
    }) {
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
        Some(Ok((from..to)
            .map(|i| {
                let (o, l) = geometry.chunk_range(i);
                let at = (o - start) as usize;
                zeros.summarize(i, &buf[at..at + l])
            })
            .collect()))
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
            zeros.summarize(i, &buf)
        })
    })
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
    fn a_pool_deeper_than_a_segment_scans_several_at_once_and_delivers_them_in_order(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("v.img");
        let size = 300 * 65536 + 5;
        let data: Vec<u8> = (0..size)
            .map(|i| (i % 241) as u8 ^ (i >> 16) as u8)
            .collect();
        std::fs::write(&p, &data)?;
        let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
        let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(130).build()?);
        assert_eq!(
            segments_per_round(Some(&pool)),
            3.max(MIN_SEGMENTS_PER_ROUND)
        );
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
        assert_eq!(segments_per_round(Some(&two)), MIN_SEGMENTS_PER_ROUND);
        let read = Arc::new(AtomicU64::new(0));
        let mut all = Vec::new();
        scan_in(
            Some(pool.clone()),
            Arc::new(Volume::open_source(&p)?),
            g,
            read.clone(),
            |first, s| {
                assert_eq!(first, all.len() as u64);
                assert!(s.len() <= SEGMENT_CHUNKS as usize);
                all.extend(s);
                Ok(())
            },
        )?;
        assert_eq!(all.len() as u64, g.chunk_count());
        assert_eq!(read.load(Ordering::Relaxed), size as u64);
        for (i, s) in all.iter().enumerate() {
            let (off, len) = g.chunk_range(i as u64);
            assert_eq!(
                s.digest,
                Digest::of(&data[off as usize..][..len]),
                "chunk {i}"
            );
        }
        let list = crate::changes::ChangedChunks::from_extents(&[(0, size as u64)], g)
            .map_err(|e| anyhow::anyhow!(e.0))?;
        let mut seen = Vec::new();
        scan_selected(
            Some(pool),
            Arc::new(Volume::open_source(&p)?),
            g,
            Arc::new(list),
            Arc::new(AtomicU64::new(0)),
            |_, _, _| None::<()>,
            |s| {
                assert!(s.len() <= SEGMENT_CHUNKS as usize);
                seen.extend(s.into_iter().map(|(i, s, _)| (i, s.digest)));
                Ok(())
            },
        )?;
        let expected: Vec<(u64, Digest)> = all
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.digest))
            .collect();
        assert_eq!(seen, expected);
        Ok(())
    }

    fn direct(mut v: Volume) -> Volume {
        v.set_direct_reads(true);
        v
    }

    /// Writes `size` bytes of varied data (zero chunks too) at `p`, written back and dropped from the cache.
    fn cold_file(p: &std::path::Path, size: usize) -> anyhow::Result<Vec<u8>> {
        let mut data: Vec<u8> = (0..size)
            .map(|i| (i % 239) as u8 ^ (i >> 16) as u8)
            .collect();
        data[65536 * 5..65536 * 6].fill(0);
        std::fs::write(p, &data)?;
        evict(p)?;
        Ok(data)
    }

    fn evict(p: &std::path::Path) -> anyhow::Result<()> {
        let f = std::fs::File::open(p)?;
        f.sync_all()?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
        Ok(())
    }

    fn scan_all(vol: Volume, g: Geometry) -> anyhow::Result<(Vec<ChunkSummary>, u64)> {
        let read = Arc::new(AtomicU64::new(0));
        let mut all = Vec::new();
        scan(Arc::new(vol), g, read.clone(), |first, s| {
            assert_eq!(first, all.len() as u64);
            all.extend(s);
            Ok(())
        })?;
        Ok((all, read.load(Ordering::Relaxed)))
    }

    fn assert_digests(all: &[ChunkSummary], data: &[u8], g: Geometry) {
        assert_eq!(all.len() as u64, g.chunk_count());
        for (i, s) in all.iter().enumerate() {
            let (off, len) = g.chunk_range(i as u64);
            let bytes = &data[off as usize..][..len];
            assert_eq!(s.digest, Digest::of(bytes), "chunk {i}");
            assert_eq!(s.zero, bytes.iter().all(|b| *b == 0), "chunk {i}");
        }
    }

    #[test]
    fn a_cold_file_is_scanned_with_direct_reads_to_the_same_digests_and_stays_uncached(
    ) -> anyhow::Result<()> {
        // On the disk (not tmpfs), so that the cache can be dropped and O_DIRECT works.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
        let p = dir.path().join("cold.img");
        let size = 150 * 65536 + 777;
        let data = cold_file(&p, size)?;
        let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
        let (cold, read) = scan_all(direct(Volume::open_source(&p)?), g)?;
        assert_eq!(read, size as u64);
        assert_digests(&cold, &data, g);
        let vol = Volume::open_source(&p)?;
        let map = vol.map(0, 128 * 65536).expect("map");
        assert!(!resident(&map), "a direct scan leaves the cache as it was");
        // Warm: the buffered path gives the same.
        drop(map);
        let _ = std::fs::read(&p)?;
        assert!(resident(&vol.map(0, 64 * 65536).expect("map")));
        let (warm, _) = scan_all(vol, g)?;
        assert_eq!(warm, cold);
        Ok(())
    }

    #[test]
    fn a_cold_loop_device_is_scanned_with_direct_reads_to_the_same_digests() -> anyhow::Result<()> {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
        let p = dir.path().join("backing.img");
        let size = 140 * 65536;
        let data = cold_file(&p, size)?;
        let out = std::process::Command::new("losetup")
            .args(["--read-only", "--find", "--show"])
            .arg(&p)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            other => {
                eprintln!("skipped: loop devices unavailable ({other:?})");
                return Ok(());
            }
        };
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", &self.0])
                    .status();
            }
        }
        let dev = Detach(dev);
        let dev_path = std::path::Path::new(&dev.0);
        evict(dev_path)?;
        let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
        let (cold, read) = scan_all(direct(Volume::open_source(dev_path)?), g)?;
        assert_eq!(read, size as u64);
        assert_digests(&cold, &data, g);
        assert!(!resident(
            &Volume::open_source(dev_path)?
                .map(0, 64 * 65536)
                .expect("map")
        ));
        Ok(())
    }

    #[test]
    fn direct_reads_fall_back_cleanly_where_refused_and_the_scan_still_reads_right(
    ) -> anyhow::Result<()> {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm");
            return Ok(());
        };
        let p = dir.path().join("shm.img");
        let size = 70 * 65536 + 5;
        let data = cold_file(&p, size)?;
        let vol = Volume::open_source(&p)?;
        let mut buf = memmap2::MmapMut::map_anon(2 << 20)?;
        // tmpfs refuses O_DIRECT on older kernels and accepts it on newer ones: either way, no wrong bytes.
        match vol.read_direct(&mut buf, size - 65536 * 64, 65536 * 64) {
            None => {}
            Some(r) => {
                r?;
                assert_eq!(&buf[..size - 65536 * 64], &data[65536 * 64..]);
            }
        }
        assert!(vol.read_direct(&mut buf, 4096, 512).is_none(), "unaligned");
        let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
        let (all, _) = scan_all(vol, g)?;
        assert_digests(&all, &data, g);
        Ok(())
    }
}
