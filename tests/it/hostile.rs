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

/// A HELLO of another protocol version is answered with ABORT(VERSION) and starts no sync.
#[tokio::test]
async fn hello_of_another_version_is_aborted_and_starts_no_sync() -> Result<()> {
    let site = site(1)?;
    let (dest, addr, mut peer) = hostile_source_at(&site, &[]).await?;
    let mut bytes = frame(&hello(SIZE));
    bytes[2] = blockmover::codec::VERSION + 1;
    peer.raw(&bytes).await?;
    let got = turned_away(&site, dest, &addr, peer, "protocol version mismatch").await?;
    aborted(&got, AbortCode::Version, "protocol version mismatch")
}

#[tokio::test]
async fn header_claiming_4_gib_payload_is_rejected_before_it_arrives() -> Result<()> {
    let site = site(2)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.raw(&[
        b'B',
        b'M',
        blockmover::codec::VERSION,
        0x13,
        0xff,
        0xff,
        0xff,
        0xff,
    ])
    .await?;
    let got = refused(&site, dest, peer, 1, "exceeds the maximum").await?;
    aborted(&got, AbortCode::Protocol, "exceeds the maximum")
}

/// A stream that ends inside its HELLO frame is a truncated frame, and no sync.
#[tokio::test]
async fn stream_closed_inside_a_frame_is_a_truncated_frame() -> Result<()> {
    let site = site(3)?;
    let (dest, addr, mut peer) = hostile_source_at(&site, &[]).await?;
    peer.raw(&frame(&hello(SIZE))[..10]).await?;
    peer.writer.shutdown().await?;
    turned_away(&site, dest, &addr, peer, "truncated frame").await?;
    Ok(())
}

/// A stream that ends inside a frame once the sync runs fails it, permanently.
#[tokio::test]
async fn stream_closed_inside_a_frame_mid_sync_fails_the_sync() -> Result<()> {
    let site = site(3)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.raw(&frame(&digests_from_chunk_5())[..10]).await?;
    peer.writer.shutdown().await?;
    refused(&site, dest, peer, 1, "truncated frame").await?;
    Ok(())
}

#[tokio::test]
async fn data_without_an_open_need_is_rejected_and_not_written() -> Result<()> {
    let site = site(4)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&unsolicited_data()).await?;
    let got = refused(&site, dest, peer, 1, "no open NEED").await?;
    aborted(&got, AbortCode::Protocol, "no open NEED")
}

#[tokio::test]
async fn digests_out_of_order_are_rejected() -> Result<()> {
    let site = site(5)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&digests_from_chunk_5()).await?;
    let got = refused(&site, dest, peer, 1, "DIGESTS for chunks").await?;
    aborted(&got, AbortCode::Protocol, "DIGESTS for chunks")
}

#[tokio::test]
async fn source_vanishing_mid_session_is_a_retryable_failure() -> Result<()> {
    let site = site(6)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    drop(peer);
    let exit = dest.exit().await?;
    destination_failed(&site, &exit, RETRYABLE, &["peer closed", "network error"])?;
    Ok(())
}

#[tokio::test]
async fn volume_larger_than_the_target_is_refused_with_an_abort() -> Result<()> {
    let site = site(7)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.send(&hello(SIZE + u64::from(CHUNK))).await?;
    let got = refused(&site, dest, peer, 1, "too small").await?;
    aborted(&got, AbortCode::TargetTooSmall, "too small")
}

#[tokio::test]
async fn ready_of_another_version_fails_the_source_with_version_mismatch() -> Result<()> {
    let site = site(8)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let source = Agent::source(&addr, &site.target, &site.psk_path, &site.status)?;
    let (tcp, _) = tokio::time::timeout(LIMIT, listener.accept()).await??;
    let wire = Arc::new(WireCounters::default());
    let tls = tls::acceptor()?
        .accept(Counted::new(tcp, wire.clone()))
        .await?;
    let exporter = tls::server_exporter(&tls)?;
    let mut peer = Peer::authenticated(tls, &site.psk, Side::Destination, exporter).await?;
    let hello_received = peer.recv().await?;
    ensure!(
        matches!(hello_received, Message::Hello { volume_size: SIZE, chunk_size: CHUNK, block_size: 4096, ref source, .. } if source == "default/target.img"),
        "HELLO {hello_received:?}"
    );
    let mut ready = frame(&Message::Ready {
        target_size: SIZE,
        window: 8192,
        kind: SyncKind::Full,
        reason: Fallback::DestinationNoState,
    });
    ready[2] = blockmover::codec::VERSION + 1;
    peer.raw(&ready).await?;
    peer.drain().await;
    let exit = source.exit().await?;
    let needles = ["protocol version mismatch"];
    failed(&exit, 1, &needles, &site.status, Kind::Source)?;
    ensure!(wire.received.load(Ordering::Relaxed) > 0, "wire counter");
    unchanged(&site.target, site.before)
}

