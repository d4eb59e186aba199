//! Volumes on disk: the source snapshot (read-only) and the destination target (read-write), block device or file.
//!
//! Reads and writes are positional (`pread`/`pwrite`) so that a media error is an `EIO` with an offset, not a
//! `SIGBUS` as it would be through a memory map. Zeroing uses `fallocate`: a hole punched in a regular file, and
//! `ZERO_RANGE` on a block device (the kernel guarantees zeros on read back); where that is not supported, zeros are
//! written. The target never receives a write outside `[0, volume_size)`.
//!
//! A target is opened exclusively ([`Volume::open_target`]: `O_EXCL` on a block device, `flock` on a file; see
//! `claim`), and the claim lasts as long as any handle of it ([`Volume::try_clone`]) is open. A source volume is
//! opened shared: reading a snapshot that others read too is harmless.

mod claim;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{fallocate, FallocateFlags};

use crate::error::{Error, Result};

/// What kind of object a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A block device (`/dev/...`).
    BlockDevice,
    /// A regular file, possibly sparse.
    File,
}

/// An open volume or target.
///
/// A target's handle holds the exclusive claim taken by [`Volume::open_target`]; handles made by
/// [`Volume::try_clone`] share it, and it ends when the last of them is dropped.
#[derive(Debug)]
pub struct Volume {
    path: PathBuf,
    /// "volume" or "target", for error messages.
    what: &'static str,
    file: File,
    size: u64,
    kind: Kind,
    /// Writes are refused at or past this offset.
    limit: u64,
    /// Held while writing to a regular file. The kernel serialises buffered writes to one file anyway (the inode
    /// lock), and a writer waiting there spins on the CPU: on a full sync that was 2% of all CPU time, taken from
    /// the hashing workers. Waiting here sleeps instead. Writes to a block device run in parallel.
    file_writes: std::sync::Mutex<()>,
    /// A source's allocation map, when a tracker gave one ([`Volume::set_allocated`]): sorted, disjoint byte
    /// extents that may hold data. Everything outside them reads as zeros.
    allocated: std::sync::OnceLock<Vec<(u64, u64)>>,
}

