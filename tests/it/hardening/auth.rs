//! Finding 4: a connection that has not proved the key changes nothing on the destination: not its status file,
//! not its sync metrics, not the process. It is counted in `blockmover_rejected_connections_total{reason="auth"}`;
//! the source holding the wrong key still fails at once (exit 1, "keys do not match"), where the misconfiguration
//! is seen.
//!
//! After each wrong-key source the test waits for the rejection counter to reach the number of rejections so far
//! (or for the status file to change, which would be the bug): a read of the status before the destination has
//! handled the connection would prove nothing.

use std::process::Output;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::{PERMANENT, WAIT};
use crate::common::metrics::{metric, rejected, scrape};
use crate::common::{
    error_line, expect_successful, file_bytes, keygen_named, read_status, run_source, wait_until,
    Destination, Fixture, AGENT_TIMEOUT,
};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
/// Wrong-key sources against the serving destination.
const INTRUDERS: u32 = 3;

/// A source with the fixture's volume and `key`, its own status file, to completion.
fn source_with_key(
    fx: &Fixture,
    addr: std::net::SocketAddr,
    key: &std::path::Path,
) -> Result<Output> {
    run_source(
        addr,
        &fx.volume,
        key,
        &fx.dir.path().join("intruder-status.json"),
    )
}

/// The wrong-key source failed at once, permanently, saying why.
fn refused_permanently(out: &Output) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(PERMANENT),
        "wrong-key source exit {}: {stderr}",
        out.status
    );
    ensure!(
        error_line(&stderr).contains("keys do not match"),
        "wrong-key source: {:?}",
        error_line(&stderr)
    );
    Ok(())
}

/// `volsync_volume_out_of_sync` of the agent serving metrics at `addr`.
fn out_of_sync(addr: std::net::SocketAddr) -> Result<f64> {
    metric(&scrape(addr)?, "volsync_volume_out_of_sync", None)
        .context("volsync_volume_out_of_sync missing")
}

/// Finding 4: after a good sync on a `--serve` destination, repeated wrong-key sources each exit 1 with "keys do
/// not match", while the destination's status stays exactly as the good sync left it (Successful, same
/// lastSyncTime), `volsync_volume_out_of_sync` stays 0 and `blockmover_rejected_connections_total{reason="auth"}`
/// counts each of them. The destination then still serves a source with the right key.
#[test]
fn a_wrong_key_never_changes_a_serving_destinations_status_or_metrics() -> Result<()> {
    let fx = Fixture::new(4 * MIB, 0x4f_0001)?;
    let flags = ["--serve", "--metrics-listen", "127.0.0.1:0"];
    let mut destination = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &flags)?;
    let metrics = destination.metrics.context("no metrics address")?;
    let good = fx.source(destination.addr)?;
    ensure!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let synced: Value = expect_successful(&fx.destination_status, Kind::Destination)?;
    ensure!(
        out_of_sync(metrics)? == 0.0,
        "out of sync after a good sync"
    );

    let wrong = keygen_named(fx.dir.path(), "other-psk.txt")?;
    for n in 1..=INTRUDERS {
        refused_permanently(&source_with_key(&fx, destination.addr, &wrong)?)?;
        wait_until(
            "the destination handles the wrong-key connection",
            WAIT,
            || {
                Ok(rejected(metrics, "auth")? >= f64::from(n)
                    || read_status(&fx.destination_status)? != synced)
            },
        )?;
        let now = read_status(&fx.destination_status)?;
        ensure!(
            now == synced,
            "wrong-key connection {n} changed the destination's status:\nbefore {synced:#}\nafter {now:#}"
        );
        ensure!(
            out_of_sync(metrics)? == 0.0,
            "wrong-key connection {n} set volsync_volume_out_of_sync"
        );
        ensure!(
            destination.child.try_wait()?.is_none(),
            "a wrong key ended the destination"
        );
    }
    let counted = rejected(metrics, "auth")?;
    ensure!(
        counted == f64::from(INTRUDERS),
        "{counted} auth rejections counted"
    );

    let again = fx.source(destination.addr)?;
    ensure!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    ensure!(out_of_sync(metrics)? == 0.0);
    Ok(())
}

/// Finding 4, one-shot: a wrong-key source against a destination waiting for its one sync exits 1, and the
/// destination keeps waiting (status file as it was after start-up); the right-key source then syncs and the destination exits 0.
#[test]
fn a_wrong_key_does_not_end_a_waiting_one_shot_destination() -> Result<()> {
    let fx = Fixture::new(4 * MIB, 0x4f_0002)?;
    let flags = ["--metrics-listen", "127.0.0.1:0"];
    let mut destination = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &flags)?;
    let metrics = destination.metrics.context("no metrics address")?;
    let untouched = file_bytes(&fx.destination_status)?;
    let wrong = keygen_named(fx.dir.path(), "other-psk.txt")?;
    refused_permanently(&source_with_key(&fx, destination.addr, &wrong)?)?;
    wait_until(
        "the destination handles the wrong-key connection",
        WAIT,
        || Ok(destination.child.try_wait()?.is_some() || rejected(metrics, "auth")? >= 1.0),
    )?;
    if let Some(exit) = destination.child.try_wait()? {
        let stderr = destination.wait(AGENT_TIMEOUT)?.stderr;
        anyhow::bail!("a wrong-key source ended the waiting destination ({exit}):\n{stderr}");
    }
    ensure!(
        file_bytes(&fx.destination_status)? == untouched,
        "a connection that never proved the key changed the status: {:#}",
        read_status(&fx.destination_status)?
    );

    fx.sync_into(&mut destination, &[])?.ensure_success()?;
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    expect_successful(&fx.source_status, Kind::Source)?;
    Ok(())
}
