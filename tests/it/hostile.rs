//! Hostile peers holding the RIGHT key: a test client or server built from the library's own TLS, PSK proof and
//! codec gets past authentication, then breaks the protocol against a real `blockmover` process. Each case checks
//! the exit code, the `error: ` line, the VolSync status (Failed, schema-valid) and that the target's bytes are
//! untouched.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

use blockmover::chunk::Digest;
use blockmover::codec::{
    AbortCode, DataFrame, Encoding, Fallback, FrameReader, FrameWriter, Message, Offer, SyncKind,
};
use blockmover::net::{authenticate, Counted, WireCounters};
use blockmover::sample::{file_digest, write_sample_volume, SampleSpec};
use blockmover::tls::{self, Psk, Side};

use crate::schema::{check_status_file, Kind};

mod data;
mod frames;
mod silent;

const BIN: &str = env!("CARGO_BIN_EXE_blockmover");
/// Volume and target size: 64 chunks of 64 KiB.
const SIZE: u64 = 4 << 20;
const CHUNK: u32 = 65536;
/// Safety net for every wait on a peer or a process.
const LIMIT: Duration = Duration::from_secs(60);
/// Exit code of a failure a retry may cure (EX_TEMPFAIL).
const RETRYABLE: i32 = 75;

/// A key file, a seeded target and a status path in a temporary directory.
struct Site {
    dir: tempfile::TempDir,
    psk_path: PathBuf,
    psk: Psk,
    target: PathBuf,
    status: PathBuf,
    before: blake3::Hash,
}

fn site(seed: u64) -> Result<Site> {
    let dir = tempfile::tempdir()?;
    let psk_path = dir.path().join("psk.txt");
    std::fs::write(&psk_path, Psk::generate())?;
    // The agents refuse a key file that group or others can read.
    std::fs::set_permissions(&psk_path, std::fs::Permissions::from_mode(0o600))?;
    let target = dir.path().join("target.img");
    write_sample_volume(&target, &SampleSpec::mixed(SIZE, seed))?;
    Ok(Site {
        psk: Psk::load(&psk_path)?,
        status: dir.path().join("status.json"),
        before: file_digest(&target, SIZE)?,
        psk_path,
        target,
        dir,
    })
}

/// A running `blockmover`; stdout lines and the whole stderr are collected on threads. Killed if dropped early.
struct Agent {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

/// How an agent ended.
struct Exit {
    code: Option<i32>,
    stderr: String,
}

impl Agent {
    /// Starts `blockmover ARGS` followed by `FLAG PATH` pairs.
    fn spawn(args: &[&str], paths: [(&str, &Path); 3]) -> Result<Agent> {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        paths.iter().for_each(|(flag, path)| {
            cmd.arg(flag).arg(path);
        });
        let stdio = cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = stdio.stderr(Stdio::piped()).spawn()?;
        let (out_tx, stdout) = mpsc::channel();
        let out = child.stdout.take().context("stdout is piped")?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(std::io::Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let (err_tx, stderr) = mpsc::channel();
        let mut err = child.stderr.take().context("stderr is piped")?;
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = err.read_to_end(&mut bytes);
            let _ = err_tx.send(String::from_utf8_lossy(&bytes).into_owned());
        });
        Ok(Agent {
            child,
            stdout,
            stderr,
        })
    }

    fn destination(site: &Site) -> Result<(Agent, String)> {
        Agent::destination_with(site, &[])
    }