impl Volume {
    /// Opens a source volume read-only, shared with other readers.
    pub fn open_source(path: &Path) -> Result<Volume> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|source| open_error("volume", path, source))?;
        Volume::from_file(path, file, false, "volume")
    }

    /// Opens a target read-write and exclusively (it must exist: a target is never created by accident).
    ///
    /// A block device is opened with `O_EXCL`: a device holding a mounted file system is refused with
    /// [`Error::TargetMounted`], one held by device-mapper, md or another process with [`Error::TargetInUse`]. A
    /// regular file is locked with `flock(LOCK_EX|LOCK_NB)`; a lock held elsewhere is [`Error::TargetInUse`]
    /// naming the process when `/proc/locks` shows it. The claim lasts until the last handle is dropped.
    pub fn open_target(path: &Path) -> Result<Volume> {
        let meta = std::fs::metadata(path).map_err(|source| open_error("target", path, source))?;
        let block = meta.file_type().is_block_device();
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if block {
            // O_EXCL without O_CREAT is defined for block devices only (open(2)), hence the stat first.
            options.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
        }
        let file = match options.open(path) {
            Ok(file) => file,
            Err(e) if block && claim::is_busy(&e) => {
                return Err(claim::busy_device(path, meta.rdev()))
            }
            Err(source) => return Err(open_error("target", path, source)),
        };
        let target = Volume::from_file(path, file, true, "target")?;
        match target.kind {
            Kind::BlockDevice if !block => Err(open_error(
                "target",
                path,
                io::Error::other("it became a block device while being opened"),
            )),
            Kind::BlockDevice => Ok(target),
            Kind::File => claim::lock_file(&target.file, path).map(|()| target),
        }
    }

    /// A second handle of the same open volume: a duplicate of its descriptor, sharing a target's exclusive
    /// claim. Its size is read again, and its write limit starts at 0: call [`Volume::allow_writes_below`] on
    /// it before writing.
    pub fn try_clone(&self) -> Result<Volume> {
        let mut file = self
            .file
            .try_clone()
            .map_err(|source| open_error(self.what, &self.path, source))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| open_error(self.what, &self.path, source))?;
        Ok(Volume {
            path: self.path.clone(),
            what: self.what,
            file,
            size,
            kind: self.kind,
            limit: 0,
            file_writes: std::sync::Mutex::new(()),
            allocated: std::sync::OnceLock::new(),
        })
    }

    fn from_file(path: &Path, mut file: File, write: bool, what: &'static str) -> Result<Volume> {
        let open_err = |source| open_error(what, path, source);
        let ft = file.metadata().map_err(open_err)?.file_type();
        let kind = if ft.is_block_device() {
            Kind::BlockDevice
        } else if ft.is_file() {
            Kind::File
        } else {
            return Err(open_err(io::Error::other(
                "not a block device or a regular file",
            )));
        };
        if write && kind == Kind::BlockDevice && device_is_read_only(&file) {
            // Opening a read-only device for writing succeeds; its first write would fail. Say so now.
            return Err(open_err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem)));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(Volume {
            path: path.to_owned(),
            what,
            file,
            size,
            kind,
            limit: 0,
            file_writes: std::sync::Mutex::new(()),
            allocated: std::sync::OnceLock::new(),
        })
    }

    /// Allows writes below `volume_size`, after checking that the target can hold it.
    pub fn allow_writes_below(&mut self, volume_size: u64) -> Result<()> {
        if self.size < volume_size {
            return Err(Error::TargetTooSmall {
                path: self.path.clone(),
                target_size: self.size,
                volume_size,
            });
        }
        self.limit = volume_size;
        Ok(())
    }

    /// Bytes `[offset, offset + len)` mapped read-only, for a scan to hash the page cache in place (a `pread`
    /// copies every byte out of it first: a third of an unchanged scan's CPU). A scan maps one segment at a time,
    /// so the pages it keeps mapped (and its RSS) stay a few MiB. `None` when the kernel refuses the mapping; the
    /// caller then reads. The mapping shows what the file holds as it changes, like a read would; a volume that
    /// shrinks under it while it is read faults the process (SIGBUS) instead of failing the read: scan snapshots,
    /// which do not.
    pub fn map(&self, offset: u64, len: u64) -> Option<memmap2::Mmap> {
        let len = usize::try_from(len).ok().filter(|l| *l > 0)?;
        let mut options = memmap2::MmapOptions::new();
        options.offset(offset).len(len);
        // SAFETY: the mapping is read-only and private to this process; the source reads a snapshot and the
        // destination holds its target exclusively (see `claim`), so what it maps does not shrink while mapped.
        #[allow(unsafe_code)]
        let map = unsafe { options.map(&self.file) }.ok()?;
        let _ = map.advise(memmap2::Advice::Sequential);
        Some(map)
    }

    /// Size in bytes, as it was when this handle was opened (or cloned).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The size in bytes now, read again through the handle: a target truncated or resized during a sync shows
    /// here, not in [`Volume::size`].
    pub fn current_size(&self) -> Result<u64> {
        rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0))
            .map_err(|e| self.io_err("size", 0, e.into()))
    }

    /// Block device or file.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` from `offset` (the caller keeps the range inside the volume).
    ///
    /// On a regular file, holes are found with `SEEK_DATA`/`SEEK_HOLE` and filled with zeros here instead of being
    /// read: the kernel would zero a page and copy it for every hole, which costs more than hashing the data.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.kind == Kind::File {
            return self.read_sparse_at(buf, offset);
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| self.io_err("read", offset, source))
    }

    /// Appends the `len` bytes at `offset` to `buf`, read straight into its spare capacity: no zero-filling of a
    /// buffer that the read overwrites anyway (a few percent of the source's CPU on a full sync). Holes of a
    /// sparse file read back as zeros, as from any read.
    pub fn read_append(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> Result<()> {
        let want = buf.len() + len;
        buf.reserve_exact(len);
        let mut pos = offset;
        while buf.len() < want {
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(buf), pos) {
                Ok(0) => {
                    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(self.io_err("read", pos, eof));
                }
                Ok(n) => pos += n as u64,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.io_err("read", pos, e.into())),
            }
        }
        // The spare capacity may have been larger than asked for.
        buf.truncate(want);
        Ok(())
    }

    /// Takes the allocation map of a source volume from its tracker (NBD `base:allocation`, CSI
    /// GetMetadataAllocated): byte extents `(offset, length)` that may hold data. A range outside all of them is
    /// a hole for [`Volume::is_hole`]: a scan takes it for zeros without reading it. The map is trusted as the
    /// storage's own statement that those ranges read as zeros; set once, before the scan. Returns whether it was
    /// taken (a second map is ignored).
    pub fn set_allocated(&self, mut extents: Vec<(u64, u64)>) -> bool {
        extents.retain(|(_, len)| *len > 0);
        extents.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
        for (off, len) in extents {
            let end = off.saturating_add(len);
            match merged.last_mut() {
                Some(last) if off <= last.0 + last.1 => last.1 = last.1.max(end - last.0),
                _ => merged.push((off, len)),
            }
        }
        self.allocated.set(merged).is_ok()
    }

    /// Whether `[offset, offset + len)` is unallocated in the allocation map (see [`Volume::set_allocated`]).
    fn unallocated(&self, offset: u64, len: u64) -> Option<bool> {
        let map = self.allocated.get()?;
        let end = offset.saturating_add(len);
        // The first extent that ends after `offset`: the range is a hole unless it starts before `end`.
        let i = map.partition_point(|(o, l)| o + l <= offset);
        Some(map.get(i).is_none_or(|(o, _)| *o >= end))
    }

    /// Whether `[offset, offset + len)` lies outside the allocation map (a tracker said it holds no data): a scan
    /// takes it for zeros and does not count it as read.
    pub fn outside_allocation_map(&self, offset: u64, len: u64) -> bool {
        self.unallocated(offset, len) == Some(true)
    }

    /// Whether `[offset, offset + len)` is one hole of a sparse file or outside the allocation map (never for a
    /// block device without one).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        if let Some(hole) = self.unallocated(offset, len) {
            if hole {
                return true;
            }
        }
        if self.kind != Kind::File {
            return false;
        }
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(d) => d >= offset + len,
            Err(rustix::io::Errno::NXIO) => true,
            Err(_) => false,
        }
    }

    /// Like [`Volume::read_exact_at`], but when the whole range is a hole of a sparse file, returns `true` and
    /// leaves `buf` as it is: a scan knows such a chunk is zeros without filling and checking it.
    pub fn read_unless_hole(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        if self.is_hole(offset, buf.len() as u64) {
            return Ok(true);
        }
        self.read_exact_at(buf, offset).map(|()| false)
    }

    /// Reads a range of a file, zero-filling (without reading) a hole at its start. Only `SEEK_DATA` is asked:
    /// `SEEK_HOLE` on a fully allocated tmpfs file walks every page to the end of the file, which made each chunk
    /// cost a scan of the whole volume; holes after the first data read as zeros from the kernel.
    fn read_sparse_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(d) => d.clamp(offset, end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => return Err(self.io_err("seek", offset, e.into())),
        };
        let at = (data - offset) as usize;
        buf[..at].fill(0);
        if data < end {
            self.file
                .read_exact_at(&mut buf[at..], data)
                .map_err(|source| self.io_err("read", data, source))?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, refusing anything outside the allowed range.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _serial = match self.kind {
            Kind::File => Some(self.file_writes.lock().unwrap_or_else(|p| p.into_inner())),
            Kind::BlockDevice => None,
        };
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| self.io_err("write", offset, source))
    }

    /// Makes `[offset, offset+len)` read back as zeros: a hole in a file, a zeroing on a device.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len)?;
        let flags = match self.kind {
            Kind::File => FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            Kind::BlockDevice => FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        };
        match fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeros(offset, len),
        }
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset)
                .map_err(|source| self.io_err("zero", offset, source))?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Flushes data (and the device cache) to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|source| self.io_err("fsync", 0, source))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.limit => Ok(()),
            _ => Err(Error::Protocol(format!(
                "refused write of {len} bytes at offset {offset}: outside the volume's {} bytes",
                self.limit
            ))),
        }
    }

    fn io_err(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            op,
            path: self.path.clone(),
            offset,
            source,
        }
    }
}

fn open_error(what: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Open {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Whether `a` and `b` name the same file: the same device and inode (through symlinks and hard links), or for
/// two block devices the same device number (two device nodes of one disk). Errors if either cannot be stat'ed.
pub fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    if ma.file_type().is_block_device() && mb.file_type().is_block_device() {
        return Ok(ma.rdev() == mb.rdev());
    }
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

/// Whether the kernel marks this block device read-only (`/sys/dev/block/MAJ:MIN/ro`).
fn device_is_read_only(file: &File) -> bool {
    let Ok(meta) = file.metadata() else {
        return false;
    };
    let rdev = meta.rdev();
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/ro"))
        .is_ok_and(|ro| ro.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
