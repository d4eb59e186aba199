//! Edges of the delta path: a volume whose size is not a multiple of the chunk or block size (its short last chunk
//! in a delta and in a change list), chunks that became zeros, `--read-back` after a delta, and a state directory
//! that cannot be used.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Result;

use super::{change_list, scribble, scribble_behind, Pair, BLOCK, CHUNK, MIB, SOURCE_NO_MANIFEST};
use crate::common::{file_bytes, run_source_with, Destination, Started};

/// Writes `bytes` at `offset` of `path`.
fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all_at(bytes, offset)?;
    file.sync_all()?;
    Ok(())
}

/// A volume of 16 MiB + 5000 bytes: its last chunk is 5000 bytes (a whole block and a short one). Deltas by
/// manifest and by change list carry changes in that short chunk and chunks that became all zeros.
#[test]
fn an_odd_sized_volume_deltas_its_short_last_chunk_and_zeroed_chunks() -> Result<()> {
    let size = 16 * MIB + 5000;
    let p = Pair::new(size, 0xdeb_0001)?;
    let last = size / CHUNK;
    let first = p.sync(&[], &[])?;
    first.expect_full(SOURCE_NO_MANIFEST);
    assert_eq!(first.src("chunksTotal"), last + 1);

    // The tail's last 1000 bytes, a whole chunk zeroed, a block of another chunk zeroed, one block rewritten.
    write_at(&p.fx.volume, size - 1000, &[0xa5; 1000])?;
    write_at(&p.fx.volume, 10 * CHUNK, &vec![0u8; CHUNK as usize])?;
    write_at(
        &p.fx.volume,
        20 * CHUNK + 3 * BLOCK,
        &vec![0u8; BLOCK as usize],
    )?;
    scribble(&p.fx.volume, &[100 * (CHUNK / BLOCK) + 7], 1)?;
    let out = p.sync(&[], &[])?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.dst("chunksChanged"), 4, "{}", out.describe());
    assert_eq!(out.dst("zeroChunks"), 1, "{}", out.describe());

    // A change list of unaligned extents: 10 bytes at the very end, one byte in chunk 30.
    write_at(&p.fx.volume, size - 10, b"0123456789")?;
    write_at(&p.fx.volume, 30 * CHUNK + 12345, b"x")?;
    let list = change_list(
        p.fx.dir.path(),
        "tail.json",
        &[(size - 10, 10), (30 * CHUNK + 12345, 1)],
    )?;
    let out = p.sync(&["--changed-extents", &list], &[])?;
    out.expect_delta("delta-changelist");
    assert_eq!(
        out.src("bytesRead"),
        BLOCK + (size - last * CHUNK - BLOCK),
        "the listed block of chunk 30 and the short last block of the short last chunk: {}",
        out.describe()
    );
    assert_eq!(out.src("blocksSent"), 2, "{}", out.describe());
    Ok(())
}

/// `destination --read-back` after a delta reads the whole target back and checks it: the delta succeeds.
#[test]
fn read_back_after_a_delta_succeeds() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xdeb_0002)?;
    p.sync(&[], &["--read-back"])?
        .expect_full(SOURCE_NO_MANIFEST);
    scribble(&p.fx.volume, &[5, 500, 3000], 1)?;
    let out = p.sync(&[], &["--read-back"])?;
    out.expect_delta("delta-manifest");
    println!(
        "read-back delta: destination bytesRead {}",
        out.dst("bytesRead")
    );
    assert_eq!(out.dst("chunksChanged"), 3, "{}", out.describe());
    assert!(
        out.dst("bytesRead") >= p.size(),
        "the read-back reads the whole target: {}",
        out.describe()
    );
    Ok(())
}

