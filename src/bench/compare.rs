//! The table's comparisons between kinds of sync: the delta rows against the stateless one of the same change, and
//! each kind's cost as the volume grows.

use super::report::{
    bytes, percent, ratio, same_sync, secs, SyncKind, SyncRow, BLOCKMOVER, CHANGELIST, MANIFEST,
    REFLINK,
};

/// One line per stateless blockmover incremental that has delta rows of the same change: each row's duration
/// (and the stateless one's over it), the bytes both agents read, and the other tools' durations.
pub fn delta_lines(rows: &[SyncRow]) -> Vec<String> {
    let mut lines = Vec::new();
    for stateless in rows
        .iter()
        .filter(|r| r.tool == BLOCKMOVER && r.kind == SyncKind::Incremental)
    {
        let same: Vec<&SyncRow> = rows
            .iter()
            .filter(|r| r.tool != BLOCKMOVER && same_sync(r, stateless))
            .collect();
        if !same
            .iter()
            .any(|r| [MANIFEST, CHANGELIST, REFLINK].contains(&r.tool))
        {
            continue;
        }
        let mut line = format!(
            "{:>9} {:>7}  {} {} (read {})",
            bytes(stateless.volume_bytes),
            stateless
                .change_percent
                .map_or_else(|| "-".to_owned(), percent),
            BLOCKMOVER,
            secs(stateless.duration_secs),
            read(stateless)
        );
        for r in &same {
            line.push_str(&format!(
                "; {} {} ({}{})",
                r.tool,
                secs(r.duration_secs),
                ratio(stateless.duration_secs, r.duration_secs),
                match r.bytes_read_source {
                    Some(_) => format!(", read {}", read(r)),
                    None => String::new(),
                }
            ));
        }
        lines.push(line);
    }
    lines
}

/// `20.0 MiB+0 B`: bytes read by the source and by the destination.
fn read(r: &SyncRow) -> String {
    let one = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), bytes);
    format!(
        "{}+{}",
        one(r.bytes_read_source),
        one(r.bytes_read_destination)
    )
}

/// For every tool, kind of sync and change rate run at more than one volume size: duration, wire bytes and peak
/// RSS per size, with the duration's ratio to the smallest size's.
pub fn size_lines(rows: &[SyncRow]) -> Vec<String> {
    let mut groups: Vec<(&'static str, SyncKind, Option<f64>)> = Vec::new();
    for r in rows {
        let key = (r.tool, r.kind, r.change_percent);
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    let mut lines = Vec::new();
    for (tool, kind, change) in groups {
        let mut of: Vec<&SyncRow> = rows
            .iter()
            .filter(|r| r.tool == tool && r.kind == kind && r.change_percent == change)
            .collect();
        of.sort_by_key(|r| r.volume_bytes);
        of.dedup_by_key(|r| r.volume_bytes);
        if of.len() < 2 {
            continue;
        }
        let base = of[0].duration_secs;
        let points = of
            .iter()
            .map(|r| {
                let rss = match (r.rss_source, r.rss_destination) {
                    (Some(s), Some(d)) => format!(", RSS {}/{}", bytes(s), bytes(d)),
                    _ => String::new(),
                };
                format!(
                    "{} {} ({}; wire {}{rss})",
                    bytes(r.volume_bytes),
                    secs(r.duration_secs),
                    ratio(r.duration_secs, base),
                    bytes(r.wire_sent + r.wire_received)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        lines.push(format!(
            "{:<11} {:>7} {:<21} {points}",
            kind.name(),
            change.map_or_else(|| "-".to_owned(), percent),
            tool
        ));
    }
    lines
}
