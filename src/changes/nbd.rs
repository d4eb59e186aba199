//! Change lists and allocation maps from an NBD export's metadata contexts (QEMU backup pull mode, qemu-nbd `-B`,
//! qemu-storage-daemon `nbd-server-add ... bitmaps`): `qemu:dirty-bitmap:NAME` (bit 0 = dirty) for
//! [`Tracker::changed`], `base:allocation` (`NBD_STATE_HOLE` = bit 0, `NBD_STATE_ZERO` = bit 1) for
//! [`Tracker::allocated`].
//!
//! Trust: the bitmap must cover every write since the image of the source's last successful sync (its manifest).
//! blockmover cannot check that: a bitmap created after that sync, disabled for a while, or cleared by another
//! backup misses writes, and what it misses is neither read nor compared nor sent (a lying change list, bounded
//! by `--verify-every`). A bitmap that the server does not export, or a block status that fails, is an
//! [`Error::Tracker`]: the sync falls back to a full comparison. `base:allocation` is trusted as the storage's
//! own statement that the ranges it marks as holes or zeros read as zeros.

use std::sync::Arc;

use super::{ChangedChunks, Tracker};
use crate::chunk::{Digest, Geometry};
use crate::error::{Error, Result};
use crate::nbd::{self, Client};

/// The most extents taken from one walk of an export (16 bytes each: 64 MiB).
const MAX_EXTENTS: usize = 4 << 20;
/// The most bytes asked for in one block status request (aligned to any minimum block size).
const MAX_STATUS_REQUEST: u64 = 1 << 30;

/// The tracker of an NBD export: its dirty bitmap (if one was asked for) and its allocation status.
#[derive(Debug)]
pub struct NbdTracker {
    client: Arc<Client>,
    bitmap: Option<String>,
}

impl NbdTracker {
    /// The tracker of `client`'s export; `bitmap` is the `--dirty-bitmap` name, if any.
    pub fn new(client: Arc<Client>, bitmap: Option<String>) -> Self {
        NbdTracker { client, bitmap }
    }

    /// The dirty bitmap asked for, if any (without one, only [`Tracker::allocated`] answers).
    pub fn bitmap(&self) -> Option<&str> {
        self.bitmap.as_deref()
    }

    /// The byte extents of context `context` whose status `keep` accepts, over the whole export, merged.
    fn walk(&self, context: u32, keep: impl Fn(u32) -> bool) -> Result<Vec<(u64, u64)>> {
        let size = self.client.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let (mut offset, mut seen) = (0u64, 0usize);
        while offset < size {
            let ask = (size - offset).min(MAX_STATUS_REQUEST) as u32;
            let extents = self.client.block_status(context, offset, ask)?;
            for e in extents {
                if offset >= size {
                    break; // the last extent may run past the request: only the export counts
                }
                let len = u64::from(e.length).min(size - offset);
                if keep(e.flags) {
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == offset => last.1 += len,
                        _ => out.push((offset, len)),
                    }
                }
                offset += len;
                seen += 1;
                if seen > MAX_EXTENTS {
                    return Err(self.failed(format!("more than {MAX_EXTENTS} extents")));
                }
            }
        }
        Ok(out)
    }

    fn failed(&self, reason: String) -> Error {
        Error::Tracker {
            tracker: self.describe(),
            reason,
        }
    }
}

impl Tracker for NbdTracker {
    fn describe(&self) -> String {
        match &self.bitmap {
            Some(b) => format!("nbd dirty bitmap {b} of {}", self.client.address()),
            None => format!("nbd base:allocation of {}", self.client.address()),
        }
    }

    fn changed(&self, geometry: Geometry, _base: &Digest) -> Result<ChangedChunks> {
        let Some(bitmap) = &self.bitmap else {
            return Err(self.failed("no dirty bitmap was asked for (--dirty-bitmap)".into()));
        };
        let name = format!("{}{bitmap}", nbd::DIRTY_BITMAP_PREFIX);
        let Some(context) = self.client.export().context(&name) else {
            return Err(self.failed(format!(
                "the export does not offer dirty bitmap {bitmap} (NBD_OPT_SET_META_CONTEXT did not return {name})"
            )));
        };
        if geometry.volume_size() != self.client.size() {
            return Err(self.failed(format!(
                "the export has {} bytes, the volume {}",
                self.client.size(),
                geometry.volume_size()
            )));
        }
        let dirty = self
            .walk(context, |flags| flags & nbd::STATE_DIRTY != 0)
            .map_err(|e| match e {
                Error::Tracker { .. } => e,
                other => self.failed(format!("block status failed: {other}")),
            })?;
        let bytes: u64 = dirty.iter().map(|(_, l)| l).sum();
        tracing::info!(
            "{}: {} dirty extents, {bytes} bytes",
            self.describe(),
            dirty.len()
        );
        ChangedChunks::from_extents(&dirty, geometry).map_err(|e| self.failed(e.0))
    }

    fn allocated(&self, geometry: Geometry) -> Result<Option<Vec<(u64, u64)>>> {
        let Some(context) = self.client.export().context(nbd::BASE_ALLOCATION) else {
            return Ok(None);
        };
        if geometry.volume_size() != self.client.size() {
            return Ok(None);
        }
        let data = self.walk(context, |flags| {
            flags & (nbd::STATE_HOLE | nbd::STATE_ZERO) == 0
        })?;
        Ok(Some(data))
    }
}