/// A `--state-dir` that is a regular file: each agent refuses at start-up, exit 1, naming it; the target is
/// untouched.
#[test]
fn a_state_dir_that_is_a_file_is_refused() -> Result<()> {
    let p = Pair::new(4 * MIB, 0xdeb_0003)?;
    let bogus = p.fx.dir.path().join("not-a-dir");
    std::fs::write(&bogus, "x")?;
    let bogus = bogus.to_string_lossy().into_owned();
    let before = file_bytes(&p.fx.target)?;

    let finished = match Destination::start(
        &p.fx.target,
        &p.fx.psk,
        &p.fx.destination_status,
        &["--state-dir", &bogus],
    )? {
        Started::Exited(f) => f,
        Started::Listening(_) => {
            panic!("a destination with a state directory that is a file listens")
        }
    };
    println!(
        "destination: {:?} {}",
        finished.code(),
        finished.error_line()
    );
    assert_eq!(finished.code(), Some(1), "{}", finished.stderr);
    assert!(
        finished.error_line().contains(&bogus),
        "{}",
        finished.stderr
    );

    let destination = Destination::spawn(&p.fx.target, &p.fx.psk, &p.fx.destination_status, &[])?;
    let out = run_source_with(
        destination.addr,
        &p.fx.volume,
        &p.fx.psk,
        &p.fx.source_status,
        &["--state-dir", &bogus],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "source: {:?} {}",
        out.status.code(),
        crate::common::error_line(&stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        crate::common::error_line(&stderr).contains(&bogus),
        "{stderr}"
    );
    drop(destination);
    assert!(
        file_bytes(&p.fx.target)? == before,
        "the target was written"
    );
    Ok(())
}

/// Flow control in a delta: the destination's smallest window (64 chunks) against a delta that announces every
/// other chunk (sparse runs), then a change list naming them in 2048 one-block extents: both correct.
#[test]
fn a_small_window_carries_sparse_deltas() -> Result<()> {
    let p = Pair::new(32 * MIB, 0xdeb_0004)?;
    let window = ["--window", "64"];
    p.sync(&[], &window)?.expect_full(SOURCE_NO_MANIFEST);
    let per = CHUNK / BLOCK;
    let every_other: Vec<u64> = (0..p.size() / CHUNK)
        .filter(|c| c % 2 == 1)
        .map(|c| c * per + c % per)
        .collect();
    scribble(&p.fx.volume, &every_other, 1)?;
    let out = p.sync(&[], &window)?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.dst("chunksChanged"), every_other.len() as u64);

    let blocks: Vec<u64> = (0..2048).map(|i| i * 4 + i % 3).collect();
    let extents = scribble(&p.fx.volume, &blocks, 2)?;
    let list = change_list(p.fx.dir.path(), "many.json", &extents)?;
    let out = p.sync(&["--changed-extents", &list], &window)?;
    out.expect_delta("delta-changelist");
    assert_eq!(out.src("blocksSent"), 2048, "{}", out.describe());
    assert_eq!(
        out.src("bytesRead"),
        2048 * BLOCK,
        "the listed blocks only: {}",
        out.describe()
    );
    Ok(())
}

/// A delta's destination does not hash the target chunks the source announces (the manifest says they hold the
/// base, which the source says they differ from), only their blocks. A target chunk that holds the announced bytes
/// after all (written behind the destination's back, its mtime put back so that the stamp does not see it, in a
/// chunk the manifest says is zeros so that the spot check, which reads chunks of data, does not either) is
/// pushed (protocol 8), does not verify against the manifest (its target block is not the base's), is asked for
/// with a NEED, gets a DATA with no blocks, is checked and settled: the delta succeeds, and the other changed
/// chunk travels as usual.
#[test]
fn a_delta_chunk_the_target_already_holds_is_settled_without_data() -> Result<()> {
    let p = Pair::new(16 * MIB, 0xed6_0005)?;
    write_at(&p.fx.volume, 3 * CHUNK, &vec![0u8; CHUNK as usize])?;
    p.sync(&[], &[])?.expect_full(SOURCE_NO_MANIFEST);

    let per = CHUNK / BLOCK;
    let (held, other) = (3 * per + 2, 40 * per + 7);
    scribble(&p.fx.volume, &[held, other], 11)?;
    scribble_behind(&p.fx.target, &[held], 11)?;

    // Without its block digests file (a directory in its place cannot be opened: logged, and the sync goes on
    // without it), the destination reads the announced chunks and sees the block that is already there. (With
    // it, the manifest's word that the chunk is zeros is taken, as for every chunk the session does not read.)
    std::fs::remove_file(p.destination_blocks())?;
    std::fs::create_dir(p.destination_blocks())?;
    let out = p.sync(&[], &[])?;
    out.expect_delta("delta-manifest");
    assert_eq!(out.src("chunksChanged"), 2, "{}", out.describe());
    assert_eq!(
        out.src("blocksSent"),
        2,
        "the two pushed blocks; the NEED's DATA carries none: {}",
        out.describe()
    );
    assert_eq!(out.dst("pushMissedChunks"), 1, "{}", out.describe());
    let log = out.destination_log.as_deref().unwrap_or("");
    assert!(
        super::warnings(log)
            .iter()
            .any(|l| l.contains("destination.blocks")),
        "{log}"
    );
    p.sync(&[], &[])?.expect_delta("delta-manifest");
    Ok(())
}
