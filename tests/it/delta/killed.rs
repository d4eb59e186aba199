//! Issue 11, case 6: `kill -9` of either agent during a delta sync, then the retry with the same state
//! directories. What must hold: the destination's manifest is gone as soon as it wrote anything (so a retry after
//! a partial write is a full comparison), a retry whose destination wrote nothing may be a delta, and the retry
//! always ends Successful with target == volume.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use anyhow::Result;

use super::policy::Served;
use super::{scribble_chunks, Pair, CHUNK, DESTINATION_NO_MANIFEST, MIB, SOURCE_NO_MANIFEST};
use crate::common::proxy::{Faults, Proxy};
use crate::common::{
    expect_failed, read_block, signal, wait_until, Destination, Ended, Finished, Running,
    AGENT_TIMEOUT,
};
use crate::schema::Kind;

/// 512 chunks of random data.
const VOLUME: u64 = 32 * MIB;
/// Exit code of a failure a retry may cure.
const RETRYABLE: i32 = 75;

/// A pair after a full sync, with every fourth chunk of its volume rewritten (8 MiB: the next sync is a delta
/// that sends a quarter of the volume).
fn prepared(seed: u64, round: u64) -> Result<Pair> {
    let p = Pair::new(VOLUME, seed)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    change(&p, round)?;
    Ok(p)
}

/// Rewrites every fourth chunk (shifted by `round`).
fn change(p: &Pair, round: u64) -> Result<()> {
    let chunks: Vec<u64> = (0..p.size() / CHUNK)
        .filter(|c| c % 4 == round % 4)
        .collect();
    scribble_chunks(&p.fx.volume, &chunks, 1000 + round)?;
    Ok(())
}

/// A delta sync of `p` through a proxy with `up` faults on the source's stream.
struct Underway {
    destination: Destination,
    proxy: Proxy,
    source: Running,
}

fn underway(p: &Pair, up: Faults) -> Result<Underway> {
    underway_with(p, up, &[])
}

/// [`underway`] with extra source flags.
fn underway_with(p: &Pair, up: Faults, source_flags: &[&str]) -> Result<Underway> {
    let destination = Destination::spawn(
        &p.fx.target,
        &p.fx.psk,
        &p.fx.destination_status,
        &["--state-dir", &p.sb],
    )?;
    let proxy = Proxy::start(destination.addr, up, Faults::none())?;
    let mut flags = vec!["--state-dir", p.sa.as_str()];
    flags.extend_from_slice(source_flags);
    let source = Running::source(proxy.addr(), &p.fx, &flags)?;
    Ok(Underway {
        destination,
        proxy,
        source,
    })
}

/// Waits (a safety net) until the destination removed its manifest: it is about to write, or wrote.
fn wait_invalidated(p: &Pair) -> Result<()> {
    wait_until(
        "the destination's manifest is removed",
        Duration::from_secs(30),
        || Ok(!p.destination_manifest().exists()),
    )
}

/// The retry: Successful, target == volume, a full comparison because the destination's manifest is gone; then a
/// delta again.
fn retry_is_full(p: &Pair) -> Result<()> {
    assert!(!p.destination_manifest().exists());
    assert!(
        p.source_manifest().is_file(),
        "the source keeps its last manifest"
    );
    let out = p.sync(&[], &[])?;
    out.expect_full(DESTINATION_NO_MANIFEST);
    out.expect_whole_target_read();
    println!("retry: {} ({})", out.kind(), out.reason());
    change(p, 1)?;
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    Ok(())
}

