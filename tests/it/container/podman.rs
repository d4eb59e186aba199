//! podman for the container tests: the image, built once per test run by `container/build-local.sh`, and guards
//! that remove every container, network and loop device a test makes, also when it fails.
//!
//! The image is tagged `localhost/blockmover:it-<pid>` and removed after this process exits by a small reaper
//! (`tail --pid`, then `podman rmi`), since a test binary has no hook that runs after its last test; images,
//! pods, containers, volumes and networks of an earlier run whose process is gone are removed before
//! the first test. Only the base image (`localhost/blockmover-base:bookworm`, one debootstrap) and the pause
//! image `podman kube play` builds for pods' infra containers (`localhost/podman-pause:<version>`) are kept
//! between runs.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Safety net for a container's run or a line it should print.
pub const SAFETY_NET: Duration = Duration::from_secs(120);

/// What every container name, network name and image tag of this run starts with.
fn run_prefix() -> String {
    format!("bm-it-{}", std::process::id())
}

const IMAGE_REPO: &str = "localhost/blockmover";

/// The podman configuration and the image of this test run.
pub struct Engine {
    dir: PathBuf,
    pub image: String,
    _reaper: Child,
}

/// The engine, or why there is none: `Skip` where podman cannot start a container here, `Broken` otherwise.
enum Setup {
    Ready(Engine),
    Skip(String),
    Broken(String),
}

static ENGINE: OnceLock<Setup> = OnceLock::new();

/// The engine shared by the tests of this module (built by the first test that asks), `None` (with the reason
/// printed) where podman cannot start a container, or an error where the image does not build.
pub fn engine() -> Result<Option<&'static Engine>> {
    match ENGINE.get_or_init(setup) {
        Setup::Ready(engine) => Ok(Some(engine)),
        Setup::Skip(reason) => {
            println!("skipped: podman cannot start a container here ({reason})");
            Ok(None)
        }
        Setup::Broken(error) => bail!("{error}"),
    }
}

fn has(command: &str) -> bool {
    Command::new("bash")
        .args(["-c", "command -v \"$1\" >/dev/null", "-", command])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    euid == Some("0")
}

fn setup() -> Setup {
    if !is_root() {
        return Setup::Skip("not root: the tests need loop devices and rootful podman".into());
    }
    match build() {
        Ok(setup) => setup,
        Err(e) => Setup::Broken(format!("{e:#}")),
    }
}

fn build() -> Result<Setup> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("blockmover-podman.")
        .tempdir()?
        .keep();
    let image = format!("{IMAGE_REPO}:it-{}", std::process::id());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("container/build-local.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&image)
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .env("BLOCKMOVER_BIN", env!("CARGO_BIN_EXE_blockmover"))
        .stdin(Stdio::null())
        .output()
        .context("run container/build-local.sh")?;
    let log = String::from_utf8_lossy(&out.stderr);
    println!("--- build-local.sh ({}):\n{log}", out.status);
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        let last = log.lines().last().unwrap_or("no output").to_owned();
        if !has("podman") || !has("runc") {
            return Ok(Setup::Skip(last));
        }
        bail!("container/build-local.sh failed: {last}");
    }
    let reaper = Command::new("bash")
        .args([
            "-c",
            "tail --pid=\"$1\" -f /dev/null; podman rmi -f \"$2\" >/dev/null 2>&1; rm -rf \"$3\"",
            "reaper",
        ])
        .arg(std::process::id().to_string())
        .arg(&image)
        .arg(&dir)
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("start the image reaper")?;
    let engine = Engine {
        dir,
        image,
        _reaper: reaper,
    };
    engine.remove_stale()?;
    let probe = engine.podman(&["run", "--rm", "--network", "none", &engine.image, "true"]);
    if let Err(e) = probe {
        return Ok(Setup::Skip(format!("{e:#}")));
    }
    let size = engine.podman(&["image", "inspect", "--format", "{{.Size}}", &engine.image])?;
    let size: u64 = size.trim().parse().context("image size")?;
    println!(
        "container image {} ready in {:.1} s: {:.1} MB",
        engine.image,
        started.elapsed().as_secs_f64(),
        size as f64 / 1e6
    );
    Ok(Setup::Ready(engine))
}

