//! Reflink clones of a file volume (`FICLONE`), kept beside it, and the change list two of them give.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::fiemap;
use crate::changes::{ChangedChunks, Tracker};
use crate::chunk::{Digest, Geometry};
use crate::error::{Error, Result};

const CLONE: &str = "blockmover-clone";
const BASE: &str = "blockmover-base";

/// A clone being synced; removed when dropped unless [`Clone::finish`] kept it.
#[derive(Debug)]
pub struct Clone {
    path: PathBuf,
    dir: PathBuf,
    name: OsString,
    keep: bool,
}

impl Clone {
    /// Clones `volume` to `.NAME.blockmover-clone.PID` beside it. Clones left by a source that died are removed
    /// first. A filesystem without reflinks is an error that says so: a full copy would take the time and space
    /// the clone exists to save.
    pub fn take(volume: &Path, keep: bool) -> Result<Clone> {
        let (dir, name) = split(volume)?;
        remove_stale(&dir, &name);
        let source = File::open(volume).map_err(|e| {
            Error::Snapshot(format!("cannot open the volume {}: {e}", volume.display()))
        })?;
        let meta = source
            .metadata()
            .map_err(|e| Error::Snapshot(format!("{}: {e}", volume.display())))?;
        if !meta.is_file() {
            return Err(Error::Snapshot(format!(
                "--snapshot reflink clones a file volume; {} is not a regular file",
                volume.display()
            )));
        }
        let path = dir.join(hidden(&name, CLONE, &std::process::id().to_string()));
        let _ = std::fs::remove_file(&path);
        let clone = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::Snapshot(format!("cannot create {}: {e}", path.display())))?;
        let taken = Clone {
            path,
            dir,
            name,
            keep,
        };
        let started = std::time::Instant::now();
        if let Err(e) = rustix::fs::ioctl_ficlone(&clone, &source) {
            let unsupported = matches!(
                e,
                rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOTTY
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::XDEV
            );
            let reason = if unsupported {
                format!(
                    "the filesystem of {} does not support reflinks (FICLONE: {}); use XFS or btrfs, or take the \
                     copy outside blockmover",
                    taken.dir.display(),
                    std::io::Error::from(e)
                )
            } else {
                format!(
                    "cloning {} failed: {}",
                    volume.display(),
                    std::io::Error::from(e)
                )
            };
            return Err(Error::Snapshot(reason));
        }
        tracing::info!(
            "reflink clone {} of {} bytes taken in {:.2?}",
            taken.path.display(),
            meta.len(),
            started.elapsed()
        );
        Ok(taken)
    }

    /// The clone's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The change list against the kept clone of the last sync, when clones are kept.
    pub fn tracker(&self) -> Option<ReflinkExtents> {
        self.keep.then(|| ReflinkExtents {
            dir: self.dir.clone(),
            name: self.name.clone(),
            current: self.path.clone(),
        })
    }

    /// Keeps the clone as the base of the next sync (named after `synced`, the image's volume digest) and removes
    /// older bases; or removes it.
    pub fn finish(self, synced: Option<&Digest>) {
        let (Some(digest), true) = (synced, self.keep) else {
            return; // dropped: removed
        };
        let base = self.dir.join(hidden(&self.name, BASE, &digest.to_hex()));
        let kept = File::open(&self.path)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&self.path, &base))
            .and_then(|()| File::open(&self.dir)?.sync_all());
        match kept {
            Ok(()) => {
                for old in matching(&self.dir, &self.name, BASE) {
                    if old != base {
                        let _ = std::fs::remove_file(old);
                    }
                }
            }
            Err(e) => tracing::warn!(
                "the clone of this sync was not kept ({e}): the next sync compares in full"
            ),
        }
    }
}

impl Drop for Clone {
    fn drop(&mut self) {
        // After finish kept it, the path is gone and this does nothing.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The change list of a reflink clone against the kept clone of the last synced image.
#[derive(Clone, Debug)]
pub struct ReflinkExtents {
    dir: PathBuf,
    name: OsString,
    current: PathBuf,
}

impl Tracker for ReflinkExtents {
    fn describe(&self) -> String {
        format!("reflink extents of {}", self.dir.join(&self.name).display())
    }

    fn changed(&self, geometry: Geometry, base: &Digest) -> Result<ChangedChunks> {
        let failed = |reason: String| Error::Tracker {
            tracker: self.describe(),
            reason,
        };
        let base_path = self.dir.join(hidden(&self.name, BASE, &base.to_hex()));
        let open = |p: &Path| {
            File::open(p).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    failed(format!(
                        "no kept clone of the last synced image ({} is missing)",
                        p.display()
                    ))
                } else {
                    failed(format!("cannot open {}: {e}", p.display()))
                }
            })
        };
        let (old, now) = (open(&base_path)?, open(&self.current)?);
        let size = geometry.volume_size();
        for (f, p) in [(&old, &base_path), (&now, &self.current)] {
            let len = f
                .metadata()
                .map_err(|e| failed(format!("{}: {e}", p.display())))?
                .len();
            if len != size {
                return Err(failed(format!(
                    "{} holds {len} bytes, the volume {size}",
                    p.display()
                )));
            }
        }
        let started = std::time::Instant::now();
        let map = |f: &File, p: &Path| {
            fiemap::extents(f, size).map_err(|e| failed(format!("FIEMAP of {}: {e}", p.display())))
        };
        let (a, b) = (map(&old, &base_path)?, map(&now, &self.current)?);
        let differing = fiemap::differing(&a, &b, size);
        let changed = ChangedChunks::from_extents(&differing, geometry).map_err(|e| failed(e.0))?;
        tracing::info!(
            "reflink extents: {} and {} extents compared in {:.2?}: {} ranges, {} chunks changed",
            a.len(),
            b.len(),
            started.elapsed(),
            differing.len(),
            changed.chunk_count()
        );
        Ok(changed)
    }
}

/// The volume's directory and file name.
fn split(volume: &Path) -> Result<(PathBuf, OsString)> {
    let name = volume
        .file_name()
        .ok_or_else(|| Error::Snapshot(format!("{} names no file", volume.display())))?;
    let dir = match volume.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_owned()))
}

/// `.NAME.KIND.SUFFIX`.
fn hidden(name: &OsString, kind: &str, suffix: &str) -> OsString {
    let mut s = OsString::from(".");
    s.push(name);
    s.push(format!(".{kind}.{suffix}"));
    s
}

/// The files `.NAME.KIND.*` in `dir`.
fn matching(dir: &Path, name: &OsString, kind: &str) -> Vec<PathBuf> {
    let mut prefix = hidden(name, kind, "");
    let prefix = std::mem::take(&mut prefix).into_encoded_bytes();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_encoded_bytes().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Removes clones whose source process is gone (killed mid-sync).
fn remove_stale(dir: &Path, name: &OsString) {
    for path in matching(dir, name, CLONE) {
        let pid = path
            .extension()
            .and_then(|e| e.to_str())
            .and_then(|e| e.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive || pid == Some(std::process::id()) {
            tracing::info!(
                "removing the clone {} left by an earlier sync",
                path.display()
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}
