//! A running agent whose output is drained from the start (so it never blocks on a full pipe), waited for either
//! under a safety net ([`Running::wait`]) or against a limit the test asserts ([`Running::finish`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    drain, error_line, metrics_line, spawn_source_with, wait_with_timeout, Finished, Fixture,
};

/// Safety net for a source to print its metrics address.
const METRICS_TIMEOUT: Duration = Duration::from_secs(30);

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
pub(super) fn join(h: Option<JoinHandle<String>>) -> Result<String> {
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

/// A source started with `--metrics-listen 127.0.0.1:0`, running, its stderr drained; killed if dropped while
/// running.
pub struct ObservedSource {
    /// The process.
    pub running: Running,
    /// The address it printed in `metrics on http://ADDR/metrics`.
    pub metrics: SocketAddr,
}

impl ObservedSource {
    /// `blockmover source --connect ADDR --volume V --psk P --status S FLAGS --metrics-listen 127.0.0.1:0`, once
    /// it printed its metrics address (at most 30 s; an error with its stderr if it exits or is silent).
    pub fn spawn(
        addr: SocketAddr,
        volume: &Path,
        psk: &Path,
        status: &Path,
        flags: &[&str],
    ) -> Result<ObservedSource> {
        let mut with_metrics = flags.to_vec();
        with_metrics.extend(["--metrics-listen", "127.0.0.1:0"]);
        let mut child = spawn_source_with(addr, volume, psk, status, &with_metrics)?;
        let stdout = child.stdout.take().context("source stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if let Some(addr) = metrics_line(&line) {
                    let _ = tx.send(addr);
                }
            }
        });
        let mut running = Running::new(child)?;
        match rx.recv_timeout(METRICS_TIMEOUT) {
            Ok(addr) => Ok(ObservedSource {
                running,
                metrics: addr.parse().context("metrics address")?,
            }),
            Err(_) => {
                let _ = running.child.kill();
                let ended = running.wait(METRICS_TIMEOUT)?;
                bail!(
                    "the source printed no metrics address ({}): {}",
                    ended.status,
                    ended.stderr
                );
            }
        }
    }
}
