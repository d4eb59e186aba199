//! Protocol 5's BLOCKS: a delta by change list that names blocks pushes them with each chunk's digest (and since
//! protocol 7 the cover of its other blocks), and the destination writes them without a NEED, reading only the
//! listed blocks of its target; a list that names a chunk but misses one of its changed blocks is caught by the
//! cover against the destination's manifest and repaired in the same sync; a list of whole chunks says nothing
//! finer and is compared with NEED and block digests as before. With the block digests of its last sync
//! (`source.blocks`) the source reads only the listed blocks too, and a missed block of a listed chunk is then
//! trusted like a missed chunk: `--verify full` repairs it.

use anyhow::Result;

use super::{
    change_list, scattered, scribble, scribble_behind, scribble_chunks, warnings, Outcome, Pair,
    BLOCK, CHUNK, MIB,
};
use crate::common::external_u64;

/// A NEED with block digests carries 16 of them (512 bytes) for a 64 KiB chunk.
const NEED_BYTES: u64 = 8 + 1 + 16 * 32;

fn pushed(o: &Outcome) -> (Option<u64>, Option<u64>, Option<u64>) {
    (
        external_u64(&o.source, "pushedChunks").ok(),
        external_u64(&o.destination, "pushedChunks").ok(),
        external_u64(&o.destination, "pushMissedChunks").ok(),
    )
}

#[test]
fn a_change_list_of_blocks_is_pushed_and_written_without_a_need() -> Result<()> {
    let p = Pair::new(32 * MIB, 0x9_5001)?;
    p.sync(&[], &[])?;
    let n = 64;
    // Round 1 with the block digests of the full sync: the source reads only the listed blocks, the destination
    // nothing. Round 2 without them (deleted) and round 3 with damaged files: the source reads each listed chunk
    // whole, the destination its target's listed blocks, and the sync is as exact.
    for (round, src_read, dst_read) in [(1, BLOCK, 0), (2, CHUNK, BLOCK), (3, CHUNK, BLOCK)] {
        for file in [p.source_blocks(), p.destination_blocks()] {
            match round {
                2 => std::fs::remove_file(file)?,
                3 => {
                    let len = std::fs::metadata(&file)?.len();
                    crate::common::random_volume(&file, len, 9)?;
                }
                _ => {}
            }
        }
        let changed = scattered(p.size(), n, 5 + round);
        let extents = scribble(&p.fx.volume, &changed, round)?;
        let list = change_list(p.fx.dir.path(), "blocks.json", &extents)?;
        let o = p.sync(&["--changed-extents", &list], &[])?;
        o.expect_delta("delta-changelist");
        assert_eq!(pushed(&o), (Some(n), Some(n), None), "{}", o.describe());
        assert_eq!(o.src("blocksSent"), n, "{}", o.describe());
        assert_eq!(o.dst("blocksSent"), n, "{}", o.describe());
        assert_eq!(
            o.src("bytesRead"),
            n * src_read,
            "round {round}: the source's reads of the {n} listed blocks: {}",
            o.describe()
        );
        assert_eq!(
            o.dst("bytesRead"),
            n * dst_read,
            "round {round}: the destination's reads of its target: {}",
            o.describe()
        );
        let asked = o.dst("wireBytesSent");
        assert!(
            asked < n * NEED_BYTES / 2,
            "the destination sent {asked} bytes: no NEED for {n} pushed chunks ({} bytes of NEED): {}",
            n * NEED_BYTES,
            o.describe()
        );
    }
    Ok(())
}

