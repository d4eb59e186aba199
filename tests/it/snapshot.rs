//! The source's point-in-time copy (issue 12, items 1 and 4): `--snapshot reflink` clones a file volume with
//! FICLONE on a loop-mounted XFS, syncs the clone and removes it; with `--state-dir` the clone of the last sync is
//! kept and the extent maps of the two clones give the next change list (`changeTracker: reflink extents ...`),
//! read without reading the volume. `--pre-snapshot` / `--post-snapshot` run around taking the copy.
//!
//! Real agents over TLS, a real XFS (mkfs.xfs, losetup, mount; skipped with the printed reason when not root or
//! when xfsprogs is missing). Only files are written on the mounted file system, through it, never its device.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::common::mounts::{not_root, run, LoopDevice, Mount};
use crate::common::{error_line, expect_failed, external_str, run_source_with, sparse_file};
use crate::delta::{scattered, scribble, text, Pair, BLOCK, MIB, SOURCE_NO_MANIFEST};
use crate::or_skip;
use crate::schema::Kind;

const SIZE: u64 = 16 * MIB;

/// A fresh XFS with reflinks, loop-mounted read-write (only its files are written). Unmounted, then detached, on
/// drop (fields drop in order).
struct Xfs {
    mount: Mount,
    _device: LoopDevice,
    _image: tempfile::TempDir,
}

impl Xfs {
    fn new() -> Result<std::result::Result<Xfs, String>> {
        if let Some(reason) = not_root() {
            return Ok(Err(reason));
        }
        let image = tempfile::tempdir()?;
        let file = image.path().join("xfs.img");
        sparse_file(&file, 512 * MIB)?;
        if let Err(e) = run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                file.as_os_str(),
            ],
        ) {
            return Ok(Err(format!("{e:#} (xfsprogs installed?)")));
        }
        let device = match LoopDevice::attach(&file)? {
            Ok(d) => d,
            Err(reason) => return Ok(Err(reason)),
        };
        let mount = match Mount::new(&["-t".as_ref(), "xfs".as_ref(), device.path.as_os_str()])? {
            Ok(m) => m,
            Err(reason) => return Ok(Err(reason)),
        };
        Ok(Ok(Xfs {
            mount,
            _device: device,
            _image: image,
        }))
    }
}

/// A [`Pair`] whose volume lives on `xfs` (the target and state directories stay on the test's temporary
/// directory).
fn pair_on(xfs: &Xfs, seed: u64) -> Result<Pair> {
    let mut p = Pair::new(SIZE, seed)?;
    let volume = xfs.mount.path().join("volume.img");
    std::fs::copy(&p.fx.volume, &volume)?;
    p.fx.volume = volume;
    Ok(p)
}

