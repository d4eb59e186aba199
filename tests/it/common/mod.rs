//! Shared helpers: start real `blockmover` agents, make sample volumes, read status files.
//!
//! Timeouts here are safety nets that turn a hung binary into a failed test; no test waits on
//! time for synchronisation (the destination's `listening on` line and the proxy's stall report
//! are the synchronisation points).

pub mod proxy;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blockmover::sample::{self, SampleSpec, BLOCK};
use serde_json::Value;

use crate::schema::{self, Kind};

/// Safety net for one agent run.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Safety net for the destination to print its `listening on` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A running `blockmover destination` whose stdout/stderr are drained by threads.
/// Dropping it kills the process if it is still running.
pub struct Destination {
    /// The child process.
    pub child: Child,
    /// The address it printed in `listening on ADDR`.
    pub addr: SocketAddr,
    /// The address it printed in `metrics on http://ADDR/metrics` (with `--metrics-listen`).
    pub metrics: Option<SocketAddr>,
    stderr: Option<JoinHandle<String>>,
}

/// How a destination ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Destination {
    /// Start `blockmover destination --listen 127.0.0.1:0 --target T --psk P --status S EXTRA...`
    /// and wait (at most 30 s) for its `listening on ADDR` line.
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
        let stdout = child.stdout.take().context("destination stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut announced = false;
            // The metrics line, if any, comes before `listening on`.
            let mut metrics = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = metrics_line(&line) {
                    metrics = Some(addr);
                }
                if !announced {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        announced = true;
                        let _ = tx.send((addr.trim().to_owned(), metrics.take()));
                    }
                }
            }
        });
        let mut destination = Destination {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
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
                Ok(destination)
            }
            Err(_) => {
                let _ = destination.child.kill();
                let finished = destination.wait(LISTEN_TIMEOUT)?;
                bail!(
                    "destination printed no `listening on` line ({}): {}",
                    finished.status,
                    finished.stderr
                )
            }
        }
    }

    /// Wait for the destination to exit (panics after `timeout`) and collect its stderr.
    pub fn wait(&mut self, timeout: Duration) -> Result<Finished> {
        let status = wait_with_timeout(&mut self.child, timeout)?;
        let stderr = match self.stderr.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| anyhow!("stderr reader panicked"))?,
            None => String::new(),
        };
        Ok(Finished { status, stderr })
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
    let mut child = spawn_source_with(addr, volume, psk, status, extra)?;
    let stdout = drain(child.stdout.take().context("source stdout")?);
    let stderr = drain(child.stderr.take().context("source stderr")?);
    let status = wait_with_timeout(&mut child, AGENT_TIMEOUT)?;
    let join = |h: JoinHandle<String>| h.join().map_err(|_| anyhow!("output reader panicked"));
    Ok(Output {
        status,
        stdout: join(stdout)?.into_bytes(),
        stderr: join(stderr)?.into_bytes(),
    })
}

/// Send SIGTERM to a process (as the kubelet does when a pod is deleted).
pub fn sigterm(pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -TERM {pid} failed: {status}");
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

    /// Assert both agents exited 0.
    pub fn expect_success(&self) {
        assert!(
            self.source.status.success(),
            "source failed ({}):\n{}",
            self.source.status,
            self.source_stderr()
        );
        assert!(
            self.destination.status.success(),
            "destination failed ({}):\n{}",
            self.destination.status,
            self.destination.stderr
        );
    }
}

impl Fixture {
    /// A mixed sample volume of `size` bytes (seeded) and an all-zero sparse target of equal size.
    pub fn new(size: u64, seed: u64) -> Result<Fixture> {
        Fixture::with_spec(&SampleSpec::mixed(size, seed), size)
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
        let mut destination = self.destination()?;
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
