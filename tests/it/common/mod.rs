//! Shared helpers: start real `blockmover` agents, make sample volumes, read status files.
//!
//! Timeouts here are safety nets that turn a hung binary into a failed test; no test waits on
//! time for synchronisation (the destination's `listening on` line and the proxy's stall report
//! are the synchronisation points).

mod destination;
pub mod metrics;
pub mod mounts;
pub mod proxy;
mod running;

pub use destination::{Destination, Finished, Started};
pub use running::{Ended, ObservedSource, Running};

use std::ffi::OsStr;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmover::sample::{self, SampleSpec, BLOCK};
use serde_json::Value;

use crate::schema::{self, Kind};

/// Safety net for one agent run.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The `blockmover` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blockmover")
}

/// `blockmover keygen --out DIR/psk.txt`; returns the key file.
pub fn keygen(dir: &Path) -> Result<PathBuf> {
    keygen_named(dir, "psk.txt")
}

/// `blockmover keygen --out DIR/NAME`; returns the key file.
pub fn keygen_named(dir: &Path, name: &str) -> Result<PathBuf> {
    let out = dir.join(name);
    let output = Command::new(bin())
        .arg("keygen")
        .arg("--out")
        .arg(&out)
        .output()?;
    if !output.status.success() {
        bail!(
            "keygen failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(out)
}

/// The address in a `metrics on http://ADDR/metrics` line.
pub fn metrics_line(line: &str) -> Option<String> {
    line.strip_prefix("metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .map(str::to_owned)
}

/// Start `blockmover source --connect ADDR --volume V --psk P --status S` with piped output.
pub fn spawn_source(addr: SocketAddr, volume: &Path, psk: &Path, status: &Path) -> Result<Child> {
    spawn_source_with(addr, volume, psk, status, &[])
}

/// [`spawn_source`] with extra flags.
pub fn spawn_source_with(
    addr: SocketAddr,
    volume: &Path,
    psk: &Path,
    status: &Path,
    extra: &[&str],
) -> Result<Child> {
    Command::new(bin())
        .arg("source")
        .arg("--connect")
        .arg(addr.to_string())
        .arg("--volume")
        .arg(volume)
        .arg("--psk")
        .arg(psk)
        .arg("--status")
        .arg(status)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin()))
}

/// Run a source to completion (120 s safety net) and return its exit status and output.
pub fn run_source(addr: SocketAddr, volume: &Path, psk: &Path, status: &Path) -> Result<Output> {
    run_source_with(addr, volume, psk, status, &[])
}

/// [`run_source`] with extra flags.
pub fn run_source_with(
    addr: SocketAddr,
    volume: &Path,
    psk: &Path,
    status: &Path,
    extra: &[&str],
) -> Result<Output> {
    let finished =
        Running::new(spawn_source_with(addr, volume, psk, status, extra)?)?.wait(AGENT_TIMEOUT)?;
    Ok(Output {
        status: finished.status,
        stdout: finished.stdout.into_bytes(),
        stderr: finished.stderr.into_bytes(),
    })
}

/// Runs `blockmover ARGS...` to completion and returns its status and whole output; after `timeout` (a safety
/// net) it is killed and the test panics.
pub fn run_bin<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Result<Finished> {
    Running::new(spawn_bin(args)?)?.wait(timeout)
}

/// Starts `blockmover ARGS...` with stdin from /dev/null and stdout and stderr piped (for the caller to read).
pub fn spawn_bin<S: AsRef<OsStr>>(args: &[S]) -> Result<Child> {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin()))
}

/// The agent's one-line failure report: the first line of `stderr` that starts with `error: ` (every failure
/// prints one; log lines start with a timestamp), or "" when there is none.
pub fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("")
}

