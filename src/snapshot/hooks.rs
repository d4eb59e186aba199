//! Quiesce hooks around taking the point-in-time copy: `--pre-snapshot CMD` (an `fsfreeze --freeze`, a guest
//! agent's freeze, a database checkpoint) and `--post-snapshot CMD` (the thaw).
//!
//! Each runs as `sh -c CMD` in a process group of its own, with `BLOCKMOVER_VOLUME` and `BLOCKMOVER_HOOK`
//! (`pre-snapshot` or `post-snapshot`) in its environment, bounded by `--hook-timeout` (the whole group is killed
//! when it runs over). Once the pre hook started, the post hook runs whatever happened after it, even when the pre
//! hook failed half way: a freeze left in place would stop the workload. A hook's output goes to the log, its
//! last stderr line into the error.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A hook's exit code that asks for a retry (`EX_TEMPFAIL`, as the agents' own).
const RETRY: i32 = 75;
/// The stderr a failed hook's error quotes, at most.
const QUOTE: usize = 200;
/// How long a hook's output is still awaited once it ended.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// The two hooks and their time limit.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    /// Run before the copy is taken.
    pub pre: Option<String>,
    /// Run after the copy is taken (or failed), whenever the pre hook ran.
    pub post: Option<String>,
    /// How long each may run.
    pub timeout: Duration,
}

impl Hooks {
    /// Runs the pre hook, then `take`, then the post hook (whenever the pre hook started, and when there is no
    /// pre hook). The first failure wins; `take`'s outcome is returned when both hooks succeed.
    pub fn around<T>(&self, volume: &Path, take: impl FnOnce() -> Result<T>) -> Result<T> {
        let pre = match &self.pre {
            Some(cmd) => run("pre-snapshot", cmd, volume, self.timeout),
            None => Ok(()),
        };
        let taken = match pre {
            Ok(()) => take(),
            Err(e) => Err(e),
        };
        let post = match &self.post {
            Some(cmd) => run("post-snapshot", cmd, volume, self.timeout),
            None => Ok(()),
        };
        match (taken, post) {
            (Ok(t), Ok(())) => Ok(t),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }
}

/// Runs one hook to its end or its timeout.
fn run(which: &'static str, cmd: &str, volume: &Path, timeout: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let failed = |reason: String, retryable: bool| Error::Hook {
        which,
        reason,
        retryable,
    };
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("BLOCKMOVER_VOLUME", volume)
        .env("BLOCKMOVER_HOOK", which)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| failed(format!("cannot run /bin/sh: {e}"), false))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= timeout => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(failed(format!("cannot wait for it: {e}"), false)),
        }
    };
    if status.is_none() {
        // The whole group: a shell's children (the freeze it started) must not outlive the hook.
        if let Ok(pgid) = i32::try_from(child.id()) {
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_raw(pgid).expect("a child's pid is positive"),
                rustix::process::Signal::KILL,
            );
        }
        let _ = child.wait();
    }
    let (out, err) = (joined(out), joined(err));
    for line in out.lines().chain(err.lines()) {
        tracing::info!("{which} hook: {line}");
    }
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let quoted = if last.is_empty() {
        String::new()
    } else {
        format!(": {}", last.chars().take(QUOTE).collect::<String>())
    };
    match status {
        None => Err(failed(
            format!(
                "ran over its {}s timeout and was killed{quoted}",
                timeout.as_secs()
            ),
            true,
        )),
        Some(s) if s.success() => {
            tracing::info!("{which} hook done in {:.2?}", started.elapsed());
            Ok(())
        }
        Some(s) => match s.code() {
            Some(code) => Err(failed(format!("exit status {code}{quoted}"), code == RETRY)),
            None => Err(failed(format!("ended by a signal ({s}){quoted}"), false)),
        },
    }
}

/// Reads a pipe to its end on a thread of its own (a hook that fills a pipe must not block on it).
fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<Receiver<String>> {
    let mut pipe = pipe?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("hook-output".into())
        .spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.by_ref().take(1 << 20).read_to_end(&mut bytes);
            // Whatever is left is read and dropped, so that the hook never blocks on a full pipe.
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
        })
        .ok()?;
    Some(rx)
}

/// A hook's output once it ended. A daemon it started in another session may hold the pipe open for ever: its
/// output is then left behind after a second, not waited for.
fn joined(rx: Option<Receiver<String>>) -> String {
    rx.and_then(|rx| rx.recv_timeout(OUTPUT_GRACE).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(pre: Option<&str>, post: Option<&str>, secs: u64) -> Hooks {
        Hooks {
            pre: pre.map(str::to_owned),
            post: post.map(str::to_owned),
            timeout: Duration::from_secs(secs),
        }
    }

    #[test]
    fn hooks_run_in_order_around_the_copy_with_the_volume_in_their_environment(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("log");
        let l = log.display();
        let h = hooks(
            Some(&format!(
                "echo \"pre $BLOCKMOVER_HOOK $BLOCKMOVER_VOLUME\" >> {l}"
            )),
            Some(&format!("echo post >> {l}")),
            10,
        );
        let got = h.around(Path::new("/dev/vol"), || {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"copy\n"))
                .map_err(|e| Error::Snapshot(e.to_string()))?;
            Ok(7)
        })?;
        assert_eq!(got, 7);
        assert_eq!(
            std::fs::read_to_string(&log)?,
            "pre pre-snapshot /dev/vol\ncopy\npost\n"
        );
        Ok(())
    }

    #[test]
    fn a_failing_pre_hook_fails_with_its_code_and_stderr_and_the_post_hook_still_runs(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let post = dir.path().join("post");
        let h = hooks(
            Some("echo starting; echo 'fsfreeze: cannot freeze' >&2; exit 3"),
            Some(&format!("touch {}", post.display())),
            10,
        );
        let mut took = false;
        let err = h
            .around(Path::new("/v"), || {
                took = true;
                Ok(())
            })
            .expect_err("the pre hook failed");
        assert!(!took, "no copy after a failed pre hook");
        assert!(post.exists(), "the post hook ran");
        assert_eq!(
            err.to_string(),
            "pre-snapshot hook failed: exit status 3: fsfreeze: cannot freeze"
        );
        assert!(!err.is_retryable());
        let retry = hooks(Some("exit 75"), None, 10)
            .around(Path::new("/v"), || Ok(()))
            .expect_err("75");
        assert!(retry.is_retryable(), "{retry}");
        Ok(())
    }

    #[test]
    fn a_hook_that_runs_over_is_killed_with_its_children_and_is_retryable() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let marker = dir.path().join("late");
        let started = Instant::now();
        let err = hooks(
            None,
            Some(&format!("(sleep 3; touch {}) & sleep 30", marker.display())),
            1,
        )
        .around(Path::new("/v"), || Ok(()))
        .expect_err("timeout");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(err.is_retryable());
        assert!(
            err.to_string()
                .starts_with("post-snapshot hook failed: ran over its 1s timeout"),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(3500));
        assert!(
            !marker.exists(),
            "the hook's background child was killed too"
        );
        Ok(())
    }

    #[test]
    fn a_failed_copy_still_runs_the_post_hook_and_its_error_wins() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let post = dir.path().join("post");
        let err = hooks(None, Some(&format!("touch {}", post.display())), 10)
            .around(Path::new("/v"), || -> Result<()> {
                Err(Error::Config("no copy".into()))
            })
            .expect_err("copy failed");
        assert!(post.exists());
        assert_eq!(err.to_string(), "configuration: no copy");
        Ok(())
    }
}
