//! Prometheus metrics of one agent: VolSync's `volsync_*` metrics with its names and labels, and blockmover's
//! own `blockmover_*` figures, rendered in the Prometheus text exposition format (version 0.0.4) and served over
//! HTTP by [`http`].
//!
//! Why hand-rendered: VolSync's `volsync_sync_duration_seconds` is a *summary* (quantiles 0.5, 0.9, 0.99 over the
//! last 24 h), and the `prometheus-client` crate has no summary type; the text format is a few lines per metric
//! and is checked in the tests by an independent parser (`prometheus-parse`).
//!
//! Invariants: counters only grow (a sync's figures move from "under way" to "completed" in one step under the
//! lock); `volsync_volume_out_of_sync` is computed at each scrape from the clock, so a deadline missed while the
//! agent waits shows without a sync.

pub mod http;
mod render;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::schedule::{Clock, Schedule};
use crate::stats::{get, Figures};
use crate::status::Role;

/// VolSync's `method` label for this mover.
pub const METHOD: &str = "blockmover";

/// How long a duration observation counts in the summary's quantiles (VolSync's MaxAge).
pub const SUMMARY_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The most duration observations kept (one sync a minute for a day is 1440).
const SUMMARY_MAX_SAMPLES: usize = 10_000;

/// The quantiles of `volsync_sync_duration_seconds` (VolSync's objectives 0.5, 0.9, 0.99).
const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

/// The labels every metric carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Labels {
    /// `obj_name`: the ReplicationSource / ReplicationDestination name.
    pub name: String,
    /// `obj_namespace`: its namespace.
    pub namespace: String,
    /// `role`: `source` or `destination`.
    pub role: Role,
}

/// Fallback reason codes counted (0 is "none": a delta).
pub(super) const FALLBACKS: usize = 11;

/// Totals of the syncs that ended.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    wire_sent: u64,
    wire_received: u64,
    chunks_sent: u64,
    blocks_sent: u64,
    data_bytes: u64,
    bytes_read: u64,
    succeeded: u64,
    failed: u64,
    /// Connections turned away before a sync, by [`Rejection`].
    rejected: [u64; Rejection::ALL.len()],
    /// Successful syncs by kind: full, delta by manifest, delta by change list.
    by_kind: [u64; 3],
    /// Successful full comparisons by why no delta ran ([`Fallback`] codes 1 to 10).
    full_reasons: [u64; FALLBACKS],
    /// Chunks a full comparison repaired that a delta had missed: not in a change list (source), not what the
    /// manifest said (destination).
    missed_by_change_list: u64,
    target_drift: u64,
    /// Destination: pushed chunks whose listed blocks did not rebuild the source's chunk, repaired in the same
    /// delta through NEED.
    push_missed: u64,
}

/// Why a destination turned a connection away without starting a sync (the `reason` label of
/// `blockmover_rejected_connections_total`). None of them changes the status or the sync metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The peer's key proof did not verify (or it rejected ours).
    Auth,
    /// TLS failed, or the peer sent something that is not this protocol before HELLO.
    Handshake,
    /// The TLS handshake, the key exchange or HELLO took longer than the handshake timeout.
    Timeout,
    /// A different source while a sync ran (it was sent ABORT Busy).
    Busy,
    /// Dropped unfinished to make room: too many handshakes in flight, or no file descriptor left.
    Overload,
}

impl Rejection {
    /// Every reason, in label order.
    pub const ALL: [Rejection; 5] = [
        Rejection::Auth,
        Rejection::Handshake,
        Rejection::Timeout,
        Rejection::Busy,
        Rejection::Overload,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Auth => "auth",
            Rejection::Handshake => "handshake",
            Rejection::Timeout => "timeout",
            Rejection::Busy => "busy",
            Rejection::Overload => "overload",
        }
    }
}

/// The sync under way.
#[derive(Debug)]
struct Current {
    figures: Arc<Figures>,
    since: Instant,
    previous_last_sync: Option<DateTime<Utc>>,
}

#[derive(Debug)]
struct State {
    current: Option<Current>,
    totals: Totals,
    last_sync: Option<DateTime<Utc>>,
    latest_failed: bool,
    missed: u64,
    durations: VecDeque<(DateTime<Utc>, f64)>,
    duration_sum: f64,
    duration_count: u64,
    last_scan_rate: f64,
    /// Wire bytes sent per second by the last sync, and its `--bwlimit` (0: none).
    last_wire_rate: (f64, f64),
    next_sync: Option<DateTime<Utc>>,
    /// When the image of the last successful sync was read (its start): the data age counts from here.
    image_time: Option<DateTime<Utc>>,
}

