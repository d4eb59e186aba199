//! The bench's files outside the timed part: making targets, fsyncing what was written, checking a target against
//! the volume, sizes and kinds of files and devices.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::{bail, ensure, Context};

use blockmover::sample;

use super::report::SyncKind;

/// fsyncs a file written outside the timed part, so that its writeback does not land in a timed sync: the target's
/// final fsync would otherwise flush the whole restored copy, and a volume just generated or changed would be
/// written back while the first tool syncs it. Read-only, so a given snapshot device works too.
pub fn durable(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", path.display()))
}

/// Fails loudly unless the first `size` bytes of `target` hash like the volume.
pub fn verify(
    tool: &str,
    kind: SyncKind,
    target: &Path,
    size: u64,
    digest: &blake3::Hash,
) -> anyhow::Result<()> {
    let got = sample::file_digest(target, size)
        .with_context(|| format!("cannot read {}", target.display()))?;
    if got != *digest {
        bail!(
            "after the {} sync by {tool}, {} differs from the volume (BLAKE3 {} != {})",
            kind.name(),
            target.display(),
            got.to_hex(),
            digest.to_hex()
        );
    }
    Ok(())
}

/// Sets a regular file's mtime one second ahead of now, so that it differs in whole seconds from every file
/// written before: rsync's quick check skips a file whose size and mtime (to the second) equal the target's, and
/// so misses a change made within the same second as the previous sync.
pub fn stamp_mtime(volume: &Path) -> anyhow::Result<()> {
    if is_block_device(volume)? {
        return Ok(());
    }
    let ahead = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
    std::fs::File::options()
        .write(true)
        .open(volume)
        .and_then(|f| f.set_modified(ahead))
        .with_context(|| format!("cannot set the mtime of {}", volume.display()))
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn is_block_device(path: &Path) -> anyhow::Result<bool> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(meta.file_type().is_block_device())
}

/// The size of a regular file or block device.
pub fn device_or_file_size(path: &Path) -> anyhow::Result<u64> {
    use std::io::Seek;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(file.seek(std::io::SeekFrom::End(0))?)
}

/// Makes a regular-file target (existing or not) an all-zero sparse file of `size` bytes, for a full sync; leaves
/// a block device as it is (its first sync is then a "first" one) after checking that it is large enough.
pub fn prepare_target(target: &Path, size: u64) -> anyhow::Result<SyncKind> {
    if target.exists() && is_block_device(target)? {
        let capacity = device_or_file_size(target)?;
        ensure!(
            capacity >= size,
            "target {} holds {} bytes, the volume {size}",
            target.display(),
            capacity
        );
        return Ok(SyncKind::First);
    }
    let file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    file.set_len(size)?;
    Ok(SyncKind::Full)
}