#[test]
fn a_list_that_misses_a_block_of_a_listed_chunk_is_repaired_in_the_same_sync() -> Result<()> {
    let p = Pair::new(16 * MIB, 0x9_5002)?;
    p.sync(&[], &[])?;
    // Without its block digests the source reads listed chunks whole, and its cover tells the missed block.
    std::fs::remove_file(p.source_blocks())?;
    let per = CHUNK / BLOCK;
    // Chunk 10: blocks 3 and 4 written, only block 3 listed. Chunk 40: block 7 written and listed.
    let written = scribble(&p.fx.volume, &[10 * per + 3, 10 * per + 4, 40 * per + 7], 2)?;
    let list = change_list(p.fx.dir.path(), "short.json", &[written[0], written[2]])?;
    let o = p.sync(&["--changed-extents", &list], &[])?;
    o.expect_delta("delta-changelist");
    assert_eq!(pushed(&o), (Some(2), Some(2), Some(1)), "{}", o.describe());
    assert_eq!(
        o.dst("blocksSent"),
        1 + 2,
        "chunk 40's pushed block, then the two differing blocks of chunk 10: {}",
        o.describe()
    );
    assert_eq!(
        o.dst("bytesRead"),
        CHUNK,
        "chunk 10 whole for its NEED (the listed blocks' digests are in destination.blocks): {}",
        o.describe()
    );
    let log = o.destination_log.as_deref().unwrap_or("");
    assert!(
        warnings(log)
            .iter()
            .any(|l| l
                .contains("1 chunks of the change list changed in blocks the list did not name")),
        "{log}"
    );
    Ok(())
}

/// With block digests the source reads only a listed chunk's listed blocks and covers the others with their
/// digests from the last sync: a block the list misses is then not seen, as a chunk it misses is not (the
/// documented trust in a change list), and `--verify full` finds and repairs it.
#[test]
fn with_block_digests_a_missed_block_of_a_listed_chunk_waits_for_verify_full() -> Result<()> {
    let p = Pair::new(16 * MIB, 0x9_5004)?;
    p.sync(&[], &[])?;
    let per = CHUNK / BLOCK;
    let written = scribble(&p.fx.volume, &[10 * per + 3, 10 * per + 4, 40 * per + 7], 2)?;
    let list = change_list(p.fx.dir.path(), "short.json", &[written[0], written[2]])?;
    let lied = p.sync_unchecked(&["--changed-extents", &list], &[])?;
    lied.expect_delta("delta-changelist");
    assert_eq!(lied.src("bytesRead"), 2 * BLOCK, "{}", lied.describe());
    assert_eq!(
        pushed(&lied),
        (Some(2), Some(2), None),
        "{}",
        lied.describe()
    );
    assert_ne!(
        p.fx.target_digest()?,
        p.fx.volume_digest()?,
        "the missed block is behind on the target (documented)"
    );
    let empty = change_list(p.fx.dir.path(), "empty.json", &[])?;
    let fixed = p.sync(&["--changed-extents", &empty, "--verify", "full"], &[])?;
    fixed.expect_full("the source asked for a full comparison");
    assert_eq!(
        fixed.src("changeListMissedChunks"),
        1,
        "{}",
        fixed.describe()
    );
    assert_eq!(fixed.src("blocksSent"), 1, "only the missed block travels");
    // The full comparison rewrote the block digests: the next list is read block by block again.
    let again = scribble(&p.fx.volume, &[10 * per + 5], 3)?;
    let list = change_list(p.fx.dir.path(), "next.json", &again)?;
    let o = p.sync(&["--changed-extents", &list], &[])?;
    o.expect_delta("delta-changelist");
    assert_eq!(o.src("bytesRead"), BLOCK, "{}", o.describe());
    Ok(())
}

