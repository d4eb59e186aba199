//! Child processes of the bench: kill-on-drop guards, and probes of the processes a daemon forks, read from `/proc`
//! (waiting for them is `wait`'s).
//!
//! Peak RSS is the kernel's high-water mark (`VmHWM` in `/proc/PID/status`), sampled every `wait::SAMPLE_TICK`
//! until the process exits. The mark only grows, so a sample misses at most what the process gained in its last
//! tick before exiting. (`wait4`'s `ru_maxrss` cannot stand in for it: it keeps the mark of the bench's own memory,
//! which the child shared until its `exec`.) A child's CPU time comes from the kernel when it is reaped
//! (`wait::reap`). A probe on a server (rsync's daemon, stunnel) sums the marks and CPU times of the processes it
//! forks for the connection, which are not our children, because rsync's receiving side is two processes
//! (generator and receiver).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::wait::{reap, Usage};

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped before it exited, so an error
/// anywhere in the bench leaves no agent, daemon or tunnel behind.
pub struct ChildGuard {
    /// What the bench calls it in errors.
    pub name: String,
    child: Child,
    /// Its stderr (and for daemons stdout) goes here; its tail is quoted when it fails.
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `command` with stderr (and stdout unless `piped_stdout`) appended to `log`.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: &Path,
        piped_stdout: bool,
    ) -> anyhow::Result<Self> {
        let err = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let out: Stdio = if piped_stdout {
            Stdio::piped()
        } else {
            err.try_clone()?.into()
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            exited: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's piped stdout, once.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Its exit status and resource use if it has exited (reaping it), without waiting; `None` for a child reaped
    /// by [`ChildGuard::stop`].
    pub(super) fn poll(&mut self) -> anyhow::Result<Option<(ExitStatus, Usage)>> {
        if self.exited.is_some() {
            return Ok(None);
        }
        let reaped =
            reap(self.pid(), false).with_context(|| format!("cannot wait for {}", self.name))?;
        if let Some((status, _)) = reaped {
            self.exited = Some(status);
        }
        Ok(reaped)
    }

    /// An error naming the child and its log; the log's last lines go to stderr first (the error itself is printed
    /// on one line).
    pub fn failure(&self, what: &str) -> anyhow::Error {
        eprintln!(
            "bench: {} {what}; last lines of {}:\n{}",
            self.name,
            self.log.display(),
            log_tail(&self.log, 12)
        );
        anyhow::anyhow!("{} {what} (its log: {})", self.name, self.log.display())
    }

    /// Kills the child now (if it still runs) and reaps it.
    pub fn stop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = reap(self.pid(), true)
                .ok()
                .flatten()
                .map(|(status, _)| status);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of a log file (or a note that it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
    {
        return format!("  (cannot read {})", path.display());
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Peak RSS and CPU time of one process, or of the processes a server forks.
pub struct Probe {
    pid: u32,
    descendants: bool,
    peaks: HashMap<u32, u64>,
    cpu: HashMap<u32, u64>,
}

impl Probe {
    /// Peak RSS of process `pid` itself.
    pub fn process(pid: u32) -> Self {
        Self {
            pid,
            descendants: false,
            peaks: HashMap::new(),
            cpu: HashMap::new(),
        }
    }

    /// Summed peak RSS of the processes forked (directly or not) by `pid`, not counting `pid`.
    pub fn descendants(pid: u32) -> Self {
        Self {
            pid,
            descendants: true,
            peaks: HashMap::new(),
            cpu: HashMap::new(),
        }
    }

    /// Reads the current high-water marks and CPU times.
    pub fn sample(&mut self) {
        let pids = match self.descendants {
            true => descendants_of(self.pid),
            false => vec![self.pid],
        };
        for pid in pids {
            if let Some(hwm) = vm_hwm(pid) {
                let peak = self.peaks.entry(pid).or_default();
                *peak = (*peak).max(hwm);
            }
            if let Some(ticks) = cpu_ticks(pid) {
                let cpu = self.cpu.entry(pid).or_default();
                *cpu = (*cpu).max(ticks);
            }
        }
    }

    /// User plus system CPU time, seconds, as of the last sample before exit.
    pub fn cpu_secs(&self) -> Option<f64> {
        (!self.cpu.is_empty()).then(|| self.cpu.values().sum::<u64>() as f64 / USER_HZ)
    }

    /// The peak in bytes (None if never seen: the process was gone before the first sample).
    pub fn peak(&self) -> Option<u64> {
        (!self.peaks.is_empty()).then(|| self.peaks.values().sum())
    }
}

/// `VmHWM` of a process in bytes; None when it has gone (or is a zombie with no memory left).
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Clock ticks per second of `/proc/PID/stat` times: USER_HZ, 100 on every Linux architecture this runs on.
const USER_HZ: f64 = 100.0;

/// utime + stime of a process (all its threads, live and gone), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Every process below `pid` in the process tree, from `/proc/PID/task/TID/children`.
fn descendants_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(parent) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("children");
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            for child in text.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                todo.push(child);
            }
        }
    }
    found
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for daemons that cannot be told to pick one themselves).
pub fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `daemon` accepts TCP connections on 127.0.0.1:`port` (a readiness probe for daemons that do not
/// say when they are bound); fails if it exits first or after 10 s.
pub fn wait_listening(daemon: &mut ChildGuard, port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some((status, _)) = daemon.poll()? {
            return Err(daemon.failure(&format!("exited ({status}) before listening on {addr}")));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(daemon.failure(&format!("is not listening on {addr} after 10 s")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The full path of `program` if it is an executable file on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_peak_rss_is_read_from_proc() {
        let mut probe = Probe::process(std::process::id());
        probe.sample();
        assert!(probe.peak().is_some_and(|p| p > 0));
        assert!(probe.cpu_secs().is_some());
    }

    #[test]
    fn log_tail_keeps_the_last_lines() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("x.log");
        std::fs::write(&log, "a\nb\nc\n")?;
        assert_eq!(log_tail(&log, 2), "  b\n  c");
        Ok(())
    }
}