impl Engine {
    /// `podman` with this run's configuration.
    pub fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        command.stdin(Stdio::null());
        command
    }

    /// `podman ARGS`: its stdout, or an error with its stderr.
    pub fn podman(&self, args: &[&str]) -> Result<String> {
        let out = self.command().args(args).output().context("run podman")?;
        if !out.status.success() {
            bail!(
                "podman {}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A name no other container or network of any run uses.
    pub fn unique_name(&self, what: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}-{what}", run_prefix())
    }

    /// Remove the images, pods, containers, volumes and networks of earlier runs whose process is gone.
    fn remove_stale(&self) -> Result<()> {
        let gone = |name: &str, prefix: &str| {
            let pid = name.strip_prefix(prefix).and_then(|r| r.split('-').next());
            pid.is_some_and(|pid| {
                pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists()
            })
        };
        // Pods (and their containers) and volumes of `podman kube play` (container/kube.rs).
        let pods = self.podman(&["pod", "ps", "--format", "{{.Name}}"])?;
        for name in pods.lines().filter(|n| gone(n, "bm-it-")) {
            let _ = self.podman(&["pod", "rm", "-f", "-t", "0", "--ignore", name]);
        }
        let volumes = self.podman(&["volume", "ls", "--format", "{{.Name}}"])?;
        for name in volumes.lines().filter(|n| gone(n, "bm-it-")) {
            let _ = self.podman(&["volume", "rm", "-f", name]);
        }
        let containers = self.podman(&["ps", "-a", "--format", "{{.Names}}"])?;
        for name in containers.lines().filter(|n| gone(n, "bm-it-")) {
            let _ = self.podman(&["rm", "-f", "-t", "0", "--ignore", name]);
        }
        let networks = self.podman(&["network", "ls", "--format", "{{.Name}}"])?;
        for name in networks.lines().filter(|n| gone(n, "bm-it-")) {
            let _ = self.podman(&["network", "rm", "-f", name]);
        }
        let images = self.podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"])?;
        let tag = format!("{IMAGE_REPO}:it-");
        for image in images.lines().filter(|n| gone(n, &tag)) {
            let _ = self.podman(&["rmi", "-f", image]);
        }
        Ok(())
    }
}

/// A podman network, removed on drop.
pub struct Network {
    engine: &'static Engine,
    pub name: String,
}

impl Network {
    pub fn create(engine: &'static Engine) -> Result<Network> {
        let name = engine.unique_name("net");
        engine.podman(&["network", "create", &name])?;
        Ok(Network { engine, name })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(e) = self.engine.podman(&["network", "rm", "-f", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// An attached loop device, given back as it was found (owner, group, mode) and detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    found: (u32, u32, u32),
}

impl LoopDevice {
    /// `losetup --find --show FILE`.
    pub fn attach(file: &Path) -> Result<LoopDevice> {
        use std::os::unix::fs::MetadataExt;
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .context("run losetup")?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let meta = std::fs::metadata(&path).with_context(|| format!("{path:?}"))?;
        let found = (meta.uid(), meta.gid(), meta.mode() & 0o7777);
        Ok(LoopDevice { path, found })
    }

    /// Give the device node to `uid:gid` with `mode`, as a cluster's runtime would.
    pub fn set_owner(&self, uid: u32, gid: u32, mode: u32) -> Result<()> {
        std::os::unix::fs::chown(&self.path, Some(uid), Some(gid))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let (uid, gid, mode) = self.found;
        if let Err(e) = self.set_owner(uid, gid, mode) {
            eprintln!("warning: restoring {}: {e}", self.path.display());
        }
        match Command::new("losetup").arg("-d").arg(&self.path).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("warning: losetup -d {}: {other:?}", self.path.display()),
        }
    }
}

/// A container run attached (`podman run --name NAME ...`): its output lines in arrival order for the waits,
/// `podman logs` for what it printed. Removed on drop.
pub struct Container {
    engine: &'static Engine,
    pub name: String,
    child: Child,
    lines: Receiver<String>,
    seen: String,
}

/// How a container ended: its exit code and its log (`podman logs`, stdout and stderr interleaved).
pub struct Ran {
    pub name: String,
    pub code: Option<i32>,
    pub output: String,
}

impl Container {
    /// `podman run --name NAME ARGS...`.
    pub fn start(engine: &'static Engine, name: &str, args: &[String]) -> Result<Container> {
        let mut child = engine
            .command()
            .args(["run", "--name", name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn podman run")?;
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().context("stdout")?, tx.clone());
        forward(child.stderr.take().context("stderr")?, tx);
        Ok(Container {
            engine,
            name: name.to_owned(),
            child,
            lines,
            seen: String::new(),
        })
    }

    /// Wait for the `nth` line (1-based, counting from the start) containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, nth: usize) -> Result<String> {
        let mut count = self.seen.lines().filter(|l| l.contains(needle)).count();
        let deadline = Instant::now() + SAFETY_NET;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{} ended without {needle:?}:\n{}", self.name, self.seen)
                }
                Err(RecvTimeoutError::Timeout) => bail!("{} hangs:\n{}", self.name, self.seen),
            };
            self.seen.push_str(&line);
            self.seen.push('\n');
            count += usize::from(line.contains(needle));
            if count == nth {
                return Ok(line);
            }
        }
    }

    /// Wait for the container to exit (within the safety net), then read its log.
    pub fn finish(mut self) -> Result<Ran> {
        let deadline = Instant::now() + SAFETY_NET;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("{} hangs:\n{}", self.name, self.seen);
            }
            // Keep the lines for the error above; once podman closed its output, its exit is all that is left.
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break self.child.wait()?,
            }
        };
        let out = self
            .engine
            .command()
            .args(["logs", &self.name])
            .stderr(Stdio::piped())
            .output()?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        println!("--- {} ({status}):\n{output}", self.name);
        Ok(Ran {
            name: self.name.clone(),
            code: status.code(),
            output,
        })
    }

    /// `podman kill NAME` (SIGKILL), then the container's end.
    pub fn kill(self) -> Result<Ran> {
        self.engine.podman(&["kill", &self.name])?;
        self.finish()
    }

    /// `podman stop -t 30 NAME` (SIGTERM to PID 1, the entrypoint), then the container's end.
    pub fn stop(self) -> Result<Ran> {
        self.engine.podman(&["stop", "-t", "30", &self.name])?;
        self.finish()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self
            .engine
            .podman(&["rm", "-f", "-t", "0", "--ignore", &self.name])
        {
            eprintln!("warning: {e:#}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward(pipe: impl Read + Send + 'static, tx: Sender<String>) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Ran {
    /// Assert `ok`, showing `about` and the log otherwise.
    pub fn check(&self, ok: bool, about: &str) {
        assert!(ok, "{}: {about}:\n{}", self.name, self.output);
    }

    pub fn expect_code(&self, code: i32) {
        self.check(self.code == Some(code), &format!("exit code is not {code}"));
    }

    pub fn expect_line(&self, needle: &str) -> &str {
        let line = self.output.lines().find(|l| l.contains(needle));
        line.unwrap_or_else(|| panic!("{}: no line {needle:?}:\n{}", self.name, self.output))
    }

    /// What VolSync would show as latestMoverStatus.logs: the lines its filter keeps, the last 1024 bytes.
    pub fn volsync_logs(&self, failed: bool) -> String {
        crate::entrypoint::volsync_logs(self.output.lines(), failed)
    }

    /// The number after `label` in the last line holding it ("changed chunks 12" -> 12).
    pub fn figure(&self, label: &str) -> Option<u64> {
        let line = self.output.lines().rev().find(|l| l.contains(label))?;
        let rest = &line[line.find(label)? + label.len()..];
        rest.split_whitespace().next()?.parse().ok()
    }
}
