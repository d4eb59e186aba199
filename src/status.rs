//! VolSync-shaped status: the `.status` document of ReplicationSource / ReplicationDestination, written atomically.
//!
//! Invariants:
//! - The file on disk is always a complete JSON document: it is written to a randomly named temporary created with
//!   `O_EXCL` beside it, fsynced, renamed over `<path>`, and the directory is fsynced ([`crate::durable`]). A
//!   reader never sees a torn file, and a symlink planted in the directory is never followed.
//! - `lastSyncStartTime` is set only while a sync runs ([`StatusFile::begin`]); both [`StatusFile::succeed`] and
//!   [`StatusFile::fail`] clear it.
//! - `lastSyncTime` / `lastSyncDuration` change only on success; a failure keeps the previous values.
//! - There is one condition of type `Synchronizing`; its `lastTransitionTime` changes only when its `status`
//!   changes (Kubernetes `meta.SetStatusCondition`).
//! - `latestMoverStatus.logs` holds at most [`MOVER_LOG_MAX_BYTES`] (the last bytes, as VolSync keeps them).

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::durable;
use crate::schedule::Schedule;

mod document;
mod format;

pub use document::{Condition, LatestMoverStatus, MoverStatus, RsyncTlsStatus};
use format::truncate_start;
pub use format::{go_duration, parse_time, rfc3339, truncate_logs};

/// The bytes of mover logs VolSync keeps in `latestMoverStatus.logs` (its `MOVER_LOG_MAX_BYTES`).
pub const MOVER_LOG_MAX_BYTES: usize = 1024;

/// The CRD's `maxLength` of a condition message.
pub const CONDITION_MESSAGE_MAX_LEN: usize = 32768;

/// The only condition type VolSync uses.
pub const CONDITION_SYNCHRONIZING: &str = "Synchronizing";

/// `latestMoverStatus.result` of a sync that completed.
pub const RESULT_SUCCESSFUL: &str = "Successful";

/// `latestMoverStatus.result` of a sync that failed.
pub const RESULT_FAILED: &str = "Failed";

/// Which side of the replication this status describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The ReplicationSource side (reads the volume, sends).
    Source,
    /// The ReplicationDestination side (receives, writes the target).
    Destination,
}

