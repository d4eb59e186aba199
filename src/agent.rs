//! A long-running source agent: a pod per volume without the VolSync controller. It runs the one-sync function of
//! [`crate::source`] when the [`crate::schedule::Planner`] says so, records schedule and manual token in the status
//! file, and feeds [`Metrics`].
//!
//! Manual requests to a running agent go through a trigger file beside the status file (`<status>.trigger`,
//! written atomically by `blockmover trigger`): its content is a token, like VolSync's `spec.trigger.manual`. A
//! token that differs from `lastManualSync` starts a sync at once; when that sync succeeds the status file's
//! `lastManualSync` becomes the token. The file is read every [`TRIGGER_POLL`] and may stay in place: a token
//! already synced asks for nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::durable;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::schedule::{retry_delay, Clock, Due, Planner, Reason, Schedule};
use crate::source::{self, SourceConfig, SyncReport};
use crate::stats::Figures;
use crate::status::{Role, StatusFile};

/// How often a waiting agent looks at its trigger file.
pub const TRIGGER_POLL: Duration = Duration::from_secs(1);

/// The longest trigger token accepted (VolSync's manual trigger is a short string).
const MAX_TOKEN_LEN: usize = 256;

/// The trigger file of an agent whose status file is `status`: `<status>.trigger`.
pub fn trigger_path(status: &Path) -> PathBuf {
    let mut name = status.as_os_str().to_owned();
    name.push(".trigger");
    PathBuf::from(name)
}

/// Asks the agent writing `status` for a sync: writes `token` to its trigger file atomically (random temp file
/// created with O_EXCL, fsync, rename, fsync of the directory; see [`crate::durable`]).
pub fn request_sync(status: &Path, token: &str) -> Result<PathBuf> {
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_LEN || token.contains(['\n', '\r']) {
        return Err(Error::Config(format!(
            "a trigger token is one line of 1 to {MAX_TOKEN_LEN} bytes"
        )));
    }
    let path = trigger_path(status);
    let body = format!("{token}\n");
    durable::write_file(&path, body.as_bytes(), 0o644, durable::Existing::Replace).map_err(
        |source| Error::Io {
            op: "write",
            path: path.clone(),
            offset: 0,
            source,
        },
    )?;
    Ok(path)
}

/// The token in a trigger file: its first line, trimmed; `None` when absent, empty or unreadable.
pub fn read_trigger(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.lines().next()?.trim();
    (!token.is_empty() && token.len() <= MAX_TOKEN_LEN).then(|| token.to_owned())
}

/// What a source agent runs with, besides the sync configuration.
#[derive(Debug)]
pub struct SourceAgent {
    /// One sync's configuration.
    pub config: SourceConfig,
    /// The status file.
    pub status: Option<PathBuf>,
    /// The cron schedule (`None` with `manual`: one sync).
    pub schedule: Option<Schedule>,
    /// A one-shot manual token (`--manual`): sync unless `lastManualSync` already equals it.
    pub manual: Option<String>,
    /// Metrics to feed, if served.
    pub metrics: Option<Arc<Metrics>>,
    /// The time source of the scheduling decisions.
    pub clock: Arc<dyn Clock>,
    busy: AtomicBool,
}

impl SourceAgent {
    /// An agent for `config`, idle.
    pub fn new(
        config: SourceConfig,
        status: Option<PathBuf>,
        schedule: Option<Schedule>,
        manual: Option<String>,
        metrics: Option<Arc<Metrics>>,
        clock: Arc<dyn Clock>,
    ) -> SourceAgent {
        SourceAgent {
            config,
            status,
            schedule,
            manual,
            metrics,
            clock,
            busy: AtomicBool::new(false),
        }
    }

