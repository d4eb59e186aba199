//! Finding 10: a destination that cannot write its status must say so, with the OS cause: at start-up (exit 1,
//! before `listening on`), and during a session (logged once, and sent to the source in an ABORT, so the source's
//! `error: ` line carries it instead of "Connection reset by peer").
//!
//! The status is made unwritable by removing its directory: the tests run as root, whom file modes do not stop.

use anyhow::{bail, ensure, Result};

use super::{PERMANENT, WAIT};
use crate::common::{
    error_line, read_status, sigterm, Destination, Fixture, Started, AGENT_TIMEOUT,
};

const MIB: u64 = 1 << 20;
/// The OS cause of a missing directory, as `std::io::Error` shows ENOENT.
const ENOENT: &str = "No such file or directory";
/// Sources sent to the destination whose status directory vanished.
const SESSIONS: usize = 2;

/// Finding 10, during a session: a `--serve` destination whose status directory was removed after start-up
/// refuses each sync with the status error and its OS cause, which each source shows in its `error: ` line (and
/// its own status); the destination logs it once per session.
#[test]
fn a_serving_destination_whose_status_directory_vanished_tells_each_source_why() -> Result<()> {
    let fx = Fixture::new(4 * MIB, 0x10f_0001)?;
    let dir = fx.dir.path().join("status");
    std::fs::create_dir(&dir)?;
    let status = dir.join("destination-status.json");
    let mut destination = Destination::spawn(&fx.target, &fx.psk, &status, &["--serve"])?;
    std::fs::remove_dir_all(&dir)?;

    for n in 1..=SESSIONS {
        let out = fx.source(destination.addr)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = error_line(&stderr);
        println!(
            "source {n} against a destination without a status directory ({}): {line}",
            out.status
        );
        ensure!(!out.status.success(), "source {n} succeeded: {stderr}");
        ensure!(
            line.contains("status") && line.contains(ENOENT) && !line.contains("reset by peer"),
            "source {n} is not told why the destination refused the sync: {line:?}"
        );
        let own = read_status(&fx.source_status)?;
        ensure!(
            own.to_string().contains(ENOENT),
            "source {n} status: {own:#}"
        );
        ensure!(
            destination.child.try_wait()?.is_none(),
            "the serving destination exited"
        );
    }
    sigterm(destination.child.id())?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    let path = status.display().to_string();
    let logged: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains(&path) && l.contains(ENOENT))
        .collect();
    ensure!(
        logged.len() == SESSIONS,
        "the status error is logged {} times for {SESSIONS} sessions (once each wanted):\n{}",
        logged.len(),
        finished.stderr
    );
    Ok(())
}

/// Finding 10, at start-up: a destination (one-shot or `--serve`) whose status directory does not exist exits 1
/// before printing `listening on`, and its `error: ` line names the status file and the OS cause.
#[test]
fn a_destination_whose_status_directory_is_missing_exits_1_before_listening() -> Result<()> {
    let fx = Fixture::new(MIB, 0x10f_0002)?;
    let status = fx
        .dir
        .path()
        .join("missing")
        .join("destination-status.json");
    for extra in [&[][..], &["--serve"][..]] {
        let ended = match Destination::start(&fx.target, &fx.psk, &status, extra)? {
            Started::Exited(ended) => ended,
            // `listening on` means it did not check the status.
            Started::Listening(mut listening) => {
                let _ = listening.child.kill();
                bail!(
                    "destination {extra:?} listened without a writable status directory:\n{}",
                    listening.wait(WAIT)?.stderr
                );
            }
        };
        let line = ended.error_line();
        println!(
            "destination {extra:?} without a status directory ({:?}): {line}",
            ended.status
        );
        ensure!(
            ended.code() == Some(PERMANENT),
            "exit {:?}: {}",
            ended.status,
            ended.stderr
        );
        ensure!(
            line.contains("cannot write status file")
                && line.contains(&status.display().to_string())
                && line.contains(ENOENT),
            "{line:?}"
        );
    }
    Ok(())
}
