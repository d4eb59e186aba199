//! Tests of volumes on files (NBD exports are tested against qemu-nbd in `tests/it/nbd/`).

use super::*;
use std::os::unix::fs::{FileExt, MetadataExt};

#[test]
fn an_allocation_map_makes_everything_outside_it_a_hole() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("v");
    std::fs::write(&p, vec![7u8; 1 << 20])?;
    let v = Volume::open_source(&p)?;
    assert!(!v.is_hole(0, 4096), "an allocated file has no holes");
    // Unsorted, overlapping and empty extents are merged.
    assert!(v.set_allocated(vec![
        (200_000, 100),
        (65536, 65536),
        (100_000, 50_000),
        (5, 0)
    ]));
    assert!(!v.set_allocated(vec![]), "the map is set once");
    assert!(v.is_hole(0, 65536));
    assert!(!v.is_hole(0, 65537), "touches the first extent");
    assert!(!v.is_hole(131_000, 10));
    assert!(
        v.is_hole(150_000, 50_000),
        "between the merged extent and the next"
    );
    assert!(!v.is_hole(150_000, 50_001));
    assert!(v.is_hole(200_100, 1 << 19));
    Ok(())
}

#[test]
fn writes_outside_the_volume_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("t.img");
    File::create(&p)?.set_len(1 << 20)?;
    let mut t = Volume::open_target(&p)?;
    assert!(
        t.write_all_at(b"x", 0).is_err(),
        "no writes before the range is set"
    );
    t.allow_writes_below(65536)?;
    t.write_all_at(&[1u8; 4096], 61440)?;
    assert!(t.write_all_at(&[1u8; 4096], 61441).is_err());
    assert!(t.zero_range(65536, 1).is_err());
    assert!(matches!(
        t.allow_writes_below(2 << 20),
        Err(Error::TargetTooSmall { .. })
    ));
    Ok(())
}

#[test]
fn zeroing_a_file_punches_a_hole_that_reads_back_zero() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("t.img");
    std::fs::write(&p, vec![0xAAu8; 1 << 20])?;
    let mut t = Volume::open_target(&p)?;
    t.allow_writes_below(1 << 20)?;
    let before = std::fs::metadata(&p)?.blocks();
    t.zero_range(0, 512 * 1024)?;
    t.sync()?;
    let mut buf = vec![1u8; 1 << 20];
    t.read_exact_at(&mut buf, 0)?;
    assert!(buf[..512 * 1024].iter().all(|&b| b == 0));
    assert!(buf[512 * 1024..].iter().all(|&b| b == 0xAA));
    assert!(std::fs::metadata(&p)?.blocks() <= before);
    Ok(())
}

#[test]
fn sparse_reads_return_holes_as_zeros_and_data_as_written() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("s.img");
    let f = File::create(&p)?;
    f.set_len(8 << 20)?;
    let pattern: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8 + 1).collect();
    f.write_all_at(&pattern, 3 << 20)?;
    f.write_all_at(&pattern[..10], (8 << 20) - 10)?;
    f.sync_all()?;
    let v = Volume::open_source(&p)?;
    let mut expected = vec![0u8; 8 << 20];
    expected[3 << 20..(3 << 20) + pattern.len()].copy_from_slice(&pattern);
    expected[(8 << 20) - 10..].copy_from_slice(&pattern[..10]);
    for (off, len) in [
        (0u64, 8usize << 20),
        ((3 << 20) - 7, 70_000),
        ((8 << 20) - 4096, 4096),
        (0, 4096),
    ] {
        let mut buf = vec![0xEEu8; len];
        v.read_exact_at(&mut buf, off)?;
        assert!(
            buf == expected[off as usize..off as usize + len],
            "range {off}+{len}"
        );
        // A range that is all hole is reported, not filled; any other range is read as above.
        let mut buf = vec![0xEEu8; len];
        let hole = v.read_unless_hole(&mut buf, off)?;
        let want = &expected[off as usize..off as usize + len];
        if hole {
            assert!(want.iter().all(|&b| b == 0), "range {off}+{len} has data");
            assert!(buf.iter().all(|&b| b == 0xEE), "a hole range was written");
        } else {
            assert!(buf == want, "range {off}+{len} read as data");
        }
        if off == 0 && len == 4096 && seeks_data(&p)? {
            assert!(
                hole,
                "the first 4 KiB are a hole on a file system that reports holes"
            );
        }
    }
    Ok(())
}

/// Whether the file system reports this sparse test file's leading hole (most do; some report all data).
fn seeks_data(p: &Path) -> anyhow::Result<bool> {
    let f = File::open(p)?;
    Ok(rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0))? > 0)
}

#[test]
fn a_second_open_of_a_target_file_is_refused_naming_the_holder() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("t.img");
    File::create(&p)?.set_len(1 << 20)?;
    let first = Volume::open_target(&p)?;
    let err = Volume::open_target(&p).expect_err("the target is locked");
    let text = err.to_string();
    assert!(matches!(err, Error::TargetInUse { .. }), "{text}");
    assert!(err.is_retryable());
    assert!(
        text.contains(&format!(
            "in use by another process (pid {}",
            std::process::id()
        )),
        "{text}"
    );
    // Readers of a source are not refused.
    Volume::open_source(&p)?;
    drop(first);
    Volume::open_target(&p)?;
    Ok(())
}

