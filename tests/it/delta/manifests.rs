//! Manifests that must not be trusted: damaged (a flipped byte), truncated, of another target, of another chunk
//! size, or stale because the target was written behind the destination's back. Each is ignored with a WARN line
//! and the sync is a full comparison that ends with target == volume.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};

use super::{
    scattered, scribble, scribble_behind, sync_files, warnings, End, Pair, CHUNK,
    DESTINATION_NO_MANIFEST, MIB, SOURCE_NO_MANIFEST,
};
use crate::common::sparse_file;

/// XORs the byte at `offset` of `path` with 0x01.
pub(super) fn flip(path: &Path, offset: u64) -> Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut b = [0u8];
    file.read_exact_at(&mut b, offset)?;
    b[0] ^= 1;
    file.write_all_at(&b, offset)?;
    Ok(())
}

/// Cuts `path` to `len` bytes.
fn truncate(path: &Path, len: u64) -> Result<()> {
    OpenOptions::new().write(true).open(path)?.set_len(len)?;
    Ok(())
}

fn len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .len())
}

/// Asserts some WARN line of `stderr` contains `what`.
fn warned(stderr: &str, what: &str) {
    let lines = warnings(stderr);
    assert!(
        lines.iter().any(|l| l.contains(what)),
        "no WARN line with {what:?}; WARN lines: {lines:#?}"
    );
}

/// Issue 11, case 3: a flipped byte in either manifest (header or digests), a truncated one, an empty one: each is
/// ignored with a warning, the sync is full (the reason names the side) and the target ends equal to the volume.
/// The next sync, with the manifests that full comparison wrote, is a delta again.
#[test]
fn damaged_and_truncated_manifests_are_ignored() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde3_0001)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let (src, dst) = (p.source_manifest(), p.destination_manifest());
    let header = len(&src)? - 32 * (size / CHUNK) - 32;
    println!("manifest header is {header} bytes");

    type Damage = fn(&Path, u64, u64) -> Result<()>;
    let damages: [(&str, Damage); 5] = [
        ("a digest flipped", |f, h, _| flip(f, h + 32 * 77 + 5)),
        ("the volume digest flipped", |f, _, _| flip(f, 40)),
        ("the checksum flipped", |f, _, l| flip(f, l - 1)),
        ("the last digest cut off", |f, _, l| truncate(f, l - 64)),
        ("emptied", |f, _, _| truncate(f, 0)),
    ];
    for (round, (what, damage)) in damages.iter().enumerate() {
        for (side, manifest, reason, log) in [
            (
                "source",
                &src,
                SOURCE_NO_MANIFEST,
                "ignoring the source's manifest",
            ),
            (
                "destination",
                &dst,
                DESTINATION_NO_MANIFEST,
                "ignoring the destination's manifest",
            ),
        ] {
            let seed = (round * 2 + usize::from(side == "source")) as u64;
            scribble(&p.fx.volume, &scattered(size, 3, seed), seed)?;
            damage(manifest, header, len(manifest)?)?;
            let out = p.sync(&[], &[])?;
            println!("{side} manifest {what}: {}", out.reason());
            out.expect_full(reason);
            let stderr = if side == "source" {
                out.source_log
            } else {
                out.destination_log.clone().unwrap_or_default()
            };
            warned(&stderr, log);
            if *what != "emptied" {
                warned(&stderr, "damaged manifest");
            }
        }
    }
    let again = p.sync(&[], &[])?;
    again.expect_delta("delta-manifest");
    assert_eq!(again.src("chunksChanged"), 0, "{}", again.describe());
    Ok(())
}

/// Issue 11, case 3: a destination manifest copied into the state directory of another destination, whose target
/// is another file (all zeros, so a delta would leave it wrong), is a manifest of something else: full comparison,
/// target == volume.
#[test]
fn a_manifest_of_another_target_is_ignored() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde3_0002)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);

    let dir = p.fx.dir.path();
    let other = dir.join("other-target.img");
    sparse_file(&other, size)?;
    let other_state = dir.join("other-state");
    std::fs::create_dir(&other_state)?;
    std::fs::copy(
        p.destination_manifest(),
        other_state.join("destination.manifest"),
    )?;
    let other_status = dir.join("other-status.json");
    let other_state = other_state.to_string_lossy().into_owned();
    let out = sync_files(
        &p.fx.psk,
        End {
            path: &p.fx.volume,
            status: &p.fx.source_status,
            flags: &["--state-dir", &p.sa],
        },
        End {
            path: &other,
            status: &other_status,
            flags: &["--state-dir", &other_state],
        },
    )?;
    println!("another target: {}", out.reason());
    out.expect_full(DESTINATION_NO_MANIFEST);
    warned(
        out.destination_log.as_deref().unwrap_or_default(),
        "manifest of something else",
    );
    assert_eq!(
        blockmover::sample::file_digest(&other, size)?,
        p.fx.volume_digest()?,
        "the other target equals the volume"
    );
    assert_eq!(out.dst("chunksSent"), size / CHUNK, "{}", out.describe());
    Ok(())
}