/// The metrics of one agent, shared between its syncs and the HTTP server.
#[derive(Debug)]
pub struct Metrics {
    labels: Labels,
    schedule: Option<Schedule>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl Metrics {
    /// Metrics for an agent with `labels` and `schedule`, whose previous successful sync (from its status file)
    /// was at `last_sync`.
    pub fn new(
        labels: Labels,
        schedule: Option<Schedule>,
        clock: Arc<dyn Clock>,
        last_sync: Option<DateTime<Utc>>,
    ) -> Metrics {
        let next_sync = schedule
            .as_ref()
            .zip(last_sync)
            .and_then(|(s, t)| s.next_after(t));
        Metrics {
            labels,
            schedule,
            clock,
            state: Mutex::new(State {
                current: None,
                totals: Totals::default(),
                last_sync,
                latest_failed: false,
                missed: 0,
                durations: VecDeque::new(),
                duration_sum: 0.0,
                duration_count: 0,
                last_scan_rate: 0.0,
                last_wire_rate: (0.0, 0.0),
                next_sync,
                image_time: None,
            }),
        }
    }

    /// When the image of the previous successful sync (from the status file) was read.
    pub fn set_image_time(&self, at: Option<DateTime<Utc>>) {
        self.state().image_time = at;
    }

    /// The schedule the deadlines are counted against.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent counters: keep serving them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sync starts; its `figures` fill as it runs. Counts the previous one as ended if it was not reported.
    pub fn started(&self, figures: Arc<Figures>) {
        let mut st = self.state();
        if st.current.is_some() {
            drop(st);
            self.finished(false, Duration::ZERO);
            st = self.state();
        }
        st.current = Some(Current {
            figures,
            since: Instant::now(),
            previous_last_sync: st.last_sync,
        });
    }

    /// A connection was turned away before it could start a sync.
    pub fn rejected(&self, why: Rejection) {
        let i = Rejection::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.state().totals.rejected[i] += 1;
    }

    /// Whether a sync is under way.
    pub fn in_progress(&self) -> bool {
        self.state().current.is_some()
    }

    /// The sync under way ended, successfully or not, after `duration`. A success observes the duration, counts a
    /// missed interval when it completes after its deadline (`next(next(lastSyncTime))` before now), and clears
    /// the out-of-sync gauge; a failure sets it.
    pub fn finished(&self, ok: bool, duration: Duration) {
        let now = self.clock.now();
        let mut st = self.state();
        let previous = st.current.take();
        if let Some(cur) = &previous {
            let f = &cur.figures;
            let t = &mut st.totals;
            t.wire_sent += get(&f.wire.sent);
            t.wire_received += get(&f.wire.received);
            t.chunks_sent += get(&f.chunks_sent);
            t.blocks_sent += get(&f.blocks_sent);
            t.data_bytes += get(&f.data_bytes);
            t.bytes_read += get(&f.bytes_read);
            t.missed_by_change_list += get(&f.change_list_missed);
            t.target_drift += get(&f.target_drift);
            t.push_missed += get(&f.push_missed);
            if let (true, Some((kind, reason))) = (ok, f.kind()) {
                t.by_kind[usize::from(kind.code()).min(2)] += 1;
                if let Some(n) = t.full_reasons.get_mut(usize::from(reason.code())) {
                    *n += u64::from(kind == crate::codec::SyncKind::Full);
                }
            }
            st.last_scan_rate = scan_rate(f, cur.since.elapsed());
            st.last_wire_rate = wire_rate(f, cur.since.elapsed());
        }
        if ok {
            st.totals.succeeded += 1;
            let prev_last = previous.and_then(|c| c.previous_last_sync);
            if let (Some(s), Some(last)) = (&self.schedule, prev_last) {
                if s.deadline_missed(last, now) {
                    st.missed += 1;
                }
            }
            st.last_sync = Some(now);
            st.image_time = chrono::Duration::from_std(duration).ok().map(|d| now - d);
            st.latest_failed = false;
            st.next_sync = self.schedule.as_ref().and_then(|s| s.next_after(now));
            let secs = duration.as_secs_f64();
            st.durations.push_back((now, secs));
            if st.durations.len() > SUMMARY_MAX_SAMPLES {
                st.durations.pop_front();
            }
            st.duration_sum += secs;
            st.duration_count += 1;
        } else {
            st.totals.failed += 1;
            st.latest_failed = true;
        }
    }
}

/// Bytes scanned per second over `elapsed`.
/// Wire bytes sent per second over `elapsed`, and the sync's rate limit (0: none).
fn wire_rate(f: &Figures, elapsed: Duration) -> (f64, f64) {
    let secs = elapsed.as_secs_f64();
    let sent = if secs <= 0.0 {
        0.0
    } else {
        get(&f.wire.sent) as f64 / secs
    };
    (sent, get(&f.rate_limit) as f64)
}

fn scan_rate(f: &Figures, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        get(&f.bytes_read) as f64 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::fake::{t, FakeClock};
    use crate::stats::add;

    fn labels() -> Labels {
        Labels {
            name: "vm-\"disk\"".to_owned(),
            namespace: "ns".to_owned(),
            role: Role::Source,
        }
    }

    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn missed_interval_counted_when_a_sync_completes_after_its_deadline() -> anyhow::Result<()> {
        let clock = Arc::new(FakeClock::at(t(18, 0, 0)));
        let m = Metrics::new(
            labels(),
            Some(Schedule::parse("*/5 * * * *")?),
            clock.clone(),
            None,
        );
        assert_eq!(value(&m.render(), "volsync_volume_out_of_sync{"), Some(1.0));
        m.started(Arc::new(Figures::default()));
        m.finished(true, Duration::from_secs(3));
        let r = m.render();
        assert_eq!(value(&r, "volsync_volume_out_of_sync{"), Some(0.0));
        assert_eq!(value(&r, "volsync_missed_intervals_total{"), Some(0.0));
        // Last sync 18:00:00, next 18:05, deadline 18:10: still in sync at 18:10:00.
        clock.set(t(18, 10, 0));
        assert_eq!(value(&m.render(), "volsync_volume_out_of_sync{"), Some(0.0));
        clock.set(t(18, 10, 1));
        assert_eq!(value(&m.render(), "volsync_volume_out_of_sync{"), Some(1.0));
        m.started(Arc::new(Figures::default()));
        m.finished(true, Duration::from_secs(5));
        let r = m.render();
        assert_eq!(value(&r, "volsync_missed_intervals_total{"), Some(1.0));
        assert_eq!(value(&r, "volsync_volume_out_of_sync{"), Some(0.0));
        assert_eq!(value(&r, "volsync_sync_duration_seconds_count{"), Some(2.0));
        assert_eq!(value(&r, "volsync_sync_duration_seconds_sum{"), Some(8.0));
        assert_eq!(
            value(&r, "blockmover_next_sync_timestamp_seconds{"),
            Some(t(18, 15, 0).timestamp() as f64)
        );
        Ok(())
    }

    #[test]
    fn successful_syncs_are_counted_by_kind_and_full_comparisons_by_reason() {
        use crate::codec::{Fallback, SyncKind};
        let m = Metrics::new(labels(), None, Arc::new(FakeClock::at(t(18, 0, 0))), None);
        for (kind, reason, ok) in [
            (SyncKind::Full, Fallback::SourceNoManifest, true),
            (SyncKind::Manifest, Fallback::None, true),
            (SyncKind::Full, Fallback::DestinationTargetChanged, false),
            (SyncKind::Full, Fallback::DestinationTargetChanged, true),
        ] {
            let f = Arc::new(Figures::default());
            f.set_kind(kind, reason);
            m.started(f);
            m.finished(ok, Duration::from_secs(1));
        }
        let r = m.render();
        let count = |name: &str, label: &str| {
            r.lines()
                .find(|l| l.starts_with(name) && l.contains(label))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        assert_eq!(
            count("blockmover_syncs_by_kind_total", "kind=\"full\""),
            Some(2.0)
        );
        assert_eq!(
            count("blockmover_syncs_by_kind_total", "kind=\"delta-manifest\""),
            Some(1.0)
        );
        assert_eq!(
            count(
                "blockmover_syncs_by_kind_total",
                "kind=\"delta-changelist\""
            ),
            Some(0.0)
        );
        let full = "blockmover_full_comparisons_total";
        assert_eq!(count(full, "reason=\"source-no-manifest\""), Some(1.0));
        assert_eq!(
            count(full, "reason=\"destination-target-changed\""),
            Some(1.0),
            "the failed one is not counted"
        );
        assert_eq!(count(full, "reason=\"bases-differ\""), Some(0.0));
    }

    #[test]
    fn data_age_counts_from_the_start_of_the_last_successful_sync() {
        let clock = Arc::new(FakeClock::at(t(18, 0, 0)));
        let m = Metrics::new(labels(), None, clock.clone(), None);
        let age = |m: &Metrics| value(&m.render(), "blockmover_data_age_seconds{");
        assert_eq!(
            age(&m),
            Some(f64::INFINITY),
            "never synced: everything is at risk"
        );
        m.set_image_time(Some(t(17, 59, 0)));
        assert_eq!(age(&m), Some(60.0));
        clock.set(t(18, 1, 0));
        m.started(Arc::new(Figures::default()));
        m.finished(true, Duration::from_secs(20));
        assert_eq!(
            age(&m),
            Some(20.0),
            "the image was read when that sync started"
        );
        clock.advance(100);
        m.started(Arc::new(Figures::default()));
        m.finished(false, Duration::from_secs(5));
        assert_eq!(
            age(&m),
            Some(120.0),
            "a failed sync does not refresh the image"
        );
    }

    #[test]
    fn failure_sets_out_of_sync_until_the_next_success() {
        let clock = Arc::new(FakeClock::at(t(18, 0, 0)));
        let m = Metrics::new(labels(), None, clock, Some(t(17, 0, 0)));
        assert_eq!(value(&m.render(), "volsync_volume_out_of_sync{"), Some(0.0));
        m.started(Arc::new(Figures::default()));
        assert_eq!(
            value(&m.render(), "blockmover_sync_in_progress{"),
            Some(1.0)
        );
        m.finished(false, Duration::from_secs(1));
        let r = m.render();
        assert_eq!(value(&r, "volsync_volume_out_of_sync{"), Some(1.0));
        assert!(r.contains("result=\"Failed\"} 1\n"), "{r}");
        // A failed sync is not a duration observation.
        assert_eq!(value(&r, "volsync_sync_duration_seconds_count{"), Some(0.0));
        m.started(Arc::new(Figures::default()));
        m.finished(true, Duration::from_secs(1));
        assert_eq!(value(&m.render(), "volsync_volume_out_of_sync{"), Some(0.0));
    }

    #[test]
    fn counters_include_the_sync_under_way_and_never_go_back() {
        let clock = Arc::new(FakeClock::at(t(18, 0, 0)));
        let m = Metrics::new(labels(), None, clock, None);
        let f = Arc::new(Figures::default());
        m.started(f.clone());
        add(&f.wire.sent, 100);
        add(&f.bytes_read, 4096);
        add(&f.volume_size, 8192);
        let r = m.render();
        assert_eq!(value(&r, "blockmover_wire_sent_bytes_total{"), Some(100.0));
        assert_eq!(
            value(&r, "blockmover_progress_scanned_bytes{"),
            Some(4096.0)
        );
        assert_eq!(value(&r, "blockmover_progress_total_bytes{"), Some(8192.0));
        m.finished(true, Duration::from_secs(1));
        let r = m.render();
        assert_eq!(value(&r, "blockmover_wire_sent_bytes_total{"), Some(100.0));
        assert_eq!(value(&r, "blockmover_progress_scanned_bytes{"), Some(0.0));
        assert_eq!(value(&r, "blockmover_sync_in_progress{"), Some(0.0));
    }

    #[test]
    fn repaired_chunks_are_counted_by_finding_across_syncs() {
        let m = Metrics::new(labels(), None, Arc::new(FakeClock::at(t(18, 0, 0))), None);
        for (missed, drift, pushed) in [(1, 0, 2), (0, 3, 5)] {
            let f = Arc::new(Figures::default());
            m.started(f.clone());
            add(&f.change_list_missed, missed);
            add(&f.target_drift, drift);
            add(&f.push_missed, pushed);
            m.finished(true, Duration::from_secs(1));
        }
        let r = m.render();
        let repaired = |finding: &str| {
            let tail = format!("finding=\"{finding}\"}}");
            r.lines()
                .find(|l| l.starts_with("blockmover_repaired_chunks_total{") && l.contains(&tail))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        assert_eq!(repaired("change-list-missed"), Some(1.0), "{r}");
        assert_eq!(repaired("target-drift"), Some(3.0), "{r}");
        assert_eq!(repaired("pushed-blocks-missed"), Some(7.0), "{r}");
    }

    #[test]
    fn summary_quantiles_are_nan_when_empty_and_forget_observations_after_a_day() {
        let clock = Arc::new(FakeClock::at(t(0, 0, 0)));
        let m = Metrics::new(labels(), None, clock.clone(), None);
        assert!(m.render().contains("quantile=\"0.5\"} NaN\n"));
        for secs in [1, 2, 3, 4, 100] {
            m.started(Arc::new(Figures::default()));
            m.finished(true, Duration::from_secs(secs));
        }
        let r = m.render();
        assert!(r.contains("quantile=\"0.5\"} 3\n"), "{r}");
        assert!(r.contains("quantile=\"0.99\"} 100\n"), "{r}");
        clock.set(t(0, 0, 0) + chrono::Duration::hours(25));
        let r = m.render();
        assert!(r.contains("quantile=\"0.9\"} NaN\n"), "{r}");
        // _sum and _count are cumulative, as in Prometheus clients.
        assert_eq!(value(&r, "volsync_sync_duration_seconds_count{"), Some(5.0));
    }

    #[test]
    fn labels_are_escaped_and_carry_volsyncs_names() {
        let clock = Arc::new(FakeClock::at(t(0, 0, 0)));
        let m = Metrics::new(labels(), None, clock, None);
        let r = m.render();
        assert!(
            r.contains(
                "volsync_missed_intervals_total{obj_name=\"vm-\\\"disk\\\"\",obj_namespace=\"ns\",\
                 role=\"source\",method=\"blockmover\"} 0\n"
            ),
            "{r}"
        );
    }
}
