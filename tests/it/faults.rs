//! Failure paths: wrong key, corruption and cuts in flight, a killed source, a hostile client.
//!
//! Every fault goes through a real TCP proxy ([`crate::common::proxy`]) or a real socket. The
//! invariants checked: a failed sync exits non-zero, writes a Failed status that keeps the
//! previous lastSyncTime, and never leaves a target block that is neither the old target block
//! nor the new volume block.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use blockmover::sample::{self, SampleSpec, BLOCK};

use crate::common::metrics::rejected;
use crate::common::proxy::{Direction, Faults, Proxy};
use crate::common::{
    expect_failed, expect_failure, expect_successful, file_bytes, keygen_named, last_sync_time,
    spawn_source, wait_until, wait_with_timeout, Destination, Fixture, SyncRun, AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;
const SEED: u64 = 0xfa17_0001;
const KIB: u64 = 1024;

/// A fixture synced once (so a lastSyncTime exists), then its volume rewritten with other data.
/// Returns the fixture, the first lastSyncTime and a copy of the target as it was synced.
fn synced_then_rewritten(seed: u64) -> Result<(Fixture, serde_json::Value, std::path::PathBuf)> {
    let fx = Fixture::new(VOLUME, seed)?;
    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    let status = expect_successful(&fx.destination_status, Kind::Destination)?;
    let first = status
        .get("lastSyncTime")
        .cloned()
        .context("lastSyncTime after a successful sync")?;
    let old_target = fx.dir.path().join("target-before.img");
    std::fs::copy(&fx.target, &old_target)?;
    sample::write_sample_volume(&fx.volume, &SampleSpec::mixed(VOLUME, seed + 100))?;
    assert_ne!(
        fx.volume_digest()?,
        fx.target_digest()?,
        "rewritten volume must differ"
    );
    Ok((fx, first, old_target))
}

/// One sync with the source connected through a proxy with `up` faults (source -> destination).
fn sync_through(fx: &Fixture, up: Faults) -> Result<(SyncRun, u64)> {
    let mut destination = fx.destination()?;
    let proxy = Proxy::start(destination.addr, up, Faults::none())?;
    let source = fx.source(proxy.addr())?;
    let destination = destination.wait(AGENT_TIMEOUT)?;
    let forwarded = proxy.bytes_forwarded(Direction::Up);
    Ok((
        SyncRun {
            source,
            destination,
        },
        forwarded,
    ))
}

/// Every 4 KiB block of `target` equals the same block of `old` or of `new`.
fn each_block_is_old_or_new(target: &Path, old: &Path, new: &Path, size: u64) -> Result<()> {
    let (target, old, new) = (
        std::fs::read(target)?,
        std::fs::read(old)?,
        std::fs::read(new)?,
    );
    let len = size as usize;
    let blocks = target[..len]
        .chunks(BLOCK as usize)
        .zip(old[..len].chunks(BLOCK as usize))
        .zip(new[..len].chunks(BLOCK as usize));
    for (index, ((t, o), n)) in blocks.enumerate() {
        assert!(
            t == o || t == n,
            "target block {index} is neither the old target block nor the volume block"
        );
    }
    Ok(())
}

/// The destination status says Failed and still carries `previous` as lastSyncTime.
fn failed_keeping(fx: &Fixture, previous: &serde_json::Value) -> Result<()> {
    let status = expect_failed(&fx.destination_status, Kind::Destination)?;
    assert_eq!(
        status.get("lastSyncTime"),
        Some(previous),
        "failed sync must keep lastSyncTime: {status:#}"
    );
    assert!(last_sync_time(&status)?.is_some());
    Ok(())
}

/// A wrong key fails the source at once (exit 1, "keys do not match": that is where the misconfiguration is seen)
/// and changes nothing on the destination (issue 10, finding 4): it keeps waiting for a source with the right key,
/// counts the rejection, leaves its status file as it was and the target alone.
#[test]
fn mismatched_keys_fail_the_source_and_leave_the_waiting_destination_and_target_alone() -> Result<()>
{
    let fx = Fixture::new(4 * MIB, SEED)?;
    sample::write_sample_volume(&fx.target, &SampleSpec::mixed(4 * MIB, SEED + 1))?;
    let before = fx.target_digest()?;
    let other_key = keygen_named(fx.dir.path(), "other-psk.txt")?;

    let flags = ["--metrics-listen", "127.0.0.1:0"];
    let mut destination =
        Destination::spawn(&fx.target, &other_key, &fx.destination_status, &flags)?;
    let metrics = destination.metrics.context("no metrics address")?;
    let untouched = file_bytes(&fx.destination_status)?;
    let source =
        crate::common::run_source(destination.addr, &fx.volume, &fx.psk, &fx.source_status)?;
    let stderr = expect_failure(
        "source",
        source.status,
        &String::from_utf8_lossy(&source.stderr),
    );
    assert_eq!(source.status.code(), Some(1), "source stderr:\n{stderr}");
    assert!(
        stderr.contains("keys do not match"),
        "source stderr:\n{stderr}"
    );
    expect_failed(&fx.source_status, Kind::Source)?;

    wait_until(
        "the destination handles the wrong key",
        AGENT_TIMEOUT,
        || Ok(destination.child.try_wait()?.is_some() || rejected(metrics, "auth")? >= 1.0),
    )?;
    if let Some(exit) = destination.child.try_wait()? {
        panic!(
            "a wrong key ended the waiting destination ({exit}):\n{}",
            destination.wait(AGENT_TIMEOUT)?.stderr
        );
    }
    assert!(
        file_bytes(&fx.destination_status)? == untouched,
        "a connection that never proved the key changed the destination's status"
    );
    assert_eq!(
        fx.target_digest()?,
        before,
        "target changed after an authentication failure"
    );
    Ok(())
}

#[test]
fn byte_flipped_in_flight_fails_destination_and_writes_nothing_wrong() -> Result<()> {
    let (fx, previous, old_target) = synced_then_rewritten(SEED + 2)?;
    let (run, forwarded) = sync_through(&fx, Faults::none().flip_at(200 * KIB))?;
    assert!(
        forwarded > 200 * KIB,
        "the flip point was never reached ({forwarded} bytes forwarded)"
    );
    expect_failure(
        "destination",
        run.destination.status,
        &run.destination.stderr,
    );
    assert!(
        !run.source.status.success(),
        "source reported success although the destination failed"
    );
    failed_keeping(&fx, &previous)?;
    each_block_is_old_or_new(&fx.target, &old_target, &fx.volume, VOLUME)?;
    Ok(())
}

#[test]
fn killed_source_mid_transfer_fails_destination_and_retry_succeeds() -> Result<()> {
    let (fx, previous, old_target) = synced_then_rewritten(SEED + 3)?;
    let mut destination = fx.destination()?;
    let proxy = Proxy::start(
        destination.addr,
        Faults::none().stall_at(256 * KIB),
        Faults::none(),
    )?;
    let mut source = spawn_source(proxy.addr(), &fx.volume, &fx.psk, &fx.source_status)?;
    let stalled = proxy.wait_stalled(AGENT_TIMEOUT)?;
    assert_eq!(stalled.direction, Direction::Up);

    source.kill()?; // SIGKILL: no goodbye, no status update
    wait_with_timeout(&mut source, AGENT_TIMEOUT)?;
    proxy.close();
    let finished = destination.wait(AGENT_TIMEOUT)?;
    expect_failure("destination", finished.status, &finished.stderr);
    failed_keeping(&fx, &previous)?;
    each_block_is_old_or_new(&fx.target, &old_target, &fx.volume, VOLUME)?;

    fx.sync()?.expect_success();
    fx.expect_target_matches_volume()?;
    let status = expect_successful(&fx.destination_status, Kind::Destination)?;
    assert!(
        last_sync_time(&status)?
            >= last_sync_time(&serde_json::json!({ "lastSyncTime": previous }))?
    );
    Ok(())
}

#[test]
fn connection_cut_mid_transfer_fails_destination() -> Result<()> {
    let (fx, previous, old_target) = synced_then_rewritten(SEED + 4)?;
    let (run, forwarded) = sync_through(&fx, Faults::none().cut_at(300 * KIB))?;
    assert_eq!(forwarded, 300 * KIB, "proxy forwards exactly up to the cut");
    expect_failure(
        "destination",
        run.destination.status,
        &run.destination.stderr,
    );
    expect_failure("source", run.source.status, &run.source_stderr());
    failed_keeping(&fx, &previous)?;
    each_block_is_old_or_new(&fx.target, &old_target, &fx.volume, VOLUME)?;
    Ok(())
}

#[test]
fn slow_link_still_syncs() -> Result<()> {
    let fx = Fixture::new(2 * MIB, SEED + 5)?;
    let (run, _) = sync_through(&fx, Faults::none().delay(Duration::from_millis(2)))?;
    run.expect_success();
    fx.expect_target_matches_volume()?;
    Ok(())
}

#[test]
fn garbage_and_silent_clients_are_dropped_and_the_real_sync_still_completes() -> Result<()> {
    let fx = Fixture::new(4 * MIB, SEED + 6)?;
    sample::write_sample_volume(&fx.target, &SampleSpec::mixed(4 * MIB, SEED + 7))?;
    let before = fx.target_digest()?;
    let mut destination = fx.destination()?;

    // A client that stays connected and silent for the whole sync, and one speaking garbage.
    let silent = TcpStream::connect(destination.addr)?;
    let mut client = TcpStream::connect(destination.addr)?;
    client.set_read_timeout(Some(AGENT_TIMEOUT))?;
    let garbage = b"this is not tls, it is a hostile client speaking nonsense\r\n".repeat(64);
    let _ = client.write_all(&garbage); // the destination may hang up before reading it all
    let _ = client.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply); // an alert, EOF or a reset: the garbage was handled
    assert!(
        !fx.destination_status.exists(),
        "a connection that never authenticated must not start a sync"
    );
    assert_eq!(
        fx.target_digest()?,
        before,
        "target changed after a garbage connection"
    );

    let source = fx.source(destination.addr)?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    drop(silent);
    assert!(
        source.status.success() && finished.status.success(),
        "the real sync must complete:\n{}\n{}",
        String::from_utf8_lossy(&source.stderr),
        finished.stderr
    );
    assert!(
        finished.stderr.contains("dropped before authentication"),
        "the garbage connection is logged: {}",
        finished.stderr
    );
    fx.expect_target_matches_volume()?;
    crate::common::expect_successful(&fx.destination_status, Kind::Destination)?;
    Ok(())
}
