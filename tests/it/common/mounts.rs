//! Loop devices and mounts for root-only tests, removed by drop guards also when an assertion fails. A test that
//! cannot have them (not root, no `losetup`, no `mount`) is skipped with the printed reason ([`crate::or_skip`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::sparse_file;

/// Why this process cannot run root-only tests, if it cannot.
pub fn not_root() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    (euid != Some("0")).then(|| format!("not root (euid {})", euid.unwrap_or("unknown")))
}

/// Runs `program args...`; the error says what failed.
pub fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An attached loop device, detached on drop.
pub struct LoopDevice {
    /// The device node.
    pub path: PathBuf,
}

impl LoopDevice {
    /// `losetup --find --show FILE`, or why it cannot (then the test is skipped).
    pub fn attach(file: &Path) -> Result<std::result::Result<LoopDevice, String>> {
        if let Some(reason) = not_root() {
            return Ok(Err(reason));
        }
        let out = match Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
        {
            Ok(out) => out,
            Err(e) => return Ok(Err(format!("losetup not runnable: {e}"))),
        };
        if !out.status.success() {
            return Ok(Err(format!(
                "losetup --find --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !path.starts_with("/dev") {
            bail!("losetup printed no device: {path:?}");
        }
        Ok(Ok(LoopDevice { path }))
    }

    /// A new all-zero sparse `file` of `size` bytes, [attached](LoopDevice::attach).
    pub fn on_sparse_file(
        file: &Path,
        size: u64,
    ) -> Result<std::result::Result<LoopDevice, String>> {
        sparse_file(file, size)?;
        LoopDevice::attach(file)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = run("losetup", &["-d".as_ref(), self.path.as_os_str()]) {
            eprintln!("warning: losetup -d {}: {e:#}", self.path.display());
        }
    }
}

/// A file system mounted on a fresh directory, unmounted on drop (lazily if it is still busy).
pub struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    /// `mount ARGS... DIR` on a new directory, or why it cannot (then the test is skipped).
    pub fn new(args: &[&std::ffi::OsStr]) -> Result<std::result::Result<Mount, String>> {
        if let Some(reason) = not_root() {
            return Ok(Err(reason));
        }
        let dir = tempfile::tempdir()?;
        let mut all = args.to_vec();
        all.push(dir.path().as_os_str());
        Ok(run("mount", &all)
            .map(|()| Mount { dir })
            .map_err(|e| format!("{e:#}")))
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let dir = self.dir.path().as_os_str();
        if run("umount", &[dir]).is_err() {
            if let Err(e) = run("umount", &["-l".as_ref(), dir]) {
                eprintln!("warning: umount {}: {e:#}", self.dir.path().display());
            }
        }
    }
}

/// `Ok(Ok(v))` gives `v`; `Ok(Err(reason))` prints `skipped: WHAT (reason)` and returns `Ok(())` from the test.
#[macro_export]
macro_rules! or_skip {
    ($e:expr, $what:literal) => {
        match $e? {
            Ok(v) => v,
            Err(reason) => {
                println!(concat!("skipped: ", $what, " ({})"), reason);
                return Ok(());
            }
        }
    };
}
