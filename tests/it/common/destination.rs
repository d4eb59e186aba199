//! A real `blockmover destination` on loopback: started until it listens (or exits without listening), its
//! output drained by threads, killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::running::join;
use super::{bin, drain, error_line, metrics_line, wait_with_timeout};

/// Safety net for the destination to print its `listening on` line, or to exit without it.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `blockmover destination` whose stdout/stderr are drained by threads.
/// Dropping it kills the process if it is still running.
pub struct Destination {
    /// The child process.
    pub child: Child,
    /// The address it printed in `listening on ADDR`.
    pub addr: SocketAddr,
    /// The address it printed in `metrics on http://ADDR/metrics` (with `--metrics-listen`).
    pub metrics: Option<SocketAddr>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// How a process ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (its lines joined by `\n`).
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Finished {
    /// The exit code (`None` after a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Its `error: ` line, or "" when it printed none (see [`error_line`]).
    pub fn error_line(&self) -> &str {
        error_line(&self.stderr)
    }
}

impl From<Output> for Finished {
    /// The same exit, with the output as (lossy UTF-8) text.
    fn from(out: Output) -> Finished {
        Finished {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A destination either listening or already gone (refused at start-up).
pub enum Started {
    /// It printed `listening on ADDR`.
    Listening(Destination),
    /// It exited before printing `listening on`; nothing was listening.
    Exited(Finished),
}

/// What the stdout reader reports once the destination listens: its address and metrics address, as printed.
type Announced = (String, Option<String>);

impl Destination {
    /// Start `blockmover destination --listen 127.0.0.1:0 --target T --psk P --status S EXTRA...`
    /// and wait (at most 30 s) for its `listening on ADDR` line; an error if it exits without one.
    pub fn spawn(
        target: &Path,
        psk: &Path,
        status: &Path,
        extra_args: &[&str],
    ) -> Result<Destination> {
        Destination::spawn_env(target, psk, status, extra_args, &[])
    }

    /// [`Destination::spawn`] with environment variables set for the process (e.g. `BLOCKMOVER_LOG`).
    pub fn spawn_env(
        target: &Path,
        psk: &Path,
        status: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Destination> {
        match Destination::start_env(target, psk, status, extra_args, env)? {
            Started::Listening(destination) => Ok(destination),
            Started::Exited(finished) => bail!(
                "destination printed no `listening on` line ({}): {}",
                finished.status,
                finished.stderr
            ),
        }
    }

    /// Like [`Destination::spawn`], but a destination that exits without listening (a start-up check refused
    /// it) is [`Started::Exited`] with its whole output, not an error. Fails only if it neither listens nor exits
    /// within 30 s (it is then killed).
    pub fn start(target: &Path, psk: &Path, status: &Path, extra_args: &[&str]) -> Result<Started> {
        Destination::start_env(target, psk, status, extra_args, &[])
    }

    /// [`Destination::start`] with environment variables set for the process.
    pub fn start_env(
        target: &Path,
        psk: &Path,
        status: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Started> {
        let mut child = Command::new(bin())
            .envs(env.iter().copied())
            .args(["destination", "--listen", "127.0.0.1:0", "--target"])
            .arg(target)
            .arg("--psk")
            .arg(psk)
            .arg("--status")
            .arg(status)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", bin()))?;
        let stderr = drain(child.stderr.take().context("destination stderr")?);
        let (tx, rx) = mpsc::channel();
        let stdout = announce(child.stdout.take().context("destination stdout")?, tx);
        let mut destination = Destination {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        match rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok((addr, metrics)) => {
                destination.addr = addr
                    .parse()
                    .with_context(|| format!("bad listen address {addr:?}"))?;
                destination.metrics = metrics
                    .map(|m| m.parse())
                    .transpose()
                    .with_context(|| "bad metrics address")?;
                Ok(Started::Listening(destination))
            }
            // The reader saw stdout close without `listening on`: the process is exiting.
            Err(RecvTimeoutError::Disconnected) => {
                Ok(Started::Exited(destination.wait(LISTEN_TIMEOUT)?))
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = destination.child.kill();
                let finished = destination.wait(LISTEN_TIMEOUT)?;
                bail!(
                    "destination neither listened nor exited within {LISTEN_TIMEOUT:?} ({}): {}",
                    finished.status,
                    finished.stderr
                )
            }
        }
    }

    /// Wait for the destination to exit (panics after `timeout`) and collect its stdout and stderr.
    pub fn wait(&mut self, timeout: Duration) -> Result<Finished> {
        let status = wait_with_timeout(&mut self.child, timeout)?;
        Ok(Finished {
            status,
            stdout: join(self.stdout.take())?,
            stderr: join(self.stderr.take())?,
        })
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads the destination's stdout to its end: sends the `listening on` address (with the metrics address printed
/// before it, if any) on `tx` once, and returns every line. `tx` is dropped at the end of stdout, so a receiver
/// still waiting learns that the destination exited without listening.
fn announce(
    stdout: impl std::io::Read + Send + 'static,
    tx: mpsc::Sender<Announced>,
) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut seen = Vec::new();
        let mut tx = Some(tx);
        // The metrics line, if any, comes before `listening on`.
        let mut metrics = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = metrics_line(&line) {
                metrics = Some(addr);
            }
            if let Some(addr) = line.strip_prefix("listening on ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send((addr.trim().to_owned(), metrics.take()));
                }
            }
            seen.push(line);
        }
        seen.join("\n")
    })
}
