//! Scan tests: every chunk in order, block digests from the same pass, pools deeper than a segment, cold direct reads.

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

/// Scans `vol` keeping block digests, and checks every chunk's summary and (for a chunk not of zeros) its block
/// digests against `data`.
fn check_kept_blocks(vol: Volume, g: Geometry, data: &[u8]) -> anyhow::Result<()> {
    let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(2).build()?);
    let mut seen = 0u64;
    scan_keeping_blocks(
        Some(pool),
        Arc::new(vol),
        g,
        Arc::new(AtomicU64::new(0)),
        true,
        |first, summaries, blocks| {
            assert_eq!(first, seen);
            for (k, s) in summaries.iter().enumerate() {
                let i = first + k as u64;
                let (off, len) = g.chunk_range(i);
                let bytes = &data[off as usize..][..len];
                assert_eq!(s.digest, Digest::of(bytes), "chunk {i}");
                assert_eq!(s.zero, bytes.iter().all(|b| *b == 0), "chunk {i}");
                if !s.zero {
                    let kept = blocks.of(k, g.blocks_in_chunk(i) as usize);
                    let expected = crate::chunk::block_digests(bytes);
                    assert_eq!(kept, Some(&expected[..]), "chunk {i}");
                }
            }
            seen += summaries.len() as u64;
            Ok(())
        },
    )?;
    assert_eq!(seen, g.chunk_count());
    Ok(())
}

#[test]
fn a_scan_keeping_blocks_gives_each_chunks_block_digests_from_the_same_pass() -> anyhow::Result<()>
{
    // Zero chunks, whole chunks and a short last chunk whose last block is short; two rounds of segments; read
    // through the page cache, then cold with direct reads (on the disk, where O_DIRECT works).
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
    let p = dir.path().join("v.img");
    let size = 300 * 65536 + 2 * 4096 + 5;
    let mut data: Vec<u8> = (0..size)
        .map(|i| (i % 241) as u8 ^ (i >> 13) as u8)
        .collect();
    data[65536 * 7..65536 * 9].fill(0);
    std::fs::write(&p, &data)?;
    let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
    check_kept_blocks(Volume::open_source(&p)?, g, &data)?;
    evict(&p)?;
    check_kept_blocks(direct(Volume::open_source(&p)?), g, &data)
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
        9,
        "a run of chunks in flight on each of 130 threads: 520 chunks"
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
        crate::scan::Keep {
            blocks: false,
            base: None,
            keep: |_, _: crate::scan::Read<'_>| None::<()>,
        },
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

#[test]
fn runs_of_chunks_read_together_around_the_holes_of_a_sparse_file_hash_as_their_chunks(
) -> anyhow::Result<()> {
    // 23 chunks and a short one: data in runs of every length, holes alone, at a run's edges and inside one (the
    // chunks of such a run are read one by one): every digest and zero flag is its chunk's.
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
    let p = dir.path().join("sparse.img");
    let size = 23 * 65536 + 3000;
    let holes = [1u64, 4, 9, 10, 11, 18];
    let mut data = vec![0u8; size];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&p)?;
        f.set_len(size as u64)?;
        for (i, piece) in data.chunks_mut(65536).enumerate() {
            if holes.contains(&(i as u64)) {
                continue;
            }
            for (k, b) in piece.iter_mut().enumerate() {
                *b = (k % 253) as u8 ^ i as u8 | 1;
            }
            f.write_all_at(piece, i as u64 * 65536)?;
        }
    }
    let g = Geometry::new(size as u64, 65536).map_err(anyhow::Error::msg)?;
    let (all, read) = scan_all(Volume::open_source(&p)?, g)?;
    assert_digests(&all, &data, g);
    for (i, s) in all.iter().enumerate() {
        assert_eq!(s.zero, holes.contains(&(i as u64)), "chunk {i}");
    }
    assert_eq!(read, size as u64, "progress counts the holes too");
    Ok(())
}