    /// A destination for `site` with `extra` flags (e.g. shorter phase timeouts).
    fn destination_with(site: &Site, extra: &[&str]) -> Result<(Agent, String)> {
        let flags = [
            ("--target", &*site.target),
            ("--psk", &site.psk_path),
            ("--status", &site.status),
        ];
        let mut args = vec!["destination", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let agent = Agent::spawn(&args, flags)?;
        let line = agent
            .stdout
            .recv_timeout(LIMIT)
            .context("the destination printed no `listening on` line")?;
        let addr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first stdout line {line:?}"))?;
        Ok((agent, addr.to_owned()))
    }

    fn source(addr: &str, volume: &Path, psk: &Path, status: &Path) -> Result<Agent> {
        let flags = [("--volume", volume), ("--psk", psk), ("--status", status)];
        Agent::spawn(&["source", "--connect", addr], flags)
    }

    /// Waits for the process to end (stderr closing, then the exit status); kills it after [`LIMIT`].
    async fn exit(mut self) -> Result<Exit> {
        tokio::task::spawn_blocking(move || match self.stderr.recv_timeout(LIMIT) {
            Ok(stderr) => Ok(Exit {
                code: self.child.wait()?.code(),
                stderr,
            }),
            Err(_) => bail!("blockmover did not exit within {LIMIT:?}; killed"),
        })
        .await?
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One authenticated end of a session: frames are read through the library's reader; writes are raw bytes, so
/// a test can send what no honest peer would.
struct Peer<S> {
    reader: FrameReader<ReadHalf<S>>,
    writer: WriteHalf<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Peer<S> {
    async fn authenticated(tls: S, psk: &Psk, side: Side, exporter: [u8; 32]) -> Result<Self> {
        let (r, mut w) = tokio::io::split(tls);
        let mut reader = FrameReader::new(r);
        let mut writer = FrameWriter::new(&mut w);
        authenticate(&mut reader, &mut writer, psk, side, &exporter, LIMIT).await?;
        Ok(Peer { reader, writer: w })
    }

    async fn raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    async fn send(&mut self, msg: &Message) -> Result<()> {
        self.raw(&frame(msg)).await
    }

    async fn recv(&mut self) -> Result<Message> {
        Ok(tokio::time::timeout(LIMIT, self.reader.expect("test")).await??)
    }

    /// Sends a valid HELLO for a `SIZE` volume and expects READY for the `SIZE` target.
    async fn hello_ready(&mut self) -> Result<()> {
        self.send(&hello(SIZE)).await?;
        match self.recv().await? {
            Message::Ready {
                target_size,
                window,
                kind: SyncKind::Full,
                ..
            } if target_size == SIZE && window > 0 => Ok(()),
            other => bail!("expected READY for a {SIZE}-byte target, received {other:?}"),
        }
    }

    /// Every frame the peer still sends until it closes or fails.
    async fn drain(mut self) -> Vec<Message> {
        let mut got = Vec::new();
        while let Ok(Ok(Some(m))) = tokio::time::timeout(LIMIT, self.reader.read("drain")).await {
            got.push(m);
        }
        got
    }
}

/// Starts a destination for `site` and connects to it as a hostile source: TCP, TLS 1.3, the right PSK proof.
async fn hostile_source(site: &Site) -> Result<(Agent, Peer<impl AsyncRead + AsyncWrite + Unpin>)> {
    hostile_source_with(site, &[]).await
}

/// [`hostile_source`] against a destination started with `extra` flags.
async fn hostile_source_with(
    site: &Site,
    extra: &[&str],
) -> Result<(Agent, Peer<impl AsyncRead + AsyncWrite + Unpin>)> {
    let (dest, _, peer) = hostile_source_at(site, extra).await?;
    Ok((dest, peer))
}

/// [`hostile_source_with`], also returning the destination's address (for a real source afterwards).
async fn hostile_source_at(
    site: &Site,
    extra: &[&str],
) -> Result<(Agent, String, Peer<impl AsyncRead + AsyncWrite + Unpin>)> {
    let (dest, addr) = Agent::destination_with(site, extra)?;
    let wire = Arc::new(WireCounters::default());
    let tcp = TcpStream::connect(&addr).await?;
    let connecting = tls::connector()?.connect(tls::server_name(), Counted::new(tcp, wire.clone()));
    let tls = connecting.await?;
    let exporter = tls::client_exporter(&tls)?;
    let peer = Peer::authenticated(tls, &site.psk, Side::Source, exporter).await?;
    let counted = [&wire.sent, &wire.received].map(|c| c.load(Ordering::Relaxed));
    ensure!(counted.iter().all(|&n| n > 0), "wire counters {counted:?}");
    Ok((dest, addr, peer))
}

/// A connection that fails before its HELLO was accepted starts no sync (issue 10, finding 4): it gets what the
/// destination still sends (returned), and then the one-shot destination, its status never written and the target
/// untouched, still waits for its source, which syncs; the destination logged why it dropped the connection.
async fn turned_away<S>(
    site: &Site,
    dest: Agent,
    addr: &str,
    peer: Peer<S>,
    needle: &str,
) -> Result<Vec<Message>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let got = peer.drain().await;
    ensure!(
        !site.status.exists(),
        "a connection without HELLO wrote the status"
    );
    unchanged(&site.target, site.before)?;
    let volume = site.dir.path().join("volume.img");
    write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 1000))?;
    let source_status = site.dir.path().join("source-status.json");
    let source = Agent::source(addr, &volume, &site.psk_path, &source_status)?;
    let (src, dst) = (source.exit().await?, dest.exit().await?);
    ensure!(
        src.code == Some(0) && dst.code == Some(0),
        "the real sync after the hostile connection failed: source {:?}: {}\ndestination {:?}: {}",
        src.code,
        src.stderr,
        dst.code,
        dst.stderr
    );
    ensure!(
        dst.stderr.contains("dropped before authentication") && dst.stderr.contains(needle),
        "the destination logs why it dropped the connection ({needle:?}): {}",
        dst.stderr
    );
    unchanged(&site.target, file_digest(&volume, SIZE)?)?;
    Ok(got)
}

/// Reads what the destination still sends, waits for it to exit and checks [`destination_failed`]; returns the
/// frames it sent.
async fn refused<S>(
    site: &Site,
    dest: Agent,
    peer: Peer<S>,
    code: i32,
    needle: &str,
) -> Result<Vec<Message>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let got = peer.drain().await;
    destination_failed(site, &dest.exit().await?, code, &[needle])?;
    Ok(got)
}

