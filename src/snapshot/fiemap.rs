//! What two reflinked files still share, from their extent maps (`FS_IOC_FIEMAP`), without reading their data.
//!
//! A clone made with `FICLONE` maps the same physical blocks as its origin. A write to either afterwards is
//! copied on write: the written range of that file moves to new blocks. So between the clone of the last synced
//! image (the base) and a clone of the volume now, a byte range whose two maps point at the same physical bytes
//! holds the same data in both; every other range may differ. What is trusted: the filesystem's extent map (XFS,
//! btrfs), and that nothing rewrote the kept base in place without copy on write. What is refused as "may
//! differ": extents whose flags say their physical address means nothing (unknown, delayed allocation, encoded,
//! inline, tail-packed, not aligned), a hole facing an extent, and any range whose addresses differ.

use std::fs::File;
use std::os::fd::AsRawFd;

/// One extent of a file's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Address on the device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// `FIEMAP_EXTENT_LAST`: no extent after this one.
const LAST: u32 = 0x1;
/// Flags under which `physical` cannot be compared: unknown location, delayed allocation, encoded, encrypted,
/// not aligned, inline, tail-packed.
const NO_ADDRESS: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;
/// `FIEMAP_FLAG_SYNC`: write dirty pages back first, so that delayed allocations have addresses.
const FLAG_SYNC: u32 = 0x1;
/// Extents asked for per call.
const BATCH: usize = 512;
/// `_IOWR('f', 11, struct fiemap)`, the header being 32 bytes.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct RawMap {
    start: u64,
    length: u64,
    flags: u32,
    mapped: u32,
    count: u32,
    reserved: u32,
    extents: [RawExtent; BATCH],
}

/// The extent map of `file` over `[0, len)`, in order.
pub fn extents(file: &File, len: u64) -> std::io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    while start < len {
        let mut map = Box::new(RawMap {
            start,
            length: len - start,
            flags: FLAG_SYNC,
            mapped: 0,
            count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        });
        // SAFETY: `map` is a valid, writable `struct fiemap` with room for `count` extents, as the ioctl expects;
        // the kernel writes no more than `count` extents into it.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP as _,
                &mut *map as *mut RawMap,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mapped = (map.mapped as usize).min(BATCH);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for e in &map.extents[..mapped] {
            out.push(Extent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                flags: e.flags,
            });
            last |= e.flags & LAST != 0;
        }
        let end = out.last().map_or(len, |e| e.logical + e.length);
        if last || end <= start {
            break;
        }
        start = end;
    }
    Ok(out)
}

/// Byte ranges `(offset, length)` of `[0, len)` where `base` and `now` may hold different data: everything but
/// holes in both and ranges both map to the same physical bytes.
pub fn differing(base: &[Extent], now: &[Extent], len: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut a, mut b) = (Cursor::new(base), Cursor::new(now));
    let mut pos = 0;
    while pos < len {
        let (ea, next_a) = a.at(pos);
        let (eb, next_b) = b.at(pos);
        let end = next_a.min(next_b).min(len);
        let same = match (ea, eb) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                x.flags & NO_ADDRESS == 0
                    && y.flags & NO_ADDRESS == 0
                    && x.physical.checked_add(pos - x.logical)
                        == y.physical.checked_add(pos - y.logical)
            }
            _ => false,
        };
        if !same {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == pos => last.1 += end - pos,
                _ => out.push((pos, end - pos)),
            }
        }
        pos = end;
    }
    out
}

/// Walks a sorted extent list by offset.
struct Cursor<'a> {
    extents: &'a [Extent],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn new(extents: &'a [Extent]) -> Self {
        Cursor { extents, i: 0 }
    }

    /// The extent holding `pos` (if any) and the next offset where that answer changes.
    fn at(&mut self, pos: u64) -> (Option<&'a Extent>, u64) {
        while self
            .extents
            .get(self.i)
            .is_some_and(|e| e.logical + e.length <= pos)
        {
            self.i += 1;
        }
        match self.extents.get(self.i) {
            Some(e) if e.logical <= pos => (Some(e), e.logical + e.length),
            Some(e) => (None, e.logical),
            None => (None, u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    #[test]
    fn shared_ranges_are_equal_and_everything_else_differs() {
        let base = [e(0, 1000, 100), e(200, 5000, 100)];
        // 0..40 shared, 40..60 rewritten, 60..100 shared (split extent), 100..150 new data in a hole, 200..300
        // shared but found at an offset that does not line up in its second half.
        let now = [
            e(0, 1000, 40),
            e(40, 9000, 20),
            e(60, 1060, 40),
            e(100, 7000, 50),
            e(200, 5000, 50),
            e(250, 5060, 50),
        ];
        assert_eq!(
            differing(&base, &now, 400),
            vec![(40, 20), (100, 50), (250, 50)]
        );
        assert_eq!(differing(&base, &base, 400), vec![]);
        assert_eq!(differing(&[], &[], 400), vec![]);
        // A range punched to a hole in the new clone differs (it reads zeros now).
        assert_eq!(differing(&base, &[e(0, 1000, 100)], 400), vec![(200, 100)]);
    }

    #[test]
    fn extents_without_a_comparable_address_always_differ() {
        let mut delalloc = e(0, 0, 100);
        delalloc.flags = 0x4;
        assert_eq!(differing(&[delalloc], &[delalloc], 100), vec![(0, 100)]);
        let mut inline = e(0, 1000, 100);
        inline.flags = 0x200 | LAST;
        assert_eq!(
            differing(&[e(0, 1000, 100)], &[inline], 100),
            vec![(0, 100)]
        );
        // The LAST flag alone is no reason.
        let mut last = e(0, 1000, 100);
        last.flags = LAST;
        assert_eq!(differing(&[e(0, 1000, 100)], &[last], 100), vec![]);
    }

    #[test]
    fn the_length_bounds_the_answer() {
        assert_eq!(differing(&[], &[e(0, 1, 1 << 40)], 4096), vec![(0, 4096)]);
    }
}
