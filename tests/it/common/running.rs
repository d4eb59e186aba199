//! A running agent whose output is drained from the start (so it never blocks on a full pipe), waited for either
//! under a safety net ([`Running::wait`]) or against a limit the test asserts ([`Running::finish`]).

use std::net::SocketAddr;
use std::process::{Child, ExitStatus};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::{drain, error_line, spawn_source_with, wait_with_timeout, Finished, Fixture};

/// A running agent whose stdout and stderr are drained by threads; killed if dropped while running.
pub struct Running {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// How a [`Running`] agent ended, or that it had not within the limit (`status` None: it was then killed).
#[derive(Debug)]
pub struct Ended {
    /// Its exit status, None if it was still running at the limit.
    pub status: Option<ExitStatus>,
    /// How long [`Running::finish`] waited.
    pub waited: Duration,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Ended {
    /// The exit code (None if it was killed at the limit or by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Its `error: ` line, or "" if it printed none.
    pub fn error_line(&self) -> &str {
        error_line(&self.stderr)
    }
}

/// Joins an output reader (None: nothing was read, "").
fn join(h: Option<JoinHandle<String>>) -> Result<String> {
    h.map(|h| h.join().map_err(|_| anyhow!("output reader panicked")))
        .transpose()
        .map(Option::unwrap_or_default)
}

impl Running {
    /// Takes over a spawned child whose stderr is piped, and whose stdout is piped or already taken; both are
    /// drained from now on.
    pub fn new(mut child: Child) -> Result<Running> {
        let stdout = child.stdout.take().map(drain);
        let stderr = Some(drain(child.stderr.take().context("stderr is piped")?));
        Ok(Running {
            child,
            stdout,
            stderr,
        })
    }

    /// `blockmover source --connect ADDR` for the fixture's volume, key and source status, with `extra` flags.
    pub fn source(addr: SocketAddr, fx: &Fixture, extra: &[&str]) -> Result<Running> {
        Running::new(spawn_source_with(
            addr,
            &fx.volume,
            &fx.psk,
            &fx.source_status,
            extra,
        )?)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (without reaping anything the caller still needs: the status stays available).
    pub fn exited(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    /// Waits at most `limit` for the exit; past it the process is killed and `status` is None.
    pub fn finish(mut self, limit: Duration) -> Result<Ended> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break Some(status);
            }
            if start.elapsed() >= limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(10));
        };
        let waited = start.elapsed();
        // Its stdout is drained so that it never blocks on a full pipe; nothing here reads it.
        join(self.stdout.take())?;
        Ok(Ended {
            status,
            waited,
            stderr: join(self.stderr.take())?,
        })
    }

    /// Waits for the exit (after `timeout`, a safety net, it is killed and the test panics) and returns its
    /// status and whole output.
    pub fn wait(mut self, timeout: Duration) -> Result<Finished> {
        let status = wait_with_timeout(&mut self.child, timeout)?;
        Ok(Finished {
            status,
            stdout: join(self.stdout.take())?,
            stderr: join(self.stderr.take())?,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
