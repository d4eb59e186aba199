//! Seeing where a real source is without reading its mind: how many bytes its connection carries up to its HELLO
//! (measured once with a scripted destination), its scan progress from its own `/metrics`, and its `error:` line.
//!
//! Why measure the HELLO offset: a test that must let READY through but keep every DIGESTS frame away from the
//! destination stalls the source's stream one byte after its HELLO. Everything the source sends up to there (TLS
//! ClientHello and Finished, AUTH, HELLO with its identity) has a fixed length for a given binary and identity, so
//! one scripted session measures it exactly; the destination's side (its certificate's signature) does not.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blockmover::codec::Message;
use blockmover::net::{authenticated, Counted, WireCounters};
use blockmover::tls::{self, Psk, Side};

use crate::common::{drain, metrics_line, spawn_source_with, wait_with_timeout, AGENT_TIMEOUT};

/// Safety net for a scripted step or a poll (never a synchronisation).
const LIMIT: Duration = Duration::from_secs(60);

/// Bytes a source sends on its connection up to and including its HELLO, for `volume` and source `flags` (its
/// identity: `--name`, `--namespace`). A scripted destination with the right key reads the HELLO and never
/// answers it, so the source sends nothing more; then the source is killed.
pub fn bytes_through_hello(psk: &Path, volume: &Path, flags: &[&str]) -> Result<u64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = volume.with_file_name("hello-probe-status.json");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut source = spawn_source_with(listener.local_addr()?, volume, psk, &status, flags)?;
        let measured = async {
            let (tcp, _) = tokio::time::timeout(LIMIT, listener.accept()).await??;
            let wire = Arc::new(WireCounters::default());
            let accepted = tls::acceptor()?.accept(Counted::new(tcp, wire.clone()));
            let tls = tokio::time::timeout(LIMIT, accepted).await??;
            let exporter = tls::server_exporter(&tls)?;
            let key = Psk::load(psk)?;
            let (mut reader, writer) =
                authenticated(tls, exporter, &key, Side::Destination, LIMIT).await?;
            let hello = tokio::time::timeout(LIMIT, reader.expect("hello probe")).await??;
            ensure!(
                matches!(hello, Message::Hello { .. }),
                "the source sent {} instead of HELLO",
                hello.name()
            );
            let through = wire.received.load(Ordering::SeqCst);
            drop((reader, writer));
            anyhow::Ok(through)
        }
        .await;
        let _ = source.kill();
        wait_with_timeout(&mut source, AGENT_TIMEOUT)?;
        let _ = std::fs::remove_file(&status);
        measured
    })
}

/// A source started with `--metrics-listen 127.0.0.1:0`, its stderr collected.
pub struct ObservedSource {
    pub child: Child,
    pub metrics: SocketAddr,
    stderr: Option<JoinHandle<String>>,
}

impl ObservedSource {
    /// `blockmover source --connect ADDR --volume V --psk P --status S FLAGS --metrics-listen 127.0.0.1:0`, once it
    /// printed its metrics address.
    pub fn spawn(
        addr: SocketAddr,
        volume: &Path,
        psk: &Path,
        status: &Path,
        flags: &[&str],
    ) -> Result<ObservedSource> {
        let mut with_metrics = flags.to_vec();
        with_metrics.extend(["--metrics-listen", "127.0.0.1:0"]);
        let mut child = spawn_source_with(addr, volume, psk, status, &with_metrics)?;
        let stderr = drain(child.stderr.take().context("source stderr")?);
        let stdout = child.stdout.take().context("source stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if let Some(addr) = metrics_line(&line) {
                    let _ = tx.send(addr);
                }
            }
        });
        let mut source = ObservedSource {
            child,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr: Some(stderr),
        };
        match rx.recv_timeout(LIMIT) {
            Ok(addr) => source.metrics = addr.parse().context("metrics address")?,
            Err(_) => {
                let (status, stderr) = source.wait()?;
                bail!("the source printed no metrics address ({status}): {stderr}");
            }
        }
        Ok(source)
    }

    /// Polls `/metrics` until the sync under way has read every byte of its `size`-byte volume (the scan is over:
    /// every digest it announces was computed from bytes already read).
    pub fn wait_scanned(&mut self, size: u64) -> Result<()> {
        let deadline = Instant::now() + LIMIT;
        loop {
            let scraped = scrape(self.metrics)?;
            let scanned = sample(&scraped, "blockmover_progress_scanned_bytes");
            let total = sample(&scraped, "blockmover_progress_total_bytes");
            if scanned == Some(size as f64) && total == Some(size as f64) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the source exited ({status}) before its scan was seen complete");
            }
            if Instant::now() > deadline {
                bail!("the source's scan did not complete within {LIMIT:?}: scanned {scanned:?} of {total:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit (safety net [`AGENT_TIMEOUT`]); returns it with the whole stderr.
    pub fn wait(&mut self) -> Result<(std::process::ExitStatus, String)> {
        let status = wait_with_timeout(&mut self.child, AGENT_TIMEOUT)?;
        let stderr = match self.stderr.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("stderr reader panicked"))?,
            None => String::new(),
        };
        Ok((status, stderr))
    }
}

impl Drop for ObservedSource {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The body of `GET /metrics` from `addr`.
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(LIMIT))?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {response:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_owned())
}

/// The value of the first sample of metric `name` in a text exposition.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The first line of `stderr` holding `error: `, or "" (an agent's one-line failure report).
pub fn error_line(stderr: &str) -> &str {
    stderr.lines().find(|l| l.contains("error: ")).unwrap_or("")
}

#[test]
fn sample_reads_a_labelled_gauge_and_not_a_longer_name() {
    let body = "# HELP x\nblockmover_progress_scanned_bytes_extra{a=\"b\"} 9\n\
                blockmover_progress_scanned_bytes{obj_name=\"v\"} 4096\n";
    assert_eq!(
        sample(body, "blockmover_progress_scanned_bytes"),
        Some(4096.0)
    );
    assert_eq!(sample(body, "blockmover_progress_total_bytes"), None);
}
