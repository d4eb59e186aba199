//! Volumes: the source snapshot (read-only: block device, file, or an NBD export) and the destination target
//! (read-write: block device or file).
//!
//! Reads and writes are positional (`pread`/`pwrite`) so that a media error is an `EIO` with an offset, not a
//! `SIGBUS` as it would be through a memory map. Zeroing uses `fallocate`: a hole punched in a regular file, and
//! `ZERO_RANGE` on a block device (the kernel guarantees zeros on read back); where that is not supported, zeros are
//! written. The target never receives a write outside `[0, volume_size)`.
//!
//! A target is opened exclusively ([`Volume::open_target`]: `O_EXCL` on a block device, `flock` on a file; see
//! `claim`), and the claim lasts as long as any handle of it ([`Volume::try_clone`]) is open. A source volume is
//! opened shared: reading a snapshot that others read too is harmless.
//!
//! An NBD export (`source --volume nbd+unix:///EXPORT?socket=PATH`, see [`crate::nbd`]) is read over one shared
//! connection: it is never mapped, its holes come from its `base:allocation` map (through the allocation map of
//! [`Volume::set_allocated`]), and the target-only methods refuse it. Its bytes are trusted to be the
//! point-in-time image the server says it is (a backup job's export of a running VM).

mod claim;
mod direct;
mod target;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use direct::{resident, DIRECT_ALIGN};
use target::device_is_read_only;
pub use target::same_file;

use crate::changes::NbdTracker;
use crate::error::{Error, Result};
use crate::nbd;

/// What a source reads: a file or block device, or an NBD export (with the dirty bitmap to ask for, if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A block device or a regular file.
    File(PathBuf),
    /// An NBD export.
    Nbd {
        /// Where it is.
        address: nbd::Address,
        /// `--dirty-bitmap NAME`: the `qemu:dirty-bitmap:NAME` context to take change lists from.
        dirty_bitmap: Option<String>,
    },
}

impl Source {
    /// An NBD URI (see [`nbd::Address::is_nbd_uri`]) or else a path.
    pub fn parse(text: &std::ffi::OsStr) -> Result<Source> {
        match text.to_str() {
            Some(t) if nbd::Address::is_nbd_uri(t) => Ok(Source::Nbd {
                address: nbd::Address::parse(t).map_err(Error::Config)?,
                dirty_bitmap: None,
            }),
            _ => Ok(Source::File(PathBuf::from(text))),
        }
    }

    /// The path of a file source.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Source::File(p) => Some(p),
            Source::Nbd { .. } => None,
        }
    }
}

impl From<PathBuf> for Source {
    fn from(p: PathBuf) -> Source {
        Source::File(p)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Nbd { address, .. } => write!(f, "{address}"),
        }
    }
}

/// Where a volume's bytes come from.
#[derive(Debug)]
enum Backend {
    File(File),
    Nbd(Arc<nbd::Client>),
}

