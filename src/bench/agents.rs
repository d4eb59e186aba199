//! One blockmover sync with source and destination as separate processes of this binary over loopback TLS:
//! spawn, time, sample peak RSS, read both status files' `external` figures.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use super::delay::DelayProxy;
use super::procs::{ChildGuard, Probe};
use super::wait;

/// The longest one sync may take before the bench gives up on it.
pub const SYNC_LIMIT: Duration = Duration::from_secs(3600);

/// What one blockmover sync measured.
#[derive(Debug, Clone)]
pub struct AgentSync {
    /// Wall time from starting the source process to its exit (it exits after the destination's COMMIT, which
    /// follows the target's fsync); the destination was already listening.
    pub duration: Duration,
    /// Peak RSS of the source process, bytes.
    pub rss_source: Option<u64>,
    /// Peak RSS of the destination process, bytes.
    pub rss_destination: Option<u64>,
    /// CPU time of the source process, seconds.
    pub cpu_source: Option<f64>,
    /// CPU time of the destination process, seconds.
    pub cpu_destination: Option<f64>,
    /// The source status' `external` map.
    pub source: BTreeMap<String, String>,
    /// The destination status' `external` map.
    pub destination: BTreeMap<String, String>,
}

impl AgentSync {
    /// A figure from the source's `external` map, if present and numeric.
    pub fn src(&self, key: &str) -> Option<u64> {
        self.source.get(key).and_then(|v| v.parse().ok())
    }

    /// A figure from the destination's `external` map, if present and numeric.
    pub fn dst(&self, key: &str) -> Option<u64> {
        self.destination.get(key).and_then(|v| v.parse().ok())
    }
}

/// How one sync runs.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// The source connects through a [`DelayProxy`] adding this round-trip time.
    pub rtt: Option<Duration>,
    /// `--state-dir` of the source and of the destination: manifests of the last synced image.
    pub state: Option<(PathBuf, PathBuf)>,
    /// `source --changed-extents`: the change list since the last synced image.
    pub changed_extents: Option<PathBuf>,
    /// `source --snapshot reflink`: sync a reflink clone (and, with `state`, take the change list from it).
    pub reflink: bool,
}

/// Runs the agents: this binary, a key made by `blockmover keygen`, and a directory for logs and status files.
pub struct Agents {
    exe: PathBuf,
    dir: PathBuf,
    psk: PathBuf,
    runs: u32,
    /// `source --bwlimit` for every sync.
    bwlimit: Option<u64>,
    /// More `source` flags for every sync (`bench --source-arg`).
    source_args: Vec<String>,
    /// More `destination` flags for every sync (`bench --destination-arg`).
    destination_args: Vec<String>,
}

