//! Finding 9: a destination killed mid-sync is a vanished peer, retryable, every time. The source used to take the
//! NEED queue closed by its own dying sender for a full one and fail with "the destination exceeded its window of
//! open NEEDs", exit 1: a Job trusting the exit code would not retry.
//!
//! Two tests. [`RUNS`] syncs, each killing the destination (`kill -9`) when the proxy has forwarded a different
//! number of the source's bytes ([`Proxy`] marks), from just after the handshake to most of the data; the target is
//! reset to zeros before each run, so every run is a full sync. That race is rare (one run in 36 with the binary
//! of the finding), so a second test makes the worst moment happen every time: a destination built from the
//! library's own TLS, key proof and codec asks for an eighth of the chunks and, once DATA flows back, sends NEEDs
//! for all the others in one burst and vanishes with the source's DATA unread (its socket closed: the reset the
//! kernel of a killed process sends). The source's writer then fails while the burst is still being read.

use std::os::unix::process::ExitStatusExt;

use anyhow::{bail, ensure, Result};
use blockmover::chunk::Digest;
use blockmover::codec::{Fallback, Message, SyncKind};
use blockmover::net::authenticated;
use blockmover::sample::SampleSpec;
use blockmover::tls::{self, Psk, Side};
use tokio::net::TcpListener;

use super::{reset_target, RETRYABLE, WAIT};
use crate::common::proxy::{Faults, Proxy};
use crate::common::{Destination, Ended, Fixture, Running, AGENT_TIMEOUT};

const MIB: u64 = 1 << 20;
/// Kills, each at its own offset.
const RUNS: u64 = 12;
/// Volume size: 256 chunks of random data, well past the socket buffers.
const VOLUME: u64 = 16 * MIB;

/// Finding 9: over [`RUNS`] kills of the destination at varied points of a sync, the source always exits 75,
/// never 1, and never blames the destination's window.
#[test]
fn a_destination_killed_mid_sync_always_fails_the_source_retryably() -> Result<()> {
    let fx = Fixture::random(VOLUME, 0x9f_0001)?;
    let mut wrong = Vec::new();
    for run in 0..RUNS {
        reset_target(&fx.target, VOLUME)?;
        // From 16 KiB (the session has just begun) to 3/4 of the data, spread over the runs.
        let at = 16 * 1024 + run * (VOLUME * 3 / 4) / RUNS;
        let mut destination = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &[])?;
        let proxy = Proxy::start(destination.addr, Faults::none().mark_at(at), Faults::none())?;
        let source = Running::source(proxy.addr(), &fx, &[])?;
        proxy.wait_marked(AGENT_TIMEOUT)?;
        destination.child.kill()?;
        let killed = destination.wait(AGENT_TIMEOUT)?;
        ensure!(
            killed.status.signal() == Some(9),
            "run {run}: {}",
            killed.stderr
        );
        let ended = source.finish(AGENT_TIMEOUT)?;
        tally(
            &mut wrong,
            &format!("run {run} (destination killed after {at} bytes)"),
            &ended,
        );
    }
    all_retryable(&wrong, RUNS, "a killed destination")
}

/// Prints how the source of `run` ended, and adds it to `wrong` unless it is the retryable failure a vanished
/// destination must give: exit 75, never blaming the destination's window.
fn tally(wrong: &mut Vec<String>, run: &str, ended: &Ended) {
    let line = ended.error_line();
    println!("{run}: source {:?}: {line}", ended.code());
    if ended.code() != Some(RETRYABLE) || line.contains("exceeded its window") {
        wrong.push(format!("{run}: exit {:?}: {line}", ended.status));
    }
}

