//! Temporary files that follow no symlink, the status directory checked at start-up, key-file messages, flag
//! ranges, and a target or status file checked before listening.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::{MIB, PROMPT};
use crate::common::{
    error_line, expect_successful, keygen, run_bin, run_source, run_source_with, Destination,
    Started, AGENT_TIMEOUT,
};
use crate::schema::Kind;

#[test]
fn planted_tmp_symlinks_are_not_followed_by_status_and_trigger_writes() -> Result<()> {
    let fx = crate::common::Fixture::new(4 * MIB, 0x10ca_0031)?;
    let victim = fx.dir.path().join("victim");
    std::fs::write(&victim, b"precious\n")?;
    let plant = |file: &Path, suffix: &str| -> Result<()> {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        std::os::unix::fs::symlink(&victim, PathBuf::from(name))?;
        Ok(())
    };
    plant(&fx.destination_status, ".tmp")?;
    plant(&fx.source_status, ".tmp")?;
    plant(&fx.source_status, ".trigger.tmp")?;
    let run = fx.sync()?;
    run.expect_success();
    expect_successful(&fx.destination_status, Kind::Destination)?;
    expect_successful(&fx.source_status, Kind::Source)?;
    let args: [&OsStr; 3] = [
        "trigger".as_ref(),
        fx.source_status.as_os_str(),
        "t-1".as_ref(),
    ];
    let exit = run_bin(&args, PROMPT)?;
    assert!(exit.status.success(), "{}", exit.stderr);
    assert_eq!(
        std::fs::read_to_string(fx.dir.path().join("source-status.json.trigger"))?.trim(),
        "t-1"
    );
    assert_eq!(
        std::fs::read(&victim)?,
        b"precious\n",
        "the victim was written"
    );
    let mode = std::fs::metadata(&fx.destination_status)?
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644, "the status file holds no secret");
    Ok(())
}

#[test]
fn keygen_force_replaces_a_world_readable_key_with_a_new_private_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("psk.txt");
    let old = format!("volsync:{}\n", "ab".repeat(64));
    std::fs::write(&out, &old)?;
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o666))?;
    let keygen = |force: bool| {
        let mut args: Vec<&OsStr> = vec!["keygen".as_ref(), "--out".as_ref(), out.as_os_str()];
        if force {
            args.push("--force".as_ref());
        }
        run_bin(&args, PROMPT)
    };
    let refused = keygen(false)?;
    assert_eq!(refused.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.error_line().contains("already exists"),
        "{}",
        refused.stderr
    );
    assert_eq!(std::fs::read_to_string(&out)?, old, "kept without --force");

    let forced = keygen(true)?;
    assert!(forced.status.success(), "{}", forced.stderr);
    let meta = std::fs::metadata(&out)?;
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let new = std::fs::read_to_string(&out)?;
    assert_ne!(new, old, "a new key");
    assert!(
        new.starts_with("volsync:") && new.trim().len() == 8 + 128,
        "{new:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())?.count(),
        1,
        "no temporary left"
    );
    Ok(())
}

/// A source run that must fail at start-up: it is pointed at a port nothing listens on.
fn source_args<'a>(volume: &'a Path, psk: &'a Path, status: &'a Path) -> Vec<&'a OsStr> {
    vec![
        "source".as_ref(),
        "--connect".as_ref(),
        "127.0.0.1:1".as_ref(),
        "--volume".as_ref(),
        volume.as_os_str(),
        "--psk".as_ref(),
        psk.as_os_str(),
        "--status".as_ref(),
        status.as_os_str(),
    ]
}

