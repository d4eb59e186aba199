//! With `--cold`: each side's stateless scan rate next to the rate `dd iflag=direct bs=1M` reads the same file,
//! both measured in this run, so the target (a cold scan at 80 % of dd's rate or more) is read off one run.
//!
//! The scan is the agents' own (`scan::scan`, shared by the source's volume scan and the destination's target
//! scan), run here in-process over the whole file after evicting it; dd's rate is its equivalent, sequential
//! 1 MiB `O_DIRECT` reads on one thread, after evicting it again.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::cache;
use blockmover::chunk::Geometry;
use blockmover::scan::scan;
use blockmover::volume::{Volume, DIRECT_ALIGN};

/// One side's cold scan against dd's direct read of the same file.
#[derive(Debug, Clone, Serialize)]
pub struct ColdScan {
    /// "source volume" or "destination target".
    pub side: String,
    pub bytes: u64,
    /// The scan's rate, bytes per second.
    pub scan_bytes_per_sec: f64,
    /// `dd iflag=direct bs=1M`'s rate on the same file (none where `O_DIRECT` is refused).
    pub dd_direct_bytes_per_sec: Option<f64>,
}

impl ColdScan {
    /// The scan's rate as a share of dd's.
    pub fn ratio(&self) -> Option<f64> {
        self.dd_direct_bytes_per_sec
            .map(|dd| self.scan_bytes_per_sec / dd)
    }
}

/// Measures `path` cold: dd's direct rate first, then the scan's, each after an eviction.
pub fn measure(side: &str, path: &Path) -> anyhow::Result<ColdScan> {
    let mut volume = Volume::open_source(path)?;
    volume.set_direct_reads(true);
    let size = volume.size();
    cache::evict(path)?;
    let dd = dd_direct(&volume)?;
    cache::evict(path)?;
    let geometry = Geometry::new(size, 65536).map_err(anyhow::Error::msg)?;
    let start = Instant::now();
    scan(
        Arc::new(volume),
        geometry,
        Arc::new(AtomicU64::new(0)),
        |_, _| Ok(()),
    )
    .with_context(|| format!("cannot scan {}", path.display()))?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(ColdScan {
        side: side.to_owned(),
        bytes: size,
        scan_bytes_per_sec: size as f64 / secs,
        dd_direct_bytes_per_sec: dd,
    })
}

/// Sequential 1 MiB `O_DIRECT` reads of the whole volume on one thread, as `dd iflag=direct bs=1M` does.
fn dd_direct(volume: &Volume) -> anyhow::Result<Option<f64>> {
    const BS: u64 = 1 << 20;
    let mut buf = memmap2::MmapMut::map_anon(BS as usize)?;
    let size = volume.size();
    let start = Instant::now();
    let mut at = 0;
    while at < size {
        let len = BS.min(size - at);
        debug_assert!(len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN <= BS);
        match volume.read_direct(&mut buf, len as usize, at) {
            None => return Ok(None),
            Some(r) => r?,
        }
        at += len;
    }
    Ok(Some(size as f64 / start.elapsed().as_secs_f64().max(1e-9)))
}