fn frame(msg: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    buf
}

fn hello(volume_size: u64) -> Message {
    Message::Hello {
        volume_size,
        chunk_size: CHUNK,
        block_size: 4096,
        source: "default/hostile".into(),
        offer: Offer::full(Fallback::SourceNoState),
    }
}

/// A DATA frame for chunk 0 carrying one non-zero block: it would change the target if accepted.
fn unsolicited_data() -> Message {
    Message::Data(DataFrame {
        chunk: 0,
        send_mask: 1,
        zero_mask: 0,
        encoding: Encoding::Raw,
        raw_len: 4096,
        payload: Bytes::from(vec![0xA5; 4096]),
    })
}

/// DIGESTS that skip chunks 0 to 4.
fn digests_from_chunk_5() -> Message {
    Message::Digests {
        first: 5,
        digests: vec![Digest::of(b"chunk five")],
    }
}

fn read_status(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The agent failed with `code`, its `error: ` line and its status (Failed, schema-valid) name the problem.
fn failed(exit: &Exit, code: i32, needles: &[&str], status: &Path, kind: Kind) -> Result<Value> {
    let names = |s: &str| needles.iter().any(|n| s.contains(n));
    let stderr = &exit.stderr;
    ensure!(
        exit.code == Some(code),
        "exit {:?}, not {code}:\n{stderr}",
        exit.code
    );
    let error_line = stderr.lines().any(|l| l.starts_with("error: ") && names(l));
    ensure!(
        error_line,
        "no `error: ` line naming {needles:?}:\n{stderr}"
    );
    let v = read_status(status)?;
    let mover = &v["latestMoverStatus"];
    ensure!(mover["result"] == "Failed", "not Failed: {v:#}");
    let logs = mover["logs"].as_str().is_some_and(names);
    ensure!(logs, "logs do not name {needles:?}: {v:#}");
    let conditions = v["conditions"].as_array().context("no conditions")?;
    let error = conditions.iter().any(|c| {
        c["type"] == "Synchronizing"
            && c["status"] == "False"
            && c["reason"] == "Error"
            && c["message"].as_str().is_some_and(names)
    });
    ensure!(error, "no Error condition naming {needles:?}: {v:#}");
    ensure!(
        v.get("lastSyncStartTime").is_none(),
        "still under way: {v:#}"
    );
    check_status_file(status, kind)?;
    Ok(v)
}

fn unchanged(path: &Path, before: blake3::Hash) -> Result<()> {
    let after = file_digest(path, SIZE)?;
    ensure!(after == before, "{} changed", path.display());
    Ok(())
}

/// [`failed`] for the destination of `site`, whose target must be untouched.
fn destination_failed(site: &Site, exit: &Exit, code: i32, needles: &[&str]) -> Result<Value> {
    let v = failed(exit, code, needles, &site.status, Kind::Destination)?;
    unchanged(&site.target, site.before)?;
    Ok(v)
}

fn aborted(got: &[Message], code: AbortCode, needle: &str) -> Result<()> {
    let found = got.iter().any(|m| {
        matches!(m, Message::Abort { code: c, message } if *c == code && message.contains(needle))
    });
    ensure!(
        found,
        "expected ABORT({code:?}) naming {needle:?}, received {got:?}"
    );
    Ok(())
}
