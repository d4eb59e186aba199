//! Issue 10's hardening findings, written test-first against the contract in `SPEC-hardening.md`: a frozen peer
//! (SIGSTOP) must fail the sync within the idle timeout, descriptor exhaustion must not end a destination, a
//! connection that never proved the key must not change the status or the metrics, a killed destination is
//! always retryable for the source, and a status that cannot be written is said, with its OS cause.
//!
//! Real release binary as separate processes, real TLS on loopback. Synchronisation is on observable state (a
//! metric, a status file, the proxy's stall or mark reports, a socket closed by the peer); every time limit is a
//! safety net, or the bound the contract promises (the idle timeout plus a margin).

mod auth;
mod descriptors;
mod frozen;
mod killed;
mod status_dir;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::common::{signal, Destination, Ended};

/// Exit code of a failure a retry may cure (EX_TEMPFAIL).
pub const RETRYABLE: i32 = 75;
/// Exit code of a failure a retry will not cure.
pub const PERMANENT: i32 = 1;
/// Safety net for a condition to become true.
pub const WAIT: Duration = Duration::from_secs(60);

/// A process stopped with SIGSTOP; continued (SIGCONT) when dropped, so that a failing test never leaves a
/// stopped process behind (the owner of the [`std::process::Child`] then kills it as usual).
pub struct Frozen {
    pid: u32,
}

impl Frozen {
    /// `kill -STOP PID`.
    pub fn stop(pid: u32) -> Result<Frozen> {
        signal("STOP", pid)?;
        Ok(Frozen { pid })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = signal("CONT", self.pid);
    }
}

/// Waits at most `limit` for `destination` to exit; past it, kills it (`status` None). Collects its stderr.
pub fn finish_destination(destination: &mut Destination, limit: Duration) -> Result<Ended> {
    let start = Instant::now();
    let mut status = destination.child.try_wait()?;
    while status.is_none() && start.elapsed() < limit {
        thread::sleep(Duration::from_millis(10));
        status = destination.child.try_wait()?;
    }
    let waited = start.elapsed();
    if status.is_none() {
        let _ = destination.child.kill();
    }
    let finished = destination.wait(WAIT)?;
    Ok(Ended {
        status,
        waited,
        stderr: finished.stderr,
    })
}

/// `status.conditions[0]`'s `reason` and `message`.
pub fn condition(status: &Value) -> (&str, &str) {
    let field = |k: &str| {
        status
            .pointer(&format!("/conditions/0/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    (field("reason"), field("message"))
}

/// Empties `target` and makes it an all-zero sparse file of `size` bytes again.
pub fn reset_target(target: &Path, size: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(target)?;
    file.set_len(0)?;
    file.set_len(size)?;
    Ok(())
}