/// What kind of object a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A block device (`/dev/...`), or an NBD export (read like one: no `SEEK_DATA`).
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
    backend: Backend,
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
    /// For an NBD export: the dirty bitmap asked for.
    dirty_bitmap: Option<String>,
    /// The same file opened with `O_DIRECT`, for cold scans ([`Volume::read_direct`]); `None` inside when the
    /// file system refuses it (tmpfs) or for an NBD export.
    direct: std::sync::OnceLock<Option<File>>,
    /// Scans read segments that are not in the page cache with `O_DIRECT` (`--direct-reads`; off by default).
    direct_reads: bool,
    /// A regular file that had fewer blocks allocated than its size when opened: only then is asking it for holes
    /// (`SEEK_DATA`, a system call and an extent lookup per chunk) worth it. A fully allocated file can gain holes
    /// later (the destination punches them to zero a range); those then read as zeros, which is slower, not wrong.
    sparse: bool,
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

    /// Opens what `source` names: a file or device as [`Volume::open_source`] does, or an NBD export (connecting
    /// within `connect_timeout`, every later wait within `timeout`). Its "path" is then the URI, for messages.
    pub fn open(
        source: &Source,
        connect_timeout: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Result<Volume> {
        let (address, dirty_bitmap) = match source {
            Source::File(path) => return Volume::open_source(path),
            Source::Nbd {
                address,
                dirty_bitmap,
            } => (address, dirty_bitmap),
        };
        let mut contexts = vec![nbd::BASE_ALLOCATION.to_owned()];
        contexts.extend(
            dirty_bitmap
                .iter()
                .map(|b| format!("{}{b}", nbd::DIRTY_BITMAP_PREFIX)),
        );
        let options = nbd::Options {
            connect_timeout,
            timeout,
            contexts,
        };
        let client = Arc::new(nbd::Client::connect(address, &options)?);
        Ok(Volume {
            path: PathBuf::from(address.uri()),
            what: "volume",
            size: client.size(),
            backend: Backend::Nbd(client),
            kind: Kind::BlockDevice,
            limit: 0,
            file_writes: std::sync::Mutex::new(()),
            allocated: std::sync::OnceLock::new(),
            dirty_bitmap: dirty_bitmap.clone(),
            direct: std::sync::OnceLock::new(),
            direct_reads: false,
            sparse: false,
        })
    }

    /// For an NBD export: its tracker (the dirty bitmap asked for, if any, and `base:allocation`).
    pub fn nbd_tracker(&self) -> Option<Arc<NbdTracker>> {
        match &self.backend {
            Backend::Nbd(client) => Some(Arc::new(NbdTracker::new(
                client.clone(),
                self.dirty_bitmap.clone(),
            ))),
            Backend::File(_) => None,
        }
    }

    /// The open file (or device); an NBD export is refused, for the target-only operations.
    fn target_file(&self) -> Result<&File> {
        match &self.backend {
            Backend::File(f) => Ok(f),
            Backend::Nbd(_) => Err(Error::Config(format!(
                "{} is an NBD export: it can only be read",
                self.path.display()
            ))),
        }
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
        let sparse = may_have_holes(&file, kind, size);
        Ok(Volume {
            path: path.to_owned(),
            what,
            backend: Backend::File(file),
            size,
            sparse,
            kind,
            limit: 0,
            file_writes: std::sync::Mutex::new(()),
            allocated: std::sync::OnceLock::new(),
            dirty_bitmap: None,
            direct: std::sync::OnceLock::new(),
            direct_reads: false,
        })
    }

    /// Bytes `[offset, offset + len)` mapped read-only, for asking the kernel which of them are in the page cache
    /// ([`resident`]: `mincore`) without reading them. Nothing reads through it: scans `pread` into their own
    /// buffers (see `scan::summarize_segment` for why). `None` when the kernel refuses the mapping, and always for
    /// an NBD export.
    pub fn map(&self, offset: u64, len: u64) -> Option<memmap2::Mmap> {
        let Backend::File(file) = &self.backend else {
            return None;
        };
        let len = usize::try_from(len).ok().filter(|l| *l > 0)?;
        let mut options = memmap2::MmapOptions::new();
        options.offset(offset).len(len);
        // SAFETY: the mapping is read-only and private to this process; the source reads a snapshot and the
        // destination holds its target exclusively (see `claim`), so what it maps does not shrink while mapped.
        #[allow(unsafe_code)]
        unsafe { options.map(file) }.ok()
    }

    /// Size in bytes, as it was when this handle was opened (or cloned).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block device or file.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether reads go to an NBD export (each a round trip on its connection) rather than to the kernel.
    pub fn is_export(&self) -> bool {
        matches!(self.backend, Backend::Nbd(_))
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` from `offset` (the caller keeps the range inside the volume).
    ///
    /// On a regular file that had holes when opened, a hole at the start of the range is found with `SEEK_DATA` and
    /// filled with zeros here instead of being read: the kernel would zero a page and copy it for every hole, which
    /// costs more than hashing the data. A fully allocated file is read as is (see `sparse`).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let file = match &self.backend {
            Backend::Nbd(client) => return client.read_at(buf, offset),
            Backend::File(file) => file,
        };
        if self.kind == Kind::File && self.sparse {
            return self.read_sparse_at(file, buf, offset);
        }
        file.read_exact_at(buf, offset)
            .map_err(|source| self.io_err("read", offset, source))
    }

    /// Appends the `len` bytes at `offset` to `buf`, read straight into its spare capacity: no zero-filling of a
    /// buffer that the read overwrites anyway (a few percent of the source's CPU on a full sync). Holes of a
    /// sparse file read back as zeros, as from any read.
    pub fn read_append(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> Result<()> {
        let want = buf.len() + len;
        let file = match &self.backend {
            Backend::Nbd(client) => {
                buf.resize(want, 0);
                return client.read_at(&mut buf[want - len..], offset);
            }
            Backend::File(file) => file,
        };
        buf.reserve_exact(len);
        let mut pos = offset;
        while buf.len() < want {
            match rustix::io::pread(file, rustix::buffer::spare_capacity(buf), pos) {
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

    /// Whether `[offset, offset + len)` lies outside the allocation map (false without one): it reads as zeros
    /// without being read.
    pub fn outside_allocation(&self, offset: u64, len: u64) -> bool {
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
        let Backend::File(file) = &self.backend else {
            return false;
        };
        if self.kind != Kind::File || !self.sparse {
            return false;
        }
        match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
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
    fn read_sparse_at(&self, file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let data = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(d) => d.clamp(offset, end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => return Err(self.io_err("seek", offset, e.into())),
        };
        let at = (data - offset) as usize;
        buf[..at].fill(0);
        if data < end {
            file.read_exact_at(&mut buf[at..], data)
                .map_err(|source| self.io_err("read", data, source))?;
        }
        Ok(())
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

/// Whether a regular file may have holes: fewer 512-byte blocks allocated than its size needs (a file system that
/// cannot tell is taken to have them).
fn may_have_holes(file: &File, kind: Kind, size: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    kind == Kind::File
        && file
            .metadata()
            .map_or(true, |m| m.blocks().saturating_mul(512) < size)
}

fn open_error(what: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Open {
        what,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
