//! The text exposition of [`Metrics`]: VolSync's metrics first, then blockmover's.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::{scan_rate, wire_rate, Metrics, Rejection, METHOD, QUANTILES, SUMMARY_MAX_AGE};
use crate::codec::{Fallback, SyncKind};
use crate::schedule::out_of_sync;
use crate::stats::{get, Figures};

impl Metrics {
    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let now = self.clock.now();
        let mut st = self.state();
        let cutoff =
            now - chrono::Duration::from_std(SUMMARY_MAX_AGE).unwrap_or(chrono::Duration::days(1));
        while st.durations.front().is_some_and(|(t, _)| *t < cutoff) {
            st.durations.pop_front();
        }
        let labels = self.label_text();
        let mut out = String::new();

        head(
            &mut out,
            "volsync_sync_duration_seconds",
            "summary",
            "Duration of the synchronization interval in seconds",
        );
        let mut values: Vec<f64> = st.durations.iter().map(|(_, v)| *v).collect();
        values.sort_by(f64::total_cmp);
        for q in QUANTILES {
            let _ = writeln!(
                out,
                "volsync_sync_duration_seconds{{{labels},quantile=\"{q}\"}} {}",
                number(quantile(&values, q))
            );
        }
        sample(
            &mut out,
            "volsync_sync_duration_seconds_sum",
            &labels,
            st.duration_sum,
        );
        sample(
            &mut out,
            "volsync_sync_duration_seconds_count",
            &labels,
            st.duration_count as f64,
        );

        let missed = st.missed as f64;
        metric(
            &mut out,
            "volsync_missed_intervals_total",
            "counter",
            "The number of times a synchronization failed to complete before the next scheduled start",
            &labels,
            missed,
        );
        let oos = out_of_sync(self.schedule.as_ref(), st.last_sync, st.latest_failed, now);
        metric(
            &mut out,
            "volsync_volume_out_of_sync",
            "gauge",
            "Set to 1 if the volume is not properly synchronized",
            &labels,
            f64::from(u8::from(oos)),
        );

        let t = st.totals;
        let live = |f: fn(&Figures) -> u64| st.current.as_ref().map_or(0, |c| f(&c.figures));
        let counters: [(&str, &str, u64); 6] = [
            (
                "blockmover_wire_sent_bytes_total",
                "Bytes sent on the socket (TCP payload including TLS), all syncs",
                t.wire_sent + live(|f| get(&f.wire.sent)),
            ),
            (
                "blockmover_wire_received_bytes_total",
                "Bytes received on the socket (TCP payload including TLS), all syncs",
                t.wire_received + live(|f| get(&f.wire.received)),
            ),
            (
                "blockmover_chunks_sent_total",
                "Chunks that travelled as DATA, all syncs",
                t.chunks_sent + live(|f| get(&f.chunks_sent)),
            ),
            (
                "blockmover_blocks_sent_total",
                "4 KiB blocks carried as data, all syncs",
                t.blocks_sent + live(|f| get(&f.blocks_sent)),
            ),
            (
                "blockmover_data_bytes_total",
                "Raw bytes of the blocks carried (before compression), all syncs",
                t.data_bytes + live(|f| get(&f.data_bytes)),
            ),
            (
                "blockmover_scanned_bytes_total",
                "Bytes read and hashed from the local volume or target, all syncs",
                t.bytes_read + live(|f| get(&f.bytes_read)),
            ),
        ];
        for (name, help, value) in counters {
            metric(&mut out, name, "counter", help, &labels, value as f64);
        }
        head(
            &mut out,
            "blockmover_syncs_total",
            "counter",
            "Syncs that ended, by result",
        );
        for (result, n) in [("Successful", t.succeeded), ("Failed", t.failed)] {
            sample(
                &mut out,
                "blockmover_syncs_total",
                &format!("{labels},result=\"{result}\""),
                n as f64,
            );
        }
        head(
            &mut out,
            "blockmover_rejected_connections_total",
            "counter",
            "Connections turned away before a sync (not authenticated, busy, overload), by reason",
        );
        for (why, n) in Rejection::ALL.iter().zip(t.rejected) {
            sample(
                &mut out,
                "blockmover_rejected_connections_total",
                &format!("{labels},reason=\"{}\"", why.as_str()),
                n as f64,
            );
        }