#[test]
fn a_list_of_whole_chunks_is_compared_block_by_block_not_pushed() -> Result<()> {
    let p = Pair::new(16 * MIB, 0x9_5003)?;
    p.sync(&[], &[])?;
    // Whole chunks listed, one block of each written: a 64 KiB tracker's view of scattered writes.
    let per = CHUNK / BLOCK;
    let chunks = [3u64, 50, 200];
    scribble(
        &p.fx.volume,
        &chunks.iter().map(|c| c * per + 9).collect::<Vec<_>>(),
        3,
    )?;
    let listed: Vec<(u64, u64)> = chunks.iter().map(|c| (c * CHUNK, CHUNK)).collect();
    let list = change_list(p.fx.dir.path(), "chunks.json", &listed)?;
    let o = p.sync(&["--changed-extents", &list], &[])?;
    o.expect_delta("delta-changelist");
    assert_eq!(pushed(&o), (None, None, None), "{}", o.describe());
    assert_eq!(
        o.src("blocksSent"),
        chunks.len() as u64,
        "only the written block of each chunk travels: {}",
        o.describe()
    );
    // And whole chunks rewritten, listed as whole chunks: the same path, every block sent.
    let listed = scribble_chunks(&p.fx.volume, &[7, 8], 4)?;
    let list = change_list(p.fx.dir.path(), "rewritten.json", &listed)?;
    let o = p.sync(&["--changed-extents", &list], &[])?;
    assert_eq!(pushed(&o), (None, None, None), "{}", o.describe());
    assert_eq!(o.src("blocksSent"), 2 * per, "{}", o.describe());
    Ok(())
}

/// `--block-digests off` trades reads for space (the files take up to 1/128 of the volume per role): an agent
/// keeps no block digests file and removes one left from before, and its deltas read what they read without
/// one. Turned back on, the files come back with the next sync.
#[test]
fn block_digests_off_keeps_no_block_digests_file_and_deltas_read_whole_chunks() -> Result<()> {
    let p = Pair::new(32 * MIB, 0x9_5005)?;
    p.sync(&[], &[])?;
    assert!(p.source_blocks().exists() && p.destination_blocks().exists());
    let off = ["--block-digests", "off"];
    let n = 16;
    let changed = scattered(p.size(), n, 7);
    let extents = scribble(&p.fx.volume, &changed, 1)?;
    let list = change_list(p.fx.dir.path(), "off.json", &extents)?;
    let o = p.sync(&["--changed-extents", &list, off[0], off[1]], &off)?;
    o.expect_delta("delta-changelist");
    assert!(
        !p.source_blocks().exists() && !p.destination_blocks().exists(),
        "both files removed: {}",
        o.describe()
    );
    assert_eq!(
        o.src("bytesRead"),
        n * CHUNK,
        "the source reads each listed chunk whole: {}",
        o.describe()
    );
    assert_eq!(
        o.dst("bytesRead"),
        n * BLOCK,
        "the destination reads its target's listed blocks: {}",
        o.describe()
    );
    // A delta by manifest: the destination reads each announced chunk for its NEED.
    scribble_chunks(&p.fx.volume, &[3, 200, 411], 2)?;
    let o = p.sync(&off, &off)?;
    o.expect_delta("delta-manifest");
    assert_eq!(o.dst("bytesRead"), 3 * CHUNK, "{}", o.describe());
    assert!(!p.source_blocks().exists() && !p.destination_blocks().exists());
    // Back on: the next sync writes them again, and the one after reads only the listed blocks.
    scribble_chunks(&p.fx.volume, &[5], 3)?;
    let o = p.sync(&[], &[])?;
    o.expect_delta("delta-manifest");
    assert!(p.source_blocks().exists() && p.destination_blocks().exists());
    let extents = scribble(&p.fx.volume, &scattered(p.size(), n, 8), 4)?;
    let list = change_list(p.fx.dir.path(), "on.json", &extents)?;
    let o = p.sync(&["--changed-extents", &list], &[])?;
    o.expect_delta("delta-changelist");
    assert_eq!(o.src("bytesRead"), n * BLOCK, "{}", o.describe());
    Ok(())
}

