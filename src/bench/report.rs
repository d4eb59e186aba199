//! What the bench measured, as rows, and how it is shown: a readable table with ratios against rsync, or JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::hashrate::HashRate;
use super::storage::WriteRate;

/// blockmover's rows: stateless (no state dir: every sync compares everything).
pub const BLOCKMOVER: &str = "blockmover";
/// blockmover's incremental with manifests in both agents' state dirs (syncKind delta-manifest).
pub const MANIFEST: &str = "blockmover+manifest";
/// blockmover's incremental with manifests and the change list (syncKind delta-changelist).
pub const CHANGELIST: &str = "blockmover+changelist";
/// blockmover's incremental with manifests and the change list from reflink clones' extent maps (`--reflink`:
/// source --snapshot reflink, syncKind delta-changelist).
pub const REFLINK: &str = "blockmover+reflink";
/// blockmover's stateless incremental through the delaying proxy (`--rtt-ms`).
pub const DELAYED: &str = "blockmover+rtt";

/// Whether `tool` names one of blockmover's rows.
pub fn is_blockmover(tool: &str) -> bool {
    [BLOCKMOVER, MANIFEST, CHANGELIST, REFLINK, DELAYED].contains(&tool)
}

/// Which sync of a run a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncKind {
    /// Into an empty (all-zero, sparse) target.
    Full,
    /// Into an existing target as it was (a block device given with `--target`).
    First,
    /// After the change, from the state the previous sync left.
    Incremental,
}

impl SyncKind {
    /// How tables and progress lines name it.
    pub fn name(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::First => "first",
            SyncKind::Incremental => "incremental",
        }
    }
}

/// One sync by one tool.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncRow {
    /// `blockmover` (stateless), `blockmover+manifest`, `blockmover+changelist`, `blockmover+rtt`, `rsync` or
    /// `volsync-rsync-tls`.
    pub tool: &'static str,
    /// Full, first or incremental.
    pub kind: SyncKind,
    /// What blockmover's source reported as the session's kind: `full`, `delta-manifest` or `delta-changelist`.
    pub sync_kind: Option<String>,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Change before this sync, percent of the volume's 4 KiB blocks (None for a full or first sync).
    pub change_percent: Option<f64>,
    /// Distinct 4 KiB blocks the change wrote.
    pub changed_blocks: Option<u64>,
    /// Wall time of the sync until durable, seconds.
    pub duration_secs: f64,
    /// Volume bytes per second of the sync.
    pub scan_bytes_per_sec: f64,
    /// Bytes source to destination (blockmover: TCP payload incl. TLS; rsync: its `sent` count).
    pub wire_sent: u64,
    /// Bytes destination to source.
    pub wire_received: u64,
    /// Chunks that got a DATA message (blockmover only).
    pub chunks_sent: Option<u64>,
    /// 4 KiB blocks carried as data (blockmover only).
    pub blocks_sent: Option<u64>,
    /// Raw bytes of the blocks carried (blockmover only).
    pub data_bytes: Option<u64>,
    /// Those bytes after compression (blockmover only).
    pub compressed_bytes: Option<u64>,
    /// Bytes the source read (blockmover only).
    pub bytes_read_source: Option<u64>,
    /// Bytes the destination read (blockmover only).
    pub bytes_read_destination: Option<u64>,
    /// Peak RSS of the source agent (rsync: the client), bytes.
    pub rss_source: Option<u64>,
    /// Peak RSS of the destination agent (rsync: the processes serving the connection), bytes.
    pub rss_destination: Option<u64>,
    /// CPU time (user + system) of the source agent (rsync: the client), seconds.
    pub cpu_source_secs: Option<f64>,
    /// CPU time of the destination agent (rsync: the processes serving the connection), seconds.
    pub cpu_destination_secs: Option<f64>,
    /// `--interval` plus the sync duration, seconds.
    pub max_rpo_secs: f64,
    /// (2 × volume / duration) / raw all-core BLAKE3 rate: both agents hash the whole volume (blockmover only).
    pub hashed_share_of_raw: Option<f64>,
    /// The target's BLAKE3 equalled the volume's after the sync (the bench fails otherwise).
    pub verified: bool,
    /// blockmover's source: wire bytes sent per second from connect to the end of the session (`wireSendRate`).
    pub wire_send_rate: Option<u64>,
    /// blockmover's source: the zstd level of its compression lanes at the end and the highest it used
    /// (`zstdLevel`, `zstdLevelMax`); none when nothing was compressed.
    pub zstd_levels: Option<(u64, u64)>,
    /// `--repeat`: every run's duration in the order they ran, seconds (this row is the median run); empty for a
    /// row run once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repeat_secs: Vec<f64>,
}

