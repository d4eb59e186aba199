//! Manifests by pages: a delta keeps its manifest as a changes file beside the base (the base is not rewritten),
//! and a page of digests that does not hold what the page table says is never trusted: found before a session, it
//! makes a full comparison; found during a delta by change list (which reads only the pages it touches), it fails
//! that sync as retryable, drops the manifest, and the retry compares in full.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::manifests::flip;
use super::{
    change_list, scribble, warnings, Pair, CHUNK, DESTINATION_NO_MANIFEST, MIB, SOURCE_NO_MANIFEST,
};
use crate::common::{expect_failed, run_source_with, Destination, AGENT_TIMEOUT};
use crate::schema::Kind;

/// 768 chunks: two pages of digests (512 digests a page).
const VOLUME: u64 = 48 * MIB;
/// A chunk whose digest is in the second page only.
const IN_PAGE_1: u64 = 600;
/// Exit code of a failure a retry may cure.
const RETRYABLE: i32 = 75;

/// Where chunk `chunk`'s digest is in the base file `path` of a [`VOLUME`] (two pages of table).
fn digest_offset(path: &Path, chunk: u64) -> Result<u64> {
    let len = std::fs::metadata(path)?.len();
    let header = len - 32 * (VOLUME / CHUNK) - 32 * 2 - 32;
    Ok(header + 32 * chunk)
}

fn changes_of(manifest: &Path) -> PathBuf {
    manifest.with_extension("manifest.changes")
}

/// A block of chunk `chunk` rewritten, and the change list naming it.
fn change(p: &Pair, chunk: u64, seed: u64) -> Result<String> {
    let extents = scribble(&p.fx.volume, &[chunk * (CHUNK / 4096) + 3], seed)?;
    change_list(p.fx.dir.path(), &format!("c{seed}.json"), &extents)
}

#[test]
fn a_delta_keeps_its_manifest_as_changes_beside_an_unchanged_base() -> Result<()> {
    let p = Pair::new(VOLUME, 0xd9_0001)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let bases = [p.source_manifest(), p.destination_manifest()];
    let before: Vec<Vec<u8>> = bases.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    for (round, chunk) in [(1u64, 7u64), (2, IN_PAGE_1), (3, 767)] {
        let list = change(&p, chunk, round)?;
        let out = p.sync(&["--changed-extents", &list], &[])?;
        out.expect_delta("delta-changelist");
        assert_eq!(out.src("chunksChanged"), 1, "{}", out.describe());
        for (base, old) in bases.iter().zip(&before) {
            assert!(
                std::fs::read(base)? == *old,
                "{} was rewritten",
                base.display()
            );
            // The header, the base's checksum, the count, a two-page table, one entry per delta so far, the checksum.
            let changes = std::fs::metadata(changes_of(base))?.len();
            let header = old.len() as u64 - 32 * (VOLUME / CHUNK) - 32 * 3;
            assert_eq!(
                changes,
                header + 32 + 8 + 64 + 40 * round + 32,
                "{}",
                base.display()
            );
        }
    }
    // A delta by manifest reads every page (checked first) and keeps the same pair.
    let out = p.sync(&[], &[])?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.src("chunksChanged"), 0, "{}", out.describe());
    Ok(())
}

#[test]
fn a_damaged_page_of_the_sources_manifest_fails_a_change_list_delta_as_retryable() -> Result<()> {
    let p = Pair::new(VOLUME, 0xd9_0002)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let list = change(&p, IN_PAGE_1, 1)?;
    // A digest of page 1 other than the listed chunk's: the delta reads the page, and it fails its check.
    flip(
        &p.source_manifest(),
        digest_offset(&p.source_manifest(), IN_PAGE_1 + 3)? + 9,
    )?;

    let mut destination = Destination::spawn(
        &p.fx.target,
        &p.fx.psk,
        &p.fx.destination_status,
        &["--state-dir", &p.sb],
    )?;
    let source = run_source_with(
        destination.addr,
        &p.fx.volume,
        &p.fx.psk,
        &p.fx.source_status,
        &["--state-dir", &p.sa, "--changed-extents", &list],
    )?;
    let dst = destination.wait(AGENT_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&source.stderr);
    assert_eq!(source.status.code(), Some(RETRYABLE), "source: {stderr}");
    assert!(
        stderr.contains("manifest damaged: the source's, at chunk 600"),
        "{stderr}"
    );
    assert!(!dst.status.success(), "destination: {}", dst.stderr);
    let status = expect_failed(&p.fx.source_status, Kind::Source)?;
    assert!(
        status.to_string().contains("manifest damaged"),
        "{status:#}"
    );
    assert!(
        !p.source_manifest().exists(),
        "the damaged manifest is dropped"
    );

    let out = p.sync(&["--changed-extents", &list], &[])?;
    out.expect_full(SOURCE_NO_MANIFEST);
    out.expect_whole_target_read();
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    Ok(())
}

/// The source offers a delta by change list without reading its whole base; the destination answers with a full
/// comparison (`--verify full`), which reads every digest of that base to check the list. A damaged page found
/// there costs the check, not the sync: it ends Successful and equal, and says so.
#[test]
fn a_damaged_source_page_under_a_full_comparison_with_a_change_list_drops_only_the_check(
) -> Result<()> {
    let p = Pair::new(VOLUME, 0xd9_0004)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let list = change(&p, IN_PAGE_1, 1)?;
    flip(
        &p.source_manifest(),
        digest_offset(&p.source_manifest(), 40)? + 5,
    )?;
    let out = p.sync(&["--changed-extents", &list], &["--verify", "full"])?;
    out.expect_full("the destination asked for a full comparison");
    assert_eq!(out.src("chunksChanged"), 1, "{}", out.describe());
    assert!(
        warnings(&out.source_log)
            .iter()
            .any(|l| l.contains("damaged manifest") && l.contains("not checked")),
        "{}",
        out.source_log
    );
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    Ok(())
}

#[test]
fn a_damaged_page_of_the_destinations_manifest_makes_a_full_comparison() -> Result<()> {
    let p = Pair::new(VOLUME, 0xd9_0003)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let list = change(&p, IN_PAGE_1, 1)?;
    let dst = p.destination_manifest();
    flip(&dst, digest_offset(&dst, 100)? + 30)?;
    // Found before the session (the spot check reads every page of so small a manifest): a full comparison, with
    // the damage named, that ends equal.
    let out = p.sync(&["--changed-extents", &list], &[])?;
    out.expect_full(DESTINATION_NO_MANIFEST);
    let log = out.destination_log.clone().unwrap_or_default();
    assert!(
        warnings(&log)
            .iter()
            .any(|l| l.contains("damaged manifest") && l.contains("page 0")),
        "{log}"
    );
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    Ok(())
}