#[tokio::test]
async fn failed_syncs_never_set_last_sync_time_and_a_later_sync_does() -> Result<()> {
    let site = site(9)?;
    // A failed attempt against a status file that has never seen a sync.
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&unsolicited_data()).await?;
    refused(&site, dest, peer, 1, "no open NEED").await?;
    let v = read_status(&site.status)?;
    ensure!(v.get("lastSyncTime").is_none(), "set by a failure: {v:#}");

    // A real sync of other content to a fresh destination with the same status file and target.
    let volume = site.dir.path().join("volume.img");
    write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 90))?;
    let synced = file_digest(&volume, SIZE)?;
    ensure!(
        synced != site.before,
        "the seeds must give different content"
    );
    let (dest, addr) = Agent::destination(&site)?;
    let source_status = site.dir.path().join("source-status.json");
    let source = Agent::source(&addr, &volume, &site.psk_path, &source_status)?;
    let (src, dst) = (source.exit().await?, dest.exit().await?);
    ensure!(src.code == Some(0), "source failed:\n{}", src.stderr);
    ensure!(dst.code == Some(0), "destination failed:\n{}", dst.stderr);
    unchanged(&site.target, synced).context("the target must now equal the volume")?;
    let mut v = read_status(&site.status)?;
    ensure!(v["latestMoverStatus"]["result"] == "Successful", "{v:#}");
    ensure!(v["lastSyncTime"].is_string(), "no lastSyncTime: {v:#}");
    check_status_file(&site.status, Kind::Destination)?;

    // A later failure keeps the previous lastSyncTime (a sentinel, so a rewrite in the same second shows).
    let sentinel = "2001-02-03T04:05:06Z";
    v["lastSyncTime"] = Value::from(sentinel);
    std::fs::write(&site.status, serde_json::to_vec(&v)?)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&digests_from_chunk_5()).await?;
    peer.drain().await;
    let exit = dest.exit().await?;
    let needles = ["DIGESTS for chunks"];
    let v = failed(&exit, 1, &needles, &site.status, Kind::Destination)?;
    unchanged(&site.target, synced)?;
    ensure!(
        v["lastSyncTime"] == sentinel,
        "replaced by a failure: {v:#}"
    );
    Ok(())
}

/// The target's chunk digests: what the destination computes for what it holds.
fn target_digests(site: &Site) -> Result<Vec<Digest>> {
    let bytes = std::fs::read(&site.target)?;
    let bytes = bytes
        .get(..SIZE as usize)
        .context("target shorter than SIZE")?;
    Ok(bytes.chunks(CHUNK as usize).map(Digest::of).collect())
}

/// Announces every chunk as the target already holds it except chunk 0, announced as `chunk0`, and waits for the
/// destination's NEED for chunk 0.
async fn need_chunk_0<S>(peer: &mut Peer<S>, site: &Site, chunk0: Digest) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut digests = target_digests(site)?;
    digests[0] = chunk0;
    peer.send(&Message::Digests { first: 0, digests }).await?;
    loop {
        match peer.recv().await? {
            Message::Need { chunk: 0, .. } => return Ok(()),
            Message::Ack { .. } => {}
            other => bail!("expected NEED for chunk 0, received {other:?}"),
        }
    }
}

/// Chunk 0 of the target with its block 0 replaced by `0xA5` bytes, as the DATA of [`unsolicited_data`] makes it.
fn chunk_0_rebuilt(site: &Site) -> Result<Vec<u8>> {
    let mut chunk = std::fs::read(&site.target)?;
    chunk.truncate(CHUNK as usize);
    chunk[..4096].fill(0xA5);
    Ok(chunk)
}

#[tokio::test]
async fn zstd_bomb_answering_a_need_is_refused_at_the_block_size_and_not_written() -> Result<()> {
    let site = site(10)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    need_chunk_0(&mut peer, &site, Digest::of(b"anything")).await?;
    // 64 MiB of zeros in a few KiB of zstd, claiming to be the one 4 KiB block of the NEED.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3)?;
    ensure!(bomb.len() < 4096, "the bomb is {} bytes", bomb.len());
    peer.send(&Message::Data(DataFrame {
        chunk: 0,
        send_mask: 1,
        zero_mask: 0,
        encoding: Encoding::Zstd,
        raw_len: 4096,
        payload: Bytes::from(bomb),
    }))
    .await?;
    let needle = "does not decompress within 4096 bytes";
    let got = refused(&site, dest, peer, 1, needle).await?;
    aborted(&got, AbortCode::Protocol, needle)
}