/// Everything one bench run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Logical cores of this machine.
    pub cores: usize,
    /// The raw all-core BLAKE3 rate measured in this run.
    pub blake3_raw: HashRate,
    /// The write rate of the storage the target lives on, measured in this run (none for a block device target).
    pub storage: Option<WriteRate>,
    /// The volume: a sample spec or the paths given.
    pub volume: String,
    /// The change: rate(s) and how it is written.
    pub change: String,
    /// `--interval`, seconds.
    pub interval_secs: f64,
    /// `--rtt-ms`: the round trip the delaying proxy adds.
    pub rtt_ms: Option<u64>,
    /// `--bwlimit`: every blockmover source's limit, bytes per second.
    pub bwlimit: Option<u64>,
    /// Every sync, in the order run.
    pub syncs: Vec<SyncRow>,
    /// With `--cold`: each side's cold scan rate next to dd's direct read rate of the same file.
    pub cold_scans: Vec<super::coldscan::ColdScan>,
    /// With `--cold`: per volume size, the volume and the target read at once with `O_DIRECT` (a reference for a
    /// cold sync here, where both are on one disk).
    pub cold_references: Vec<super::coldscan::ColdReference>,
    /// With `--delta --cold`: per change, the storage's floor under its delta by change list.
    pub change_floors: Vec<super::floor::ChangeFloor>,
    /// Comparisons that were asked for but could not run, with the reason.
    pub skipped: Vec<String>,
    /// How to read the figures.
    pub notes: Vec<String>,
}

/// `1.5 GiB`, `20.0 MiB`, `512 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn opt_bytes(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), bytes)
}

fn opt_count(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// Seconds with a precision that suits them.
pub fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else if s < 1000.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.0} s")
    }
}

/// `1.20+0.95 s`: CPU seconds of both sides.
fn cpu(src: Option<f64>, dst: Option<f64>) -> String {
    let one = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    format!("{}+{} s", one(src), one(dst))
}

pub fn percent(p: f64) -> String {
    format!("{}%", trim_float(p))
}

