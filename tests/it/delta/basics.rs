//! The delta path end to end: a full sync, a delta by manifest, a delta by change list; a change list that misses
//! a changed range (the documented way to a wrong target) and the full comparison that repairs it; a change list
//! the source must refuse before it connects.

use std::time::Duration;

use anyhow::Result;

use super::{
    change_list, scattered, scribble, scribble_chunks, warnings, Pair, BLOCK, CHUNK, MIB,
    SOURCE_NO_MANIFEST,
};
use crate::common::{
    expect_failed, file_bytes, run_source_with, Destination, Running, AGENT_TIMEOUT,
};
use crate::schema::Kind;

/// Issue 11, case 1: full (the source has no manifest yet), then a delta by manifest that reads only the changed
/// chunks of the target and sends only the changed blocks, then a delta by change list that reads only the listed
/// chunks of the volume; a change list that names more than changed reads more but sends only what changed.
#[test]
fn a_full_sync_then_a_delta_by_manifest_then_a_delta_by_change_list() -> Result<()> {
    let p = Pair::new(32 * MIB, 0xde1_0001)?;
    let size = p.size();
    let chunks = size / CHUNK;

    let first = p.sync(&[], &[])?;
    first.expect_full(SOURCE_NO_MANIFEST);
    assert_eq!(first.src("bytesRead"), size, "{}", first.describe());
    assert_eq!(first.dst("chunksSent"), chunks, "{}", first.describe());
    assert!(p.source_manifest().is_file() && p.destination_manifest().is_file());
    assert!(
        !std::path::Path::new(&p.sa)
            .join("destination.manifest")
            .exists()
            && !std::path::Path::new(&p.sb).join("source.manifest").exists(),
        "each state directory holds its own role's manifest only"
    );

    // Eight scattered 4 KiB blocks, each in a chunk of its own.
    let changed = scattered(size, 8, 3);
    scribble(&p.fx.volume, &changed, 1)?;
    let second = p.sync(&[], &[])?;
    second.expect_delta("delta-manifest");
    let n = changed.len() as u64;
    assert_eq!(
        second.src("bytesRead"),
        size,
        "without a change list the source hashes its whole snapshot"
    );
    for (side, f) in [
        ("source", second.src("chunksChanged")),
        ("destination", second.dst("chunksChanged")),
    ] {
        assert_eq!(f, n, "{side} chunksChanged: {}", second.describe());
    }
    assert_eq!(second.src("blocksSent"), n, "{}", second.describe());
    assert_eq!(second.dst("blocksSent"), n, "{}", second.describe());
    // The destination reads nothing of its target: the block digests its NEEDs carry are in destination.blocks
    // (kept by the full sync, each entry proven against its manifest).
    let read = second.dst("bytesRead");
    assert_eq!(
        read,
        0,
        "destination bytesRead for {n} changed chunks of a {size}-byte volume: {}",
        second.describe()
    );
    assert!(
        second.src("wireBytesSent") < n * BLOCK + 64 * 1024,
        "a delta sends the changed blocks and little else: {}",
        second.describe()
    );

    // A change list naming exactly the five blocks written since.
    let changed = scattered(size, 5, 11);
    let extents = scribble(&p.fx.volume, &changed, 2)?;
    let list = change_list(p.fx.dir.path(), "changes.json", &extents)?;
    let third = p.sync(&["--changed-extents", &list], &[])?;
    third.expect_delta("delta-changelist");
    let n = changed.len() as u64;
    assert_eq!(
        third.src("bytesRead"),
        n * BLOCK,
        "the source reads only the listed blocks (their chunks' other blocks are in source.blocks): {}",
        third.describe()
    );
    assert_eq!(third.src("blocksSent"), n, "{}", third.describe());
    assert!(
        third.dst("bytesRead") <= 2 * n * CHUNK,
        "{}",
        third.describe()
    );

    // A list that names 16 unchanged chunks besides one changed block: read, compared, not sent.
    let extents = scribble(&p.fx.volume, &[100 * (CHUNK / BLOCK) + 3], 3)?;
    let mut listed = vec![(200 * CHUNK, 16 * CHUNK)];
    listed.extend(extents);
    let list = change_list(p.fx.dir.path(), "wide.json", &listed)?;
    let fourth = p.sync(&["--changed-extents", &list], &[])?;
    fourth.expect_delta("delta-changelist");
    assert_eq!(
        fourth.src("bytesRead"),
        16 * CHUNK + BLOCK,
        "the 16 chunks listed whole, the changed block alone: {}",
        fourth.describe()
    );
    assert_eq!(fourth.src("chunksChanged"), 1, "{}", fourth.describe());
    assert_eq!(fourth.src("blocksSent"), 1, "{}", fourth.describe());
    Ok(())
}

