//! Finding 3: more idle TCP connections than the destination has file descriptors must not end it. `accept`
//! failing with EMFILE is transient (log, free a descriptor, back off, keep the listener); a destination that
//! exits anyway with a sync under way records Failed, never leaves `SyncInProgress`.
//!
//! The destination's descriptor limit is lowered to [`NOFILE`] once it listens (`prlimit --pid`, util-linux), so a
//! flood of [`FLOOD`] connections that never speak exhausts it. Each connection is then held until the destination
//! closes it (the oldest pending handshake dropped, or `--handshake-timeout 2`): reading EOF or a reset on every
//! one is the synchronisation point, not a sleep.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::{condition, WAIT};
use crate::common::proxy::{Faults, Proxy};
use crate::common::{expect_successful, read_status, Destination, Fixture, Running, AGENT_TIMEOUT};
use crate::schema::Kind;

const MIB: u64 = 1 << 20;
/// The destination's RLIMIT_NOFILE (soft and hard).
const NOFILE: u32 = 64;
/// Idle connections opened at once: about three times the limit.
const FLOOD: usize = 200;
/// The destination's handshake timeout: how long an idle connection may hold a descriptor.
const HANDSHAKE: [&str; 2] = ["--handshake-timeout", "2"];

/// Lowers the descriptor limit of `pid` to [`NOFILE`] and checks that it took effect. `Ok(Err(reason))` when this
/// machine cannot (no `prlimit`).
fn limit_descriptors(pid: u32) -> Result<std::result::Result<(), String>> {
    let out = match Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .output()
    {
        Ok(out) => out,
        Err(e) => return Ok(Err(format!("cannot run prlimit (util-linux): {e}"))),
    };
    ensure!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no `Max open files` in /proc/PID/limits")?;
    let values: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    ensure!(values == [NOFILE.to_string(), NOFILE.to_string()], "{line}");
    Ok(Ok(()))
}

/// A destination for `fx` with [`HANDSHAKE`] and `extra` flags whose descriptors are limited to [`NOFILE`]; None
/// (the test is skipped, as printed) when this machine cannot limit them.
fn limited_destination(fx: &Fixture, extra: &[&str]) -> Result<Option<Destination>> {
    let mut flags = extra.to_vec();
    flags.extend(HANDSHAKE);
    let destination = Destination::spawn(&fx.target, &fx.psk, &fx.destination_status, &flags)?;
    if let Err(reason) = limit_descriptors(destination.child.id())? {
        println!("skipped: {reason}");
        return Ok(None);
    }
    Ok(Some(destination))
}

/// Opens up to `n` TCP connections to `addr` that never send a byte (the kernel completes them from the backlog,
/// whether the destination accepts them or not); stops at the first refused one (the destination is gone).
fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(n);
    for i in 0..n {
        match TcpStream::connect(addr) {
            Ok(tcp) => connections.push(tcp),
            Err(e) => {
                println!("idle connection {i} to {addr} failed: {e}");
                break;
            }
        }
    }
    connections
}

/// Waits until the peer has closed every connection (EOF or a reset); fails after [`WAIT`].
fn wait_all_closed(connections: Vec<TcpStream>) -> Result<Duration> {
    let start = Instant::now();
    let deadline = start + WAIT;
    for (i, mut tcp) in connections.into_iter().enumerate() {
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "idle connection {i} still open after {WAIT:?}"
            );
            tcp.set_read_timeout(Some(left))?;
            match tcp.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {} // a TLS alert, say: the close follows
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break, // reset
            }
        }
    }
    Ok(start.elapsed())
}

/// Opens [`FLOOD`] idle connections to the destination at `addr` ([`idle_connections`]) and waits until it has
/// closed every one ([`wait_all_closed`]); returns how many could be opened.
fn flood(addr: SocketAddr) -> Result<usize> {
    let connections = idle_connections(addr, FLOOD);
    let opened = connections.len();
    let closed = wait_all_closed(connections)?;
    println!("{opened} of {FLOOD} idle connections opened, all closed by the destination within {closed:?}");
    Ok(opened)
}