#[tokio::test]
async fn data_not_hashing_to_the_announced_digest_is_a_digest_mismatch_and_not_written(
) -> Result<()> {
    let site = site(11)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    need_chunk_0(&mut peer, &site, Digest::of(b"not what the data hashes to")).await?;
    peer.send(&unsolicited_data()).await?;
    let got = refused(&site, dest, peer, RETRYABLE, "digest mismatch on chunk 0").await?;
    aborted(&got, AbortCode::Digest, "digest mismatch on chunk 0")
}

#[tokio::test]
async fn duplicated_data_is_rejected_and_the_chunk_is_old_or_verified() -> Result<()> {
    let site = site(12)?;
    let rebuilt = chunk_0_rebuilt(&site)?;
    let old = std::fs::read(&site.target)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    need_chunk_0(&mut peer, &site, Digest::of(&rebuilt)).await?;
    // The right answer, then the same frame again (a replay within the session).
    let mut twice = frame(&unsolicited_data());
    twice.extend_from_slice(&frame(&unsolicited_data()));
    peer.raw(&twice).await?;
    let got = peer.drain().await;
    aborted(&got, AbortCode::Protocol, "no open NEED")?;
    let exit = dest.exit().await?;
    failed(&exit, 1, &["no open NEED"], &site.status, Kind::Destination)?;
    // The first DATA verified, so chunk 0 may hold it; nothing else may have changed.
    let now = std::fs::read(&site.target)?;
    let chunk = CHUNK as usize;
    ensure!(
        now[..chunk] == old[..chunk] || now[..chunk] == rebuilt[..],
        "chunk 0"
    );
    ensure!(
        now[chunk..] == old[chunk..],
        "a chunk beyond chunk 0 changed"
    );
    Ok(())
}

#[tokio::test]
async fn digests_past_the_last_chunk_are_rejected() -> Result<()> {
    let site = site(13)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    let count = SIZE / u64::from(CHUNK);
    let digests = vec![Digest::of(b"past the end"); count as usize + 1];
    peer.send(&Message::Digests { first: 0, digests }).await?;
    let needle = format!("DIGESTS for chunks 0..{}", count + 1);
    let got = refused(&site, dest, peer, 1, &needle).await?;
    aborted(&got, AbortCode::Protocol, &needle)
}

#[tokio::test]
async fn digests_before_hello_are_rejected() -> Result<()> {
    let site = site(14)?;
    let (dest, addr, mut peer) = hostile_source_at(&site, &[]).await?;
    peer.send(&digests_from_chunk_5()).await?;
    let got = turned_away(&site, dest, &addr, peer, "expected HELLO, received DIGESTS").await?;
    aborted(&got, AbortCode::Protocol, "expected HELLO")
}

#[tokio::test]
async fn second_hello_mid_session_is_rejected() -> Result<()> {
    let site = site(15)?;
    let (dest, mut peer) = hostile_source(&site).await?;
    peer.hello_ready().await?;
    peer.send(&hello(SIZE)).await?;
    let got = refused(&site, dest, peer, 1, "unexpected HELLO").await?;
    aborted(&got, AbortCode::Protocol, "unexpected HELLO")
}

