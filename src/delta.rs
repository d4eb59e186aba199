//! What both agents decide about a delta sync: when a full comparison is due, and what a destination manifest
//! must match to describe the target (see "Why a delta sync is safe" in `proto/PROTOCOL.md`).

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::volume::{Kind, Volume};

/// How often a full comparison runs although a delta is possible (`--verify-every`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Every {
    /// After this many delta syncs in a row.
    Syncs(u32),
    /// When the last full comparison is older than this.
    Interval(Duration),
    /// Never (only `--verify full` forces one).
    Never,
}

/// The documented default of `--verify-every`: one full comparison a day bounds how long a target that something
/// else wrote, or a change list that lied, can go unnoticed.
pub const DEFAULT_EVERY: Every = Every::Interval(Duration::from_secs(24 * 3600));

impl Every {
    /// Parses `N` (syncs), `DURATION` with a unit (`90s`, `30m`, `12h`, `7d`) or `never`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t == "never" {
            return Ok(Every::Never);
        }
        let bad = || {
            format!("--verify-every {text:?}: expected a number of syncs (24), a duration (90s, 30m, 12h, 7d) or never")
        };
        let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let n: u64 = number.parse().map_err(|_| bad())?;
        let secs = match unit {
            "" => return u32::try_from(n).map(Every::Syncs).map_err(|_| bad()),
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(bad()),
        };
        n.checked_mul(secs)
            .map(|s| Every::Interval(Duration::from_secs(s)))
            .ok_or_else(bad)
    }

    /// Whether a full comparison is due, for a pair whose manifest counts `deltas` delta syncs since the last full
    /// comparison, which ran at `last_full_ms` (Unix milliseconds), at `now_ms`.
    pub fn due(self, deltas: u32, last_full_ms: u64, now_ms: u64) -> bool {
        match self {
            Every::Syncs(n) => deltas >= n,
            Every::Interval(d) => now_ms.saturating_sub(last_full_ms) >= d.as_millis() as u64,
            Every::Never => false,
        }
    }
}

impl std::fmt::Display for Every {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Every::Syncs(n) => write!(f, "{n} syncs"),
            Every::Interval(d) => write!(f, "{}s", d.as_secs()),
            Every::Never => f.write_str("never"),
        }
    }
}

/// An agent's verification policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verify {
    /// `--verify full`: the next sync is a full comparison (a long-running agent's first sync only).
    pub full: bool,
    /// `--verify-every`.
    pub every: Every,
}

impl Default for Verify {
    fn default() -> Self {
        Verify {
            full: false,
            every: DEFAULT_EVERY,
        }
    }
}

/// An agent's verification policy over its life: `--verify full` is spent by the first successful full
/// comparison (a long-running agent does not compare in full forever), `--verify-every` holds throughout.
#[derive(Debug)]
pub struct Policy {
    verify: Verify,
    full_pending: std::sync::atomic::AtomicBool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(Verify::default())
    }
}

impl Policy {
    /// The policy of `verify`.
    pub fn new(verify: Verify) -> Self {
        Policy {
            verify,
            full_pending: std::sync::atomic::AtomicBool::new(verify.full),
        }
    }

