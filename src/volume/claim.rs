//! Exclusive access to a target, and, when the OS refuses it, who holds it.
//!
//! A block device is opened with `O_EXCL`: the kernel then refuses the device to every other exclusive opener (a
//! mount, device-mapper, md, `mkfs`, another destination) for as long as our file is open, and refuses it to us
//! with `EBUSY` while one of them holds it. A regular file is locked with `flock(LOCK_EX|LOCK_NB)`: the lock is
//! advisory, so it stops a second destination (and any tool that locks), not a process that writes without
//! asking. Both claims belong to the open file description: a `dup` of the descriptor shares them, and they end
//! when the last duplicate is closed.
//!
//! When a claim is refused, `/proc/self/mountinfo`, `/sys/dev/block/MAJ:MIN/holders`, `/proc/locks` and
//! `/proc/*/fd` are searched, best effort, for the holder, so that the error can name it. Nothing found is not an
//! error: the refusal stands, with a vaguer message.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, major, minor, FlockOperation};
use rustix::io::Errno;

use crate::error::Error;

/// Most processes named in one error.
const MAX_PIDS_NAMED: usize = 3;

/// Why an exclusive open of the block device `path` (device number `rdev`) failed with `EBUSY`: mounted
/// ([`Error::TargetMounted`]) or held by someone else ([`Error::TargetInUse`]).
pub(super) fn busy_device(path: &Path, rdev: u64) -> Error {
    let devices = device_and_partitions(rdev);
    if let Some(mount) = mount_point(&devices) {
        return Error::TargetMounted {
            path: path.to_owned(),
            mount,
        };
    }
    let holder = kernel_holders(&devices)
        .or_else(|| processes_with_open(|m| m.file_type().is_block_device() && m.rdev() == rdev))
        .unwrap_or_else(|| "another exclusive user (no mount, holder or process found)".to_owned());
    Error::TargetInUse {
        path: path.to_owned(),
        holder,
    }
}

/// Takes the exclusive `flock` of a regular file target; a lock held elsewhere is [`Error::TargetInUse`] naming
/// the holder. A file system that cannot lock at all (some FUSE and network file systems) is logged and allowed:
/// refusing it would refuse the target, not a second writer.
pub(super) fn lock_file(file: &File, path: &Path) -> Result<(), Error> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(Errno::WOULDBLOCK) => Err(Error::TargetInUse {
            path: path.to_owned(),
            holder: file_lock_holder(file)
                .unwrap_or_else(|| "another process (not found in /proc/locks)".to_owned()),
        }),
        Err(e) => {
            tracing::warn!(
                target = %path.display(),
                "cannot lock the target ({e}): exclusive access is not enforced on this file system"
            );
            Ok(())
        }
    }
}

/// The device number and those of its partitions (`/sys/dev/block/MAJ:MIN/<part>/dev`).
fn device_and_partitions(rdev: u64) -> Vec<(u32, u32)> {
    let whole = (major(rdev), minor(rdev));
    let mut devices = vec![whole];
    let Ok(entries) = fs::read_dir(sys_block(whole)) else {
        return devices;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("partition").exists() {
            continue;
        }
        if let Some(dev) = fs::read_to_string(dir.join("dev"))
            .ok()
            .and_then(|d| parse_dev(d.trim(), 10))
        {
            devices.push(dev);
        }
    }
    devices
}

fn sys_block((maj, min): (u32, u32)) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{maj}:{min}"))
}

/// `MAJ:MIN` in the given radix.
fn parse_dev(text: &str, radix: u32) -> Option<(u32, u32)> {
    let (maj, min) = text.split_once(':')?;
    Some((
        u32::from_str_radix(maj, radix).ok()?,
        u32::from_str_radix(min, radix).ok()?,
    ))
}

