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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use blockmover::sample::SampleSpec;
use prometheus_parse::{Scrape, Value as Metric};
use serde_json::Value;

use crate::common::{drain, spawn_source_with, Destination, Fixture};

/// Exit code of a failure a retry may cure (EX_TEMPFAIL).
pub const RETRYABLE: i32 = 75;
/// Exit code of a failure a retry will not cure.
pub const PERMANENT: i32 = 1;
/// Safety net for a condition to become true.
pub const WAIT: Duration = Duration::from_secs(60);

/// A process stopped with SIGSTOP; continued (SIGCONT) when dropped, so that a failing test never leaves a
/// stopped process behind (the owner of the [`Child`] then kills it as usual).
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

/// `kill -NAME PID`.
pub fn signal(name: &str, pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{name} {pid}: {status}");
    Ok(())
}

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

impl Running {
    /// Takes over a spawned child whose stderr is piped, and whose stdout is piped or already taken.
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
        let join = |h: Option<JoinHandle<String>>| {
            h.map(|h| h.join().map_err(|_| anyhow!("output reader panicked")))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        // Its stdout is drained so that it never blocks on a full pipe; nothing here reads it.
        join(self.stdout.take())?;
        Ok(Ended {
            status,
            waited,
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

/// The `error: ` line of `stderr`, or "".
pub fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("")
}

/// Polls `check` every 10 ms until it holds; fails after [`WAIT`] (a safety net, not a timing assumption).
pub fn wait_until(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not reached after {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `GET /metrics` over HTTP/1.1 on loopback, parsed.
pub fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(WAIT))?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {response:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    Ok(Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))?)
}

/// The value of the sample `name` carrying `label` (if given), or None when the scrape has none.
pub fn metric(s: &Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .and_then(|x| match &x.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => Some(*v),
            _ => None,
        })
}

/// `blockmover_rejected_connections_total{reason}` of the agent serving metrics at `addr` (0 when absent).
pub fn rejected(addr: SocketAddr, reason: &str) -> Result<f64> {
    let s = scrape(addr)?;
    let name = "blockmover_rejected_connections_total";
    Ok(metric(&s, name, Some(("reason", reason))).unwrap_or(0.0))
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

/// The bytes of the file at `path`, or None when there is none: to check that something left a file exactly as it
/// was (or absent), whatever an agent wrote there at start-up.
pub fn file_bytes(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// A fixture whose volume is `size` bytes of incompressible random data and whose target is all zeros: a full
/// sync sends every chunk, raw, so bytes on the wire follow the data.
pub fn random_fixture(size: u64, seed: u64) -> Result<Fixture> {
    let spec = SampleSpec {
        size,
        zero_share: 0.0,
        text_share: 0.0,
        random_share: 1.0,
        seed,
    };
    Fixture::with_spec(&spec, size)
}

/// Empties `target` and makes it an all-zero sparse file of `size` bytes again.
pub fn reset_target(target: &Path, size: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(target)?;
    file.set_len(0)?;
    file.set_len(size)?;
    Ok(())
}
