//! The target storage's write rate on this machine: the floor under a full sync, which must make every byte it
//! writes durable.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use rand::{RngCore, SeedableRng};

/// At most this many bytes are written by the probe.
const PROBE: u64 = 1 << 30;
/// At least this many.
const MIN_PROBE: u64 = 64 << 20;
/// In writes of this size.
const WRITE: usize = 1 << 20;

/// How fast buffered writes plus one fsync make data durable where the target lives.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteRate {
    /// Bytes per second, from the first write until the fsync returned.
    pub bytes_per_sec: f64,
    /// Bytes written.
    pub bytes: u64,
    /// The directory the probe file was written in.
    pub dir: String,
}

/// Writes as many incompressible bytes as the volume holds (64 MiB to 1 GiB) to a file in `dir` in 1 MiB writes,
/// fsyncs it, deletes it. That is what a destination does with a full sync's data (buffered writes, fsyncs), so
/// it is what a full sync's duration is bounded by.
pub fn measure(dir: &Path, volume_bytes: u64) -> anyhow::Result<WriteRate> {
    let probe = volume_bytes.clamp(MIN_PROBE, PROBE) as usize / WRITE * WRITE;
    let path = dir.join(".blockmover-bench-storage-probe");
    let mut buf = vec![0u8; WRITE];
    rand_chacha::ChaCha8Rng::seed_from_u64(11).fill_bytes(&mut buf);
    let mut file = std::fs::File::create(&path)?;
    let start = Instant::now();
    let written = (|| -> std::io::Result<()> {
        for i in 0..probe / WRITE {
            // Different bytes in every write, so no layer below can deduplicate them.
            buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
            file.write_all(&buf)?;
        }
        file.sync_all()
    })();
    let elapsed = start.elapsed();
    drop(file);
    let _ = std::fs::remove_file(&path);
    written?;
    Ok(WriteRate {
        bytes_per_sec: probe as f64 / elapsed.as_secs_f64().max(1e-9),
        bytes: probe as u64,
        dir: dir.display().to_string(),
    })
}
