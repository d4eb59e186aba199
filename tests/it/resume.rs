//! Resuming an interrupted sync: a retry sends only what the target does not already hold.
//!
//! Each test interrupts a full sync of a mostly random volume (zstd cannot shrink it, so bytes on the wire track
//! the data) at about half way, by a connection cut, `kill -9` of the destination or `kill -9` of the source, then
//! retries and checks with the agents' own figures that the retry sent about the other half: at most what the
//! first run did not write, and clearly less than a full sync (a retry that started from zero would send every
//! chunk). The target must end equal to the volume, with both statuses Successful and agreeing on the digest.
//!
//! Why the chunks written before the interruption survive a killed destination: its writes sit in the kernel's
//! page cache, which belongs to the file, not to the process; the next destination reads them back when it hashes
//! the target. Only a crash of the machine could lose writes not yet fsynced, and then the rehash sees older
//! bytes, which differ and are sent again (see "Why resuming is safe" in `proto/PROTOCOL.md`).

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use anyhow::{Context, Result};
use blockmover::sample::{self, SampleSpec};

use crate::common::proxy::{Direction, Faults, Proxy};
use crate::common::{
    expect_failed, expect_failure, expect_successful, external_u64, read_status, sigterm,
    spawn_source, wait_with_timeout, Destination, Fixture, AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
/// Large enough that what is in flight when the sync is interrupted (socket buffers, the destination's inbox and
/// one verify batch: a few MiB) is small next to half of it.
const VOLUME: u64 = 64 * MIB;
/// The source's default chunk size.
const CHUNK: u64 = 65536;
/// Exit code of a failure a retry may cure.
const RETRYABLE: i32 = 75;
/// A 4 KiB block.
const BLOCK: usize = sample::BLOCK as usize;

/// A fixture whose volume is a quarter zeros and three quarters random bytes, and whose target is all zeros: a
/// full sync sends every non-zero chunk, raw.
fn random_fixture(seed: u64) -> Result<(Fixture, u64)> {
    let spec = SampleSpec {
        size: VOLUME,
        zero_share: 0.25,
        text_share: 0.0,
        random_share: 0.75,
        seed,
    };
    let fx = Fixture::with_spec(&spec, VOLUME)?;
    let chunks = nonzero_chunks(&fx.volume, VOLUME)?;
    Ok((fx, chunks))
}

/// A sync of a fresh random fixture, held still by a proxy that stalls the source's stream once `at(chunks)`
/// bytes passed: the destination session is open and the source blocked, both alive.
struct Stalled {
    fx: Fixture,
    chunks: u64,
    destination: Destination,
    proxy: Proxy,
    source: std::process::Child,
}

/// A full sync through a proxy that stalls it after `at(chunks)` bytes; `destination_flags` go to the destination.
fn stalled_sync(seed: u64, at: impl Fn(u64) -> u64, destination_flags: &[&str]) -> Result<Stalled> {
    let (fx, chunks) = random_fixture(seed)?;
    let destination = Destination::spawn(
        &fx.target,
        &fx.psk,
        &fx.destination_status,
        destination_flags,
    )?;
    let proxy = Proxy::start(
        destination.addr,
        Faults::none().stall_at(at(chunks)),
        Faults::none(),
    )?;
    let source = spawn_source(proxy.addr(), &fx.volume, &fx.psk, &fx.source_status)?;
    proxy.wait_stalled(AGENT_TIMEOUT)?;
    Ok(Stalled {
        fx,
        chunks,
        destination,
        proxy,
        source,
    })
}

/// Waits until the target stops changing (the same non-zero chunks 300 ms apart): a destination whose input stalled
/// has then written everything it received. Bounded by [`AGENT_TIMEOUT`].
fn wait_applied(target: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + AGENT_TIMEOUT;
    let mut last = nonzero_chunks(target, VOLUME)?;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = nonzero_chunks(target, VOLUME)?;
        if now == last || std::time::Instant::now() > deadline {
            return Ok(());
        }
        last = now;
    }
}

