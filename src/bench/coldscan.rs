//! With `--cold`: each side's stateless scan rate next to the rate `dd iflag=direct bs=1M` reads the same file,
//! both measured in this run, so the target (a cold scan at 80 % of dd's rate or more) is read off one run.
//!
//! The scan is the agents' own (`scan::scan`, shared by the source's volume scan and the destination's target
//! scan), run here in-process over the whole file after evicting it, twice: as the agents scan by default (the
//! page cache, mapped, with the kernel's readahead) and as with `--direct-reads` (1 MiB `O_DIRECT` reads of cold
//! segments); dd's rate is its equivalent, sequential 1 MiB `O_DIRECT` reads on one thread, after evicting it
//! again.
//!
//! [`both_at_once`] is a reference for a cold sync in this bench: both agents read their whole file at once, and
//! here the volume and the target live on one disk, so the two scans share its rate (in a real deployment each side
//! reads its own storage). It is not a floor: on this machine's virtual disk, reads through the page cache with the
//! kernel's readahead can get more from the disk than two sequential 1 MiB `O_DIRECT` readers do.

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
    /// The scan's rate as the agents scan by default (through the page cache), bytes per second.
    pub scan_bytes_per_sec: f64,
    /// The scan's rate with `--direct-reads` (none where `O_DIRECT` is refused).
    pub direct_scan_bytes_per_sec: Option<f64>,
    /// `dd iflag=direct bs=1M`'s rate on the same file (none where `O_DIRECT` is refused).
    pub dd_direct_bytes_per_sec: Option<f64>,
}

impl ColdScan {
    /// The default scan's rate as a share of dd's.
    pub fn ratio(&self) -> Option<f64> {
        self.dd_direct_bytes_per_sec
            .map(|dd| self.scan_bytes_per_sec / dd)
    }

    /// The `--direct-reads` scan's rate as a share of dd's.
    pub fn direct_ratio(&self) -> Option<f64> {
        Some(self.direct_scan_bytes_per_sec? / self.dd_direct_bytes_per_sec?)
    }
}

/// A reference for a cold sync of `volume` into `target` when both are on one disk: seconds two dd-like sequential
/// `O_DIRECT` readers, one per file, on two threads, take to read both whole after evicting them (best of
/// [`ROUNDS`]). `None` where `O_DIRECT` is refused.
pub fn both_at_once(volume: &Path, target: &Path) -> anyhow::Result<Option<ColdReference>> {
    let (v, t) = (Volume::open_source(volume)?, Volume::open_source(target)?);
    let mut best = None::<f64>;
    for _ in 0..ROUNDS {
        cache::evict(volume)?;
        cache::evict(target)?;
        let start = Instant::now();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| dd_direct(&v));
            let b = dd_direct(&t);
            (a.join(), b)
        });
        let a =
            a.map_err(|_| anyhow::anyhow!("the direct reader of {} panicked", volume.display()))?;
        if a?.is_none() || b?.is_none() {
            return Ok(None);
        }
        let secs = start.elapsed().as_secs_f64();
        best = Some(best.map_or(secs, |b| b.min(secs)));
    }
    Ok(best.map(|secs| ColdReference {
        bytes: v.size() + t.size(),
        secs,
    }))
}

/// Both files of a cold sync read at once with `O_DIRECT` ([`both_at_once`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ColdReference {
    /// The volume's and the target's sizes together.
    pub bytes: u64,
    pub secs: f64,
}

/// Rounds of the three reads: this machine's disk changes its rate from minute to minute (dd read the same file at
/// 1.0 GiB/s and at 2.2 GiB/s in one session), so the three alternate and each keeps its best round.
const ROUNDS: usize = 2;

/// Measures `path` cold: dd's direct rate, the default scan's and the direct scan's, alternated [`ROUNDS`] times,
/// each after an eviction; the best of each.
pub fn measure(side: &str, path: &Path) -> anyhow::Result<ColdScan> {
    let volume = Volume::open_source(path)?;
    let size = volume.size();
    let (mut dd, mut buffered, mut direct) = (None::<f64>, f64::MAX, None::<f64>);
    for _ in 0..ROUNDS {
        cache::evict(path)?;
        let Some(rate) = dd_direct(&volume)? else {
            break;
        };
        dd = Some(dd.map_or(rate, |d| d.max(rate)));
        buffered = buffered.min(timed_scan(path, false)?);
        let secs = timed_scan(path, true)?;
        direct = Some(direct.map_or(secs, |d| d.min(secs)));
    }
    if dd.is_none() {
        buffered = timed_scan(path, false)?;
    }
    Ok(ColdScan {
        side: side.to_owned(),
        bytes: size,
        scan_bytes_per_sec: size as f64 / buffered,
        direct_scan_bytes_per_sec: direct.map(|secs| size as f64 / secs),
        dd_direct_bytes_per_sec: dd,
    })
}

/// Seconds one scan of `path` takes after evicting it, with or without direct reads.
fn timed_scan(path: &Path, direct: bool) -> anyhow::Result<f64> {
    let mut volume = Volume::open_source(path)?;
    volume.set_direct_reads(direct);
    let geometry = Geometry::new(volume.size(), 65536).map_err(anyhow::Error::msg)?;
    cache::evict(path)?;
    let start = Instant::now();
    scan(
        Arc::new(volume),
        geometry,
        Arc::new(AtomicU64::new(0)),
        |_, _| Ok(()),
    )
    .with_context(|| format!("cannot scan {}", path.display()))?;
    Ok(start.elapsed().as_secs_f64().max(1e-9))
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