/// The hidden files blockmover keeps beside `volume` (`.NAME.blockmover-KIND.SUFFIX`), by kind.
fn kept(volume: &Path, kind: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!(
        ".{}.blockmover-{kind}.",
        volume.file_name().context("name")?.to_string_lossy()
    );
    let mut found: Vec<PathBuf> = std::fs::read_dir(volume.parent().context("dir")?)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

/// Asserts that exactly one base clone is kept, named after `digest`, and no clone under way is left.
fn expect_one_base(volume: &Path, digest: &str) -> Result<()> {
    let bases = kept(volume, "base")?;
    ensure!(
        bases.len() == 1 && bases[0].to_string_lossy().ends_with(digest),
        "expected one base clone named after {digest}: {bases:?}"
    );
    ensure!(kept(volume, "clone")?.is_empty(), "a clone was left");
    Ok(())
}

/// Issue 12, item 1: a first sync of the clone, then a delta whose change list comes from the extent maps of the
/// kept clone and the new one: the source reads exactly the chunks written, and a sync with nothing written reads
/// nothing.
#[test]
fn reflink_clones_give_the_change_list_without_reading_unchanged_data() -> Result<()> {
    let xfs = or_skip!(Xfs::new(), "reflink change lists need a mounted XFS");
    let p = pair_on(&xfs, 0x5aa_0001)?;
    let flags = ["--snapshot", "reflink"];
    let first = p.sync(&flags, &[])?;
    first.expect_full(SOURCE_NO_MANIFEST);
    assert_eq!(first.src("bytesRead"), SIZE, "{}", first.describe());
    expect_one_base(
        &p.fx.volume,
        text(&first.source, "volumeDigest").unwrap_or("?"),
    )?;

    let blocks = scattered(SIZE, 12, 3);
    scribble(&p.fx.volume, &blocks, 9)?;
    let second = p.sync(&flags, &[])?;
    second.expect_delta("delta-changelist");
    let tracker = external_str(&second.source, "changeTracker")?;
    assert!(tracker.starts_with("reflink extents of "), "{tracker}");
    let n = blocks.len() as u64;
    assert_eq!(
        second.src("bytesRead"),
        n * BLOCK,
        "the source reads the written blocks only: {}",
        second.describe()
    );
    assert_eq!(second.src("chunksChanged"), n, "{}", second.describe());
    assert_eq!(second.src("blocksSent"), n, "{}", second.describe());
    expect_one_base(
        &p.fx.volume,
        text(&second.source, "volumeDigest").unwrap_or("?"),
    )?;

    let third = p.sync(&flags, &[])?;
    third.expect_delta("delta-changelist");
    assert_eq!(third.src("bytesRead"), 0, "{}", third.describe());
    assert_eq!(third.src("chunksChanged"), 0, "{}", third.describe());
    Ok(())
}

/// Issue 12, items 1 and 5: a kept clone that is gone (or was never kept) makes the tracker fail: the sync is a
/// full comparison that says why, Successful and equal, and keeps a clone again, so the next one is a delta.
#[test]
fn a_missing_base_clone_falls_back_to_a_full_comparison() -> Result<()> {
    let xfs = or_skip!(Xfs::new(), "reflink change lists need a mounted XFS");
    let p = pair_on(&xfs, 0x5aa_0002)?;
    let flags = ["--snapshot", "reflink"];
    p.sync(&flags, &[])?.expect_full(SOURCE_NO_MANIFEST);
    for base in kept(&p.fx.volume, "base")? {
        std::fs::remove_file(base)?;
    }
    scribble(&p.fx.volume, &scattered(SIZE, 3, 1), 4)?;
    let second = p.sync(&flags, &[])?;
    second.expect_full("the source's change tracker failed");
    let why = external_str(&second.source, "changeTrackerError")?;
    assert!(
        why.contains("no kept clone of the last synced image"),
        "{why}"
    );
    assert_eq!(second.src("bytesRead"), SIZE, "{}", second.describe());
    expect_one_base(
        &p.fx.volume,
        text(&second.source, "volumeDigest").unwrap_or("?"),
    )?;
    scribble(&p.fx.volume, &scattered(SIZE, 2, 5), 6)?;
    p.sync(&flags, &[])?.expect_delta("delta-changelist");
    Ok(())
}

/// Issue 12, item 4: the hooks run in order around the clone (the post hook sees the clone under way), and the
/// copy is point in time: what the post hook writes to the volume after the clone is not in the target. Without a
/// state directory no clone is kept.
#[test]
fn the_copy_is_point_in_time_and_the_hooks_run_around_it() -> Result<()> {
    let xfs = or_skip!(Xfs::new(), "reflink snapshots need a mounted XFS");
    let p = pair_on(&xfs, 0x5aa_0003)?;
    let before = p.fx.volume_digest()?;
    let log = p.fx.dir.path().join("hooks.log");
    let (l, dir) = (log.display(), xfs.mount.path().display());
    let pre = format!("echo \"pre $BLOCKMOVER_VOLUME\" >> {l}");
    let post = format!(
        "ls -a {dir} | grep -c blockmover-clone >> {l}; \
         dd if=/dev/urandom of=\"$BLOCKMOVER_VOLUME\" bs=4096 count=8 seek=100 conv=notrunc,fsync 2>/dev/null; \
         echo post >> {l}"
    );
    let out = p.sync_flags(
        &[
            "--snapshot",
            "reflink",
            "--pre-snapshot",
            &pre,
            "--post-snapshot",
            &post,
        ],
        &[],
    )?;
    out.expect_full("the source keeps no state");
    assert_eq!(
        std::fs::read_to_string(&log)?,
        format!("pre {}\n1\npost\n", p.fx.volume.display()),
        "pre hook, then the clone (seen by the post hook), then the post hook"
    );
    assert_eq!(p.fx.target_digest()?, before, "the target holds the copy");
    assert_ne!(
        p.fx.volume_digest()?,
        before,
        "the volume was written after the copy"
    );
    assert!(kept(&p.fx.volume, "clone")?.is_empty() && kept(&p.fx.volume, "base")?.is_empty());
    Ok(())
}

/// Issue 12, item 4: a failing pre hook fails the sync with its exit status and stderr (exit 1, status Failed,
/// no copy taken, nothing sent), and the post hook still runs.
#[test]
fn a_failing_pre_hook_fails_the_sync_and_the_post_hook_still_runs() -> Result<()> {
    let xfs = or_skip!(Xfs::new(), "reflink snapshots need a mounted XFS");
    let p = pair_on(&xfs, 0x5aa_0004)?;
    let marker = p.fx.dir.path().join("thawed");
    let post = format!("touch {}", marker.display());
    let out = run_source_with(
        "127.0.0.1:9".parse()?,
        &p.fx.volume,
        &p.fx.psk,
        &p.fx.source_status,
        &[
            "--snapshot",
            "reflink",
            "--pre-snapshot",
            "echo 'fsfreeze: /mnt: Device or resource busy' >&2; exit 3",
            "--post-snapshot",
            &post,
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        "error: pre-snapshot hook failed: exit status 3: fsfreeze: /mnt: Device or resource busy"
    );
    let status = expect_failed(&p.fx.source_status, Kind::Source)?;
    assert!(
        status.to_string().contains("pre-snapshot hook failed"),
        "{status:#}"
    );
    assert!(marker.exists(), "the post hook ran");
    assert!(kept(&p.fx.volume, "clone")?.is_empty());
    Ok(())
}

/// Issue 12, item 1: on a file system without reflinks (this test's temporary directory, unless it has them) the
/// source fails at once with a line that says so, and leaves no copy behind: never a silent full copy.
#[test]
fn a_file_system_without_reflinks_is_a_clear_error() -> Result<()> {
    let p = Pair::new(SIZE, 0x5aa_0005)?;
    let probe = p.fx.dir.path().join("probe");
    let reflinks = std::process::Command::new("cp")
        .arg("--reflink=always")
        .arg(&p.fx.volume)
        .arg(&probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if reflinks {
        println!("skipped: the temporary directory's file system has reflinks");
        return Ok(());
    }
    let out = run_source_with(
        "127.0.0.1:9".parse()?,
        &p.fx.volume,
        &p.fx.psk,
        &p.fx.source_status,
        &["--snapshot", "reflink"],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = error_line(&stderr);
    assert!(
        line.contains("does not support reflinks") && line.contains("FICLONE"),
        "{line}"
    );
    expect_failed(&p.fx.source_status, Kind::Source)?;
    assert!(kept(&p.fx.volume, "clone")?.is_empty(), "no clone left");
    Ok(())
}
