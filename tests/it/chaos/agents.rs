//! The chaos suite's agents and files: real `blockmover` processes with their output on channels, the volume and
//! target they share across iterations, and what a status file says about the try that just ended.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmover::sample::{self, SampleSpec};
use serde_json::Value;

use super::plan::Expected;
use super::{DROPPED, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, VOLUME};
use crate::common::{keygen, last_sync_time, result_of, sparse_file, spawn_bin, AGENT_TIMEOUT};

/// The files one chaos run keeps across iterations: the volume, the target and both status files.
pub struct Site {
    /// Holds every file below; removed on drop.
    _dir: tempfile::TempDir,
    pub psk: PathBuf,
    pub volume: PathBuf,
    pub target: PathBuf,
    pub source_status: PathBuf,
    pub destination_status: PathBuf,
}

impl Site {
    pub fn new(seed: u64) -> Result<Site> {
        let dir = tempfile::tempdir()?;
        let psk = keygen(dir.path())?;
        let volume = dir.path().join("volume.img");
        let target = dir.path().join("target.img");
        sample::write_sample_volume(&volume, &SampleSpec::mixed(VOLUME, seed))?;
        sparse_file(&target, VOLUME)?;
        Ok(Site {
            source_status: dir.path().join("source-status.json"),
            destination_status: dir.path().join("destination-status.json"),
            _dir: dir,
            psk,
            volume,
            target,
        })
    }

    pub fn target_matches_volume(&self) -> Result<bool> {
        Ok(
            sample::file_digest(&self.target, VOLUME)?
                == sample::file_digest(&self.volume, VOLUME)?,
        )
    }

    pub fn expected(&self, chunk_size: u32) -> Result<Expected> {
        let volume = std::fs::read(&self.volume)?;
        let target = std::fs::read(&self.target)?;
        let len = VOLUME as usize;
        Ok(Expected::of(
            volume.get(..len).context("short volume")?,
            target.get(..len).context("short target")?,
            chunk_size,
        ))
    }
}

/// A status file as it was at one moment: whether it was rewritten since is told by any of its inode, its
/// modification time or its text changing (status writes are atomic renames of a new file).
#[derive(Clone, Debug, PartialEq)]
pub struct Stamp {
    file: Option<(u64, i64, i64)>,
    text: String,
}

impl Stamp {
    pub fn of(path: &Path) -> Stamp {
        match (std::fs::metadata(path), std::fs::read_to_string(path)) {
            (Ok(m), Ok(text)) => Stamp {
                file: Some((m.ino(), m.mtime(), m.mtime_nsec())),
                text,
            },
            _ => Stamp {
                file: None,
                text: String::new(),
            },
        }
    }

    pub fn status(&self) -> Result<Option<Value>> {
        if self.file.is_none() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&self.text).with_context(
            || format!("status file is not JSON: {}", self.text),
        )?))
    }
}

/// What a status file says about the try that just ended.
#[derive(Debug)]
pub struct Verdict {
    /// Rewritten as Successful during the try: the agent claims the sync.
    pub claims: bool,
    /// lastSyncTime after the try.
    pub last_sync: Option<String>,
    /// Result after the try ("" without a status).
    pub result: String,
}

pub fn verdict(before: &Stamp, path: &Path) -> Result<Verdict> {
    let after = Stamp::of(path);
    let status = after.status()?;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let (last_sync, result, in_progress) = match &status {
        Some(s) => (
            text(s, "lastSyncTime"),
            result_of(s).to_owned(),
            s.get("lastSyncStartTime").is_some(),
        ),
        None => (None, String::new(), false),
    };
    if let Some(s) = &status {
        // Parses, or the test fails: the timestamps must stay RFC 3339.
        last_sync_time(s)?;
    }
    Ok(Verdict {
        claims: after != *before && result == "Successful" && !in_progress,
        last_sync,
        result,
    })
}

/// A running agent whose stdout and stderr lines arrive on channels.
pub struct Agent {
    pub child: Child,
    pub stdout: Receiver<String>,
    pub stderr: Receiver<String>,
    /// Every stderr line received so far (for reports).
    pub log: Vec<String>,
}

