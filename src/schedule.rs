//! When to sync: cron schedules, manual triggers, retries after a failure, missed deadlines, all as pure
//! functions of `now` (the [`Clock`] is the only source of time), so they are tested without waiting.
//!
//! Semantics follow VolSync's triggers (see `../shared/volsync/CONTRACT.md`, "Triggers"):
//! - the first sync runs at start, whatever the schedule;
//! - after a successful sync, `nextSyncTime` is the next cron time after `lastSyncTime` (the completion time);
//! - a manual token that differs from `lastManualSync` starts a sync at once; the token is recorded as
//!   `lastManualSync` when that sync succeeds;
//! - a deadline is missed when `next(next(lastSyncTime))` is before now.
//!
//! blockmover's own choice (VolSync's controller retries failed movers with backoff too): after a failed sync the
//! next attempt comes after [`retry_delay`] (2 s doubling to at most 5 min) whatever the schedule says, until one
//! succeeds; a new manual token does not wait for the backoff.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// The longest wait between retries of a failing sync.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The first retry's wait; each further failure doubles it.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(2);

/// A source of the current time; tests substitute a fake one.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The system clock, shared.
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// A schedule that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid schedule {text:?}: {reason}")]
pub struct ScheduleError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A cron schedule: five fields (minute hour day-of-month month day-of-week) or a descriptor
/// (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`, `@annually`), evaluated in UTC as VolSync does.
#[derive(Clone, Debug)]
pub struct Schedule {
    text: String,
    cron: Cron,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Schedule {
    /// Parses `text`. Six- or seven-field forms (seconds, years) are refused: VolSync takes five fields only.
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let err = |reason: String| ScheduleError {
            text: text.to_owned(),
            reason,
        };
        let trimmed = text.trim();
        const DESCRIPTORS: [&str; 6] = [
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
        ];
        if trimmed.starts_with('@') {
            if !DESCRIPTORS.iter().any(|d| d.eq_ignore_ascii_case(trimmed)) {
                return Err(err(format!(
                    "unknown descriptor; use one of {}",
                    DESCRIPTORS.join(", ")
                )));
            }
        } else if trimmed.split_whitespace().count() != 5 {
            return Err(err(
                "expected five fields: minute hour day-of-month month day-of-week".to_owned(),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(trimmed)
            .map_err(|e| err(e.to_string()))?;
        Ok(Schedule {
            text: trimmed.to_owned(),
            cron,
        })
    }

    /// The schedule as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first cron time strictly after `t`; `None` when there is none (an impossible date such as Feb 30).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }

    /// Whether the deadline after `last_sync` is missed at `now`: `next(next(last_sync)) < now`.
    pub fn deadline_missed(&self, last_sync: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.next_after(last_sync)
            .and_then(|n| self.next_after(n))
            .is_some_and(|deadline| deadline < now)
    }
}

/// Whether the volume counts as out of sync (VolSync's `volsync_volume_out_of_sync`): no successful sync yet, the
/// latest sync failed, or the deadline after the last successful one is missed.
pub fn out_of_sync(
    schedule: Option<&Schedule>,
    last_sync: Option<DateTime<Utc>>,
    latest_failed: bool,
    now: DateTime<Utc>,
) -> bool {
    match last_sync {
        None => true,
        Some(_) if latest_failed => true,
        Some(last) => schedule.is_some_and(|s| s.deadline_missed(last, now)),
    }
}

/// The wait before retry number `failures` (1 for the first failure): 2 s, 4 s, 8 s, ... at most 5 min.
pub fn retry_delay(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_RETRY_DELAY
        .saturating_mul(1 << shift)
        .min(MAX_RETRY_DELAY)
}

/// Why a sync starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The agent just started: the first sync runs at once.
    Start,
    /// The schedule's time came.
    Schedule,
    /// A manual token differing from `lastManualSync` was requested.
    Manual(String),
    /// A previous sync failed and its backoff is over.
    Retry,
}

/// What to do at a given time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Sync now.
    Now(Reason),
    /// Nothing until this time (or a manual request).
    At(DateTime<Utc>),
    /// Nothing until a manual request (no schedule).
    Manual,
}

/// The scheduling state of a long-running agent; every decision is a pure function of it and `now`.
#[derive(Clone, Debug)]
pub struct Planner {
    schedule: Option<Schedule>,
    started: bool,
    last_sync: Option<DateTime<Utc>>,
    last_manual: Option<String>,
    failures: u32,
    retry_at: Option<DateTime<Utc>>,
    failed_manual: Option<String>,
}

impl Planner {
    /// A planner for `schedule` (none: only manual requests after the first sync), knowing the previous
    /// `lastSyncTime` and `lastManualSync` (from the status file of an earlier run).
    pub fn new(
        schedule: Option<Schedule>,
        last_sync: Option<DateTime<Utc>>,
        last_manual: Option<String>,
    ) -> Planner {
        Planner {
            schedule,
            started: false,
            last_sync,
            last_manual,
            failures: 0,
            retry_at: None,
            failed_manual: None,
        }
    }

