//! Syncs over NBD: the first (a full comparison that reads only what base:allocation says is allocated), a delta
//! from the dirty bitmap (reads only the dirty chunks), and an absent bitmap (a full comparison, still equal).

use anyhow::Result;

use super::{nbd_bytes_read, qemu_tools, Image, CHUNK, MIB};
use crate::delta::text;

#[test]
fn a_first_sync_skips_unallocated_ranges_and_a_delta_reads_only_the_dirty_chunks() -> Result<()> {
    if !qemu_tools() {
        return Ok(());
    }
    let mut img = Image::new(64 * MIB)?;
    // 3 MiB + 64 KiB of guest data in a 64 MiB disk; the rest never written (unallocated).
    img.write(&[(0x5a, MIB, 3 * MIB), (0x33, 40 * MIB, CHUNK)])?;
    img.serve(Some("b0"))?;
    let first = img.sync(&["--dirty-bitmap", "b0"])?;
    first.expect_full(crate::delta::SOURCE_NO_MANIFEST);
    assert!(
        first.source_log.contains(&img.uri()),
        "the log names the export: {}",
        first.source_log
    );
    assert!(
        first
            .source_log
            .contains("bytes allocated; the rest is read as zeros"),
        "{}",
        first.source_log
    );
    // Each allocated chunk is read twice (scan, then DATA for the empty target); nothing else.
    let allocated = 3 * MIB + CHUNK;
    assert_eq!(
        nbd_bytes_read(&first.source_log)?,
        2 * allocated,
        "{}",
        first.source_log
    );
    assert_eq!(first.dst("chunksChanged"), allocated / CHUNK);
    assert_eq!(
        first.src("bytesRead"),
        allocated,
        "the scan read the allocated chunks only: {}",
        first.describe()
    );

    // Writes while the export is stopped: the bitmap, cleared at the last sync, records them.
    img.stop()?;
    img.bitmap("--clear", "b0")?;
    img.write(&[(0x77, 2 * MIB + 4096, 8192), (0x19, 50 * MIB, 4096)])?;
    img.serve(Some("b0"))?;
    let delta = img.sync(&["--dirty-bitmap", "b0"])?;
    delta.expect_delta("delta-changelist");
    let tracker = text(&delta.source, "changeTracker").unwrap_or("");
    assert!(tracker.contains("dirty bitmap b0"), "{}", delta.describe());
    assert!(
        text(&delta.source, "changeTrackerError").is_none(),
        "{}",
        delta.describe()
    );
    // Two dirty 64 KiB bitmap granules, two chunks: scanned once each, sent once each.
    assert_eq!(delta.src("bytesRead"), 2 * CHUNK, "{}", delta.describe());
    assert_eq!(
        nbd_bytes_read(&delta.source_log)?,
        4 * CHUNK,
        "{}",
        delta.source_log
    );
    assert_eq!(delta.dst("chunksChanged"), 2, "{}", delta.describe());
    Ok(())
}

#[test]
fn a_bitmap_the_export_lacks_falls_back_to_a_full_comparison() -> Result<()> {
    if !qemu_tools() {
        return Ok(());
    }
    let mut img = Image::new(16 * MIB)?;
    img.write(&[(0x5a, 0, 2 * MIB)])?;
    img.serve(None)?;
    // No bitmap flag: an NBD volume still uses base:allocation, and the second sync is a delta by manifest.
    img.sync(&[])?;
    img.stop()?;
    img.write(&[(0x42, 8 * MIB, 4096)])?;
    img.serve(None)?;
    let manifest = img.sync(&[])?;
    manifest.expect_delta("delta-manifest");
    // Protocol 8: the changed block is pushed, read again from the export on the read-depth pool.
    assert_eq!(manifest.src("pushedChunks"), 1, "{}", manifest.describe());
    assert_eq!(manifest.src("blocksSent"), 1, "{}", manifest.describe());
    img.stop()?;
    img.write(&[(0x43, 9 * MIB, 4096)])?;
    // Served without -B: qemu:dirty-bitmap:b0 is not offered.
    img.serve(None)?;
    let full = img.sync(&["--dirty-bitmap", "b0"])?;
    full.expect_full("the source's change tracker failed");
    let why = text(&full.source, "changeTrackerError").unwrap_or("");
    assert!(
        why.contains("does not offer dirty bitmap b0"),
        "{}",
        full.describe()
    );
    assert!(
        text(&full.source, "changeTracker").is_some_and(|t| t.contains("b0")),
        "{}",
        full.describe()
    );
    Ok(())
}

#[test]
fn a_tcp_export_syncs_and_deltas_like_a_unix_one() -> Result<()> {
    if !qemu_tools() {
        return Ok(());
    }
    let mut img = Image::new(8 * MIB)?;
    img.use_tcp()?;
    img.write(&[(0x61, 0, MIB), (0x62, 7 * MIB, 4096)])?;
    img.serve(Some("b0"))?;
    let first = img.sync(&["--dirty-bitmap", "b0"])?;
    first.expect_full(crate::delta::SOURCE_NO_MANIFEST);
    assert!(
        first.source_log.contains("nbd://127.0.0.1:"),
        "{}",
        first.source_log
    );
    img.stop()?;
    img.bitmap("--clear", "b0")?;
    img.write(&[(0x63, 3 * MIB, 4096)])?;
    img.serve(Some("b0"))?;
    let delta = img.sync(&["--dirty-bitmap", "b0"])?;
    delta.expect_delta("delta-changelist");
    assert_eq!(delta.src("bytesRead"), CHUNK, "{}", delta.describe());
    Ok(())
}
