//! Syncs whose change list and allocation map come from the SnapshotMetadata service.

use anyhow::Result;

use super::server::{Bad, Behaviour};
use super::Cbt;
use crate::delta::{
    scattered, scribble, scribble_chunks, text, BLOCK, CHUNK, MIB, SOURCE_NO_MANIFEST,
};

/// `fullReason` of a sync whose tracker failed.
const TRACKER_FAILED: &str = "the source's change tracker failed";

/// A first sync (no manifest yet) asks GetMetadataAllocated and reads only the chunks that hold allocated blocks:
/// the rest is zeros without a read, and the target still equals the volume.
#[test]
fn a_first_sync_reads_only_the_allocated_chunks() -> Result<()> {
    let size = 8 * MIB;
    let mut c = Cbt::new(size, 41)?;
    // A volume of written zeros (not a sparse file, so that only the tracker's map can spare the reads) with data
    // in chunks 3, 50 and 51, and one block of chunk 77.
    std::fs::write(&c.p.fx.volume, vec![0u8; size as usize])?;
    scribble_chunks(&c.p.fx.volume, &[3, 50, 51], 1)?;
    scribble(&c.p.fx.volume, &[77 * (CHUNK / BLOCK) + 5], 1)?;
    let k = c.snapshot()?;
    c.server.behave(Behaviour {
        fixed: false,
        ..Behaviour::default()
    });
    let out = c.sync(&c.flags(k, None), &[])?;
    out.expect_full(SOURCE_NO_MANIFEST);
    assert_eq!(
        out.src("bytesRead"),
        4 * CHUNK,
        "only the four allocated chunks are read: {}\n{}",
        out.describe(),
        out.source_log
    );
    let tracker = text(&out.source, "changeTracker").unwrap_or("");
    assert!(tracker.contains("apps/snap-1"), "{}", out.describe());
    assert!(
        text(&out.source, "changeTrackerError").is_none(),
        "{}",
        out.describe()
    );
    let calls = c.server.take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].method, "GetMetadataAllocated");
    assert_eq!(calls[0].snapshots, "apps/snap-1");
    assert!(calls[0].authenticated, "{calls:?}");
    Ok(())
}

/// An incremental asks GetMetadataDelta from the base snapshot's handle and reads only the chunks it names
/// (`delta-changelist`): FIXED_LENGTH blocks paged two per message, then VARIABLE_LENGTH extents.
#[test]
fn a_delta_reads_only_the_chunks_the_service_says_changed() -> Result<()> {
    let size = 8 * MIB;
    let mut c = Cbt::new(size, 42)?;
    let k1 = c.snapshot()?;
    let first = c.sync(&c.flags(k1, None), &[])?;
    first.expect_full(SOURCE_NO_MANIFEST);
    assert_eq!(
        first.src("bytesRead"),
        size,
        "a random volume is all allocated"
    );
    c.server.take_calls();

    let changed = scattered(size, 6, 5);
    scribble(&c.p.fx.volume, &changed, 2)?;
    let k2 = c.snapshot()?;
    let second = c.sync(&c.flags(k2, Some(k1)), &["--cbt-max-results", "2"])?;
    second.expect_delta("delta-changelist");
    let n = changed.len() as u64;
    assert_eq!(
        second.src("bytesRead"),
        n * BLOCK,
        "the listed blocks only (their chunks' others are in source.blocks): {}",
        second.describe()
    );
    assert_eq!(second.src("blocksSent"), n, "{}", second.describe());
    let tracker = text(&second.source, "changeTracker").unwrap_or("");
    for what in [
        "CSI snapshot metadata",
        "apps/snap-2",
        "since snapshot handle-1",
    ] {
        assert!(tracker.contains(what), "{what}: {}", second.describe());
    }
    assert!(text(&second.source, "changeTrackerError").is_none());
    let calls = c.server.take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.method, "GetMetadataDelta");
    assert_eq!(call.snapshots, "handle-1 -> apps/snap-2");
    assert_eq!(
        (call.starting_offset, call.max_results, call.messages),
        (0, 2, 3),
        "{call:?}"
    );

    // Two whole chunks and a block next to them, as VARIABLE_LENGTH extents.
    c.server.behave(Behaviour {
        fixed: false,
        ..Behaviour::default()
    });
    scribble_chunks(&c.p.fx.volume, &[10, 11], 3)?;
    scribble(&c.p.fx.volume, &[12 * (CHUNK / BLOCK)], 3)?;
    let k3 = c.snapshot()?;
    let third = c.sync(&c.flags(k3, Some(k2)), &[])?;
    third.expect_delta("delta-changelist");
    assert_eq!(
        third.src("bytesRead"),
        2 * CHUNK + BLOCK,
        "{}",
        third.describe()
    );
    let calls = c.server.take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].messages, 1, "one extent: {calls:?}");
    Ok(())
}

/// A stream cut after one message (three times) is asked again from the end of the last range received; the
/// sync is still a delta and the target equals the volume.
#[test]
fn a_cut_stream_is_resumed_where_it_stopped() -> Result<()> {
    let size = 8 * MIB;
    let mut c = Cbt::new(size, 43)?;
    let k1 = c.snapshot()?;
    c.sync(&c.flags(k1, None), &[])?;
    c.server.take_calls();
    let mut changed = scattered(size, 6, 7);
    scribble(&c.p.fx.volume, &changed, 4)?;
    changed.sort_unstable();
    let k2 = c.snapshot()?;
    c.server.behave(Behaviour {
        cut_after: 1,
        cuts: 3,
        ..Behaviour::default()
    });
    let out = c.sync(&c.flags(k2, Some(k1)), &["--cbt-max-results", "1"])?;
    out.expect_delta("delta-changelist");
    assert_eq!(out.src("bytesRead"), 6 * BLOCK, "{}", out.describe());
    let calls = c.server.take_calls();
    let offsets: Vec<i64> = calls.iter().map(|c| c.starting_offset).collect();
    let ends: Vec<i64> = changed[..3]
        .iter()
        .map(|b| ((b + 1) * BLOCK) as i64)
        .collect();
    assert_eq!(offsets, [&[0][..], &ends].concat(), "{calls:?}");
    assert!(
        out.source_log.contains("resuming at byte"),
        "{}",
        out.source_log
    );
    Ok(())
}