    /// Whether a full comparison was asked for and not yet served.
    pub fn full_requested(&self) -> bool {
        self.full_pending.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the periodic full comparison is due (see [`Every::due`]).
    pub fn periodic_due(&self, deltas: u32, last_full_ms: u64, now_ms: u64) -> bool {
        self.verify.every.due(deltas, last_full_ms, now_ms)
    }

    /// A sync of `kind` succeeded.
    pub fn served(&self, kind: crate::codec::SyncKind) {
        if kind == crate::codec::SyncKind::Full {
            self.full_pending
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// What the next manifest records of verification: the last full comparison (Unix ms) and the deltas since, after
/// a sync of `kind` that started at `started_ms`, given the base's `previous` record (none without a base).
pub fn verification_after(
    kind: crate::codec::SyncKind,
    previous: Option<(u64, u32)>,
    started_ms: u64,
) -> (u64, u32) {
    match (kind, previous) {
        (crate::codec::SyncKind::Full, _) | (_, None) => (started_ms, 0),
        (_, Some((last, n))) => (last, n.saturating_add(1)),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a destination manifest must match to describe `target`: the identity (its path and kind; for a regular
/// file its device and inode; for a block device its device number, its size, and what the kernel says backs it:
/// a loop device's backing file, a device-mapper UUID, a disk's WWID or serial) and the stamp (a regular file's
/// modification time in nanoseconds: any write by another program moves it, and the manifest is then stale; 0 for
/// a block device). A block device written by something else is not detected here: the spot check
/// ([`SPOT_CHECKS`]) and `--verify-every` are what bound that.
pub fn target_identity(target: &Volume) -> std::io::Result<(String, u64)> {
    let meta = std::fs::metadata(target.path())?;
    Ok(match target.kind() {
        Kind::File => (
            format!(
                "destination file {} dev={} ino={}",
                target.path().display(),
                meta.dev(),
                meta.ino()
            ),
            (meta.mtime() as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(meta.mtime_nsec() as u64),
        ),
        Kind::BlockDevice => (
            format!(
                "destination block device {} rdev={} size={} backing={}",
                target.path().display(),
                meta.rdev(),
                target.size(),
                backing_of(meta.rdev())
            ),
            0,
        ),
    })
}

/// Chunks of the target a destination reads and compares with its manifest before it agrees on a delta (non-zero
/// chunks first, chosen at random): 4 MiB at 64 KiB chunks. Storage swapped behind the same device node, or a
/// target restored or reformatted since the last sync, fails it with near certainty; a few changed blocks do not
/// (that is what `--verify-every` is for).
pub const SPOT_CHECKS: usize = 64;

/// What backs block device `rdev`, as far as sysfs tells: a loop device's backing file (and its inode), a
/// device-mapper UUID, a disk's WWID or serial; empty when it tells nothing.
fn backing_of(rdev: u64) -> String {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let dir = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let read = |rel: &str| {
        std::fs::read_to_string(dir.join(rel))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    if let Some(file) = read("loop/backing_file") {
        let ino = std::fs::metadata(&file).map_or(0, |m| m.ino());
        return format!("loop:{file}:{ino}");
    }
    for (label, rel) in [
        ("dm", "dm/uuid"),
        ("wwid", "device/wwid"),
        ("wwid", "wwid"),
        ("serial", "device/serial"),
    ] {
        if let Some(v) = read(rel) {
            return format!("{label}:{v}");
        }
    }
    String::new()
}

/// What a source manifest must match: who the source is (`namespace/name`). Its volume is a new snapshot at
/// every sync, so the manifest describes the image last sent, not a device.
pub fn source_identity(source: &str) -> String {
    format!("source {source}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_every_parses_syncs_durations_and_never() {
        assert_eq!(Every::parse("24"), Ok(Every::Syncs(24)));
        assert_eq!(
            Every::parse("90s"),
            Ok(Every::Interval(Duration::from_secs(90)))
        );
        assert_eq!(
            Every::parse("12h"),
            Ok(Every::Interval(Duration::from_secs(43200)))
        );
        assert_eq!(
            Every::parse("7d"),
            Ok(Every::Interval(Duration::from_secs(604800)))
        );
        assert_eq!(Every::parse("never"), Ok(Every::Never));
        for bad in ["", "h", "3w", "-1", "1.5h", "99999999999"] {
            assert!(Every::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_full_comparison_is_due_after_n_deltas_or_an_interval() {
        assert!(!Every::Syncs(3).due(2, 0, 0));
        assert!(Every::Syncs(3).due(3, 0, 0));
        assert!(
            Every::Syncs(0).due(0, 0, 0),
            "0: every sync is a full comparison"
        );
        let day = Every::Interval(Duration::from_secs(86400));
        assert!(!day.due(100, 1000, 1000 + 86_399_999));
        assert!(day.due(0, 1000, 1000 + 86_400_000));
        assert!(!Every::Never.due(u32::MAX, 0, u64::MAX));
    }
}
