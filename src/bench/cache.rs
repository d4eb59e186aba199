//! The state of the files a timed sync reads, set before the clock starts: fully allocated (`--allocated`, as a
//! block PVC is: no hole for `SEEK_HOLE` to skip) and out of the page cache (`--cold`, as a fresh snapshot clone
//! is).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::Context;

/// Zeros written at a time over a hole.
const ZEROS: usize = 1 << 20;

/// Writes zeros over every hole of a regular file, so that every byte is allocated and a reader must read it;
/// leaves the data as it is. Returns the bytes written. A block device has no holes: nothing to do.
pub fn fill_holes(path: &Path) -> anyhow::Result<u64> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        return Ok(0);
    }
    let (size, zeros) = (meta.len(), vec![0u8; ZEROS]);
    let mut written = 0;
    let mut pos = 0;
    while pos < size {
        let hole = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(pos)) {
            Ok(h) => h,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e).context("SEEK_HOLE"),
        };
        if hole >= size {
            break;
        }
        let data = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(hole)) {
            Ok(d) => d.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e).context("SEEK_DATA"),
        };
        let mut at = hole;
        while at < data {
            let n = (data - at).min(ZEROS as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        written += data - hole;
        pos = data;
    }
    file.sync_all()?;
    Ok(written)
}

/// Writes back and drops a file's (or device's) pages from the page cache: fsync, then
/// `posix_fadvise(DONTNEED)` over the whole file. Pages another process maps or keeps dirty may stay; see
/// [`resident_share`].
pub fn evict(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    file.sync_all()?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("posix_fadvise(DONTNEED) on {}", path.display()))?;
    Ok(())
}

/// Reads a file (or device) whole through the page cache, so that the timed sync after it finds it cached. A
/// file written a while ago need not be: the kernel may have reclaimed it (this machine runs DAMON's `pageout`
/// scheme, which writes back and drops pages left unread for a few seconds), and a "warm" sync would then read
/// part of it from the disk.
pub fn warm(path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while file
        .read(&mut buf)
        .with_context(|| format!("cannot read {}", path.display()))?
        > 0
    {}
    Ok(())
}

/// The share of a regular file's pages in the page cache, as util-linux's `fincore` reports it (`None` when
/// `fincore` is missing or says nothing usable).
pub fn resident_share(path: &Path) -> Option<f64> {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES,SIZE"])
        .arg(path)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    let (res, size) = (fields.next()??, fields.next()??);
    (size > 0.0).then(|| res / size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filling_holes_allocates_zeros_and_keeps_the_data() -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("sparse.img");
        let f = File::create(&p)?;
        f.set_len(8 << 20)?;
        f.write_all_at(&[7u8; 4096], 3 << 20)?;
        f.sync_all()?;
        let before = std::fs::metadata(&p)?.blocks();
        let written = fill_holes(&p)?;
        let meta = std::fs::metadata(&p)?;
        if rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0))? > 0 {
            // A file system that reports holes: they are gone, and only they were written.
            assert!(
                ((8 << 20) - 65536..=(8 << 20) - 4096).contains(&written),
                "{written}"
            );
            assert!(meta.blocks() * 512 >= 8 << 20, "{} blocks", meta.blocks());
            assert!(meta.blocks() > before);
        }
        let bytes = std::fs::read(&p)?;
        assert!(bytes[..3 << 20].iter().all(|&b| b == 0));
        assert!(bytes[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 7));
        assert!(bytes[(3 << 20) + 4096..].iter().all(|&b| b == 0));
        assert_eq!(fill_holes(&p)?, 0, "nothing left to fill");
        evict(&p)?;
        Ok(())
    }

    #[test]
    fn warming_an_evicted_file_brings_it_back_into_the_page_cache() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("warm.img");
        std::fs::write(&p, vec![9u8; 8 << 20])?;
        evict(&p)?;
        let Some(cold) = resident_share(&p) else {
            println!("skipped: fincore is missing, the page cache cannot be measured");
            return Ok(());
        };
        if cold > 0.5 {
            println!(
                "skipped: this file system keeps evicted pages ({:.0}% stayed cached)",
                cold * 100.0
            );
            return Ok(());
        }
        warm(&p)?;
        let warm = resident_share(&p).expect("fincore answered before");
        assert!(warm > 0.99, "{:.1}% cached after warming", warm * 100.0);
        Ok(())
    }
}
