//! Security properties against real `blockmover` processes: TLS 1.2 is refused, a man in the middle that terminates
//! TLS learns nothing and writes nothing, and the key never reaches a log or a status file.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use blockmover::codec::{decode_frame, Message};
use blockmover::net::authenticate;
use blockmover::sample::{self, SampleSpec};
use blockmover::tls::{self, Psk, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{
    bin, expect_failed, expect_failure, keygen_named, read_status, wait_with_timeout, Destination,
    Fixture, AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
/// Safety net for a test's network waits.
const LIMIT: Duration = Duration::from_secs(60);
/// Written all over the volume: if any of it crosses a man in the middle in the clear, the test fails.
const MARKER: &[u8] = b"<<blockmover volume plaintext marker 7f3a>>";

/// `blockmover source` against `addr` with `BLOCKMOVER_LOG` set, to completion.
fn source_with_log(fx: &Fixture, addr: SocketAddr, psk: &Path, log: &str) -> Result<Output> {
    let mut child = Command::new(bin())
        .args(["source", "--connect", &addr.to_string(), "--volume"])
        .arg(&fx.volume)
        .arg("--psk")
        .arg(psk)
        .arg("--status")
        .arg(&fx.source_status)
        .env("BLOCKMOVER_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let read = |p: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let (out, err) = (
        read(out.map(|p| Box::new(p) as _)),
        read(err.map(|p| Box::new(p) as _)),
    );
    let status = wait_with_timeout(&mut child, AGENT_TIMEOUT)?;
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("output reader panicked"))
    };
    Ok(Output {
        status,
        stdout: join(out)?,
        stderr: join(err)?,
    })
}

/// A volume with [`MARKER`] in every 4 KiB block that holds data, and a target holding other content.
fn marked_fixture(seed: u64) -> Result<Fixture> {
    let fx = Fixture::new(4 * MIB, seed)?;
    let mut volume = std::fs::read(&fx.volume)?;
    for block in volume.chunks_mut(4096) {
        block[..MARKER.len()].copy_from_slice(MARKER);
    }
    std::fs::write(&fx.volume, &volume)?;
    sample::write_sample_volume(&fx.target, &SampleSpec::mixed(4 * MIB, seed + 1))?;
    Ok(fx)
}

/// Every window of 16 hex digits of the key's secret, in both cases, and the whole key line: none may appear.
fn key_needles(psk: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(psk)?;
    let line = text.trim();
    let secret = line.split_once(':').context("key has ':'")?.1;
    let mut needles = vec![line.to_owned(), secret.to_owned()];
    for i in 0..=secret.len() - 16 {
        needles.push(secret[i..i + 16].to_owned());
        needles.push(secret[i..i + 16].to_uppercase());
    }
    Ok(needles)
}

fn expect_no_key(what: &str, text: &str, needles: &[String]) -> Result<()> {
    for n in needles {
        ensure!(
            !text.contains(n.as_str()),
            "{what} contains key material {n:?}"
        );
    }
    Ok(())
}

#[test]
fn key_never_appears_in_debug_logs_or_status_files() -> Result<()> {
    let fx = Fixture::new(2 * MIB, 0x5ec_0001)?;
    let needles = key_needles(&fx.psk)?;
    let wrong = keygen_named(fx.dir.path(), "wrong-psk.txt")?;
    let mut outputs = Vec::new();

    // A successful sync at debug level, then a wrong-key failure at trace level (both agents log everything),
    // after which the destination, which a wrong key does not end, serves a right-key source.
    for (log, source_key) in [("debug", &fx.psk), ("trace", &wrong)] {
        let env = [("BLOCKMOVER_LOG", log)];
        let mut destination =
            Destination::spawn_env(&fx.target, &fx.psk, &fx.destination_status, &[], &env)?;
        let source = source_with_log(&fx, destination.addr, source_key, log)?;
        if log == "trace" {
            ensure!(!source.status.success(), "a wrong key synced");
            let right = source_with_log(&fx, destination.addr, &fx.psk, log)?;
            ensure!(right.status.success(), "the right key after a wrong one");
        }
        let finished = destination.wait(AGENT_TIMEOUT)?;
        let ok = source.status.success() && finished.status.success();
        ensure!(ok == (log == "debug"), "unexpected outcome at {log}");
        let source_err = String::from_utf8_lossy(&source.stderr).into_owned();
        ensure!(
            source_err.lines().count() > 3,
            "no logs at {log}: {source_err}"
        );
        outputs.push((format!("source stderr ({log})"), source_err));
        let stdout = String::from_utf8_lossy(&source.stdout).into_owned();
        outputs.push((format!("source stdout ({log})"), stdout));
        outputs.push((format!("destination stderr ({log})"), finished.stderr));
        for status in [&fx.source_status, &fx.destination_status] {
            let text = std::fs::read_to_string(status)?;
            outputs.push((status.display().to_string(), text));
        }
    }
    for (what, text) in &outputs {
        expect_no_key(what, text, &needles)?;
    }
    Ok(())
}