/// Both agents with a status file in `status_dir` must exit 1 at start-up, the error line containing `reason`.
pub fn both_agents_refuse_the_status_dir(status_dir: &Path, reason: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = keygen(dir.path())?;
    let (volume, target) = (dir.path().join("v.img"), dir.path().join("t.img"));
    crate::common::sparse_file(&volume, MIB)?;
    crate::common::sparse_file(&target, MIB)?;
    let status = status_dir.join("status.json");
    let exit = match Destination::start(&target, &psk, &status, &[])? {
        Started::Exited(exit) => exit,
        Started::Listening(_) => bail!("the destination listened with an unwritable status file"),
    };
    let expected = format!(
        "error: cannot write status file {}: {reason}",
        status.display()
    );
    assert_eq!(exit.code(), Some(1), "{}", exit.stderr);
    assert!(exit.error_line().starts_with(&expected), "{}", exit.stderr);
    let exit = run_bin(&source_args(&volume, &psk, &status), PROMPT)?;
    assert_eq!(exit.code(), Some(1), "{}", exit.stderr);
    assert!(exit.error_line().starts_with(&expected), "{}", exit.stderr);
    assert!(
        !exit.stderr.contains("connect"),
        "checked before connecting: {}",
        exit.stderr
    );
    Ok(())
}

#[test]
fn a_missing_status_directory_stops_both_agents_at_start_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    both_agents_refuse_the_status_dir(&dir.path().join("gone"), "No such file or directory")
}

/// Writes `body` as a 0600 key file named `name` in `dir`.
fn key_file(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// A destination with key file `psk` must exit 1 at start-up; returns its error line.
fn refused_key(psk: &Path, dir: &Path) -> Result<String> {
    let target = dir.join("t.img");
    crate::common::sparse_file(&target, MIB)?;
    match Destination::start(&target, psk, &dir.join("d.json"), &[])? {
        Started::Exited(exit) => {
            assert_eq!(exit.code(), Some(1), "{}", exit.stderr);
            Ok(exit.error_line().to_owned())
        }
        Started::Listening(_) => bail!("the destination accepted the key file {}", psk.display()),
    }
}

#[test]
fn key_file_mistakes_get_their_own_messages_and_never_the_secret() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = "0123456789abcdef".repeat(8);
    let cases = [
        (
            "colon",
            format!("vol:sync:{secret}\n"),
            "the identity may not contain ':'",
        ),
        (
            "space",
            format!("volsync: {secret}\n"),
            "a space follows ':'",
        ),
        (
            "nonhex",
            format!("volsync:{}q{}\n", &secret[..40], &secret[41..]),
            "character 41 of the secret",
        ),
    ];
    for (name, body, expected) in cases {
        let psk = key_file(dir.path(), name, &body)?;
        let line = refused_key(&psk, dir.path())?;
        assert!(line.contains(expected), "{name}: {line}");
        assert!(!line.contains("Odd number"), "{name}: {line}");
        assert!(
            !line.contains("'q'") && !line.contains("\"q\""),
            "{name}: {line}"
        );
        assert!(
            !line.contains(&secret[..8]),
            "{name} quotes the secret: {line}"
        );
    }
    Ok(())
}

#[test]
fn a_directory_or_fifo_as_key_file_is_refused_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sub = dir.path().join("keydir");
    std::fs::create_dir(&sub)?;
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755))?;
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )?;
    for psk in [&sub, &fifo] {
        // PROMPT is the safety net: a FIFO read would block without a writer.
        let line = refused_key(psk, dir.path())?;
        assert!(line.contains("is not a regular file"), "{line}");
        assert!(!line.contains("chmod"), "{line}");
    }
    Ok(())
}

#[test]
fn a_key_file_with_a_byte_order_mark_syncs_with_the_plain_one() -> Result<()> {
    let fx = crate::common::Fixture::new(2 * MIB, 0x10ca_0041)?;
    let plain = std::fs::read_to_string(&fx.psk)?;
    let bom = key_file(fx.dir.path(), "bom.txt", &format!("\u{feff}{plain}"))?;
    let Started::Listening(mut destination) =
        Destination::start(&fx.target, &fx.psk, &fx.destination_status, &[])?
    else {
        bail!("the destination did not start");
    };
    let source = run_source(destination.addr, &fx.volume, &bom, &fx.source_status)?;
    let exit = destination.wait(AGENT_TIMEOUT)?;
    assert!(
        source.status.success(),
        "{}",
        String::from_utf8_lossy(&source.stderr)
    );
    assert!(exit.status.success(), "{}", exit.stderr);
    fx.expect_target_matches_volume()
}

