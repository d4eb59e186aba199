//! Syncs between real block devices (loop devices), when this process may create them.
//!
//! Needs root and a working `losetup`; otherwise the test prints
//! `skipped: loop devices unavailable (<reason>)` and passes. Devices are always detached by a
//! drop guard, also when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use blockmover::sample::{self, Region, SampleSpec, BLOCK, REGION};

use crate::common::{
    expect_successful, external_u64, read_status, run_source, sparse_file, Destination,
    AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;
const SEED: u64 = 0x100b_0001;

/// An attached loop device, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// `losetup --find --show FILE`.
    fn attach(file: &Path) -> Result<LoopDevice> {
        LoopDevice::attach_with(file, &[])
    }

    /// `losetup --find --show [extra] FILE`, e.g. `--read-only`.
    fn attach_with(file: &Path, extra: &[&str]) -> Result<LoopDevice> {
        let output = Command::new("losetup")
            .args(extra)
            .arg("--find")
            .arg("--show")
            .arg(file)
            .output()
            .context("run losetup")?;
        if !output.status.success() {
            bail!(
                "losetup --find --show failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if !path.starts_with("/dev") {
            bail!("losetup printed no device: {path:?}");
        }
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.path).status() {
            Ok(status) if status.success() => {}
            other => eprintln!(
                "warning: losetup -d {} failed: {other:?}",
                self.path.display()
            ),
        }
    }
}

/// Why loop devices cannot be used here, if they cannot.
fn unavailable_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some(format!("not root (euid {})", euid.unwrap_or("unknown")));
    }
    match Command::new("losetup").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "losetup --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("losetup not runnable: {e}")),
    }
}

/// One sync from `volume` to `target`, both agents must exit 0.
fn sync(volume: &Path, target: &Path, psk: &Path, dir: &Path) -> Result<()> {
    let mut destination = Destination::spawn(target, psk, &dir.join("destination.json"), &[])?;
    let source = run_source(destination.addr, volume, psk, &dir.join("source.json"))?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    assert!(
        source.status.success(),
        "source failed:\n{}",
        String::from_utf8_lossy(&source.stderr)
    );
    assert!(
        finished.status.success(),
        "destination failed:\n{}",
        finished.stderr
    );
    expect_successful(&dir.join("source.json"), Kind::Source)?;
    expect_successful(&dir.join("destination.json"), Kind::Destination)?;
    Ok(())
}

#[test]
fn loop_device_full_and_incremental_sync_converge() -> Result<()> {
    if let Some(reason) = unavailable_reason() {
        println!("skipped: loop devices unavailable ({reason})");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (volume_file, target_file) = (
        dir.path().join("volume.backing"),
        dir.path().join("target.backing"),
    );
    sparse_file(&volume_file, SIZE)?;
    sparse_file(&target_file, SIZE)?;
    let volume = match LoopDevice::attach(&volume_file) {
        Ok(device) => device,
        Err(e) => {
            println!("skipped: loop devices unavailable ({e:#})");
            return Ok(());
        }
    };
    let target = LoopDevice::attach(&target_file)?;
    let psk = crate::common::keygen(dir.path())?;

    // The target holds random data everywhere, so zero regions of the volume must be written.
    let noise = SampleSpec {
        size: SIZE,
        zero_share: 0.0,
        text_share: 0.0,
        random_share: 1.0,
        seed: SEED,
    };
    sample::write_sample_volume(&target.path, &noise)?;
    let spec = SampleSpec::mixed(SIZE, SEED + 1);
    sample::write_sample_volume(&volume.path, &spec)?;
    let zero_region = sample::region_layout(&spec)?
        .iter()
        .position(|&r| r == Region::Zero)
        .context("mixed sample has a zero region")? as u64;

    sync(&volume.path, &target.path, &psk, dir.path())?;
    assert_eq!(
        sample::file_digest(&target.path, SIZE)?,
        sample::file_digest(&volume.path, SIZE)?
    );
    let region = read_range(&target.path, zero_region * REGION, REGION)?;
    assert!(
        region.iter().all(|&b| b == 0),
        "zero region {zero_region} of the target is not zero"
    );

    let change = sample::scattered_change(&volume.path, SIZE, 0.01, SEED + 2)?;
    sync(&volume.path, &target.path, &psk, dir.path())?;
    assert_eq!(
        sample::file_digest(&target.path, SIZE)?,
        sample::file_digest(&volume.path, SIZE)?
    );
    let status = read_status(&dir.path().join("destination.json"))?;
    assert_eq!(
        external_u64(&status, "blocksSent")?,
        change.blocks.len() as u64
    );
    assert_eq!(
        external_u64(&status, "dataBytes")?,
        change.blocks.len() as u64 * BLOCK
    );
    Ok(())
}

fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// A read-only target device is refused at start-up, before the destination listens: exit 1 naming the target and
/// why, no status claiming anything, the device untouched.
#[test]
fn read_only_target_device_is_refused_at_start_up_and_nothing_is_reported_synced() -> Result<()> {
    if let Some(reason) = unavailable_reason() {
        println!("skipped: loop devices unavailable ({reason})");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let target_file = dir.path().join("target.img");
    sparse_file(&target_file, 8 * MIB)?;
    let before = sample::file_digest(&target_file, 8 * MIB)?;
    let target = LoopDevice::attach_with(&target_file, &["--read-only"])?;
    let psk = crate::common::keygen(dir.path())?;
    let status = dir.path().join("destination.json");
    let out = std::process::Command::new(crate::common::bin())
        .args(["destination", "--listen", "127.0.0.1:0", "--target"])
        .arg(&target.path)
        .arg("--psk")
        .arg(&psk)
        .arg("--status")
        .arg(&status)
        .stdin(std::process::Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = crate::common::expect_failure("destination", out.status, &stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a read-only target is permanent"
    );
    assert!(
        stderr.contains("cannot open target") && stderr.contains("read-only"),
        "the error names the target and why: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "refused before listening"
    );
    if status.exists() {
        let doc = crate::common::read_status(&status)?;
        assert_ne!(crate::common::result_of(&doc), "Successful", "{doc}");
        assert!(doc.get("lastSyncTime").is_none(), "never synced: {doc}");
    }
    drop(target);
    assert_eq!(sample::file_digest(&target_file, 8 * MIB)?, before);
    Ok(())
}