/// Polls `check` every 10 ms until it holds, failing at once if it fails; after `limit` (a safety net, not a
/// timing assumption) fails naming `what`.
pub fn wait_until(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not reached after {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Send SIGTERM to a process (as the kubelet does when a pod is deleted).
pub fn sigterm(pid: u32) -> Result<()> {
    signal("TERM", pid)
}

/// `kill -NAME PID` (`TERM`, `STOP`, `CONT`, ...); fails unless `kill` succeeded.
pub fn signal(name: &str, pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed: {status}");
    }
    Ok(())
}

/// Wait for `child`; after `timeout` kill it and panic (a safety net, not synchronisation).
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "process {} still running after {timeout:?}; killed",
                child.id()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads `pipe` to its end on a thread; the handle yields everything read (lossy UTF-8).
pub fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Parse a status file.
pub fn read_status(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read status {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse status {}: {text}", path.display()))
}

/// `status.external[key]` as a number (values are decimal strings; plain numbers are accepted).
pub fn external_u64(status: &Value, key: &str) -> Result<u64> {
    let value = status
        .get("external")
        .and_then(|e| e.get(key))
        .with_context(|| format!("external.{key} missing in {status}"))?;
    match value {
        Value::String(s) => s
            .parse()
            .with_context(|| format!("external.{key} = {s:?} is not a decimal")),
        other => other
            .as_u64()
            .with_context(|| format!("external.{key} = {other} is not a number")),
    }
}

/// `status.external[key]` as text.
pub fn external_str(status: &Value, key: &str) -> Result<String> {
    status
        .get("external")
        .and_then(|e| e.get(key))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("external.{key} missing in {status}"))
}

/// `status.latestMoverStatus.result`, or "" if absent.
pub fn result_of(status: &Value) -> &str {
    status
        .pointer("/latestMoverStatus/result")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `status.lastSyncTime` parsed as RFC 3339, if present.
pub fn last_sync_time(status: &Value) -> Result<Option<chrono::DateTime<chrono::FixedOffset>>> {
    match status.get("lastSyncTime").and_then(Value::as_str) {
        Some(text) => Ok(Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .with_context(|| format!("lastSyncTime {text:?}"))?,
        )),
        None => Ok(None),
    }
}

/// Assert a status says Successful with a lastSyncTime and no lastSyncStartTime, and pass it
/// through the schema check. Returns the parsed status.
pub fn expect_successful(path: &Path, kind: Kind) -> Result<Value> {
    let status = read_status(path)?;
    assert_eq!(
        result_of(&status),
        "Successful",
        "{kind:?} status {status:#}"
    );
    assert!(
        last_sync_time(&status)?.is_some(),
        "{kind:?} status has no lastSyncTime: {status:#}"
    );
    assert!(
        status.get("lastSyncStartTime").is_none(),
        "{kind:?} status still has lastSyncStartTime: {status:#}"
    );
    check_schema(path, kind)?;
    Ok(status)
}

/// Assert a status says Failed and pass it through the schema check. Returns the parsed status.
pub fn expect_failed(path: &Path, kind: Kind) -> Result<Value> {
    let status = read_status(path)?;
    assert_eq!(result_of(&status), "Failed", "{kind:?} status {status:#}");
    check_schema(path, kind)?;
    Ok(status)
}

/// Validate a status file against the schema; `Ok(false)` from the checker means "not checked".
pub fn check_schema(path: &Path, kind: Kind) -> Result<()> {
    if !schema::check_status_file(path, kind)? {
        eprintln!("schema check not available for {}", path.display());
    }
    Ok(())
}

/// Assert an agent exited non-zero; returns its stderr for further checks.
pub fn expect_failure(what: &str, status: ExitStatus, stderr: &str) -> String {
    assert!(
        !status.success(),
        "{what} succeeded but should have failed; stderr:\n{stderr}"
    );
    let line = stderr.lines().find(|l| l.contains("error: ")).unwrap_or("");
    println!("{what} failed as expected ({status}): {line}");
    assert!(
        stderr.contains("error: "),
        "{what} failed without an `error: ` line; stderr:\n{stderr}"
    );
    stderr.to_owned()
}

/// A temporary directory with a key, a volume, a target and two status files.
pub struct Fixture {
    /// Holds every file below; removed on drop.
    pub dir: tempfile::TempDir,
    /// Pre-shared key file.
    pub psk: PathBuf,
    /// Source volume.
    pub volume: PathBuf,
    /// Destination target.
    pub target: PathBuf,
    /// Source status file.
    pub source_status: PathBuf,
    /// Destination status file.
    pub destination_status: PathBuf,
    /// Volume size in bytes.
    pub size: u64,
}

/// Exit statuses and stderr of both agents of one sync.
#[derive(Debug)]
pub struct SyncRun {
    /// The source process output.
    pub source: Output,
    /// The destination's exit.
    pub destination: Finished,
}

impl SyncRun {
    /// Source stderr as text.
    pub fn source_stderr(&self) -> String {
        String::from_utf8_lossy(&self.source.stderr).into_owned()
    }

    /// Fails (an error, not a panic) unless both agents exited 0; the error shows both exits and stderrs.
    pub fn ensure_success(&self) -> Result<()> {
        if !(self.source.status.success() && self.destination.status.success()) {
            bail!(
                "source {}:\n{}\ndestination {}:\n{}",
                self.source.status,
                self.source_stderr(),
                self.destination.status,
                self.destination.stderr
            );
        }
        Ok(())
    }

    /// Assert both agents exited 0.
    pub fn expect_success(&self) {
        if let Err(e) = self.ensure_success() {
            panic!("sync failed: {e}");
        }
    }
}

impl Fixture {
    /// A mixed sample volume of `size` bytes (seeded) and an all-zero sparse target of equal size.
    pub fn new(size: u64, seed: u64) -> Result<Fixture> {
        Fixture::with_spec(&SampleSpec::mixed(size, seed), size)
    }

    /// A volume of `size` bytes of incompressible random data ([`random_spec`]) and an all-zero sparse target of
    /// equal size: a full sync sends every chunk, raw, so bytes on the wire follow the data.
    pub fn random(size: u64, seed: u64) -> Result<Fixture> {
        Fixture::with_spec(&random_spec(size, seed), size)
    }

    /// A sample volume made from `spec` and an all-zero sparse target of `target_size` bytes.
    pub fn with_spec(spec: &SampleSpec, target_size: u64) -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let psk = keygen(dir.path())?;
        let volume = dir.path().join("volume.img");
        let target = dir.path().join("target.img");
        sample::write_sample_volume(&volume, spec)?;
        sparse_file(&target, target_size)?;
        Ok(Fixture {
            source_status: dir.path().join("source-status.json"),
            destination_status: dir.path().join("destination-status.json"),
            dir,
            psk,
            volume,
            target,
            size: spec.size,
        })
    }

    /// Start a destination for this fixture's target.
    pub fn destination(&self) -> Result<Destination> {
        Destination::spawn(&self.target, &self.psk, &self.destination_status, &[])
    }

    /// Run a source for this fixture's volume against `addr`.
    pub fn source(&self, addr: SocketAddr) -> Result<Output> {
        run_source(addr, &self.volume, &self.psk, &self.source_status)
    }

    /// One sync over loopback, directly from source to destination.
    pub fn sync(&self) -> Result<SyncRun> {
        self.sync_with(&[])
    }

    /// [`Fixture::sync`] with extra source flags.
    pub fn sync_with(&self, source_flags: &[&str]) -> Result<SyncRun> {
        self.sync_into(&mut self.destination()?, source_flags)
    }

    /// Runs a source of this fixture's volume (with `source_flags`) against the running `destination` to
    /// completion, then waits for the destination to exit (a one-shot one does after its sync).
    pub fn sync_into(
        &self,
        destination: &mut Destination,
        source_flags: &[&str],
    ) -> Result<SyncRun> {
        let source = run_source_with(
            destination.addr,
            &self.volume,
            &self.psk,
            &self.source_status,
            source_flags,
        )?;
        let destination = destination.wait(AGENT_TIMEOUT)?;
        Ok(SyncRun {
            source,
            destination,
        })
    }

    /// BLAKE3 of the volume.
    pub fn volume_digest(&self) -> Result<blake3::Hash> {
        Ok(sample::file_digest(&self.volume, self.size)?)
    }

    /// BLAKE3 of the first `size` bytes of the target.
    pub fn target_digest(&self) -> Result<blake3::Hash> {
        Ok(sample::file_digest(&self.target, self.size)?)
    }

    /// Assert the target's first `size` bytes equal the volume.
    pub fn expect_target_matches_volume(&self) -> Result<()> {
        assert_eq!(
            self.target_digest()?,
            self.volume_digest()?,
            "target differs from volume"
        );
        Ok(())
    }
}

/// A volume of `size` bytes of seeded random data: no zero block, no text, nothing zstd can shrink.
pub fn random_spec(size: u64, seed: u64) -> SampleSpec {
    SampleSpec {
        size,
        zero_share: 0.0,
        text_share: 0.0,
        random_share: 1.0,
        seed,
    }
}

/// Writes a [`random_spec`] volume of `size` bytes at `path`.
pub fn random_volume(path: &Path, size: u64, seed: u64) -> Result<()> {
    sample::write_sample_volume(path, &random_spec(size, seed))?;
    Ok(())
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

/// Create (or truncate) `path` as an all-zero sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(size)?;
    Ok(())
}

/// Read 4 KiB block `index` of `path` (shorter at the end of the file).
pub fn read_block(path: &Path, index: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read_at(&mut buf[filled..], index * BLOCK + filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Bytes of the first `len` bytes of `path` that lie in 4 KiB blocks holding any non-zero byte.
pub fn nonzero_block_bytes(path: &Path, len: u64) -> Result<u64> {
    let bytes = std::fs::read(path)?;
    let bytes = bytes.get(..len as usize).context("file shorter than len")?;
    Ok(bytes
        .chunks(BLOCK as usize)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum())
}