/// `0.1`, `1`, `10`: no trailing zeros.
pub fn trim_float(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The report as a table, then ratios against rsync, then skips and notes.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "blockmover bench: {}; change: {}; interval {} s for max RPO",
        report.volume,
        report.change,
        trim_float(report.interval_secs)
    );
    let _ = writeln!(
        out,
        "raw BLAKE3 on this machine: {}/s on {} threads ({} in memory, {} per hash, best of 3)",
        bytes(report.blake3_raw.bytes_per_sec as u64),
        report.blake3_raw.threads,
        bytes(report.blake3_raw.buffer_bytes),
        bytes(report.blake3_raw.piece_bytes)
    );
    if let Some(w) = &report.storage {
        let _ = writeln!(
            out,
            "target storage on this machine: {}/s ({} in 1 MiB buffered writes, until fsync returned, in {})",
            bytes(w.bytes_per_sec as u64),
            bytes(w.bytes),
            w.dir
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>9} {:>7} {:<11} {:<21} {:>9} {:>11} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>13}  verified",
        "volume",
        "change",
        "sync",
        "tool",
        "duration",
        "scan rate",
        "read src",
        "read dst",
        "wire sent",
        "wire recv",
        "chunks",
        "4K blocks",
        "RSS src",
        "RSS dst",
        "max RPO",
        "hashed",
        "CPU src+dst",
    );
    for row in &report.syncs {
        let _ = writeln!(
            out,
            "{:>9} {:>7} {:<11} {:<21} {:>9} {:>11} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>13}  {}",
            bytes(row.volume_bytes),
            row.change_percent.map_or_else(|| "-".to_owned(), percent),
            row.kind.name(),
            row.tool,
            secs(row.duration_secs),
            format!("{}/s", bytes(row.scan_bytes_per_sec as u64)),
            opt_bytes(row.bytes_read_source),
            opt_bytes(row.bytes_read_destination),
            bytes(row.wire_sent),
            bytes(row.wire_received),
            opt_count(row.chunks_sent),
            opt_count(row.blocks_sent),
            opt_bytes(row.rss_source),
            opt_bytes(row.rss_destination),
            secs(row.max_rpo_secs),
            row.hashed_share_of_raw
                .map_or_else(|| "-".to_owned(), |h| format!("{:.0}%", h * 100.0)),
            cpu(row.cpu_source_secs, row.cpu_destination_secs),
            if row.verified { "yes" } else { "NO" }
        );
    }
    let ratios = ratio_lines(&report.syncs);
    if !ratios.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "ratios (other tool / blockmover row; above 1 means blockmover is faster or sends less):"
        );
        for line in ratios {
            let _ = writeln!(out, "  {line}");
        }
    }
    for (title, lines) in [
        (
            "delta syncs, each change from the same target state (ratio: stateless blockmover / this row):",
            super::compare::delta_lines(&report.syncs),
        ),
        (
            "cost by volume size, per kind of sync and change (ratio: this size / the smallest size):",
            super::compare::size_lines(&report.syncs),
        ),
        (
            "repeated runs (--repeat; each row above is its median run):",
            super::repeat::lines(&report.syncs),
        ),
    ] {
        if !lines.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "{title}");
            for line in lines {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    let floors = storage_lines(report);
    if !floors.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "storage floor (a full sync makes every byte it writes durable; it cannot beat the storage):"
        );
        for line in floors {
            let _ = writeln!(out, "  {line}");
        }
    }
    let floors = super::floor::lines(&report.change_floors, &report.syncs);
    if !floors.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "storage floor of a delta by change list (its ranges read from the evicted volume, all asked of the \
             kernel at once and read by {} threads; then written to the target and fdatasynced; a sync of the \
             change cannot take less than the larger):",
            super::floor::READERS
        );
        for line in floors {
            let _ = writeln!(out, "  {line}");
        }
    }
    if let Some(limit) = report.bwlimit {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "bandwidth limit (--bwlimit {}/s): wire bytes sent per second from connect to the end of the session",
            bytes(limit)
        );
        for r in report.syncs.iter().filter(|r| is_blockmover(r.tool)) {
            let Some(rate) = r.wire_send_rate else {
                continue;
            };
            let _ = writeln!(
                out,
                "  {:>9} {:<11} {:<21} sent {:>9} in {:>8}: {}/s = {:.1}% of the limit",
                bytes(r.volume_bytes),
                r.kind.name(),
                r.tool,
                bytes(r.wire_sent),
                secs(r.duration_secs),
                bytes(rate),
                rate as f64 * 100.0 / limit as f64
            );
        }
    }
    let levels: Vec<String> = report
        .syncs
        .iter()
        .filter_map(|r| {
            let (last, highest) = r.zstd_levels?;
            Some(format!(
                "  {:>9} {:<11} {:<21} level {last} at the end, {highest} at most; sent {} in {}",
                bytes(r.volume_bytes),
                r.kind.name(),
                r.tool,
                bytes(r.wire_sent),
                secs(r.duration_secs)
            ))
        })
        .collect();
    if !levels.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "zstd level of the compression lanes (chosen during the sync unless --zstd-level is given):"
        );
        for line in levels {
            let _ = writeln!(out, "{line}");
        }
    }
    let latency = latency_lines(&report.syncs, report.rtt_ms);
    if !latency.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "added round-trip time (--rtt-ms), same change from the same target state:"
        );
        for line in latency {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !report.cold_scans.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "cold stateless scan (as the agents scan by default, through the page cache) vs dd if=FILE \
             iflag=direct bs=1M (same file, this run):"
        );
        for c in &report.cold_scans {
            let dd = c
                .dd_direct_bytes_per_sec
                .map_or("O_DIRECT refused".to_owned(), |d| {
                    format!("{}/s", bytes(d as u64))
                });
            let ratio = c
                .ratio()
                .map_or(String::new(), |r| format!(" ({:.0}% of dd)", r * 100.0));
            let direct = match (c.direct_scan_bytes_per_sec, c.direct_ratio()) {
                (Some(d), Some(r)) => {
                    format!(
                        ", with --direct-reads {}/s ({:.0}%)",
                        bytes(d as u64),
                        r * 100.0
                    )
                }
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {}: dd {dd}; scan {}/s{ratio}{direct}",
                c.side,
                bytes(c.scan_bytes_per_sec as u64)
            );
        }
    }
    for reference in &report.cold_references {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "cold sync reference: the volume and the target ({} together, one disk here) read at once by two dd-like \
             O_DIRECT 1 MiB readers: {:.2} s ({}/s)",
            bytes(reference.bytes),
            reference.secs,
            bytes((reference.bytes as f64 / reference.secs) as u64)
        );
        for row in report.syncs.iter().filter(|r| {
            r.tool == BLOCKMOVER
                && r.volume_bytes * 2 == reference.bytes
                && r.sync_kind.as_deref() == Some("full")
        }) {
            let _ = writeln!(
                out,
                "  {} {} sync: {:.2} s, {:.1}x the reference",
                row.tool,
                row.kind.name(),
                row.duration_secs,
                row.duration_secs / reference.secs
            );
        }
    }
    if !report.skipped.is_empty() {
        let _ = writeln!(out);
        for skip in &report.skipped {
            let _ = writeln!(out, "skipped: {skip}");
        }
    }
    if !report.notes.is_empty() {
        let _ = writeln!(out);
        for note in &report.notes {
            let _ = writeln!(out, "note: {note}");
        }
    }
    out
}