/// A bad range (not increasing, past the end), a wrong token (the token file is read again for each sync), a
/// stream cut more often than the client resumes, and a server that is down: each sync is a full comparison that
/// says the tracker failed and why (`changeTrackerError`), asks that service for no allocation map, reads the whole
/// volume and leaves target == volume.
#[test]
fn a_failing_service_means_a_full_comparison_that_says_why() -> Result<()> {
    let size = 8 * MIB;
    let mut c = Cbt::new(size, 44)?;
    let mut base = c.snapshot()?;
    c.sync(&c.flags(base, None), &[])?;
    c.server.take_calls();
    let cases: [(&str, Behaviour, &str); 4] = [
        (
            "not increasing",
            Behaviour {
                bad: Some(Bad::NotIncreasing),
                ..Behaviour::default()
            },
            "strictly increasing",
        ),
        (
            "past the end",
            Behaviour {
                bad: Some(Bad::PastEnd),
                ..Behaviour::default()
            },
            "ends past the end of the volume (8388608 bytes)",
        ),
        ("wrong token", Behaviour::default(), "Unauthenticated"),
        (
            "cut too often",
            Behaviour {
                cut_after: 1,
                cuts: 1000,
                ..Behaviour::default()
            },
            "after 8 resumed streams",
        ),
    ];
    for (i, (case, behaviour, why)) in cases.into_iter().enumerate() {
        scribble(
            &c.p.fx.volume,
            &scattered(size, 20, i as u64),
            10 + i as u64,
        )?;
        let k = c.snapshot()?;
        c.server.behave(behaviour);
        if case == "wrong token" {
            std::fs::write(&c.token, "not-the-token\n")?;
        }
        let out = c.sync(&c.flags(k, Some(base)), &["--cbt-max-results", "1"])?;
        std::fs::write(&c.token, format!("{}\n", super::TOKEN))?;
        expect_tracker_failed(&out, why, size, case);
        let methods: Vec<&str> = c.server.take_calls().iter().map(|c| c.method).collect();
        assert!(
            !methods.contains(&"GetMetadataAllocated"),
            "{case}: no allocation map is asked of a service whose change list failed: {methods:?}"
        );
        base = k;
    }
    scribble(&c.p.fx.volume, &scattered(size, 4, 9), 20)?;
    let k = c.snapshot()?;
    let flags = c.flags(k, Some(base));
    let Cbt { p, server, .. } = c;
    server.stop();
    let out = p.sync(&flags.iter().map(String::as_str).collect::<Vec<_>>(), &[])?;
    expect_tracker_failed(&out, "cannot connect to", size, "down");
    Ok(())
}

fn expect_tracker_failed(out: &crate::delta::Outcome, why: &str, size: u64, case: &str) {
    out.expect_full(TRACKER_FAILED);
    let error = text(&out.source, "changeTrackerError").unwrap_or("");
    assert!(
        error.contains(why),
        "{case}: changeTrackerError {error:?} does not say {why:?}: {}",
        out.describe()
    );
    assert_eq!(out.src("bytesRead"), size, "{case}: {}", out.describe());
    out.expect_whole_target_read();
    assert!(
        out.source_log.contains("running a full comparison"),
        "{case}: {}",
        out.source_log
    );
}

/// What the service's diff is trusted for, and what bounds it: a range it leaves out is not read, so the delta is
/// Successful and the target differs there; `--verify full` compares in full (asking no allocation map), repairs
/// the range and counts it in `changeListMissedChunks`.
#[test]
fn a_range_the_service_leaves_out_is_repaired_by_verify_full() -> Result<()> {
    let size = 8 * MIB;
    let mut c = Cbt::new(size, 45)?;
    let k1 = c.snapshot()?;
    c.sync(&c.flags(k1, None), &[])?;
    scribble(&c.p.fx.volume, &scattered(size, 4, 3), 50)?;
    let k2 = c.snapshot()?;
    c.server.behave(Behaviour {
        lie: true,
        ..Behaviour::default()
    });
    let lied = c.sync_unchecked(&c.flags(k2, Some(k1)))?;
    lied.expect_delta("delta-changelist");
    assert_eq!(lied.src("bytesRead"), 3 * BLOCK, "{}", lied.describe());
    assert_ne!(
        c.p.fx.target_digest()?,
        c.p.fx.volume_digest()?,
        "the range left out was not synced"
    );
    c.server.take_calls();
    let k3 = c.snapshot()?;
    let fixed = c.sync(&c.flags(k3, Some(k2)), &["--verify", "full"])?;
    fixed.expect_full("--verify full");
    assert_eq!(fixed.src("bytesRead"), size, "{}", fixed.describe());
    assert_eq!(
        fixed.src("changeListMissedChunks"),
        1,
        "{}",
        fixed.describe()
    );
    assert_eq!(fixed.src("chunksChanged"), 1, "{}", fixed.describe());
    let methods: Vec<&str> = c.server.take_calls().iter().map(|c| c.method).collect();
    assert_eq!(
        methods,
        ["GetMetadataDelta"],
        "a verifying sync asks no allocation map"
    );
    Ok(())
}