/// The destination is killed while the source's stream is stalled a quarter into the data of a delta it has been
/// writing: the source fails retryably, the destination's manifest is gone, the retry is full and correct.
#[test]
fn a_destination_killed_during_a_delta_leaves_no_manifest_and_the_retry_is_full() -> Result<()> {
    let p = prepared(0xde6_0001, 0)?;
    let mut u = underway(&p, Faults::none().stall_at(2 * MIB))?;
    u.proxy.wait_stalled(AGENT_TIMEOUT)?;
    wait_invalidated(&p)?;
    u.destination.child.kill()?;
    let killed = u.destination.wait(AGENT_TIMEOUT)?;
    assert_eq!(killed.status.signal(), Some(9), "{}", killed.stderr);
    u.proxy.close();
    let ended = u.source.finish(AGENT_TIMEOUT)?;
    println!("source: {:?} {}", ended.code(), ended.error_line());
    assert_eq!(ended.code(), Some(RETRYABLE), "{}", ended.stderr);
    expect_failed(&p.fx.source_status, Kind::Source)?;
    assert_ne!(
        p.fx.target_digest()?,
        p.fx.volume_digest()?,
        "the kill left a partial delta"
    );
    retry_is_full(&p)
}

/// The source is killed in the same place: the destination fails the session, its manifest is gone, the retry is
/// full and correct.
#[test]
fn a_source_killed_during_a_delta_leaves_no_destination_manifest_and_the_retry_is_full(
) -> Result<()> {
    let p = prepared(0xde6_0002, 0)?;
    let mut u = underway(&p, Faults::none().stall_at(2 * MIB))?;
    u.proxy.wait_stalled(AGENT_TIMEOUT)?;
    wait_invalidated(&p)?;
    signal("KILL", u.source.id())?;
    let ended = u.source.finish(AGENT_TIMEOUT)?;
    assert_eq!(ended.status.and_then(|s| s.signal()), Some(9));
    u.proxy.close();
    let failed = u.destination.wait(AGENT_TIMEOUT)?;
    println!("destination: {:?} {}", failed.code(), failed.error_line());
    assert!(!failed.status.success(), "{}", failed.stderr);
    expect_failed(&p.fx.destination_status, Kind::Destination)?;
    assert!(
        !std::path::Path::new(&p.sb)
            .join("destination.manifest.aside")
            .exists(),
        "a session that failed after it wrote drops the base it set aside"
    );
    retry_is_full(&p)
}

/// How one interrupted sync ended.
fn report(what: &str, ended: &Ended, other: &Finished) {
    println!(
        "{what}: source {:?} {} / destination {:?} {}",
        ended.code(),
        ended.error_line(),
        other.code(),
        other.error_line()
    );
}

/// Kills at varied points of delta syncs, either agent: whatever the point, the retry ends Successful with
/// target == volume, and it is a delta exactly when the destination's manifest survived (the destination wrote
/// nothing), a full comparison otherwise.
#[test]
fn kills_at_any_point_of_a_delta_never_leave_a_wrong_target() -> Result<()> {
    let p = prepared(0xde6_0003, 0)?;
    // From the handshake to most of the 8 MiB of data.
    let points = [600, 6 * 1024, 512 * 1024, 5 * MIB];
    let mut round = 0;
    for (i, at) in points.into_iter().enumerate() {
        for kill_destination in [true, false] {
            let what = format!(
                "{} killed after {at} bytes",
                if kill_destination {
                    "destination"
                } else {
                    "source"
                }
            );
            let mut u = underway(&p, Faults::none().mark_at(at))?;
            u.proxy.wait_marked(AGENT_TIMEOUT)?;
            if kill_destination {
                u.destination.child.kill()?;
                let killed = u.destination.wait(AGENT_TIMEOUT)?;
                u.proxy.close();
                let ended = u.source.finish(AGENT_TIMEOUT)?;
                report(&what, &ended, &killed);
                assert!(
                    !matches!(ended.code(), Some(0)),
                    "{what}: the source succeeded"
                );
            } else {
                signal("KILL", u.source.id())?;
                let ended = u.source.finish(AGENT_TIMEOUT)?;
                u.proxy.close();
                let finished = u.destination.wait(AGENT_TIMEOUT)?;
                report(&what, &ended, &finished);
                // The source may have died after the destination committed (then its own manifest is the old one
                // and the next sync finds the bases differ); a destination that finished is Successful and right.
                if finished.status.success() {
                    p.fx.expect_target_matches_volume()?;
                }
            }
            let manifest_survived = p.destination_manifest().exists();
            let retry = p.sync(&[], &[])?;
            println!(
                "{what}: destination manifest survived: {manifest_survived}; retry {} ({})",
                retry.kind(),
                retry.reason()
            );
            if manifest_survived && retry.kind() == "full" {
                assert!(
                    retry.reason().contains("different images"),
                    "{what}: a surviving destination manifest gives a delta or bases that differ: {}",
                    retry.describe()
                );
            } else if manifest_survived {
                retry.expect_delta("delta-manifest");
            } else {
                retry.expect_full(DESTINATION_NO_MANIFEST);
            }
            round += 1;
            change(&p, round + i as u64)?;
        }
    }
    Ok(())
}

