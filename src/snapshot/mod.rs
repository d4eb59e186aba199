//! The point-in-time copy the source reads, and the hooks that quiesce the workload around taking it.
//!
//! - [`Method::None`]: the volume given is already a point-in-time copy (a CSI snapshot's clone at `/dev/block`
//!   in a mover pod, an NBD export of a QEMU backup job) and is read as it is. Without a copy, a live volume is not
//!   even crash-consistent: each chunk is read at another moment.
//! - [`Method::Reflink`]: a file volume on a reflink filesystem (XFS, btrfs) is cloned with `FICLONE` to a hidden
//!   file beside it (an atomic copy-on-write copy of the whole file, taking no data space until the volume is
//!   written), the clone is synced and removed, whatever the outcome. With a state directory the clone of the last
//!   successful sync is kept (`.NAME.blockmover-base.DIGEST`, named after the volume digest of that image, so that
//!   it pairs with the source's manifest), and the extent maps of the kept clone and the new one tell which ranges
//!   changed ([`fiemap`]) without reading any data: a change list from the filesystem itself.
//!
//! Hooks ([`Hooks`]) run around taking the copy.

mod fiemap;
mod hooks;
mod reflink;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use hooks::Hooks;
pub use reflink::ReflinkExtents;

use crate::changes::Tracker;
use crate::chunk::Digest;
use crate::error::Result;

/// How the source takes its point-in-time copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// The volume is read as it is.
    #[default]
    None,
    /// A reflink clone of a file volume.
    Reflink,
}

/// `--snapshot`, the hooks, and whether the copy of a successful sync is kept for the next one's change list.
#[derive(Clone, Debug, Default)]
pub struct SnapshotConfig {
    /// How the copy is taken.
    pub method: Method,
    /// What runs around taking it.
    pub hooks: Hooks,
    /// Keep the last synced clone (with a state directory) to derive the next change list from it.
    pub keep_base: bool,
}

/// A point-in-time copy being synced.
#[derive(Debug)]
pub struct Snapshot {
    /// What the sync reads.
    path: PathBuf,
    clone: Option<reflink::Clone>,
}

impl Snapshot {
    /// Takes the copy of `volume` (running the hooks around it).
    pub fn take(config: &SnapshotConfig, volume: &Path) -> Result<Snapshot> {
        match config.method {
            Method::None => Ok(Snapshot {
                path: volume.to_owned(),
                clone: None,
            }),
            Method::Reflink => {
                let clone = config
                    .hooks
                    .around(volume, || reflink::Clone::take(volume, config.keep_base))?;
                Ok(Snapshot {
                    path: clone.path().to_owned(),
                    clone: Some(clone),
                })
            }
        }
    }

    /// What the sync reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The change list this copy gives against the kept copy of the last sync, if it keeps one.
    pub fn tracker(&self) -> Option<Arc<dyn Tracker>> {
        self.clone
            .as_ref()
            .and_then(|c| c.tracker())
            .map(|t| Arc::new(t) as Arc<dyn Tracker>)
    }

    /// Ends the copy: kept as the base of the next sync when `synced` (the volume digest both sides agreed on)
    /// and the configuration keeps one, else removed.
    pub fn finish(mut self, synced: Option<&Digest>) {
        if let Some(clone) = self.clone.take() {
            clone.finish(synced);
        }
    }
}