/// Protocol 8: a delta by manifest pushes too. The source compares the block digests of each chunk it hashed
/// with the base's (`source.blocks`) and pushes the blocks that differ with the cover of the others, so that the
/// destination asks nothing and reads nothing; the same check as a change list's proves each chunk against the
/// destination's manifest. Without the source's block digests it announces in DIGESTS and answers NEEDs.
#[test]
fn a_delta_by_manifest_pushes_the_blocks_that_differ_without_a_need() -> Result<()> {
    let p = Pair::new(32 * MIB, 0x9_5006)?;
    p.sync(&[], &[])?;
    let n = 64;
    scribble(&p.fx.volume, &scattered(p.size(), n, 21), 1)?;
    let o = p.sync(&[], &[])?;
    o.expect_delta("delta-manifest");
    assert_eq!(pushed(&o), (Some(n), Some(n), None), "{}", o.describe());
    assert_eq!(o.src("blocksSent"), n, "{}", o.describe());
    assert_eq!(o.dst("bytesRead"), 0, "{}", o.describe());
    assert_eq!(
        o.src("bytesRead"),
        p.size(),
        "the scan (the pushed blocks read again are not counted, as a NEED's are not): {}",
        o.describe()
    );
    let asked = o.dst("wireBytesSent");
    assert!(
        asked < n * NEED_BYTES / 2,
        "the destination sent {asked} bytes: no NEED for {n} pushed chunks: {}",
        o.describe()
    );

    // Without the source's block digests: DIGESTS and NEEDs, as exact.
    std::fs::remove_file(p.source_blocks())?;
    scribble(&p.fx.volume, &scattered(p.size(), n, 22), 2)?;
    let o = p.sync(&[], &[])?;
    o.expect_delta("delta-manifest");
    assert_eq!(pushed(&o), (None, None, None), "{}", o.describe());
    assert_eq!(o.src("blocksSent"), n, "{}", o.describe());
    assert!(
        o.dst("wireBytesSent") >= n * NEED_BYTES,
        "a NEED for each of the {n} chunks: {}",
        o.describe()
    );
    Ok(())
}

/// A pushed chunk of a delta by manifest whose target blocks drifted from the base (written behind the
/// destination's back, its mtime put back, and no `destination.blocks` to take the base's block digests from; in a
/// chunk of zeros in the base, which the spot check does not read) does not verify against the destination's
/// manifest: nothing is written, the destination asks with NEED, and the chunk is repaired in the same sync and
/// counted.
#[test]
fn a_manifest_push_onto_a_drifted_target_block_is_asked_again_and_repaired() -> Result<()> {
    let p = Pair::new(16 * MIB, 0x9_5007)?;
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&p.fx.volume)?,
        &vec![0u8; CHUNK as usize],
        12 * CHUNK,
    )?;
    p.sync(&[], &[])?;
    let per = CHUNK / BLOCK;
    let (drifted, other) = (12 * per + 5, 70 * per + 1);
    scribble(&p.fx.volume, &[drifted, other], 4)?;
    scribble_behind(&p.fx.target, &[drifted], 5)?;
    // A directory in place of the file: it cannot be opened (logged), so the destination reads what it checks.
    std::fs::remove_file(p.destination_blocks())?;
    std::fs::create_dir(p.destination_blocks())?;
    let o = p.sync(&[], &[])?;
    o.expect_delta("delta-manifest");
    assert_eq!(pushed(&o), (Some(2), Some(2), Some(1)), "{}", o.describe());
    assert_eq!(
        o.dst("bytesRead"),
        2 * BLOCK + CHUNK,
        "each pushed chunk's listed block, then the drifted chunk whole for its NEED: {}",
        o.describe()
    );
    assert_eq!(
        o.src("blocksSent"),
        2 + 1,
        "two pushed blocks, then the drifted chunk's differing block again: {}",
        o.describe()
    );
    assert_eq!(
        o.dst("blocksSent"),
        1 + 1,
        "the written pushed block, then the drifted chunk's: {}",
        o.describe()
    );
    let log = o.destination_log.as_deref().unwrap_or("");
    assert!(
        warnings(log)
            .iter()
            .any(|l| l.contains("1 pushed chunks did not verify against the target")),
        "{log}"
    );
    Ok(())
}