/// Issue 11, case 2: a change list that misses a changed range is believed (the lie is the tracker's): the sync is
/// Successful and the target differs from the volume. `--verify full`, given the same change list again or an
/// empty one, repairs it, sends only what was missed, and says on the source how many changed chunks the list
/// missed.
#[test]
fn a_change_list_that_misses_a_range_is_repaired_by_verify_full() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde1_0002)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let empty = change_list(p.fx.dir.path(), "empty.json", &[])?;

    for (round, again) in [(1, true), (2, false)] {
        let changed = scattered(size, 4, 5 + round);
        let extents = scribble(&p.fx.volume, &changed, round)?;
        // The tracker forgets the last range.
        let list = change_list(p.fx.dir.path(), "lying.json", &extents[..3])?;
        let lied = p.sync_unchecked(&["--changed-extents", &list], &[])?;
        lied.expect_delta("delta-changelist");
        assert_eq!(lied.src("blocksSent"), 3, "{}", lied.describe());
        assert_ne!(
            p.fx.target_digest()?,
            p.fx.volume_digest()?,
            "a change list that misses a range leaves the target behind (documented)"
        );

        // --verify full with the same list or an empty one: every chunk is compared, the missed one is found and
        // repaired.
        let verify_list = if again { &list } else { &empty };
        let fixed = p.sync(&["--changed-extents", verify_list, "--verify", "full"], &[])?;
        fixed.expect_full("the source asked for a full comparison");
        assert_eq!(
            fixed.src("changeListMissedChunks"),
            1,
            "the source says the list missed one changed chunk: {}",
            fixed.describe()
        );
        assert_eq!(fixed.src("bytesRead"), size, "{}", fixed.describe());
        fixed.expect_whole_target_read();
        assert_eq!(fixed.src("blocksSent"), 1, "only the missed block travels");
        assert!(
            super::text(&fixed.destination, "targetDriftChunks").is_none(),
            "the target held what the destination's manifest said: {}",
            fixed.describe()
        );
        let warned = warnings(&fixed.source_log).join("\n");
        assert!(
            warned.contains("not in the change list"),
            "the source warns about the missed chunk: {warned}"
        );

        // Both manifests describe the repaired image: the next sync is a delta that finds nothing to do.
        let after = p.sync(&[], &[])?;
        after.expect_delta("delta-manifest");
        assert_eq!(after.src("chunksChanged"), 0, "{}", after.describe());
        assert!(super::text(&after.source, "changeListMissedChunks").is_none());
    }
    Ok(())
}

/// After a change list missed a range, a delta by manifest (no change list) also repairs the target: the
/// manifests record what the target holds, which the source's full hash then finds different.
#[test]
fn a_delta_by_manifest_after_a_lying_change_list_repairs_the_target() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde1_0003)?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    let extents = scribble_chunks(&p.fx.volume, &[7, 70, 170], 4)?;
    let list = change_list(p.fx.dir.path(), "lying.json", &extents[..1])?;
    p.sync_unchecked(&["--changed-extents", &list], &[])?
        .expect_delta("delta-changelist");
    assert_ne!(p.fx.target_digest()?, p.fx.volume_digest()?);
    let repaired = p.sync(&[], &[])?;
    repaired.expect_delta("delta-manifest");
    assert_eq!(repaired.src("chunksChanged"), 2, "{}", repaired.describe());
    Ok(())
}

/// Issue 11, case 10: a change list that names a range past the end of the volume (or is not JSON, or is absent)
/// fails the source at once, exit 1, with one `error: ` line naming the file; it never connects, so the
/// destination's target, manifest and status are untouched, and a good source after it gets its delta.
#[test]
fn a_bad_change_list_fails_the_source_before_it_connects() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xde1_0004)?;
    let size = p.size();
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);
    scribble(&p.fx.volume, &[1000], 5)?;

    let dir = p.fx.dir.path();
    let past = change_list(
        dir,
        "past-end.json",
        &[(0, BLOCK), (size - BLOCK, 2 * BLOCK)],
    )?;
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "[[0, 4096]]")?;
    let garbage = garbage.to_string_lossy().into_owned();
    let absent = dir.join("absent.json").to_string_lossy().into_owned();

    let before = (
        file_bytes(&p.fx.target)?,
        file_bytes(&p.destination_manifest())?,
        file_bytes(&p.fx.destination_status)?,
    );
    let mut destination = Destination::spawn(
        &p.fx.target,
        &p.fx.psk,
        &p.fx.destination_status,
        &["--state-dir", &p.sb],
    )?;
    for (list, why) in [
        (&past, "past the end of the volume"),
        (&garbage, "not {\"extents\""),
        (&absent, "cannot open change list"),
    ] {
        let ended = Running::source(
            destination.addr,
            &p.fx,
            &["--state-dir", &p.sa, "--changed-extents", list],
        )?
        .finish(AGENT_TIMEOUT)?;
        println!(
            "source with {list}: {:?} {}",
            ended.code(),
            ended.error_line()
        );
        assert_eq!(ended.code(), Some(1), "{}", ended.stderr);
        assert!(ended.waited < Duration::from_secs(10), "{:?}", ended.waited);
        let line = ended.error_line();
        assert!(
            line.contains(list.as_str()) && line.contains(why),
            "{line:?}"
        );
        assert_eq!(
            ended
                .stderr
                .lines()
                .filter(|l| l.starts_with("error: "))
                .count(),
            1,
            "{}",
            ended.stderr
        );
        expect_failed(&p.fx.source_status, Kind::Source)?;
        assert!(
            destination.child.try_wait()?.is_none(),
            "the destination saw no session"
        );
    }
    let now = (
        file_bytes(&p.fx.target)?,
        file_bytes(&p.destination_manifest())?,
        file_bytes(&p.fx.destination_status)?,
    );
    assert!(
        before == now,
        "the destination's target, manifest or status changed"
    );
    assert!(
        p.source_manifest().is_file(),
        "a failed source keeps its manifest"
    );

    // The same destination then serves a good source: the pair's manifests still hold, so it is a delta.
    let out = run_source_with(
        destination.addr,
        &p.fx.volume,
        &p.fx.psk,
        &p.fx.source_status,
        &["--state-dir", &p.sa],
    )?;
    let finished = destination.wait(AGENT_TIMEOUT)?;
    assert!(
        out.status.success() && finished.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        finished.stderr
    );
    p.fx.expect_target_matches_volume()?;
    let status = crate::common::expect_successful(&p.fx.source_status, Kind::Source)?;
    assert_eq!(
        super::text(&status, "syncKind"),
        Some("delta-manifest"),
        "{status:#}"
    );
    Ok(())
}
