//! The local side of hardening (issue 10): one writer per target, file identity instead of path text, temporary
//! files that follow no symlink, start-up checks of the status directory and the key file, flag ranges.
//!
//! Real processes of the release binary. Where the destination opens its target only when a source connects
//! (before the change that opens it at start-up), a refusal is accepted either at start-up or when its source
//! connects; what must never happen is a Successful sync whose target differs from its volume. Tests that need
//! root (loop devices, mounts, device nodes) are in `devices`; `target` holds the one-writer and same-file
//! checks, `files` the temporary files, the status directory, the key file and the flags. This file holds the
//! helpers they share (kept here, not in `common`).

mod devices;
mod files;
mod target;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockmover::sample::{self, SampleSpec};

use crate::common::{bin, drain, wait_with_timeout};

const MIB: u64 = 1 << 20;

/// Safety net for a process expected to exit at once (a start-up check, a usage error).
const PROMPT: Duration = Duration::from_secs(20);

/// Where the first destination's sync is held, so that it holds the target: past HELLO and the first NEEDs.
const STALL_AT: u64 = 2 * MIB;

/// A destination that printed `listening on`, killed on drop.
pub struct Running {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    stderr: Option<JoinHandle<String>>,
}

/// How a process ended.
#[derive(Debug)]
pub struct Exit {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Exit {
    /// The exit code (`None` after a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The `error: ` line on stderr, or "" when there is none.
    pub fn error_line(&self) -> &str {
        error_line(&self.stderr)
    }
}

/// A destination either listening or already gone (refused at start-up).
pub enum Started {
    /// It printed `listening on ADDR`.
    Listening(Running),
    /// It exited before listening.
    Exited(Exit),
}

impl Running {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to exit (a safety net, not synchronisation).
    pub fn wait(&mut self, timeout: Duration) -> Result<Exit> {
        let status = wait_with_timeout(&mut self.child, timeout)?;
        let stderr = match self.stderr.take() {
            Some(h) => h.join().map_err(|_| anyhow!("stderr reader panicked"))?,
            None => String::new(),
        };
        Ok(Exit {
            status,
            stdout: String::new(),
            stderr,
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

/// `blockmover destination --listen 127.0.0.1:0 --target T --psk P --status S EXTRA...`, until it prints
/// `listening on ADDR` or exits.
pub fn start_destination(
    target: &Path,
    psk: &Path,
    status: &Path,
    extra: &[&str],
) -> Result<Started> {
    let mut child = Command::new(bin())
        .args(["destination", "--listen", "127.0.0.1:0", "--target"])
        .arg(target)
        .arg("--psk")
        .arg(psk)
        .arg("--status")
        .arg(status)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin()))?;
    let stderr = drain(child.stderr.take().context("stderr")?);
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut announced = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !announced {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    announced = true;
                    let _ = tx.send(Ok(addr.trim().to_owned()));
                }
            }
            seen.push(line);
        }
        // Ends the wait of a destination that exited without listening.
        let _ = tx.send(Err(seen.join("\n")));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(addr)) => Ok(Started::Listening(Running {
            child,
            addr: addr
                .parse()
                .with_context(|| format!("bad address {addr:?}"))?,
            stderr: Some(stderr),
        })),
        Ok(Err(stdout)) => {
            let status = wait_with_timeout(&mut child, PROMPT)?;
            let stderr = stderr
                .join()
                .map_err(|_| anyhow!("stderr reader panicked"))?;
            Ok(Started::Exited(Exit {
                status,
                stdout,
                stderr,
            }))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the destination neither listened nor exited within 30 s")
        }
    }
}

/// Runs `blockmover ARGS...` to completion (a safety net of [`PROMPT`] unless told otherwise).
pub fn run_bin<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Result<Exit> {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin()))?;
    let stdout = drain(child.stdout.take().context("stdout")?);
    let stderr = drain(child.stderr.take().context("stderr")?);
    let status = wait_with_timeout(&mut child, timeout)?;
    let join = |h: JoinHandle<String>| h.join().map_err(|_| anyhow!("output reader panicked"));
    Ok(Exit {
        status,
        stdout: join(stdout)?,
        stderr: join(stderr)?,
    })
}

/// The `error: ` line of `stderr`, or "".
pub fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("")
}

/// A random (incompressible) volume of `size` bytes at `path`.
pub fn random_volume(path: &Path, size: u64, seed: u64) -> Result<()> {
    let spec = SampleSpec {
        size,
        zero_share: 0.0,
        text_share: 0.0,
        random_share: 1.0,
        seed,
    };
    sample::write_sample_volume(path, &spec)?;
    Ok(())
}