impl Role {
    /// The label VolSync uses for this role in metrics: `source` or `destination`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

/// Failures reading or writing the status file. All are about the local file, never about the sync itself.
///
/// Each message ends with its cause (`cannot write status file P: Read-only file system (os error 30)`): callers
/// print the top error only.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The status file exists but could not be read.
    #[error("cannot read status file {}: {source}", path.display())]
    Read {
        /// The status file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The status file is not a JSON status document.
    #[error("status file {} is not a valid status document: {source}", path.display())]
    Parse {
        /// The status file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The status could not be encoded as JSON.
    #[error("cannot encode status as json: {0}")]
    Encode(#[source] serde_json::Error),
    /// Writing, syncing or renaming the status file (or syncing its directory) failed.
    #[error("cannot write status file {}: {source}", path.display())]
    Write {
        /// The status file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
}

/// A status document bound to its file (or to none) and to a role; every transition writes it.
#[derive(Debug)]
pub struct StatusFile {
    path: Option<PathBuf>,
    status: MoverStatus,
    role: Role,
    /// Full-precision start of the sync under way (the file keeps whole seconds only).
    started: Option<DateTime<Utc>>,
    /// The agent's schedule: sets `nextSyncTime` and `WaitingForSchedule` after a success.
    schedule: Option<Schedule>,
    /// The manual token the sync under way satisfies; becomes `lastManualSync` on success.
    manual: Option<String>,
}

impl StatusFile {
    /// Loads the status at `path`; a missing file (or no path) gives an empty status.
    pub fn load(path: Option<PathBuf>, role: Role) -> Result<Self, StatusError> {
        let status = match &path {
            None => MoverStatus::default(),
            Some(p) => match fs::read(p) {
                Ok(bytes) => {
                    serde_json::from_slice(&bytes).map_err(|source| StatusError::Parse {
                        path: p.clone(),
                        source,
                    })?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => MoverStatus::default(),
                Err(source) => {
                    return Err(StatusError::Read {
                        path: p.clone(),
                        source,
                    })
                }
            },
        };
        Ok(Self {
            path,
            status,
            role,
            started: None,
            schedule: None,
            manual: None,
        })
    }

    /// After a success, wait for `schedule` (set `nextSyncTime`, reason `WaitingForSchedule`) instead of a manual
    /// trigger. Takes effect at the next [`Self::succeed`].
    pub fn set_schedule(&mut self, schedule: Option<Schedule>) {
        self.schedule = schedule;
    }

    /// The manual token the next sync satisfies: [`Self::succeed`] records it as `lastManualSync`.
    pub fn set_manual(&mut self, token: Option<String>) {
        self.manual = token;
    }

    /// `lastSyncTime` parsed, if present and valid.
    pub fn last_sync_time(&self) -> Option<DateTime<Utc>> {
        parse_time(self.status.last_sync_time.as_deref())
    }

    /// The current document.
    pub fn status(&self) -> &MoverStatus {
        &self.status
    }

    /// The role this status belongs to.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The file written, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A sync starts: sets `lastSyncStartTime`, condition `Synchronizing` True `SyncInProgress`; writes.
    pub fn begin(&mut self, now: DateTime<Utc>) -> Result<(), StatusError> {
        self.started = Some(now);
        self.status.last_sync_start_time = Some(rfc3339(now));
        self.set_condition(
            now,
            "True",
            "SyncInProgress",
            "Synchronization in-progress".to_owned(),
        );
        self.write()
    }

    /// A sync completed: sets `lastSyncTime`, `lastSyncDuration`, result `Successful` with `logs`, replaces
    /// `external`, clears `lastSyncStartTime`; with a schedule sets `nextSyncTime` to the next cron time after now and
    /// condition False `WaitingForSchedule`, otherwise clears it and sets False `WaitingForManual`; records the
    /// manual token (if any) as `lastManualSync`; writes.
    pub fn succeed(
        &mut self,
        now: DateTime<Utc>,
        external: BTreeMap<String, String>,
        logs: String,
    ) -> Result<(), StatusError> {
        let start = self.start_time().unwrap_or(now);
        // A clock that stepped back gives a negative span; report zero rather than fail the status.
        let took = (now - start).to_std().unwrap_or(Duration::ZERO);
        self.status.last_sync_time = Some(rfc3339(now));
        self.status.last_sync_duration = Some(go_duration(took));
        self.end(RESULT_SUCCESSFUL, logs, external);
        if let Some(token) = self.manual.take() {
            self.status.last_manual_sync = Some(token);
        }
        match &self.schedule {
            Some(schedule) => {
                self.status.next_sync_time = schedule.next_after(now).map(rfc3339);
                self.set_condition(
                    now,
                    "False",
                    "WaitingForSchedule",
                    "Waiting for next scheduled synchronization".to_owned(),
                );
            }
            None => {
                self.status.next_sync_time = None;
                self.set_condition(
                    now,
                    "False",
                    "WaitingForManual",
                    "Waiting for manual trigger".to_owned(),
                );
            }
        }
        self.write()
    }

    /// A sync failed: keeps `lastSyncTime`/`lastSyncDuration`, clears `lastSyncStartTime`, result `Failed` with
    /// `logs` ending in the line `error: <reason>` (unless they already end with `reason`), condition False `Error`
    /// with `reason` as message, replaces `external`; writes.
    pub fn fail(
        &mut self,
        now: DateTime<Utc>,
        reason: &str,
        external: BTreeMap<String, String>,
        logs: String,
    ) -> Result<(), StatusError> {
        let mut logs = logs;
        if !logs.trim_end().ends_with(reason.trim_end()) || reason.trim().is_empty() {
            let trimmed_len = logs.trim_end().len();
            logs.truncate(trimmed_len);
            if !logs.is_empty() {
                logs.push('\n');
            }
            logs.push_str("error: ");
            logs.push_str(reason);
        }
        self.end(RESULT_FAILED, logs, external);
        self.set_condition(
            now,
            "False",
            "Error",
            truncate_start(reason, CONDITION_MESSAGE_MAX_LEN),
        );
        self.write()
    }

    /// Destination only: records the address the source should connect to. Ignored for [`Role::Source`]
    /// (the ReplicationSource schema has no `rsyncTLS.address`). Takes effect at the next write.
    pub fn set_rsync_tls_address(&mut self, address: String) {
        if self.role == Role::Destination {
            self.status
                .rsync_tls
                .get_or_insert_with(RsyncTlsStatus::default)
                .address = Some(address);
        }
    }

    /// Writes the document atomically (random temp file, fsync, rename, fsync of the directory), mode 0644: it
    /// holds no secret and monitoring reads it. No-op without a path.
    pub fn write(&self) -> Result<(), StatusError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut json = serde_json::to_vec_pretty(&self.status).map_err(StatusError::Encode)?;
        json.push(b'\n');
        durable::write_file(path, &json, 0o644, durable::Existing::Replace).map_err(|source| {
            StatusError::Write {
                path: path.clone(),
                source,
            }
        })
    }

    /// Checks that the status file can be written, by creating and removing a temporary file in its directory, so
    /// that an agent fails at start-up (with the OS reason) rather than at its first sync. No-op without a path.
    pub fn check_writable(&self) -> Result<(), StatusError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        durable::check_dir_writable(durable::parent_dir(path)).map_err(|source| {
            StatusError::Write {
                path: path.clone(),
                source,
            }
        })
    }

    /// The start of the sync under way: the in-memory instant from [`Self::begin`], else the file's value.
    fn start_time(&self) -> Option<DateTime<Utc>> {
        self.started
            .or_else(|| parse_time(self.status.last_sync_start_time.as_deref()))
    }

    /// The bookkeeping both outcomes share.
    fn end(&mut self, result: &str, logs: String, external: BTreeMap<String, String>) {
        self.started = None;
        self.status.last_sync_start_time = None;
        self.status.latest_mover_status = Some(LatestMoverStatus {
            result: result.to_owned(),
            logs: truncate_logs(&logs, MOVER_LOG_MAX_BYTES),
        });
        self.status.external = external;
    }

    /// `meta.SetStatusCondition` for the `Synchronizing` condition.
    fn set_condition(&mut self, now: DateTime<Utc>, status: &str, reason: &str, message: String) {
        let existing = self
            .status
            .conditions
            .iter_mut()
            .find(|c| c.type_ == CONDITION_SYNCHRONIZING);
        match existing {
            Some(c) => {
                if c.status != status {
                    c.status = status.to_owned();
                    c.last_transition_time = rfc3339(now);
                }
                c.reason = reason.to_owned();
                c.message = message;
            }
            None => self.status.conditions.push(Condition {
                type_: CONDITION_SYNCHRONIZING.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message,
                last_transition_time: rfc3339(now),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64, nanos: u32) -> anyhow::Result<DateTime<Utc>> {
        Utc.timestamp_opt(1_795_000_000 + secs, nanos)
            .single()
            .ok_or_else(|| anyhow::anyhow!("bad test time"))
    }

    fn counters() -> BTreeMap<String, String> {
        BTreeMap::from([("chunksTotal".to_owned(), "16".to_owned())])
    }

    fn sync_cond(s: &StatusFile) -> anyhow::Result<&Condition> {
        s.status()
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_SYNCHRONIZING)
            .ok_or_else(|| anyhow::anyhow!("no Synchronizing condition"))
    }

    #[test]
    fn condition_transition_time_changes_only_when_status_changes() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Source)?;
        s.begin(at(0, 0)?)?;
        assert_eq!(sync_cond(&s)?.status, "True");
        assert_eq!(sync_cond(&s)?.reason, "SyncInProgress");
        assert_eq!(sync_cond(&s)?.last_transition_time, rfc3339(at(0, 0)?));

        s.succeed(at(10, 0)?, counters(), String::new())?;
        assert_eq!(sync_cond(&s)?.status, "False");
        assert_eq!(sync_cond(&s)?.reason, "WaitingForManual");
        assert_eq!(sync_cond(&s)?.message, "Waiting for manual trigger");
        assert_eq!(sync_cond(&s)?.last_transition_time, rfc3339(at(10, 0)?));

        // False -> False (reason changes): the transition time stays.
        s.fail(at(20, 0)?, "peer vanished", counters(), String::new())?;
        assert_eq!(sync_cond(&s)?.reason, "Error");
        assert_eq!(sync_cond(&s)?.message, "peer vanished");
        assert_eq!(sync_cond(&s)?.last_transition_time, rfc3339(at(10, 0)?));
        assert_eq!(s.status().conditions.len(), 1);

        s.begin(at(30, 0)?)?;
        assert_eq!(sync_cond(&s)?.last_transition_time, rfc3339(at(30, 0)?));
        Ok(())
    }

    #[test]
    fn succeed_records_time_duration_result_and_clears_start() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Destination)?;
        s.begin(at(0, 250_000_000)?)?;
        assert!(s.status().last_sync_start_time.is_some());
        s.succeed(at(62, 750_000_000)?, counters(), "sent 10 bytes".to_owned())?;
        let st = s.status();
        assert_eq!(
            st.last_sync_time.as_deref(),
            Some(rfc3339(at(62, 0)?).as_str())
        );
        assert_eq!(st.last_sync_duration.as_deref(), Some("1m2.5s"));
        assert_eq!(st.last_sync_start_time, None);
        let mover = st.latest_mover_status.clone().unwrap_or_default();
        assert_eq!(mover.result, RESULT_SUCCESSFUL);
        assert_eq!(mover.logs, "sent 10 bytes");
        assert_eq!(st.external, counters());
        Ok(())
    }

    #[test]
    fn succeed_without_begin_reports_zero_duration() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Source)?;
        s.succeed(at(5, 0)?, BTreeMap::new(), String::new())?;
        assert_eq!(s.status().last_sync_duration.as_deref(), Some("0s"));
        Ok(())
    }

    #[test]
    fn fail_keeps_previous_last_sync_time_and_duration() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Source)?;
        s.begin(at(0, 0)?)?;
        s.succeed(at(3, 0)?, counters(), String::new())?;
        let before = s.status().clone();
        s.begin(at(100, 0)?)?;
        s.fail(
            at(104, 0)?,
            "keys do not match",
            BTreeMap::new(),
            "a\nb\n".to_owned(),
        )?;
        let st = s.status();
        assert_eq!(st.last_sync_time, before.last_sync_time);
        assert_eq!(st.last_sync_duration, before.last_sync_duration);
        assert_eq!(st.last_sync_start_time, None);
        assert!(st.external.is_empty());
        let mover = st.latest_mover_status.clone().unwrap_or_default();
        assert_eq!(mover.result, RESULT_FAILED);
        assert_eq!(mover.logs, "a\nb\nerror: keys do not match");
        Ok(())
    }

    #[test]
    fn fail_logs_end_with_the_reason_even_after_truncation() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Source)?;
        let long = "x".repeat(5000);
        s.fail(at(0, 0)?, "target too small", BTreeMap::new(), long)?;
        let logs = s
            .status()
            .latest_mover_status
            .clone()
            .unwrap_or_default()
            .logs;
        assert!(logs.len() <= MOVER_LOG_MAX_BYTES);
        assert!(logs.ends_with("\nerror: target too small"));

        // Logs that already end with the reason are not given it twice.
        s.fail(
            at(1, 0)?,
            "boom",
            BTreeMap::new(),
            "error: boom\n".to_owned(),
        )?;
        let logs = s
            .status()
            .latest_mover_status
            .clone()
            .unwrap_or_default()
            .logs;
        assert_eq!(logs, "error: boom\n");
        Ok(())
    }

    #[test]
    fn fail_truncates_the_condition_message_to_the_crd_max_length() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Source)?;
        let reason = "é".repeat(CONDITION_MESSAGE_MAX_LEN);
        s.fail(at(0, 0)?, &reason, BTreeMap::new(), String::new())?;
        let msg = &sync_cond(&s)?.message;
        assert!(msg.len() <= CONDITION_MESSAGE_MAX_LEN);
        assert_eq!(msg.len(), CONDITION_MESSAGE_MAX_LEN);
        Ok(())
    }

    #[test]
    fn rsync_tls_address_is_set_for_destination_only() -> anyhow::Result<()> {
        let mut d = StatusFile::load(None, Role::Destination)?;
        d.set_rsync_tls_address("10.0.0.1:8000".to_owned());
        let tls = d.status().rsync_tls.clone().unwrap_or_default();
        assert_eq!(tls.address.as_deref(), Some("10.0.0.1:8000"));
        let mut s = StatusFile::load(None, Role::Source)?;
        s.set_rsync_tls_address("10.0.0.1:8000".to_owned());
        assert_eq!(s.status().rsync_tls, None);
        Ok(())
    }

    #[test]
    fn write_is_atomic_and_leaves_no_tmp_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("status.json");
        let mut s = StatusFile::load(Some(path.clone()), Role::Source)?;
        s.begin(at(0, 0)?)?;
        s.succeed(at(1, 0)?, counters(), "done".to_owned())?;
        let names: Vec<_> = fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(names, vec![std::ffi::OsString::from("status.json")]);
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
        assert_eq!(json["latestMoverStatus"]["result"], "Successful");
        assert_eq!(json["external"]["chunksTotal"], "16");
        assert!(json.get("lastSyncStartTime").is_none());
        assert!(json.get("rsyncTLS").is_none());

        let reloaded = StatusFile::load(Some(path), Role::Source)?;
        assert_eq!(reloaded.status(), s.status());
        Ok(())
    }

    #[test]
    fn write_never_follows_a_planted_tmp_symlink_and_is_world_readable() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("status.json");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious")?;
        std::os::unix::fs::symlink(&victim, dir.path().join("status.json.tmp"))?;
        let mut s = StatusFile::load(Some(path.clone()), Role::Destination)?;
        s.begin(at(0, 0)?)?;
        assert_eq!(fs::read(&victim)?, b"precious");
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o7777, 0o644);
        Ok(())
    }

    #[test]
    fn write_errors_keep_the_os_cause() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("missing").join("status.json");
        let s = StatusFile::load(Some(path.clone()), Role::Source)?;
        let expected = format!(
            "cannot write status file {}: No such file or directory (os error 2)",
            path.display()
        );
        assert_eq!(
            s.check_writable().map_err(|e| e.to_string()),
            Err(expected.clone())
        );
        assert_eq!(s.write().map_err(|e| e.to_string()), Err(expected));
        StatusFile::load(Some(dir.path().join("s.json")), Role::Source)?.check_writable()?;
        StatusFile::load(None, Role::Source)?.check_writable()?;
        assert_eq!(fs::read_dir(dir.path())?.count(), 0, "the probe is removed");
        Ok(())
    }

    #[test]
    fn duration_uses_the_start_time_from_the_file_after_a_restart() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("status.json");
        StatusFile::load(Some(path.clone()), Role::Source)?.begin(at(0, 0)?)?;
        let mut s = StatusFile::load(Some(path), Role::Source)?;
        s.succeed(at(90, 0)?, BTreeMap::new(), String::new())?;
        assert_eq!(s.status().last_sync_duration.as_deref(), Some("1m30s"));
        Ok(())
    }

    #[test]
    fn load_of_a_missing_file_gives_an_empty_status() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = StatusFile::load(Some(dir.path().join("absent.json")), Role::Destination)?;
        assert_eq!(s.status(), &MoverStatus::default());
        Ok(())
    }

    #[test]
    fn load_of_garbage_fails_naming_the_path() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("garbage.json");
        fs::write(&path, b"{not json")?;
        let err = match StatusFile::load(Some(path.clone()), Role::Source) {
            Ok(_) => anyhow::bail!("garbage was accepted"),
            Err(e) => e,
        };
        assert!(matches!(err, StatusError::Parse { .. }));
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn scheduled_success_sets_next_sync_time_and_waits_for_schedule() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Source)?;
        s.set_schedule(Some(Schedule::parse("*/5 * * * *")?));
        s.set_manual(Some("token-1".to_owned()));
        s.begin(at(0, 0)?)?;
        // Manual and schedule are recorded only on success.
        assert_eq!(s.status().last_manual_sync, None);
        s.succeed(at(10, 0)?, counters(), String::new())?;
        let next = Schedule::parse("*/5 * * * *")?
            .next_after(at(10, 0)?)
            .map(rfc3339);
        assert_eq!(s.status().next_sync_time, next);
        assert_eq!(s.status().last_manual_sync.as_deref(), Some("token-1"));
        assert_eq!(sync_cond(&s)?.reason, "WaitingForSchedule");
        assert_eq!(
            sync_cond(&s)?.message,
            "Waiting for next scheduled synchronization"
        );
        // A failure keeps nextSyncTime and lastManualSync and says Error.
        s.set_manual(Some("token-2".to_owned()));
        s.begin(at(20, 0)?)?;
        s.fail(at(21, 0)?, "peer vanished", counters(), String::new())?;
        assert_eq!(s.status().next_sync_time, next);
        assert_eq!(s.status().last_manual_sync.as_deref(), Some("token-1"));
        assert_eq!(sync_cond(&s)?.reason, "Error");
        // Without a schedule: no nextSyncTime, WaitingForManual.
        s.set_schedule(None);
        s.begin(at(30, 0)?)?;
        s.succeed(at(31, 0)?, counters(), String::new())?;
        assert_eq!(s.status().next_sync_time, None);
        assert_eq!(s.status().last_manual_sync.as_deref(), Some("token-2"));
        assert_eq!(sync_cond(&s)?.reason, "WaitingForManual");
        Ok(())
    }

    #[test]
    fn write_without_a_path_is_a_no_op() -> anyhow::Result<()> {
        let mut s = StatusFile::load(None, Role::Source)?;
        s.begin(at(0, 0)?)?;
        s.write()?;
        Ok(())
    }
}