#[tokio::test]
async fn proof_recorded_in_another_tls_session_does_not_authenticate() -> Result<()> {
    let site = site(16)?;
    let (dest, addr) = Agent::destination(&site)?;
    let untouched = crate::common::file_bytes(&site.status)?;
    let connect = || async {
        let tcp = TcpStream::connect(&addr).await?;
        anyhow::Ok(tls::connector()?.connect(tls::server_name(), tcp).await?)
    };
    // Session A: the honest proof for A's exporter, as an eavesdropper on A might learn it.
    let a = connect().await?;
    let recorded = site.psk.proof(Side::Source, &tls::client_exporter(&a)?);
    // Session B: the recorded proof, replayed.
    let mut b = connect().await?;
    b.write_all(&frame(&Message::Auth { proof: recorded }))
        .await?;
    b.flush().await?;
    let mut reader = FrameReader::new(b);
    let mut got = Vec::new();
    while let Ok(Ok(Some(m))) = tokio::time::timeout(LIMIT, reader.read("drain")).await {
        got.push(m);
    }
    aborted(&got, AbortCode::Auth, "pre-shared keys do not match")?;
    drop(a);
    // A connection that never proved the key changes nothing (issue 10, finding 4): the status and the target as
    // they were, and the one-shot destination still waits for its source, which then syncs.
    ensure!(
        crate::common::file_bytes(&site.status)? == untouched,
        "the replayed proof changed the status"
    );
    unchanged(&site.target, site.before)?;
    let volume = site.dir.path().join("volume.img");
    write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 160))?;
    let source_status = site.dir.path().join("source-status.json");
    let source = Agent::source(&addr, &volume, &site.psk_path, &source_status)?;
    let (src, dst) = (source.exit().await?, dest.exit().await?);
    ensure!(
        src.code == Some(0) && dst.code == Some(0),
        "the real sync after the replay failed: source {:?}: {}\ndestination {:?}: {}",
        src.code,
        src.stderr,
        dst.code,
        dst.stderr
    );
    unchanged(&site.target, file_digest(&volume, SIZE)?)
}

/// An authenticated peer that never says HELLO is dropped at the handshake timeout, and starts no sync.
#[tokio::test]
async fn authenticated_source_silent_before_hello_is_dropped_at_the_handshake_timeout() -> Result<()>
{
    let site = site(17)?;
    let (dest, addr, peer) = hostile_source_at(&site, &["--handshake-timeout", "2"]).await?;
    let got = turned_away(&site, dest, &addr, peer, "hello timed out after 2s").await?;
    ensure!(got.is_empty(), "no ABORT for a silent peer: {got:?}");
    Ok(())
}

#[tokio::test]
async fn source_silent_after_ready_hits_the_idle_timeout() -> Result<()> {
    let site = site(18)?;
    let (dest, mut peer) = hostile_source_with(&site, &["--idle-timeout", "1"]).await?;
    peer.hello_ready().await?;
    refused(&site, dest, peer, RETRYABLE, "idle read timed out after 1s").await?;
    Ok(())
}

#[tokio::test]
async fn silent_clients_are_dropped_at_their_phase_timeout_and_a_real_sync_follows() -> Result<()> {
    let site = site(19)?;
    let (dest, addr) = Agent::destination_with(&site, &["--handshake-timeout", "2"])?;
    // One client silent after TCP, one silent after TLS: each is hung up on at its phase's timeout.
    let mut tcp_only = TcpStream::connect(&addr).await?;
    let tcp = TcpStream::connect(&addr).await?;
    let mut tls_only = tls::connector()?.connect(tls::server_name(), tcp).await?;
    let mut sink = Vec::new();
    let hung_up = tokio::time::timeout(LIMIT, tcp_only.read_to_end(&mut sink)).await?;
    ensure!(matches!(hung_up, Ok(0)), "{hung_up:?}");
    // It received the destination's proof, then the end of the connection (without close_notify: an error).
    let _ = tokio::time::timeout(LIMIT, tls_only.read_to_end(&mut sink)).await?;
    ensure!(!site.status.exists(), "a silent client started a sync");

    let volume = site.dir.path().join("volume.img");
    write_sample_volume(&volume, &SampleSpec::mixed(SIZE, 190))?;
    let source_status = site.dir.path().join("source-status.json");
    let source = Agent::source(&addr, &volume, &site.psk_path, &source_status)?;
    let (src, dst) = (source.exit().await?, dest.exit().await?);
    ensure!(src.code == Some(0) && dst.code == Some(0), "{}", dst.stderr);
    for needle in ["tls handshake timed out", "authentication timed out"] {
        ensure!(
            dst.stderr.contains(needle),
            "no {needle:?}:\n{}",
            dst.stderr
        );
    }
    unchanged(&site.target, file_digest(&volume, SIZE)?)
}

#[tokio::test]
async fn source_facing_a_silent_destination_times_out_in_the_tls_handshake() -> Result<()> {
    let site = site(20)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let flags = [
        ("--volume", &*site.target),
        ("--psk", &site.psk_path),
        ("--status", &site.status),
    ];
    let args = ["source", "--connect", &addr, "--handshake-timeout", "1"];
    let source = Agent::spawn(&args, flags)?;
    let (_silent, _) = tokio::time::timeout(LIMIT, listener.accept()).await??;
    let exit = source.exit().await?;
    let needles = ["tls handshake timed out after 1s"];
    failed(&exit, RETRYABLE, &needles, &site.status, Kind::Source)?;
    Ok(())
}
