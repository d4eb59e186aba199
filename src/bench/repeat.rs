//! `--repeat N`: each incremental sync of a change runs N times from the same target state, and its row is the
//! median run. This machine's durations swing by a third from one run to the next (2 shared cores), so one run
//! per row makes a ratio between two rows a comparison of two draws.
//!
//! The runs of one change are interleaved by round (every tool once per round, in the table's order), so that a
//! slow minute of the machine lands on all tools alike rather than on one.

use super::report::{bytes, percent, secs, SyncRow};

/// Replaces `rows` (the rows of one change: `rounds` rounds of the same tools in the same order) with one row per
/// tool: its median run (for an even count the lower of the two middle ones, so that the row is a run that
/// happened, with its own CPU, RSS and bytes), holding every run's duration in `repeat_secs`.
pub fn merge(rows: Vec<SyncRow>, rounds: usize) -> Vec<SyncRow> {
    if rounds <= 1 || rows.is_empty() {
        return rows;
    }
    let per_round = rows.len() / rounds;
    debug_assert_eq!(
        per_round * rounds,
        rows.len(),
        "every round runs every tool"
    );
    let mut by_tool: Vec<Vec<SyncRow>> = (0..per_round).map(|_| Vec::new()).collect();
    for (i, row) in rows.into_iter().enumerate() {
        by_tool[i % per_round].push(row);
    }
    by_tool
        .into_iter()
        .map(|mut runs| {
            let repeat_secs: Vec<f64> = runs.iter().map(|r| r.duration_secs).collect();
            runs.sort_by(|a, b| a.duration_secs.total_cmp(&b.duration_secs));
            let mut median = runs.swap_remove((runs.len() - 1) / 2);
            median.repeat_secs = repeat_secs;
            median
        })
        .collect()
}

/// One line per repeated row: every run's duration in the order they ran, and the median the row shows.
pub fn lines(rows: &[SyncRow]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.repeat_secs.len() > 1)
        .map(|r| {
            let runs: Vec<String> = r.repeat_secs.iter().map(|s| secs(*s)).collect();
            format!(
                "{:>9} {:>7} {} {:<22} median {} of {}",
                bytes(r.volume_bytes),
                r.change_percent.map_or_else(|| "-".to_owned(), percent),
                r.kind.name(),
                r.tool,
                secs(r.duration_secs),
                runs.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{SyncKind, BLOCKMOVER, MANIFEST};

    fn row(tool: &'static str, duration: f64, cpu: f64) -> SyncRow {
        SyncRow {
            tool,
            kind: SyncKind::Incremental,
            sync_kind: None,
            volume_bytes: 1 << 30,
            change_percent: Some(1.0),
            changed_blocks: Some(10),
            duration_secs: duration,
            scan_bytes_per_sec: 0.0,
            wire_sent: 0,
            wire_received: 0,
            chunks_sent: None,
            blocks_sent: None,
            data_bytes: None,
            compressed_bytes: None,
            bytes_read_source: None,
            bytes_read_destination: None,
            rss_source: None,
            rss_destination: None,
            cpu_source_secs: Some(cpu),
            cpu_destination_secs: None,
            max_rpo_secs: 0.0,
            hashed_share_of_raw: None,
            verified: true,
            wire_send_rate: None,
            zstd_levels: None,
            repeat_secs: Vec::new(),
        }
    }

    #[test]
    fn each_tool_keeps_its_median_run_whole_and_every_duration_in_order() {
        // Three rounds of two tools, interleaved as they ran.
        let rows = vec![
            row(BLOCKMOVER, 0.9, 1.0),
            row(MANIFEST, 0.4, 2.0),
            row(BLOCKMOVER, 0.5, 3.0),
            row(MANIFEST, 0.6, 4.0),
            row(BLOCKMOVER, 0.7, 5.0),
            row(MANIFEST, 0.5, 6.0),
        ];
        let merged = merge(rows, 3);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].tool, BLOCKMOVER);
        assert_eq!(merged[0].duration_secs, 0.7);
        assert_eq!(
            merged[0].cpu_source_secs,
            Some(5.0),
            "the median run's own figures"
        );
        assert_eq!(merged[0].repeat_secs, vec![0.9, 0.5, 0.7]);
        assert_eq!(merged[1].tool, MANIFEST);
        assert_eq!(merged[1].duration_secs, 0.5);
        assert_eq!(merged[1].cpu_source_secs, Some(6.0));
        assert_eq!(merged[1].repeat_secs, vec![0.4, 0.6, 0.5]);
        let lines = lines(&merged);
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].contains("median 0.70 s of 0.90 s, 0.50 s, 0.70 s"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn an_even_count_takes_the_lower_middle_run_and_one_round_changes_nothing() {
        let rows: Vec<SyncRow> = [0.8, 0.2, 0.6, 0.4]
            .iter()
            .map(|d| row(BLOCKMOVER, *d, *d))
            .collect();
        let merged = merge(rows.clone(), 4);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].duration_secs, 0.4);
        let same = merge(rows, 1);
        assert_eq!(same.len(), 4);
        assert!(same.iter().all(|r| r.repeat_secs.is_empty()));
        assert!(lines(&same).is_empty());
    }
}
