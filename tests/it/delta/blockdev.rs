//! A loop device as the target (needs root and `losetup`; otherwise the tests print `skipped: ...` and pass). A
//! block device's manifest identity is its path and device number, and it has no stamp.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use blockmover::sample::file_digest;

use super::{scattered, scribble, sync_files, End, Outcome, MIB, SOURCE_NO_MANIFEST};
use crate::common::{keygen, random_volume, sparse_file};

const SIZE: u64 = 16 * MIB;

/// An attached loop device, detached on drop.
struct Loop {
    path: PathBuf,
}

impl Loop {
    /// `losetup [DEVICE | --find --show] FILE`; None (after printing why) when loop devices cannot be used.
    fn attach(device: Option<&Path>, file: &Path) -> Result<Option<Loop>> {
        Ok(match Loop::try_attach(device, file)? {
            Ok(l) => Some(l),
            Err(why) => {
                println!("skipped: {why}");
                None
            }
        })
    }

    /// `losetup [DEVICE | --find --show] FILE`: the device, or why losetup refused.
    fn try_attach(device: Option<&Path>, file: &Path) -> Result<Result<Loop, String>> {
        let mut cmd = Command::new("losetup");
        match device {
            Some(d) => cmd.arg(d),
            None => cmd.args(["--find", "--show"]),
        };
        let out = match cmd.arg(file).output() {
            Ok(out) => out,
            Err(e) => return Ok(Err(format!("losetup not runnable: {e}"))),
        };
        if !out.status.success() {
            return Ok(Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let path = match device {
            Some(d) => d.to_owned(),
            None => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        };
        if !path.starts_with("/dev") {
            bail!("losetup printed no device: {path:?}");
        }
        Ok(Ok(Loop { path }))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// The files of one source -> loop device pair.
struct Setup {
    dir: tempfile::TempDir,
    psk: PathBuf,
    volume: PathBuf,
    backing: PathBuf,
    sa: String,
    sb: String,
}

impl Setup {
    fn new(seed: u64) -> Result<Setup> {
        let dir = tempfile::tempdir()?;
        let psk = keygen(dir.path())?;
        let volume = dir.path().join("volume.img");
        random_volume(&volume, SIZE, seed)?;
        let backing = dir.path().join("backing.img");
        sparse_file(&backing, SIZE)?;
        let state = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        Ok(Setup {
            sa: state("state-source"),
            sb: state("state-destination"),
            dir,
            psk,
            volume,
            backing,
        })
    }

    fn sync(&self, device: &Path) -> Result<Outcome> {
        let (s, d) = (
            self.dir.path().join("source.json"),
            self.dir.path().join("destination.json"),
        );
        sync_files(
            &self.psk,
            End {
                path: &self.volume,
                status: &s,
                flags: &["--state-dir", &self.sa],
            },
            End {
                path: device,
                status: &d,
                flags: &["--state-dir", &self.sb],
            },
        )
    }

    fn equal(&self, device: &Path) -> Result<bool> {
        Ok(file_digest(&self.volume, SIZE)? == file_digest(device, SIZE)?)
    }
}

/// A loop device target: full, then a delta by manifest that reads only the changed chunks of the device.
#[test]
fn a_loop_device_target_gets_deltas() -> Result<()> {
    if !is_root() {
        println!("skipped: not root");
        return Ok(());
    }
    let s = Setup::new(0xdec_0001)?;
    let Some(dev) = Loop::attach(None, &s.backing)? else {
        return Ok(());
    };
    s.sync(&dev.path)?.expect_full(SOURCE_NO_MANIFEST);
    assert!(s.equal(&dev.path)?);
    scribble(&s.volume, &scattered(SIZE, 4, 1), 1)?;
    let out = s.sync(&dev.path)?;
    out.expect_delta("delta-manifest");
    assert!(s.equal(&dev.path)?);
    assert!(out.dst("bytesRead") <= 2 * 4 * 65536, "{}", out.describe());
    Ok(())
}

/// The same device node (path and device number) attached to other storage between two syncs (a volume replaced
/// under the same node, as a re-created or restored PVC can be): the destination's manifest describes the old
/// storage, and a delta onto the new one would leave it wrong. Never a Successful sync with target != volume.
#[test]
fn a_loop_device_reattached_to_other_storage_is_not_trusted() -> Result<()> {
    if !is_root() {
        println!("skipped: not root");
        return Ok(());
    }
    let s = Setup::new(0xdec_0002)?;
    let Some(dev) = Loop::attach(None, &s.backing)? else {
        return Ok(());
    };
    s.sync(&dev.path)?.expect_full(SOURCE_NO_MANIFEST);
    assert!(s.equal(&dev.path)?);

    // Other storage, holding other data, behind the same node.
    let other = s.dir.path().join("other.img");
    random_volume(&other, SIZE, 0xdec_00ff)?;
    let path = dev.path.clone();
    drop(dev);
    // The detach completes asynchronously (and another test may hold the node a moment): retry for a while.
    let mut reattached = Err(String::new());
    for _ in 0..250 {
        reattached = Loop::try_attach(Some(&path), &other).context("reattach")?;
        if reattached.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dev = match reattached {
        Ok(dev) => dev,
        Err(why) => {
            println!("skipped: {why}");
            return Ok(());
        }
    };
    scribble(&s.volume, &scattered(SIZE, 2, 1), 1)?;
    let out = s.sync(&dev.path)?;
    println!(
        "after reattaching {}: {} ({})",
        path.display(),
        out.kind(),
        out.reason()
    );
    assert!(
        s.equal(&dev.path)?,
        "a Successful {} sync left {} (now other storage) different from the volume",
        out.kind(),
        path.display()
    );
    Ok(())
}

/// The device's storage rewritten behind the destination's back with other data (a restore, a reformat, another
/// program): path, device number and backing file are unchanged, so only the spot check at the start of a delta
/// (chunks read back and compared with the manifest) can tell. It must refuse the delta, compare in full, repair,
/// and count what differed.
#[test]
fn a_block_device_rewritten_behind_the_destination_fails_the_spot_check() -> Result<()> {
    if !is_root() {
        println!("skipped: not root");
        return Ok(());
    }
    let s = Setup::new(0xdec_0003)?;
    let Some(dev) = Loop::attach(None, &s.backing)? else {
        return Ok(());
    };
    s.sync(&dev.path)?.expect_full(SOURCE_NO_MANIFEST);
    assert!(s.equal(&dev.path)?);
    // Other data over the first half of the device, through the device (no file stamp to give it away).
    let other = s.dir.path().join("other.img");
    random_volume(&other, SIZE / 2, 0xdec_0033)?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev.path)?;
        f.write_all(&std::fs::read(&other)?)?;
        f.sync_all()?;
    }
    scribble(&s.volume, &scattered(SIZE, 2, 1), 1)?;
    let out = s.sync(&dev.path)?;
    out.expect_full("spot check");
    assert!(s.equal(&dev.path)?, "{}", out.describe());
    assert!(
        out.dst("targetDriftChunks") >= (SIZE / 2 / 65536) - 1,
        "{}",
        out.describe()
    );
    // Repaired and described again: the next sync is a delta.
    scribble(&s.volume, &scattered(SIZE, 2, 2), 2)?;
    s.sync(&dev.path)?.expect_delta("delta-manifest");
    assert!(s.equal(&dev.path)?);
    Ok(())
}
