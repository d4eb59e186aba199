//! With `--delta --cold`: the storage's floor under a delta by change list, measured in this run on the bench's own
//! files. A sync of a change must read the changed ranges from the volume and make them durable on the target, so
//! neither can take less here than the storage needs for it: the ranges read from the evicted volume with every one
//! of them asked of the kernel at once (`posix_fadvise(WILLNEED)`, the deepest queue it will build) and read by
//! [`READERS`] threads, then the same bytes written to the evicted target in one `pwrite` per range and made durable
//! with one `fdatasync`. The two are timed apart; a perfect sync would overlap them, so its floor is the larger.
//!
//! The target already holds these bytes (the change's last sync wrote them), so writing them again changes no data;
//! its mtime is put back, so that the next change's delta still finds its manifest current.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::cache;
use super::report::{bytes, trim_float, SyncRow, CHANGELIST};

/// Threads reading the ranges: as deep as the source's deepest default read depth for a file volume needs.
pub const READERS: usize = 16;

/// The storage's floor under one change's delta by change list.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeFloor {
    pub volume_bytes: u64,
    pub change_percent: f64,
    /// Byte ranges of the change list (4 KiB blocks merged where adjacent).
    pub ranges: usize,
    pub bytes: u64,
    /// The ranges read cold from the volume.
    pub read_secs: f64,
    /// The same bytes written to the target and made durable.
    pub write_secs: f64,
}

/// Measures the floor of `extents` (the change list of a `change_percent` change of a `volume_bytes` volume).
pub fn measure(
    volume: &Path,
    target: &Path,
    (volume_bytes, change_percent): (u64, f64),
    extents: &[(u64, u64)],
) -> anyhow::Result<ChangeFloor> {
    cache::evict(volume)?;
    cache::evict(target)?;
    let source = File::open(volume).with_context(|| format!("cannot open {}", volume.display()))?;
    // The reads the source makes: only what is asked, no readahead around it.
    rustix::fs::fadvise(&source, 0, None, rustix::fs::Advice::Random)?;
    let started = Instant::now();
    for &(offset, len) in extents {
        rustix::fs::fadvise(
            &source,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        )?;
    }
    let mut data: Vec<Vec<u8>> = extents
        .iter()
        .map(|&(_, l)| vec![0u8; l as usize])
        .collect();
    std::thread::scope(|s| {
        let per = extents.len().div_ceil(READERS).max(1);
        let workers: Vec<_> = data
            .chunks_mut(per)
            .zip(extents.chunks(per))
            .map(|(bufs, ranges)| {
                let source = &source;
                s.spawn(move || {
                    bufs.iter_mut()
                        .zip(ranges)
                        .try_for_each(|(buf, &(offset, _))| source.read_exact_at(buf, offset))
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| -> anyhow::Result<()> {
            w.join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
            Ok(())
        })
    })
    .with_context(|| format!("cannot read the changed ranges of {}", volume.display()))?;
    let read_secs = started.elapsed().as_secs_f64();

    let mtime = std::fs::metadata(target)?.modified()?;
    let sink = File::options()
        .write(true)
        .open(target)
        .with_context(|| format!("cannot open {}", target.display()))?;
    let started = Instant::now();
    for (buf, &(offset, _)) in data.iter().zip(extents) {
        sink.write_all_at(buf, offset)?;
    }
    sink.sync_data()?;
    let write_secs = started.elapsed().as_secs_f64();
    if !sink.metadata()?.file_type().is_block_device() {
        sink.set_modified(mtime)?;
    }
    Ok(ChangeFloor {
        volume_bytes,
        change_percent,
        ranges: extents.len(),
        bytes: extents.iter().map(|&(_, l)| l).sum(),
        read_secs,
        write_secs,
    })
}

/// One line per floor, with the change-list row of the same volume and change beside it.
pub fn lines(floors: &[ChangeFloor], rows: &[SyncRow]) -> Vec<String> {
    floors
        .iter()
        .map(|f| {
            let row = rows.iter().find(|r| {
                r.tool == CHANGELIST
                    && r.volume_bytes == f.volume_bytes
                    && r.change_percent == Some(f.change_percent)
            });
            let took = row.map_or(String::new(), |r| {
                format!("; {CHANGELIST} took {:.3} s", r.duration_secs)
            });
            format!(
                "{} {}%: {} ranges ({}): read cold {:.3} s, written and fdatasynced {:.3} s{took}",
                bytes(f.volume_bytes),
                trim_float(f.change_percent),
                f.ranges,
                bytes(f.bytes),
                f.read_secs,
                f.write_secs,
            )
        })
        .collect()
}