/// One line per blockmover full sync: the bytes it wrote, the least time the storage needs for them, and the share
/// of the storage's rate the sync reached.
fn storage_lines(report: &Report) -> Vec<String> {
    let Some(w) = &report.storage else {
        return Vec::new();
    };
    report
        .syncs
        .iter()
        .filter(|r| r.tool == BLOCKMOVER && r.kind == SyncKind::Full)
        .filter_map(|r| {
            let written = r.data_bytes?;
            let floor = written as f64 / w.bytes_per_sec.max(1.0);
            Some(format!(
                "{} full: wrote {} to the target, at least {} at the storage's rate; took {} ({:.0}% of the storage's rate)",
                bytes(r.volume_bytes),
                bytes(written),
                secs(floor),
                secs(r.duration_secs),
                floor / r.duration_secs.max(1e-9) * 100.0
            ))
        })
        .collect()
}

/// One line per (other tool, sync) pair and each blockmover row (stateless, with manifests, with a change list) of
/// the same volume, kind and change.
fn ratio_lines(rows: &[SyncRow]) -> Vec<String> {
    let mut lines = Vec::new();
    for other in rows.iter().filter(|r| !is_blockmover(r.tool)) {
        for tool in [BLOCKMOVER, MANIFEST, CHANGELIST, REFLINK] {
            let Some(ours) = rows.iter().find(|r| r.tool == tool && same_sync(r, other)) else {
                continue;
            };
            lines.push(format!(
                "{:<17} / {:<21} {:>9} {:<11} {:>7}  duration {:>7}  wire sent {:>7}  wire total {:>7}",
                other.tool,
                ours.tool,
                bytes(other.volume_bytes),
                other.kind.name(),
                other.change_percent.map_or_else(|| "-".to_owned(), percent),
                ratio(other.duration_secs, ours.duration_secs),
                ratio(other.wire_sent as f64, ours.wire_sent as f64),
                ratio(
                    (other.wire_sent + other.wire_received) as f64,
                    (ours.wire_sent + ours.wire_received) as f64
                ),
            ));
        }
    }
    lines
}

/// Two rows of the same volume size, kind and change.
pub fn same_sync(a: &SyncRow, b: &SyncRow) -> bool {
    a.kind == b.kind && a.volume_bytes == b.volume_bytes && a.change_percent == b.change_percent
}

/// `a / b` as `12.3x`, `-` when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.1}x", a / b)
    } else {
        "-".to_owned()
    }
}

/// One line per blockmover sync repeated through the delaying proxy: how much longer it took, and how many round
/// trips of `rtt_ms` that is (the TCP connect to the proxy is local: every added round trip is the protocol's).
fn latency_lines(rows: &[SyncRow], rtt_ms: Option<u64>) -> Vec<String> {
    rows.windows(2)
        .filter(|w| w[0].tool == BLOCKMOVER && w[1].tool == DELAYED)
        .map(|w| {
            let (plain, delayed) = (&w[0], &w[1]);
            let added = delayed.duration_secs - plain.duration_secs;
            let trips = match rtt_ms {
                Some(ms) if ms > 0 => {
                    format!(
                        " = {:.1} round trips of {ms} ms",
                        added * 1000.0 / ms as f64
                    )
                }
                _ => String::new(),
            };
            format!(
                "{:>9} {:<11} {:>7}  {} -> {}: {added:+.2} s{trips}",
                bytes(plain.volume_bytes),
                plain.kind.name(),
                plain.change_percent.map_or_else(|| "-".to_owned(), percent),
                secs(plain.duration_secs),
                secs(delayed.duration_secs),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(2 << 30), "2.0 GiB");
        assert_eq!(bytes(300 << 20), "300 MiB");
    }

    #[test]
    fn floats_lose_trailing_zeros() {
        assert_eq!(trim_float(0.1), "0.1");
        assert_eq!(trim_float(10.0), "10");
    }
}