/// After a flood of which `opened` connections could be opened and a sync: all [`FLOOD`] were opened, target ==
/// volume, and the destination's status says Successful.
fn expect_flooded_and_synced(fx: &Fixture, opened: usize) -> Result<()> {
    ensure!(
        opened == FLOOD,
        "only {opened} of {FLOOD} connections could be opened"
    );
    fx.expect_target_matches_volume()?;
    expect_successful(&fx.destination_status, Kind::Destination)?;
    Ok(())
}

/// Finding 3: a one-shot destination waiting for its source, flooded with three times its descriptor limit of
/// idle connections, stays alive; once they are closed a real source syncs and the destination exits 0. Its log
/// shows the accept error was met (`Too many open files`), so the flood really exhausted the descriptors.
#[test]
fn descriptor_exhaustion_does_not_end_a_waiting_destination() -> Result<()> {
    let fx = Fixture::new(8 * MIB, 0x3f_0001)?;
    let Some(mut destination) = limited_destination(&fx, &[])? else {
        return Ok(());
    };
    let opened = flood(destination.addr)?;
    // The probe that the destination survived: the sync it waits for. (Its exit is only certain once it is
    // reaped, which can come just after its sockets closed: checking before the sync would race.)
    let run = fx.sync_into(&mut destination, &[])?;
    run.ensure_success()
        .with_context(|| format!("the sync after {opened} idle connections failed"))?;
    expect_flooded_and_synced(&fx, opened)?;
    ensure!(
        run.destination.stderr.contains("Too many open files"),
        "the flood never exhausted the descriptors (no accept error logged):\n{}",
        run.destination.stderr
    );
    Ok(())
}

/// Finding 3, mid-sync: a `--serve` destination whose sync is held half-way by a stalled proxy is flooded the same
/// way. Whatever happens, its status is never left `SyncInProgress` by an exit; and it must not exit: once the
/// flood is closed and the proxy released, the held sync completes, target == volume.
#[test]
fn descriptor_exhaustion_during_a_sync_never_leaves_the_status_in_progress() -> Result<()> {
    let fx = Fixture::random(32 * MIB, 0x3f_0002)?;
    let Some(mut destination) = limited_destination(&fx, &["--serve"])? else {
        return Ok(());
    };
    let proxy = Proxy::start(
        destination.addr,
        Faults::none().stall_at(fx.size / 2),
        Faults::none(),
    )?;
    let source = Running::source(proxy.addr(), &fx, &[])?;
    proxy.wait_stalled(AGENT_TIMEOUT)?;
    let held = read_status(&fx.destination_status)?;
    ensure!(condition(&held).0 == "SyncInProgress", "{held:#}");

    let opened = flood(destination.addr)?;
    proxy.release();
    let ended = source.finish(AGENT_TIMEOUT)?;
    // By now a destination that died during the flood has been reaped (the held source saw it go).
    if let Some(exit) = destination.child.try_wait()? {
        let stderr = destination.wait(AGENT_TIMEOUT)?.stderr;
        let left = read_status(&fx.destination_status)?;
        ensure!(
            condition(&left).0 != "SyncInProgress" && left.get("lastSyncStartTime").is_none(),
            "the destination exited ({exit}) and left its status SyncInProgress: {left:#}\n{stderr}"
        );
        bail!("{opened} idle connections ended the serving destination ({exit}):\n{stderr}");
    }
    ensure!(
        ended.code() == Some(0),
        "the held sync failed after the flood ({:?}): {}",
        ended.status,
        ended.stderr
    );
    expect_flooded_and_synced(&fx, opened)?;
    ensure!(
        destination.child.try_wait()?.is_none(),
        "a --serve destination exited"
    );
    Ok(())
}
