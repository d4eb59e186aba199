//! Finding 2: a peer that is alive but frozen (SIGSTOP: a paused pod or VM) must fail the sync within the idle
//! timeout, on both sides; it must never hang the other agent.
//!
//! Each test freezes one agent once the destination has applied [`UNDER_WAY`] bytes of a full sync of a random
//! volume (its `blockmover_data_bytes_total`, scraped over HTTP, counts the sync under way). By then the
//! destination has asked for far more chunks than the socket buffers hold, so a source facing a frozen destination
//! has DATA it cannot deliver: its writer is blocked on a zero TCP window, the case that hung. Both phase timeouts
//! are [`IDLE`], so whatever phase the frozen peer left the other one in, the contract's bound (`IDLE` + a few
//! seconds) applies; the tests allow `IDLE` + [`MARGIN`].

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use super::{condition, finish_destination, Frozen, RETRYABLE, WAIT};
use crate::common::metrics::{metric, scrape};
use crate::common::{
    expect_failed, expect_successful, read_status, result_of, run_source_with, wait_until,
    Destination, Ended, Fixture, Running, AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
/// `--idle-timeout` and `--handshake-timeout` of both agents, in seconds.
const IDLE: u64 = 3;
/// What the contract allows past the idle timeout, with room for a loaded machine.
const MARGIN: Duration = Duration::from_secs(15);
/// Bytes the destination has applied when the peer is frozen.
const UNDER_WAY: f64 = (16 * MIB) as f64;
/// The phase timeouts of both agents.
const FLAGS: [&str; 4] = ["--idle-timeout", "3", "--handshake-timeout", "3"];

/// The deadline the contract gives the agent facing a frozen peer.
fn bound() -> Duration {
    Duration::from_secs(IDLE) + MARGIN
}

/// What a timed-out agent must say (the error line, the status condition).
fn timed_out() -> String {
    format!("timed out after {IDLE}s")
}

/// A destination with [`FLAGS`], metrics and `extra`, and a source running a full sync into it; returns once the
/// destination has applied [`UNDER_WAY`] bytes.
fn sync_under_way(fx: &Fixture, extra: &[&str]) -> Result<(Destination, Running)> {
    let mut flags = FLAGS.to_vec();
    flags.extend(["--metrics-listen", "127.0.0.1:0"]);
    flags.extend(extra);
    let destination = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &flags)?;
    let metrics = destination.metrics.context("no metrics address")?;
    let mut source = Running::source(destination.addr, fx, &FLAGS)?;
    wait_until("the destination applies data", WAIT, || {
        ensure!(
            !source.exited()?,
            "the source ended before the sync was under way"
        );
        let applied = metric(&scrape(metrics)?, "blockmover_data_bytes_total", None);
        Ok(applied.unwrap_or(0.0) >= UNDER_WAY)
    })?;
    Ok((destination, source))
}

/// How the agent `who` facing its frozen `peer` must have ended: within [`bound`] (not killed at the limit), exit 75,
/// its `error: ` line naming the timeout ([`timed_out`]), and its status at `status` Failed with condition `Error`
/// naming it too, without a lastSyncTime.
fn expect_timed_out(ended: &Ended, who: &str, peer: &str, status: &Path, kind: Kind) -> Result<()> {
    ensure!(
        ended.status.is_some(),
        "the {who} was still running {:?} after the {peer} was frozen (idle timeout {IDLE}s); stderr:\n{}",
        ended.waited,
        ended.stderr
    );
    println!(
        "{who} facing a frozen {peer} ended after {:?}: {}",
        ended.waited,
        ended.error_line()
    );
    ensure!(
        ended.code() == Some(RETRYABLE),
        "{who} exit {:?}:\n{}",
        ended.status,
        ended.stderr
    );
    ensure!(
        ended.error_line().contains(&timed_out()),
        "the {who}'s error does not name the timeout: {:?}",
        ended.error_line()
    );
    let status = expect_failed(status, kind)?;
    let (reason, message) = condition(&status);
    ensure!(
        reason == "Error" && message.contains(&timed_out()),
        "{status:#}"
    );
    ensure!(status.get("lastSyncTime").is_none(), "{status:#}");
    Ok(())
}

/// Finding 2: with the destination frozen mid-sync (its TCP window closed, nothing read or sent), the source exits
/// 75 within the idle timeout plus a margin, saying `timed out after 3s`, and records Failed with that reason.
#[test]
fn a_frozen_destination_fails_the_source_within_the_idle_timeout() -> Result<()> {
    let fx = Fixture::random(128 * MIB, 0x2f_0001)?;
    let (destination, source) = sync_under_way(&fx, &[])?;
    let frozen = Frozen::stop(destination.child.id())?;
    let ended = source.finish(bound())?;
    drop(frozen);
    expect_timed_out(
        &ended,
        "source",
        "destination",
        &fx.source_status,
        Kind::Source,
    )
}

/// Finding 2, the other way: with the source frozen mid-sync, a one-shot destination exits 75 within the idle
/// timeout plus a margin and records Failed naming the timeout, without a lastSyncTime.
#[test]
fn a_frozen_source_fails_a_one_shot_destination_within_the_idle_timeout() -> Result<()> {
    let fx = Fixture::random(64 * MIB, 0x2f_0002)?;
    let (destination, source) = sync_under_way(&fx, &[])?;
    let frozen = Frozen::stop(source.id())?;
    let mut destination = destination;
    let ended = finish_destination(&mut destination, bound())?;
    drop(frozen);
    expect_timed_out(
        &ended,
        "destination",
        "source",
        &fx.destination_status,
        Kind::Destination,
    )
}

/// Finding 2 with `--serve`: a frozen source's session fails within the bound (status Failed naming the
/// timeout), the destination keeps serving, and a fresh source then syncs: target == volume.
#[test]
fn a_frozen_source_does_not_stop_a_serving_destination_and_a_fresh_source_syncs() -> Result<()> {
    let fx = Fixture::random(64 * MIB, 0x2f_0003)?;
    let (mut destination, source) = sync_under_way(&fx, &["--serve"])?;
    let frozen = Frozen::stop(source.id())?;
    let start = std::time::Instant::now();
    let failed = || -> Result<bool> {
        // The status is replaced by rename: a read sees the old document or the new one.
        Ok(result_of(&read_status(&fx.destination_status)?) == "Failed")
    };
    while !failed()? {
        ensure!(
            destination.child.try_wait()?.is_none(),
            "the serving destination exited: {}",
            destination.wait(AGENT_TIMEOUT)?.stderr
        );
        ensure!(
            start.elapsed() < bound(),
            "the serving destination's status is not Failed {:?} after the source was frozen: {:#}",
            start.elapsed(),
            read_status(&fx.destination_status)?
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "serving destination recorded the frozen source's failure after {:?}",
        start.elapsed()
    );
    let status = expect_failed(&fx.destination_status, Kind::Destination)?;
    ensure!(condition(&status).1.contains(&timed_out()), "{status:#}");
    // The frozen source is continued and killed; a fresh one retries.
    drop(frozen);
    drop(source);
    let retry = run_source_with(
        destination.addr,
        &fx.volume,
        &fx.psk,
        &fx.source_status,
        &FLAGS,
    )?;
    ensure!(
        retry.status.success(),
        "the fresh source failed: {}",
        String::from_utf8_lossy(&retry.stderr)
    );
    ensure!(
        destination.child.try_wait()?.is_none(),
        "a --serve destination exited"
    );
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    Ok(())
}
