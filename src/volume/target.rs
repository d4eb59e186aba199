//! The destination's side of a volume: opening a target exclusively, writing, zeroing, flushing. File and block
//! device only: an NBD export is a source, never a target.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{fallocate, FallocateFlags};

use super::{claim, open_error, Backend, Kind, Volume};
use crate::error::{Error, Result};

impl Volume {
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
            Kind::File => claim::lock_file(target.target_file()?, path).map(|()| target),
        }
    }

    /// A second handle of the same open volume: a duplicate of its descriptor, sharing a target's exclusive
    /// claim. Its size is read again, and its write limit starts at 0: call [`Volume::allow_writes_below`] on
    /// it before writing.
    pub fn try_clone(&self) -> Result<Volume> {
        let mut file = self
            .target_file()?
            .try_clone()
            .map_err(|source| open_error(self.what, &self.path, source))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| open_error(self.what, &self.path, source))?;
        let sparse = super::may_have_holes(&file, self.kind, size);
        Ok(Volume {
            path: self.path.clone(),
            what: self.what,
            backend: Backend::File(file),
            size,
            kind: self.kind,
            limit: 0,
            file_writes: std::sync::Mutex::new(()),
            allocated: std::sync::OnceLock::new(),
            dirty_bitmap: None,
            direct: std::sync::OnceLock::new(),
            direct_reads: self.direct_reads,
            sparse,
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

    /// The size in bytes now, read again through the handle: a target truncated or resized during a sync shows
    /// here, not in [`Volume::size`].
    pub fn current_size(&self) -> Result<u64> {
        rustix::fs::seek(self.target_file()?, rustix::fs::SeekFrom::End(0))
            .map_err(|e| self.io_err("size", 0, e.into()))
    }

    /// Writes `buf` at `offset`, refusing anything outside the allowed range.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _serial = match self.kind {
            Kind::File => Some(self.file_writes.lock().unwrap_or_else(|p| p.into_inner())),
            Kind::BlockDevice => None,
        };
        self.target_file()?
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
        match fallocate(self.target_file()?, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeros(offset, len),
        }
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.target_file()?
                .write_all_at(&zeros[..n], offset)
                .map_err(|source| self.io_err("zero", offset, source))?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Flushes data (and the device cache) to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.target_file()?
            .sync_all()
            .map_err(|source| self.io_err("fsync", 0, source))
    }

    /// Starts writeback of every dirty page of the target without waiting for it (`sync_file_range` with
    /// `SYNC_FILE_RANGE_WRITE`), so the storage works on the writes while the sync goes on. Durability still comes
    /// only from [`Volume::sync`]; a writeback error this starts stays pending for that fsync to report. Where the
    /// call is refused it does nothing: the fsync alone then does the work.
    pub fn start_writeback(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.target_file()?.as_raw_fd();
        // SAFETY: sync_file_range takes a file descriptor this volume owns and open for as long as `self`, and no
        // pointer.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        Ok(())
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
pub(super) fn device_is_read_only(file: &File) -> bool {
    let Ok(meta) = file.metadata() else {
        return false;
    };
    let rdev = meta.rdev();
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/ro"))
        .is_ok_and(|ro| ro.trim() == "1")
}
