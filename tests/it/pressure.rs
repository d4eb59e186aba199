//! Resource pressure from outside the protocol: a flood of bogus connections during a real sync, and a target on
//! a filesystem that fills up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use blockmover::codec::Message;
use blockmover::tls;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::{
    expect_failed, expect_successful, sparse_file, Destination, Fixture, SyncRun, AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
/// At most this many bogus connections in one test, and this many at once.
const BOGUS_TOTAL: u64 = 300;
const BOGUS_AT_ONCE: usize = 16;
/// Safety net for one bogus connection (it may wait in the listen backlog while the sync runs).
const BOGUS_LIMIT: Duration = Duration::from_secs(20);

/// One bogus client of kind `n % 7`; every failure is expected and ignored.
async fn bogus(addr: std::net::SocketAddr, n: u64) -> Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    match n % 7 {
        0 => {}                                                          // connect, hang up
        1 => tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?, // a health check
        2 => tcp.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]).await?,      // a broken ClientHello
        3 => tokio::time::sleep(Duration::from_millis(300)).await,       // silent for a while
        kind => {
            let mut tls = tls::connector()?.connect(tls::server_name(), tcp).await?;
            let mut frame = BytesMut::new();
            match kind {
                4 => frame.extend_from_slice(b"not a frame at all, after a real TLS handshake"),
                // A frame other than AUTH first.
                5 => Message::Ack { through: 1 }.encode(&mut frame),
                // An AUTH frame cut short.
                _ => {
                    Message::Auth { proof: [0; 32] }.encode(&mut frame);
                    frame.truncate(20);
                }
            }
            tls.write_all(&frame).await?;
            tls.shutdown().await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_bogus_connections_while_a_real_sync_runs_do_not_stop_it() -> Result<()> {
    let fx = Fixture::new(16 * MIB, 0x9e55_0001)?;
    let mut destination = Destination::spawn(
        &fx.target,
        &fx.psk,
        &fx.destination_status,
        &["--handshake-timeout", "5"],
    )?;
    let addr = destination.addr;
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (done, sent) = (done.clone(), sent.clone());
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(BOGUS_AT_ONCE));
            let mut n = 0;
            while n < BOGUS_TOTAL && !done.load(Ordering::Relaxed) {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(BOGUS_LIMIT, bogus(addr, n)).await;
                    drop(slot);
                });
                n += 1;
                sent.store(n, Ordering::Relaxed);
                // Pacing, so that the flood spans the whole sync rather than its first millisecond.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Let the flood start before the real source, then run both together.
    while sent.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let run = tokio::task::spawn_blocking(move || -> Result<SyncRun> {
        let source = fx.source(addr)?;
        let destination = destination.wait(AGENT_TIMEOUT)?;
        fx.expect_target_matches_volume()?;
        expect_successful(&fx.destination_status, Kind::Destination)?;
        expect_successful(&fx.source_status, Kind::Source)?;
        Ok(SyncRun {
            source,
            destination,
        })
    })
    .await??;
    done.store(true, Ordering::Relaxed);
    flood.await?;
    run.expect_success();
    let bogus_count = sent.load(Ordering::Relaxed);
    ensure!(bogus_count >= 20, "only {bogus_count} bogus connections");
    let dropped = run
        .destination
        .stderr
        .matches("dropped before authentication")
        .count();
    ensure!(
        dropped >= 1,
        "no bogus connection was handled:\n{}",
        run.destination.stderr
    );
    println!(
        "{bogus_count} bogus connections, {dropped} dropped by the destination before it exited"
    );
    Ok(())
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted (and the directory removed) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one, or says why it cannot (not root, no mount).
    fn mount(size: &str) -> Result<std::result::Result<Tmpfs, String>> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1));
        if euid != Some("0") {
            return Ok(Err(format!(
                "not root (euid {})",
                euid.unwrap_or("unknown")
            )));
        }
        let dir = tempfile::tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Ok(Tmpfs { dir })),
            Ok(o) => Ok(Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))),
            Err(e) => Ok(Err(format!("cannot run mount: {e}"))),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        match Command::new("umount").arg(self.dir.path()).status() {
            Ok(s) if s.success() => {}
            other => eprintln!(
                "warning: umount {} failed: {other:?}",
                self.dir.path().display()
            ),
        }
    }
}

/// The `error: ` line of `stderr`.
fn error_line(stderr: &str) -> Result<&str> {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .with_context(|| format!("no `error: ` line:\n{stderr}"))
}

#[test]
fn disk_full_on_the_destination_fails_clearly_and_never_reports_success() -> Result<()> {
    let tmpfs = match Tmpfs::mount("2m")? {
        Ok(t) => t,
        Err(reason) => {
            println!("skipped: cannot mount a small tmpfs ({reason})");
            return Ok(());
        }
    };
    // A 16 MiB volume (two thirds data) into a sparse 16 MiB target on a 2 MiB filesystem.
    let fx = Fixture::new(16 * MIB, 0xd15c_f011)?;
    let target: PathBuf = tmpfs.path().join("target.img");
    sparse_file(&target, fx.size)?;
    let mut destination = Destination::spawn(&target, &fx.psk, &fx.destination_status, &[])?;
    let source = fx.source(destination.addr)?;
    let finished = destination.wait(AGENT_TIMEOUT)?;

    let line = error_line(&finished.stderr)?;
    let lower = line.to_lowercase();
    let clear =
        lower.contains("no space left on device") && line.contains(&target.display().to_string());
    ensure!(
        clear,
        "the destination's error does not name ENOSPC and the target: {line}"
    );
    println!("destination on a full tmpfs: {line}");
    ensure!(
        finished.status.code() == Some(1),
        "destination exit {}: a full disk needs someone to act, a retry will not cure it",
        finished.status
    );
    let source_err = String::from_utf8_lossy(&source.stderr).into_owned();
    let line = error_line(&source_err)?;
    ensure!(
        line.to_lowercase().contains("no space left on device"),
        "the source's error does not say why: {line}"
    );
    ensure!(
        source.status.code() == Some(1),
        "source exit {}",
        source.status
    );
    for (status, kind) in [
        (&fx.destination_status, Kind::Destination),
        (&fx.source_status, Kind::Source),
    ] {
        let v = expect_failed(status, kind)?;
        if v.get("lastSyncTime").is_some() {
            bail!("a failed sync set lastSyncTime: {v:#}");
        }
    }
    drop(tmpfs);
    Ok(())
}