/// A serving destination without `--state-dir` keeps its manifest in memory; a delta cut short after it wrote
/// drops that manifest too (the process lives on): the retry into the same process is full and correct.
#[test]
fn a_delta_cut_short_into_a_serving_destination_drops_its_memory_manifest() -> Result<()> {
    let p = Pair::new(VOLUME, 0xde6_0004)?;
    let mut served = Served::spawn(&p, &[])?;
    served.sync(&[])?.expect_full(SOURCE_NO_MANIFEST);
    change(&p, 0)?;

    let proxy = Proxy::start(
        served.destination.addr,
        Faults::none().stall_at(2 * MIB),
        Faults::none(),
    )?;
    let source = Running::source(proxy.addr(), &p.fx, &["--state-dir", &p.sa])?;
    proxy.wait_stalled(AGENT_TIMEOUT)?;
    // Chunk 0 is the first one the delta rewrites: once the target holds it, the destination has written.
    wait_until(
        "the destination wrote chunk 0",
        Duration::from_secs(30),
        || Ok(read_block(&p.fx.target, 0)? == read_block(&p.fx.volume, 0)?),
    )?;
    proxy.close();
    let ended = source.finish(AGENT_TIMEOUT)?;
    println!("source: {:?} {}", ended.code(), ended.error_line());
    assert_eq!(ended.code(), Some(RETRYABLE), "{}", ended.stderr);
    assert!(
        served.destination.child.try_wait()?.is_none(),
        "the destination serves on"
    );

    let retry = served.sync(&[])?;
    println!("retry: {} ({})", retry.kind(), retry.reason());
    retry.expect_full(DESTINATION_NO_MANIFEST);
    change(&p, 1)?;
    served.sync(&[])?.expect_delta("delta-manifest");
    served.stop()?;
    Ok(())
}

/// A delta by change list whose destination is killed after it wrote: the retry, given the same (true) change
/// list, is a full comparison (the destination's manifest is gone) that finds no chunk the list missed.
#[test]
fn a_change_list_delta_killed_then_retried_with_the_same_list_reports_no_missed_chunks(
) -> Result<()> {
    let p = Pair::new(VOLUME, 0xde6_0005)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let chunks: Vec<u64> = (0..p.size() / CHUNK).filter(|c| c % 4 == 2).collect();
    let extents = super::scribble_chunks(&p.fx.volume, &chunks, 77)?;
    let list = super::change_list(p.fx.dir.path(), "changes.json", &extents)?;
    let flags = ["--changed-extents", list.as_str()];

    let mut u = underway_with(&p, Faults::none().stall_at(2 * MIB), &flags)?;
    u.proxy.wait_stalled(AGENT_TIMEOUT)?;
    wait_invalidated(&p)?;
    u.destination.child.kill()?;
    u.destination.wait(AGENT_TIMEOUT)?;
    u.proxy.close();
    let ended = u.source.finish(AGENT_TIMEOUT)?;
    assert_eq!(ended.code(), Some(RETRYABLE), "{}", ended.stderr);

    let retry = p.sync(&flags, &[])?;
    retry.expect_full(DESTINATION_NO_MANIFEST);
    assert!(
        super::text(&retry.source, "changeListMissedChunks").is_none(),
        "a true change list missed nothing: {}",
        retry.describe()
    );
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    Ok(())
}
