//! Cold reads: `O_DIRECT` reads of what is not in the page cache, so a cold scan neither fills nor thrashes it.
//!
//! A scan maps each segment; [`resident`] (`mincore`) tells whether the map's pages are all cached. The ones
//! that are hash in place from the map; the others are read with [`Volume::read_direct`] into aligned, reused
//! buffers, large reads on every worker of the scan's pool. Where `O_DIRECT` is refused (tmpfs: `EINVAL` at open
//! or at the first read), `read_direct` answers `None` and the scan reads through the map as before.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use super::{Backend, Volume};
use crate::error::Result;

/// `O_DIRECT` alignment asked of offsets, lengths and buffers (the largest logical block size in use).
pub const DIRECT_ALIGN: u64 = 4096;

impl Volume {
    /// Lets scans read the segments that are not in the page cache with `O_DIRECT` (see `scan`).
    pub fn set_direct_reads(&mut self, on: bool) {
        self.direct_reads = on;
    }

    /// Whether scans may read cold segments with `O_DIRECT`.
    pub fn direct_reads(&self) -> bool {
        self.direct_reads
    }

    /// The `O_DIRECT` handle, opened on first use; `None` when refused or for an NBD export.
    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                let Backend::File(_) = &self.backend else {
                    return None;
                };
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&self.path)
                    .ok()
            })
            .as_ref()
    }

    /// With direct reads on: asks the kernel to start reading `ranges` (byte `(offset, length)`) into the page
    /// cache now (`posix_fadvise(WILLNEED)`), so that the positional reads that follow find them there. A direct
    /// scan leaves the cache cold, and the chunks a sync reads again (a NEED's chunk on the source, a changed
    /// chunk's blocks on the destination) would otherwise be read one by one, each a round trip to the storage.
    /// Does nothing without direct reads (a buffered scan left them cached), for an NBD export, or where the
    /// kernel refuses.
    pub fn will_need(&self, ranges: impl IntoIterator<Item = (u64, u64)>) {
        if self.direct_reads {
            self.prefetch(ranges);
        }
    }

    /// Asks the kernel to start reading `ranges` (byte `(offset, length)`) into the page cache now
    /// (`posix_fadvise(WILLNEED)`), whatever the read mode, so that the positional reads that follow find them
    /// there: the storage gets every range at once instead of one read per reader thread. Only a hint: does
    /// nothing for an NBD export, or where the kernel refuses.
    pub fn prefetch(&self, ranges: impl IntoIterator<Item = (u64, u64)>) {
        let Backend::File(file) = &self.backend else {
            return;
        };
        for (offset, len) in ranges {
            if let Some(len) = std::num::NonZeroU64::new(len) {
                let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::WillNeed);
            }
        }
    }

    /// Tells the kernel the volume is about to be read at scattered places (`posix_fadvise(RANDOM)`: no
    /// readahead), as a delta by change list reads it: readahead would add 16 KiB or more to each cold 4 KiB block
    /// read (2 GiB allocated, 1 % changed, evicted: 33-35 MiB read from the disk for 20.4 MiB of listed blocks;
    /// 24 MiB with this). [`Volume::advise_sequential`] undoes it. Does nothing for an NBD export.
    pub fn advise_random(&self) {
        if let Backend::File(file) = &self.backend {
            let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random);
        }
    }

    /// Tells the kernel the volume is about to be read in order (`posix_fadvise(SEQUENTIAL)`: a larger readahead
    /// window). A scan reads its chunks with positional reads from several workers, which the kernel's readahead
    /// no longer saw as one stream once the scan stopped mapping its segments with `MADV_SEQUENTIAL`. Does
    /// nothing for an NBD export, or where the kernel refuses.
    pub fn advise_sequential(&self) {
        if let Backend::File(file) = &self.backend {
            let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
        }
    }

    /// Reads `len` bytes at `offset` into `buf[..len]`, bypassing the page cache. `buf` must be page-aligned
    /// with room for `len` rounded up to [`DIRECT_ALIGN`] (the volume may end unaligned) and `offset` a multiple of
    /// [`DIRECT_ALIGN`]. `None`: `O_DIRECT` is not available here (or the request is not aligned): read another way.
    pub fn read_direct(&self, buf: &mut [u8], len: usize, offset: u64) -> Option<Result<()>> {
        let aligned = (len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        if !offset.is_multiple_of(DIRECT_ALIGN)
            || !(buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize)
            || aligned > buf.len() as u64
        {
            return None;
        }
        let file = self.direct_file()?;
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            if !(done as u64).is_multiple_of(DIRECT_ALIGN) {
                // A short unaligned read before the end: finish through the page cache.
                return Some(
                    file.read_exact_at(&mut buf[done..len], at)
                        .map_err(|e| self.io_err("read", at, e)),
                );
            }
            match file.read_at(&mut buf[done..aligned as usize], at) {
                Ok(0) => {
                    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Some(Err(self.io_err("read", at, eof)));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Opened, but the file system refuses direct reads.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done == 0 => return None,
                Err(e) => return Some(Err(self.io_err("read", at, e))),
            }
        }
        Some(Ok(()))
    }
}

/// Whether every page of `map` is in the page cache (`mincore`); false if the kernel cannot tell.
pub fn resident(map: &[u8]) -> bool {
    // x86-64 and most arm64 kernels: 4 KiB pages (a larger page only makes this answer false: read direct).
    let page = DIRECT_ALIGN as usize;
    if map.is_empty() || !(map.as_ptr() as usize).is_multiple_of(page) {
        return false;
    }
    let mut pages = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes at a page-aligned address, and `pages` has one byte
    // per page of it, which is what mincore writes.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            pages.as_mut_ptr(),
        )
    };
    rc == 0 && pages.iter().all(|p| p & 1 == 1)
}