    /// The schedule, if any.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref()
    }

    /// The last successful sync.
    pub fn last_sync(&self) -> Option<DateTime<Utc>> {
        self.last_sync
    }

    /// The manual token of the last successful sync (`lastManualSync`).
    pub fn last_manual(&self) -> Option<&str> {
        self.last_manual.as_deref()
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// `nextSyncTime`: the next cron time after the last successful sync.
    pub fn next_sync_time(&self) -> Option<DateTime<Utc>> {
        let s = self.schedule.as_ref()?;
        s.next_after(self.last_sync?)
    }

    /// What to do at `now`, given the manual token requested (the trigger file's content), if any.
    pub fn due(&self, now: DateTime<Utc>, requested: Option<&str>) -> Due {
        if !self.started {
            return Due::Now(Reason::Start);
        }
        if let Some(token) = requested {
            let satisfied = self.last_manual.as_deref() == Some(token);
            // A token whose sync failed waits for the backoff like any retry; a new token does not.
            let backing_off = self.failed_manual.as_deref() == Some(token);
            if !satisfied && !backing_off {
                return Due::Now(Reason::Manual(token.to_owned()));
            }
        }
        if let Some(at) = self.retry_at {
            return if now >= at {
                Due::Now(Reason::Retry)
            } else {
                Due::At(at)
            };
        }
        match (&self.schedule, self.last_sync) {
            (None, _) => Due::Manual,
            (Some(_), None) => Due::Now(Reason::Schedule),
            (Some(s), Some(last)) => match s.next_after(last) {
                Some(next) if now >= next => Due::Now(Reason::Schedule),
                Some(next) => Due::At(next),
                None => Due::Manual,
            },
        }
    }

    /// Records the end of a sync at `now`; `manual` is the token that sync was started for (or satisfied).
    pub fn completed(&mut self, now: DateTime<Utc>, ok: bool, manual: Option<String>) {
        self.started = true;
        if ok {
            self.last_sync = Some(now);
            self.failures = 0;
            self.retry_at = None;
            self.failed_manual = None;
            if manual.is_some() {
                self.last_manual = manual;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            let delay = chrono::Duration::from_std(retry_delay(self.failures))
                .unwrap_or(chrono::Duration::MAX);
            self.retry_at = Some(now + delay);
            self.failed_manual = manual;
        }
    }
}

/// Test clocks shared by the scheduling and metrics tests.
#[cfg(test)]
pub(crate) mod fake {
    use super::Clock;
    use chrono::{DateTime, TimeZone, Utc};
    use std::sync::Mutex;

    /// A clock that moves only when told to.
    #[derive(Debug)]
    pub struct FakeClock(Mutex<DateTime<Utc>>);

    impl FakeClock {
        pub fn at(t: DateTime<Utc>) -> FakeClock {
            FakeClock(Mutex::new(t))
        }
        pub fn advance(&self, secs: i64) {
            if let Ok(mut t) = self.0.lock() {
                *t += chrono::Duration::seconds(secs);
            }
        }
        pub fn set(&self, to: DateTime<Utc>) {
            if let Ok(mut t) = self.0.lock() {
                *t = to;
            }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> DateTime<Utc> {
            self.0.lock().map(|t| *t).unwrap_or_default()
        }
    }

    /// 2026-11-24 at h:m:s UTC.
    pub fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, h, m, s)
            .single()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{t, FakeClock};
    use super::*;

    fn every5() -> Schedule {
        Schedule::parse("*/5 * * * *").expect("valid")
    }

    #[test]
    fn five_field_cron_and_descriptors_parse() -> anyhow::Result<()> {
        for ok in [
            "*/5 * * * *",
            "0 3 * * 1-5",
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
            "@Daily",
        ] {
            Schedule::parse(ok)?;
        }
        let daily = Schedule::parse("@daily")?;
        assert_eq!(
            daily.next_after(t(18, 31, 54)),
            Some(t(0, 0, 0) + chrono::Duration::days(1))
        );
        let hourly = Schedule::parse("@hourly")?;
        assert_eq!(hourly.next_after(t(18, 31, 54)), Some(t(19, 0, 0)));
        Ok(())
    }

    #[test]
    fn seconds_fields_unknown_descriptors_and_garbage_are_refused() {
        for bad in [
            "",
            "* * * *",
            "0 */5 * * * *",
            "0 0 * * * * 2026",
            "@every 5m",
            "@reboot",
            "61 * * * *",
            "a b c d e",
        ] {
            let e = Schedule::parse(bad).err();
            assert!(e.is_some(), "{bad:?} was accepted");
            let text = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(text.starts_with("invalid schedule"), "{text}");
        }
    }

    #[test]
    fn next_sync_time_is_the_next_cron_time_after_the_last_sync() {
        let s = every5();
        assert_eq!(s.next_after(t(18, 31, 54)), Some(t(18, 35, 0)));
        // Strictly after: a sync ending exactly on a cron time waits for the next one.
        assert_eq!(s.next_after(t(18, 35, 0)), Some(t(18, 40, 0)));
        let mut p = Planner::new(Some(s), None, None);
        assert_eq!(p.next_sync_time(), None);
        p.completed(t(18, 31, 54), true, None);
        assert_eq!(p.next_sync_time(), Some(t(18, 35, 0)));
    }

    #[test]
    fn first_sync_runs_at_start_whatever_the_schedule() {
        let clock = FakeClock::at(t(18, 31, 54));
        // Even a yearly schedule with a recent lastSyncTime syncs at once on start.
        let p = Planner::new(
            Some(Schedule::parse("@yearly").expect("valid")),
            Some(t(18, 30, 0)),
            None,
        );
        assert_eq!(p.due(clock.now(), None), Due::Now(Reason::Start));
        let p = Planner::new(None, None, None);
        assert_eq!(p.due(clock.now(), None), Due::Now(Reason::Start));
    }

    #[test]
    fn scheduled_sync_becomes_due_when_the_clock_passes_next_sync_time() {
        let clock = FakeClock::at(t(18, 31, 54));
        let mut p = Planner::new(Some(every5()), None, None);
        p.completed(clock.now(), true, None);
        assert_eq!(p.due(clock.now(), None), Due::At(t(18, 35, 0)));
        clock.set(t(18, 34, 59));
        assert_eq!(p.due(clock.now(), None), Due::At(t(18, 35, 0)));
        clock.advance(1);
        assert_eq!(p.due(clock.now(), None), Due::Now(Reason::Schedule));
        p.completed(clock.now() + chrono::Duration::seconds(20), true, None);
        assert_eq!(p.next_sync_time(), Some(t(18, 40, 0)));
    }

    #[test]
    fn without_a_schedule_only_a_new_manual_token_starts_a_sync() {
        let mut p = Planner::new(None, None, Some("one".to_owned()));
        p.completed(t(10, 0, 0), true, None);
        assert_eq!(p.due(t(23, 0, 0), None), Due::Manual);
        assert_eq!(p.due(t(23, 0, 0), Some("one")), Due::Manual);
        assert_eq!(
            p.due(t(23, 0, 0), Some("two")),
            Due::Now(Reason::Manual("two".to_owned()))
        );
        p.completed(t(23, 0, 5), true, Some("two".to_owned()));
        assert_eq!(p.due(t(23, 0, 6), Some("two")), Due::Manual);
        assert_eq!(p.next_sync_time(), None);
    }

    #[test]
    fn manual_token_wins_over_a_schedule_that_is_not_due() {
        let mut p = Planner::new(Some(Schedule::parse("@daily").expect("valid")), None, None);
        p.completed(t(10, 0, 0), true, None);
        assert_eq!(
            p.due(t(10, 1, 0), Some("now")),
            Due::Now(Reason::Manual("now".to_owned()))
        );
    }

    #[test]
    fn failure_retries_with_doubling_backoff_capped_and_success_resets_it() {
        assert_eq!(retry_delay(1), Duration::from_secs(2));
        assert_eq!(retry_delay(2), Duration::from_secs(4));
        assert_eq!(retry_delay(5), Duration::from_secs(32));
        assert_eq!(retry_delay(9), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);

        let clock = FakeClock::at(t(18, 0, 0));
        let mut p = Planner::new(Some(every5()), None, None);
        p.completed(clock.now(), false, None);
        assert_eq!(p.due(clock.now(), None), Due::At(t(18, 0, 2)));
        clock.advance(2);
        assert_eq!(p.due(clock.now(), None), Due::Now(Reason::Retry));
        p.completed(clock.now(), false, None);
        assert_eq!(p.due(clock.now(), None), Due::At(t(18, 0, 6)));
        assert_eq!(p.failures(), 2);
        clock.advance(4);
        p.completed(clock.now(), true, None);
        assert_eq!(p.failures(), 0);
        assert_eq!(p.due(clock.now(), None), Due::At(t(18, 5, 0)));
    }

    #[test]
    fn failed_manual_token_backs_off_but_a_new_token_does_not() {
        let mut p = Planner::new(None, None, None);
        p.completed(t(9, 0, 0), true, None);
        p.completed(t(10, 0, 0), false, Some("a".to_owned()));
        assert_eq!(p.due(t(10, 0, 1), Some("a")), Due::At(t(10, 0, 2)));
        // The retry after the backoff satisfies the pending token (the agent passes it along).
        assert_eq!(p.due(t(10, 0, 2), Some("a")), Due::Now(Reason::Retry));
        assert_eq!(
            p.due(t(10, 0, 1), Some("b")),
            Due::Now(Reason::Manual("b".to_owned()))
        );
    }

    #[test]
    fn deadline_is_missed_only_after_next_of_next_sync_time() {
        let s = every5();
        let last = t(18, 31, 54);
        // next = 18:35, next(next) = 18:40.
        assert!(!s.deadline_missed(last, t(18, 35, 1)));
        assert!(!s.deadline_missed(last, t(18, 40, 0)));
        assert!(s.deadline_missed(last, t(18, 40, 1)));
    }

    #[test]
    fn out_of_sync_until_a_success_after_a_failure_and_after_a_missed_deadline() {
        let s = every5();
        let clock = FakeClock::at(t(18, 31, 54));
        assert!(out_of_sync(Some(&s), None, false, clock.now()));
        assert!(out_of_sync(None, None, false, clock.now()));
        assert!(!out_of_sync(
            Some(&s),
            Some(clock.now()),
            false,
            clock.now()
        ));
        assert!(out_of_sync(Some(&s), Some(clock.now()), true, clock.now()));
        let last = clock.now();
        clock.set(t(18, 40, 1));
        assert!(out_of_sync(Some(&s), Some(last), false, clock.now()));
        // Without a schedule there is no deadline to miss.
        assert!(!out_of_sync(None, Some(last), false, clock.now()));
    }
}