/// Issue 11, case 3: manifests written with the default chunk size are of another geometry for a sync with
/// `--chunk-size 32768`: full, then a delta at that chunk size, then full again back at the default.
#[test]
fn a_manifest_of_another_chunk_size_is_ignored() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde3_0003)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);

    scribble(&p.fx.volume, &scattered(size, 4, 1), 1)?;
    let small = ["--chunk-size", "32768"];
    let out = p.sync(&small, &[])?;
    out.expect_full(SOURCE_NO_MANIFEST);
    warned(&out.source_log, "manifest of another geometry");
    warned(
        out.destination_log.as_deref().unwrap_or_default(),
        "manifest of another geometry",
    );
    assert_eq!(out.src("chunkSize"), 32768);
    assert_eq!(out.src("blocksSent"), 4, "{}", out.describe());

    scribble(&p.fx.volume, &scattered(size, 4, 2), 2)?;
    let out = p.sync(&small, &[])?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.dst("chunksChanged"), 4, "{}", out.describe());
    assert!(out.dst("bytesRead") <= 2 * 4 * 32768, "{}", out.describe());

    scribble(&p.fx.volume, &scattered(size, 4, 3), 3)?;
    let out = p.sync(&[], &[])?;
    out.expect_full(SOURCE_NO_MANIFEST);
    warned(&out.source_log, "manifest of another geometry");
    Ok(())
}

/// Issue 11, case 5: a target file written between syncs by something else has a new mtime: the destination's
/// manifest is stale, the sync compares in full and repairs the foreign write; the next sync is a delta again.
#[test]
fn a_target_written_behind_the_destinations_back_is_compared_in_full() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde5_0001)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);

    let volume_changes = scattered(size, 3, 1);
    scribble(&p.fx.volume, &volume_changes, 1)?;
    // Someone else writes two other blocks of the target.
    let foreign = [5 * (CHUNK / 4096) + 2, 150 * (CHUNK / 4096) + 9];
    scribble(&p.fx.target, &foreign, 99)?;
    let out = p.sync(&[], &[])?;
    println!("target written behind: {}", out.reason());
    out.expect_full(DESTINATION_NO_MANIFEST);
    warned(
        out.destination_log.as_deref().unwrap_or_default(),
        "stale manifest",
    );
    out.expect_whole_target_read();
    assert_eq!(
        out.src("blocksSent"),
        (volume_changes.len() + foreign.len()) as u64,
        "{}",
        out.describe()
    );

    let out = p.sync(&[], &[])?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.src("chunksChanged"), 0);
    Ok(())
}

/// A target written behind the destination's back with its mtime put back is not seen by the stamp (as a block
/// device's writes never are): `destination --verify full` compares in full, repairs it and counts the target
/// chunks that did not hold what the manifest said (`targetDriftChunks`).
#[test]
fn destination_verify_full_finds_and_repairs_target_drift() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde5_0002)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);

    let mtime = std::fs::metadata(&p.fx.target)?.modified()?;
    scribble_behind(&p.fx.target, &[17 * 16 + 1, 18 * 16 + 1, 200 * 16], 7)?;
    assert_eq!(std::fs::metadata(&p.fx.target)?.modified()?, mtime);

    let out = p.sync(&[], &["--verify", "full"])?;
    out.expect_full("the destination asked for a full comparison");
    assert_eq!(out.dst("targetDriftChunks"), 3, "{}", out.describe());
    assert!(super::text(&out.source, "targetDriftChunks").is_none());
    assert_eq!(out.src("blocksSent"), 3, "{}", out.describe());
    warned(
        out.destination_log.as_deref().unwrap_or_default(),
        "does not hold what the destination's manifest says",
    );

    let out = p.sync(&[], &[])?;
    out.expect_delta("delta-manifest");
    Ok(())
}

/// A whole, valid source manifest of an older image (put back from a copy): the destination's manifest describes
/// the newer image its target holds, the bases differ, and the sync compares in full.
#[test]
fn manifests_of_different_images_make_a_full_comparison() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde3_0004)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let old = p.fx.dir.path().join("old-source.manifest");
    std::fs::copy(p.source_manifest(), &old)?;
    scribble(&p.fx.volume, &scattered(size, 3, 1), 1)?;
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    // A delta keeps its manifest as changes beside the base: the state of the older image is the base alone.
    let changes = p.source_manifest().with_extension("manifest.changes");
    assert!(
        changes.exists(),
        "the delta kept its changes in {}",
        changes.display()
    );

    std::fs::copy(&old, p.source_manifest())?;
    std::fs::remove_file(&changes)?;
    scribble(&p.fx.volume, &scattered(size, 3, 2), 2)?;
    let out = p.sync(&[], &[])?;
    out.expect_full("the two manifests describe different images");
    out.expect_whole_target_read();
    assert_eq!(out.src("blocksSent"), 3, "{}", out.describe());
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    Ok(())
}