#[test]
fn a_clone_keeps_the_claim_and_starts_with_no_writes_allowed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("t.img");
    File::create(&p)?.set_len(1 << 20)?;
    let mut first = Volume::open_target(&p)?;
    first.allow_writes_below(1 << 20)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)?
        .set_len(2 << 20)?;
    assert_eq!(first.size(), 1 << 20);
    assert_eq!(first.current_size()?, 2 << 20, "the resize is seen");
    let mut clone = first.try_clone()?;
    assert_eq!(clone.size(), 2 << 20, "the size is read again");
    assert!(
        clone.write_all_at(b"x", 0).is_err(),
        "no writes before the range is set"
    );
    drop(first);
    assert!(matches!(
        Volume::open_target(&p),
        Err(Error::TargetInUse { .. })
    ));
    clone.allow_writes_below(1 << 20)?;
    clone.write_all_at(b"x", 0)?;
    drop(clone);
    Volume::open_target(&p)?;
    Ok(())
}

#[test]
fn same_file_sees_through_symlinks_and_hard_links() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, b"a")?;
    std::fs::write(&b, b"a")?;
    let (link, hard) = (dir.path().join("link"), dir.path().join("hard"));
    std::os::unix::fs::symlink(&a, &link)?;
    std::fs::hard_link(&a, &hard)?;
    assert!(same_file(&a, &a)?);
    assert!(same_file(&a, &link)?);
    assert!(same_file(&link, &hard)?);
    assert!(!same_file(&a, &b)?, "equal contents, different files");
    assert!(same_file(&a, &dir.path().join("missing")).is_err());
    Ok(())
}

#[test]
fn a_missing_volume_names_its_path() {
    let err = Volume::open_source(Path::new("/nonexistent/vol")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/vol"), "{err}");
}

/// Whether the first `len` bytes of `p` are all in the page cache, polled for up to two seconds (a WILLNEED read
/// is started, not waited for).
fn becomes_resident(p: &Path, len: u64) -> anyhow::Result<bool> {
    let vol = Volume::open_source(p)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        if resident(&vol.map(0, len).expect("map")) {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn will_need_starts_reading_cold_ranges_into_the_cache_only_with_direct_reads() -> anyhow::Result<()>
{
    // On the disk (not tmpfs), so that the cache can be dropped.
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
    let p = dir.path().join("cold.img");
    let len = 64 * 65536u64;
    std::fs::write(&p, vec![0x5Au8; len as usize])?;
    let evict = || -> anyhow::Result<()> {
        let f = File::open(&p)?;
        f.sync_all()?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
        Ok(())
    };
    evict()?;
    let vol = Volume::open_source(&p)?;
    if resident(&vol.map(0, len).expect("map")) {
        eprintln!("skipped: this file system keeps the file cached after DONTNEED");
        return Ok(());
    }
    // Buffered scans leave what they read cached: no hint, nothing read.
    vol.will_need([(0, len)]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !resident(&vol.map(0, len).expect("map")),
        "a hint without direct reads read the file"
    );
    let mut direct = Volume::open_source(&p)?;
    direct.set_direct_reads(true);
    direct.will_need([(0, len / 2), (len / 2, len / 2), (len, 0)]);
    assert!(
        becomes_resident(&p, len)?,
        "the hinted ranges were not read into the cache"
    );
    Ok(())
}

#[test]
fn only_a_file_with_holes_when_opened_is_asked_for_them_and_holes_punched_later_still_read_as_zeros(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
    let (full, sparse) = (dir.path().join("full.img"), dir.path().join("sparse.img"));
    std::fs::write(&full, vec![0xA5u8; 1 << 20])?;
    let f = File::create(&sparse)?;
    f.set_len(1 << 20)?;
    f.write_all_at(&[1u8; 4096], 65536)?;
    drop(f);
    let s = Volume::open_source(&sparse)?;
    if !s.sparse {
        eprintln!("skipped: this file system allocates the holes of a sparse file");
        return Ok(());
    }
    assert!(
        s.is_hole(0, 65536),
        "the sparse file's first chunk is a hole"
    );
    assert!(!s.is_hole(65536, 65536));

    let mut t = Volume::open_target(&full)?;
    assert!(!t.sparse, "a fully written file has no holes to ask for");
    t.allow_writes_below(1 << 20)?;
    t.zero_range(0, 65536)?;
    let mut buf = vec![0xFFu8; 65536 + 4096];
    t.read_exact_at(&mut buf, 0)?;
    assert!(
        buf[..65536].iter().all(|b| *b == 0),
        "the zeroed range reads as zeros"
    );
    assert!(buf[65536..].iter().all(|b| *b == 0xA5));
    assert!(
        !t.is_hole(0, 65536),
        "this handle does not ask: the range is read (zeros) instead"
    );
    // A new handle on the target (the next session's) sees the hole the last one punched.
    let again = t.try_clone()?;
    assert!(again.sparse && again.is_hole(0, 65536));
    Ok(())
}
