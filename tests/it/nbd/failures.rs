//! An export that goes away (`kill -9 qemu-nbd`) or freezes (`SIGSTOP`) during a sync: the source exits 75
//! (retryable) with one error line naming the export, its status is Failed, and the destination does not report
//! the target synced.

use std::time::Duration;

use anyhow::Result;

use super::{qemu_tools, Image, Watched, MIB};
use crate::common::{
    error_line, expect_failed, read_status, result_of, signal, Destination, AGENT_TIMEOUT,
};
use crate::schema::Kind;

/// How an interrupted sync ended: the source's exit code, how long it took to exit after the signal, its log.
type Interrupted = (Option<i32>, Duration, String, Image);

/// Starts a sync of a 256 MiB fully written image, waits until its scan starts, then does `act` to the export.
fn interrupted(act: &str, source_flags: &[&str]) -> Result<Option<Interrupted>> {
    if !qemu_tools() {
        return Ok(None);
    }
    let mut img = Image::new(256 * MIB)?;
    img.write(&[(0x11, 0, 128 * MIB), (0x22, 128 * MIB, 128 * MIB)])?;
    img.serve(None)?;
    let mut destination = Destination::spawn(&img.target, &img.psk, &img.destination_status, &[])?;
    let mut source = Watched::source(destination.addr, &img.uri(), &img, source_flags)?;
    source.wait_for("full comparison:", AGENT_TIMEOUT)?;
    signal(act, img.server_pid()?)?;
    let (code, waited, log) = source.finish(AGENT_TIMEOUT)?;
    let _ = destination.wait(AGENT_TIMEOUT)?;
    Ok(Some((code, waited, log, img)))
}

fn expect_retryable_failure(code: Option<i32>, log: &str, img: &Image) -> Result<()> {
    assert_eq!(code, Some(75), "{log}");
    let line = error_line(log);
    assert!(
        line.contains(&format!("nbd export {}", img.uri())),
        "{line}\n{log}"
    );
    assert_eq!(
        log.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "{log}"
    );
    expect_failed(&img.source_status, Kind::Source)?;
    if img.destination_status.exists() {
        let destination = read_status(&img.destination_status)?;
        assert_ne!(result_of(&destination), "Successful", "{destination:#}");
    }
    Ok(())
}

#[test]
fn an_export_killed_during_a_sync_fails_the_source_retryably() -> Result<()> {
    let Some((code, _, log, img)) = interrupted("KILL", &[])? else {
        return Ok(());
    };
    expect_retryable_failure(code, &log, &img)?;
    Ok(())
}

#[test]
fn a_frozen_export_fails_the_source_within_its_timeout() -> Result<()> {
    let Some((code, waited, log, img)) = interrupted("STOP", &["--idle-timeout", "3"])? else {
        return Ok(());
    };
    expect_retryable_failure(code, &log, &img)?;
    assert!(error_line(&log).contains("frozen"), "{log}");
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    Ok(())
}

#[test]
fn a_bad_nbd_uri_or_a_bitmap_without_an_nbd_volume_is_refused_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = crate::common::keygen(dir.path())?;
    let volume = dir.path().join("v.img");
    crate::common::sparse_file(&volume, MIB)?;
    let (psk, volume) = (psk.to_string_lossy(), volume.to_string_lossy());
    for (vol, extra, says) in [
        ("nbd+unix:///disk", &[][..], "needs ?socket=PATH"),
        ("nbds://host/disk", &[][..], "TLS (nbds) is not supported"),
        (
            &*volume,
            &["--dirty-bitmap", "b0"][..],
            "--dirty-bitmap needs an NBD volume",
        ),
    ] {
        let mut args = vec![
            "source",
            "--connect",
            "127.0.0.1:9",
            "--volume",
            vol,
            "--psk",
            &psk,
        ];
        args.extend_from_slice(extra);
        let out = crate::common::run_bin(&args, AGENT_TIMEOUT)?;
        assert_eq!(out.code(), Some(1), "{vol} {extra:?}: {}", out.stderr);
        assert!(out.error_line().contains(says), "{}", out.stderr);
    }
    // A socket nobody serves: retryable (the export may come back).
    let missing = format!(
        "nbd+unix:///disk?socket={}/absent.sock",
        dir.path().display()
    );
    let out = crate::common::run_bin(
        &[
            "source",
            "--connect",
            "127.0.0.1:9",
            "--volume",
            &missing,
            "--psk",
            &psk,
        ],
        AGENT_TIMEOUT,
    )?;
    assert_eq!(out.code(), Some(75), "{}", out.stderr);
    assert!(
        out.error_line()
            .contains(&format!("nbd export {missing}: cannot connect")),
        "{}",
        out.stderr
    );
    Ok(())
}
