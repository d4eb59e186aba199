//! Seeing where a real source is without reading its mind: how many bytes its connection carries up to its HELLO
//! (measured once with a scripted destination), and its scan progress from its own `/metrics`.
//!
//! Why measure the HELLO offset: a test that must let READY through but keep every DIGESTS frame away from the
//! destination stalls the source's stream one byte after its HELLO. Everything the source sends up to there (TLS
//! ClientHello and Finished, AUTH, HELLO with its identity) has a fixed length for a given binary and identity, so
//! one scripted session measures it exactly; the destination's side (its certificate's signature) does not.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use blockmover::codec::Message;
use blockmover::net::{authenticated, Counted, WireCounters};
use blockmover::tls::{self, Psk, Side};

use crate::common::metrics::{metric, scrape};
use crate::common::{spawn_source_with, wait_with_timeout, ObservedSource, AGENT_TIMEOUT};

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

/// Polls the source's `/metrics` until the sync under way has read every byte of its `size`-byte volume (the scan
/// is over: every digest it announces was computed from bytes already read). Fails if the source exits first, or
/// after [`LIMIT`] (a safety net).
pub fn wait_scanned(source: &mut ObservedSource, size: u64) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let scraped = scrape(source.metrics)?;
        let scanned = metric(&scraped, "blockmover_progress_scanned_bytes", None);
        let total = metric(&scraped, "blockmover_progress_total_bytes", None);
        if scanned == Some(size as f64) && total == Some(size as f64) {
            return Ok(());
        }
        if source.running.exited()? {
            bail!("the source exited before its scan was seen complete");
        }
        if Instant::now() > deadline {
            bail!("the source's scan did not complete within {LIMIT:?}: scanned {scanned:?} of {total:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}