/// Fails, listing them, if any of `runs` runs with `what` was [`tally`]'d as wrong.
fn all_retryable(wrong: &[String], runs: u64, what: &str) -> Result<()> {
    ensure!(
        wrong.is_empty(),
        "{what} is retryable, every time; wrong in {} of {runs} runs:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    Ok(())
}

/// Runs with the vanishing destination.
const VANISH_RUNS: u64 = 5;
/// Its volume: 65536 chunks of 4 KiB (`--chunk-size 4096`), the largest READY window, so that the second burst
/// (56 Ki NEEDs, about 3 MiB) is more than the source can read before its writer fails. Mostly holes: cheap.
const VANISH_VOLUME: u64 = 256 * MIB;
/// The source's chunk size for it.
const VANISH_CHUNK: u64 = 4096;

/// Serves one source on `listener` up to the worst moment to vanish: after READY, reads DIGESTS until every chunk
/// is announced, sends NEEDs for an eighth of them and reads until the first DATA answers, then sends the rest in
/// one burst and drops the connection with the source's DATA unread.
async fn vanish_with_needs_in_flight(listener: TcpListener, psk: Psk) -> Result<()> {
    let (tcp, _) = listener.accept().await?;
    let tls = tls::acceptor()?.accept(tcp).await?;
    let exporter = tls::server_exporter(&tls)?;
    let (mut reader, mut writer) =
        authenticated(tls, exporter, &psk, Side::Destination, WAIT).await?;
    let volume_size = match reader.expect("hello").await? {
        Message::Hello { volume_size, .. } => volume_size,
        other => bail!("expected HELLO, received {}", other.name()),
    };
    let chunks = volume_size / VANISH_CHUNK;
    let window = u32::try_from(chunks)?;
    let ready = Message::Ready {
        target_size: volume_size,
        window,
        kind: SyncKind::Full,
        reason: Fallback::DestinationNoState,
    };
    writer.send(&ready).await?;
    let mut announced = 0;
    while announced < chunks {
        match reader.expect("digests").await? {
            Message::Digests { first, digests } => announced = first + digests.len() as u64,
            other => bail!("expected DIGESTS, received {}", other.name()),
        }
    }
    // A target block that matches nothing: every block of every chunk is asked for.
    let stale = Digest::of(b"a target block unlike any of the volume's");
    let need = |chunk| Message::Need {
        chunk,
        blocks: Some(vec![stale]),
    };
    // A first burst of NEEDs, then DATA flows back: the source's servicer and writer are busy.
    let first = chunks / 8;
    for chunk in 0..first {
        writer.queue(&need(chunk)).await?;
    }
    writer.flush().await?;
    loop {
        match reader.expect("data").await? {
            Message::Data(_) => break,
            Message::End { .. } => {}
            other => bail!("expected DATA, received {}", other.name()),
        }
    }
    // The rest in one burst, and gone with the source's DATA unread: the kernel resets the connection.
    for chunk in first..chunks {
        writer.queue(&need(chunk)).await?;
    }
    writer.flush().await?;
    Ok(())
}

/// Finding 9, made deterministic: a destination that vanishes while its burst of NEEDs (a whole window) is still
/// being read and the source is sending DATA fails the source retryably (75), never "exceeded its window".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_vanishing_with_needs_in_flight_fails_the_source_retryably() -> Result<()> {
    let spec = SampleSpec {
        size: VANISH_VOLUME,
        zero_share: 0.875,
        text_share: 0.0,
        random_share: 0.125,
        seed: 0x9f_0002,
    };
    let fx = Fixture::with_spec(&spec, VANISH_VOLUME)?;
    let psk = Psk::load(&fx.psk)?;
    let chunk = VANISH_CHUNK.to_string();
    let mut wrong = Vec::new();
    for run in 0..VANISH_RUNS {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let source = Running::source(listener.local_addr()?, &fx, &["--chunk-size", &chunk])?;
        let served =
            tokio::time::timeout(WAIT, vanish_with_needs_in_flight(listener, psk.clone())).await;
        let ended = tokio::task::spawn_blocking(move || source.finish(AGENT_TIMEOUT)).await??;
        ensure!(
            matches!(served, Ok(Ok(()))),
            "run {run}: the vanishing destination did not get to vanish: {served:?}\n{}",
            ended.stderr
        );
        tally(&mut wrong, &format!("run {run}"), &ended);
    }
    all_retryable(&wrong, VANISH_RUNS, "a vanished destination")
}