impl Agent {
    pub fn spawn(args: &[&OsStr]) -> Result<Agent> {
        let mut child = spawn_bin(args)?;
        let lines = |pipe: Box<dyn Read + Send>| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(std::io::Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().context("stdout")?));
        let stderr = lines(Box::new(child.stderr.take().context("stderr")?));
        Ok(Agent {
            child,
            stdout,
            stderr,
            log: Vec::new(),
        })
    }

    pub fn collect(&mut self) {
        self.log.extend(self.stderr.try_iter());
    }

    /// Waits (safety net: `AGENT_TIMEOUT`) for the exit, then for the rest of stderr.
    pub fn wait(&mut self, what: &str) -> Result<ExitStatus> {
        let status = crate::common::wait_with_timeout(&mut self.child, AGENT_TIMEOUT)
            .with_context(|| format!("waiting for the {what}"))?;
        // The pipe closes with the process: the reader thread ends and the channel disconnects.
        self.log.extend(self.stderr.iter());
        Ok(status)
    }

    pub fn kill(&mut self) -> Result<bool> {
        let running = self.child.try_wait()?.is_none();
        let _ = self.child.kill();
        Ok(running)
    }

    pub fn tail(&self) -> String {
        let from = self.log.len().saturating_sub(12);
        self.log[from..].join("\n")
    }
}

/// A listening destination (like `server.sh`, it outlives connections that never authenticate).
pub struct Listening {
    pub agent: Agent,
    pub addr: SocketAddr,
}

/// `destination --listen 127.0.0.1:0` on `site`'s target with its key, recording in `status`, with the chaos
/// suite's idle and handshake timeouts.
pub fn destination_args<'a>(site: &'a Site, status: &'a Path) -> Vec<&'a OsStr> {
    vec![
        "destination".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--target".as_ref(),
        site.target.as_os_str(),
        "--psk".as_ref(),
        site.psk.as_os_str(),
        "--status".as_ref(),
        status.as_os_str(),
        "--idle-timeout".as_ref(),
        IDLE_TIMEOUT.as_ref(),
        "--handshake-timeout".as_ref(),
        HANDSHAKE_TIMEOUT.as_ref(),
    ]
}

/// The site's destination (its own status file, `--window WINDOW`, and `extra` flags), once it printed
/// `listening on`.
pub fn spawn_destination(site: &Site, window: u32, extra: &[OsString]) -> Result<Listening> {
    let window = window.to_string();
    let mut args = destination_args(site, &site.destination_status);
    args.extend([OsStr::new("--window"), OsStr::new(&window)]);
    args.extend(extra.iter().map(OsString::as_os_str));
    let agent = Agent::spawn(&args)?;
    let line = agent
        .stdout
        .recv_timeout(Duration::from_secs(30))
        .context("the destination printed no `listening on` line")?;
    let addr = line
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first stdout line {line:?}"))?
        .parse()?;
    Ok(Listening { agent, addr })
}

pub fn spawn_source(
    site: &Site,
    addr: SocketAddr,
    chunk_size: u32,
    extra: &[OsString],
) -> Result<Agent> {
    spawn_source_of(
        &site.volume,
        &site.source_status,
        site,
        addr,
        chunk_size,
        extra,
    )
}

/// A source of `volume` recording in `status`, with `site`'s key.
pub fn spawn_source_of(
    volume: &Path,
    status: &Path,
    site: &Site,
    addr: SocketAddr,
    chunk_size: u32,
    extra: &[OsString],
) -> Result<Agent> {
    let (addr, chunk) = (addr.to_string(), chunk_size.to_string());
    let mut args: Vec<&OsStr> = vec![
        "source".as_ref(),
        "--connect".as_ref(),
        addr.as_ref(),
        "--volume".as_ref(),
        volume.as_os_str(),
        "--psk".as_ref(),
        site.psk.as_os_str(),
        "--status".as_ref(),
        status.as_os_str(),
        "--chunk-size".as_ref(),
        chunk.as_ref(),
        "--idle-timeout".as_ref(),
        IDLE_TIMEOUT.as_ref(),
        "--handshake-timeout".as_ref(),
        HANDSHAKE_TIMEOUT.as_ref(),
    ];
    args.extend(extra.iter().map(OsString::as_os_str));
    Agent::spawn(&args)
}

/// After the proxy closed the try's connection: waits until the destination exits (its session ended: returns
/// its exit status) or logs that the connection never authenticated (it keeps listening: returns `None`).
pub fn wait_session_end(agent: &mut Agent, at: &str) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + AGENT_TIMEOUT;
    loop {
        match agent.stderr.recv_timeout(Duration::from_millis(20)) {
            Ok(line) => {
                let dropped = line.contains(DROPPED);
                agent.log.push(line);
                if dropped {
                    return Ok(None);
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(Some(agent.wait("destination")?)),
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = agent.child.kill();
            bail!(
                "{at}: the destination neither ended nor dropped the connection: hang\n{}",
                agent.tail()
            );
        }
    }
}