impl Agents {
    /// Makes a key with `blockmover keygen` in `dir` (replacing the key of an earlier run in the same `--dir`:
    /// keygen refuses to overwrite a key file).
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let psk = dir.join("psk.txt");
        match std::fs::remove_file(&psk) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot replace {}", psk.display()))
            }
            _ => {}
        }
        let out = Command::new(&exe)
            .arg("keygen")
            .arg("--out")
            .arg(&psk)
            .output()
            .with_context(|| format!("cannot run {} keygen", exe.display()))?;
        ensure!(
            out.status.success(),
            "blockmover keygen failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self {
            exe,
            dir: dir.to_owned(),
            psk,
            runs: 0,
            bwlimit: None,
            source_args: Vec::new(),
            destination_args: Vec::new(),
        })
    }

    /// Every source runs with these flags too.
    pub fn with_source_args(mut self, args: &[String]) -> Self {
        self.source_args = args.to_vec();
        self
    }

    /// Every destination runs with these flags too.
    pub fn with_destination_args(mut self, args: &[String]) -> Self {
        self.destination_args = args.to_vec();
        self
    }

    /// Every source runs with `--bwlimit rate`.
    pub fn with_bwlimit(mut self, rate: Option<u64>) -> Self {
        self.bwlimit = rate;
        self
    }

    /// The key file (`volsync:<hex>`), also usable as stunnel's `PSKsecrets`.
    pub fn psk(&self) -> &Path {
        &self.psk
    }

    /// One sync of `volume` into `target`, as `how` says.
    pub fn sync(
        &mut self,
        volume: &Path,
        target: &Path,
        how: &SyncOptions,
    ) -> anyhow::Result<AgentSync> {
        let rtt = how.rtt;
        self.runs += 1;
        let n = self.runs;
        let dst_status = self.dir.join(format!("dst-status-{n}.json"));
        let src_status = self.dir.join(format!("src-status-{n}.json"));
        let mut dcmd = Command::new(&self.exe);
        dcmd.arg("destination")
            .args(["--listen", "127.0.0.1:0", "--target"])
            .arg(target)
            .arg("--psk")
            .arg(&self.psk)
            .arg("--status")
            .arg(&dst_status);
        if let Some((_, dst_state)) = &how.state {
            dcmd.arg("--state-dir").arg(dst_state);
        }
        dcmd.args(&self.destination_args);
        let mut dest = ChildGuard::spawn(
            "blockmover destination",
            dcmd,
            &self.dir.join(format!("destination-{n}.log")),
            true,
        )?;
        let stdout = dest.take_stdout().context("destination stdout")?;
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        lines
            .read_line(&mut line)
            .context("cannot read the destination's stdout")?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            return Err(dest.failure(&format!(
                "did not print `listening on ADDR` (printed {:?})",
                line.trim()
            )));
        };
        let addr = match rtt {
            Some(rtt) => {
                let target: std::net::SocketAddr = addr
                    .parse()
                    .with_context(|| format!("the destination printed an odd address {addr:?}"))?;
                DelayProxy::start(target, rtt)?.addr().to_string()
            }
            None => addr.to_owned(),
        };

        let mut scmd = Command::new(&self.exe);
        scmd.arg("source")
            .arg("--connect")
            .arg(&addr)
            .arg("--volume")
            .arg(volume)
            .arg("--psk")
            .arg(&self.psk)
            .arg("--status")
            .arg(&src_status);
        if let Some((src_state, _)) = &how.state {
            scmd.arg("--state-dir").arg(src_state);
        }
        if let Some(extents) = &how.changed_extents {
            scmd.arg("--changed-extents").arg(extents);
        }
        if how.reflink {
            scmd.args(["--snapshot", "reflink"]);
        }
        if let Some(rate) = self.bwlimit {
            scmd.arg("--bwlimit").arg(rate.to_string());
        }
        scmd.args(&self.source_args);
        let start = Instant::now();
        let mut source = ChildGuard::spawn(
            "blockmover source",
            scmd,
            &self.dir.join(format!("source-{n}.log")),
            false,
        )?;
        let mut src_probe = Probe::process(source.pid());
        let mut dst_probe = Probe::process(dest.pid());
        let ended = wait::wait_all(
            &mut [&mut source, &mut dest],
            &mut [&mut src_probe, &mut dst_probe],
            SYNC_LIMIT,
        )?;
        drop(lines);
        let (src, dst) = (ended[0], ended[1]);
        if !src.status.success() {
            return Err(source.failure(&format!("failed ({})", src.status)));
        }
        if !dst.status.success() {
            return Err(dest.failure(&format!("failed ({})", dst.status)));
        }
        Ok(AgentSync {
            duration: src.at - start,
            rss_source: src_probe.peak(),
            rss_destination: dst_probe.peak(),
            cpu_source: Some(src.usage.cpu_secs),
            cpu_destination: Some(dst.usage.cpu_secs),
            source: external(&src_status)?,
            destination: external(&dst_status)?,
        })
    }
}

/// The `external` map of a Successful status file.
fn external(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read status {}", path.display()))?;
    let status: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("status {} is not JSON", path.display()))?;
    let result = status
        .pointer("/latestMoverStatus/result")
        .and_then(|r| r.as_str());
    if result != Some("Successful") {
        bail!(
            "status {} says {:?}, not Successful",
            path.display(),
            result
        );
    }
    let map = status
        .get("external")
        .and_then(|e| e.as_object())
        .with_context(|| format!("status {} has no `external` map", path.display()))?;
    Ok(map
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_figures_are_read_from_a_successful_status() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.json");
        std::fs::write(
            &path,
            r#"{"latestMoverStatus":{"result":"Successful"},"external":{"wireBytesSent":"12"}}"#,
        )?;
        assert_eq!(external(&path)?["wireBytesSent"], "12");
        std::fs::write(&path, r#"{"latestMoverStatus":{"result":"Failed"}}"#)?;
        assert!(external(&path).is_err());
        Ok(())
    }
}