    /// Whether a sync is under way (a signal now interrupts it).
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// One sync, recorded with the schedule and `manual` token, observed by the metrics.
    pub async fn sync_once(&self, manual: Option<String>) -> Result<SyncReport> {
        let mut status = StatusFile::load(self.status.clone(), Role::Source)?;
        status.set_schedule(self.schedule.clone());
        status.set_manual(manual);
        let figures = Arc::new(Figures::default());
        if let Some(m) = &self.metrics {
            m.started(figures.clone());
        }
        self.busy.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let result = source::sync_recorded(&self.config, &mut status, figures).await;
        self.busy.store(false, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.finished(result.is_ok(), t0.elapsed());
        }
        result
    }

    /// Without a schedule: one sync (skipped when `--manual` names the token already synced). With one: syncs at
    /// start, then whenever the schedule, a retry or a manual request says so, until the task is dropped.
    pub async fn run(&self) -> Result<()> {
        let Some(schedule) = &self.schedule else {
            if let Some(token) = &self.manual {
                let status = StatusFile::load(self.status.clone(), Role::Source)?;
                if status.status().last_manual_sync.as_deref() == Some(token.as_str()) {
                    tracing::info!(
                        "manual trigger {token:?} already synced (lastManualSync); nothing to do"
                    );
                    return Ok(());
                }
            }
            return self.sync_once(self.manual.clone()).await.map(|_| ());
        };
        let trigger = self.status.as_deref().map(trigger_path);
        let status = StatusFile::load(self.status.clone(), Role::Source)?;
        let mut planner = Planner::new(
            Some(schedule.clone()),
            status.last_sync_time(),
            status.status().last_manual_sync.clone(),
        );
        tracing::info!(
            schedule = schedule.as_str(),
            trigger = ?trigger,
            "scheduled source started; the first sync runs now"
        );
        loop {
            let requested = trigger.as_deref().and_then(read_trigger);
            let now = self.clock.now();
            let wait = match planner.due(now, requested.as_deref()) {
                Due::Now(reason) => {
                    // A pending manual token is satisfied by whichever sync runs next.
                    let token = match &reason {
                        Reason::Manual(t) => Some(t.clone()),
                        _ => requested.filter(|t| Some(t.as_str()) != planner.last_manual()),
                    };
                    tracing::info!(?reason, "sync starting");
                    let result = self.sync_once(token.clone()).await;
                    match &result {
                        Ok(r) => tracing::info!(digest = %r.volume_digest, "sync succeeded"),
                        Err(e) => tracing::error!(
                            "sync failed: {e}; retrying in {}s",
                            retry_delay(planner.failures().saturating_add(1)).as_secs()
                        ),
                    }
                    planner.completed(self.clock.now(), result.is_ok(), token);
                    if let Some(next) = planner.next_sync_time() {
                        tracing::info!(next = %crate::status::rfc3339(next), "waiting for schedule");
                    }
                    continue;
                }
                Due::At(t) => (t - now).to_std().unwrap_or(Duration::ZERO),
                Due::Manual => TRIGGER_POLL,
            };
            tokio::time::sleep(wait.min(TRIGGER_POLL)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_file_round_trips_a_token_and_refuses_bad_ones() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let status = dir.path().join("s.json");
        assert_eq!(read_trigger(&trigger_path(&status)), None);
        let path = request_sync(&status, " nightly-42 ")?;
        assert_eq!(path, dir.path().join("s.json.trigger"));
        assert_eq!(read_trigger(&path).as_deref(), Some("nightly-42"));
        assert!(request_sync(&status, "").is_err());
        assert!(request_sync(&status, "a\nb").is_err());
        assert!(request_sync(&status, &"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
        // The failed requests left the previous token.
        assert_eq!(read_trigger(&path).as_deref(), Some("nightly-42"));
        Ok(())
    }

    #[test]
    fn a_trigger_never_follows_a_planted_tmp_symlink() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let status = dir.path().join("s.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious")?;
        std::os::unix::fs::symlink(&victim, dir.path().join("s.json.trigger.tmp"))?;
        let path = request_sync(&status, "t1")?;
        assert_eq!(read_trigger(&path).as_deref(), Some("t1"));
        assert_eq!(std::fs::read(&victim)?, b"precious");
        Ok(())
    }
}