/// Where one of `devices` is mounted, from `/proc/self/mountinfo`: field 3 is the device number of the mounted
/// file system; the mount source (after ` - fstype`) is compared too, since some file systems (btrfs) report
/// an anonymous device number.
fn mount_point(devices: &[(u32, u32)]) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (fields, tail) = line.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        let dev = parse_dev(fields.get(2)?, 10)?;
        let source = tail.split(' ').nth(1).map(unescape);
        let source_matches = source.is_some_and(|s| {
            s.starts_with("/dev/")
                && fs::metadata(&s).is_ok_and(|m| {
                    m.file_type().is_block_device()
                        && devices.contains(&(major(m.rdev()), minor(m.rdev())))
                })
        });
        let mount = fields.get(4)?;
        (devices.contains(&dev) || source_matches).then(|| PathBuf::from(unescape(mount)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel users stacked on the device or a partition (`holders/`): device-mapper, md, bcache.
fn kernel_holders(devices: &[(u32, u32)]) -> Option<String> {
    let mut names = Vec::new();
    for &dev in devices {
        let Ok(entries) = fs::read_dir(sys_block(dev).join("holders")) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let class = Path::new("/sys/class/block").join(&name);
            let described = match fs::read_to_string(class.join("dm/name")) {
                Ok(dm) => format!("device-mapper device {} ({name})", dm.trim()),
                Err(_) if class.join("md").exists() => format!("md array {name}"),
                Err(_) => format!("kernel holder {name}"),
            };
            names.push(described);
        }
    }
    (!names.is_empty()).then(|| names.join(", "))
}

/// The holder of a conflicting lock on `file`, from `/proc/locks` (`ID: TYPE ADVISORY MODE PID MAJ:MIN:INODE ...`,
/// device numbers in hex), falling back to the processes that have the file open.
fn file_lock_holder(file: &File) -> Option<String> {
    let meta = file.metadata().ok()?;
    let (dev, ino) = ((major(meta.dev()), minor(meta.dev())), meta.ino());
    let text = fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut pids: Vec<i64> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Only flock locks conflict with ours; waiters (`ID: -> FLOCK ...`) hold nothing.
        if fields.get(1) != Some(&"FLOCK") {
            continue;
        }
        let (Some(pid), Some(id)) = (fields.get(4), fields.get(5)) else {
            continue;
        };
        let Some((dev_text, ino_text)) = id.rsplit_once(':') else {
            continue;
        };
        if parse_dev(dev_text, 16) == Some(dev) && ino_text.parse() == Ok(ino) {
            if let Ok(pid) = pid.parse::<i64>() {
                // 0 or -1: a holder outside our pid namespace, or an open file description lock.
                if pid > 0 && !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    if pids.is_empty() {
        return processes_with_open(|m| m.dev() == meta.dev() && m.ino() == ino);
    }
    Some(describe_processes(&pids))
}

/// The processes with a descriptor whose file matches (`/proc/*/fd/*`), described; `None` when none is found.
fn processes_with_open(matches: impl Fn(&fs::Metadata) -> bool) -> Option<String> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i64>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        // The metadata of a /proc/PID/fd link is that of the file it names.
        if fds
            .flatten()
            .any(|fd| fs::metadata(fd.path()).is_ok_and(|m| matches(&m)))
        {
            pids.push(pid);
        }
    }
    (!pids.is_empty()).then(|| describe_processes(&pids))
}

/// `another process (pid N, COMM)`, or `other processes (pid N, COMM; pid M, COMM)` for several.
fn describe_processes(pids: &[i64]) -> String {
    let named: Vec<String> = pids
        .iter()
        .take(MAX_PIDS_NAMED)
        .map(
            |pid| match fs::read_to_string(format!("/proc/{pid}/comm")) {
                Ok(comm) => format!("pid {pid}, {}", comm.trim()),
                Err(_) => format!("pid {pid}"),
            },
        )
        .collect();
    let more = match pids.len().saturating_sub(MAX_PIDS_NAMED) {
        0 => String::new(),
        n => format!("; {n} more"),
    };
    match pids.len() {
        1 => format!("another process ({})", named.join("; ")),
        _ => format!("other processes ({}{more})", named.join("; ")),
    }
}

/// Whether an open error is the kernel refusing an exclusive claim.
pub(super) fn is_busy(e: &io::Error) -> bool {
    Errno::from_io_error(e) == Some(Errno::BUSY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/a\134b"), r"/a\b");
        assert_eq!(unescape(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn device_numbers_parse_in_either_radix() {
        assert_eq!(parse_dev("7:3", 10), Some((7, 3)));
        assert_eq!(parse_dev("fd:01", 16), Some((253, 1)));
        assert_eq!(parse_dev("fd01", 16), None);
    }
}