#[tokio::test]
async fn tls_1_2_client_is_refused_and_the_destination_keeps_waiting() -> Result<()> {
    let fx = Fixture::new(2 * MIB, 0x5ec_0002)?;
    let mut destination = fx.destination()?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let tcp = TcpStream::connect(destination.addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let refused = tokio::time::timeout(LIMIT, connector.connect(tls::server_name(), tcp)).await?;
    let err = match refused {
        Ok(_) => bail!("a TLS 1.2 handshake succeeded"),
        Err(e) => e.to_string(),
    };
    // The server's alert, not our own certificate check: the version is what failed.
    ensure!(
        err.contains("ProtocolVersion"),
        "refused for another reason: {err}"
    );

    // Nothing was started, and the real sync still runs.
    ensure!(
        !fx.destination_status.exists(),
        "a TLS 1.2 client started a sync"
    );
    let source = fx.source(destination.addr)?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    ensure!(
        source.status.success() && finished.status.success(),
        "{}",
        finished.stderr
    );
    ensure!(
        finished.stderr.contains("dropped before authentication"),
        "{}",
        finished.stderr
    );
    fx.expect_target_matches_volume()
}

/// What a man in the middle decrypted, per direction.
#[derive(Default)]
struct Seen {
    from_source: Vec<u8>,
    from_destination: Vec<u8>,
}

/// How the man in the middle behaves once it holds both TLS sessions.
#[derive(Clone)]
enum Mitm {
    /// Relays the decrypted bytes both ways (and records them).
    Relay,
    /// Runs the PSK exchange itself on both sides with a key of its own, then would relay.
    OwnKey(Psk),
}

/// Accepts one source on `listener`, terminates its TLS with the MITM's own certificate, opens its own TLS
/// session to `destination`, and behaves as `mode` says, recording every plaintext byte.
async fn man_in_the_middle(
    listener: TcpListener,
    destination: SocketAddr,
    mode: Mitm,
    seen: Arc<Mutex<Seen>>,
) -> Result<()> {
    let (tcp, _) = listener.accept().await?;
    let toward_source = tls::acceptor()?.accept(tcp).await?;
    let up = TcpStream::connect(destination).await?;
    let toward_destination = tls::connector()?.connect(tls::server_name(), up).await?;
    let (ex_source, ex_destination) = (
        tls::server_exporter(&toward_source)?,
        tls::client_exporter(&toward_destination)?,
    );
    ensure!(
        ex_source != ex_destination,
        "two TLS sessions, two exporters"
    );
    let (mut sr, mut sw) = tokio::io::split(toward_source);
    let (mut dr, mut dw) = tokio::io::split(toward_destination);
    if let Mitm::OwnKey(psk) = mode {
        use blockmover::codec::{FrameReader, FrameWriter};
        let (mut r, mut w) = (FrameReader::new(&mut sr), FrameWriter::new(&mut sw));
        let to_source = authenticate(&mut r, &mut w, &psk, Side::Destination, &ex_source, LIMIT);
        let (mut r2, mut w2) = (FrameReader::new(&mut dr), FrameWriter::new(&mut dw));
        let to_dest = authenticate(&mut r2, &mut w2, &psk, Side::Source, &ex_destination, LIMIT);
        let (a, b) = tokio::join!(to_source, to_dest);
        ensure!(
            a.is_err() && b.is_err(),
            "a wrong key authenticated: {a:?} {b:?}"
        );
        return Ok(());
    }
    // Both directions relay until each side hangs up.
    tokio::join!(
        relay(sr, dw, seen.clone(), true),
        relay(dr, sw, seen.clone(), false)
    );
    Ok(())
}

/// Copies `from` to `to`, recording what passes in `seen`, until either side ends.
async fn relay<R, W>(mut from: R, mut to: W, seen: Arc<Mutex<Seen>>, from_source: bool)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut s = seen.lock().expect("lock");
            let log = if from_source {
                &mut s.from_source
            } else {
                &mut s.from_destination
            };
            log.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Frames in `bytes`, in order (stops at the first incomplete or invalid one).
fn frames(mut bytes: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    while let Ok(Some((m, used))) = decode_frame(bytes) {
        out.push(m);
        bytes = &bytes[used..];
    }
    out
}

async fn mitm_fails_the_source(mode: Mitm, seed: u64) -> Result<()> {
    let fx = marked_fixture(seed)?;
    let before = fx.target_digest()?;
    let mut destination = fx.destination()?;
    let untouched = crate::common::file_bytes(&fx.destination_status)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mitm_addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let relay = tokio::spawn(man_in_the_middle(
        listener,
        destination.addr,
        mode.clone(),
        seen.clone(),
    ));
    let source = {
        let (volume, psk, status) = (fx.volume.clone(), fx.psk.clone(), fx.source_status.clone());
        tokio::task::spawn_blocking(move || {
            crate::common::run_source(mitm_addr, &volume, &psk, &status)
        })
        .await??
    };
    tokio::time::timeout(LIMIT, relay).await???;

    // The source sees the misconfiguration at once.
    let stderr = expect_failure(
        "source",
        source.status,
        &String::from_utf8_lossy(&source.stderr),
    );
    ensure!(
        source.status.code() == Some(1),
        "source exit {}: {stderr}",
        source.status
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("");
    ensure!(
        line.contains("pre-shared keys do not match"),
        "source: {line}"
    );
    let v = expect_failed(&fx.source_status, Kind::Source)?;
    ensure!(v.get("lastSyncTime").is_none(), "{v:#}");
    // The man in the middle never proved the key to the destination, so nothing changed there (issue 10, finding
    // 4): its status and the target as they were; and it still waits for its source (checked below).
    ensure!(
        crate::common::file_bytes(&fx.destination_status)? == untouched,
        "the man in the middle changed the destination's status: {:#}",
        read_status(&fx.destination_status)?
    );
    ensure!(fx.target_digest()? == before, "the target changed");

    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    for (what, bytes) in [
        ("source", &seen.from_source),
        ("destination", &seen.from_destination),
    ] {
        ensure!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "volume data from the {what} crossed the MITM in the clear"
        );
        let names: Vec<_> = frames(bytes).iter().map(|m| m.name()).collect();
        let only_auth = names.iter().all(|n| *n == "AUTH" || *n == "ABORT");
        ensure!(only_auth, "the MITM saw {names:?} from the {what}");
    }
    if matches!(mode, Mitm::Relay) {
        // It really sat in the middle: it decrypted the source's proof (useless on the other session).
        let first = frames(&seen.from_source).into_iter().next();
        ensure!(
            matches!(first, Some(Message::Auth { .. })),
            "the relay decrypted nothing: {first:?}"
        );
    }
    // The one-shot destination is still waiting: the source, connecting directly, syncs.
    let addr = destination.addr;
    let direct = {
        let (volume, psk, status) = (fx.volume.clone(), fx.psk.clone(), fx.source_status.clone());
        tokio::task::spawn_blocking(move || crate::common::run_source(addr, &volume, &psk, &status))
            .await??
    };
    let finished = tokio::task::spawn_blocking(move || destination.wait(AGENT_TIMEOUT)).await??;
    ensure!(
        direct.status.success() && finished.status.success(),
        "the direct sync after the man in the middle failed: source {}: {}\ndestination {}: {}",
        direct.status,
        String::from_utf8_lossy(&direct.stderr),
        finished.status,
        finished.stderr
    );
    fx.expect_target_matches_volume()
}

#[tokio::test]
async fn mitm_relaying_proofs_fails_the_source_and_sees_no_volume_data() -> Result<()> {
    mitm_fails_the_source(Mitm::Relay, 0x5ec_0003).await
}

#[tokio::test]
async fn mitm_with_its_own_key_fails_the_source_and_sees_no_volume_data() -> Result<()> {
    let psk = Psk::parse(&Psk::generate()).map_err(anyhow::Error::msg)?;
    mitm_fails_the_source(Mitm::OwnKey(psk), 0x5ec_0004).await
}