        head(
            &mut out,
            "blockmover_syncs_by_kind_total",
            "counter",
            "Successful syncs by kind: a full comparison, or a delta by manifest or by change list",
        );
        for kind in [SyncKind::Full, SyncKind::Manifest, SyncKind::ChangeList] {
            sample(
                &mut out,
                "blockmover_syncs_by_kind_total",
                &format!("{labels},kind=\"{}\"", kind.name()),
                t.by_kind[usize::from(kind.code())] as f64,
            );
        }
        head(
            &mut out,
            "blockmover_full_comparisons_total",
            "counter",
            "Successful full comparisons, by why no delta ran (a state directory missing, a manifest unusable, verification, ...)",
        );
        for code in 1..super::FALLBACKS {
            let reason = Fallback::from_code(code as u8);
            sample(
                &mut out,
                "blockmover_full_comparisons_total",
                &format!("{labels},reason=\"{}\"", reason.key()),
                t.full_reasons[code] as f64,
            );
        }
        head(
            &mut out,
            "blockmover_repaired_chunks_total",
            "counter",
            "Chunks that did not hold what a delta assumed, repaired, by finding: change-list-missed and target-drift found by a full comparison, pushed-blocks-missed by a delta whose pushed blocks did not rebuild the chunk",
        );
        for (finding, n) in [
            ("change-list-missed", t.missed_by_change_list),
            ("target-drift", t.target_drift),
            ("pushed-blocks-missed", t.push_missed),
        ] {
            sample(
                &mut out,
                "blockmover_repaired_chunks_total",
                &format!("{labels},finding=\"{finding}\""),
                n as f64,
            );
        }

        let (in_progress, scanned, total, rate, (wire, limit)) = match &st.current {
            Some(c) => (
                1.0,
                get(&c.figures.bytes_read) as f64,
                get(&c.figures.volume_size) as f64,
                scan_rate(&c.figures, c.since.elapsed()),
                wire_rate(&c.figures, c.since.elapsed()),
            ),
            None => (0.0, 0.0, 0.0, st.last_scan_rate, st.last_wire_rate),
        };
        let gauges: [(&str, &str, f64); 6] = [
            (
                "blockmover_sync_in_progress",
                "1 while a sync is under way",
                in_progress,
            ),
            (
                "blockmover_progress_scanned_bytes",
                "Bytes scanned so far by the sync under way (0 when idle)",
                scanned,
            ),
            (
                "blockmover_progress_total_bytes",
                "Volume size of the sync under way (0 when idle or not yet known)",
                total,
            ),
            (
                "blockmover_scan_rate_bytes_per_second",
                "Scan rate of the sync under way, or of the last one when idle",
                rate,
            ),
            (
                "blockmover_wire_send_rate_bytes_per_second",
                "Bytes per second this agent sent on the wire in the sync under way, or in the last one when idle",
                wire,
            ),
            (
                "blockmover_bwlimit_bytes_per_second",
                "The source's --bwlimit for the sync under way or the last one (0: no limit)",
                limit,
            ),
        ];
        for (name, help, value) in gauges {
            metric(&mut out, name, "gauge", help, &labels, value);
        }
        let stamp = |t: Option<DateTime<Utc>>| t.map_or(0.0, |t| t.timestamp_millis() as f64 / 1e3);
        metric(
            &mut out,
            "blockmover_last_sync_timestamp_seconds",
            "gauge",
            "Unix time of the last successful sync (0 if none)",
            &labels,
            stamp(st.last_sync),
        );
        // +Inf before any successful sync: everything would be lost, and an alert on the age fires.
        let age = st.image_time.map_or(f64::INFINITY, |t| {
            (now - t).num_milliseconds().max(0) as f64 / 1e3
        });
        metric(
            &mut out,
            "blockmover_data_age_seconds",
            "gauge",
            "Seconds since the image the destination holds was read (the start of the last successful sync): the data a disaster now would lose",
            &labels,
            age,
        );
        metric(
            &mut out,
            "blockmover_next_sync_timestamp_seconds",
            "gauge",
            "Unix time the next scheduled sync is due (0 without a schedule)",
            &labels,
            stamp(st.next_sync),
        );
        out
    }

    fn label_text(&self) -> String {
        format!(
            "obj_name=\"{}\",obj_namespace=\"{}\",role=\"{}\",method=\"{METHOD}\"",
            escape(&self.labels.name),
            escape(&self.labels.namespace),
            self.labels.role.as_str()
        )
    }
}

/// The `q` quantile of sorted `values` (nearest rank); NaN when empty, as Prometheus clients report it.
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

pub(super) fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: f64) {
    let _ = writeln!(out, "{name}{{{labels}}} {}", number(value));
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, labels: &str, value: f64) {
    head(out, name, kind, help);
    sample(out, name, labels, value);
}

/// A sample value as the text format spells it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub(super) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