#[test]
fn zero_timeouts_and_out_of_range_zstd_levels_are_usage_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = keygen(dir.path())?;
    let (volume, target) = (dir.path().join("v.img"), dir.path().join("t.img"));
    crate::common::sparse_file(&volume, MIB)?;
    crate::common::sparse_file(&target, MIB)?;
    let status = dir.path().join("s.json");
    let destination: Vec<&OsStr> = vec![
        "destination".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--target".as_ref(),
        target.as_os_str(),
        "--psk".as_ref(),
        psk.as_os_str(),
    ];
    let source = source_args(&volume, &psk, &status);
    let cases: [(&Vec<&OsStr>, [&str; 2]); 7] = [
        (&destination, ["--idle-timeout", "0"]),
        (&destination, ["--handshake-timeout", "0"]),
        (&source, ["--idle-timeout", "0"]),
        (&source, ["--handshake-timeout", "0"]),
        (&source, ["--zstd-level", "0"]),
        (&source, ["--zstd-level", "23"]),
        (&source, ["--zstd-level", "99"]),
    ];
    for (base, flag) in cases {
        let mut args = base.clone();
        args.extend(flag.iter().map(OsStr::new));
        let exit = run_bin(&args, PROMPT)?;
        assert_eq!(exit.code(), Some(2), "{flag:?}: {}", exit.stderr);
        assert!(exit.stderr.contains(flag[0]), "{flag:?}: {}", exit.stderr);
    }
    // The edges of the ranges are accepted (the source then fails to connect: exit 75, not 2).
    let mut edge = source.clone();
    edge.extend(
        [
            "--zstd-level",
            "22",
            "--idle-timeout",
            "1",
            "--handshake-timeout",
            "1",
        ]
        .map(OsStr::new),
    );
    let exit = run_bin(&edge, PROMPT)?;
    assert_eq!(exit.code(), Some(75), "{}", exit.stderr);
    Ok(())
}

/// Passes only once the destination opens its target at start-up (the lead's change).
#[test]
fn a_missing_target_is_reported_before_listening() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let psk = keygen(dir.path())?;
    let target = dir.path().join("missing.img");
    match Destination::start(&target, &psk, &dir.path().join("d.json"), &[])? {
        Started::Exited(exit) => {
            assert_eq!(exit.code(), Some(1), "{}", exit.stderr);
            assert_eq!(
                exit.error_line(),
                format!(
                    "error: cannot open target {}: No such file or directory (os error 2)",
                    target.display()
                )
            );
            assert!(!exit.stdout.contains("listening on"), "{}", exit.stdout);
            Ok(())
        }
        Started::Listening(_) => {
            bail!("the destination listened with a missing target (it opens the target only when a source connects)")
        }
    }
}

/// A source status file that is the volume itself is refused before anything is written.
#[test]
fn a_status_file_that_is_the_volume_or_target_is_refused() -> Result<()> {
    let fx = crate::common::Fixture::new(MIB, 0x10ca_0051)?;
    let before = fx.volume_digest()?;
    let link = fx.dir.path().join("status-link.json");
    std::os::unix::fs::symlink(&fx.volume, &link)?;
    let out = run_source_with("127.0.0.1:1".parse()?, &fx.volume, &fx.psk, &link, &[])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(error_line(&stderr).contains("is the volume"), "{stderr}");
    assert_eq!(fx.volume_digest()?, before);
    let target_link = fx.dir.path().join("target-link.json");
    std::os::unix::fs::symlink(&fx.target, &target_link)?;
    let line = match Destination::start(&fx.target, &fx.psk, &target_link, &[])? {
        Started::Exited(exit) => {
            assert_eq!(exit.code(), Some(1), "{}", exit.stderr);
            exit.error_line().to_owned()
        }
        Started::Listening(_) => bail!("the destination accepted its target as status file"),
    };
    assert!(line.contains("is the target"), "{line}");
    Ok(())
}