/// Chunks of `CHUNK` bytes among the first `len` bytes of `path` that hold a non-zero byte.
fn nonzero_chunks(path: &Path, len: u64) -> Result<u64> {
    let bytes = std::fs::read(path)?;
    let bytes = bytes.get(..len as usize).context("file shorter than len")?;
    Ok(bytes
        .chunks(CHUNK as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64)
}

/// The figures of the retry that completed the sync, checked against the interrupted run's.
struct Resumed {
    /// Chunks the retry's destination wrote (its `chunksSent`).
    chunks: u64,
    /// TCP bytes the retry's source sent.
    wire_sent: u64,
}

/// Runs the retry (directly, no proxy), checks success, equal digests on both sides and the target's bytes.
fn retry(fx: &Fixture) -> Result<Resumed> {
    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    let destination = expect_successful(&fx.destination_status, Kind::Destination)?;
    let source = expect_successful(&fx.source_status, Kind::Source)?;
    let digest = |s: &serde_json::Value| s.pointer("/external/volumeDigest").cloned();
    assert_eq!(
        digest(&destination),
        digest(&source),
        "both sides report the same volume digest"
    );
    assert!(digest(&source).is_some());
    let chunks = external_u64(&destination, "chunksSent")?;
    assert_eq!(
        chunks,
        external_u64(&source, "chunksSent")?,
        "the source sent what the destination wrote"
    );
    Ok(Resumed {
        chunks,
        wire_sent: external_u64(&source, "wireBytesSent")?,
    })
}

/// The bounds every resumed sync must meet: it sends less than `share` of a full sync, and no chunk the
/// interrupted run could not have received (`passed` bytes of the source's stream got through).
fn check_resumed(what: &str, resumed: &Resumed, chunks: u64, passed: u64, share: f64) {
    let full = chunks * CHUNK;
    println!(
        "{what}: full sync = {chunks} chunks ({full} bytes); {passed} bytes passed before the interruption; \
         the retry sent {} chunks, {} wire bytes ({:.0}% of a full sync)",
        resumed.chunks,
        resumed.wire_sent,
        100.0 * resumed.wire_sent as f64 / full as f64
    );
    assert!(
        resumed.chunks as f64 <= share * chunks as f64,
        "{what}: the retry sent {} of {chunks} chunks: it did not resume",
        resumed.chunks
    );
    assert!(
        resumed.wire_sent as f64 <= share * full as f64,
        "{what}: the retry sent {} wire bytes, a full sync sends about {full}",
        resumed.wire_sent
    );
    // No more chunks can be on the target than whole chunks passed before the interruption.
    let at_most_written = passed / CHUNK;
    assert!(
        resumed.chunks + at_most_written >= chunks,
        "{what}: the retry sent {} chunks, but at most {at_most_written} of {chunks} can have been written before",
        resumed.chunks
    );
}

#[test]
fn cut_full_sync_resumes_with_the_remaining_half() -> Result<()> {
    let (fx, chunks) = random_fixture(0x5e5_0001)?;
    let cut = chunks * CHUNK / 2;
    let mut destination = fx.destination()?;
    let proxy = Proxy::start(destination.addr, Faults::none().cut_at(cut), Faults::none())?;
    let source = fx.source(proxy.addr())?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    assert_eq!(proxy.bytes_forwarded(Direction::Up), cut);
    let stderr = String::from_utf8_lossy(&source.stderr);
    expect_failure("source", source.status, &stderr);
    assert_eq!(
        source.status.code(),
        Some(RETRYABLE),
        "a cut is retryable:\n{stderr}"
    );
    expect_failure("destination", finished.status, &finished.stderr);
    let failed = expect_failed(&fx.destination_status, Kind::Destination)?;
    assert!(failed.get("lastSyncTime").is_none(), "{failed:#}");
    let written = external_u64(&failed, "chunksSent")?;

    let resumed = retry(&fx)?;
    println!("the cut run wrote {written} chunks");
    // How much of what passed the proxy the destination wrote before the cut depends on the machine's load
    // (socket buffers hold a few MiB); what it wrote is never sent again.
    check_resumed("cut at half", &resumed, chunks, cut, 0.75);
    assert!(
        resumed.chunks + written <= chunks,
        "the retry resent chunks the cut run had written ({} + {written} > {chunks})",
        resumed.chunks
    );
    Ok(())
}

#[test]
fn destination_killed_mid_sync_resumes_after_restart() -> Result<()> {
    let Stalled {
        fx,
        chunks,
        mut destination,
        proxy,
        mut source,
    } = stalled_sync(0x5e5_0002, |chunks| chunks * CHUNK / 2, &[])?;
    let half = chunks * CHUNK / 2;
    // "At half" means after it applied what got through: the kill must not race the frames still in its socket.
    wait_applied(&fx.target)?;
    destination.child.kill()?; // SIGKILL: no status update, no fsync, no goodbye
    let killed = destination.wait(AGENT_TIMEOUT)?;
    assert_eq!(killed.status.signal(), Some(9), "{}", killed.stderr);
    proxy.close();
    let status = wait_with_timeout(&mut source, AGENT_TIMEOUT)?;
    assert_eq!(
        status.code(),
        Some(RETRYABLE),
        "a vanished destination is retryable"
    );
    // The killed destination recorded nothing after the start: no success, no lastSyncTime.
    let left = read_status(&fx.destination_status)?;
    assert!(left.get("lastSyncTime").is_none(), "{left:#}");
    assert!(left.get("lastSyncStartTime").is_some(), "{left:#}");
    // What the killed process wrote is in the page cache: each block is the old (zero) or the new one.
    let (target, volume) = (std::fs::read(&fx.target)?, std::fs::read(&fx.volume)?);
    let blocks = target.chunks(BLOCK).zip(volume.chunks(BLOCK));
    let (mut new, mut torn) = (0u64, 0u64);
    for (t, v) in blocks.take((VOLUME / BLOCK as u64) as usize) {
        if t == v && t.iter().any(|&b| b != 0) {
            new += 1;
        } else if t.iter().any(|&b| b != 0) {
            torn += 1;
        }
    }
    println!("after kill -9 of the destination: {new} non-zero blocks written, {torn} neither old nor new");
    assert_eq!(torn, 0, "a block is neither the old nor the new one");
    assert!(
        new > 0,
        "the killed destination wrote nothing before the kill"
    );

    let resumed = retry(&fx)?;
    check_resumed("destination killed at half", &resumed, chunks, half, 0.75);
    Ok(())
}

#[test]
fn source_killed_mid_sync_resumes() -> Result<()> {
    let Stalled {
        fx,
        chunks,
        mut destination,
        proxy,
        mut source,
    } = stalled_sync(0x5e5_0003, |chunks| chunks * CHUNK / 2, &[])?;
    let half = chunks * CHUNK / 2;
    source.kill()?;
    let status = wait_with_timeout(&mut source, AGENT_TIMEOUT)?;
    assert_eq!(status.signal(), Some(9));
    proxy.close();
    let finished = destination.wait(AGENT_TIMEOUT)?;
    expect_failure("destination", finished.status, &finished.stderr);
    let failed = expect_failed(&fx.destination_status, Kind::Destination)?;
    let written = external_u64(&failed, "chunksSent")?;

    let resumed = retry(&fx)?;
    println!("the destination wrote {written} chunks before the source was killed");
    check_resumed("source killed at half", &resumed, chunks, half, 0.75);
    assert!(resumed.chunks + written <= chunks);
    Ok(())
}

#[test]
fn resume_after_a_new_snapshot_and_a_torn_chunk_converges_to_the_new_snapshot() -> Result<()> {
    let (fx, chunks) = random_fixture(0x5e5_0004)?;
    let cut = chunks * CHUNK / 2;
    let mut destination = fx.destination()?;
    let proxy = Proxy::start(destination.addr, Faults::none().cut_at(cut), Faults::none())?;
    let source = fx.source(proxy.addr())?;
    destination.wait(AGENT_TIMEOUT)?;
    assert!(!source.status.success());
    let written = external_u64(&read_status(&fx.destination_status)?, "chunksSent")?;

    // A new snapshot: 1% of the volume's blocks rewritten in place.
    let change = sample::scattered_change(&fx.volume, VOLUME, 0.01, 0x5e5_0005)?;
    // A torn chunk: half of the first written chunk on the target overwritten, as if a write was cut short.
    let first = first_nonzero_chunk(&fx.target, VOLUME)?.context("the cut run wrote nothing")?;
    let target = std::fs::OpenOptions::new().write(true).open(&fx.target)?;
    target.write_all_at(&[0xa5; (CHUNK / 2) as usize], first * CHUNK)?;
    drop(target);

    let resumed = retry(&fx)?;
    let touched: std::collections::BTreeSet<u64> = change
        .blocks
        .iter()
        .map(|b| b * sample::BLOCK / CHUNK)
        .collect();
    println!(
        "new snapshot ({} blocks in {} chunks) and a torn chunk: the cut run wrote {written} chunks, the retry {}",
        change.blocks.len(),
        touched.len(),
        resumed.chunks
    );
    assert!(
        resumed.chunks <= chunks - written + touched.len() as u64 + 1,
        "the retry sent more than the missing, changed and torn chunks"
    );
    Ok(())
}

/// Index of the first `CHUNK` of `path` holding a non-zero byte.
fn first_nonzero_chunk(path: &Path, len: u64) -> Result<Option<u64>> {
    let bytes = std::fs::read(path)?;
    let bytes = bytes.get(..len as usize).context("file shorter than len")?;
    Ok(bytes
        .chunks(CHUNK as usize)
        .position(|c| c.iter().any(|&b| b != 0))
        .map(|i| i as u64))
}

/// A source that froze with its connection open (a hung node, a half-open connection after a partition) must not
/// block its own retry until the stale session's idle timeout (600 s by default): the destination keeps
/// handshaking while a session runs, and a newer source that proves the key supersedes the stale session once its
/// worker can no longer write. The one-shot destination then serves the retry to a verified, durable end.
#[test]
fn a_retry_is_served_while_a_frozen_sources_session_is_still_open() -> Result<()> {
    let Stalled {
        fx,
        mut destination,
        proxy,
        source: mut frozen,
        ..
    } = stalled_sync(0x5e5_0006, |chunks| chunks * CHUNK / 4, &[])?;

    let retry = std::process::Command::new(crate::common::bin())
        .args(["source", "--handshake-timeout", "5", "--connect"])
        .arg(destination.addr.to_string())
        .arg("--volume")
        .arg(&fx.volume)
        .arg("--psk")
        .arg(&fx.psk)
        .output()?;
    frozen.kill()?;
    wait_with_timeout(&mut frozen, AGENT_TIMEOUT)?;
    proxy.close();
    let finished = destination.wait(AGENT_TIMEOUT)?;
    assert!(
        retry.status.success(),
        "the retry was not served while the frozen source's session was open: {}",
        String::from_utf8_lossy(&retry.stderr)
    );
    assert!(
        finished.status.success(),
        "destination: {}",
        finished.stderr
    );
    assert!(
        finished.stderr.contains("supersedes the sync under way"),
        "destination log: {}",
        finished.stderr
    );
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    Ok(())
}

/// Only a source that proves the key may supersede a sync under way: a connection with the wrong key while a sync
/// runs is refused and the sync completes.
#[test]
fn a_wrong_key_during_a_sync_does_not_end_it() -> Result<()> {
    let Stalled {
        fx,
        mut destination,
        proxy,
        source: mut real,
        ..
    } = stalled_sync(0x5e5_0007, |chunks| chunks * CHUNK / 4, &[])?;

    let other = crate::common::keygen_named(fx.dir.path(), "other-psk.txt")?;
    let intruder = std::process::Command::new(crate::common::bin())
        .args(["source", "--connect"])
        .arg(destination.addr.to_string())
        .arg("--volume")
        .arg(&fx.volume)
        .arg("--psk")
        .arg(&other)
        .output()?;
    let stderr = String::from_utf8_lossy(&intruder.stderr);
    assert_eq!(intruder.status.code(), Some(1), "wrong key: {stderr}");
    assert!(stderr.contains("keys do not match"), "{stderr}");

    proxy.release();
    let status = wait_with_timeout(&mut real, AGENT_TIMEOUT)?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    assert!(
        status.success(),
        "the real source failed after the intruder"
    );
    assert!(
        finished.status.success(),
        "destination: {}",
        finished.stderr
    );
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    Ok(())
}

#[test]
fn sigterm_to_a_serving_destination_during_a_sync_records_failed_and_exits_retryable() -> Result<()>
{
    let Stalled {
        fx,
        mut destination,
        proxy,
        mut source,
        ..
    } = stalled_sync(0x5e5_0008, |chunks| chunks * CHUNK / 2, &["--serve"])?;
    // Half-way through a sync, the pod is deleted.
    sigterm(destination.child.id())?;
    let stopped = destination.wait(AGENT_TIMEOUT)?;
    assert_eq!(stopped.status.code(), Some(RETRYABLE), "{}", stopped.stderr);
    let line = expect_failure("destination", stopped.status, &stopped.stderr);
    assert!(line.contains("SIGTERM"), "{line}");
    // Recorded as Failed, with no lastSyncTime: nothing is reported as synchronised.
    let status = expect_failed(&fx.destination_status, Kind::Destination)?;
    assert!(status.get("lastSyncTime").is_none(), "{status:#}");
    proxy.close();
    let code = wait_with_timeout(&mut source, AGENT_TIMEOUT)?;
    assert_eq!(code.code(), Some(RETRYABLE));
    Ok(())
}
